package io.flightcache.spark.read;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.apache.arrow.vector.types.pojo.ArrowType;
import org.apache.arrow.vector.types.pojo.Field;
import org.apache.spark.sql.connector.expressions.Expression;
import org.apache.spark.sql.connector.expressions.Literal;
import org.apache.spark.sql.connector.expressions.NamedReference;
import org.apache.spark.sql.connector.expressions.filter.Predicate;
import org.apache.spark.sql.types.BooleanType;
import org.apache.spark.sql.types.ByteType;
import org.apache.spark.sql.types.DataType;
import org.apache.spark.sql.types.IntegerType;
import org.apache.spark.sql.types.LongType;
import org.apache.spark.sql.types.ShortType;
import org.apache.spark.sql.types.StringType;

/**
 * Spark predicates to the server's filter language (flightcache/filters.py), where the server gives
 * them exactly their SQL meaning, nulls included (Spark does not evaluate again what a source accepts).
 * Taken: = <> <=> < <= > >= IS NULL, IS NOT NULL, IN (not under NOT: Arrow's is_in says false for a null
 * input where SQL says null), AND, OR, NOT, over top-level columns stored as signed or unsigned integers,
 * strings or booleans, compared with literals. Left to Spark: floating point (Spark orders NaN above
 * every number, IEEE does not), dictionaries, decimals, dates and timestamps (the filter language has no
 * such literals), nested fields, LIKE-style string functions and anything else.
 */
public final class FilterTranslator {
  private static final Map<String, String> COMPARE =
      Map.of("=", "==", "<>", "!=", "<", "<", "<=", "<=", ">", ">", ">=", ">=");
  private static final Map<String, String> FLIPPED =
      Map.of("=", "=", "<>", "<>", "<", ">", "<=", ">=", ">", "<", ">=", "<=");

  private final Map<String, Field> columns; // the dataset's Arrow fields by name

  public FilterTranslator(Map<String, Field> columns) {
    this.columns = columns;
  }

  /** The filter-language text of {@code p}, or null if it cannot be pushed with its exact meaning. */
  public String translate(Predicate p) {
    return translate(p, false);
  }

  private String translate(Predicate p, boolean negated) {
    Expression[] c = p.children();
    switch (p.name()) {
      case "AND":
      case "OR": {
        String left = translate((Predicate) c[0], negated);
        String right = left == null ? null : translate((Predicate) c[1], negated);
        return right == null ? null : "(" + left + (p.name().equals("AND") ? " and " : " or ") + right + ")";
      }
      case "NOT": {
        String inner = c[0] instanceof Predicate q ? translate(q, !negated) : null;
        return inner == null ? null : "not (" + inner + ")";
      }
      case "IS_NULL":
      case "IS_NOT_NULL": {
        String column = column(c[0]);
        return column == null ? null : column + (p.name().equals("IS_NULL") ? " is None" : " is not None");
      }
      case "IN": {
        String column = column(c[0]);
        if (column == null || negated || c.length < 2) {
          return null;
        }
        List<String> values = new ArrayList<>();
        for (int i = 1; i < c.length; i++) {
          String v = literal(c[i]);
          if (v == null || v.equals("None")) {
            return null;
          }
          values.add(v);
        }
        return column + " in (" + String.join(", ", values) + (values.size() == 1 ? ",)" : ")");
      }
      case "<=>": {
        String column = column(c[0]);
        String value = literal(c[1]);
        if (column == null || value == null) {
          column = column(c[1]);
          value = literal(c[0]);
        }
        if (column == null || value == null) {
          return null;
        }
        return value.equals("None")
            ? column + " is None"
            : "(" + column + " is not None and " + column + " == " + value + ")";
      }
      default: {
        if (!COMPARE.containsKey(p.name()) || c.length != 2) {
          return null;
        }
        String op = p.name();
        String column = column(c[0]);
        String value = literal(c[1]);
        if (column == null || value == null) {
          column = column(c[1]);
          value = literal(c[0]);
          op = FLIPPED.get(op);
        }
        if (column == null || value == null || value.equals("None")) {
          return null;
        }
        return column + " " + COMPARE.get(op) + " " + value;
      }
    }
  }

  private String column(Expression e) {
    if (!(e instanceof NamedReference ref) || ref.fieldNames().length != 1) {
      return null;
    }
    Field f = columns.get(ref.fieldNames()[0]);
    if (f == null || f.getDictionary() != null || !pushable(f.getType())) {
      return null;
    }
    return "col(" + quote(f.getName()) + ")";
  }

  private static boolean pushable(ArrowType t) {
    return switch (t.getTypeID()) {
      case Int -> ((ArrowType.Int) t).getBitWidth() < 64 || ((ArrowType.Int) t).getIsSigned();
      case Utf8, LargeUtf8, Bool -> true;
      default -> false;
    };
  }

  private static String literal(Expression e) {
    if (!(e instanceof Literal<?> lit)) {
      return null;
    }
    Object v = lit.value();
    DataType t = lit.dataType();
    if (v == null) {
      return "None";
    }
    if (t instanceof ByteType || t instanceof ShortType || t instanceof IntegerType || t instanceof LongType) {
      return v.toString();
    }
    if (t instanceof BooleanType) {
      return ((Boolean) v) ? "True" : "False";
    }
    if (t instanceof StringType) {
      return quote(v.toString());
    }
    return null;
  }

  /** A Python string literal with exactly the characters of {@code s}. */
  static String quote(String s) {
    StringBuilder b = new StringBuilder("'");
    s.codePoints()
        .forEach(
            cp -> {
              if (cp == '\\' || cp == '\'') {
                b.append('\\').appendCodePoint(cp);
              } else if (cp >= 0x20 && cp < 0x7f) {
                b.appendCodePoint(cp);
              } else if (cp <= 0xffff) {
                b.append(String.format("\\u%04x", cp));
              } else {
                b.append(String.format("\\U%08x", cp));
              }
            });
    return b.append('\'').toString();
  }
}
