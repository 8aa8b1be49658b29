package io.flightcache.spark.write;

import io.flightcache.spark.Options;
import io.flightcache.spark.protocol.Connection;
import io.flightcache.spark.protocol.FlightcacheException;
import io.flightcache.spark.protocol.Wire;
import io.flightcache.spark.read.Allocators;
import io.flightcache.spark.types.TypeMapping;
import java.util.ArrayList;
import java.util.List;
import java.util.UUID;
import java.util.function.Function;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.spark.sql.connector.write.BatchWrite;
import org.apache.spark.sql.connector.write.DataWriterFactory;
import org.apache.spark.sql.connector.write.PhysicalWriteInfo;
import org.apache.spark.sql.connector.write.WriterCommitMessage;
import org.apache.spark.sql.types.StructType;

/**
 * A write job as one server transaction: each task stages its rows as one part (do_put with
 * {"txn": ...}); {@link #commit} publishes exactly the parts of the attempts Spark committed as one new
 * version, the single point where data becomes visible; {@link #abort} discards every staged part.
 * When the server is a node of a cluster, tasks put their parts on the nodes ({@link Placement}), and the
 * commit and abort still go to the configured server, which publishes the parts of every node.
 */
final class FlightcacheBatchWrite implements BatchWrite {
  private final Options options;
  private final StructType schema;
  private final String txn = "spark-" + UUID.randomUUID().toString().replace("-", "");
  private final String mode;
  private final boolean skip; // if_exists=ignore and the dataset exists: write nothing
  private final List<Placement.Node> nodes; // the cluster's nodes; null: every part goes to the configured server

  FlightcacheBatchWrite(Options options, StructType schema, boolean overwrite) {
    this.options = options;
    this.schema = schema;
    TypeMapping.arrowSchema(schema); // a type Arrow cannot carry fails now, not in every task
    if (options.ifExists == null) {
      mode = overwrite ? "overwrite" : "append";
      skip = false;
      nodes = nodes();
      return;
    }
    // The server's create mode makes this race-safe (it checks again at each part and at the commit);
    // checking now saves computing a job whose result cannot be kept.
    mode = "create";
    boolean exists = exists();
    if (exists && options.ifExists.equals("error")) {
      throw new FlightcacheException(
          "DATASET_EXISTS",
          "dataset '" + options.name + "' already exists on the flightcache server at " + options.uri
              + " (option if_exists='error'); drop it, or write with mode append or overwrite");
    }
    skip = exists;
    nodes = skip ? null : nodes();
  }

  /**
   * The live nodes of the server's cluster, asked once per job; null for a standalone server (no node has
   * a location) and for a server older than cluster mode, which does not know the action.
   */
  private List<Placement.Node> nodes() {
    List<byte[]> answer;
    try {
      answer = run(c -> c.actionBodies("nodes", new byte[0], "write"));
    } catch (FlightcacheException e) {
      if ("INVALID_REQUEST".equals(e.code()) || "UNIMPLEMENTED".equals(e.code())) {
        return null; // "unknown action": a server without cluster mode
      }
      throw e;
    }
    if (answer.isEmpty()) {
      return null;
    }
    List<Placement.Node> live = Placement.parse(answer.get(0));
    return Placement.clustered(live) ? live : null;
  }

  private boolean exists() {
    try {
      run(c -> c.action("info", Wire.named(options.name), "write"));
      return true;
    } catch (FlightcacheException e) {
      if ("DATASET_NOT_FOUND".equals(e.code())) {
        return false;
      }
      throw e;
    }
  }

  @Override
  public DataWriterFactory createBatchWriterFactory(PhysicalWriteInfo info) {
    return new PartWriterFactory(options, schema, txn, mode, skip, nodes);
  }

  @Override
  public boolean useCommitCoordinator() {
    return true; // exactly one attempt per partition commits its part
  }

  @Override
  public void commit(WriterCommitMessage[] messages) {
    List<String> parts = new ArrayList<>();
    boolean exists = skip;
    for (WriterCommitMessage m : messages) {
      if (m instanceof StagedPart p) {
        exists |= p.exists();
        if (p.part() != null) {
          parts.add(p.part());
        }
      }
    }
    if (exists) {
      run(c -> c.action("abort", Wire.abort(txn), "write"));
      return;
    }
    try {
      run(
          c -> c.action(
              "commit",
              Wire.commit(txn, options.name, mode, parts, TypeMapping.arrowSchema(schema), options.persist, options.ttl),
              "write"));
    } catch (FlightcacheException e) {
      if (!("DATASET_EXISTS".equals(e.code()) && "ignore".equals(options.ifExists))) {
        throw e;
      }
      run(c -> c.action("abort", Wire.abort(txn), "write"));
    }
  }

  @Override
  public void abort(WriterCommitMessage[] messages) {
    run(c -> c.action("abort", Wire.abort(txn), "abort the write of"));
  }

  private <T> T run(Function<Connection, T> fn) {
    try (BufferAllocator allocator = Allocators.child("write " + options.name);
        Connection connection = new Connection(options, allocator)) {
      return fn.apply(connection);
    }
  }
}
