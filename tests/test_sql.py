"""Server-side SQL, Flight SQL (ADBC and flightsql-dbapi clients) and client-side DuckDB, against real servers."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
from conftest import logs_table, run_cli

import flightcache
from flightcache import flightsql as fsql
from flightcache.errors import (
    DatasetExistsError,
    InvalidRequestError,
    NotImplementedByServerError,
    SchemaMismatchError,
    SqlError,
)
from flightcache.protocol import error_from_flight
from flightcache.server.config import ServerConfig, build_server
from flightcache.server.flight import FlightcacheServer
from flightcache.sql.engine import SqlLimits
from flightcache.sql.service import SqlService

SLOW = "SELECT sum(a.range * b.range) FROM range(200000) a, range(200000) b"  # minutes, if left alone

USERS = pa.table(
    {
        "status": pa.array([200, 304, 404, 500], pa.int32()),
        "label": ["ok", "not modified", "missing", "error"],
    }
)


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[tuple[FlightcacheServer, flightcache.Client]]:
    """A server with the given constructor arguments, and a client of it."""
    kwargs.setdefault("memory_limit", 512 * 1024 * 1024)
    srv = build_server(ServerConfig(**kwargs))
    try:
        with flightcache.connect(f"grpc://127.0.0.1:{srv.port}") as c:
            yield srv, c
    finally:
        srv.shutdown()


def service(srv: FlightcacheServer) -> SqlService:
    assert isinstance(srv.sql, SqlService)
    return srv.sql


def wait_idle(srv: FlightcacheServer, within: float = 5.0) -> None:
    """Wait until the server holds no query; fail if one is still running after ``within`` seconds."""
    deadline = time.monotonic() + within
    while service(srv).engine.running():
        assert time.monotonic() < deadline, "a query was still running on the server"
        time.sleep(0.02)


@pytest.fixture
def logs(client: flightcache.Client) -> pa.Table:
    table = logs_table(20_000)
    client.put("logs/raw", table)
    client.put("ref/users", USERS)
    return table


def local(table: pa.Table, query: str, **others: pa.Table) -> pa.Table:
    """The same query in a plain local DuckDB, for comparison."""
    con = duckdb.connect()
    con.register("logs/raw", table)
    for name, t in others.items():
        con.register(name, t)
    return con.sql(query).to_arrow_table()


# -- queries ---------------------------------------------------------------------------------------


def test_aggregation_and_projection_over_a_dataset(client: flightcache.Client, logs: pa.Table) -> None:
    """A GROUP BY over a cached dataset equals the same query in a local DuckDB."""
    query = 'SELECT method, status, count(*) AS n, sum(bytes) AS b FROM "logs/raw" GROUP BY ALL ORDER BY ALL'
    result = client.sql(query)
    assert result.equals(local(logs, query))
    assert result.column_names == ["method", "status", "n", "b"]
    assert sum(result["n"].to_pylist()) == logs.num_rows


def test_join_across_datasets(client: flightcache.Client, logs: pa.Table) -> None:
    """Two datasets join by name, in one query, with a filter."""
    query = (
        'SELECT u.label, count(*) AS n FROM "logs/raw" l JOIN "ref/users" u USING (status) '
        "WHERE l.latency_ms < 100 GROUP BY ALL ORDER BY ALL"
    )
    result = client.sql(query)
    assert result.equals(local(logs, query, **{"ref/users": USERS}))
    assert set(result["label"].to_pylist()) <= set(USERS["label"].to_pylist())


def test_parameters_positional_and_named(client: flightcache.Client, logs: pa.Table) -> None:
    """``?`` takes a list (or tuple), ``$name`` a dict."""
    expected = sum(1 for s in logs["status"].to_pylist() if s == 500)
    q1 = client.sql('SELECT count(*) AS n FROM "logs/raw" WHERE status = ?', (500,))
    q2 = client.sql('SELECT count(*) AS n FROM "logs/raw" WHERE status = $s AND method <> $m', {"s": 500, "m": "x"})
    assert q1["n"][0].as_py() == expected == q2["n"][0].as_py()


def test_script_and_empty_result(client: flightcache.Client, logs: pa.Table) -> None:
    """A script's last statement gives the result; an empty result keeps its schema."""
    result = client.sql('CREATE TEMP TABLE t AS SELECT * FROM "logs/raw" WHERE status = 404; SELECT count(*) n FROM t')
    assert result["n"][0].as_py() == logs["status"].to_pylist().count(404)
    empty = client.sql('SELECT method, bytes FROM "logs/raw" WHERE false')
    assert empty.num_rows == 0 and empty.schema.names == ["method", "bytes"]


def test_only_named_datasets_are_registered(server: FlightcacheServer, client: flightcache.Client) -> None:
    """A query registers the datasets it names, not the others (listed via DuckDB's own catalog)."""
    client.put("a/one", pa.table({"x": [1]}))
    client.put("a/two", pa.table({"x": [2]}))
    views = client.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal AND view_name IN (SELECT 'a/one')")
    assert views["view_name"].to_pylist() == []  # a/one is not named as a table, so not registered
    both = client.sql('SELECT (SELECT x FROM "a/one") + (SELECT x FROM "A/Two") AS s')  # case-insensitive names
    assert both["s"][0].as_py() == 3


def test_reads_a_dataset_only_storage_holds(tmp_path: Path) -> None:
    """A dataset evicted to storage loads on first use by a query."""
    with running(storage=str(tmp_path / "storage")) as (_, c):
        c.put("logs/raw", logs_table(5000), persist="sync")
        c.evict("logs/raw")
        assert c.info("logs/raw")["state"] == "in-storage-only"
        assert c.sql('SELECT count(*) AS n FROM "logs/raw"')["n"][0].as_py() == 5000
        assert c.info("logs/raw")["in_memory"]


def test_result_types_are_plain_arrow(client: flightcache.Client) -> None:
    """Strings stay ``string`` (no views), DuckDB-only types arrive as their plain storage types."""
    result = client.sql(
        "SELECT 'a' AS s, 'b'::BLOB AS b, uuid() AS u, 1::HUGEINT AS h, 123::BIGNUM AS big, [1, 2] AS l, "
        "{'k': 'v'} AS st, now() AS ts"
    )
    types = dict(zip(result.column_names, result.schema.types, strict=True))
    assert types["s"] == pa.string() and types["b"] == pa.binary() and types["u"] == pa.string()
    assert types["big"] == pa.binary() and types["l"] == pa.list_(pa.field("l", pa.int32()))
    assert not any(isinstance(t, pa.BaseExtensionType) for t in result.schema.types)


# -- into= -----------------------------------------------------------------------------------------


def test_into_stores_a_new_dataset(client: flightcache.Client, logs: pa.Table) -> None:
    """``into=`` publishes the result as a dataset that gets, lists and queries like any other."""
    query = 'SELECT status, count(*) AS n FROM "logs/raw" GROUP BY ALL ORDER BY ALL'
    answer = client.sql(query, into="logs/by-status")
    assert answer["name"] == "logs/by-status" and answer["version"] == 1 and answer["rows"] == 4
    assert client.get("logs/by-status").equals(local(logs, query))
    assert client.sql('SELECT sum(n) AS t FROM "logs/by-status"')["t"][0].as_py() == logs.num_rows


def test_into_put_modes(client: flightcache.Client, logs: pa.Table) -> None:
    """append adds rows, create refuses an existing name, a different schema refuses to append."""
    client.sql("SELECT 1 AS x", into="stage/x")
    client.sql("SELECT 2 AS x", into="stage/x", mode="append")
    assert sorted(client.get("stage/x")["x"].to_pylist()) == [1, 2]
    with pytest.raises(DatasetExistsError):
        client.sql("SELECT 3 AS x", into="stage/x", mode="create")
    with pytest.raises(SchemaMismatchError):
        client.sql("SELECT 'a' AS y", into="stage/x", mode="append")
    assert client.info("stage/x")["version"] == 2


def test_into_can_rewrite_the_dataset_it_reads(client: flightcache.Client, logs: pa.Table) -> None:
    """A query reads the version it started on while its result replaces that dataset."""
    client.sql('SELECT * FROM "logs/raw" WHERE status = 500', into="logs/raw")
    assert set(client.get("logs/raw")["status"].to_pylist()) == {500}


def test_into_persists_like_a_put(tmp_path: Path) -> None:
    """``persist="sync"`` writes the result to storage before answering."""
    with running(storage=str(tmp_path / "storage")) as (_, c):
        c.sql("SELECT range AS i FROM range(1000)", into="gen/ints", persist="sync")
        assert c.info("gen/ints")["state"] == "persisted"
        assert list((tmp_path / "storage" / "gen" / "ints").glob("v1-*/manifest.json"))


# -- errors and safety -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "SELEC 1",
        'SELECT nope FROM "logs/raw"',
        'SELECT CAST(method AS INTEGER) FROM "logs/raw"',  # fails while running, not at bind
        "SELECT CASE WHEN range > 700000 THEN error('boom') ELSE range END FROM range(1000000)",  # mid-stream
    ],
)
def test_errors_carry_duckdbs_message_unchanged(client: flightcache.Client, logs: pa.Table, query: str) -> None:
    """A bad query raises SqlError whose message is exactly the one DuckDB gives for it locally."""
    with pytest.raises(duckdb.Error) as local_error:
        local(logs, query)
    with pytest.raises(SqlError) as remote:
        client.sql(query)
    assert str(remote.value) == str(local_error.value)


def test_error_over_plain_flight_has_the_code_and_message(uri: str, logs: pa.Table) -> None:
    """A plain Flight client sees DuckDB's message and ``{"code": "SQL_ERROR"}``."""
    command = fsql.SqlRequest("SELEC 1").to_command()
    with pytest.raises(flight.FlightServerError) as e:
        flight.connect(uri).get_flight_info(flight.FlightDescriptor.for_command(command))
    assert "Parser Error: syntax error" in str(e.value)
    assert json.loads(e.value.extra_info) == {"code": "SQL_ERROR"}


def test_reading_local_files_fails(client: flightcache.Client, tmp_path: Path) -> None:
    """read_csv, a bare file path and glob are refused: no server file is reachable."""
    path = tmp_path / "secret.csv"
    path.write_text("a\n1\n")
    for query in (
        f"SELECT * FROM read_csv('{path}')",
        f"SELECT * FROM '{path}'",
        f"SELECT * FROM glob('{tmp_path}/*')",
    ):
        with pytest.raises(SqlError, match="Permission Error"):
            client.sql(query)


def test_copy_to_and_export_fail(client: flightcache.Client, logs: pa.Table, tmp_path: Path) -> None:
    """COPY TO, EXPORT DATABASE and ATTACH of a file fail and write nothing."""
    for query in (
        f"COPY (SELECT * FROM \"logs/raw\") TO '{tmp_path / 'out.csv'}'",
        f"EXPORT DATABASE '{tmp_path / 'export'}'",
        f"ATTACH '{tmp_path / 'db.duckdb'}' AS other",
    ):
        with pytest.raises(SqlError, match="Permission Error"):
            client.sql(query)
    assert list(tmp_path.iterdir()) == []


def test_install_and_load_fail(client: flightcache.Client) -> None:
    """Extensions can be neither installed nor loaded, nor the network reached."""
    for query in ("INSTALL httpfs", "LOAD httpfs", "SELECT * FROM 'https://example.com/x.parquet'"):
        with pytest.raises(SqlError, match="Permission Error"):
            client.sql(query)


def test_configuration_is_locked(client: flightcache.Client) -> None:
    """A query runs with external access off and cannot turn it (or its limits) back on."""
    settings = client.sql(
        "SELECT current_setting('enable_external_access') AS ext, current_setting('lock_configuration') AS locked, "
        "current_setting('python_enable_replacements') AS py, current_setting('autoload_known_extensions') AS auto"
    ).to_pylist()[0]
    assert settings == {"ext": False, "locked": True, "py": False, "auto": False}
    for query in ("SET enable_external_access = true", "SET memory_limit = '100GB'", "RESET lock_configuration"):
        with pytest.raises(SqlError, match="configuration has been locked"):
            client.sql(query)


def test_server_python_variables_are_unreachable(server: FlightcacheServer, client: flightcache.Client) -> None:
    """Names of the server's Python objects (the server itself, modules) are not tables."""
    for name in ("server", "srv", "pa", "self", "cache"):
        with pytest.raises(SqlError, match="Catalog Error"):
            client.sql(f"SELECT * FROM {name}")


def test_queries_cannot_change_datasets(client: flightcache.Client, logs: pa.Table) -> None:
    """INSERT, DROP and CREATE OR REPLACE act on a throwaway database; the dataset is untouched."""
    with pytest.raises(SqlError):
        client.sql('INSERT INTO "logs/raw" SELECT * FROM "logs/raw"')
    client.sql('SELECT count(*) FROM "logs/raw"; DROP VIEW "logs/raw"')
    client.sql('SELECT count(*) FROM "logs/raw"; CREATE OR REPLACE TABLE "logs/raw" AS SELECT 1 AS x')
    assert client.info("logs/raw")["version"] == 1
    assert client.get("logs/raw").equals(logs)


def test_a_database_serves_another_query_only_after_reads(
    server: FlightcacheServer, client: flightcache.Client, logs: pa.Table
) -> None:
    """Reads reuse a warm database; a statement of any other kind retires it, so nothing one query
    defines (tables, variables, macros, types) or seeds is there for the next."""
    databases = service(server).engine._databases
    opened = []
    real_open = databases.open
    databases.open = lambda: opened.append(1) or real_open()  # type: ignore[method-assign]

    def settled() -> None:  # databases are cleaned and given back off the request path
        databases._background.submit(lambda: None).result(timeout=10)

    for _ in range(8):
        assert client.sql('SELECT count(*) AS n FROM "logs/raw"')["n"][0].as_py() == logs.num_rows
        settled()
    assert len(opened) <= 4  # the parser, the first query's, two spares: not one a query
    views = client.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal")
    assert views.num_rows == 0  # the earlier queries' dataset views are gone

    opened.clear()
    for statement, probe in (
        ("CREATE TABLE t AS SELECT 42 AS x", "SELECT * FROM t"),
        ("CREATE MACRO m() AS 42", "SELECT m()"),
        ("CREATE TYPE mood AS ENUM ('ok')", "SELECT 'ok'::mood"),
    ):
        for _ in range(3):  # every database of the pool
            client.sql(f"{statement}; SELECT 1")
            settled()
            with pytest.raises(SqlError):
                client.sql(probe)
    assert len(opened) >= 9
    client.sql("SET VARIABLE secret = 'x'; SELECT 1")
    assert client.sql("SELECT getvariable('secret') AS v")["v"][0].as_py() is None

    seeded = duckdb.connect()
    seeded.execute("SELECT setseed(0.5)").fetchall()
    predictable = seeded.execute("SELECT random()").fetchall()[0][0]
    for _ in range(3):
        client.sql("SELECT setseed(0.5)")
        settled()
        assert client.sql("SELECT random() AS r")["r"][0].as_py() != predictable


def test_memory_limit_per_query() -> None:
    """A query needing more than the per-query memory limit fails with DuckDB's out-of-memory error."""
    with running(sql=SqlLimits(memory_limit=64 << 20)) as (srv, c):
        with pytest.raises(SqlError, match="Out of Memory"):
            c.sql("SELECT range % 5000000 AS k, count(*) FROM range(20000000) GROUP BY 1 ORDER BY 2 DESC LIMIT 1")
        assert c.sql("SELECT 42 AS x")["x"][0].as_py() == 42  # the server is fine
        wait_idle(srv)


def test_timeout_interrupts_a_query(server: FlightcacheServer, client: flightcache.Client) -> None:
    """A query past its timeout is interrupted, promptly, with a clear message."""
    started = time.monotonic()
    with pytest.raises(SqlError, match=r"timeout of 0\.5 s"):
        client.sql(SLOW, timeout=0.5)
    assert time.monotonic() - started < 5
    wait_idle(server)


def test_server_timeout_applies_to_every_query() -> None:
    """The server's limit bounds a query that asked for no timeout (and a longer one is shortened)."""
    with running(sql=SqlLimits(timeout=0.5)) as (srv, c):
        for timeout in (None, 60):
            with pytest.raises(SqlError, match="timeout"):
                c.sql(SLOW, timeout=timeout)
        wait_idle(srv)


def test_client_cancels_a_running_query(server: FlightcacheServer, client: flightcache.Client) -> None:
    """``SqlReader.cancel()`` from another thread interrupts the query on the server."""
    reader = client.sql_reader(SLOW)
    threading.Timer(0.5, reader.cancel).start()
    started = time.monotonic()
    with pytest.raises(SqlError, match="cancelled"):
        reader.read_all()
    assert time.monotonic() - started < 5
    wait_idle(server)


def test_unfetched_results_are_dropped() -> None:
    """A query started by get_flight_info but never fetched frees its database after claim_seconds."""
    with running(sql=SqlLimits(claim_seconds=0.3)) as (srv, c):
        command = fsql.SqlRequest("SELECT 1 AS x").to_command()
        info = c.flight.get_flight_info(flight.FlightDescriptor.for_command(command))
        assert service(srv).engine.running() == 1
        wait_idle(srv)
        with pytest.raises(InvalidRequestError, match="unknown statement handle"):
            c._call(lambda: c.flight.do_get(info.endpoints[0].ticket).read_all())


def test_cancel_flight_info_action(server: FlightcacheServer, uri: str) -> None:
    """Flight's CancelFlightInfo action cancels a started query by its FlightInfo."""
    fc = flight.connect(uri)
    info = fc.get_flight_info(flight.FlightDescriptor.for_command(fsql.SqlRequest(SLOW).to_command()))
    body = fsql.message("CancelFlightInfoRequest", info=info.serialize()).SerializeToString()
    [result] = list(fc.do_action(flight.Action("CancelFlightInfo", body)))
    assert fsql.parse("CancelFlightInfoResult", result.body.to_pybytes()).status == fsql.CANCEL_CANCELLED
    wait_idle(server)


def test_concurrent_queries(client: flightcache.Client, logs: pa.Table) -> None:
    """Queries from several threads run side by side, each in its own database."""
    results: list[int] = []

    def run(status: int) -> None:
        results.append(client.sql('SELECT count(*) AS n FROM "logs/raw" WHERE status = ?', [status])["n"][0].as_py())

    threads = [threading.Thread(target=run, args=(s,)) for s in (200, 304, 404, 500) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted([logs["status"].to_pylist().count(s) for s in (200, 304, 404, 500)] * 2)


# -- wire ------------------------------------------------------------------------------------------


def test_sql_request_round_trips_and_refuses_hostile_input() -> None:
    """The sql command round-trips; malformed ones raise InvalidRequestError."""
    request = fsql.SqlRequest("SELECT ?", [1], into="a/b", mode="append", persist="sync", ttl=5, timeout=2.5)
    assert fsql.SqlRequest.from_command(request.to_command()) == request
    for raw in (b"", b"[]", b'{"query": 1}', b'{"query": "x", "into": 3}', b'{"query": "x", "params": [[1]]}', b"{}"):
        with pytest.raises(InvalidRequestError):
            fsql.SqlRequest.from_bytes(raw)
    with pytest.raises(InvalidRequestError):
        fsql.SqlRequest.from_bytes(b'{"query": "' + b"x" * (fsql.MAX_QUERY_BYTES + 1) + b'"}')


def test_declared_messages_match_the_flight_sql_spec() -> None:
    """Every declared message has the field names, numbers, types and presence of the published FlightSql.proto."""
    from flightsql import flightsql_pb2 as reference  # generated from the spec by a third party

    kinds = {9: "string", 12: "bytes", 8: "bool", 5: "int32", 13: "uint32", 14: "int32"}  # enum (14) is an int32
    checked = 0
    for name, fields in fsql._SQL_MESSAGES.items():
        ref = reference.DESCRIPTOR.message_types_by_name.get(name)
        if ref is None:
            continue  # newer than the reference package (DoPutPreparedStatementResult)
        expected = [
            (f.name, f.number, kinds[f.type], "repeated" if f.is_repeated else "optional" if f.has_presence else "")
            for f in ref.fields
        ]
        assert fields == expected, name
        checked += 1
    assert checked == len(fsql._SQL_MESSAGES) - 1


def test_server_requests_are_not_claimed_by_sql(server: FlightcacheServer) -> None:
    """The server's own JSON descriptors, tickets and actions stay the server's."""
    svc = service(server)
    assert not svc.handles_descriptor(flight.FlightDescriptor.for_path("logs/raw"))
    assert not svc.handles_descriptor(flight.FlightDescriptor.for_command(b'{"v": 1, "name": "logs/raw"}'))
    assert not svc.handles_ticket(b'{"v":1,"name":"a","version":1,"start":0,"end":1}')
    assert not any(svc.handles_action(a) for a in ("drop", "list", "stats", "commit", "load"))
    assert svc.handles_ticket(fsql.pack(fsql.message("TicketStatementQuery", statement_handle=b"x")))


# -- Flight SQL clients ----------------------------------------------------------------------------


def test_adbc_driver_statements_and_prepared_parameters(uri: str, logs: pa.Table) -> None:
    """The ADBC Flight SQL driver runs queries, and prepared statements with parameters, twice over."""
    import adbc_driver_flightsql.dbapi as adbc

    query = 'SELECT status, count(*) AS n FROM "logs/raw" GROUP BY ALL ORDER BY ALL'
    with adbc.connect(uri, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(query)
        assert cur.fetch_arrow_table().equals(local(logs, query))
        for status in (500, 404):
            cur.execute('SELECT count(*) FROM "logs/raw" WHERE status = ? AND method = ?', parameters=(status, "GET"))
            expected = sum(
                1
                for s, m in zip(logs["status"].to_pylist(), logs["method"].to_pylist(), strict=True)
                if (s, m) == (status, "GET")
            )
            assert cur.fetchall() == [(expected,)]


def test_adbc_driver_catalog_schema_and_info(uri: str, logs: pa.Table) -> None:
    """get_objects lists the datasets with their columns; get_table_schema and get_info answer."""
    import adbc_driver_flightsql.dbapi as adbc

    with adbc.connect(uri, autocommit=True) as conn:
        objects = conn.adbc_get_objects().read_all().to_pylist()
        [catalog] = objects
        [schema] = catalog["catalog_db_schemas"]
        assert schema["db_schema_name"] == "main"
        tables = {t["table_name"]: t for t in schema["db_schema_tables"]}
        assert set(tables) == {"logs/raw", "ref/users"}
        assert [c["column_name"] for c in tables["logs/raw"]["table_columns"]] == logs.schema.names
        assert conn.adbc_get_table_schema("logs/raw").remove_metadata().equals(logs.schema)
        info = conn.adbc_get_info()
        assert info["vendor_name"] == "flightcache" and info["vendor_arrow_version"] == pa.__version__


def test_adbc_driver_errors_and_cancel(server: FlightcacheServer, uri: str, logs: pa.Table) -> None:
    """A bad query shows DuckDB's message; adbc_cancel() interrupts a running query on the server."""
    import adbc_driver_flightsql.dbapi as adbc

    with adbc.connect(uri, autocommit=True) as conn, conn.cursor() as cur:
        with pytest.raises(adbc.Error, match='Parser Error: syntax error at or near "SELEC"'):
            cur.execute("SELEC 1")
        cur.execute(SLOW)
        threading.Timer(0.5, cur.adbc_cancel).start()
        with pytest.raises(adbc.Error):
            cur.fetchall()
    wait_idle(server)


def test_flightsql_dbapi_client(server: FlightcacheServer, logs: pa.Table) -> None:
    """flightsql-dbapi runs queries and parameters, lists tables, columns, schemas and SqlInfo."""
    from flightsql import FlightSQLClient, connect

    client = FlightSQLClient(host="127.0.0.1", port=server.port, insecure=True)
    conn = connect(client)
    cur = conn.cursor()
    cur.execute('SELECT count(*) FROM "logs/raw" WHERE status >= 400')
    assert cur.fetchall() == [[sum(1 for s in logs["status"].to_pylist() if s >= 400)]]
    cur.execute('SELECT label FROM "ref/users" WHERE status = ?', (404,))
    assert cur.fetchall() == [["missing"]]
    assert sorted(conn.flightsql_get_table_names()) == ["logs/raw", "ref/users"]
    assert [c["name"] for c in conn.flightsql_get_columns("ref/users")] == ["status", "label"]
    assert conn.flightsql_get_schema_names() == ["main"]
    assert conn.flightsql_get_sql_info([0, 3, 4]) == {0: "flightcache", 3: True, 4: True}
    client.close()


def test_unsupported_flight_sql_answers_not_implemented(server: FlightcacheServer, uri: str) -> None:
    """Updates, ingest, Substrait, transactions and type info answer "not implemented" at once."""
    from flightsql import FlightSQLClient

    fc = flight.connect(uri)

    def command(name: str) -> flight.FlightDescriptor:
        return flight.FlightDescriptor.for_command(_any(name))

    for name in ("CommandGetXdbcTypeInfo", "CommandStatementSubstraitPlan"):
        with pytest.raises(flight.FlightServerError, match="NOT_IMPLEMENTED"):
            fc.get_flight_info(command(name))
    for name in ("BeginTransaction", "BeginSavepoint", "CreatePreparedSubstraitPlan"):
        with pytest.raises(flight.FlightServerError, match="NOT_IMPLEMENTED"):
            list(fc.do_action(flight.Action(name, b"")))
    with pytest.raises(flight.FlightServerError, match="not implemented"):
        FlightSQLClient(host="127.0.0.1", port=server.port, insecure=True).execute_update("DELETE FROM x")
    with pytest.raises(flight.FlightServerError) as raised:
        list(fc.do_action(flight.Action("EndTransaction", b"")))
    error = error_from_flight(raised.value)
    assert isinstance(error, NotImplementedByServerError) and "transactions" in str(error)


def _any(name: str) -> bytes:
    """A serialized Any of an empty message of that Flight SQL name (declared here or not)."""
    from google.protobuf import any_pb2

    return any_pb2.Any(type_url=fsql.TYPE_URL_PREFIX + name, value=b"").SerializeToString()


# -- client-side DuckDB ----------------------------------------------------------------------------


def test_attach_queries_datasets_from_a_local_duckdb(client: flightcache.Client, logs: pa.Table) -> None:
    """Attached datasets answer local queries like the data itself, pulling only the columns used."""
    from flightcache.integrations import duck

    reads: list[tuple[list[str] | None, str | None]] = []
    stream = client.stream

    def spy(name: str, columns: list[str] | None = None, filter: Any = None, **kw: Any) -> Any:
        reads.append((columns, None if filter is None else str(filter)))
        return stream(name, columns, filter, **kw)

    client.stream = spy  # type: ignore[method-assign]
    con = duckdb.connect()
    assert sorted(duck.attach(con, client)) == ["logs/raw", "ref/users"]
    query = (
        'SELECT u.label, count(*) AS n, round(avg(l.latency_ms), 6) AS lat FROM "logs/raw" l '
        "JOIN \"ref/users\" u USING (status) WHERE l.method = 'GET' GROUP BY ALL ORDER BY ALL"
    )
    assert con.sql(query).to_arrow_table().equals(local(logs, query, **{"ref/users": USERS}))
    logs_read = next(r for r in reads if r[0] is not None and "latency_ms" in r[0])
    assert sorted(logs_read[0]) == ["latency_ms", "status"]  # method is filtered on the server, bytes and ts not read
    assert logs_read[1] is not None and "GET" in logs_read[1]
    assert con.sql('SELECT count(*) FROM "logs/raw"').fetchall() == [(logs.num_rows,)]


def test_attach_unknown_name(client: flightcache.Client, logs: pa.Table) -> None:
    """Attaching a name the server does not hold fails, naming it."""
    from flightcache.errors import DatasetNotFoundError
    from flightcache.integrations import duck

    with pytest.raises(DatasetNotFoundError, match="nope"):
        duck.attach(duckdb.connect(), client, ["logs/raw", "nope"])


# -- command line ----------------------------------------------------------------------------------


def test_cli_sql_prints_writes_and_stores(uri: str, logs: pa.Table, tmp_path: Path) -> None:
    """``flightcache sql`` prints a table, writes Parquet with -o, stores with --into, fails in one line."""
    query = 'SELECT status, count(*) AS n FROM "logs/raw" GROUP BY ALL ORDER BY ALL'
    shown = run_cli("sql", query, "--uri", uri)
    assert shown.returncode == 0, shown.stderr
    assert "status" in shown.stdout and "(4 rows, showing 4)" in shown.stdout
    out = tmp_path / "out.parquet"
    written = run_cli("sql", query, "-o", str(out), "--uri", uri)
    assert written.returncode == 0, written.stderr
    assert pq.read_table(out).equals(local(logs, query))
    stored = run_cli("sql", query, "--into", "logs/counts", "--uri", uri, "--output", "json")
    assert stored.returncode == 0 and json.loads(stored.stdout)["rows"] == 4
    bad = run_cli("sql", "SELEC 1", "--uri", uri)
    assert bad.returncode == 1 and bad.stderr.startswith("flightcache sql: error: Parser Error")
