"""Conformance of the server to docs/protocol.md, driven by a plain ``pyarrow.flight`` client only.

Nothing here imports the flightcache client or protocol module: each request is the bytes the spec
describes, so a second implementation (the JVM connector) can follow the same steps. The servers are
real FlightcacheServers on 127.0.0.1, port 0. Each test's docstring names the spec section it checks.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from flightcache.server.auth import Auth
from flightcache.server.config import ServerConfig, build_server
from flightcache.server.flight import FlightcacheServer

WRITE_TOKEN = "conformance-write-token-0123456789"
READ_TOKEN = "conformance-read-token-0123456789"
CODES = {
    "DATASET_NOT_FOUND",
    "DATASET_EXISTS",
    "SCHEMA_MISMATCH",
    "INVALID_NAME",
    "INVALID_REQUEST",
    "MEMORY_FULL",
    "STORAGE_ERROR",
    "PUT_ABORTED",
    "SQL_ERROR",
    "NOT_IMPLEMENTED",
    "UNAUTHENTICATED",
    "UNAUTHORIZED",
    "LIMIT_EXCEEDED",
    "UNAVAILABLE",
    "NOT_INSTALLED",
    "INTERNAL",
}
ACTIONS = {"drop", "info", "list", "stats", "healthcheck", "commit", "abort", "load", "persist", "pin", "unpin"}
ACTIONS |= {"evict", "shm", "adopt", "refresh", "sql", "CreatePreparedStatement", "ClosePreparedStatement"}
ACTIONS |= {"CancelFlightInfo", "CancelQuery", "nodes"}


def table(rows: int = 100, start: int = 0) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(start, start + rows), pa.int64()),
            "status": pa.array([(200, 404, 500)[i % 3] for i in range(rows)], pa.int32()),
            "name": pa.array([f"row-{i}" for i in range(start, start + rows)], pa.string()),
        }
    )


def command(**fields: Any) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps({"v": 1, **fields}).encode())


def action(c: flight.FlightClient, kind: str, body: bytes | dict[str, Any] = b"", **kw: Any) -> list[Any]:
    """The JSON results of an action (one per result message)."""
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    return [json.loads(r.body.to_pybytes()) for r in c.do_action(flight.Action(kind, raw), **kw)]


def put(
    c: flight.FlightClient,
    descriptor: flight.FlightDescriptor,
    data: pa.Table,
    metadata: dict[str, Any] | None = None,
    trailer: bool = False,
    **kw: Any,
) -> dict[str, Any]:
    """A do_put: options (if given) as the first message's app_metadata, the batches, the end-of-stream
    message if ``trailer``; the one PutResult's JSON."""
    writer, results = c.do_put(descriptor, data.schema, **kw)
    if metadata is not None:
        writer.write_metadata(json.dumps(metadata).encode())
    writer.write_table(data)
    if trailer:
        writer.write_metadata(json.dumps({"v": 1, "end": True, "rows": data.num_rows}).encode())
    writer.done_writing()
    answer = results.read()
    writer.close()
    return json.loads(answer.to_pybytes())


def read(c: flight.FlightClient, descriptor: flight.FlightDescriptor, **kw: Any) -> pa.Table:
    info = c.get_flight_info(descriptor, **kw)
    return pa.concat_tables([c.do_get(e.ticket, **kw).read_all() for e in info.endpoints])


def code(err: pytest.ExceptionInfo[flight.FlightError]) -> str:
    found = json.loads(err.value.extra_info)["code"]
    assert found in CODES
    assert str(err.value).startswith(f"[{found}] ") or found == "SQL_ERROR"
    return found


@pytest.fixture
def c(uri: str) -> Iterator[flight.FlightClient]:
    with flight.connect(uri) as client:
        yield client


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[flight.FlightClient]:
    """A client of a server with a storage tier (for persist, evict, load)."""
    srv = build_server(ServerConfig(storage=str(tmp_path / "storage")))
    try:
        with flight.connect(f"grpc://127.0.0.1:{srv.port}") as client:
            yield client
    finally:
        srv.shutdown()


@pytest.fixture
def secured() -> Iterator[str]:
    """The URI of a server with a write token, a read token and a read-role basic-auth user."""
    auth = Auth(tokens={WRITE_TOKEN: "write", READ_TOKEN: "read"}, users={"bi": ("bi-password", "read")})
    srv = build_server(ServerConfig(credentials=auth))
    try:
        yield f"grpc://127.0.0.1:{srv.port}"
    finally:
        srv.shutdown()


def bearer(token: str) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])


# -- §2 names, §3 descriptors, §4 flight info, §5 tickets ------------------------------------------------


def test_path_descriptor_flight_info_and_tickets(server: FlightcacheServer, c: flight.FlightClient) -> None:
    """§3.1, §4, §5: a one-element path descriptor; FlightInfo schema, totals, endpoints without locations,
    JSON tickets naming version and batch range; the endpoints' streams concatenate to the dataset."""
    server.endpoint_bytes = 1000  # several endpoints for a small table
    data = table(200_000)
    assert put(c, flight.FlightDescriptor.for_path("conf/t"), data)["version"] == 1
    info = c.get_flight_info(flight.FlightDescriptor.for_path("conf/t"))
    assert info.schema.equals(data.schema)
    assert info.total_records == data.num_rows and info.total_bytes > 0
    assert info.descriptor.path == [b"conf/t"]
    assert len(info.endpoints) > 1 and info.ordered and info.app_metadata == b""
    ranges = []
    for e in info.endpoints:
        assert e.locations == []
        t = json.loads(e.ticket.ticket)
        assert set(t) == {"v", "name", "version", "start", "end"}
        assert (t["v"], t["name"], t["version"]) == (1, "conf/t", 1)
        ranges.append((t["start"], t["end"]))
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    got = pa.concat_tables([c.do_get(e.ticket).read_all() for e in info.endpoints])
    assert got.equals(data)


def test_read_command_projection_filter_version_endpoints(c: flight.FlightClient) -> None:
    """§3.2, §5: a read command with columns, filter (string), version pinning and endpoints; totals -1
    when filtered; the tickets carry the read's options."""
    put(c, flight.FlightDescriptor.for_path("conf/r"), table(100))
    put(c, flight.FlightDescriptor.for_path("conf/r"), table(50, start=1000))
    old = read(c, command(name="conf/r", version=1, columns=["id"]))
    assert old.column_names == ["id"] and old.num_rows == 100
    info = c.get_flight_info(command(name="conf/r", columns=["status", "id"], filter="status == 500 and id > 1010"))
    assert info.total_records == -1 and info.total_bytes == -1
    assert info.schema.names == ["status", "id"]
    ticket = json.loads(info.endpoints[0].ticket.ticket)
    assert ticket["version"] == 2 and ticket["filter"] == "status == 500 and id > 1010"
    got = pa.concat_tables([c.do_get(e.ticket).read_all() for e in info.endpoints])
    assert set(got["status"].to_pylist()) == {500} and min(got["id"].to_pylist()) > 1010
    projected = c.get_flight_info(command(name="conf/r", columns=["id"]))
    assert projected.total_records == 50 and projected.total_bytes == -1


def test_read_command_substrait_filter(c: flight.FlightClient) -> None:
    """§3.2: filter_substrait is base64 of a Substrait ExtendedExpression bound to the full schema."""
    data = table(90)
    put(c, flight.FlightDescriptor.for_path("conf/s"), data)
    expression = pc.field("status") == pa.scalar(404, pa.int32())
    substrait = base64.b64encode(bytes(expression.to_substrait(data.schema))).decode()
    got = read(c, command(name="conf/s", filter_substrait=substrait, columns=["id", "status"]))
    assert got.num_rows == 30 and set(got["status"].to_pylist()) == {404}
    with pytest.raises(flight.FlightServerError) as err:
        c.get_flight_info(command(name="conf/s", filter="id > 1", filter_substrait=substrait))
    assert code(err) == "INVALID_REQUEST"


def test_read_command_endpoints_asks_for_more_partitions(server: FlightcacheServer, c: flight.FlightClient) -> None:
    """§3.2: "endpoints": N gives at least N endpoints as far as the batches allow."""
    server.store.batch_rows = 1000
    put(c, flight.FlightDescriptor.for_path("conf/e"), table(10_000))
    assert len(c.get_flight_info(flight.FlightDescriptor.for_path("conf/e")).endpoints) == 1
    info = c.get_flight_info(command(name="conf/e", endpoints=4))
    assert len(info.endpoints) >= 4
    assert read(c, command(name="conf/e", endpoints=4)).num_rows == 10_000


def test_list_flights(c: flight.FlightClient) -> None:
    """§4.2: list_flights gives one FlightInfo per dataset in memory, with a path descriptor."""
    put(c, flight.FlightDescriptor.for_path("conf/a"), table(3))
    put(c, flight.FlightDescriptor.for_path("conf/b"), table(4))
    infos = {f.descriptor.path[0].decode(): f for f in c.list_flights()}
    assert set(infos) == {"conf/a", "conf/b"} and infos["conf/b"].total_records == 4


@pytest.mark.parametrize(
    ("descriptor", "expected"),
    [
        (flight.FlightDescriptor.for_path("Upper"), "INVALID_NAME"),
        (flight.FlightDescriptor.for_path("a/v12"), "INVALID_NAME"),
        (flight.FlightDescriptor.for_path("a", "b"), "INVALID_REQUEST"),
        (flight.FlightDescriptor.for_command(b"not json"), "INVALID_REQUEST"),
        (flight.FlightDescriptor.for_command(b'{"v": 2, "name": "conf/x"}'), "INVALID_REQUEST"),
        (flight.FlightDescriptor.for_command(b'{"name": "conf/x", "colour": 1}'), "INVALID_REQUEST"),
        (flight.FlightDescriptor.for_command(b'{"name": "conf/x", "endpoints": 0}'), "INVALID_REQUEST"),
        (flight.FlightDescriptor.for_path("conf/missing"), "DATASET_NOT_FOUND"),
    ],
)
def test_bad_descriptors(c: flight.FlightClient, descriptor: flight.FlightDescriptor, expected: str) -> None:
    """§2, §3, §12: names outside the grammar, malformed commands and unknown datasets get their codes."""
    put(c, flight.FlightDescriptor.for_path("conf/x"), table(3))
    with pytest.raises(flight.FlightServerError) as err:
        c.get_flight_info(descriptor)
    assert code(err) == expected


def test_bad_reads(c: flight.FlightClient) -> None:
    """§3.2, §5, §12: unknown columns, a filter that does not parse, a gone version, a forged ticket."""
    put(c, flight.FlightDescriptor.for_path("conf/x"), table(3))
    for descriptor, expected in [
        (command(name="conf/x", columns=["nope"]), "INVALID_REQUEST"),
        (command(name="conf/x", filter="id >"), "INVALID_REQUEST"),
        (command(name="conf/x", version=9), "DATASET_NOT_FOUND"),
    ]:
        with pytest.raises(flight.FlightServerError) as err:
            c.get_flight_info(descriptor)
        assert code(err) == expected
    for ticket, expected in [
        (b"garbage", "INVALID_REQUEST"),
        (b'{"v":1,"name":"conf/x","version":7,"start":0,"end":1}', "DATASET_NOT_FOUND"),
    ]:
        with pytest.raises(flight.FlightServerError) as err:
            c.do_get(flight.Ticket(ticket)).read_all()
        assert code(err) == expected


# -- §6 do_put ----------------------------------------------------------------------------------------


def test_put_options_as_command_and_as_first_message(c: flight.FlightClient) -> None:
    """§6.1, §6.2, §6.4: options in a command descriptor or in the first message's app_metadata; modes
    overwrite, append, create; the PutResult JSON."""
    first = put(c, command(name="conf/p", mode="create"), table(10))
    assert first == {"name": "conf/p", "version": 1, "rows": 10, "bytes": first["bytes"]}
    appended = put(c, flight.FlightDescriptor.for_path("conf/p"), table(5), metadata={"v": 1, "mode": "append"})
    assert (appended["version"], appended["rows"]) == (2, 15)
    replaced = put(c, flight.FlightDescriptor.for_path("conf/p"), table(7))  # no options: overwrite
    assert (replaced["version"], replaced["rows"]) == (3, 7)
    with pytest.raises(flight.FlightServerError) as err:
        put(c, command(name="conf/p", mode="create"), table(1))
    assert code(err) == "DATASET_EXISTS"
    with pytest.raises(flight.FlightServerError) as err:
        put(c, command(name="conf/p", mode="append"), table(1).drop_columns(["name"]))
    assert code(err) == "SCHEMA_MISMATCH"
    with pytest.raises(flight.FlightServerError) as err:
        put(c, command(name="conf/p", mode="upsert"), table(1))
    assert code(err) == "INVALID_REQUEST"
    with pytest.raises(flight.FlightServerError) as err:
        put(c, flight.FlightDescriptor.for_path("conf/p"), table(1), metadata={"name": "conf/other"})
    assert code(err) == "INVALID_REQUEST"
    assert read(c, flight.FlightDescriptor.for_path("conf/p")).num_rows == 7  # refused puts changed nothing


def test_put_trailer_and_expect_rows(c: flight.FlightClient) -> None:
    """§6.3: with "trailer", only a stream ending in the end-of-stream message publishes (also with no rows
    and a command descriptor); "expect_rows" refuses a short stream; nothing is published on refusal."""
    ok = put(c, command(name="conf/tr", trailer=True), table(10), trailer=True)
    assert ok["rows"] == 10
    empty = put(c, command(name="conf/empty", trailer=True), table(0), trailer=True)
    assert (empty["version"], empty["rows"]) == (1, 0)
    with pytest.raises(flight.FlightCancelledError) as err:
        put(c, command(name="conf/tr", trailer=True), table(3))  # no end-of-stream message
    assert code(err) == "PUT_ABORTED"
    with pytest.raises(flight.FlightCancelledError) as err:
        put(c, flight.FlightDescriptor.for_path("conf/tr"), table(3), metadata={"expect_rows": 4})
    assert code(err) == "PUT_ABORTED"
    writer, results = c.do_put(command(name="conf/tr", trailer=True), table(3).schema)
    writer.write_table(table(3))
    writer.write_metadata(b'{"v": 1, "end": true, "rows": 2}')  # the count differs from what was sent
    writer.done_writing()
    with pytest.raises(flight.FlightCancelledError) as err:
        results.read()
        writer.close()
    assert code(err) == "PUT_ABORTED"
    info = json.loads(c.do_action(flight.Action("info", b"conf/tr")).__next__().body.to_pybytes())
    assert (info["version"], info["rows"]) == (1, 10)


def test_put_with_persist_and_ttl(stored: flight.FlightClient) -> None:
    """§6.1: persist (none, sync, async) and ttl travel as put options."""
    put(stored, command(name="conf/ps", persist="sync", ttl=3600), table(5))
    [info] = action(stored, "info", {"name": "conf/ps"})
    assert info["state"] == "persisted" and info["persisted_version"] == 1 and info["expires"] is not None
    with pytest.raises(flight.FlightServerError) as err:
        put(stored, command(name="conf/ps", persist="later"), table(5))
    assert code(err) == "INVALID_REQUEST"


# -- §7 transactions ----------------------------------------------------------------------------------


def test_transaction_commit(c: flight.FlightClient) -> None:
    """§7: puts with "txn" stage parts (invisible), commit publishes the chosen parts in the order given as
    one version; a second commit of the same transaction is refused."""
    put(c, flight.FlightDescriptor.for_path("conf/txn"), table(1))
    staged = [
        put(c, command(name="conf/txn", txn="job-1", trailer=True), table(10, 10 * i), trailer=True) for i in range(3)
    ]
    assert [s["part"] for s in staged] == ["000000", "000001", "000002"]
    assert staged[0] == {"txn": "job-1", "part": "000000", "rows": 10, "bytes": staged[0]["bytes"]}
    assert read(c, flight.FlightDescriptor.for_path("conf/txn")).num_rows == 1  # parts are invisible
    [done] = action(c, "commit", {"v": 1, "txn": "job-1", "name": "conf/txn", "parts": ["000002", "000000"]})
    assert (done["name"], done["version"], done["rows"]) == ("conf/txn", 2, 20)
    assert read(c, flight.FlightDescriptor.for_path("conf/txn"))["id"].to_pylist() == [*range(20, 30), *range(10)]
    schema = base64.b64encode(table(0).schema.serialize().to_pybytes()).decode()
    with pytest.raises(flight.FlightServerError) as err:  # a retried commit must not publish an empty version
        action(c, "commit", {"txn": "job-1", "name": "conf/txn", "parts": [], "schema": schema})
    assert code(err) == "INVALID_REQUEST"
    with pytest.raises(flight.FlightCancelledError) as err:
        put(c, command(name="conf/txn", txn="job-1"), table(1))
    assert code(err) == "PUT_ABORTED"
    assert read(c, flight.FlightDescriptor.for_path("conf/txn")).num_rows == 20


def test_transaction_abort(c: flight.FlightClient) -> None:
    """§7: abort discards the parts; later parts and a commit of it are refused; nothing is published."""
    put(c, command(name="conf/ab", txn="job-2"), table(10))
    assert action(c, "abort", {"txn": "job-2"}) == [{"txn": "job-2", "parts_discarded": 1}]
    with pytest.raises(flight.FlightCancelledError) as err:
        put(c, command(name="conf/ab", txn="job-2"), table(10))
    assert code(err) == "PUT_ABORTED"
    schema = base64.b64encode(table(0).schema.serialize().to_pybytes()).decode()
    with pytest.raises(flight.FlightServerError) as err:
        action(c, "commit", {"txn": "job-2", "name": "conf/ab", "schema": schema})
    assert code(err) == "INVALID_REQUEST"
    with pytest.raises(flight.FlightServerError) as err:
        c.get_flight_info(flight.FlightDescriptor.for_path("conf/ab"))
    assert code(err) == "DATASET_NOT_FOUND"
    assert action(c, "abort", {"txn": "never-used"}) == [{"txn": "never-used", "parts_discarded": 0}]


def test_empty_transaction_needs_a_schema(c: flight.FlightClient) -> None:
    """§7: a transaction with no parts commits an empty version of the schema given (base64 IPC schema)."""
    with pytest.raises(flight.FlightServerError) as err:
        action(c, "commit", {"txn": "job-3", "name": "conf/none"})
    assert code(err) == "INVALID_REQUEST"
    schema = base64.b64encode(table(0).schema.serialize().to_pybytes()).decode()
    [done] = action(c, "commit", {"txn": "job-4", "name": "conf/none", "schema": schema})
    assert (done["version"], done["rows"]) == (1, 0)
    assert read(c, flight.FlightDescriptor.for_path("conf/none")).schema.equals(table(0).schema)


def test_transaction_parts_must_agree(c: flight.FlightClient) -> None:
    """§7: every part of a transaction has the same dataset, mode and schema; unknown parts are refused."""
    put(c, command(name="conf/agree", txn="job-5"), table(3))
    with pytest.raises(flight.FlightServerError) as err:
        put(c, command(name="conf/other", txn="job-5"), table(3))
    assert code(err) == "INVALID_REQUEST"
    with pytest.raises(flight.FlightServerError) as err:
        put(c, command(name="conf/agree", txn="job-5"), table(3).drop_columns(["name"]))
    assert code(err) == "SCHEMA_MISMATCH"
    with pytest.raises(flight.FlightServerError) as err:
        action(c, "commit", {"txn": "job-5", "name": "conf/agree", "parts": ["000009"]})
    assert code(err) == "INVALID_REQUEST"


# -- §8 actions --------------------------------------------------------------------------------------


def test_list_actions_names_every_action(c: flight.FlightClient) -> None:
    """§8: list_actions lists every action of the spec's table, each with a description."""
    listed = {a.type: a.description for a in c.list_actions()}
    assert set(listed) == ACTIONS
    assert all(listed.values())


def test_dataset_actions(c: flight.FlightClient) -> None:
    """§8.1-§8.4, §8.8-§8.9: info, list, pin, unpin, drop, with a JSON body or the bare name."""
    put(c, flight.FlightDescriptor.for_path("conf/act"), table(10))
    [by_name] = action(c, "info", b"conf/act")
    [by_json] = action(c, "info", {"v": 1, "name": "conf/act"})
    assert by_name["rows"] == by_json["rows"] == 10
    keys = {"name", "version", "rows", "bytes", "batches", "created", "last_read", "state", "in_memory"}
    keys |= {"persisted_version", "persist_error", "pinned", "expires", "counters", "schema"}
    assert keys | {"unspillable", "corrupt_in_storage", "source"} == set(by_name)
    [listed] = action(c, "list")
    assert [d["name"] for d in listed] == ["conf/act"]
    assert action(c, "pin", b"conf/act")[0]["pinned"] is True
    assert action(c, "unpin", {"name": "conf/act"})[0]["pinned"] is False
    assert action(c, "drop", {"name": "conf/act"}) == [{"name": "conf/act", "version": 1, "bytes": by_name["bytes"]}]
    assert action(c, "list") == [[]]
    for body in (b"conf/act", b'{"name": "conf/act", "extra": 1}', b"Not A Name", b'{"name": 5}'):
        with pytest.raises(flight.FlightServerError) as err:
            action(c, "info", body)
        assert code(err) in {"DATASET_NOT_FOUND", "INVALID_REQUEST", "INVALID_NAME"}


def test_stats_and_healthcheck(c: flight.FlightClient) -> None:
    """§8.5, §8.6: stats and healthcheck take an empty body and answer one JSON object."""
    [stats] = action(c, "stats")
    assert {"datasets", "memory_used", "memory_limit", "gets", "puts", "uptime_s", "requests"} <= set(stats)
    [health] = action(c, "healthcheck")
    assert health["status"] == "ok" and health["draining"] is False
    assert {"version", "uptime_s", "memory_used", "memory_limit", "datasets", "pending_persists"} <= set(health)


def test_storage_actions(stored: flight.FlightClient, tmp_path: Path) -> None:
    """§8.10-§8.12: load (streamed progress then a summary), persist, evict; a read loads it back."""
    external = tmp_path / "external.parquet"
    pq.write_table(table(40), external)
    results = action(stored, "load", {"v": 1, "name": "conf/ld", "uri": str(external)})
    assert results[-1] == {"name": "conf/ld", "version": 1, "rows": 40, "bytes": results[-1]["bytes"]}
    assert all(set(r) == {"progress"} for r in results[:-1])
    [persisted] = action(stored, "persist", {"name": "conf/ld", "wait": True})
    assert persisted["persisted_version"] == 1
    [evicted] = action(stored, "evict", b"conf/ld")
    assert evicted["in_memory"] is False and evicted["state"] == "in-storage-only"
    assert read(stored, flight.FlightDescriptor.for_path("conf/ld")).num_rows == 40
    with pytest.raises(flight.FlightServerError) as err:
        action(stored, "load", {"name": "conf/ld2", "uri": str(tmp_path / "missing.parquet")})
    assert code(err) == "STORAGE_ERROR"


def test_storage_actions_without_storage(c: flight.FlightClient) -> None:
    """§8.11, §8.12: persist needs a storage tier; a memory-only dataset cannot be evicted."""
    put(c, flight.FlightDescriptor.for_path("conf/mem"), table(3))
    for kind in ("persist", "evict"):
        with pytest.raises(flight.FlightServerError) as err:
            action(c, kind, {"name": "conf/mem"})
        assert code(err) == "INVALID_REQUEST"


def test_shm_action(server: FlightcacheServer, c: flight.FlightClient) -> None:
    """§9: the shm answer names the version's files with nonces; mapped, they hold the dataset."""
    data = table(1000)
    put(c, flight.FlightDescriptor.for_path("conf/shm"), data)
    [answer] = action(c, "shm", {"name": "conf/shm"})
    if server.cache.shm is None:
        assert answer["files"] is None and answer["enabled"] is False
        return
    assert {"name", "version", "rows", "batches", "schema", "files"} == set(answer)
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(answer["schema"])))
    batches = []
    for f in answer["files"]:
        reader = pa.ipc.open_file(pa.memory_map(f["path"]))
        assert reader.metadata[b"flightcache.nonce"] == f["nonce"].encode()
        batches += [reader.get_batch(i) for i in range(reader.num_record_batches)]
    assert len(batches) == answer["batches"]
    assert pa.Table.from_batches(batches, schema).equals(data)


def test_sql_action_and_command(c: flight.FlightClient) -> None:
    """§15.1: the sql command (prefix + JSON) reads a query's result; the sql action stores one."""
    put(c, flight.FlightDescriptor.for_path("conf/q"), table(30))
    query = {"v": 1, "query": 'SELECT status, count(*) AS n FROM "conf/q" GROUP BY status ORDER BY status'}
    got = read(c, flight.FlightDescriptor.for_command(b"flightcache.sql:" + json.dumps(query).encode()))
    assert got.to_pydict() == {"status": [200, 404, 500], "n": [10, 10, 10]}
    body = {"v": 1, "query": 'SELECT id FROM "conf/q" WHERE id < ?', "params": [5], "into": "conf/q5"}
    [stored] = action(c, "sql", body)
    assert (stored["name"], stored["rows"]) == ("conf/q5", 5)
    with pytest.raises(flight.FlightServerError) as err:
        action(c, "sql", {"query": "SELECT * FROM nowhere", "into": "conf/bad"})
    assert json.loads(err.value.extra_info)["code"] == "SQL_ERROR"


def test_unknown_and_oversized_actions(c: flight.FlightClient) -> None:
    """§8, §13: an unknown action is INVALID_REQUEST; a body over the action limit LIMIT_EXCEEDED; an
    unimplemented Flight SQL action NOT_IMPLEMENTED; do_exchange is not served."""
    with pytest.raises(flight.FlightServerError) as err:
        action(c, "frobnicate")
    assert code(err) == "INVALID_REQUEST"
    with pytest.raises(flight.FlightServerError) as err:
        action(c, "info", b"x" * (2 * 1024 * 1024 + 1))
    assert code(err) == "LIMIT_EXCEEDED"
    with pytest.raises(flight.FlightServerError) as err:
        action(c, "BeginTransaction")
    assert code(err) == "NOT_IMPLEMENTED"
    with pytest.raises(pa.ArrowNotImplementedError):  # gRPC UNIMPLEMENTED
        writer, reader = c.do_exchange(flight.FlightDescriptor.for_path("conf/x"))
        writer.begin(table(1).schema)
        writer.close()
        reader.read_all()


def test_draining_server_answers_only_healthcheck(server: FlightcacheServer, c: flight.FlightClient) -> None:
    """§8.6, §12: while draining, healthcheck says so and every other call is UNAVAILABLE."""
    put(c, flight.FlightDescriptor.for_path("conf/dr"), table(3))
    server.ops.draining = True
    try:
        assert action(c, "healthcheck")[0]["status"] == "draining"
        with pytest.raises(flight.FlightUnavailableError) as err:
            action(c, "list")
        assert code(err) == "UNAVAILABLE"
        with pytest.raises(flight.FlightUnavailableError) as err:
            c.get_flight_info(flight.FlightDescriptor.for_path("conf/dr"))
        assert code(err) == "UNAVAILABLE"
    finally:
        server.ops.draining = False


# -- §10 authentication and roles -----------------------------------------------------------------


def test_calls_without_credentials_are_unauthenticated(secured: str) -> None:
    """§10: with credentials configured every call needs them: UNAUTHENTICATED otherwise, wrong ones too."""
    with flight.connect(secured) as c:
        for options in (flight.FlightCallOptions(), bearer("wrong-token-wrong-token")):
            with pytest.raises(flight.FlightUnauthenticatedError) as err:
                action(c, "list", options=options)
            assert code(err) == "UNAUTHENTICATED"
            with pytest.raises(flight.FlightUnauthenticatedError):
                list(c.list_flights(options=options))


def test_read_role_reads_and_cannot_write(secured: str) -> None:
    """§10.3: a read token lists, describes, reads, asks stats/healthcheck/shm; puts and write actions are
    UNAUTHORIZED; a write token may do both."""
    with flight.connect(secured) as c:
        put(c, flight.FlightDescriptor.for_path("conf/auth"), table(5), options=bearer(WRITE_TOKEN))
        ro = bearer(READ_TOKEN)
        assert read(c, flight.FlightDescriptor.for_path("conf/auth"), options=ro).num_rows == 5
        for kind in ("list", "stats", "healthcheck"):
            action(c, kind, options=ro)
        for kind in ("info", "shm"):
            action(c, kind, {"name": "conf/auth"}, options=ro)
        with pytest.raises(flight.FlightUnauthorizedError) as err:
            put(c, flight.FlightDescriptor.for_path("conf/auth"), table(5), options=ro)
        assert code(err) == "UNAUTHORIZED"
        writes = {
            "drop": {"name": "conf/auth"},
            "pin": {"name": "conf/auth"},
            "unpin": {"name": "conf/auth"},
            "evict": {"name": "conf/auth"},
            "persist": {"name": "conf/auth"},
            "load": {"name": "conf/l", "uri": "/nowhere"},
            "commit": {"txn": "t", "name": "conf/auth"},
            "abort": {"txn": "t"},
            "sql": {"query": "SELECT 1 AS x", "into": "conf/one"},
        }
        for kind, body in writes.items():
            with pytest.raises(flight.FlightUnauthorizedError) as err:
                action(c, kind, body, options=ro)
            assert code(err) == "UNAUTHORIZED", kind
        assert action(c, "drop", {"name": "conf/auth"}, options=bearer(WRITE_TOKEN))[0]["name"] == "conf/auth"


def test_basic_auth_handshake_gives_a_bearer_session(secured: str) -> None:
    """§10.2: a Handshake with basic credentials answers an authorization header with a bearer session
    token; later calls send it; the user's role applies."""
    with flight.connect(secured) as c:
        header, value = c.authenticate_basic_token("bi", "bi-password")
        assert header == b"authorization" and value.startswith(b"Bearer ")
        session = flight.FlightCallOptions(headers=[(header, value)])
        assert action(c, "list", options=session) == [[]]
        with pytest.raises(flight.FlightUnauthorizedError):
            action(c, "drop", b"conf/x", options=session)
        with pytest.raises(flight.FlightUnauthenticatedError):
            c.authenticate_basic_token("bi", "wrong")
