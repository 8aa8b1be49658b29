package io.flightcache.spark.read;

import org.apache.arrow.vector.ValueVector;
import org.apache.spark.sql.vectorized.ArrowColumnVector;

/**
 * An ArrowColumnVector over a vector it does not own: Spark may close the batches it is handed (Spark
 * 4.2+ does so early), but the vectors belong to the Flight stream's root (reloaded by the next batch)
 * or to the reader, which close them.
 */
final class BorrowedArrowColumnVector extends ArrowColumnVector {
  BorrowedArrowColumnVector(ValueVector vector) {
    super(vector);
  }

  @Override
  public void close() {}
}
