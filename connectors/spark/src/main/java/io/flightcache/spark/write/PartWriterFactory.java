package io.flightcache.spark.write;

import io.flightcache.spark.Options;
import org.apache.spark.sql.catalyst.InternalRow;
import org.apache.spark.sql.connector.write.DataWriter;
import org.apache.spark.sql.connector.write.DataWriterFactory;
import org.apache.spark.sql.types.StructType;

/** Shipped to executors: settings only; each task's writer connects when it gets its first row. */
final class PartWriterFactory implements DataWriterFactory {
  private static final long serialVersionUID = 1L;
  private final Options options;
  private final StructType schema;
  private final String txn;
  private final String mode;
  private final boolean skip;

  PartWriterFactory(Options options, StructType schema, String txn, String mode, boolean skip) {
    this.options = options;
    this.schema = schema;
    this.txn = txn;
    this.mode = mode;
    this.skip = skip;
  }

  @Override
  public DataWriter<InternalRow> createWriter(int partitionId, long taskId) {
    return new PartWriter(options, schema, txn, mode, skip);
  }
}
