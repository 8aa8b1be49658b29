package io.flightcache.spark.protocol;

import io.flightcache.spark.Options;
import java.io.ByteArrayInputStream;
import java.net.URI;
import java.net.URISyntaxException;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.function.Supplier;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import javax.net.ssl.SSLException;
import org.apache.arrow.flight.Action;
import org.apache.arrow.flight.CallHeaders;
import org.apache.arrow.flight.CallStatus;
import org.apache.arrow.flight.FlightClient;
import org.apache.arrow.flight.FlightClientMiddleware;
import org.apache.arrow.flight.FlightDescriptor;
import org.apache.arrow.flight.FlightInfo;
import org.apache.arrow.flight.FlightRuntimeException;
import org.apache.arrow.flight.FlightStatusCode;
import org.apache.arrow.flight.Location;
import org.apache.arrow.flight.Result;
import org.apache.arrow.memory.BufferAllocator;

/**
 * A Flight client of one flightcache server, with the connector's options (token, TLS CA), and the one
 * place where Flight errors become {@link FlightcacheException}s naming the dataset and the server.
 */
public final class Connection implements AutoCloseable {
  private static final Pattern CODE = Pattern.compile("^\\[([A-Z_]+)\\] ");
  private static final String[] TRANSPORT_SUFFIXES = {". Detail: ", ". gRPC client debug context: ", ". Client context: "};

  private final Options options;
  private final String uri; // the server this client talks to: options.uri, or an endpoint's or a node's location
  private final FlightClient client;

  public Connection(Options options, BufferAllocator allocator) {
    this(options, options.uri, allocator);
  }

  /** A client of the server at {@code uri} (an endpoint's or a node's location), with the options' credentials and TLS CA. */
  public Connection(Options options, String uri, BufferAllocator allocator) {
    this.options = options;
    this.uri = uri;
    Location location;
    try {
      location = new Location(new URI(uri.replaceFirst("^grpc://", "grpc+tcp://")));
    } catch (URISyntaxException | IllegalArgumentException e) {
      String what = uri.equals(options.uri) ? "option uri='" + uri + "'" : "the location '" + uri + "' the server gave";
      throw new FlightcacheException("INVALID_REQUEST", what + " is not a server address like grpc://host:8815", e);
    }
    FlightClient.Builder builder = FlightClient.builder(allocator, location);
    if (options.tlsCa != null) {
      builder.trustedCertificates(new ByteArrayInputStream(options.tlsCa));
    }
    if (options.token != null) {
      String header = "Bearer " + options.token;
      builder.intercept(info -> new BearerToken(header));
    }
    this.client = builder.build();
  }

  public Options options() {
    return options;
  }

  public FlightClient client() {
    return client;
  }

  /** get_flight_info of a read: projected, filtered, split into at least {@code endpoints}. */
  public FlightInfo readInfo(List<String> columns, String filter, Integer endpoints, String doing) {
    byte[] command = Wire.readRequest(options.name, columns, filter, null, endpoints);
    return call(doing, () -> client.getInfo(FlightDescriptor.command(command)));
  }

  /** Run a flightcache action; its JSON object results. */
  public List<Map<String, Object>> action(String type, byte[] body, String doing) {
    List<Map<String, Object>> results = new ArrayList<>();
    for (byte[] result : actionBodies(type, body, doing)) {
      results.add(Wire.decode(result));
    }
    return results;
  }

  /** Run a flightcache action; the bodies of its results as they came (for results that are not JSON objects). */
  public List<byte[]> actionBodies(String type, byte[] body, String doing) {
    return call(
        doing,
        () -> {
          List<byte[]> results = new ArrayList<>();
          Iterator<Result> it = client.doAction(new Action(type, body));
          while (it.hasNext()) {
            results.add(it.next().getBody());
          }
          return results;
        });
  }

  /** {@code fn()} with every Flight error turned into a FlightcacheException that says what failed where. */
  public <T> T call(String doing, Supplier<T> fn) {
    try {
      return fn.get();
    } catch (FlightRuntimeException e) {
      throw explain(e, doing);
    }
  }

  /** The error a user should see for {@code e} while doing {@code doing} ("read", "write", ...) on this server. */
  public FlightcacheException explain(Throwable e, String doing) {
    return explain(e, options, uri, doing);
  }

  /** The error a user should see for {@code e} while doing {@code doing} on the configured server. */
  public static FlightcacheException explain(Throwable e, Options options, String doing) {
    return explain(e, options, options.uri, doing);
  }

  /** The error a user should see for {@code e} while doing {@code doing} on the server at {@code uri}. */
  public static FlightcacheException explain(Throwable e, Options options, String uri, String doing) {
    if (e instanceof FlightcacheException f) {
      return f;
    }
    String what = "cannot " + doing + " dataset '" + options.name + "'";
    if (!(e instanceof FlightRuntimeException f)) {
      return new FlightcacheException(
          "INTERNAL", what + " on the flightcache server at " + uri + ": " + e, e);
    }
    String message = clean(f.status().description() == null ? "" : f.status().description());
    Matcher m = CODE.matcher(message);
    if (m.find()) {
      String code = m.group(1);
      String text = message.substring(m.end());
      return new FlightcacheException(code, what + " on the flightcache server at " + uri + ": " + text, e);
    }
    FlightStatusCode status = f.status().code();
    if (status == FlightStatusCode.UNAVAILABLE && hasCause(e, SSLException.class)) {
      return new FlightcacheException(
          "UNAVAILABLE",
          what + ": TLS: the certificate of the flightcache server at " + uri + " is not trusted ("
              + message + "); give the CA that signed it (option tls_ca or $FLIGHTCACHE_TLS_CA)",
          e);
    }
    if (status == FlightStatusCode.UNAVAILABLE && !uri.equals(options.uri)) {
      return new FlightcacheException(
          "UNAVAILABLE",
          what + ": cannot reach the flightcache node at " + uri + " (" + message + "), an address the server at "
              + options.uri + " gave; is that node running, and reachable from this host?",
          e);
    }
    if (status == FlightStatusCode.UNAVAILABLE) {
      return new FlightcacheException(
          "UNAVAILABLE",
          what + ": cannot reach the flightcache server at " + uri + " (" + message
              + "); is it running? start one with 'flightcache serve'; or set the option 'uri' "
              + "(default: $FLIGHTCACHE_URI) to the address of a running server",
          e);
    }
    if (status == FlightStatusCode.UNAUTHENTICATED) {
      return new FlightcacheException(
          "UNAUTHENTICATED",
          what + " on the flightcache server at " + uri + ": " + message
              + "; give a token (option token or $FLIGHTCACHE_TOKEN)",
          e);
    }
    return new FlightcacheException(
        status.name(), what + " on the flightcache server at " + uri + ": " + message, e);
  }

  static String clean(String message) {
    for (String marker : TRANSPORT_SUFFIXES) {
      int cut = message.indexOf(marker);
      if (cut != -1) {
        message = message.substring(0, cut);
      }
    }
    return message;
  }

  private static boolean hasCause(Throwable e, Class<? extends Throwable> type) {
    for (Throwable t = e; t != null; t = t.getCause()) {
      if (type.isInstance(t)) {
        return true;
      }
    }
    return false;
  }

  @Override
  public void close() {
    try {
      client.close();
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
    }
  }

  /** Sends authorization: Bearer TOKEN on every call. */
  private record BearerToken(String header) implements FlightClientMiddleware {
    @Override
    public void onBeforeSendingHeaders(CallHeaders outgoingHeaders) {
      outgoingHeaders.insert("authorization", header);
    }

    @Override
    public void onHeadersReceived(CallHeaders incomingHeaders) {}

    @Override
    public void onCallCompleted(CallStatus status) {}
  }

}
