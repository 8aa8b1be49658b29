package io.flightcache.spark.read;

import io.flightcache.spark.types.TypeMapping;
import java.math.BigDecimal;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.arrow.vector.BaseFixedWidthVector;
import org.apache.arrow.vector.BaseIntVector;
import org.apache.arrow.vector.BaseLargeVariableWidthVector;
import org.apache.arrow.vector.BaseVariableWidthVector;
import org.apache.arrow.vector.BigIntVector;
import org.apache.arrow.vector.DateDayVector;
import org.apache.arrow.vector.DateMilliVector;
import org.apache.arrow.vector.Decimal256Vector;
import org.apache.arrow.vector.DecimalVector;
import org.apache.arrow.vector.DurationVector;
import org.apache.arrow.vector.FieldVector;
import org.apache.arrow.vector.FixedSizeBinaryVector;
import org.apache.arrow.vector.Float2Vector;
import org.apache.arrow.vector.Float4Vector;
import org.apache.arrow.vector.IntVector;
import org.apache.arrow.vector.NullVector;
import org.apache.arrow.vector.SmallIntVector;
import org.apache.arrow.vector.TimeMicroVector;
import org.apache.arrow.vector.TimeMilliVector;
import org.apache.arrow.vector.TimeNanoVector;
import org.apache.arrow.vector.TimeSecVector;
import org.apache.arrow.vector.TimeStampVector;
import org.apache.arrow.vector.UInt1Vector;
import org.apache.arrow.vector.UInt2Vector;
import org.apache.arrow.vector.UInt4Vector;
import org.apache.arrow.vector.UInt8Vector;
import org.apache.arrow.vector.ValueVector;
import org.apache.arrow.vector.VarBinaryVector;
import org.apache.arrow.vector.VarCharVector;
import org.apache.arrow.vector.complex.BaseRepeatedValueVector;
import org.apache.arrow.vector.complex.FixedSizeListVector;
import org.apache.arrow.vector.complex.LargeListVector;
import org.apache.arrow.vector.complex.ListVector;
import org.apache.arrow.vector.complex.ListViewVector;
import org.apache.arrow.vector.complex.StructVector;
import org.apache.arrow.vector.dictionary.Dictionary;
import org.apache.arrow.vector.dictionary.DictionaryProvider;
import org.apache.arrow.vector.types.TimeUnit;
import org.apache.arrow.vector.types.pojo.ArrowType;
import org.apache.arrow.vector.types.pojo.Field;
import org.apache.arrow.vector.util.Text;
import org.apache.spark.sql.types.DataType;

/**
 * Copies a column Spark's ArrowColumnVector cannot read as it is (unsigned, half float, date64,
 * non-microsecond timestamps and durations, time32/time64[us], fixed-size binary, decimal256,
 * dictionaries, large / fixed-size / view lists, and containers of these) into a new vector of the Arrow
 * type Spark reads natively, value by value. Columns Spark reads natively never come here.
 */
final class Conversion {
  private final Field target;

  Conversion(Field source, DataType sparkType) {
    this.target = TypeMapping.nativeField(source.getName(), sparkType, source.isNullable());
  }

  /** A new vector (the caller closes it) holding {@code source}'s values as Spark reads them. */
  FieldVector convert(FieldVector source, DictionaryProvider dictionaries, BufferAllocator allocator) {
    FieldVector out = target.createVector(allocator);
    try {
      out.allocateNew();
      int n = source.getValueCount();
      for (int i = 0; i < n; i++) {
        copy(source, i, out, i, dictionaries);
      }
      out.setValueCount(n);
      return out;
    } catch (RuntimeException e) {
      out.close();
      throw e;
    }
  }

  static void copy(ValueVector src, int i, ValueVector dst, int j, DictionaryProvider dictionaries) {
    Field field = src.getField();
    if (field.getDictionary() != null) {
      if (src.isNull(i)) {
        setNull(dst, j);
        return;
      }
      Dictionary dictionary = dictionaries.lookup(field.getDictionary().getId());
      int index = (int) ((BaseIntVector) src).getValueAsLong(i);
      copy(dictionary.getVector(), index, dst, j, dictionaries);
      return;
    }
    if (src.isNull(i)) {
      setNull(dst, j);
      return;
    }
    if (src.getClass() == dst.getClass() && TypeMapping.isNative(field) && src.getField().getType().equals(dst.getField().getType())) {
      dst.copyFromSafe(i, j, src);
      return;
    }
    if (src instanceof StructVector s) {
      StructVector d = (StructVector) dst;
      d.setIndexDefined(j);
      for (int k = 0; k < s.size(); k++) {
        copy(s.getChildByOrdinal(k), i, d.getChildByOrdinal(k), j, dictionaries);
      }
      return;
    }
    if (src instanceof BaseRepeatedValueVector || src instanceof FixedSizeListVector || src instanceof LargeListVector
        || src instanceof ListViewVector) {
      copyList(src, i, (ListVector) dst, j, dictionaries);
      return;
    }
    copyValue(src, i, dst, j);
  }

  private static void copyList(ValueVector src, int i, ListVector dst, int j, DictionaryProvider dictionaries) {
    long start;
    long end;
    ValueVector items;
    if (src instanceof ListVector l) {
      start = l.getElementStartIndex(i);
      end = l.getElementEndIndex(i);
      items = l.getDataVector();
    } else if (src instanceof LargeListVector l) {
      start = l.getElementStartIndex(i);
      end = l.getElementEndIndex(i);
      items = l.getDataVector();
    } else if (src instanceof FixedSizeListVector l) {
      start = (long) i * l.getListSize();
      end = start + l.getListSize();
      items = l.getDataVector();
    } else if (src instanceof ListViewVector l) {
      start = l.getElementStartIndex(i);
      end = l.getElementEndIndex(i);
      items = l.getDataVector();
    } else {
      throw new UnsupportedOperationException("cannot read " + src.getField() + " in Spark");
    }
    int offset = dst.startNewValue(j);
    ValueVector out = dst.getDataVector();
    for (long k = start; k < end; k++) {
      copy(items, (int) k, out, offset + (int) (k - start), dictionaries);
    }
    dst.endValue(j, (int) (end - start));
  }

  private static void copyValue(ValueVector src, int i, ValueVector dst, int j) {
    if (src instanceof UInt1Vector v) {
      ((SmallIntVector) dst).setSafe(j, v.get(i) & 0xFF);
    } else if (src instanceof UInt2Vector v) {
      ((IntVector) dst).setSafe(j, v.get(i));
    } else if (src instanceof UInt4Vector v) {
      ((BigIntVector) dst).setSafe(j, v.get(i) & 0xFFFFFFFFL);
    } else if (src instanceof UInt8Vector v) {
      ((DecimalVector) dst).setSafe(j, new BigDecimal(UInt8Vector.getNoOverflow(v.getDataBuffer(), i)));
    } else if (src instanceof Float2Vector v) {
      ((Float4Vector) dst).setSafe(j, v.getValueAsFloat(i));
    } else if (src instanceof DateMilliVector v) {
      ((DateDayVector) dst).setSafe(j, (int) Math.floorDiv(v.get(i), 86_400_000L));
    } else if (src instanceof TimeStampVector v) {
      TimeUnit unit = ((ArrowType.Timestamp) v.getField().getType()).getUnit();
      ((TimeStampVector) dst).setSafe(j, micros(v.get(i), unit));
    } else if (src instanceof DurationVector v) {
      long raw = v.getDataBuffer().getLong((long) i * DurationVector.TYPE_WIDTH);
      ((DurationVector) dst).setSafe(j, micros(raw, ((ArrowType.Duration) v.getField().getType()).getUnit()));
    } else if (src instanceof TimeSecVector v) {
      ((TimeNanoVector) dst).setSafe(j, v.get(i) * 1_000_000_000L);
    } else if (src instanceof TimeMilliVector v) {
      ((TimeNanoVector) dst).setSafe(j, v.get(i) * 1_000_000L);
    } else if (src instanceof TimeMicroVector v) {
      ((TimeNanoVector) dst).setSafe(j, v.get(i) * 1_000L);
    } else if (src instanceof FixedSizeBinaryVector v) {
      ((VarBinaryVector) dst).setSafe(j, v.get(i));
    } else if (src instanceof Decimal256Vector v) {
      ((DecimalVector) dst).setSafe(j, v.getObject(i));
    } else if (src instanceof BaseVariableWidthVector || src instanceof BaseLargeVariableWidthVector) {
      byte[] bytes = src instanceof BaseVariableWidthVector b ? b.get(i) : ((BaseLargeVariableWidthVector) src).get(i);
      if (dst instanceof VarCharVector d) {
        d.setSafe(j, new Text(bytes));
      } else {
        ((VarBinaryVector) dst).setSafe(j, bytes);
      }
    } else if (src.getClass() == dst.getClass()) {
      dst.copyFromSafe(i, j, src);
    } else {
      throw new UnsupportedOperationException(
          "cannot read Arrow " + src.getField().getType() + " as " + dst.getField().getType() + " in Spark");
    }
  }

  private static long micros(long value, TimeUnit unit) {
    return switch (unit) {
      case SECOND -> value * 1_000_000L;
      case MILLISECOND -> value * 1_000L;
      case MICROSECOND -> value;
      case NANOSECOND -> Math.floorDiv(value, 1_000L); // truncated to Spark's microseconds, as Spark does
    };
  }

  static void setNull(ValueVector dst, int j) {
    if (dst instanceof BaseFixedWidthVector v) {
      v.setNull(j);
    } else if (dst instanceof BaseVariableWidthVector v) {
      v.setNull(j);
    } else if (dst instanceof ListVector v) {
      v.setNull(j);
    } else if (dst instanceof StructVector v) {
      v.setNull(j);
    } else if (!(dst instanceof NullVector)) {
      throw new UnsupportedOperationException("cannot set a null in " + dst.getField());
    }
  }
}
