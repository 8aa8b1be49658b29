package io.flightcache.spark;

import io.flightcache.spark.protocol.Connection;
import io.flightcache.spark.read.Allocators;
import io.flightcache.spark.types.TypeMapping;
import java.util.Map;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.spark.sql.connector.catalog.Table;
import org.apache.spark.sql.connector.catalog.TableProvider;
import org.apache.spark.sql.connector.expressions.Transform;
import org.apache.spark.sql.sources.DataSourceRegister;
import org.apache.spark.sql.types.StructType;
import org.apache.spark.sql.util.CaseInsensitiveStringMap;

/**
 * format("flightcache"): datasets of a flightcache server as Spark tables, read and written over Arrow
 * Flight. Registered by short name in META-INF/services; options: see {@link Options}.
 */
public final class FlightcacheDataSource implements TableProvider, DataSourceRegister {
  @Override
  public String shortName() {
    return Options.FORMAT;
  }

  /** The dataset's schema, from the server (projected by the option columns; checks the option filter). */
  @Override
  public StructType inferSchema(CaseInsensitiveStringMap map) {
    Options options = Options.parse(map);
    try (BufferAllocator allocator = Allocators.child("schema " + options.name);
        Connection connection = new Connection(options, allocator)) {
      return TypeMapping.sparkSchema(connection.readInfo(options.columns, options.filter, null, "read").getSchema());
    }
  }

  /** A schema given by Spark (a write's DataFrame, a reader's schema(...), a catalog table) is taken as is. */
  @Override
  public boolean supportsExternalMetadata() {
    return true;
  }

  @Override
  public Table getTable(StructType schema, Transform[] partitioning, Map<String, String> properties) {
    return new FlightcacheTable(properties, schema);
  }
}
