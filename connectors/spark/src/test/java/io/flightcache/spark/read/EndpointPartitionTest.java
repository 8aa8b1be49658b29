package io.flightcache.spark.read;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.flightcache.spark.Options;
import io.flightcache.spark.TestServer;
import io.flightcache.spark.protocol.Connection;
import io.flightcache.spark.protocol.FlightcacheException;
import io.flightcache.spark.protocol.Wire;
import io.flightcache.spark.write.FlightcacheWriteBuilder;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Map;
import org.apache.arrow.flight.FlightEndpoint;
import org.apache.arrow.flight.Location;
import org.apache.arrow.flight.Ticket;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.spark.sql.catalyst.InternalRow;
import org.apache.spark.sql.catalyst.expressions.GenericInternalRow;
import org.apache.spark.sql.connector.write.BatchWrite;
import org.apache.spark.sql.connector.write.DataWriter;
import org.apache.spark.sql.connector.write.WriterCommitMessage;
import org.apache.spark.sql.types.DataTypes;
import org.apache.spark.sql.types.StructType;
import org.junit.jupiter.api.Test;

/** Endpoints with several locations (replicas): Spark's preferred hosts, and which server a reader reads from. */
class EndpointPartitionTest {
  private static final StructType SCHEMA = new StructType().add("id", DataTypes.LongType);
  private static final Ticket TICKET = new Ticket("t".getBytes(StandardCharsets.UTF_8));
  private static final String CLOSED = "grpc+tcp://127.0.0.1:1"; // nothing listens on port 1

  private static Options options(String uri, String name) {
    return Options.parse(Map.of("path", name, "uri", uri), Map.of());
  }

  private static Location at(String uri) {
    return new Location(URI.create(uri));
  }

  /** Every location is a server to try, in order; each host once, in order, is a preferred location. */
  @Test
  void everyLocationInOrder() {
    EndpointPartition p =
        EndpointPartition.of(
            options("grpc://configured:8815", "a"),
            new FlightEndpoint(TICKET, at("grpc+tcp://b:1"), at("grpc+tcp://a:2"), at("grpc+tcp://b:3"), at("grpc+tcp://a:2")));
    assertEquals(List.of("grpc+tcp://b:1", "grpc+tcp://a:2", "grpc+tcp://b:3"), p.uris);
    assertArrayEquals(new String[] {"b", "a"}, p.preferredLocations());
  }

  /** One location as before; none, or Flight's reuse-connection, is the configured server. */
  @Test
  void oneOrNoLocation() {
    Options o = options("grpc://configured:8815", "a");
    EndpointPartition one = EndpointPartition.of(o, new FlightEndpoint(TICKET, at("grpc+tcp://node:9")));
    assertEquals(List.of("grpc+tcp://node:9"), one.uris);
    assertArrayEquals(new String[] {"node"}, one.preferredLocations());
    EndpointPartition none = EndpointPartition.of(o, new FlightEndpoint(TICKET));
    assertEquals(List.of("grpc://configured:8815"), none.uris);
    assertArrayEquals(new String[] {"configured"}, none.preferredLocations());
    EndpointPartition reuse =
        EndpointPartition.of(o, new FlightEndpoint(TICKET, at("arrow-flight-reuse-connection://?"), at("grpc+tcp://node:9")));
    assertEquals(List.of("grpc://configured:8815", "grpc+tcp://node:9"), reuse.uris);
    assertArrayEquals(new String[] {"configured", "node"}, reuse.preferredLocations());
  }

  /** A replica that cannot be reached is skipped: the next one serves the whole endpoint. */
  @Test
  void nextReplicaWhenConnectingFails() throws Exception {
    Options o = options(TestServer.uri(), "java/replicas");
    write(o, 1000);
    EndpointPartition p = EndpointPartition.of(o, new FlightEndpoint(ticket(o), at(CLOSED), at(TestServer.uri())));
    assertEquals(List.of(1000L, 499_500L), read(p));
    assertEquals(0, Allocators.allocatedMemory());
  }

  /** Any other error is the answer: the server said the data is gone, so no replica is asked (it would be UNAVAILABLE). */
  @Test
  void noReplicaAfterAnAnswer() throws Exception {
    Options o = options(TestServer.uri(), "java/replicas-dropped");
    write(o, 10);
    Ticket ticket = ticket(o);
    try (BufferAllocator a = Allocators.child("test"); Connection c = new Connection(o, a)) {
      c.action("drop", Wire.named(o.name), "drop");
    }
    EndpointPartition p = EndpointPartition.of(o, new FlightEndpoint(ticket, at(TestServer.uri()), at(CLOSED)));
    FlightcacheException e = assertThrows(FlightcacheException.class, () -> read(p));
    assertEquals("DATASET_NOT_FOUND", e.code());
    assertEquals(0, Allocators.allocatedMemory());
  }

  /** No replica reachable: the error names the last server tried, the earlier failures are kept as suppressed. */
  @Test
  void noReplicaReachable() {
    String alsoClosed = "grpc+tcp://127.0.0.1:2";
    EndpointPartition p =
        EndpointPartition.of(options(CLOSED, "java/nowhere"), new FlightEndpoint(TICKET, at(CLOSED), at(alsoClosed)));
    FlightcacheException e = assertThrows(FlightcacheException.class, () -> read(p));
    assertEquals("UNAVAILABLE", e.code());
    assertTrue(e.getMessage().contains("cannot reach the flightcache node at " + alsoClosed), e.getMessage());
    assertEquals(1, e.getCause().getSuppressed().length);
    assertEquals(0, Allocators.allocatedMemory());
  }

  private static void write(Options o, long rows) throws Exception {
    BatchWrite job = new FlightcacheWriteBuilder(o, SCHEMA).truncate().build().toBatch();
    try (DataWriter<InternalRow> writer = job.createBatchWriterFactory(null).createWriter(0, 0)) {
      for (long i = 0; i < rows; i++) {
        writer.write(new GenericInternalRow(new Object[] {i}));
      }
      job.commit(new WriterCommitMessage[] {writer.commit()});
    }
  }

  private static Ticket ticket(Options o) {
    try (BufferAllocator a = Allocators.child("test"); Connection c = new Connection(o, a)) {
      return c.readInfo(null, null, 1, "read").getEndpoints().get(0).getTicket();
    }
  }

  /** Rows and the sum of the ids. */
  private static List<Long> read(EndpointPartition p) {
    long rows = 0;
    long sum = 0;
    try (ColumnarReader reader = new ColumnarReader(p, SCHEMA)) {
      while (reader.next()) {
        for (int r = 0; r < reader.get().numRows(); r++) {
          sum += reader.get().column(0).getLong(r);
        }
        rows += reader.get().numRows();
      }
    }
    return List.of(rows, sum);
  }
}
