package io.flightcache.conformance;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import org.apache.arrow.flight.Action;
import org.apache.arrow.flight.CallOption;
import org.apache.arrow.flight.FlightClient;
import org.apache.arrow.flight.FlightDescriptor;
import org.apache.arrow.flight.FlightRuntimeException;
import org.apache.arrow.flight.Result;

/** The JSON messages of docs/protocol.md, built and read with Jackson: nothing of flightcache's own. */
final class Wire {
  static final ObjectMapper JSON = new ObjectMapper();

  private Wire() {}

  static byte[] json(Map<String, ?> fields) {
    try {
      return JSON.writeValueAsBytes(fields);
    } catch (IOException e) {
      throw new UncheckedIOException(e);
    }
  }

  static JsonNode parse(byte[] raw) {
    try {
      return JSON.readTree(raw);
    } catch (IOException e) {
      throw new UncheckedIOException(e);
    }
  }

  /** A command descriptor: a JSON object with "v": 1 (§3.2, §6.1). */
  static FlightDescriptor command(Map<String, ?> fields) {
    Map<String, Object> body = new java.util.LinkedHashMap<>();
    body.put("v", 1);
    body.putAll(fields);
    return FlightDescriptor.command(json(body));
  }

  /** The JSON results of an action (§8). */
  static List<JsonNode> action(FlightClient client, String type, byte[] body, CallOption... options) {
    List<JsonNode> results = new ArrayList<>();
    Iterator<Result> it = client.doAction(new Action(type, body), options);
    while (it.hasNext()) {
      results.add(parse(it.next().getBody()));
    }
    return results;
  }

  static List<JsonNode> action(FlightClient client, String type, Map<String, ?> body, CallOption... options) {
    return action(client, type, json(body), options);
  }

  /**
   * The flightcache error code of a refused call (§12): the JSON extra_info, which an Arrow C++ server sends as the
   * raw bytes of the grpc-status-details-bin trailer; "none" if there is none.
   */
  static String code(FlightRuntimeException e) {
    byte[] extra = e.status().metadata().containsKey("grpc-status-details-bin")
        ? e.status().metadata().getByte("grpc-status-details-bin") : null;
    if (extra == null || extra.length == 0 || extra[0] != '{') {
      return "none";
    }
    JsonNode code = parse(extra).get("code");
    return code == null ? "none" : code.asText();
  }

}
