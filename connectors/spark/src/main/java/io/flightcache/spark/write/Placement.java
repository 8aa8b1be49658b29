package io.flightcache.spark.write;

import io.flightcache.spark.protocol.FlightcacheException;
import io.flightcache.spark.protocol.Wire;
import java.io.Serializable;
import java.net.URI;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.List;
import java.util.Map;

/**
 * Which node of a flightcache cluster a write task puts its part on: a node on the task's own host, else
 * the least loaded node. Pure: it decides from the answer of the nodes action, fetched once by the driver
 * when the job is planned and shipped to the executors with the writer factory.
 */
final class Placement {
  /** Least memory in use (as a fraction of the limit) first, then fewest calls in flight, then by id. */
  static final Comparator<Node> LEAST_LOADED =
      Comparator.comparingDouble(Node::load).thenComparingLong(Node::inFlight).thenComparing(Node::id);

  private Placement() {}

  /** A live node, as far as placement needs it. A null location means the server that was asked. */
  record Node(String id, String location, String host, long memoryUsed, Long memoryLimit, long inFlight)
      implements Serializable {
    /** The fraction of its memory limit in use; 0 for a node without a limit. */
    double load() {
      return memoryLimit == null || memoryLimit <= 0 ? 0.0 : (double) memoryUsed / memoryLimit;
    }

    /** The host a task must run on to be local to this node: its host, else its location's. */
    String hostName() {
      if (host != null || location == null) {
        return host;
      }
      try {
        return URI.create(location).getHost();
      } catch (IllegalArgumentException e) {
        return null;
      }
    }
  }

  /**
   * The nodes of an answer to the nodes action, a JSON array with one object per live node, in its order.
   * Nodes in a state other than "up" are left out; fields placement does not use are ignored.
   */
  static List<Node> parse(byte[] answer) {
    List<Map<String, Object>> objects = Wire.decodeObjects(answer);
    if (objects == null) {
      throw malformed("null instead of an array");
    }
    List<Node> nodes = new ArrayList<>();
    for (Map<String, Object> o : objects) {
      Object state = o.get("state");
      if (state != null && !"up".equals(state)) {
        continue;
      }
      String id = string(o, "id");
      if (id == null || id.isEmpty()) {
        throw malformed("a node without an id: " + o);
      }
      Number used = number(o, "memory_used");
      Number limit = number(o, "memory_limit");
      Number inFlight = number(o, "in_flight");
      nodes.add(
          new Node(
              id, string(o, "location"), string(o, "host"), used == null ? 0 : used.longValue(),
              limit == null ? null : limit.longValue(), inFlight == null ? 0 : inFlight.longValue()));
    }
    return nodes;
  }

  /** Whether {@code nodes} is a cluster to place parts on: some node has a location (a standalone server has none). */
  static boolean clustered(List<Node> nodes) {
    return nodes.stream().anyMatch(n -> n.location() != null);
  }

  /**
   * The node for the part of the task of partition {@code partition} running on {@code host} (null if not
   * known): among the nodes on that host, or all of them if none is, the least loaded. The nodes are the
   * driver's snapshot, the same in every task; so that parts still spread over nodes that are equally
   * loaded in it (an empty cluster), the partition number picks among those, the lowest id for partition 0.
   */
  static Node choose(List<Node> nodes, String host, int partition) {
    if (nodes.isEmpty()) {
      throw new IllegalArgumentException("no nodes to place a part on");
    }
    List<Node> local = host == null ? List.of() : nodes.stream().filter(n -> host.equalsIgnoreCase(n.hostName())).toList();
    List<Node> ranked = (local.isEmpty() ? nodes : local).stream().sorted(LEAST_LOADED).toList();
    Node best = ranked.get(0);
    List<Node> tied =
        ranked.stream()
            .takeWhile(n -> Double.compare(n.load(), best.load()) == 0 && n.inFlight() == best.inFlight())
            .toList();
    return tied.get(Math.floorMod(partition, tied.size()));
  }

  private static String string(Map<String, Object> o, String key) {
    Object v = o.get(key);
    if (v != null && !(v instanceof String)) {
      throw malformed("the field " + key + " of a node is not a string: " + o);
    }
    return (String) v;
  }

  private static Number number(Map<String, Object> o, String key) {
    Object v = o.get(key);
    if (v != null && !(v instanceof Number)) {
      throw malformed("the field " + key + " of a node is not a number: " + o);
    }
    return (Number) v;
  }

  private static FlightcacheException malformed(String what) {
    return new FlightcacheException("INVALID_REQUEST", "the server's answer to the action nodes is not a list of nodes: " + what);
  }
}
