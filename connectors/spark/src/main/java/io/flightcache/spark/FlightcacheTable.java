package io.flightcache.spark;

import io.flightcache.spark.protocol.Connection;
import io.flightcache.spark.protocol.FlightcacheException;
import io.flightcache.spark.read.Allocators;
import io.flightcache.spark.read.FlightcacheScanBuilder;
import io.flightcache.spark.write.FlightcacheWriteBuilder;
import java.util.EnumSet;
import java.util.HashMap;
import java.util.Map;
import java.util.Set;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.arrow.vector.types.pojo.Schema;
import org.apache.spark.sql.connector.catalog.SupportsRead;
import org.apache.spark.sql.connector.catalog.SupportsWrite;
import org.apache.spark.sql.connector.catalog.TableCapability;
import org.apache.spark.sql.connector.read.ScanBuilder;
import org.apache.spark.sql.connector.write.LogicalWriteInfo;
import org.apache.spark.sql.connector.write.WriteBuilder;
import org.apache.spark.sql.types.StructType;
import org.apache.spark.sql.util.CaseInsensitiveStringMap;

/** One dataset of one server: batch reads and batch writes (append, and overwrite as truncate). */
public final class FlightcacheTable implements SupportsRead, SupportsWrite {
  private final Map<String, String> properties;
  private final Options options;
  private final StructType schema;

  FlightcacheTable(Map<String, String> properties, StructType schema) {
    this.properties = Map.copyOf(properties);
    this.options = Options.parse(properties);
    this.schema = schema;
  }

  @Override
  public String name() {
    return "flightcache:" + options.name;
  }

  @Override
  public StructType schema() {
    return schema;
  }

  @Override
  public Set<TableCapability> capabilities() {
    return EnumSet.of(TableCapability.BATCH_READ, TableCapability.BATCH_WRITE, TableCapability.TRUNCATE);
  }

  @Override
  public ScanBuilder newScanBuilder(CaseInsensitiveStringMap extra) {
    Options merged = merge(extra);
    return new FlightcacheScanBuilder(merged, schema, arrowSchema(merged));
  }

  @Override
  public WriteBuilder newWriteBuilder(LogicalWriteInfo info) {
    return new FlightcacheWriteBuilder(merge(info.options()), info.schema());
  }

  /** The stored Arrow types, which decide which filters the server can apply exactly; null if unknown. */
  private static Schema arrowSchema(Options options) {
    try (BufferAllocator allocator = Allocators.child("schema " + options.name);
        Connection connection = new Connection(options, allocator)) {
      return connection.readInfo(options.columns, null, null, "read").getSchema();
    } catch (FlightcacheException e) {
      return null; // planning reports the error with its full message
    }
  }

  private Options merge(CaseInsensitiveStringMap extra) {
    if (extra == null || extra.isEmpty()) {
      return options;
    }
    Map<String, String> all = new HashMap<>(properties);
    all.putAll(extra.asCaseSensitiveMap());
    return Options.parse(all);
  }

}
