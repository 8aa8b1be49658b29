package io.flightcache.spark.write;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.flightcache.spark.Options;
import io.flightcache.spark.TestServer;
import io.flightcache.spark.protocol.Connection;
import io.flightcache.spark.protocol.FlightcacheException;
import io.flightcache.spark.protocol.Wire;
import io.flightcache.spark.read.Allocators;
import io.flightcache.spark.read.FlightcacheScanBuilder;
import io.flightcache.spark.types.TypeMapping;
import java.util.List;
import java.util.Map;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.arrow.vector.types.pojo.Schema;
import org.apache.spark.sql.catalyst.expressions.GenericInternalRow;
import org.apache.spark.sql.connector.read.InputPartition;
import org.apache.spark.sql.connector.read.PartitionReader;
import org.apache.spark.sql.connector.read.PartitionReaderFactory;
import org.apache.spark.sql.connector.read.Scan;
import org.apache.spark.sql.connector.write.WriterCommitMessage;
import org.apache.spark.sql.types.DataTypes;
import org.apache.spark.sql.types.StructType;
import org.apache.spark.sql.vectorized.ColumnarBatch;
import org.apache.spark.unsafe.types.UTF8String;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/** The write and read paths against a real `flightcache serve` from the project's venv (no Spark session). */
class ServerRoundTripTest {
  private static String uri;

  @BeforeAll
  static void start() {
    uri = TestServer.uri();
  }

  private static Options options(String name, Map<String, String> extra) {
    Map<String, String> all = new java.util.HashMap<>(extra);
    all.put("path", name);
    all.put("uri", uri);
    return Options.parse(all, Map.of());
  }

  private static final StructType SCHEMA =
      new StructType().add("id", DataTypes.LongType).add("name", DataTypes.StringType);
  private static final Schema ARROW = TypeMapping.arrowSchema(SCHEMA);

  private static StagedPart stage(FlightcacheBatchWrite job, int partition, long from, long to) throws Exception {
    return stage((PartWriterFactory) job.createBatchWriterFactory(null), partition, from, to);
  }

  private static StagedPart stage(PartWriterFactory factory, int partition, long from, long to) throws Exception {
    PartWriter writer = (PartWriter) factory.createWriter(partition, partition);
    try {
      for (long i = from; i < to; i++) {
        writer.write(new GenericInternalRow(new Object[] {i, i % 3 == 0 ? null : UTF8String.fromString("n" + i)}));
      }
      return (StagedPart) writer.commit();
    } finally {
      writer.close();
    }
  }

  private static long[] read(Options options) throws Exception {
    Scan scan = new FlightcacheScanBuilder(options, SCHEMA, null).build();
    InputPartition[] partitions = scan.toBatch().planInputPartitions();
    PartitionReaderFactory factory = scan.toBatch().createReaderFactory();
    long rows = 0;
    long sum = 0;
    for (InputPartition p : partitions) {
      assertEquals("127.0.0.1", p.preferredLocations()[0]);
      try (PartitionReader<ColumnarBatch> reader = factory.createColumnarReader(p)) {
        while (reader.next()) {
          ColumnarBatch batch = reader.get();
          for (int r = 0; r < batch.numRows(); r++) {
            sum += batch.column(0).getLong(r);
            if (batch.column(0).getLong(r) % 3 == 0) {
              assertTrue(batch.column(1).isNullAt(r));
            } else {
              assertEquals("n" + batch.column(0).getLong(r), batch.column(1).getUTF8String(r).toString());
            }
          }
          rows += batch.numRows();
          batch.close(); // Spark may close a batch: the stream's vectors must survive it
        }
      }
    }
    return new long[] {rows, sum};
  }

  private static Map<String, Object> info(Options options) {
    return action(options, "info", Wire.named(options.name));
  }

  private static Map<String, Object> action(Options options, String type, byte[] body) {
    try (BufferAllocator a = Allocators.child("test"); Connection c = new Connection(options, a)) {
      return c.action(type, body, "read").get(0);
    }
  }

  /** Two tasks' parts become one version at the job's commit, and read back whole; nothing leaks. */
  @Test
  void writeCommitRead() throws Exception {
    Options o = options("java/round", Map.of());
    FlightcacheBatchWrite job = new FlightcacheBatchWrite(o, SCHEMA, true);
    StagedPart a = stage(job, 0, 0, 200_000); // more than one batch
    StagedPart b = stage(job, 1, 200_000, 250_000);
    assertThrows(FlightcacheException.class, () -> info(o), "invisible before the commit");
    job.commit(new WriterCommitMessage[] {a, b});
    assertEquals(250_000, ((Number) info(o).get("rows")).intValue());
    long[] got = read(o);
    assertEquals(250_000, got[0]);
    assertEquals(249_999L * 250_000L / 2, got[1]);
    assertEquals(0, Allocators.allocatedMemory());
  }

  /** An aborted job publishes nothing and leaves the previous version; append adds a version. */
  @Test
  void abortAndAppend() throws Exception {
    Options o = options("java/abort", Map.of());
    FlightcacheBatchWrite first = new FlightcacheBatchWrite(o, SCHEMA, true);
    first.commit(new WriterCommitMessage[] {stage(first, 0, 0, 10)});
    FlightcacheBatchWrite failed = new FlightcacheBatchWrite(o, SCHEMA, true);
    StagedPart part = stage(failed, 0, 0, 1000);
    failed.abort(new WriterCommitMessage[] {part});
    assertEquals(10, ((Number) info(o).get("rows")).intValue());
    FlightcacheBatchWrite append = new FlightcacheBatchWrite(o, SCHEMA, false);
    append.commit(new WriterCommitMessage[] {stage(append, 0, 10, 20)});
    Map<String, Object> after = info(o);
    assertEquals(20, ((Number) after.get("rows")).intValue());
    assertEquals(2, ((Number) after.get("version")).intValue());
    assertEquals(0, Allocators.allocatedMemory());
  }

  /** A server without cluster mode (no nodes action, or the standalone answer): every part goes to the configured server. */
  @Test
  void standaloneWritesToTheConfiguredServer() {
    PartWriterFactory factory =
        (PartWriterFactory) new FlightcacheBatchWrite(options("java/placed", Map.of()), SCHEMA, true).createBatchWriterFactory(null);
    for (int p = 0; p < 4; p++) {
      assertEquals(uri, factory.target(p));
    }
  }

  /**
   * A part goes to the node placement chose, not to the configured server (unreachable here), and the
   * commit, sent to the configured server, publishes it by the part id the node answered, as it came.
   */
  @Test
  void partGoesToTheChosenNode() throws Exception {
    Options nowhere = Options.parse(Map.of("path", "java/placed", "uri", "grpc://127.0.0.1:1"), Map.of());
    List<Placement.Node> nodes = List.of(new Placement.Node("n1", uri, "node.invalid", 0, null, 0));
    PartWriterFactory factory = new PartWriterFactory(nowhere, SCHEMA, "java-placed-1", "overwrite", false, nodes);
    StagedPart a = stage(factory, 0, 0, 100);
    StagedPart b = stage(factory, 1, 100, 300);
    assertTrue(a.part() != null && b.part() != null && !a.part().equals(b.part()));
    Options o = options("java/placed", Map.of());
    Map<String, Object> published =
        action(o, "commit", Wire.commit("java-placed-1", o.name, "overwrite", List.of(a.part(), b.part()), ARROW, null, null));
    assertEquals(300, ((Number) published.get("rows")).intValue());
    assertEquals(300, ((Number) info(o).get("rows")).intValue());
    assertEquals(0, Allocators.allocatedMemory());
  }

  /** A task whose writer is aborted midway stages nothing; errors name the dataset and the server. */
  @Test
  void errors() throws Exception {
    Options o = options("java/missing", Map.of());
    FlightcacheException missing = assertThrows(FlightcacheException.class, () -> read(o));
    assertEquals("DATASET_NOT_FOUND", missing.code());
    assertTrue(missing.getMessage().contains("'java/missing'") && missing.getMessage().contains(uri), missing.getMessage());
    Options exists = options("java/abort", Map.of("if_exists", "error"));
    FlightcacheException e = assertThrows(FlightcacheException.class, () -> new FlightcacheBatchWrite(exists, SCHEMA, false));
    assertEquals("DATASET_EXISTS", e.code());
    Options closed = Options.parse(Map.of("path", "x", "uri", "grpc://127.0.0.1:1"), Map.of());
    FlightcacheException unreachable = assertThrows(FlightcacheException.class, () -> read(closed));
    assertTrue(unreachable.getMessage().contains("cannot reach the flightcache server at grpc://127.0.0.1:1"));
  }
}
