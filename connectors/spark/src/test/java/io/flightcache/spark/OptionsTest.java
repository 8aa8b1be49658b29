package io.flightcache.spark;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.flightcache.spark.protocol.FlightcacheException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class OptionsTest {
  private static final Map<String, String> NO_ENV = Map.of();

  /** Defaults are the Python data source's: the local server, no token, pushdown on, partitions from Spark. */
  @Test
  void defaults() {
    Options o = Options.parse(Map.of("path", "logs/raw"), NO_ENV);
    assertEquals("logs/raw", o.name);
    assertEquals(Options.DEFAULT_URI, o.uri);
    assertNull(o.columns);
    assertNull(o.token);
    assertNull(o.ifExists);
    assertTrue(o.pushdown);
    assertEquals(0, o.partitions);
  }

  /** The driver's FLIGHTCACHE_* variables are the defaults; options win over them; keys are case-insensitive. */
  @Test
  void environmentAndOptions() {
    Map<String, String> env = Map.of("FLIGHTCACHE_URI", "grpc://cache:1", "FLIGHTCACHE_TOKEN", "t0ken");
    Options o = Options.parse(Map.of("path", "a", "Columns", " x, y ,,", "IF_EXISTS", "ErrorIfExists"), env);
    assertEquals("grpc://cache:1", o.uri);
    assertEquals("t0ken", o.token);
    assertEquals(List.of("x", "y"), o.columns);
    assertEquals("error", o.ifExists);
    assertEquals("grpc://other:2", Options.parse(Map.of("path", "a", "uri", "grpc://other:2"), env).uri);
    assertFalse(o.toString().contains("t0ken"));
  }

  /** A catalog table's options carry a path of its own (the warehouse); the dataset option comes first. */
  @Test
  void datasetBeforePath() {
    Options o = Options.parse(Map.of("path", "file:/warehouse/t", "dataset", "logs/clean", "provider", "x"), NO_ENV);
    assertEquals("logs/clean", o.name);
  }

  /** Bad values fail with the option, the value and what to use instead. */
  @Test
  void errors() {
    assertMessage(Map.of("uri", "grpc://h:1"), "no dataset name");
    assertMessage(Map.of("path", "a", "colums", "x"), "unknown option(s) ['colums']");
    assertMessage(Map.of("path", "a", "if_exists", "replace"), "option if_exists='replace' for dataset 'a'");
    assertMessage(Map.of("path", "a", "persist", "often"), "option persist='often' for dataset 'a'");
    assertMessage(Map.of("path", "a", "partitions", "none"), "option partitions='none' for dataset 'a'");
    assertMessage(Map.of("path", "a", "partitions", "0"), "at least 1");
    assertMessage(Map.of("path", "a", "pushdown", "maybe"), "option pushdown='maybe'");
    assertMessage(Map.of("path", "a", "ttl", "-1"), "option ttl='-1'");
    assertMessage(Map.of("path", "a", "tls_ca", "/no/such/ca.pem"), "cannot read the TLS CA certificate");
  }

  /** tls_ca is PEM text or a file, read once on the driver. */
  @Test
  void tlsCa(@TempDir Path dir) throws Exception {
    String pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    Path file = dir.resolve("ca.pem");
    Files.writeString(file, pem);
    assertEquals(pem, new String(Options.parse(Map.of("path", "a", "tls_ca", pem), NO_ENV).tlsCa, StandardCharsets.UTF_8));
    assertEquals(
        pem, new String(Options.parse(Map.of("path", "a", "tls_ca", file.toString()), NO_ENV).tlsCa, StandardCharsets.UTF_8));
  }

  private static void assertMessage(Map<String, String> options, String expected) {
    FlightcacheException e = assertThrows(FlightcacheException.class, () -> Options.parse(options, NO_ENV));
    assertTrue(e.getMessage().contains(expected), e.getMessage());
  }
}
