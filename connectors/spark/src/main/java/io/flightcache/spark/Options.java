package io.flightcache.spark;

import io.flightcache.spark.protocol.FlightcacheException;
import java.io.IOException;
import java.io.Serializable;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.TreeMap;

/**
 * The options of format("flightcache"), parsed once on the driver: the same names, defaults and
 * messages as the Python data source (flightcache/spark.py). Serializable: executors get the settings
 * (credentials included, resolved from the driver's environment) and connect lazily.
 */
public final class Options implements Serializable {
  private static final long serialVersionUID = 1L;

  public static final String FORMAT = "flightcache";
  public static final String DEFAULT_URI = "grpc://127.0.0.1:8815";
  /** The option names; "dataset" is "path" for CREATE TABLE ... OPTIONS (dataset 'x'). */
  public static final List<String> KEYS =
      List.of(
          "uri", "path", "dataset", "columns", "filter", "pushdown", "if_exists", "persist", "ttl", "token",
          "tls_ca", "shm", "partitions");
  /** Keys Spark's session catalog adds to a table's options by itself. */
  private static final List<String> CATALOG_KEYS = List.of("provider", "location", "owner", "external", "comment");

  public final String uri;
  public final String name;
  public final List<String> columns; // null: all
  public final String filter; // the server's string filter language, or null
  public final boolean pushdown;
  public final String ifExists; // null, "error" or "ignore"
  public final String persist; // null, "none", "sync" or "async"
  public final Double ttl;
  public final String token;
  public final byte[] tlsCa;
  public final int partitions; // 0: the session's default parallelism
  public final boolean shm; // a task on the server's host reads its shared memory instead of a stream

  private Options(
      String uri, String name, List<String> columns, String filter, boolean pushdown, String ifExists,
      String persist, Double ttl, String token, byte[] tlsCa, int partitions, boolean shm) {
    this.uri = uri;
    this.name = name;
    this.columns = columns;
    this.filter = filter;
    this.pushdown = pushdown;
    this.ifExists = ifExists;
    this.persist = persist;
    this.ttl = ttl;
    this.token = token;
    this.tlsCa = tlsCa;
    this.partitions = partitions;
    this.shm = shm;
  }

  public static Options parse(Map<String, String> given) {
    return parse(given, System.getenv());
  }

  /** Parse {@code given} (keys in any case); {@code env} supplies FLIGHTCACHE_URI, _TOKEN and _TLS_CA defaults. */
  public static Options parse(Map<String, String> given, Map<String, String> env) {
    Map<String, String> o = new TreeMap<>();
    for (Map.Entry<String, String> e : given.entrySet()) {
      o.put(e.getKey().toLowerCase(Locale.ROOT), e.getValue());
    }
    List<String> unknown = new ArrayList<>();
    for (String key : o.keySet()) {
      if (!KEYS.contains(key) && !CATALOG_KEYS.contains(key) && !key.startsWith("option.")) {
        unknown.add("'" + key + "'");
      }
    }
    if (!unknown.isEmpty()) {
      throw invalid(
          "unknown option(s) " + unknown + " for format '" + FORMAT + "'; the options are " + String.join(", ", KEYS));
    }
    // A catalog table's options carry a "path" of its own (the warehouse location): "dataset" comes first.
    String name = blankToNull(o.get("dataset"));
    if (name == null) {
      name = blankToNull(o.get("path"));
    }
    if (name == null) {
      throw invalid(
          "no dataset name: give it to load() or save(), e.g. spark.read.format('flightcache').load('logs/raw'), "
              + "or as the option dataset in CREATE TABLE ... USING flightcache OPTIONS (dataset 'logs/raw')");
    }
    List<String> columns = null;
    String columnsText = blankToNull(o.get("columns"));
    if (columnsText != null) {
      columns = new ArrayList<>();
      for (String c : columnsText.split(",")) {
        if (!c.strip().isEmpty()) {
          columns.add(c.strip());
        }
      }
    }
    String ifExists = lower(o.get("if_exists"));
    if ("errorifexists".equals(ifExists)) {
      ifExists = "error";
    }
    if (ifExists != null && !ifExists.equals("error") && !ifExists.equals("ignore")) {
      throw invalid(
          "option if_exists='" + o.get("if_exists") + "' for dataset '" + name + "': use 'error' or 'ignore' "
              + "(or leave it out to follow the save mode, append or overwrite)");
    }
    boolean pushdown = bool(o, "pushdown", "true", name);
    boolean shm = bool(o, "shm", "0".equals(env.get("FLIGHTCACHE_SHM")) ? "false" : "true", name);
    String partitionsText = blankToNull(o.get("partitions"));
    int partitions = 0;
    if (partitionsText != null) {
      String p = partitionsText.strip();
      if (!p.chars().allMatch(Character::isDigit) || p.isEmpty() || p.length() > 9 || Integer.parseInt(p) < 1) {
        throw invalid(
            "option partitions='" + partitionsText + "' for dataset '" + name + "': use a whole number, at least 1 "
                + "(the least number of partitions to read it in)");
      }
      partitions = Integer.parseInt(p);
    }
    String persist = lower(o.get("persist"));
    if (persist != null && !Arrays.asList("none", "sync", "async").contains(persist)) {
      throw invalid(
          "option persist='" + o.get("persist") + "' for dataset '" + name + "': use none, sync or async "
              + "(or leave it out for the server's default)");
    }
    Double ttl = null;
    String ttlText = blankToNull(o.get("ttl"));
    if (ttlText != null) {
      try {
        ttl = Double.parseDouble(ttlText.strip());
      } catch (NumberFormatException e) {
        ttl = null;
      }
      if (ttl == null || !(ttl > 0) || ttl.isInfinite()) {
        throw invalid(
            "option ttl='" + ttlText + "' for dataset '" + name + "': use a number of seconds greater than 0");
      }
    }
    String uri = firstNonBlank(o.get("uri"), env.get("FLIGHTCACHE_URI"), DEFAULT_URI);
    String token = firstNonBlank(o.get("token"), env.get("FLIGHTCACHE_TOKEN"), null);
    byte[] ca = readCa(firstNonBlank(o.get("tls_ca"), env.get("FLIGHTCACHE_TLS_CA"), null));
    return new Options(
        uri, name, columns, blankToNull(o.get("filter")), pushdown, ifExists, persist, ttl, token, ca, partitions,
        shm);
  }

  /** PEM bytes of a CA certificate given as PEM text or a file path (read once, on the driver). */
  static byte[] readCa(String ca) {
    if (ca == null) {
      return null;
    }
    if (ca.stripLeading().startsWith("-----BEGIN")) {
      return ca.getBytes(StandardCharsets.UTF_8);
    }
    try {
      return Files.readAllBytes(Path.of(ca));
    } catch (IOException e) {
      throw invalid("cannot read the TLS CA certificate '" + ca + "': " + e.getMessage());
    }
  }

  private static boolean bool(Map<String, String> o, String key, String dflt, String name) {
    String v = lower(o.get(key));
    v = v == null ? dflt : v;
    if (!v.equals("true") && !v.equals("false")) {
      throw invalid("option " + key + "='" + o.get(key) + "' for dataset '" + name + "': use true or false");
    }
    return v.equals("true");
  }

  private static FlightcacheException invalid(String message) {
    return new FlightcacheException("INVALID_REQUEST", message);
  }

  private static String lower(String s) {
    s = blankToNull(s);
    return s == null ? null : s.strip().toLowerCase(Locale.ROOT);
  }

  private static String blankToNull(String s) {
    return s == null || s.isBlank() ? null : s;
  }

  private static String firstNonBlank(String a, String b, String c) {
    return blankToNull(a) != null ? a : blankToNull(b) != null ? b : c;
  }

  @Override
  public String toString() { // never the token
    return "flightcache[" + name + " at " + uri + "]";
  }
}
