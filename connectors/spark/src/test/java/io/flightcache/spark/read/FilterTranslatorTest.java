package io.flightcache.spark.read;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;

import java.util.Map;
import org.apache.arrow.vector.types.FloatingPointPrecision;
import org.apache.arrow.vector.types.pojo.ArrowType;
import org.apache.arrow.vector.types.pojo.DictionaryEncoding;
import org.apache.arrow.vector.types.pojo.Field;
import org.apache.arrow.vector.types.pojo.FieldType;
import org.apache.spark.sql.connector.expressions.Expression;
import org.apache.spark.sql.connector.expressions.Expressions;
import org.apache.spark.sql.connector.expressions.filter.And;
import org.apache.spark.sql.connector.expressions.filter.Not;
import org.apache.spark.sql.connector.expressions.filter.Or;
import org.apache.spark.sql.connector.expressions.filter.Predicate;
import org.apache.spark.unsafe.types.UTF8String;
import org.junit.jupiter.api.Test;

class FilterTranslatorTest {
  private static final FilterTranslator T =
      new FilterTranslator(
          Map.of(
              "status", Field.nullable("status", new ArrowType.Int(32, true)),
              "u8", Field.nullable("u8", new ArrowType.Int(8, false)),
              "u64", Field.nullable("u64", new ArrowType.Int(64, false)),
              "method", Field.nullable("method", ArrowType.Utf8.INSTANCE),
              "ok", Field.nullable("ok", ArrowType.Bool.INSTANCE),
              "latency", Field.nullable("latency", new ArrowType.FloatingPoint(FloatingPointPrecision.DOUBLE)),
              "ts", Field.nullable("ts", new ArrowType.Timestamp(org.apache.arrow.vector.types.TimeUnit.MICROSECOND, "UTC")),
              "dict",
                  new Field(
                      "dict",
                      new FieldType(true, ArrowType.Utf8.INSTANCE, new DictionaryEncoding(1, false, new ArrowType.Int(32, true))),
                      null)));

  private static Predicate p(String name, Expression... children) {
    return new Predicate(name, children);
  }

  private static Expression col(String name) {
    return Expressions.column(name);
  }

  private static Expression lit(Object value) {
    return Expressions.literal(value);
  }

  /** Comparisons with literals on either side, null tests, and the boolean connectives translate exactly. */
  @Test
  void translated() {
    assertEquals("col('status') >= 500", T.translate(p(">=", col("status"), lit(500))));
    assertEquals("col('status') > 500", T.translate(p("<", lit(500), col("status"))));
    assertEquals("col('status') != 200", T.translate(p("<>", col("status"), lit(200))));
    assertEquals("col('method') == 'GET'", T.translate(p("=", col("method"), lit(UTF8String.fromString("GET")))));
    assertEquals("col('ok') == True", T.translate(p("=", col("ok"), lit(true))));
    assertEquals("col('u8') < 7", T.translate(p("<", col("u8"), lit(7))));
    assertEquals("col('status') is None", T.translate(p("IS_NULL", col("status"))));
    assertEquals("col('status') is not None", T.translate(p("IS_NOT_NULL", col("status"))));
    assertEquals("col('status') in (404, 500)", T.translate(p("IN", col("status"), lit(404), lit(500))));
    assertEquals("col('status') in (404,)", T.translate(p("IN", col("status"), lit(404))));
    assertEquals(
        "(col('status') is not None and col('status') == 404)", T.translate(p("<=>", col("status"), lit(404))));
    assertEquals("col('status') is None", T.translate(p("<=>", col("status"), Expressions.literal(null))));
    assertEquals(
        "(col('status') == 1 or not (col('method') == 'x'))",
        T.translate(
            new Or(
                p("=", col("status"), lit(1)),
                new Not(p("=", col("method"), lit(UTF8String.fromString("x")))))));
    assertEquals(
        "(col('status') == 1 and col('ok') == False)",
        T.translate(new And(p("=", col("status"), lit(1)), p("=", col("ok"), lit(false)))));
  }

  /** What the server cannot apply with Spark's exact meaning is left to Spark. */
  @Test
  void leftToSpark() {
    assertNull(T.translate(p(">", col("latency"), lit(1.0))), "NaN orders differently");
    assertNull(T.translate(p("=", col("dict"), lit(UTF8String.fromString("a")))), "dictionary");
    assertNull(T.translate(p("=", col("u64"), lit(1L))), "uint64 is a Spark decimal");
    assertNull(T.translate(p(">", col("ts"), lit(0L))), "no timestamp literals");
    assertNull(T.translate(p("=", col("nope"), lit(1))), "unknown column");
    assertNull(T.translate(p("=", col("status"), Expressions.literal(null))), "= NULL");
    assertNull(T.translate(new Not(p("IN", col("status"), lit(1), lit(2)))), "NULL NOT IN is NULL");
    assertNull(T.translate(p("IN", col("status"), lit(1), Expressions.literal(null))), "IN with NULL");
    assertNull(T.translate(p("STARTS_WITH", col("method"), lit(UTF8String.fromString("G")))));
    assertNull(T.translate(new And(p("=", col("status"), lit(1)), p(">", col("latency"), lit(1.0)))));
    assertNull(T.translate(p("=", Expressions.column("a.b"), lit(1))));
  }

  /** String literals become Python literals with exactly their characters. */
  @Test
  void quoting() {
    assertEquals("'it\\'s \\\\ \\u00fc \\U0001f600 \\u000a'", FilterTranslator.quote("it's \\ ü \uD83D\uDE00 \n"));
  }
}
