package io.flightcache.spark.read;

import io.flightcache.spark.Options;
import java.net.URI;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Set;
import org.apache.arrow.flight.FlightEndpoint;
import org.apache.arrow.flight.Location;
import org.apache.spark.sql.connector.read.InputPartition;

/**
 * One Flight endpoint of a read: its ticket (which pins the version), the servers that can redeem it (one,
 * or several replicas, in the server's order) and the hosts that hold its data.
 */
public final class EndpointPartition implements InputPartition {
  private static final long serialVersionUID = 2L;

  final Options options;
  final List<String> uris; // where to redeem the ticket, tried in order while connecting fails
  final byte[] ticket;
  private final String[] hosts;

  private EndpointPartition(Options options, List<String> uris, byte[] ticket, List<String> hosts) {
    this.options = options;
    this.uris = List.copyOf(uris);
    this.ticket = ticket;
    this.hosts = hosts.toArray(new String[0]);
  }

  /**
   * The partition of endpoint {@code e}: its locations in order, without repeats; the configured server
   * for no location (redeem where the FlightInfo came from) and for Flight's reuse-connection location.
   * Locations without a host are skipped.
   */
  static EndpointPartition of(Options options, FlightEndpoint e) {
    Set<String> uris = new LinkedHashSet<>();
    Set<String> hosts = new LinkedHashSet<>();
    for (Location l : e.getLocations()) {
      URI u = l.getUri();
      if (u.getScheme().startsWith("arrow-flight-reuse-connection")) {
        addConfigured(options, uris, hosts);
      } else if (u.getHost() != null) {
        uris.add(u.toString());
        hosts.add(u.getHost());
      }
    }
    if (uris.isEmpty()) {
      addConfigured(options, uris, hosts);
    }
    return new EndpointPartition(options, List.copyOf(uris), e.getTicket().getBytes(), List.copyOf(hosts));
  }

  private static void addConfigured(Options options, Set<String> uris, Set<String> hosts) {
    String host = URI.create(options.uri).getHost();
    uris.add(options.uri);
    hosts.add(host == null ? "localhost" : host);
  }

  /** The host names of the endpoint's locations, in order, without repeats (Spark matches host names, no ports). */
  @Override
  public String[] preferredLocations() {
    return hosts.clone();
  }
}
