"""The ``flightcache-python`` format for Spark 4: read and write cached datasets with the Python Data Source API.

The fallback for a PySpark session without the JVM connector's jar (``flightcache.integrations.spark_jvm``), which
is ``format("flightcache")``; the two names never collide.

    import flightcache.integrations.spark
    flightcache.integrations.spark.register(spark)
    logs = spark.read.format("flightcache-python").option("uri", "grpc://cache:8815").load("logs/raw")
    logs.where("status >= 500").write.format("flightcache-python").mode("overwrite").save("logs/errors")

Reading: the schema comes from the server; each Flight endpoint of the dataset becomes one Spark
partition, whose record batches go from ``do_get`` to Spark as they arrive. The options ``columns``
and ``filter`` are applied by the server before it streams. pyspark 4.3 tells a Python reader
nothing about the columns a query uses, so there is no automatic column pruning. Automatic filter
pushdown (``pushFilters``) is opt-in, ``option("pushdown", "true")``: pyspark 4.3 keeps the read
planned with pushed filters on the DataFrame and replays it for later queries of the same DataFrame
that push no filter, which then miss rows (see ``test_spark.py``).

Writing: the writer opens a transaction when Spark plans the job; each task streams its batches to
the server as one staged part; the job's commit publishes exactly the parts of the successful task
attempts as one new version, and a failed job discards them, so readers never see a partial write.
"""

from __future__ import annotations

import atexit
import operator
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight

from ..client import Client, default_shm, default_uri, read_ca
from ..errors import (
    DatasetExistsError,
    DatasetNotFoundError,
    FlightcacheError,
    InvalidRequestError,
    SchemaMismatchError,
    ServerUnavailableError,
    require,
)
from ..filters import parse_filter
from ..names import validate_name
from ..protocol import Ticket, error_from_flight

require("pyspark", "spark")

# After the check above, so that a missing extra is reported with its pip command.
from pyspark.sql.datasource import (  # noqa: E402
    DataSource,
    DataSourceArrowWriter,
    DataSourceReader,
    EqualNullSafe,
    EqualTo,
    Filter,
    GreaterThan,
    GreaterThanOrEqual,
    In,
    InputPartition,
    IsNotNull,
    IsNull,
    LessThan,
    LessThanOrEqual,
    Not,
    StringContains,
    StringEndsWith,
    StringStartsWith,
    WriterCommitMessage,
)
from pyspark.sql.pandas.types import (  # noqa: E402
    from_arrow_metadata,
    from_arrow_type,
    is_geography,
    is_geometry,
    is_variant,
    to_arrow_schema,
)
from pyspark.sql.types import (  # noqa: E402
    ArrayType,
    DataType,
    DateType,
    DecimalType,
    FloatType,
    IntegerType,
    LongType,
    MapType,
    ShortType,
    StructField,
    StructType,
)

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["FORMAT", "FlightcacheDataSource", "arrow_schema", "register", "spark_schema"]

FORMAT = "flightcache-python"  # format("flightcache") is the JVM connector (flightcache.integrations.spark_jvm)
PUSHDOWN_CONF = "spark.sql.python.filterPushdown.enabled"
IF_EXISTS = ("error", "ignore")
# Spark redacts the values of options named like "token" in plans and its UI (spark.redaction.regex).
OPTIONS = (
    "uri",
    "path",
    "columns",
    "filter",
    "pushdown",
    "if_exists",
    "persist",
    "token",
    "tls_ca",
    "shm",
    "partitions",
)
DRIVER_ENV = ("FLIGHTCACHE_URI", "FLIGHTCACHE_TOKEN", "FLIGHTCACHE_TLS_CA")
PARALLELISM_ENV = "FLIGHTCACHE_SPARK_PARALLELISM"  # the session's default parallelism, for the planner
PERSIST = ("none", "sync", "async")


def register(spark: SparkSession) -> None:
    """Make ``format("flightcache-python")`` available in ``spark``; calling it again is harmless.

    The driver's ``FLIGHTCACHE_URI``, ``FLIGHTCACHE_TOKEN`` and ``FLIGHTCACHE_TLS_CA``, if set, become
    the defaults of the ``uri``, ``token`` and ``tls_ca`` options: Spark's Python workers do not see
    variables the driver sets after the session started, so they are handed to them through the
    SparkContext's worker environment. So is the session's default parallelism, the least number of
    partitions a read is split into (as Spark's file sources do), which the planner cannot ask for.
    """
    for var in DRIVER_ENV:
        value = os.environ.get(var)
        if value:
            with suppress(AttributeError):  # Spark Connect has no SparkContext; its server's environment applies
                spark.sparkContext.environment[var] = value
    with suppress(AttributeError):
        spark.sparkContext.environment[PARALLELISM_ENV] = str(spark.sparkContext.defaultParallelism)
    spark.dataSource.register(FlightcacheDataSource)


# -- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    uri: str
    name: str
    columns: list[str] | None = None
    filter: str | None = None
    pushdown: bool = False
    if_exists: str | None = None
    persist: str | None = None
    token: str | None = field(default=None, repr=False)
    tls_ca: bytes | None = field(default=None, repr=False)
    shm: bool = True
    partitions: int = 1

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> _Options:
        unknown = sorted(k for k in options if k.lower() not in OPTIONS)
        if unknown:
            raise InvalidRequestError(
                f"unknown option(s) {unknown} for format {FORMAT!r}; the options are {', '.join(OPTIONS)}"
            )
        name = options.get("path")
        if not name:
            raise InvalidRequestError(
                f"no dataset name: give it to load() or save(), e.g. spark.read.format({FORMAT!r}).load('logs/raw')"
            )
        columns = None
        if options.get("columns"):
            columns = [c.strip() for c in options["columns"].split(",") if c.strip()]
        if_exists = (options.get("if_exists") or "").lower() or None
        if if_exists == "errorifexists":
            if_exists = "error"
        if if_exists is not None and if_exists not in IF_EXISTS:
            raise InvalidRequestError(
                f"option if_exists={options['if_exists']!r} for dataset {name!r}: use 'error' or 'ignore' "
                "(or leave it out to follow the save mode, append or overwrite)"
            )
        pushdown = (options.get("pushdown") or "false").lower()
        shm = (options.get("shm") or str(default_shm())).lower()
        for key, value in (("pushdown", pushdown), ("shm", shm)):
            if value not in ("true", "false"):
                raise InvalidRequestError(f"option {key}={options[key]!r} for dataset {name!r}: use true or false")
        text = options.get("filter") or None
        if text is not None:
            parse_filter(text)  # a syntax error is reported before any job starts
        partitions = options.get("partitions") or os.environ.get(PARALLELISM_ENV) or "1"
        if not partitions.strip().isdigit() or int(partitions) < 1:
            raise InvalidRequestError(
                f"option partitions={partitions!r} for dataset {name!r}: use a whole number, at least 1 "
                "(the least number of partitions to read it in)"
            )
        persist = (options.get("persist") or "").lower() or None
        if persist is not None and persist not in PERSIST:
            raise InvalidRequestError(
                f"option persist={options['persist']!r} for dataset {name!r}: use none, sync or async "
                "(or leave it out for the server's default)"
            )
        return cls(
            options.get("uri") or default_uri(),
            validate_name(name),
            columns,
            text,
            pushdown == "true",
            if_exists,
            persist,
            options.get("token") or os.environ.get("FLIGHTCACHE_TOKEN") or None,
            read_ca(options.get("tls_ca") or os.environ.get("FLIGHTCACHE_TLS_CA") or None),
            shm == "true",
            int(partitions),
        )

    def client(self) -> Client:
        """This process's client for these settings: one per Python worker, reused by its tasks."""
        return _client(self.uri, self.token, self.tls_ca, self.shm)

    @contextmanager
    def context(self, doing: str) -> Iterator[None]:
        """Name the dataset and the server in every flightcache error."""
        try:
            yield
        except flight.FlightError as e:
            raise self._explained(error_from_flight(e, self.uri), doing) from None
        except FlightcacheError as e:
            raise self._explained(e, doing) from None

    def _explained(self, e: Exception, doing: str) -> Exception:
        if isinstance(e, ServerUnavailableError):
            return ServerUnavailableError(
                f"cannot {doing} dataset {self.name!r}: {e}; or set the option 'uri' (default: $FLIGHTCACHE_URI) "
                "to the address of a running server"
            )
        if isinstance(e, FlightcacheError):
            return type(e)(f"cannot {doing} dataset {self.name!r} on the flightcache server at {self.uri}: {e}")
        return e


# One client per process and settings: a client per partition and per task was a connection each, never
# closed. Spark reuses its Python workers (spark.python.worker.reuse), so a worker's tasks share it; a
# forked child makes its own (the key has the pid: a gRPC channel does not survive a fork).
_clients: dict[tuple[int, str, str | None, bytes | None, bool], Client] = {}
_clients_lock = threading.Lock()


def _client(uri: str, token: str | None, tls_ca: bytes | None, shm: bool) -> Client:
    key = (os.getpid(), uri, token, tls_ca, shm)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = Client(uri, token=token, tls_ca=tls_ca, shm=shm)
        return client


@atexit.register
def _close_clients() -> None:
    with _clients_lock:
        clients = [c for key, c in _clients.items() if key[0] == os.getpid()]
        _clients.clear()
    for client in clients:
        client.close()


# -- types -----------------------------------------------------------------------------------------

SPARK_MAX_DECIMAL_DIGITS = 38  # DecimalType.MAX_PRECISION on the JVM side; pyspark does not export it

# Arrow types Spark has no type for, mapped to the narrowest Spark type that holds every value.
_WIDER: dict[pa.DataType, DataType] = {
    pa.uint8(): ShortType(),
    pa.uint16(): IntegerType(),
    pa.uint32(): LongType(),
    pa.uint64(): DecimalType(20, 0),
    pa.float16(): FloatType(),
    pa.date64(): DateType(),
}


def _spark_type(t: pa.DataType, column: str) -> DataType:
    if t in _WIDER:
        return _WIDER[t]
    if pa.types.is_dictionary(t):
        return _spark_type(t.value_type, column)
    if pa.types.is_decimal(t) and t.precision > SPARK_MAX_DECIMAL_DIGITS:
        raise SchemaMismatchError(
            f"column {column!r} has type {t}: Spark decimals hold at most {SPARK_MAX_DECIMAL_DIGITS} digits; "
            "leave it out with the option 'columns'"
        )
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_list_view(t):
        return ArrayType(_spark_type(t.value_type, column), containsNull=t.value_field.nullable)
    if pa.types.is_map(t):
        return MapType(
            _spark_type(t.key_type, column), _spark_type(t.item_type, column), valueContainsNull=t.item_field.nullable
        )
    if pa.types.is_struct(t) and not (is_variant(t) or is_geometry(t) or is_geography(t)):
        return StructType([_spark_field(t.field(i), f"{column}.{t.field(i).name}") for i in range(t.num_fields)])
    try:
        return from_arrow_type(t)
    except Exception as e:  # pyspark raises its own PySparkTypeError here
        raise SchemaMismatchError(f"column {column!r} has type {t}, which Spark cannot hold") from e


def _spark_field(f: pa.Field, column: str) -> StructField:
    return StructField(f.name, _spark_type(f.type, column), f.nullable, from_arrow_metadata(f.metadata))


def spark_schema(schema: pa.Schema) -> StructType:
    """The Spark schema for an Arrow schema; SchemaMismatchError names a column Spark cannot hold."""
    return StructType([_spark_field(f, f.name) for f in schema])


def arrow_schema(schema: StructType) -> pa.Schema:
    """The Arrow schema Spark exchanges with Python for ``schema`` (zoned timestamps in UTC).

    A Python data source must hand Spark batches of exactly this schema (``string``, not
    ``large_string``; ``timestamp[us, tz=UTC]``; the same nullability), else Spark fails the task.
    Writes store this schema too, so that jobs with different session time zones can append to one
    dataset.
    """
    return to_arrow_schema(schema, timezone="UTC")


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` cast to ``schema``, column by column; nanoseconds are truncated as Spark does."""
    if batch.schema.equals(schema):
        return batch
    columns = []
    for f in schema:
        column = batch.column(f.name)
        if column.type != f.type:
            options = pc.CastOptions(f.type, allow_time_truncate=True)
            try:
                column = pc.cast(column, options=options)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SchemaMismatchError(f"column {f.name!r}: cannot cast {column.type} to {f.type} ({e})") from e
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=schema)


# -- filters ---------------------------------------------------------------------------------------

_COMPARE: dict[type[Filter], Callable[[Any, Any], pc.Expression]] = {
    EqualTo: operator.eq,
    GreaterThan: operator.gt,
    GreaterThanOrEqual: operator.ge,
    LessThan: operator.lt,
    LessThanOrEqual: operator.le,
}
_STRING_TESTS: dict[type[Filter], Callable[..., pc.Expression]] = {
    StringStartsWith: pc.starts_with,
    StringEndsWith: pc.ends_with,
    StringContains: pc.match_substring,
}
_NULL = pc.scalar(pa.scalar(None, pa.bool_()))


def _to_expression(f: Filter, schema: pa.Schema) -> pc.Expression | None:
    """The Arrow expression with exactly the SQL meaning of ``f`` over ``schema``, or None if there is none.

    Exactly, nulls included: Spark does not evaluate again the filters a source accepts.
    """
    try:
        return _expression(f, schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError, ArithmeticError):
        return None  # a literal that does not fit the column's type: Spark evaluates it


def _expression(f: Filter, schema: pa.Schema) -> pc.Expression | None:
    if isinstance(f, Not):
        inner = _expression(f.child, schema)
        return None if inner is None else ~inner
    column = _column(schema, getattr(f, "attribute", ()))
    if column is None:
        return None
    ref, t = column
    if isinstance(f, IsNull):
        return ref.is_null()
    if isinstance(f, IsNotNull):
        return ref.is_valid()
    if pa.types.is_floating(t):
        return None  # Spark orders NaN above every number and NaN = NaN; IEEE comparisons do neither
    value = getattr(f, "value", None)  # the filters below have one; Filter, their base, does not
    if type(f) in _STRING_TESTS:
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)) or not isinstance(value, str):
            return None
        return _STRING_TESTS[type(f)](ref, pattern=value)
    if isinstance(f, In):
        values = [v for v in f.value if v is not None]
        if not values:
            return None
        test = ref.isin(pa.array(values, t))
        # SQL IN is NULL for a NULL input, and NULL rather than false when the list holds a NULL;
        # is_in says false. The difference shows under NOT.
        if len(values) < len(f.value):
            return test | _NULL
        return test | (ref.is_null() & _NULL)
    if isinstance(f, EqualNullSafe):
        if f.value is None:
            return ref.is_null()
        return ref.is_valid() & (ref == _literal(f.value, t))
    compare = _COMPARE.get(type(f))
    if compare is None or value is None:
        return None
    return compare(ref, _literal(value, t))


def _column(schema: pa.Schema, path: tuple[str, ...]) -> tuple[pc.Expression, pa.DataType] | None:
    """(field reference, type) of a column or nested struct field, by Spark's attribute path."""
    if not path or schema.get_field_index(path[0]) < 0:
        return None  # missing, or a name that appears twice
    t = schema.field(path[0]).type
    for name in path[1:]:
        if not pa.types.is_struct(t) or t.get_field_index(name) < 0:
            return None
        t = t.field(name).type
    return pc.field(*path), t


def _literal(value: object, t: pa.DataType) -> pc.Expression:
    return pc.scalar(pa.scalar(value, t))


def _servable(expression: pc.Expression, schema: pa.Schema) -> bool:
    """Whether ``expression`` survives the trip as Substrait and runs on ``schema``, as the server runs it.

    Run on one row of nulls: an empty table never binds the expression, and binding is where the
    trip can fail (Substrait keeps no time zone name, so the server sees timestamp[tz=UTC]).
    """
    nullable = pa.schema([f.with_nullable(True) for f in schema])
    try:
        bound = pc.Expression.from_substrait(expression.to_substrait(schema))
        pa.Table.from_arrays([pa.nulls(1, f.type) for f in nullable], schema=nullable).filter(bound)
    except (pa.ArrowException, TypeError, ValueError):
        return False
    return True


# -- the data source -------------------------------------------------------------------------------


class FlightcacheDataSource(DataSource):
    """``spark.read/write.format("flightcache-python")``; options: see ``OPTIONS`` and the README."""

    @classmethod
    def name(cls) -> str:
        return FORMAT

    def schema(self) -> StructType:
        options = _Options.parse(self.options)
        with options.context("read"):
            # The server checks the columns and the filter and answers with the projected schema.
            info = options.client().flight_info(options.name, options.columns, options.filter)
        return spark_schema(info.schema)

    def reader(self, schema: StructType) -> DataSourceReader:
        options = _Options.parse(self.options)
        return _PushdownReader(options, schema) if options.pushdown else _Reader(options, schema)

    def writer(self, schema: StructType, overwrite: bool) -> DataSourceArrowWriter:
        return _Writer(_Options.parse(self.options), schema, overwrite)


class _Endpoint(InputPartition):
    """One Flight endpoint of the read: its ticket pins the dataset version the read was planned on."""

    def __init__(self, index: int, ticket: bytes) -> None:
        self.index = index
        self.ticket = ticket


class _Reader(DataSourceReader):
    def __init__(self, options: _Options, schema: StructType) -> None:
        self.options = options
        self.target = arrow_schema(schema)  # may name fewer columns: spark.read.schema(...) prunes too

    def _filter(self) -> str | pc.Expression | None:
        return self.options.filter

    def partitions(self) -> list[InputPartition]:
        with self.options.context("read"):
            info = self.options.client().flight_info(
                self.options.name, self.target.names, self._filter(), endpoints=self.options.partitions
            )
        return [_Endpoint(i, e.ticket.ticket) for i, e in enumerate(info.endpoints)]

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        assert isinstance(partition, _Endpoint)
        client = self.options.client()
        try:
            with self.options.context("read"):
                batches = _shared_batches(client, partition.ticket)
                if batches is None:
                    batches = client.flight.do_get(flight.Ticket(partition.ticket)).to_reader()
                for batch in batches:
                    if batch.num_rows:
                        yield _conform(batch, self.target)
        except DatasetNotFoundError as e:
            raise DatasetNotFoundError(
                f"{e} (a DataFrame reads the version that was current when its query was planned; "
                "load() it again to read the current one)"
            ) from None


def _shared_batches(client: Client, ticket: bytes) -> list[pa.RecordBatch] | None:
    """The ticket's batches mapped from the server's shared memory, projected and filtered here; None if
    this worker cannot map them (another host, shared memory off)."""
    t = Ticket.from_bytes(ticket)
    shared = client.shared(t.name, t.version)
    if shared is None:
        return None
    try:
        if t.filter is not None:
            expression: pc.Expression | None = parse_filter(t.filter)
        elif t.filter_substrait is not None:
            expression = pc.Expression.from_substrait(t.read_request().substrait_bytes())
        else:
            expression = None
        batches: list[Any] = shared.table(t.columns, expression, (t.start, t.end)).to_batches()
        return batches
    except pa.ArrowException:
        return None  # the server applies it, and words any error


class _PushdownReader(_Reader):
    """A reader that also takes the filters Spark offers, where Arrow has their exact meaning."""

    def __init__(self, options: _Options, schema: StructType) -> None:
        super().__init__(options, schema)
        with options.context("read"):
            self.source = options.client().flight_info(options.name).schema
        self.pushed: pc.Expression | None = None

    def pushFilters(self, filters: list[Filter]) -> Iterable[Filter]:
        rest = []
        for f in filters:
            expression = _to_expression(f, self.source)
            if expression is None or not _servable(expression, self.source):
                rest.append(f)
            else:
                self.pushed = expression if self.pushed is None else self.pushed & expression
        return rest

    def _filter(self) -> str | pc.Expression | None:
        if self.pushed is None:
            return self.options.filter
        if self.options.filter is None:
            return self.pushed
        return parse_filter(self.options.filter) & self.pushed


# -- writing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part(WriterCommitMessage):
    """What a task staged: the part id (None if the task had no rows), or that the dataset exists."""

    part: str | None
    exists: bool = False


class _Writer(DataSourceArrowWriter):
    def __init__(self, options: _Options, schema: StructType, overwrite: bool) -> None:
        self.options = options
        self.schema = arrow_schema(schema)
        self.txn = f"spark-{uuid.uuid4().hex}"
        self.skip = False
        if options.if_exists is None:
            self.mode = "overwrite" if overwrite else "append"
            return
        # The server's create mode makes this race-safe (it checks again at each part and at the
        # commit); checking now saves computing a job whose result cannot be kept.
        self.mode = "create"
        if _exists(options):
            if options.if_exists == "error":
                raise DatasetExistsError(
                    f"dataset {options.name!r} already exists on the flightcache server at {options.uri} "
                    "(option if_exists='error'); drop it, or write with mode append or overwrite"
                )
            self.skip = True

    def write(self, iterator: Iterator[pa.RecordBatch]) -> WriterCommitMessage:
        if self.skip:
            for _ in iterator:  # Spark feeds the task its rows regardless; take them so it ends normally
                pass
            return _Part(None, exists=True)
        first = next(iterator, None)
        if first is None:
            return _Part(None)
        batches = (_conform(b, self.schema) for b in chain([first], iterator))
        reader = pa.RecordBatchReader.from_batches(self.schema, batches)
        try:
            with self.options.context("write"):
                staged = self.options.client().put(self.options.name, reader, self.mode, txn=self.txn)
        except DatasetExistsError:
            if self.options.if_exists == "ignore":
                return _Part(None, exists=True)
            raise
        return _Part(staged["part"])

    def commit(self, messages: list[WriterCommitMessage | None]) -> None:
        client = self.options.client()
        parts = [m for m in messages if isinstance(m, _Part)]
        with self.options.context("write"):
            if self.skip or any(m.exists for m in parts):
                client.abort(self.txn)
                return
            try:
                # Exactly the parts of the successful attempts: a retried task's earlier part is dropped.
                chosen = [m.part for m in parts if m.part is not None]
                client.commit(
                    self.txn,
                    self.options.name,
                    self.mode,
                    parts=chosen,
                    schema=self.schema,
                    persist=self.options.persist,
                )
            except DatasetExistsError:
                if self.options.if_exists != "ignore":
                    raise
                client.abort(self.txn)

    def abort(self, messages: list[WriterCommitMessage | None]) -> None:
        with self.options.context("abort the write of"):
            self.options.client().abort(self.txn)


def _exists(options: _Options) -> bool:
    try:
        with options.context("write"):
            options.client().info(options.name)
    except DatasetNotFoundError:
        return False
    return True
