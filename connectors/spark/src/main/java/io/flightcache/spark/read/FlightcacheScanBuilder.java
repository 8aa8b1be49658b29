package io.flightcache.spark.read;

import io.flightcache.spark.Options;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.apache.arrow.vector.types.pojo.Field;
import org.apache.arrow.vector.types.pojo.Schema;
import org.apache.spark.sql.connector.expressions.filter.Predicate;
import org.apache.spark.sql.connector.read.Scan;
import org.apache.spark.sql.connector.read.ScanBuilder;
import org.apache.spark.sql.connector.read.SupportsPushDownRequiredColumns;
import org.apache.spark.sql.connector.read.SupportsPushDownV2Filters;
import org.apache.spark.sql.types.StructField;
import org.apache.spark.sql.types.StructType;

/** Takes the columns a query needs and the predicates the server can apply exactly; says which it took. */
public final class FlightcacheScanBuilder
    implements ScanBuilder, SupportsPushDownRequiredColumns, SupportsPushDownV2Filters {
  private final Options options;
  private final StructType schema;
  private final Map<String, Field> arrowFields = new LinkedHashMap<>();
  private StructType required;
  private Predicate[] pushed = new Predicate[0];
  private String pushedText;

  public FlightcacheScanBuilder(Options options, StructType schema, Schema arrowSchema) {
    this.options = options;
    this.schema = schema;
    this.required = schema;
    if (arrowSchema != null) {
      for (Field f : arrowSchema.getFields()) {
        arrowFields.putIfAbsent(f.getName(), f);
      }
    }
  }

  @Override
  public void pruneColumns(StructType requiredSchema) {
    // The server projects top-level columns: a struct is read whole even if a query uses one field of it.
    List<StructField> kept = new ArrayList<>();
    for (StructField f : schema.fields()) {
      if (requiredSchema.getFieldIndex(f.name()).isDefined()) {
        kept.add(f);
      }
    }
    required = new StructType(kept.toArray(new StructField[0]));
  }

  @Override
  public Predicate[] pushPredicates(Predicate[] predicates) {
    if (!options.pushdown) {
      return predicates;
    }
    FilterTranslator translator = new FilterTranslator(arrowFields);
    List<Predicate> taken = new ArrayList<>();
    List<Predicate> rest = new ArrayList<>();
    List<String> texts = new ArrayList<>();
    for (Predicate p : predicates) {
      String text = translator.translate(p);
      if (text == null) {
        rest.add(p);
      } else {
        taken.add(p);
        texts.add(text);
      }
    }
    pushed = taken.toArray(new Predicate[0]);
    pushedText = texts.isEmpty() ? null : String.join(" and ", texts);
    return rest.toArray(new Predicate[0]);
  }

  @Override
  public Predicate[] pushedPredicates() {
    return pushed.clone();
  }

  @Override
  public Scan build() {
    String filter = options.filter;
    if (pushedText != null) {
      filter = filter == null ? pushedText : "(" + filter + ") and " + pushedText;
    }
    List<String> columns = new ArrayList<>(List.of(required.fieldNames()));
    return new FlightcacheScan(options, required, columns, filter, pushedText);
  }
}
