"""The Flight server and the client against a real server on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pytest
from conftest import both_read_paths, every_type_table, logs_table

import flightcache
from flightcache.errors import (
    ERRORS_BY_CODE,
    DatasetExistsError,
    DatasetNotFoundError,
    FlightcacheError,
    InvalidNameError,
    InvalidRequestError,
    MemoryFullError,
    PutAbortedError,
    SchemaMismatchError,
    ServerUnavailableError,
)
from flightcache.protocol import error_from_flight, error_to_flight
from flightcache.server.config import ServerConfig, build_server
from flightcache.server.flight import FlightcacheServer
from flightcache.server.store import Store

# -- round trips -------------------------------------------------------------------------------


@both_read_paths
def test_every_type_round_trips(client: flightcache.Client) -> None:
    """Nested, dictionary, decimal, zoned timestamps, large strings and binaries come back identical."""
    table = every_type_table()
    if client.shm:  # datasets with dictionaries are never in shared memory (README): they stream
        table = table.drop_columns([f.name for f in table.schema if "dictionary<" in str(f.type)])
    client.put("types", table)
    back = client.get("types")
    assert back.schema.equals(table.schema)
    assert back.equals(table)


@both_read_paths
def test_nan_round_trips(client: flightcache.Client) -> None:
    """NaN, a number and a null come back as they were."""
    table = pa.table({"x": pa.array([float("nan"), 1.0, None])})
    client.put("nan", table)
    back = client.get("nan")["x"]
    assert pc.is_nan(back[0]).as_py() and back[1].as_py() == 1.0 and back[2].as_py() is None


@both_read_paths
def test_empty_and_chunked_tables(client: flightcache.Client) -> None:
    """An empty table keeps its schema; a chunked table keeps its rows in order."""
    empty = logs_table(0)
    client.put("empty", empty)
    back = client.get("empty")
    assert back.num_rows == 0 and back.schema.equals(empty.schema)
    assert client.info("empty")["rows"] == 0
    chunked = pa.concat_tables([logs_table(7, seed=i) for i in range(50)])
    assert chunked.column(0).num_chunks == 50
    client.put("chunked", chunked)
    assert client.get("chunked").equals(chunked)


@both_read_paths
def test_large_binary_values(client: flightcache.Client) -> None:
    """Values of several MiB each, in large types, survive the trip."""
    blob = bytes(range(256)) * 16384  # 4 MiB
    table = pa.table(
        {
            "blob": pa.array([blob, b"", blob[:10]], pa.large_binary()),
            "text": pa.array(["é" * 1_000_000, "", None], pa.large_string()),
        }
    )
    client.put("blobs", table)
    assert client.get("blobs").equals(table)


@both_read_paths
def test_pandas_and_polars_in_and_out(client: flightcache.Client) -> None:
    """DataFrames go in and come out; the pandas index is not stored as a column."""
    import pandas as pd
    import polars as pl

    df = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", None]}, index=[10, 11, 12])
    client.put("pd", df)
    assert client.get("pd").column_names == ["a", "b"]
    assert client.to_pandas("pd")["a"].tolist() == [1, 2, 3]
    pdf = pl.DataFrame({"k": [1, 2], "v": [[1.0], [2.0, 3.0]]})
    client.put("pl", pdf)
    assert client.to_polars("pl").equals(pdf)


@both_read_paths
def test_put_record_batch_reader_and_batch(client: flightcache.Client) -> None:
    """A RecordBatchReader and a single RecordBatch can be put and read back."""
    table = logs_table(1000)
    client.put("r", pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=100)))
    assert client.get("r").equals(table)
    client.put("b", table.to_batches()[0])
    assert client.get("b").num_rows == table.to_batches()[0].num_rows


# -- endpoints, projection, filters --------------------------------------------------------------


def test_large_dataset_has_several_endpoints_read_in_parallel() -> None:
    """get_flight_info splits a large dataset into endpoints; reading them all gives the table back."""
    srv = build_server(ServerConfig(batch_rows=10_000, endpoint_bytes=256 * 1024))
    try:
        c = flightcache.connect(f"grpc://127.0.0.1:{srv.port}", shm=False)  # endpoints are the streaming path's
        table = pa.table({"i": np.arange(300_000), "f": np.random.default_rng(0).random(300_000)})
        c.put("big", table)
        info = c.flight_info("big")
        assert len(info.endpoints) > 4
        assert info.total_records == 300_000 and info.total_bytes == table.nbytes
        assert c.get("big").equals(table)
        # the endpoints partition the rows: each read alone, then concatenated in order
        parts = [c.flight.do_get(e.ticket).read_all() for e in info.endpoints]
        assert sum(p.num_rows for p in parts) == 300_000
        assert pa.concat_tables(parts).equals(table)
        assert list(c.stream("big")) and pa.Table.from_batches(list(c.stream("big"))).equals(table)
    finally:
        srv.shutdown()


def test_a_reader_can_ask_for_at_least_n_endpoints() -> None:
    """ReadRequest.endpoints splits a small dataset as far as its batches allow; the rows stay whole."""
    srv = build_server(ServerConfig(batch_rows=1000))
    try:
        _at_least_n_endpoints(flightcache.connect(f"grpc://127.0.0.1:{srv.port}"))
    finally:
        srv.shutdown()


def _at_least_n_endpoints(client: flightcache.Client) -> None:
    table = logs_table(5000)  # 5 batches of 1000 rows, far below one endpoint's 128 MiB
    client.put("small", table)
    assert len(client.flight_info("small").endpoints) == 1  # by size alone
    for wanted, got in ((2, 2), (3, 3), (5, 5), (50, 5)):
        info = client.flight_info("small", endpoints=wanted)
        assert len(info.endpoints) == got
        parts = [client.flight.do_get(e.ticket).read_all() for e in info.endpoints]
        assert pa.concat_tables(parts).equals(table)
    info = client.flight_info("small", columns=["status"], filter="status >= 500", endpoints=2)
    assert len(info.endpoints) == 2 and info.schema.names == ["status"]
    with pytest.raises(InvalidRequestError, match="endpoints must be at least 1"):
        client.flight_info("small", endpoints=0)
    with pytest.raises(InvalidRequestError, match="wrong type"):
        raw = b'{"v":1,"name":"small","endpoints":"2"}'
        client._call(lambda: client.flight.get_flight_info(flight.FlightDescriptor.for_command(raw)))


@both_read_paths
def test_projection_and_string_filter(client: flightcache.Client) -> None:
    """Columns and a string filter select exactly what pyarrow's filter and select give."""
    table = logs_table(5000)
    client.put("logs", table)
    got = client.get("logs", columns=["status", "method"], filter="status >= 500 and method == 'GET'")
    expected = table.filter((pc.field("status") >= 500) & (pc.field("method") == "GET")).select(["status", "method"])
    assert got.column_names == ["status", "method"]
    assert got.num_rows == expected.num_rows > 0
    assert got.equals(expected)


@both_read_paths
def test_expression_filter_travels_as_substrait(client: flightcache.Client) -> None:
    """A pyarrow expression filter gives what pyarrow's own filter gives."""
    table = logs_table(2000)
    client.put("logs", table)
    expr = pc.field("status").isin([404, 500]) & (pc.field("bytes") > 50_000)
    assert client.get("logs", filter=expr).equals(table.filter(expr))


@both_read_paths
@pytest.mark.parametrize(
    "text",
    [
        "status in (404, 500) or not (bytes < 1000)",
        "method is not None and 0 < latency_ms <= 100",
        "col('status') != 200",
        "bytes > -5 and method not in ['PUT']",
    ],
)
def test_filter_string_forms(client: flightcache.Client, text: str) -> None:
    """The string form matches the equivalent pyarrow expression."""
    from flightcache.filters import parse_filter

    table = logs_table(3000)
    client.put("logs", table)
    assert client.get("logs", filter=text).equals(table.filter(parse_filter(text)))


@both_read_paths
def test_bad_column_and_filter_fail_at_flight_info(client: flightcache.Client) -> None:
    """An unknown column, a bad or unsafe filter, a filter naming no column: clear errors."""
    client.put("logs", logs_table(10))
    with pytest.raises(InvalidRequestError, match="no column"):
        client.get("logs", columns=["nope"])
    with pytest.raises(InvalidRequestError, match="cannot parse filter"):
        client.get("logs", filter="status >")
    with pytest.raises(InvalidRequestError, match="unsupported filter"):
        client.get("logs", filter="__import__('os').system('true')")
    with pytest.raises(InvalidRequestError, match="cannot apply filter"):
        client.get("logs", filter="nope == 1")


# -- snapshots and concurrency ---------------------------------------------------------------------


def test_reader_with_ticket_for_old_version_finishes_it(client: flightcache.Client) -> None:
    """Tickets pin a version: a reader that got the flight info of N reads N after N+1 is published."""
    client.put("snap", pa.table({"v": [1] * 100}))
    info = client.flight_info("snap")
    client.put("snap", pa.table({"v": [2] * 50}))
    old = client.flight.do_get(info.endpoints[0].ticket).read_all()
    assert old["v"].to_pylist() == [1] * 100
    assert client.get("snap")["v"].to_pylist() == [2] * 50


@both_read_paths
def test_concurrent_readers_while_writer_replaces(client: flightcache.Client) -> None:
    """Readers over Flight never see a torn or mixed version while a writer keeps replacing."""
    rows = 50_000
    client.put("hot", pa.table({"v": np.zeros(rows, dtype=np.int64)}))
    errors: list[str] = []
    done = threading.Event()

    def writer() -> None:
        for i in range(1, 25):
            client.put("hot", pa.table({"v": np.full(rows, i, dtype=np.int64)}))
        done.set()

    def reader() -> None:
        c = flightcache.connect(client.uri, shm=client.shm)
        while not done.is_set():
            t = c.get("hot")
            values = pc.unique(t["v"]).to_pylist()
            if t.num_rows != rows or len(values) != 1:
                errors.append(f"{t.num_rows} rows, values {values}")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert client.get("hot")["v"][0].as_py() == 24


PUT_THEN_DIE = textwrap.dedent("""
    import os, sys, pyarrow as pa, pyarrow.flight as flight
    client = flight.connect(sys.argv[1])
    schema = pa.schema([("v", pa.int64())])
    writer, _ = client.do_put(flight.FlightDescriptor.for_path("victim"), schema)
    for _ in range(20):
        writer.write_batch(pa.record_batch([pa.array([2] * 1000)], schema=schema))
    print("sent", flush=True)
    sys.stdin.readline()
    os._exit(9)  # die mid-stream, without closing the writer
""")


def test_client_killed_mid_put_leaves_old_version(client: flightcache.Client, server: FlightcacheServer) -> None:
    """A client process that dies mid-put publishes nothing: the old version stays, memory is freed."""
    client.put("victim", pa.table({"v": pa.array([1] * 10, pa.int64())}))
    with subprocess.Popen(
        [sys.executable, "-c", PUT_THEN_DIE, client.uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "sent"
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 9
    deadline = time.monotonic() + 10
    while server.stats()["puts_aborted"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stats()["puts_aborted"] == 1
    back = client.get("victim")
    assert back["v"].to_pylist() == [1] * 10
    assert client.info("victim")["version"] == 1
    assert server.stats()["memory_staged"] == 0


def test_short_stream_with_announced_rows_is_refused(client: flightcache.Client) -> None:
    """A put that announces N rows and ends early publishes nothing."""
    client.put("short", logs_table(5))
    schema = logs_table(0).schema
    from flightcache.protocol import PutOptions

    writer, _ = client.flight.do_put(flight.FlightDescriptor.for_path("short"), schema)
    with pytest.raises(flight.FlightError) as err:
        writer.write_metadata(PutOptions(expect_rows=100).to_bytes())
        writer.write_table(logs_table(10))
        writer.close()
    assert isinstance(error_from_flight(err.value), PutAbortedError)
    assert client.info("short")["rows"] == 5


# -- a plain pyarrow.flight client -----------------------------------------------------------------


def test_plain_pyarrow_flight_client_reads_and_writes(uri: str) -> None:
    """No flightcache import needed: for_path descriptors, endpoints, app_metadata put options, actions."""
    plain = flight.connect(uri)
    table = logs_table(1000)
    writer, results = plain.do_put(flight.FlightDescriptor.for_path("plain/t"), table.schema)
    writer.write_table(table)
    writer.done_writing()
    answer = json.loads(results.read().to_pybytes())
    writer.close()
    assert answer["rows"] == 1000 and answer["version"] == 1

    writer, _ = plain.do_put(flight.FlightDescriptor.for_path("plain/t"), table.schema)
    writer.write_with_metadata(table.to_batches()[0], b'{"mode": "append"}')
    writer.close()
    info = plain.get_flight_info(flight.FlightDescriptor.for_path("plain/t"))
    assert info.total_records == 1000 + table.to_batches()[0].num_rows
    got = pa.concat_tables([plain.do_get(e.ticket).read_all() for e in info.endpoints])
    assert got.slice(0, 1000).equals(table)

    command = json.dumps({"name": "plain/t2", "mode": "create"}).encode()
    writer, _ = plain.do_put(flight.FlightDescriptor.for_command(command), table.schema)
    writer.write_table(table)
    writer.close()

    names = sorted(f.descriptor.path[0].decode() for f in plain.list_flights())
    assert names == ["plain/t", "plain/t2"]
    actions = {a.type for a in plain.list_actions()}
    assert {"drop", "info", "stats", "list"} <= actions
    info_body = json.loads(next(iter(plain.do_action(flight.Action("info", b"plain/t")))).body.to_pybytes())
    assert info_body["rows"] == info.total_records
    read = json.dumps({"name": "plain/t", "columns": ["status"], "filter": "status == 500"}).encode()
    info = plain.get_flight_info(flight.FlightDescriptor.for_command(read))
    filtered = pa.concat_tables([plain.do_get(e.ticket).read_all() for e in info.endpoints])
    assert filtered.column_names == ["status"] and set(filtered["status"].to_pylist()) == {500}
    list(plain.do_action(flight.Action("drop", b'{"name": "plain/t"}')))
    assert [f.descriptor.path[0].decode() for f in plain.list_flights()] == ["plain/t2"]


# -- bad input: a clear error, and the server keeps serving -------------------------------------------


def _code(err: flight.FlightError) -> str:
    return json.loads(err.extra_info)["code"]


@pytest.mark.parametrize(
    "ticket",
    [
        b"",
        b"garbage",
        b"\xff\xfe",
        b"[]",
        b'{"v": 2}',
        b'{"name": "x"}',
        b'{"name": "x", "version": "1", "start": 0, "end": 1}',
        b'{"name": "x", "version": 1, "start": 0, "end": 1, "evil": 1}',
        b'{"name": "x", "version": true, "start": 0, "end": 1}',
        b"{" * 100_000,
    ],
)
def test_malformed_tickets(uri: str, client: flightcache.Client, ticket: bytes) -> None:
    plain = flight.connect(uri)
    with pytest.raises(flight.FlightServerError) as err:
        plain.do_get(flight.Ticket(ticket)).read_all()
    assert _code(err.value) == "INVALID_REQUEST"
    assert "Traceback" not in str(err.value)
    client.put("alive", logs_table(3))  # still serving
    assert client.get("alive").num_rows == 3


def test_ticket_out_of_range_and_unknown_dataset(uri: str, client: flightcache.Client) -> None:
    client.put("x", logs_table(3))
    plain = flight.connect(uri)
    bad_range = json.dumps({"name": "x", "version": 1, "start": 0, "end": 9}).encode()
    with pytest.raises(flight.FlightServerError, match="batch range"):
        plain.do_get(flight.Ticket(bad_range)).read_all()
    with pytest.raises(flight.FlightServerError, match="dataset 'y' not found") as err:
        plain.get_flight_info(flight.FlightDescriptor.for_path("y"))
    assert _code(err.value) == "DATASET_NOT_FOUND"
    with pytest.raises(DatasetNotFoundError, match="'y'"):
        client.get("y")


@pytest.mark.parametrize(
    "action,body,code",
    [
        ("drop", b'{"name": 3}', "INVALID_REQUEST"),
        ("drop", b'{"nam": "x"}', "INVALID_REQUEST"),
        ("drop", b"{not json", "INVALID_REQUEST"),
        ("info", b"\xff\xfe", "INVALID_REQUEST"),
        ("info", b"../etc/passwd", "INVALID_NAME"),
        ("info", b"missing", "DATASET_NOT_FOUND"),
        ("explode", b"", "INVALID_REQUEST"),
    ],
)
def test_bad_actions(uri: str, action: str, body: bytes, code: str) -> None:
    with pytest.raises(flight.FlightError) as err:
        list(flight.connect(uri).do_action(flight.Action(action, body)))
    assert _code(err.value) == code


@pytest.mark.parametrize("path", [[], [b"a", b"b"], [b"Bad Name"], ["ü\x00".encode()]])
def test_bad_descriptors(uri: str, path: list[bytes]) -> None:
    plain = flight.connect(uri)
    with pytest.raises(flight.FlightServerError) as err:
        plain.get_flight_info(flight.FlightDescriptor.for_path(*path))
    assert _code(err.value) in {"INVALID_REQUEST", "INVALID_NAME"}


def test_put_errors_come_back_typed(client: flightcache.Client) -> None:
    client.put("a", logs_table(10), mode="create")
    with pytest.raises(DatasetExistsError):
        client.put("a", logs_table(10), mode="create")
    with pytest.raises(SchemaMismatchError, match="appended schema"):
        client.put("a", logs_table(10).select(["status"]), mode="append")
    with pytest.raises(InvalidNameError):
        client.put("Not Valid", logs_table(1))
    with pytest.raises(InvalidRequestError, match="unknown put mode"):
        client.put("a", logs_table(1), mode="merge")
    with pytest.raises(InvalidRequestError, match="cannot put a dict"):
        client.put("a", {"a": [1]})
    assert client.info("a")["rows"] == 10


def test_memory_full_over_flight() -> None:
    """A put over the limit is refused with the limit in the message; existing data stays."""
    srv = build_server(ServerConfig(memory_limit=2_000_000))
    try:
        c = flightcache.connect(f"grpc://127.0.0.1:{srv.port}")
        c.put("small", pa.table({"x": np.arange(100_000)}))
        with pytest.raises(MemoryFullError, match=r"memory full.*'big'.*limit"):
            c.put("big", pa.table({"x": np.arange(1_000_000)}))
        assert [d["name"] for d in c.list()] == ["small"]
        assert c.stats()["memory_staged"] == 0
    finally:
        srv.shutdown()


def test_unreachable_server_is_a_clear_error() -> None:
    c = flightcache.connect("grpc://127.0.0.1:1", timeout=5)
    with pytest.raises(ServerUnavailableError, match=r"grpc://127\.0\.0\.1:1.*flightcache serve"):
        c.list()


@pytest.mark.parametrize("cls", [c for c in ERRORS_BY_CODE.values() if c is not FlightcacheError])
def test_every_error_class_round_trips(cls: type[FlightcacheError]) -> None:
    """server exception -> Flight error -> the same client exception, message intact."""
    err = error_to_flight(cls("dataset 'x': something went wrong"))
    back = error_from_flight(err)
    assert type(back) is cls
    assert str(back) == "dataset 'x': something went wrong"


def test_client_pickles_as_settings_and_reconnects(client: flightcache.Client) -> None:
    import pickle

    client.put("p", logs_table(3))
    clone = pickle.loads(pickle.dumps(client))
    assert clone.uri == client.uri and clone._conn is None
    assert clone.get("p").num_rows == 3


def test_server_imports_neither_duckdb_nor_pandas_until_needed() -> None:
    """A memory-only server stays small: DuckDB, pyarrow.dataset (which brings pandas), Parquet,
    filesystems, compute kernels and protobuf load on first use, not for puts and unfiltered gets."""
    modules = ("duckdb", "pandas", "pyarrow.dataset", "pyarrow.parquet", "pyarrow.fs", "pyarrow.compute",
               "pyarrow._compute", "google.protobuf")
    code = (
        "import sys, flightcache.cli, flightcache.server.config as s;"
        "srv = s.build_server(s.ServerConfig(shm='off')); print(srv.port, flush=True);"
        "sys.stdin.readline();"  # the test's put and gets happen meanwhile
        f"print(sorted(m for m in {modules!r} if m in sys.modules), flush=True); srv.shutdown()"
    )
    server = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdin is not None
        with flightcache.connect(f"grpc://127.0.0.1:{server.stdout.readline().strip()}", shm=False) as fc:
            fc.put("t", logs_table(100))
            assert fc.get("t").num_rows == 100
            assert fc.get("t", columns=["status"]).num_columns == 1
        out, _ = server.communicate("\n", timeout=60)
    finally:
        server.kill()
    assert out.strip() == "[]"


def test_bytes_served_are_what_was_streamed(uri: str) -> None:
    """bytes_served counts the bytes a read streamed: all of them, the projected columns, the filtered rows."""
    with flightcache.connect(uri, shm=False) as fc:
        fc.put("b", logs_table(1000))

        def served() -> int:
            return int(fc.stats()["per_dataset"]["b"]["bytes_served"])

        full = fc.get("b")
        assert served() == full.nbytes
        fc.get("b", columns=["status"])
        assert served() == full.nbytes + full.select(["status"]).nbytes
        before = served()
        errors = fc.get("b", filter="status >= 500")
        assert 0 < errors.num_rows < 1000 and served() == before + errors.nbytes


def test_stats_counts(client: flightcache.Client) -> None:
    client.put("s", logs_table(100))
    client.get("s")
    s = client.stats()
    assert s["datasets"] == 1 and s["puts"] == 1 and s["gets"] >= 1
    assert s["memory_used"] == client.info("s")["bytes"] > 0
    assert s["bytes_served"] > 0 and s["memory_limit"] == 512 * 1024 * 1024
    assert s["process"]["rss"] > 0 and s["process"]["memory_pool"] == pa.default_memory_pool().backend_name


# -- multi-part transactions (the Spark writer's staging area) ----------------------------------------


@both_read_paths
def test_transaction_parts_invisible_until_commit(client: flightcache.Client) -> None:
    """Parts staged under a txn publish together, in the listed order, as one version."""
    client.put("out", logs_table(3))
    parts = [client.put("out", logs_table(100, seed=i), txn="job-1")["part"] for i in range(3)]
    assert client.info("out")["rows"] == 3  # nothing visible yet
    assert client.stats()["open_transactions"] == 1
    result = client.commit("job-1", "out", parts=[parts[2], parts[0]])  # part 1: a failed attempt
    assert result["rows"] == 200 and result["version"] == 2
    got = client.get("out")
    assert got.equals(pa.concat_tables([logs_table(100, seed=2), logs_table(100, seed=0)]))
    s = client.stats()
    assert s["open_transactions"] == 0 and s["memory_staged"] == 0


def test_transaction_abort_discards_parts(client: flightcache.Client) -> None:
    client.put("out", logs_table(3))
    client.put("out", logs_table(100), txn="job-2")
    assert client.abort("job-2")["parts_discarded"] == 1
    assert client.info("out")["rows"] == 3
    assert client.stats()["memory_staged"] == 0
    with pytest.raises(InvalidRequestError, match="no staged parts"):
        client.commit("job-2", "out", parts=["000000"])


@both_read_paths
def test_empty_transaction_commits_schema(client: flightcache.Client) -> None:
    """A transaction with no parts commits an empty dataset with the given schema."""
    schema = logs_table(0).schema
    client.commit("job-3", "empty", schema=schema)
    assert client.get("empty").schema.equals(schema)


def test_transaction_append_checks_schema_and_mode(client: flightcache.Client) -> None:
    client.put("out", logs_table(3))
    client.put("out", logs_table(5), mode="append", txn="job-4")
    with pytest.raises(SchemaMismatchError):
        client.put("out", logs_table(5).select(["status"]), mode="append", txn="job-4")
    with pytest.raises(InvalidRequestError, match="mode"):
        client.put("out", logs_table(5), mode="overwrite", txn="job-4")
    assert client.commit("job-4", "out", mode="append")["rows"] == 8


def test_abandoned_transaction_expires() -> None:
    store = Store(txn_timeout=0)
    staged = store.begin_put("a", logs_table(0).schema)
    staged.add(logs_table(10).to_batches()[0])
    staged.stage("t")
    assert store.stats()["open_transactions"] == 0  # stats expires it at once with a zero timeout
    assert store.stats()["memory_staged"] == 0


def _failing_reader(rows_before_failure: int) -> pa.RecordBatchReader:
    table = logs_table(rows_before_failure)

    def batches() -> Iterator[pa.RecordBatch]:
        yield from table.to_batches(max_chunksize=100)
        raise RuntimeError("the source broke")

    return pa.RecordBatchReader.from_batches(table.schema, batches())


@pytest.mark.parametrize("txn", [None, "job-x"])
def test_source_failing_mid_stream_publishes_nothing(client: flightcache.Client, txn: str | None) -> None:
    """A client whose data source raises mid-put closes the stream without its end-of-stream
    message: nothing is published or staged, the old version stays."""
    client.put("src", logs_table(5))
    with pytest.raises(RuntimeError, match="the source broke"):
        client.put("src", _failing_reader(600), txn=txn)
    _wait_until(lambda: client.stats()["puts_aborted"] == 1)
    s = client.stats()
    assert s["open_transactions"] == 0 and s["memory_staged"] == 0
    assert client.info("src")["rows"] == 5


def test_plain_put_without_trailer_still_publishes(uri: str) -> None:
    """The trailer is the flightcache client's opt-in; plain Flight clients need none."""
    plain = flight.connect(uri)
    table = logs_table(10)
    writer, _ = plain.do_put(flight.FlightDescriptor.for_path("plain"), table.schema)
    writer.write_table(table)
    writer.close()
    assert flightcache.connect(uri).info("plain")["rows"] == 10


def test_part_arriving_after_abort_is_refused(client: flightcache.Client) -> None:
    client.put("out", logs_table(3), txn="job-late")
    client.abort("job-late")
    with pytest.raises(PutAbortedError, match="aborted"):
        client.put("out", logs_table(3), txn="job-late")
    assert client.stats()["memory_staged"] == 0


def test_reading_a_retained_version_extends_its_life() -> None:
    clock = {"now": 1000.0}
    store = Store(retain_seconds=30, clock=lambda: clock["now"])
    store.put("a", logs_table(10))
    store.put("a", logs_table(20))
    clock["now"] += 25
    assert store.get("a", version=1).num_rows == 10  # read at +25 s: kept until +55 s
    clock["now"] += 25
    assert store.get("a", version=1).num_rows == 10


def test_filter_that_cannot_bind_fails_at_flight_info(client: flightcache.Client) -> None:
    """A type error in a filter is reported by get_flight_info, before any stream starts."""
    client.put("typed", logs_table(10))
    with pytest.raises(InvalidRequestError, match="cannot apply filter"):
        client.flight_info("typed", filter="method > 5")


def _wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)
