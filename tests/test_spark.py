"""The Spark data source ``flightcache``: reads, writes, filters and types through a local Spark session."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import ROOT, RecordingServer, every_type_table, logs_table

pytest.importorskip("pyspark")

from pyspark import cloudpickle
from pyspark.errors import PySparkException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T
from pyspark.sql.datasource import (
    EqualNullSafe,
    EqualTo,
    Filter,
    GreaterThan,
    In,
    IsNotNull,
    IsNull,
    LessThanOrEqual,
    Not,
    StringContains,
    StringEndsWith,
    StringStartsWith,
)

import flightcache
import flightcache.integrations.spark as fs
from flightcache.protocol import Ticket
from flightcache.server.config import ServerConfig, build_server
from flightcache.server.flight import FlightcacheServer

# Until pyproject.toml carries it: pyspark warns on every pandas/Arrow UDF (mapInArrow here) with pandas >= 3.


# -- helpers -----------------------------------------------------------------------------------------


@pytest.fixture
def recording() -> Iterator[RecordingServer]:
    srv = build_server(ServerConfig(), RecordingServer)
    yield srv
    srv.shutdown()


def _uri(server: FlightcacheServer) -> str:
    return f"grpc://127.0.0.1:{server.port}"


def _read(spark: SparkSession, uri: str, name: str, **options: str) -> DataFrame:
    return spark.read.format(fs.FORMAT).option("uri", uri).options(**options).load(name)


def _write(df: DataFrame, uri: str, name: str, mode: str = "overwrite", **options: str) -> None:
    df.write.format(fs.FORMAT).option("uri", uri).options(**options).mode(mode).save(name)


def _settled(server: FlightcacheServer, timeout: float = 15) -> dict[str, Any]:
    """Server stats once no staged data and no transaction is left (the server aborts a cut stream async)."""
    deadline = time.monotonic() + timeout
    stats = server.stats()
    while (stats["memory_staged"] or stats["open_transactions"]) and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = server.stats()
    return stats


def _pushed_expression(ticket: Ticket) -> str:
    assert ticket.filter_substrait is not None
    return str(pc.Expression.from_substrait(base64.b64decode(ticket.filter_substrait)))


# -- packaging ---------------------------------------------------------------------------------------


def test_pyspark_is_imported_only_by_flightcache_spark() -> None:
    """`import flightcache` never loads pyspark; without pyspark, flightcache.integrations.spark names the pip extra."""
    code = textwrap.dedent("""
        import sys
        import flightcache
        assert "pyspark" not in sys.modules, "import flightcache imported pyspark"
        sys.modules["pyspark"] = None  # as if it were not installed
        try:
            import flightcache.integrations.spark
        except flightcache.NotInstalledError as e:
            print(e)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pip install 'flightcache[spark]'" in done.stdout


# -- types (no Spark session) --------------------------------------------------------------------------


def test_arrow_types_map_to_the_spark_types_that_hold_them() -> None:
    """Arrow types Spark lacks widen losslessly; a decimal too wide for Spark is refused by column name."""
    table = every_type_table()
    with pytest.raises(flightcache.SchemaMismatchError, match=r"'decimal256'.*38 digits"):
        fs.spark_schema(table.schema)
    schema = fs.spark_schema(table.drop_columns(["decimal256"]).schema)
    types = {f.name: f.dataType for f in schema}
    assert types["uint64"] == T.DecimalType(20, 0)
    assert types["large_string"] == types["dictionary"] == T.StringType()
    assert types["fixed_binary"] == types["large_binary"] == T.BinaryType()
    assert types["ts_us_zone"] == types["ts_ns_utc"] == T.TimestampType()
    assert types["ts_ms_naive"] == T.TimestampNTZType()
    assert types["duration"] == T.DayTimeIntervalType()
    assert types["fixed_list"] == T.ArrayType(T.DoubleType())
    assert types["list_of_dict"] == types["large_list"] == T.ArrayType(T.StringType())
    assert types["map"] == T.MapType(T.StringType(), T.LongType())
    assert types["nested"] == T.ArrayType(T.StructType([T.StructField("k", T.ArrayType(T.ShortType()))]))
    # Spark's own Arrow schema comes back unchanged: what Spark writes, Spark reads as written
    spark_written = fs.arrow_schema(
        T.StructType(
            [
                T.StructField("a", T.IntegerType(), nullable=False),
                T.StructField("m", T.MapType(T.StringType(), T.ArrayType(T.TimestampType()))),
            ]
        )
    )
    assert fs.arrow_schema(fs.spark_schema(spark_written)).equals(spark_written)


# -- filters (no Spark session) --------------------------------------------------------------------------

UTC = dt.UTC
FILTER_TABLE = pa.table(
    {
        "id": pa.array([0, 1, 2, 3], pa.int64()),
        "i": pa.array([1, 2, 3, None], pa.int32()),
        "s": pa.array(["ab", "abc", None, "xbc"]),
        "ls": pa.array(["ab", "abc", None, "xbc"], pa.large_string()),
        "ts": pa.array(
            [dt.datetime(2026, 1, d, tzinfo=UTC) for d in (1, 2)] + [None, dt.datetime(2026, 1, 3, tzinfo=UTC)],
            pa.timestamp("us", tz="UTC"),
        ),
        "ts_zone": pa.array([dt.datetime(2026, 1, 1, tzinfo=UTC)] * 4, pa.timestamp("us", tz="Asia/Kolkata")),
        "d": pa.array([dt.date(2026, 1, 1), None, dt.date(2026, 1, 3), dt.date(2026, 1, 4)]),
        "dec": pa.array(
            [decimal.Decimal("1.50"), decimal.Decimal("2.25"), None, decimal.Decimal(-1)], pa.decimal128(10, 2)
        ),
        "st": pa.array([{"x": 1}, {"x": None}, None, {"x": 4}], pa.struct([("x", pa.int32())])),
        "b": pa.array([True, False, None, True]),
        "f": pa.array([1.0, float("nan"), None, 3.0]),
        "dic": pa.array(["p", "q", None, "p"]).dictionary_encode(),
    }
)


@pytest.mark.parametrize(
    ("spark_filter", "rows"),
    [
        (EqualTo(("i",), 2), [1]),
        (Not(EqualTo(("i",), 2)), [0, 2]),  # NULL stays out, as in SQL
        (GreaterThan(("i",), 1), [1, 2]),
        (LessThanOrEqual(("i",), 2), [0, 1]),
        (EqualNullSafe(("i",), 2), [1]),
        (Not(EqualNullSafe(("i",), 2)), [0, 2, 3]),
        (EqualNullSafe(("i",), None), [3]),
        (In(("i",), (1, 3)), [0, 2]),
        (Not(In(("i",), (1, 3))), [1]),  # NULL NOT IN (...) is NULL, not true
        (In(("i",), (1, None)), [0]),
        (Not(In(("i",), (1, None))), []),  # x NOT IN (1, NULL) is never true
        (IsNull(("i",)), [3]),
        (IsNotNull(("i",)), [0, 1, 2]),
        (StringStartsWith(("s",), "ab"), [0, 1]),
        (StringEndsWith(("s",), "bc"), [1, 3]),
        (StringContains(("s",), "b"), [0, 1, 3]),
        (Not(StringContains(("s",), "c")), [0]),
        (GreaterThan(("ts",), dt.datetime(2026, 1, 1, tzinfo=UTC)), [1, 3]),
        (EqualTo(("d",), dt.date(2026, 1, 3)), [2]),
        (GreaterThan(("dec",), decimal.Decimal("1.50")), [1]),
        (EqualTo(("st", "x"), 4), [3]),
        (EqualTo(("b",), True), [0, 3]),
        (Not(EqualTo(("b",), True)), [1]),
        (IsNull(("f",)), [2]),
        (EqualTo(("ls",), "abc"), [1]),
    ],
    ids=repr,
)
def test_filters_become_exact_arrow_expressions(spark_filter: Filter, rows: list[int]) -> None:
    """Each filter Spark offers keeps its SQL meaning, NULLs included, after the trip as Substrait."""
    expression = fs._to_expression(spark_filter, FILTER_TABLE.schema)
    assert expression is not None and fs._servable(expression, FILTER_TABLE.schema)
    served = pc.Expression.from_substrait(expression.to_substrait(FILTER_TABLE.schema))
    assert FILTER_TABLE.filter(served)["id"].to_pylist() == rows


@pytest.mark.parametrize(
    "spark_filter",
    [
        GreaterThan(("f",), 1.0),  # Spark orders NaN above all numbers; Arrow comparisons do not
        EqualTo(("f",), float("nan")),
        EqualTo(("dic",), "p"),  # Substrait cannot carry the cast a dictionary column needs
        StringStartsWith(("ls",), "ab"),  # Substrait knows starts_with on string only
        GreaterThan(("ts_zone",), dt.datetime(2026, 1, 1, tzinfo=UTC)),  # Substrait drops the zone name
        EqualTo(("nope",), 1),
        EqualTo(("i",), "x"),
        EqualTo(("i",), 2**40),
        EqualTo(("st", "x", "y"), 1),
        In(("i",), (None,)),
        StringStartsWith(("i",), "1"),
    ],
    ids=repr,
)
def test_filters_without_an_exact_arrow_meaning_are_left_to_spark(spark_filter: Filter) -> None:
    """Filters Arrow cannot evaluate exactly as Spark would are not pushed."""
    expression = fs._to_expression(spark_filter, FILTER_TABLE.schema)
    assert expression is None or not fs._servable(expression, FILTER_TABLE.schema)


def test_pushdown_reader_plans_filtered_endpoints_and_pickles(client: flightcache.Client, uri: str) -> None:
    """pushFilters keeps what it can, returns the rest by reference; the reader pickles and reads the filtered rows."""
    client.put("filters", FILTER_TABLE)
    options = fs._Options(uri, "filters", pushdown=True)
    schema = fs.spark_schema(FILTER_TABLE.schema)
    reader = fs.FlightcacheDataSource({"uri": uri, "path": "filters", "pushdown": "true"}).reader(schema)
    assert isinstance(reader, fs._PushdownReader) and reader.options == options
    floats, ints = GreaterThan(("f",), 1.0), GreaterThan(("i",), 1)
    rest = list(reader.pushFilters([floats, ints, IsNotNull(("s",))]))
    assert len(rest) == 1 and rest[0] is floats
    reader = pickle.loads(cloudpickle.dumps(reader))  # as Spark ships it to the executors
    partitions = reader.partitions()
    assert [Ticket.from_bytes(p.ticket).filter_substrait is not None for p in partitions] == [True]
    batches = [b for p in partitions for b in reader.read(p)]
    assert pa.Table.from_batches(batches)["id"].to_pylist() == [1]
    assert batches[0].schema.equals(fs.arrow_schema(schema))  # string, not large_string; UTC timestamps


def _batches(*values: int) -> Iterator[pa.RecordBatch]:
    return iter([pa.record_batch([pa.array([v], pa.int64())], names=["id"]) for v in values])


ID_SCHEMA = T.StructType([T.StructField("id", T.LongType())])


def test_writer_commits_exactly_the_parts_of_reported_attempts(
    client: flightcache.Client, server: FlightcacheServer, uri: str
) -> None:
    """A part whose task attempt reported no message (a retried attempt, say) is not published."""
    source = fs.FlightcacheDataSource({"uri": uri, "path": "parts"})
    writer = pickle.loads(cloudpickle.dumps(source.writer(ID_SCHEMA, overwrite=True)))  # as Spark ships it
    first, lost, second, empty = (
        writer.write(_batches(1, 2)),
        writer.write(_batches(99)),
        writer.write(_batches(3)),
        writer.write(iter([])),
    )
    assert empty == fs._Part(None)
    assert server.stats()["open_transactions"] == 1
    writer.commit([first, second, empty])
    assert client.get("parts")["id"].to_pylist() == [1, 2, 3]
    assert lost not in (first, second) and _settled(server)["memory_staged"] == 0

    aborted = source.writer(ID_SCHEMA, overwrite=False)
    aborted.write(_batches(7))
    aborted.abort([None])
    assert _settled(server)["open_transactions"] == 0 and client.info("parts")["version"] == 1


@pytest.mark.parametrize("if_exists", ["error", "ignore"])
def test_if_exists_holds_when_the_dataset_appears_after_planning(
    client: flightcache.Client, server: FlightcacheServer, uri: str, if_exists: str
) -> None:
    """The server's create mode refuses a dataset created between planning and commit: error fails, ignore skips."""
    writer = fs.FlightcacheDataSource({"uri": uri, "path": "raced", "if_exists": if_exists}).writer(ID_SCHEMA, True)
    early = writer.write(_batches(1))
    client.put("raced", pa.table({"id": pa.array([-1], pa.int64())}))  # another writer wins the race
    if if_exists == "error":
        with pytest.raises(flightcache.DatasetExistsError, match="'raced'"):
            writer.commit([early])
    else:
        assert writer.write(_batches(2)) == fs._Part(None, exists=True)
        writer.commit([early])
    assert client.get("raced")["id"].to_pylist() == [-1]
    assert _settled(server)["open_transactions"] == 0


# -- reading through Spark ---------------------------------------------------------------------------------


@pytest.mark.spark
def test_read_has_one_partition_per_endpoint(spark: SparkSession) -> None:
    """A dataset of several Flight endpoints is read as that many Spark partitions, all rows intact."""
    srv = build_server(ServerConfig(batch_rows=10_000, endpoint_bytes=256 * 1024))
    try:
        client = flightcache.connect(_uri(srv))
        table = pa.table({"id": pa.array(range(100_000), pa.int64()), "x": pc.multiply(pa.array(range(100_000)), 0.5)})
        client.put("big", table)
        endpoints = len(client.flight_info("big").endpoints)
        assert endpoints > 4
        df = _read(spark, _uri(srv), "big")
        assert df.rdd.getNumPartitions() == endpoints
        assert df.toArrow().sort_by("id").equals(table)
    finally:
        srv.shutdown()


@pytest.mark.spark
def test_a_small_dataset_is_read_in_as_many_partitions_as_spark_has_cores(spark: SparkSession) -> None:
    """Far below one endpoint's bytes, a read is still split to the session's default parallelism (as Spark's
    file sources do), or to the partitions option, as far as the dataset's batches allow."""
    srv = build_server(ServerConfig(batch_rows=1000))
    try:
        uri = _uri(srv)
        client = flightcache.connect(uri)
        table = logs_table(6000)
        client.put("small", table)
        assert len(client.flight_info("small").endpoints) == 1
        df = _read(spark, uri, "small")
        assert df.rdd.getNumPartitions() == spark.sparkContext.defaultParallelism == 2
        assert df.toArrow().sort_by("ts").equals(table.sort_by("ts"))
        assert _read(spark, uri, "small", partitions="4").rdd.getNumPartitions() == 4
        assert _read(spark, uri, "small", partitions="100").rdd.getNumPartitions() == 6  # one per batch
        with pytest.raises(PySparkException, match="option partitions='none' for dataset 'small'"):
            _read(spark, uri, "small", partitions="none").count()
    finally:
        srv.shutdown()


@pytest.mark.spark
def test_columns_schema_and_filter_options_are_applied_by_the_server(
    spark: SparkSession, recording: RecordingServer
) -> None:
    """The options columns and filter, and a schema given to the reader, reach the server in the tickets."""
    uri = _uri(recording)
    table = logs_table(2000)
    flightcache.connect(uri).put("logs", table)

    df = _read(spark, uri, "logs", columns="status, method", filter="status >= 500")
    assert df.columns == ["status", "method"]
    rows = df.collect()
    (ticket,) = recording.take_tickets()
    assert ticket.columns == ["status", "method"] and ticket.filter == "status >= 500"
    expected = table.filter(pc.field("status") >= 500)
    assert len(rows) == expected.num_rows > 0
    assert sorted(r.method for r in rows) == sorted(expected["method"].to_pylist())

    # the DataFrame is the filtered dataset: a later query of it cannot lose or regain rows
    assert df.where("method = 'GET'").count() + df.where("method <> 'GET'").count() == df.count() == len(rows)
    recording.take_tickets()

    narrow = spark.read.format(fs.FORMAT).schema("bytes BIGINT, status INT").option("uri", uri).load("logs")
    assert narrow.toArrow().equals(table.select(["bytes", "status"]))
    assert {tuple(t.columns or ()) for t in recording.take_tickets()} == {("bytes", "status")}


@pytest.mark.spark
def test_pushdown_sends_exact_filters_and_leaves_the_rest_to_spark(
    spark: SparkSession, recording: RecordingServer
) -> None:
    """With pushdown on, exact filters run on the server; the results equal Spark's own evaluation."""
    uri = _uri(recording)
    table = logs_table(3000).append_column("code", pa.array([None if i % 7 == 0 else i % 5 for i in range(3000)]))
    flightcache.connect(uri).put("logs", table)
    pushed = _read(spark, uri, "logs", pushdown="true")
    plain = spark.createDataFrame(table)
    for condition in [
        "status >= 500 and method in ('GET', 'POST') and latency_ms > 100",
        "code not in (1, 2)",  # NULL codes must stay out
        "not (method = 'GET') and ts < timestamp'2026-11-24 00:20:00'",
    ]:
        got = pushed.where(condition).select("bytes").collect()
        (ticket,) = recording.take_tickets()
        assert "latency_ms" not in _pushed_expression(ticket)  # a float filter: Spark applies it
        assert sorted(got) == sorted(plain.where(condition).select("bytes").collect()), condition
        assert 0 < len(got) < table.num_rows


@pytest.mark.spark
def test_pyspark_replays_pushed_reads_so_pushdown_stays_opt_in(spark: SparkSession, client: flightcache.Client) -> None:
    """Canary: pyspark 4.3 replays a pushed-down read for a later filterless query of the same DataFrame.

    This is why pushdown is off by default. When this test fails, pyspark scopes the read to the
    scan (as Spark's master branch does): make pushdown the default and drop this test.
    """
    client.put("logs", logs_table(1000))
    safe = _read(spark, client.uri, "logs")
    assert safe.where("status = 500").count() < safe.count() == 1000
    leaky = _read(spark, client.uri, "logs", pushdown="true")
    fewer = leaky.where("status = 500").count()
    assert leaky.count() == fewer < 1000


@pytest.mark.spark
def test_read_errors_name_the_dataset_and_the_server(spark: SparkSession, uri: str) -> None:
    """A missing dataset or an unreachable server fails the load with the dataset, the uri and the fix."""
    with pytest.raises(PySparkException) as missing:
        _read(spark, uri, "missing/one")
    assert "dataset 'missing/one' not found" in str(missing.value) and uri in str(missing.value)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"grpc://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(PySparkException) as unreachable:
        _read(spark, closed, "logs/raw")
    message = str(unreachable.value)
    assert "ServerUnavailableError" in message and "'logs/raw'" in message and closed in message
    assert "flightcache serve" in message

    with pytest.raises(PySparkException, match=r"unknown option.*'colums'"):
        _read(spark, uri, "logs/raw", colums="a")


@pytest.mark.spark
def test_uri_defaults_to_flightcache_uri_of_the_driver(
    spark: SparkSession, client: flightcache.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLIGHTCACHE_URI set in the driver after the session started is the default uri; register is idempotent."""
    client.put("logs", logs_table(10))
    monkeypatch.setenv("FLIGHTCACHE_URI", client.uri)
    try:
        fs.register(spark)
        assert spark.read.format(fs.FORMAT).load("logs").count() == 10
    finally:
        spark.sparkContext.environment.pop("FLIGHTCACHE_URI", None)
        monkeypatch.delenv("FLIGHTCACHE_URI")
        fs.register(spark)


# -- writing through Spark ---------------------------------------------------------------------------------


@pytest.mark.spark
def test_write_overwrite_append_and_empty_publish_one_version_per_job(
    spark: SparkSession, client: flightcache.Client, server: FlightcacheServer
) -> None:
    """Each job publishes all its tasks' parts as one version; append adds; an empty job keeps the schema."""
    df = spark.range(0, 1000, numPartitions=4).selectExpr("id", "cast(id % 10 as int) AS k", "uuid() AS u")
    _write(df, client.uri, "out", "overwrite")
    info = client.info("out")
    assert (info["version"], info["rows"]) == (1, 1000)
    assert server.stats()["puts"] == 4  # four tasks, four staged parts, one version
    _write(df, client.uri, "out", "append")
    assert (client.info("out")["version"], client.info("out")["rows"]) == (2, 2000)
    assert sorted(client.get("out")["id"].to_pylist()) == sorted(list(range(1000)) * 2)

    _write(df.limit(10), client.uri, "out", "overwrite")
    assert (client.info("out")["version"], client.info("out")["rows"]) == (3, 10)
    _write(df.where("false"), client.uri, "out", "overwrite")
    empty = client.get("out")
    assert client.info("out")["version"] == 4 and empty.num_rows == 0
    assert empty.schema.equals(fs.arrow_schema(df.schema))
    stats = _settled(server)
    assert stats["open_transactions"] == 0 and stats["memory_staged"] == 0


@pytest.mark.spark
def test_if_exists_error_and_ignore(spark: SparkSession, client: flightcache.Client) -> None:
    """if_exists=error refuses an existing dataset; ignore leaves it as it is; both create a new one."""
    df = spark.range(5)
    _write(df, client.uri, "made", "append", if_exists="error")
    assert client.info("made")["rows"] == 5
    with pytest.raises(PySparkException, match="dataset 'made' already exists"):
        _write(spark.range(7), client.uri, "made", "overwrite", if_exists="error")
    _write(spark.range(7), client.uri, "made", "overwrite", if_exists="ignore")
    assert (client.info("made")["version"], client.info("made")["rows"]) == (1, 5)
    _write(spark.range(7), client.uri, "new", "overwrite", if_exists="ignore")
    assert client.info("new")["rows"] == 7
    with pytest.raises(PySparkException, match="if_exists='sometimes'"):
        _write(df, client.uri, "made", "append", if_exists="sometimes")


@pytest.mark.spark
@pytest.mark.slow
def test_a_task_failing_midway_leaves_the_previous_version(
    spark: SparkSession, client: flightcache.Client, server: FlightcacheServer
) -> None:
    """When one task fails after others staged their parts, nothing is published and nothing stays staged."""
    client.put("victim", pa.table({"id": pa.array([-1, -2], pa.int64())}))
    before = server.stats()
    uri, staged_by_the_others = client.uri, before["puts"] + 2  # a staged part counts as a put

    def fail_midway(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        last, rows = TaskContext.get().partitionId() == 2, 0
        for batch in batches:
            yield batch
            rows += batch.num_rows
            # after two batches of 10,000 rows: more than the worker's 64 KiB output buffer, so that
            # this task's writer has started streaming to the server when the task fails
            if last and rows >= 20_000:
                with flightcache.connect(uri) as fc:  # fail once the other two tasks have staged their parts
                    deadline = time.monotonic() + 120
                    while fc.stats()["puts"] < staged_by_the_others and time.monotonic() < deadline:
                        time.sleep(0.05)
                raise RuntimeError("task failed midway")

    df = spark.range(0, 90_000, numPartitions=3).mapInArrow(fail_midway, "id long")
    with pytest.raises(PySparkException, match="task failed midway"):
        _write(df, client.uri, "victim", "overwrite")

    def streamed() -> int:  # puts that reached the server, ended normally or cut
        stats = server.stats()
        return stats["puts"] + stats["puts_aborted"] - before["puts"] - before["puts_aborted"]

    deadline = time.monotonic() + 30  # the failed task's stream ends when Spark has torn the task down
    while streamed() < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert streamed() == 3
    stats = _settled(server)
    assert stats["open_transactions"] == 0 and stats["memory_staged"] == 0
    assert client.info("victim")["version"] == 1
    assert client.get("victim")["id"].to_pylist() == [-1, -2]


# -- types through Spark -----------------------------------------------------------------------------------

EVERY_SPARK_TYPE = """
    SELECT * FROM VALUES
      (true, 1Y, 2S, 3, 4L, 1.5F, 2.5D, 12345678901234567890.1234567890BD, 'ünïcode', X'00FF',
       DATE'2026-11-24', TIMESTAMP'2026-11-24 12:00:00+05:30', TIMESTAMP_NTZ'2026-11-24 12:00:00',
       TIME'12:34:56.123456', INTERVAL '1 02:03:04.5' DAY TO SECOND, array(1, NULL, 3), array(array('a'), array()),
       map('k', named_struct('x', 1, 'y', array(2.5D))), named_struct('a', 1, 'b', named_struct('c', 'd'))),
      (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)
    AS t(bool, byte, short, int, long, float, double, dec, str, bin, date, ts, ntz, time, interval, arr, nested_arr,
         map, struct)
"""

VARIANT = '{"a":[1,2]}'


@pytest.mark.spark
def test_spark_types_round_trip_to_spark_pandas_and_polars(spark: SparkSession, client: flightcache.Client) -> None:
    """Every Spark type Arrow carries comes back from the cache as it went in, to Spark, pandas and polars."""
    df = spark.sql(EVERY_SPARK_TYPE).selectExpr("*", f"if(int IS NULL, NULL, parse_json('{VARIANT}')) AS variant")
    # written in one session time zone, read in another: timestamps are instants, stored in UTC
    spark.conf.set("spark.sql.session.timeZone", "America/Los_Angeles")
    try:
        _write(df, client.uri, "types", "overwrite")
    finally:
        spark.conf.set("spark.sql.session.timeZone", "UTC")
    back = _read(spark, client.uri, "types")
    assert back.schema == df.schema
    variant_free = [c for c in df.columns if c != "variant"]  # VariantVal has no __eq__: compare its JSON
    assert sorted(back.select(variant_free).collect(), key=str) == sorted(df.select(variant_free).collect(), key=str)
    assert back.selectExpr("to_json(variant) AS j").collect() == [(VARIANT,), (None,)]

    stored = client.get("types")
    assert stored.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    noon_ist = dt.datetime(2026, 11, 24, 6, 30, tzinfo=UTC)
    assert stored["ts"][0].as_py() == noon_ist and stored["ntz"][0].as_py() == dt.datetime(2026, 11, 24, 12)

    pdf = client.to_pandas("types")
    assert pdf["ts"][0] == noon_ist and str(pdf["ts"].dtype) == "datetime64[us, UTC]"
    assert pdf["dec"][0] == decimal.Decimal("12345678901234567890.1234567890")
    assert pdf["map"][0] == [("k", {"x": 1, "y": [2.5]})] and pdf["struct"][0] == {"a": 1, "b": {"c": "d"}}
    assert pdf["bin"][0] == b"\x00\xff" and pdf["interval"][0] == dt.timedelta(days=1, seconds=7384.5)
    assert pdf["time"][0] == dt.time(12, 34, 56, 123456)

    pl = client.to_polars("types")
    assert str(pl.schema["ts"]) == "Datetime(time_unit='us', time_zone='UTC')"
    assert pl["arr"][0].to_list() == [1, None, 3] and pl["str"][0] == "ünïcode"
    assert pl.row(1) == (None,) * len(pl.columns)


@pytest.mark.spark
def test_arrow_types_spark_lacks_are_read_widened(spark: SparkSession, client: flightcache.Client) -> None:
    """Data put from pyarrow reads in Spark: unsigned, large, dictionary, zoned, nanosecond, time and null types."""
    table = every_type_table()
    client.put("arrow", table)
    with pytest.raises(PySparkException, match="'decimal256'"):
        _read(spark, client.uri, "arrow")
    df = _read(spark, client.uri, "arrow", columns=",".join(c for c in table.column_names if c != "decimal256"))
    rows = df.collect()
    assert [r.time64 for r in rows] == table["time64"].to_pylist() and {r.null for r in rows} == {None}
    assert [r.uint64 for r in rows] == [0, 2**63, None, 1]
    assert [r.dictionary for r in rows] == ["red", "green", None, "red"]
    assert [r.large_string for r in rows] == table["large_string"].to_pylist()
    assert [r.fixed_list for r in rows] == table["fixed_list"].to_pylist()
    assert [r.list_of_dict for r in rows] == [["p", "q"], None, [], ["p"]]
    utc = df.selectExpr("unix_micros(ts_us_zone) AS us", "unix_micros(ts_ns_utc) AS ns").collect()
    assert utc[0].us == table["ts_us_zone"].cast(pa.int64())[0].as_py()
    assert [r.ns for r in utc] == [0, None, 0, 0]  # nanoseconds truncated to Spark's microseconds


@pytest.mark.spark
def test_arrow_parquet_writes_to_a_local_directory_that_does_not_exist_yet(
    spark: SparkSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipelines' object-storage baseline format (pipelines/arrow_parquet.py, not in the library) also
    writes local paths: it creates the directory (S3 has none)."""
    monkeypatch.syspath_prepend(str(ROOT / "pipelines"))
    import arrow_parquet

    arrow_parquet.register(spark)
    dest = tmp_path / "new" / "dir"
    spark.range(10).write.format("arrow-parquet").mode("overwrite").save(str(dest))
    assert sorted(r.id for r in spark.read.format("arrow-parquet").load(str(dest)).collect()) == list(range(10))
    empty = tmp_path / "empty"
    spark.range(0).write.format("arrow-parquet").mode("overwrite").save(str(empty))
    df = spark.read.format("arrow-parquet").load(str(empty))
    assert df.count() == 0 and df.columns == ["id"]
