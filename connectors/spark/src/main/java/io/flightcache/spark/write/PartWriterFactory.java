package io.flightcache.spark.write;

import io.flightcache.spark.Options;
import java.net.InetAddress;
import java.net.UnknownHostException;
import java.util.List;
import org.apache.spark.SparkEnv;
import org.apache.spark.sql.catalyst.InternalRow;
import org.apache.spark.sql.connector.write.DataWriter;
import org.apache.spark.sql.connector.write.DataWriterFactory;
import org.apache.spark.sql.types.StructType;

/**
 * Shipped to executors: settings only (and a cluster's nodes, as the driver saw them when it planned the
 * job); each task's writer connects when it gets its first row.
 */
final class PartWriterFactory implements DataWriterFactory {
  private static final long serialVersionUID = 2L;
  private final Options options;
  private final StructType schema;
  private final String txn;
  private final String mode;
  private final boolean skip;
  private final List<Placement.Node> nodes; // null: put every part to the configured server

  PartWriterFactory(Options options, StructType schema, String txn, String mode, boolean skip, List<Placement.Node> nodes) {
    this.options = options;
    this.schema = schema;
    this.txn = txn;
    this.mode = mode;
    this.skip = skip;
    this.nodes = nodes == null ? null : List.copyOf(nodes);
  }

  @Override
  public DataWriter<InternalRow> createWriter(int partitionId, long taskId) {
    return new PartWriter(options, target(partitionId), schema, txn, mode, skip);
  }

  /** The server this task puts its part to: the configured one, or the node {@link Placement} chooses. */
  String target(int partitionId) {
    if (nodes == null) {
      return options.uri;
    }
    String location = Placement.choose(nodes, executorHost(), partitionId).location();
    return location == null ? options.uri : location;
  }

  /**
   * The host this task runs on as Spark names it (the executor's block manager host, which Spark also
   * matches preferred locations against); without a SparkEnv, this machine's address; null if unknown.
   */
  static String executorHost() {
    SparkEnv env = SparkEnv.get();
    if (env != null && env.blockManager() != null && env.blockManager().blockManagerId() != null) {
      return env.blockManager().blockManagerId().host();
    }
    try {
      return InetAddress.getLocalHost().getHostAddress();
    } catch (UnknownHostException e) {
      return null; // no host to match: the least loaded node
    }
  }
}
