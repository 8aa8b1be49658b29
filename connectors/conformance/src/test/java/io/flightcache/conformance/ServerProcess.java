package io.flightcache.conformance;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.TimeUnit;

/** A real {@code flightcache serve} on 127.0.0.1, port 0, memory only; stopped (SIGTERM) by {@link #close()}. */
final class ServerProcess implements AutoCloseable {
  final Process process;
  final String host;
  final int port;
  final Path log;

  private ServerProcess(Process process, URI uri, Path log) {
    this.process = process;
    this.host = uri.getHost();
    this.port = uri.getPort();
    this.log = log;
  }

  /** The flightcache command: -Dflightcache.bin (set by the pom), else $FLIGHTCACHE_BIN, else the PATH's. */
  static String binary() {
    String bin = System.getProperty("flightcache.bin");
    if (bin == null || bin.isEmpty() || !Files.isExecutable(Path.of(bin))) {
      bin = System.getenv("FLIGHTCACHE_BIN");
    }
    return bin == null || bin.isEmpty() ? "flightcache" : bin;
  }

  static ServerProcess start(String... extra) throws IOException {
    List<String> command = new ArrayList<>(List.of(binary(), "serve", "--port", "0", "--output", "json",
        "--storage", "none", "--shm", "off", "--grace-period", "1"));
    command.addAll(List.of(extra));
    Path log = Files.createTempFile("flightcache-serve", ".log");
    Process process = new ProcessBuilder(command).redirectError(log.toFile()).start();
    BufferedReader out = new BufferedReader(new InputStreamReader(process.getInputStream(), StandardCharsets.UTF_8));
    StringBuilder message = new StringBuilder();
    String line;
    // The start-up message is one JSON object over several lines, ending with a line "}".
    while ((line = out.readLine()) != null) {
      message.append(line).append('\n');
      if (line.startsWith("}")) {
        break;
      }
    }
    if (line == null) {
      process.destroy();
      throw new IOException("flightcache serve exited before it was ready: " + Files.readString(log));
    }
    JsonNode ready = new ObjectMapper().readTree(message.toString());
    return new ServerProcess(process, URI.create(ready.get("uri").asText()), log);
  }

  @Override
  public void close() throws Exception {
    process.destroy(); // SIGTERM: the server drains and exits
    if (!process.waitFor(60, TimeUnit.SECONDS)) {
      process.destroyForcibly();
    }
    Files.deleteIfExists(log);
  }
}
