package io.flightcache.spark.types;

import io.flightcache.spark.protocol.FlightcacheException;
import java.util.ArrayList;
import java.util.List;
import org.apache.arrow.vector.types.DateUnit;
import org.apache.arrow.vector.types.FloatingPointPrecision;
import org.apache.arrow.vector.types.IntervalUnit;
import org.apache.arrow.vector.types.TimeUnit;
import org.apache.arrow.vector.types.pojo.ArrowType;
import org.apache.arrow.vector.types.pojo.Field;
import org.apache.arrow.vector.types.pojo.Schema;
import org.apache.spark.sql.types.DataType;
import org.apache.spark.sql.types.DataTypes;
import org.apache.spark.sql.types.DecimalType;
import org.apache.spark.sql.types.Metadata;
import org.apache.spark.sql.types.StructField;
import org.apache.spark.sql.types.StructType;
import org.apache.spark.sql.util.ArrowUtils;

/**
 * Arrow types to Spark types and back, as the Python data source maps them (flightcache/spark.py):
 * Arrow types Spark lacks widen to the narrowest Spark type that holds every value (unsigned integers,
 * half floats, date64, dictionaries, large and fixed-size lists and binaries, any timestamp unit).
 * {@link #isNative} says which Arrow fields Spark's ArrowColumnVector reads as they are; the others are
 * converted on read ({@code read.Conversion}).
 */
public final class TypeMapping {
  public static final int SPARK_MAX_DECIMAL_DIGITS = 38;
  public static final String TIME_ZONE = "UTC"; // what writes store, so that any session time zone can append

  private TypeMapping() {}

  /** The Spark schema of an Arrow schema; SCHEMA_MISMATCH names a column Spark cannot hold. */
  public static StructType sparkSchema(Schema schema) {
    List<StructField> fields = new ArrayList<>();
    for (Field f : schema.getFields()) {
      fields.add(sparkField(f, f.getName()));
    }
    return new StructType(fields.toArray(new StructField[0]));
  }

  /** The Arrow schema Spark's own Arrow writer produces for {@code schema}: what writes store. */
  public static Schema arrowSchema(StructType schema) {
    // Isolated here: ArrowUtils is private[sql] in Scala (public in bytecode) and its signature changes
    // between Spark versions. Arguments: time zone, error on duplicated struct field names, large var
    // types (no: plain string/binary, as pyspark writes), and the 4.3 default of the fifth.
    return ArrowUtils.toArrowSchema(schema, TIME_ZONE, true, false, false);
  }

  static StructField sparkField(Field f, String column) {
    return new StructField(f.getName(), sparkType(f, column), f.isNullable(), Metadata.empty());
  }

  public static DataType sparkType(Field f, String column) {
    if (f.getDictionary() != null) {
      return valueType(f.getDictionary().getIndexType(), f, column);
    }
    return valueType(null, f, column);
  }

  private static DataType valueType(ArrowType.Int dictionaryIndex, Field f, String column) {
    ArrowType t = f.getType();
    List<Field> children = f.getChildren();
    switch (t.getTypeID()) {
      case Int: {
        ArrowType.Int i = (ArrowType.Int) t;
        if (i.getIsSigned()) {
          return switch (i.getBitWidth()) {
            case 8 -> DataTypes.ByteType;
            case 16 -> DataTypes.ShortType;
            case 32 -> DataTypes.IntegerType;
            default -> DataTypes.LongType;
          };
        }
        return switch (i.getBitWidth()) {
          case 8 -> DataTypes.ShortType;
          case 16 -> DataTypes.IntegerType;
          case 32 -> DataTypes.LongType;
          default -> DataTypes.createDecimalType(20, 0);
        };
      }
      case FloatingPoint:
        return ((ArrowType.FloatingPoint) t).getPrecision() == FloatingPointPrecision.DOUBLE
            ? DataTypes.DoubleType
            : DataTypes.FloatType;
      case Bool:
        return DataTypes.BooleanType;
      case Utf8:
      case LargeUtf8:
      case Utf8View:
        return DataTypes.StringType;
      case Binary:
      case LargeBinary:
      case BinaryView:
      case FixedSizeBinary:
        return DataTypes.BinaryType;
      case Decimal: {
        ArrowType.Decimal d = (ArrowType.Decimal) t;
        if (d.getPrecision() > SPARK_MAX_DECIMAL_DIGITS) {
          throw new FlightcacheException(
              "SCHEMA_MISMATCH",
              "column '" + column + "' has type decimal(" + d.getPrecision() + ", " + d.getScale()
                  + "): Spark decimals hold at most " + SPARK_MAX_DECIMAL_DIGITS
                  + " digits; leave it out with the option 'columns'");
        }
        return DataTypes.createDecimalType(d.getPrecision(), d.getScale());
      }
      case Date:
        return DataTypes.DateType;
      case Timestamp:
        return ((ArrowType.Timestamp) t).getTimezone() == null ? DataTypes.TimestampNTZType : DataTypes.TimestampType;
      case Time:
        if (((ArrowType.Time) t).getBitWidth() == 64) {
          return ArrowUtils.fromArrowType(new ArrowType.Time(TimeUnit.NANOSECOND, 64));
        }
        break;
      case Duration:
        return ArrowUtils.fromArrowType(new ArrowType.Duration(TimeUnit.MICROSECOND));
      case Interval:
        return ArrowUtils.fromArrowType(t);
      case Null:
        return DataTypes.NullType;
      case List:
      case LargeList:
      case FixedSizeList:
      case ListView:
      case LargeListView: {
        Field item = children.get(0);
        return DataTypes.createArrayType(sparkType(item, column), item.isNullable());
      }
      case Map: {
        Field entries = children.get(0);
        Field key = entries.getChildren().get(0);
        Field value = entries.getChildren().get(1);
        return DataTypes.createMapType(sparkType(key, column), sparkType(value, column), value.isNullable());
      }
      case Struct: {
        if (ArrowUtils.isVariantField(f) || ArrowUtils.isGeometryField(f) || ArrowUtils.isGeographyField(f)
            || ArrowUtils.isCalendarIntervalStructField(f) || ArrowUtils.isTimestampNanosStructField(f)) {
          return ArrowUtils.fromArrowField(f);
        }
        List<StructField> fields = new ArrayList<>();
        for (Field c : children) {
          fields.add(sparkField(c, column + "." + c.getName()));
        }
        return new StructType(fields.toArray(new StructField[0]));
      }
      default:
        break;
    }
    throw new FlightcacheException(
        "SCHEMA_MISMATCH", "column '" + column + "' has type " + t + ", which Spark cannot hold; "
            + "leave it out with the option 'columns'");
  }

  /** Whether Spark's ArrowColumnVector reads {@code f} as it is, with the Spark type {@link #sparkType} gives. */
  public static boolean isNative(Field f) {
    if (f.getDictionary() != null) {
      return false;
    }
    ArrowType t = f.getType();
    switch (t.getTypeID()) {
      case Int:
        return ((ArrowType.Int) t).getIsSigned();
      case FloatingPoint:
        return ((ArrowType.FloatingPoint) t).getPrecision() != FloatingPointPrecision.HALF;
      case Bool:
      case Utf8:
      case LargeUtf8:
      case Binary:
      case LargeBinary:
      case Null:
        return true;
      case Decimal:
        return ((ArrowType.Decimal) t).getBitWidth() == 128;
      case Date:
        return ((ArrowType.Date) t).getUnit() == DateUnit.DAY;
      case Timestamp:
        return ((ArrowType.Timestamp) t).getUnit() == TimeUnit.MICROSECOND;
      case Time:
        return ((ArrowType.Time) t).getUnit() == TimeUnit.NANOSECOND && ((ArrowType.Time) t).getBitWidth() == 64;
      case Duration:
        return ((ArrowType.Duration) t).getUnit() == TimeUnit.MICROSECOND;
      case Interval:
        return ((ArrowType.Interval) t).getUnit() != IntervalUnit.DAY_TIME;
      case List:
      case Map:
      case Struct:
        for (Field c : f.getChildren()) {
          if (!isNative(c)) {
            return false;
          }
        }
        return true;
      default:
        return false;
    }
  }

  /** The Arrow field ArrowColumnVector reads natively for {@code sparkType}: the target of a conversion. */
  public static Field nativeField(String name, DataType sparkType, boolean nullable) {
    return ArrowUtils.toArrowField(name, sparkType, nullable, TIME_ZONE, false, Metadata.empty(), false);
  }

  /** Spark's decimal type for Arrow decimals, exported for the converter. */
  static DecimalType decimal(int precision, int scale) {
    return DataTypes.createDecimalType(precision, scale);
  }
}
