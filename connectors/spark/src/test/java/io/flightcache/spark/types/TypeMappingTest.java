package io.flightcache.spark.types;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.flightcache.spark.protocol.FlightcacheException;
import java.util.List;
import org.apache.arrow.vector.types.DateUnit;
import org.apache.arrow.vector.types.FloatingPointPrecision;
import org.apache.arrow.vector.types.TimeUnit;
import org.apache.arrow.vector.types.pojo.ArrowType;
import org.apache.arrow.vector.types.pojo.DictionaryEncoding;
import org.apache.arrow.vector.types.pojo.Field;
import org.apache.arrow.vector.types.pojo.FieldType;
import org.apache.arrow.vector.types.pojo.Schema;
import org.apache.spark.sql.types.DataType;
import org.apache.spark.sql.types.DataTypes;
import org.apache.spark.sql.types.StructType;
import org.junit.jupiter.api.Test;

class TypeMappingTest {
  private static Field f(ArrowType t, Field... children) {
    return new Field("c", FieldType.nullable(t), children.length == 0 ? null : List.of(children));
  }

  private static DataType spark(Field field) {
    return TypeMapping.sparkType(field, "c");
  }

  /** Arrow types Spark lacks widen to the narrowest Spark type holding every value, as in flightcache/spark.py. */
  @Test
  void widened() {
    assertEquals(DataTypes.ShortType, spark(f(new ArrowType.Int(8, false))));
    assertEquals(DataTypes.IntegerType, spark(f(new ArrowType.Int(16, false))));
    assertEquals(DataTypes.LongType, spark(f(new ArrowType.Int(32, false))));
    assertEquals(DataTypes.createDecimalType(20, 0), spark(f(new ArrowType.Int(64, false))));
    assertEquals(DataTypes.FloatType, spark(f(new ArrowType.FloatingPoint(FloatingPointPrecision.HALF))));
    assertEquals(DataTypes.DateType, spark(f(new ArrowType.Date(DateUnit.MILLISECOND))));
    assertEquals(DataTypes.TimestampType, spark(f(new ArrowType.Timestamp(TimeUnit.NANOSECOND, "UTC"))));
    assertEquals(DataTypes.TimestampType, spark(f(new ArrowType.Timestamp(TimeUnit.MICROSECOND, "Asia/Kolkata"))));
    assertEquals(DataTypes.TimestampNTZType, spark(f(new ArrowType.Timestamp(TimeUnit.MILLISECOND, null))));
    assertEquals(DataTypes.StringType, spark(f(ArrowType.LargeUtf8.INSTANCE)));
    assertEquals(DataTypes.BinaryType, spark(f(new ArrowType.FixedSizeBinary(2))));
    Field dictionary =
        new Field(
            "c",
            new FieldType(true, ArrowType.Utf8.INSTANCE, new DictionaryEncoding(0, false, new ArrowType.Int(32, true))),
            null);
    assertEquals(DataTypes.StringType, spark(dictionary));
    assertEquals(
        DataTypes.createArrayType(DataTypes.DoubleType, true),
        spark(f(new ArrowType.FixedSizeList(2), Field.nullable("item", new ArrowType.FloatingPoint(FloatingPointPrecision.DOUBLE)))));
    assertEquals(
        DataTypes.createArrayType(DataTypes.StringType, true),
        spark(f(ArrowType.LargeList.INSTANCE, Field.nullable("item", ArrowType.Utf8.INSTANCE))));
  }

  /** Columns Spark reads as they are pass through; the others (containers of them too) are converted. */
  @Test
  void nativeOrConverted() {
    assertTrue(TypeMapping.isNative(f(new ArrowType.Int(64, true))));
    assertTrue(TypeMapping.isNative(f(new ArrowType.Timestamp(TimeUnit.MICROSECOND, "UTC"))));
    assertTrue(TypeMapping.isNative(f(ArrowType.Utf8.INSTANCE)));
    assertTrue(TypeMapping.isNative(f(ArrowType.List.INSTANCE, Field.nullable("item", new ArrowType.Int(32, true)))));
    assertFalse(TypeMapping.isNative(f(new ArrowType.Int(8, false))));
    assertFalse(TypeMapping.isNative(f(new ArrowType.Timestamp(TimeUnit.NANOSECOND, "UTC"))));
    assertFalse(TypeMapping.isNative(f(new ArrowType.Time(TimeUnit.MICROSECOND, 64))));
    assertFalse(TypeMapping.isNative(f(ArrowType.LargeList.INSTANCE, Field.nullable("item", new ArrowType.Int(32, true)))));
    assertFalse(TypeMapping.isNative(f(ArrowType.List.INSTANCE, Field.nullable("item", new ArrowType.Int(16, false)))));
  }

  /** A decimal wider than Spark's 38 digits is refused by column name. */
  @Test
  void tooWideDecimal() {
    FlightcacheException e =
        assertThrows(
            FlightcacheException.class,
            () -> TypeMapping.sparkSchema(new Schema(List.of(Field.nullable("d256", new ArrowType.Decimal(50, 0, 256))))));
    assertTrue(e.getMessage().contains("'d256'") && e.getMessage().contains("38 digits"), e.getMessage());
  }

  /** What Spark writes, Spark reads as written. */
  @Test
  void sparkSchemaRoundTrips() {
    StructType schema =
        new StructType()
            .add("a", DataTypes.IntegerType, false)
            .add("ts", DataTypes.TimestampType)
            .add("m", DataTypes.createMapType(DataTypes.StringType, DataTypes.createArrayType(DataTypes.TimestampType)))
            .add("s", new StructType().add("x", DataTypes.StringType).add("d", DataTypes.createDecimalType(38, 10)));
    Schema arrow = TypeMapping.arrowSchema(schema);
    assertEquals(new ArrowType.Timestamp(TimeUnit.MICROSECOND, "UTC"), arrow.findField("ts").getType());
    assertEquals(schema, TypeMapping.sparkSchema(arrow));
    for (Field field : arrow.getFields()) {
      assertTrue(TypeMapping.isNative(field), field.toString());
    }
  }
}
