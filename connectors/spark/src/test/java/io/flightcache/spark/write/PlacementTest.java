package io.flightcache.spark.write;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.flightcache.spark.Options;
import io.flightcache.spark.protocol.FlightcacheException;
import io.flightcache.spark.write.Placement.Node;
import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.ObjectInputStream;
import java.io.ObjectOutputStream;
import java.net.InetAddress;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Map;
import org.apache.spark.sql.types.DataTypes;
import org.apache.spark.sql.types.StructType;
import org.junit.jupiter.api.Test;

class PlacementTest {
  private static final long GB = 1L << 30;

  private static Node node(String id, String host, long used, Long limit, long inFlight) {
    return new Node(id, "grpc+tcp://" + id + ".cache:8815", host, used, limit, inFlight);
  }

  private static byte[] json(String text) {
    return text.getBytes(StandardCharsets.UTF_8);
  }

  /** The answer as docs/protocol.md gives it: every field read, ints as longs, a null limit kept null, order kept. */
  @Test
  void parsesTheNodesAnswer() {
    List<Node> nodes =
        Placement.parse(
            json(
                "[{\"id\": \"n1a2b\", \"name\": \"cache-1\", \"location\": \"grpc+tcp://10.0.0.1:8815\", \"host\": \"10.0.0.1\","
                    + " \"memory_used\": 5368709120, \"memory_limit\": 17179869184, \"datasets\": 3, \"load\": 0.31,"
                    + " \"in_flight\": 2, \"state\": \"up\", \"started\": 1796400000.5, \"self\": true},"
                    + " {\"id\": \"n9\", \"name\": \"cache-2\", \"location\": \"grpc+tcp://10.0.0.2:8815\", \"host\": null,"
                    + " \"memory_used\": 0, \"memory_limit\": null, \"datasets\": 0, \"load\": 0.0, \"in_flight\": 0,"
                    + " \"state\": \"up\", \"started\": 1796400001.0, \"self\": false}]"));
    assertEquals(
        List.of(
            new Node("n1a2b", "grpc+tcp://10.0.0.1:8815", "10.0.0.1", 5 * GB, 16 * GB, 2),
            new Node("n9", "grpc+tcp://10.0.0.2:8815", null, 0, null, 0)),
        nodes);
    assertEquals(5.0 / 16, nodes.get(0).load());
    assertEquals("10.0.0.2", nodes.get(1).hostName(), "no host: the location's");
    assertTrue(Placement.clustered(nodes));
  }

  /** A standalone server's single entry (no location) and an empty answer are no cluster: parts go to the configured server. */
  @Test
  void standaloneIsNoCluster() {
    List<Node> standalone =
        Placement.parse(
            json(
                "[{\"id\": \"standalone\", \"name\": \"vm\", \"location\": null, \"host\": null, \"memory_used\": 10,"
                    + " \"memory_limit\": 100, \"datasets\": 1, \"load\": 0.0, \"in_flight\": 1, \"state\": \"up\","
                    + " \"started\": 1.0, \"self\": true}]"));
    assertEquals(List.of(new Node("standalone", null, null, 10, 100L, 1)), standalone);
    assertNull(standalone.get(0).hostName());
    assertFalse(Placement.clustered(standalone));
    assertFalse(Placement.clustered(Placement.parse(json("[]"))));
  }

  /** Only nodes that are up take parts; fields placement does not use may be missing or new. */
  @Test
  void nodesNotUpAreLeftOut() {
    List<Node> nodes =
        Placement.parse(
            json(
                "[{\"id\": \"a\", \"location\": \"grpc://a:1\", \"state\": \"draining\"},"
                    + " {\"id\": \"b\", \"location\": \"grpc://b:1\", \"zone\": \"eu-1\"}]"));
    assertEquals(List.of(new Node("b", "grpc://b:1", null, 0, null, 0)), nodes);
  }

  /** An answer that is not a list of nodes fails with INVALID_REQUEST and says what is wrong. */
  @Test
  void malformedAnswersFail() {
    assertMalformed("{\"id\": \"a\"}", "not a JSON array of objects");
    assertMalformed("[1, 2]", "not a JSON array of objects");
    assertMalformed("not json", "not a JSON array of objects");
    assertMalformed("null", "null instead of an array");
    assertMalformed("[{\"location\": \"grpc://a:1\"}]", "a node without an id");
    assertMalformed("[{\"id\": 7}]", "the field id of a node is not a string");
    assertMalformed("[{\"id\": \"a\", \"memory_used\": \"1GB\"}]", "the field memory_used of a node is not a number");
  }

  private static void assertMalformed(String answer, String expected) {
    FlightcacheException e = assertThrows(FlightcacheException.class, () -> Placement.parse(json(answer)));
    assertEquals("INVALID_REQUEST", e.code());
    assertTrue(e.getMessage().contains(expected), e.getMessage());
  }

  /** A node on the task's host wins even when it is the most loaded; hosts compare without case; no host: the location's. */
  @Test
  void sameHostFirst() {
    Node busy = node("a", "worker-1", 15 * GB, 16 * GB, 9);
    Node idle = node("b", "worker-2", 0, 16 * GB, 0);
    List<Node> nodes = List.of(idle, busy);
    assertEquals(busy, Placement.choose(nodes, "worker-1", 0));
    assertEquals(busy, Placement.choose(nodes, "WORKER-1", 5));
    assertEquals(idle, Placement.choose(nodes, "worker-2", 0));
    Node byLocation = new Node("c", "grpc+tcp://10.0.0.3:8815", null, 15 * GB, 16 * GB, 0);
    assertEquals(byLocation, Placement.choose(List.of(idle, byLocation), "10.0.0.3", 0));
  }

  /** With no node on the task's host (or no known host), the lowest memory fraction wins, not the fewest bytes. */
  @Test
  void leastLoadedWhenNoNodeOnTheHost() {
    Node small = node("a", "h1", 3 * GB, 4 * GB, 0); // 75 %
    Node large = node("b", "h2", 8 * GB, 32 * GB, 5); // 25 %
    Node half = node("c", "h3", 1 * GB, 2 * GB, 0); // 50 %
    List<Node> nodes = List.of(small, large, half);
    assertEquals(large, Placement.choose(nodes, "spark-worker-9", 0));
    assertEquals(large, Placement.choose(nodes, null, 3));
  }

  /** Equal memory fractions: fewest calls in flight; equal in both: by id, the partition number spreading parts over them. */
  @Test
  void tiesGoToFewestInFlightThenId() {
    Node busy = node("a", "h1", GB, 4 * GB, 3);
    Node calm = node("b", "h2", 2 * GB, 8 * GB, 1);
    assertEquals(calm, Placement.choose(List.of(busy, calm), "elsewhere", 0));
    assertEquals(calm, Placement.choose(List.of(busy, calm), "elsewhere", 1));

    Node x = node("x", "h1", 0, 4 * GB, 0);
    Node y = node("y", "h2", 0, 8 * GB, 0);
    Node z = node("z", "h3", 0, 16 * GB, 0);
    Node loaded = node("w", "h4", GB, 16 * GB, 0);
    List<Node> fresh = List.of(z, loaded, y, x);
    assertEquals(x, Placement.choose(fresh, "elsewhere", 0), "partition 0: the lowest id");
    assertEquals(
        List.of(x, y, z, x, y, z),
        List.of(0, 1, 2, 3, 4, 5).stream().map(p -> Placement.choose(fresh, "elsewhere", p)).toList(),
        "only the equally least loaded nodes take turns");
    // two nodes on the task's host: the same rules among them
    Node local1 = node("l1", "worker-1", 0, GB, 0);
    Node local2 = node("l2", "worker-1", 0, GB, 0);
    List<Node> both = List.of(local2, z, local1);
    assertEquals(local1, Placement.choose(both, "worker-1", 0));
    assertEquals(local2, Placement.choose(both, "worker-1", 1));
  }

  /** A node without a memory limit counts as empty. */
  @Test
  void noLimitCountsAsEmpty() {
    Node unlimited = node("b", "h2", 100 * GB, null, 0);
    Node limited = node("a", "h1", GB, 100 * GB, 0);
    assertEquals(0.0, unlimited.load());
    assertEquals(unlimited, Placement.choose(List.of(limited, unlimited), "elsewhere", 0));
  }

  /**
   * The factory Spark ships to executors: the configured server without a cluster or for a node without a
   * location, else the chosen node's location; the nodes survive Java serialization.
   */
  @Test
  void factoryTargets() throws Exception {
    Options options = Options.parse(Map.of("path", "a", "uri", "grpc://configured:8815"), Map.of());
    StructType schema = new StructType().add("id", DataTypes.LongType);
    assertEquals("grpc://configured:8815", new PartWriterFactory(options, schema, "t", "append", false, null).target(0));
    Node self = new Node("n0", null, "nowhere.invalid", 0, GB, 0);
    Node other = new Node("n1", "grpc+tcp://n1.invalid:8815", "n1.invalid", GB, 2 * GB, 0);
    PartWriterFactory cluster = new PartWriterFactory(options, schema, "t", "append", false, List.of(other, self));
    assertEquals("grpc://configured:8815", cluster.target(0), "the least loaded node is the configured server");
    PartWriterFactory shipped = roundTrip(new PartWriterFactory(options, schema, "t", "append", false, List.of(other)));
    assertEquals("grpc+tcp://n1.invalid:8815", shipped.target(0));
  }

  private static PartWriterFactory roundTrip(PartWriterFactory factory) throws Exception {
    ByteArrayOutputStream bytes = new ByteArrayOutputStream();
    try (ObjectOutputStream out = new ObjectOutputStream(bytes)) {
      out.writeObject(factory);
    }
    try (ObjectInputStream in = new ObjectInputStream(new ByteArrayInputStream(bytes.toByteArray()))) {
      return (PartWriterFactory) in.readObject();
    }
  }

  /** Without a SparkEnv (no Spark in this JVM) the task's host is this machine's address. */
  @Test
  void executorHostWithoutSpark() throws Exception {
    assertEquals(InetAddress.getLocalHost().getHostAddress(), PartWriterFactory.executorHost());
  }
}
