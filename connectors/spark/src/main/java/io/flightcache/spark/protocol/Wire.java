package io.flightcache.spark.protocol;

import com.fasterxml.jackson.core.JsonProcessingException;
import com.fasterxml.jackson.core.type.TypeReference;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.nio.channels.Channels;
import java.nio.charset.StandardCharsets;
import java.util.Base64;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.apache.arrow.vector.ipc.WriteChannel;
import org.apache.arrow.vector.ipc.message.IpcOption;
import org.apache.arrow.vector.ipc.message.MessageSerializer;
import org.apache.arrow.vector.types.pojo.Schema;

/**
 * The JSON messages of flightcache's wire protocol (flightcache/protocol.py, docs/protocol.md): read
 * requests, tickets, put options, the end-of-stream trailer and action bodies, each with {"v": 1}.
 */
public final class Wire {
  public static final int VERSION = 1;
  private static final ObjectMapper JSON = new ObjectMapper();
  private static final TypeReference<List<Map<String, Object>>> OBJECTS = new TypeReference<>() {};

  private Wire() {}

  /** A ReadRequest: the command of a get_flight_info descriptor. Null fields are left out. */
  public static byte[] readRequest(String name, List<String> columns, String filter, Long version, Integer endpoints) {
    Map<String, Object> m = message();
    m.put("name", name);
    putIf(m, "columns", columns);
    putIf(m, "filter", filter);
    putIf(m, "version", version);
    putIf(m, "endpoints", endpoints);
    return encode(m);
  }

  /** PutOptions of a part staged under a transaction, ending with an end-of-stream trailer. */
  public static byte[] stagedPut(String name, String mode, String txn) {
    Map<String, Object> m = message();
    m.put("name", name);
    m.put("mode", mode);
    m.put("txn", txn);
    m.put("trailer", true);
    return encode(m);
  }

  /** The trailer of a put with "trailer": the client finished, having sent {@code rows} rows. */
  public static byte[] endOfStream(long rows) {
    Map<String, Object> m = message();
    m.put("end", true);
    m.put("rows", rows);
    return encode(m);
  }

  /** The body of the commit action: publish the listed parts of {@code txn} as one version. */
  public static byte[] commit(
      String txn, String name, String mode, List<String> parts, Schema schema, String persist, Double ttl) {
    Map<String, Object> m = message();
    m.put("txn", txn);
    m.put("name", name);
    m.put("mode", mode);
    m.put("parts", parts);
    m.put("schema", Base64.getEncoder().encodeToString(serialize(schema)));
    putIf(m, "persist", persist);
    putIf(m, "ttl", ttl);
    return encode(m);
  }

  public static byte[] abort(String txn) {
    Map<String, Object> m = message();
    m.put("txn", txn);
    return encode(m);
  }

  /** The body of the shm action: where a version (null: the current one) is in shared memory. */
  public static byte[] shm(String name, Long version) {
    Map<String, Object> m = message();
    m.put("name", name);
    putIf(m, "version", version);
    return encode(m);
  }

  public static byte[] named(String name) {
    Map<String, Object> m = message();
    m.put("name", name);
    return encode(m);
  }

  /** The dataset version a ticket pins (tickets are JSON; see protocol.Ticket). */
  public static long ticketVersion(byte[] ticket) {
    Object v = decode(ticket).get("version");
    if (!(v instanceof Number)) {
      throw new FlightcacheException("INVALID_REQUEST", "a ticket from the server has no version: not a flightcache server?");
    }
    return ((Number) v).longValue();
  }

  @SuppressWarnings("unchecked")
  public static Map<String, Object> decode(byte[] raw) {
    try {
      return JSON.readValue(raw, Map.class);
    } catch (IOException e) {
      throw new FlightcacheException(
          "INVALID_REQUEST", "the server answered with something that is not JSON: " + new String(raw, StandardCharsets.UTF_8), e);
    }
  }

  /** A JSON array of objects, such as the answer of the nodes action. */
  public static List<Map<String, Object>> decodeObjects(byte[] raw) {
    try {
      return JSON.readValue(raw, OBJECTS);
    } catch (IOException e) {
      throw new FlightcacheException(
          "INVALID_REQUEST",
          "the server answered with something that is not a JSON array of objects: " + new String(raw, StandardCharsets.UTF_8),
          e);
    }
  }

  /** An Arrow schema as an encapsulated IPC message, as pyarrow's Schema.serialize() writes it. */
  public static byte[] serialize(Schema schema) {
    ByteArrayOutputStream out = new ByteArrayOutputStream();
    try {
      MessageSerializer.serialize(new WriteChannel(Channels.newChannel(out)), schema, IpcOption.DEFAULT);
    } catch (IOException e) {
      throw new IllegalStateException(e); // a byte array cannot fail to take bytes
    }
    return out.toByteArray();
  }

  private static Map<String, Object> message() {
    Map<String, Object> m = new LinkedHashMap<>();
    m.put("v", VERSION);
    return m;
  }

  private static void putIf(Map<String, Object> m, String key, Object value) {
    if (value != null) {
      m.put(key, value);
    }
  }

  private static byte[] encode(Map<String, Object> m) {
    try {
      return JSON.writeValueAsBytes(m);
    } catch (JsonProcessingException e) {
      throw new IllegalStateException(e); // maps of strings, numbers and lists always encode
    }
  }
}
