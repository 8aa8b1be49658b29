package io.flightcache.spark.write;

import io.flightcache.spark.Options;
import org.apache.spark.sql.connector.write.BatchWrite;
import org.apache.spark.sql.connector.write.SupportsTruncate;
import org.apache.spark.sql.connector.write.Write;
import org.apache.spark.sql.connector.write.WriteBuilder;
import org.apache.spark.sql.types.StructType;

/** Append by default; mode("overwrite") and INSERT OVERWRITE truncate, i.e. replace the dataset. */
public final class FlightcacheWriteBuilder implements WriteBuilder, SupportsTruncate {
  private final Options options;
  private final StructType schema;
  private boolean overwrite;

  public FlightcacheWriteBuilder(Options options, StructType schema) {
    this.options = options;
    this.schema = schema;
  }

  @Override
  public WriteBuilder truncate() {
    overwrite = true;
    return this;
  }

  @Override
  public Write build() {
    return new Write() {
      @Override
      public BatchWrite toBatch() {
        return new FlightcacheBatchWrite(options, schema, overwrite);
      }

      @Override
      public String description() {
        return "flightcache [dataset=" + options.name + ", uri=" + options.uri + ", overwrite=" + overwrite + "]";
      }
    };
  }
}
