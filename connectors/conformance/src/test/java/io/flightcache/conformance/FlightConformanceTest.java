package io.flightcache.conformance;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.fasterxml.jackson.databind.JsonNode;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.attribute.PosixFilePermissions;
import java.util.ArrayList;
import java.util.Base64;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import org.apache.arrow.flight.ActionType;
import org.apache.arrow.flight.CallOption;
import org.apache.arrow.flight.FlightCallHeaders;
import org.apache.arrow.flight.FlightClient;
import org.apache.arrow.flight.FlightDescriptor;
import org.apache.arrow.flight.FlightEndpoint;
import org.apache.arrow.flight.FlightInfo;
import org.apache.arrow.flight.FlightRuntimeException;
import org.apache.arrow.flight.FlightStatusCode;
import org.apache.arrow.flight.FlightStream;
import org.apache.arrow.flight.HeaderCallOption;
import org.apache.arrow.flight.Location;
import org.apache.arrow.flight.PutResult;
import org.apache.arrow.flight.SyncPutListener;
import org.apache.arrow.flight.Ticket;
import org.apache.arrow.memory.ArrowBuf;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.arrow.memory.RootAllocator;
import org.apache.arrow.vector.BigIntVector;
import org.apache.arrow.vector.IntVector;
import org.apache.arrow.vector.VarCharVector;
import org.apache.arrow.vector.VectorSchemaRoot;
import org.apache.arrow.vector.types.pojo.ArrowType;
import org.apache.arrow.vector.types.pojo.Field;
import org.apache.arrow.vector.types.pojo.Schema;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** docs/protocol.md from Arrow Flight Java: a plain FlightClient, JSON built by hand, against a real server. */
class FlightConformanceTest {
  static final String WRITE_TOKEN = "java-conformance-write-token-0123";
  static final String READ_TOKEN = "java-conformance-read-token-01234";
  static final Schema SCHEMA = new Schema(List.of(
      Field.nullable("id", new ArrowType.Int(64, true)),
      Field.nullable("status", new ArrowType.Int(32, true)),
      Field.nullable("name", new ArrowType.Utf8())));

  @TempDir static Path dir;
  static ServerProcess server;
  static BufferAllocator allocator;
  static FlightClient client;

  @BeforeAll
  static void start() throws Exception {
    Path tokens = dir.resolve("tokens");
    Files.writeString(tokens, WRITE_TOKEN + " write\n" + READ_TOKEN + " read\nbi:bi-password read\n");
    Files.setPosixFilePermissions(tokens, PosixFilePermissions.fromString("rw-------"));
    server = ServerProcess.start("--auth-token-file", tokens.toString());
    allocator = new RootAllocator();
    client = FlightClient.builder(allocator, Location.forGrpcInsecure(server.host, server.port)).build();
  }

  @AfterAll
  static void stop() throws Exception {
    client.close();
    allocator.close();
    server.close();
  }

  static CallOption bearer(String token) {
    FlightCallHeaders headers = new FlightCallHeaders();
    headers.insert("authorization", "Bearer " + token);
    return new HeaderCallOption(headers);
  }

  static final CallOption W = bearer(WRITE_TOKEN);
  static final CallOption R = bearer(READ_TOKEN);

  /** Rows start..start+n of the test table. */
  static VectorSchemaRoot rows(int start, int n) {
    VectorSchemaRoot root = VectorSchemaRoot.create(SCHEMA, allocator);
    BigIntVector id = (BigIntVector) root.getVector("id");
    IntVector status = (IntVector) root.getVector("status");
    VarCharVector name = (VarCharVector) root.getVector("name");
    root.allocateNew();
    for (int i = 0; i < n; i++) {
      id.setSafe(i, start + i);
      status.setSafe(i, new int[] {200, 404, 500}[(start + i) % 3]);
      name.setSafe(i, ("row-" + (start + i)).getBytes(StandardCharsets.UTF_8));
    }
    root.setRowCount(n);
    return root;
  }

  /** §6: a do_put of rows [start, start+n) in batches of 100, with the end-of-stream message when trailer. */
  static JsonNode put(FlightDescriptor descriptor, int start, int n, boolean trailer, CallOption... options)
      throws InterruptedException {
    return put(descriptor, null, start, n, trailer, options);
  }

  /** Metadata-only message (§6.1 form 2, §6.3): app_metadata and no batch. */
  static void putMetadata(FlightClient.ClientStreamListener stream, Map<String, ?> json) {
    byte[] raw = Wire.json(json);
    ArrowBuf buf = allocator.buffer(raw.length);
    buf.writeBytes(raw);
    stream.putMetadata(buf); // the stream takes ownership of buf
  }

  /** §6: as above, with put options as the first message's app_metadata when {@code firstMessage} is given. */
  static JsonNode put(FlightDescriptor descriptor, Map<String, ?> firstMessage, int start, int n, boolean trailer,
      CallOption... options) throws InterruptedException {
    try (VectorSchemaRoot root = VectorSchemaRoot.create(SCHEMA, allocator)) {
      SyncPutListener listener = new SyncPutListener();
      FlightClient.ClientStreamListener stream = client.startPut(descriptor, root, listener, options);
      if (firstMessage != null) {
        putMetadata(stream, firstMessage);
      }
      for (int at = start; at < start + n; at += 100) {
        try (VectorSchemaRoot batch = rows(at, Math.min(100, start + n - at))) {
          for (int c = 0; c < SCHEMA.getFields().size(); c++) {
            batch.getVector(c).makeTransferPair(root.getVector(c)).transfer();
          }
          root.setRowCount(batch.getRowCount());
          stream.putNext();
        }
      }
      if (trailer) {
        putMetadata(stream, Map.of("v", 1, "end", true, "rows", n));
      }
      stream.completed();
      try (PutResult result = readResult(listener)) {
        ArrowBuf meta = result.getApplicationMetadata();
        byte[] raw = new byte[(int) meta.readableBytes()];
        meta.getBytes(0, raw);
        stream.getResult();
        return Wire.parse(raw);
      }
    }
  }

  /** The PutResult, or the call's FlightRuntimeException itself (SyncPutListener wraps it). */
  static PutResult readResult(SyncPutListener listener) throws InterruptedException {
    try {
      return listener.read();
    } catch (java.util.concurrent.ExecutionException e) {
      if (e.getCause() instanceof FlightRuntimeException f) {
        throw f;
      }
      throw new IllegalStateException(e);
    }
  }

  /** §4, §5: every endpoint's stream, in order; returns the ids read. */
  static List<Long> readIds(FlightInfo info, CallOption... options) throws Exception {
    List<Long> ids = new ArrayList<>();
    for (FlightEndpoint endpoint : info.getEndpoints()) {
      assertTrue(endpoint.getLocations().isEmpty(), "no location: read it from the same server");
      try (FlightStream stream = client.getStream(endpoint.getTicket(), options)) {
        while (stream.next()) {
          BigIntVector id = (BigIntVector) stream.getRoot().getVector("id");
          for (int i = 0; i < stream.getRoot().getRowCount(); i++) {
            ids.add(id.get(i));
          }
        }
      }
    }
    return ids;
  }

  static FlightRuntimeException refused(org.junit.jupiter.api.function.Executable call) {
    return assertThrows(FlightRuntimeException.class, call);
  }

  @Test
  void listActionsNamesTheSpecsActions() {
    Set<String> names = new HashSet<>();
    for (ActionType a : client.listActions(R)) {
      names.add(a.getType());
    }
    assertTrue(names.containsAll(Set.of("drop", "info", "list", "stats", "healthcheck", "commit", "abort", "load",
        "persist", "pin", "unpin", "evict", "shm", "adopt", "sql")), names.toString());
  }

  @Test
  void putGetInfoReadAndAction() throws Exception {
    JsonNode put = put(Wire.command(Map.of("name", "java/t", "trailer", true)), 0, 1000, true, W);
    assertEquals("java/t", put.get("name").asText());
    assertEquals(1000, put.get("rows").asLong());
    FlightInfo info = client.getInfo(FlightDescriptor.path("java/t"), R);
    assertEquals(1000, info.getRecords());
    assertEquals(SCHEMA.getFields().size(), info.getSchema().getFields().size());
    JsonNode ticket = Wire.parse(info.getEndpoints().get(0).getTicket().getBytes());
    assertEquals(1, ticket.get("v").asInt());
    assertEquals(put.get("version").asInt(), ticket.get("version").asInt());
    List<Long> ids = readIds(info, R);
    assertEquals(1000, ids.size());
    assertEquals(999L, ids.get(999));

    FlightInfo filtered = client.getInfo(Wire.command(Map.of(
        "name", "java/t", "columns", List.of("id"), "filter", "status == 500 and id < 30", "endpoints", 2)), R);
    assertEquals(-1, filtered.getRecords());
    assertEquals(1, filtered.getSchema().getFields().size());
    assertEquals(List.of(2L, 5L, 8L, 11L, 14L, 17L, 20L, 23L, 26L, 29L), readIds(filtered, R));

    JsonNode described = Wire.action(client, "info", Map.of("name", "java/t"), R).get(0);
    assertEquals(1000, described.get("rows").asLong());
    boolean listed = false;
    for (FlightInfo f : client.listFlights(org.apache.arrow.flight.Criteria.ALL, R)) {
      listed |= f.getDescriptor().getPath().equals(List.of("java/t"));
    }
    assertTrue(listed);
  }

  @Test
  void putOptionsInTheFirstMessageOfAPathDescriptorPut() throws Exception {
    JsonNode created = put(FlightDescriptor.path("java/opts"), Map.of("v", 1, "mode", "create", "trailer", true),
        0, 300, true, W);
    assertEquals(1, created.get("version").asInt());
    JsonNode appended = put(FlightDescriptor.path("java/opts"), Map.of("mode", "append", "trailer", true),
        300, 200, true, W);
    assertEquals(2, appended.get("version").asInt());
    assertEquals(500, appended.get("rows").asLong());
    FlightRuntimeException exists = refused(() ->
        put(FlightDescriptor.path("java/opts"), Map.of("mode", "create"), 0, 10, false, W));
    assertEquals("DATASET_EXISTS", Wire.code(exists));
    JsonNode empty = put(Wire.command(Map.of("name", "java/none", "trailer", true)), 0, 0, true, W);
    assertEquals(0, empty.get("rows").asLong());
    FlightInfo old = client.getInfo(Wire.command(Map.of("name", "java/opts", "version", 1)), R);
    assertEquals(300, readIds(old, R).size());
  }

  @Test
  void transactionCommitAndAbort() throws Exception {
    for (int part = 0; part < 3; part++) {
      JsonNode staged = put(Wire.command(Map.of("name", "java/txn", "txn", "spark-job-1", "trailer", true)),
          part * 100, 100, true, W);
      assertEquals(String.format("%06d", part), staged.get("part").asText());
    }
    JsonNode committed = Wire.action(client, "commit",
        Map.of("v", 1, "txn", "spark-job-1", "name", "java/txn", "parts", List.of("000000", "000002")), W).get(0);
    assertEquals(200, committed.get("rows").asLong());
    List<Long> ids = readIds(client.getInfo(FlightDescriptor.path("java/txn"), R), R);
    assertEquals(200, ids.size());
    assertEquals(200L, ids.get(100)); // part 000002 follows part 000000

    put(Wire.command(Map.of("name", "java/txn", "txn", "spark-job-2")), 0, 50, false, W);
    JsonNode aborted = Wire.action(client, "abort", Map.of("txn", "spark-job-2"), W).get(0);
    assertEquals(1, aborted.get("parts_discarded").asInt());
    FlightRuntimeException e = refused(() -> Wire.action(client, "commit",
        Map.of("txn", "spark-job-2", "name", "java/txn"), W));
    assertEquals("INVALID_REQUEST", Wire.code(e));
    assertEquals(200, Wire.action(client, "info", "java/txn".getBytes(StandardCharsets.UTF_8), R)
        .get(0).get("rows").asLong());
  }

  @Test
  void emptyTransactionCommitsTheSchemaGiven() throws Exception {
    String schema = Base64.getEncoder().encodeToString(SCHEMA.serializeAsMessage());
    JsonNode committed = Wire.action(client, "commit",
        Map.of("txn", "spark-job-3", "name", "java/empty", "schema", schema), W).get(0);
    assertEquals(0, committed.get("rows").asLong());
    FlightInfo info = client.getInfo(FlightDescriptor.path("java/empty"), R);
    assertEquals(SCHEMA, info.getSchema());
  }

  @Test
  void errorsCarryTheirCodes() {
    FlightRuntimeException missing = refused(() -> client.getInfo(FlightDescriptor.path("java/missing"), R));
    assertEquals("DATASET_NOT_FOUND", Wire.code(missing));
    assertEquals(FlightStatusCode.UNKNOWN, missing.status().code());
    assertTrue(missing.status().description().startsWith("[DATASET_NOT_FOUND] "), missing.status().description());
    // Arrow C++ servers send the error's extra_info as the raw bytes of the grpc-status-details-bin trailer.
    assertEquals("{\"code\": \"DATASET_NOT_FOUND\"}",
        new String(missing.status().metadata().getByte("grpc-status-details-bin"), StandardCharsets.UTF_8));

    FlightRuntimeException badName = refused(() -> client.getInfo(FlightDescriptor.path("Bad Name"), R));
    assertEquals("INVALID_NAME", Wire.code(badName));

    FlightRuntimeException noToken = refused(() -> Wire.action(client, "list", new byte[0]));
    assertEquals(FlightStatusCode.UNAUTHENTICATED, noToken.status().code());
    assertEquals("UNAUTHENTICATED", Wire.code(noToken));

    FlightRuntimeException readOnly = refused(() -> put(FlightDescriptor.path("java/ro"), 0, 10, false, R));
    assertEquals(FlightStatusCode.UNAUTHORIZED, readOnly.status().code());
    assertEquals("UNAUTHORIZED", Wire.code(readOnly));

    FlightRuntimeException noTrailer = refused(() ->
        put(Wire.command(Map.of("name", "java/tr", "trailer", true)), 0, 10, false, W));
    assertEquals(FlightStatusCode.CANCELLED, noTrailer.status().code());
    assertEquals("PUT_ABORTED", Wire.code(noTrailer));
    FlightRuntimeException notPublished = refused(() -> client.getInfo(FlightDescriptor.path("java/tr"), R));
    assertEquals("DATASET_NOT_FOUND", Wire.code(notPublished));

    FlightRuntimeException unknown = refused(() -> Wire.action(client, "frobnicate", new byte[0], R));
    assertEquals("INVALID_REQUEST", Wire.code(unknown));
  }

  @Test
  void basicAuthHandshakeGivesABearerSession() {
    var session = client.authenticateBasicToken("bi", "bi-password");
    assertTrue(session.isPresent());
    assertEquals("ok", Wire.action(client, "healthcheck", new byte[0], session.get()).get(0).get("status").asText());
    FlightRuntimeException e = refused(() -> Wire.action(client, "drop", Map.of("name", "java/t"), session.get()));
    assertEquals("UNAUTHORIZED", Wire.code(e));
  }
}
