package io.flightcache.spark;

import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Map;
import org.junit.jupiter.api.Assumptions;

/**
 * One real `flightcache serve` from the project's venv ($FLIGHTCACHE_PYTHON) for the whole test run,
 * started by the first test that asks for it and stopped when the JVM exits; tests that need it are
 * skipped without FLIGHTCACHE_PYTHON.
 */
public final class TestServer {
  private static Process server;
  private static String uri;

  private TestServer() {}

  /** The server's address, e.g. grpc://127.0.0.1:PORT. */
  public static synchronized String uri() {
    String python = System.getenv("FLIGHTCACHE_PYTHON");
    Assumptions.assumeTrue(python != null && Files.isExecutable(Path.of(python)), "no FLIGHTCACHE_PYTHON: skipped");
    if (uri == null) {
      uri = start(python);
    }
    return uri;
  }

  private static String start(String python) {
    try {
      server =
          new ProcessBuilder(python, "-m", "flightcache.cli", "serve", "--port", "0", "--output", "json", "--storage", "none")
              .redirectError(ProcessBuilder.Redirect.INHERIT)
              .start();
      Runtime.getRuntime().addShutdownHook(new Thread(TestServer::stop));
      BufferedReader out = new BufferedReader(new InputStreamReader(server.getInputStream(), StandardCharsets.UTF_8));
      StringBuilder json = new StringBuilder();
      for (String line = out.readLine(); line != null; line = out.readLine()) {
        json.append(line).append('\n');
        if (line.startsWith("}")) {
          break;
        }
      }
      return (String) new ObjectMapper().readValue(json.toString(), Map.class).get("uri");
    } catch (IOException e) {
      throw new UncheckedIOException(e);
    }
  }

  private static void stop() {
    server.destroy();
    try {
      server.waitFor();
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
    }
  }
}
