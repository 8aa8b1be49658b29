package io.flightcache.spark.read;

import io.flightcache.spark.Options;
import org.apache.spark.sql.connector.read.InputPartition;

/** One Flight endpoint of a read: its ticket (which pins the version), and the host that holds its data. */
public final class EndpointPartition implements InputPartition {
  private static final long serialVersionUID = 1L;

  final Options options;
  final String uri; // the server to redeem the ticket at
  final byte[] ticket;
  private final String[] hosts;

  EndpointPartition(Options options, String uri, byte[] ticket, String host) {
    this.options = options;
    this.uri = uri;
    this.ticket = ticket;
    this.hosts = new String[] {host};
  }

  io.flightcache.spark.protocol.FlightcacheException connectionExplain(Throwable e) {
    return io.flightcache.spark.protocol.Connection.explain(e, options, "read");
  }

  /** The host name of the endpoint's location (Spark matches host names, no ports, to executors). */
  @Override
  public String[] preferredLocations() {
    return hosts.clone();
  }
}
