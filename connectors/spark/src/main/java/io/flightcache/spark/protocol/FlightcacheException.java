package io.flightcache.spark.protocol;

/** An error of the flightcache connector; {@link #code()} is the server's stable error code, when it gave one. */
public final class FlightcacheException extends RuntimeException {
  private final String code;

  public FlightcacheException(String code, String message) {
    super(message);
    this.code = code;
  }

  public FlightcacheException(String code, String message, Throwable cause) {
    super(message, cause);
    this.code = code;
  }

  /** DATASET_NOT_FOUND, DATASET_EXISTS, SCHEMA_MISMATCH, INVALID_REQUEST, UNAVAILABLE, UNAUTHENTICATED, ... */
  public String code() {
    return code;
  }
}
