package io.flightcache.spark.write;

import io.flightcache.spark.Options;
import io.flightcache.spark.protocol.Connection;
import io.flightcache.spark.protocol.FlightcacheException;
import io.flightcache.spark.protocol.Wire;
import io.flightcache.spark.read.Allocators;
import io.flightcache.spark.types.TypeMapping;
import java.nio.charset.StandardCharsets;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import org.apache.arrow.flight.FlightClient;
import org.apache.arrow.flight.FlightDescriptor;
import org.apache.arrow.flight.FlightRuntimeException;
import org.apache.arrow.flight.PutResult;
import org.apache.arrow.flight.SyncPutListener;
import org.apache.arrow.memory.ArrowBuf;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.arrow.vector.VectorSchemaRoot;
import org.apache.spark.sql.catalyst.InternalRow;
import org.apache.spark.sql.connector.write.DataWriter;
import org.apache.spark.sql.connector.write.WriterCommitMessage;
import org.apache.spark.sql.execution.arrow.ArrowWriter;
import org.apache.spark.sql.types.StructType;

/**
 * One task's rows, streamed with do_put as Arrow batches (Spark's own ArrowWriter fills them) into one
 * part staged under the job's transaction. The put ends with an end-of-stream trailer: a task that fails
 * midway cancels the stream, and without the trailer the server stages nothing in any case.
 */
final class PartWriter implements DataWriter<InternalRow> {
  static final int MAX_BATCH_ROWS = 1 << 17;
  static final long MAX_BATCH_BYTES = 32L << 20; // large batches: Flight's per-message cost is per batch

  private final Options options;
  private final String uri; // the server the part goes to: the configured one, or a cluster node
  private final StructType schema;
  private final String txn;
  private final String mode;
  private final boolean skip;
  private BufferAllocator allocator;
  private Connection connection;
  private VectorSchemaRoot root;
  private ArrowWriter writer;
  private SyncPutListener results;
  private FlightClient.ClientStreamListener put;
  private int batchRows;
  private long rows;
  private boolean closed;

  PartWriter(Options options, String uri, StructType schema, String txn, String mode, boolean skip) {
    this.options = options;
    this.uri = uri;
    this.schema = schema;
    this.txn = txn;
    this.mode = mode;
    this.skip = skip;
  }

  @Override
  public void write(InternalRow row) {
    if (skip) {
      return; // Spark feeds the task its rows regardless
    }
    if (put == null) {
      start();
    }
    writer.write(row);
    rows++;
    if (++batchRows >= MAX_BATCH_ROWS || ((batchRows & 1023) == 0 && writer.sizeInBytes() >= MAX_BATCH_BYTES)) {
      flush();
    }
  }

  private void start() {
    allocator = Allocators.child("write " + options.name);
    connection = new Connection(options, uri, allocator);
    root = VectorSchemaRoot.create(TypeMapping.arrowSchema(schema), allocator);
    writer = ArrowWriter.create(root);
    results = new SyncPutListener();
    FlightDescriptor descriptor = FlightDescriptor.command(Wire.stagedPut(options.name, mode, txn));
    put = connection.call("write", () -> connection.client().startPut(descriptor, root, results));
  }

  private void flush() {
    if (batchRows == 0) {
      return;
    }
    writer.finish();
    connection.call(
        "write",
        () -> {
          put.putNext(); // waits while the stream is not ready: the server's pace bounds what is buffered
          return null;
        });
    writer.reset();
    batchRows = 0;
  }

  @Override
  public WriterCommitMessage commit() {
    if (skip) {
      return new StagedPart(null, true);
    }
    if (put == null) {
      return new StagedPart(null, false);
    }
    try {
      flush();
      byte[] trailer = Wire.endOfStream(rows);
      ArrowBuf buf = allocator.buffer(trailer.length);
      buf.setBytes(0, trailer);
      buf.writerIndex(trailer.length);
      put.putMetadata(buf); // Flight takes ownership of the buffer
      put.completed();
      put.getResult();
      PutResult result = results.poll(60, TimeUnit.SECONDS);
      if (result == null) {
        throw new FlightcacheException(
            "INTERNAL", "cannot write dataset '" + options.name + "' on the flightcache server at " + uri
                + ": the server sent no result for the staged part");
      }
      try (result) {
        ArrowBuf meta = result.getApplicationMetadata();
        byte[] bytes = new byte[(int) meta.readableBytes()];
        meta.getBytes(0, bytes);
        Map<String, Object> staged = Wire.decode(bytes);
        return new StagedPart((String) staged.get("part"), false);
      }
    } catch (FlightRuntimeException e) {
      FlightcacheException explained = connection.explain(e, "write");
      if ("DATASET_EXISTS".equals(explained.code()) && "ignore".equals(options.ifExists)) {
        return new StagedPart(null, true);
      }
      throw explained;
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
      throw new FlightcacheException("INTERNAL", "the write of dataset '" + options.name + "' was interrupted", e);
    } catch (java.util.concurrent.ExecutionException e) {
      throw connection.explain(e.getCause() == null ? e : e.getCause(), "write");
    }
  }

  @Override
  public void abort() {
    if (put != null) {
      // Cancel the call: the server sees a cancelled put and stages nothing (it would not without the
      // trailer anyway). Its answer is an error we caused.
      put.error(new RuntimeException("the Spark task writing dataset '" + options.name + "' failed"));
      try {
        put.getResult();
      } catch (RuntimeException expected) {
        // cancelled by us
      }
    }
  }

  @Override
  public void close() {
    if (closed) {
      return;
    }
    closed = true;
    if (root != null) {
      root.close();
    }
    if (results != null) {
      results.close();
    }
    if (connection != null) {
      connection.close();
    }
    if (allocator != null) {
      allocator.close();
    }
  }
}
