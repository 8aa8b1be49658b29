package io.flightcache.spark.read;

import io.flightcache.spark.Options;
import io.flightcache.spark.protocol.Connection;
import io.flightcache.spark.protocol.FlightcacheException;
import io.flightcache.spark.types.TypeMapping;
import java.util.ArrayList;
import java.util.List;
import org.apache.arrow.flight.FlightEndpoint;
import org.apache.arrow.flight.FlightInfo;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.spark.sql.SparkSession;
import org.apache.spark.sql.connector.read.Batch;
import org.apache.spark.sql.connector.read.InputPartition;
import org.apache.spark.sql.connector.read.PartitionReaderFactory;
import org.apache.spark.sql.connector.read.Scan;
import org.apache.spark.sql.types.StructType;

/**
 * A planned read: the projected columns and the server-side filter. Its partitions come from one
 * get_flight_info when Spark plans the job: their tickets pin the version current then.
 */
public final class FlightcacheScan implements Scan, Batch {
  private final Options options;
  private final StructType readSchema;
  private final List<String> columns;
  private final String filter; // the option and the pushed predicates, in the server's filter language
  private final String pushed; // the pushed part alone, for explain()
  private InputPartition[] partitions;

  FlightcacheScan(Options options, StructType readSchema, List<String> columns, String filter, String pushed) {
    this.options = options;
    this.readSchema = readSchema;
    this.columns = columns;
    this.filter = filter;
    this.pushed = pushed;
  }

  @Override
  public StructType readSchema() {
    return readSchema;
  }

  @Override
  public String description() {
    return "flightcache [dataset=" + options.name + ", uri=" + options.uri + ", columns=" + columns
        + ", filter=" + (options.filter == null ? "none" : options.filter) + ", pushed="
        + (pushed == null ? "none" : pushed) + "]";
  }

  @Override
  public Batch toBatch() {
    return this;
  }

  @Override
  public ColumnarSupportMode columnarSupportMode() {
    return ColumnarSupportMode.SUPPORTED;
  }

  @Override
  public synchronized InputPartition[] planInputPartitions() {
    if (partitions == null) {
      partitions = plan();
    }
    return partitions.clone();
  }

  private InputPartition[] plan() {
    int endpoints = options.partitions > 0 ? options.partitions : defaultParallelism();
    FlightInfo info;
    try (BufferAllocator allocator = Allocators.child("plan " + options.name);
        Connection connection = new Connection(options, allocator)) {
      info = connection.readInfo(columns, filter, endpoints, "read");
    }
    StructType served = TypeMapping.sparkSchema(info.getSchema());
    if (!served.sameType(readSchema)) {
      throw new FlightcacheException(
          "SCHEMA_MISMATCH",
          "cannot read dataset '" + options.name + "' on the flightcache server at " + options.uri
              + ": its schema changed since the DataFrame was loaded (now " + served.simpleString() + ", expected "
              + readSchema.simpleString() + "); load() it again");
    }
    List<InputPartition> out = new ArrayList<>();
    for (FlightEndpoint e : info.getEndpoints()) {
      out.add(EndpointPartition.of(options, e));
    }
    return out.toArray(new InputPartition[0]);
  }

  private static int defaultParallelism() {
    return SparkSession.getActiveSession().isDefined()
        ? SparkSession.getActiveSession().get().sparkContext().defaultParallelism()
        : 1;
  }

  @Override
  public PartitionReaderFactory createReaderFactory() {
    return new ReaderFactory(readSchema);
  }
}
