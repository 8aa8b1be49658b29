package io.flightcache.spark.read;

import io.flightcache.spark.protocol.Connection;
import io.flightcache.spark.protocol.FlightcacheException;
import java.io.IOException;
import java.util.ArrayList;
import java.util.List;
import org.apache.arrow.flight.FlightRuntimeException;
import org.apache.arrow.flight.FlightStatusCode;
import org.apache.arrow.flight.FlightStream;
import org.apache.arrow.flight.Ticket;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.arrow.vector.FieldVector;
import org.apache.arrow.vector.VectorSchemaRoot;
import org.apache.arrow.vector.dictionary.DictionaryProvider;
import org.apache.spark.sql.connector.read.PartitionReader;
import org.apache.spark.sql.types.StructType;
import org.apache.spark.sql.vectorized.ColumnVector;
import org.apache.spark.sql.vectorized.ColumnarBatch;

/**
 * Streams one endpoint with do_get, or on the server's host reads it from the server's shared memory, and
 * hands Spark each batch as ArrowColumnVectors over the received vectors (no further copy); only columns of
 * types Spark cannot read as they are get converted.
 * A batch is valid until the next call of next(), as Spark's columnar contract says. Everything is
 * allocated from a per-task child allocator, closed (once) with the stream and the client.
 */
final class ColumnarReader implements PartitionReader<ColumnarBatch> {
  private final EndpointPartition partition;
  private final StructType schema;
  private BufferAllocator allocator;
  private Connection connection;
  private String at; // the server being read from: one of the partition's
  private FlightStream stream;
  private SharedBatches shared; // instead of the stream: the batches read from the server's shared memory
  private Conversion[] conversions; // per column, null where Spark reads the vector as it is
  private final List<FieldVector> converted = new ArrayList<>(); // this batch's converted vectors
  private VectorSchemaRoot root; // the root the cached vectors wrap
  private ColumnVector[] vectors;
  private ColumnarBatch batch;
  private boolean closed;

  ColumnarReader(EndpointPartition partition, StructType schema) {
    this.partition = partition;
    this.schema = schema;
  }

  @Override
  public boolean next() {
    if (closed) {
      return false;
    }
    try {
      if (stream == null && shared == null) {
        open();
      }
      releaseConverted();
      while (shared != null ? shared.next() : stream.next()) {
        VectorSchemaRoot current = shared != null ? shared.root() : stream.getRoot();
        if (current.getRowCount() == 0) {
          continue;
        }
        batch = wrap(current);
        return true;
      }
      finish();
      return false;
    } catch (IOException e) {
      throw new FlightcacheException(
          "INTERNAL", "reading dataset '" + partition.options.name + "' from the shared memory of " + at + " failed: " + e, e);
    } catch (FlightRuntimeException e) {
      FlightcacheException explained = Connection.explain(e, partition.options, at, "read");
      if ("DATASET_NOT_FOUND".equals(explained.code())) {
        throw new FlightcacheException(
            explained.code(),
            explained.getMessage() + " (a DataFrame reads the version that was current when its query was planned; "
                + "load() it again to read the current one)",
            e);
      }
      throw explained;
    }
  }

  /**
   * Redeems the ticket at the first of the partition's servers that answers. The next replica is tried
   * only when connecting to one fails (UNAVAILABLE before its first answer), never once data came.
   */
  private void open() throws IOException {
    allocator = Allocators.child("read " + partition.options.name);
    if (partition.options.shm && openShared()) {
      return;
    }
    FlightRuntimeException unreachable = null;
    for (int i = 0; i < partition.uris.size(); i++) {
      at = partition.uris.get(i);
      connection = new Connection(partition.options, at, allocator);
      stream = connection.client().getStream(new Ticket(partition.ticket));
      try {
        stream.getSchema(); // blocks until the server's first answer: the schema, or the call's error
        break;
      } catch (FlightRuntimeException e) {
        if (unreachable != null) {
          e.addSuppressed(unreachable);
        }
        if (e.status().code() != FlightStatusCode.UNAVAILABLE || i == partition.uris.size() - 1) {
          throw e;
        }
        unreachable = e;
        closeStream();
        connection.close();
        connection = null;
      }
    }
    prepare(stream.getSchema().getFields());
  }

  /**
   * Reads the ticket from the shared memory of its first server, when that server is on this host and
   * keeps the data there (protocol §9); false: stream it.
   */
  private boolean openShared() throws IOException {
    at = partition.uris.get(0);
    if (!onThisHost(at)) {
      return false; // no shm round trip for a server elsewhere: its files cannot be here
    }
    connection = new Connection(partition.options, at, allocator);
    try {
      shared = SharedBatches.open(connection, partition.ticket, allocator);
    } catch (FlightRuntimeException e) {
      shared = null; // not reachable: the stream tries every replica
    }
    if (shared == null) {
      connection.close();
      connection = null;
      return false;
    }
    prepare(shared.fields());
    return true;
  }

  /** Whether {@code uri}'s host is an address of this machine (loopback, or one of its interfaces). */
  private static boolean onThisHost(String uri) {
    try {
      java.net.InetAddress a = java.net.InetAddress.getByName(java.net.URI.create(uri).getHost());
      return a.isLoopbackAddress() || a.isAnyLocalAddress() || java.net.NetworkInterface.getByInetAddress(a) != null;
    } catch (java.io.IOException | RuntimeException e) {
      return false; // unresolvable here: stream, which says what is wrong
    }
  }

  private void prepare(List<org.apache.arrow.vector.types.pojo.Field> fields) {
    conversions = new Conversion[fields.size()];
    for (int i = 0; i < fields.size(); i++) {
      if (!io.flightcache.spark.types.TypeMapping.isNative(fields.get(i))) {
        conversions[i] = new Conversion(fields.get(i), schema.fields()[i].dataType());
      }
    }
  }

  private ColumnarBatch wrap(VectorSchemaRoot current) {
    int n = current.getFieldVectors().size();
    if (current != root || vectors == null) { // FlightStream reloads the same root: wrap its vectors once
      root = current;
      vectors = new ColumnVector[n];
      for (int i = 0; i < n; i++) {
        if (conversions[i] == null) {
          vectors[i] = new BorrowedArrowColumnVector(current.getVector(i));
        }
      }
    }
    ColumnVector[] columns = vectors.clone();
    for (int i = 0; i < n; i++) {
      if (conversions[i] != null) {
        DictionaryProvider dictionaries = shared != null ? shared.dictionaries() : stream.getDictionaryProvider();
        FieldVector out = conversions[i].convert(current.getVector(i), dictionaries, allocator);
        converted.add(out);
        columns[i] = new BorrowedArrowColumnVector(out);
      }
    }
    return new ColumnarBatch(columns, current.getRowCount());
  }

  @Override
  public ColumnarBatch get() {
    return batch;
  }

  private void releaseConverted() {
    for (FieldVector v : converted) {
      v.close();
    }
    converted.clear();
    batch = null;
  }

  /** The stream ended: release it now rather than when Spark closes the reader. */
  private void finish() {
    close();
  }

  @Override
  public void close() {
    if (closed) {
      return;
    }
    closed = true;
    releaseConverted();
    try {
      closeStream();
      if (shared != null) {
        shared.close();
        shared = null;
      }
    } finally {
      if (connection != null) {
        connection.close();
      }
      if (allocator != null) {
        allocator.close();
      }
    }
  }

  private void closeStream() {
    try {
      if (stream != null) {
        stream.close();
      }
    } catch (Exception e) {
      // a stream cut short (a LIMIT, a cancelled task, a failed call) is drained or cancelled by close(); nothing to keep
    } finally {
      stream = null;
    }
  }
}
