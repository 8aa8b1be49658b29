"""Failures a new user ran into (issue 14): each one is reported as what it is, never as success."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from conftest import logs_table, run_cli

import flightcache
from flightcache.errors import DatasetNotFoundError, SchemaMismatchError, StorageError
from flightcache.server.config import ServerConfig, build_server
from flightcache.server.flight import FlightcacheServer
from flightcache.server.storage import Storage, unstorable

# -- columns Parquet cannot store ------------------------------------------------------------------


def _unstorable_columns() -> dict[str, pa.Array]:
    """One array per type pyarrow's Parquet writer refuses (found by trying every type, at every depth)."""
    union = pa.UnionArray.from_sparse(pa.array([0, 1, 0], pa.int8()), [pa.array([1, 2, 3]), pa.array(["a", "b", "c"])])
    interval = pa.array([(1, 2, 3), None, (0, 0, 0)], pa.month_day_nano_interval())
    return {
        "sparse_union": union,
        "dense_union": pa.UnionArray.from_dense(
            pa.array([0, 0, 0], pa.int8()), pa.array([0, 1, 2], pa.int32()), [pa.array([1, 2, 3])]
        ),
        "month_day_nano_interval": interval,
        "run_end_encoded": pa.RunEndEncodedArray.from_arrays(pa.array([2, 3], pa.int32()), pa.array([7, 8])),
        "list_of_struct_of_interval": pa.array(
            [[{"k": (1, 2, 3)}], None, []], pa.list_(pa.struct([("k", pa.month_day_nano_interval())]))
        ),
        "map_to_union": pa.MapArray.from_arrays(pa.array([0, 1, 1, 3], pa.int32()), pa.array(["a", "b", "c"]), union),
        "empty_struct": pa.array([{}, None, {}], pa.struct([])),
    }


UNSTORABLE = _unstorable_columns()


def _with(column: str) -> pa.Table:
    return pa.table({"id": pa.array([1, 2, 3]), "bad": UNSTORABLE[column]})


@pytest.fixture
def storage_dir(tmp_path: Path) -> Path:
    return tmp_path / "storage"


def _server(storage_dir: Path, persist: str = "none", memory_limit: int | None = None) -> FlightcacheServer:
    config = ServerConfig(
        memory_limit=memory_limit, storage=str(storage_dir), storage_retries=1, storage_backoff=0.01, persist=persist
    )
    return build_server(config)


@pytest.fixture
def tiered(storage_dir: Path) -> Iterator[tuple[FlightcacheServer, flightcache.Client]]:
    srv = _server(storage_dir)
    with flightcache.connect(f"grpc://127.0.0.1:{srv.port}") as client:
        yield srv, client
    srv.shutdown()


def test_the_types_refused_are_the_ones_parquet_refuses() -> None:
    """``unstorable`` names exactly the columns whose Parquet write fails, nested ones included."""
    import io

    import pyarrow.parquet as pq

    for column in UNSTORABLE:
        table = _with(column)
        with pytest.raises((pa.ArrowNotImplementedError, pa.ArrowInvalid)):
            pq.write_table(table, io.BytesIO())
        reason = unstorable(table.schema)
        assert reason is not None and "column 'bad'" in reason and str(table.schema.field("bad").type) in reason
    assert unstorable(logs_table(1).schema) is None
    stored = [pa.string_view(), pa.binary_view(), pa.list_view(pa.int32()), pa.float16(), pa.decimal32(5, 2)]
    stored += [pa.dictionary(pa.int8(), pa.string()), pa.uuid(), pa.json_(), pa.null(), pa.time32("s")]
    for t in stored:  # exotic, yet Parquet holds them (measured: written and read back as the same type)
        assert unstorable(pa.schema([("c", t)])) is None, t


@pytest.mark.parametrize("column", sorted(UNSTORABLE))
@pytest.mark.parametrize(("server_default", "persist"), [("none", "sync"), ("none", "async"), ("sync", None)])
def test_put_that_storage_cannot_hold_is_refused_at_its_first_message(
    storage_dir: Path, column: str, server_default: str, persist: str | None
) -> None:
    """A persisted put of a column Parquet cannot store fails with SchemaMismatchError naming the column and
    its type, before the rest of its data is read, and publishes nothing."""
    srv = _server(storage_dir, persist=server_default)
    table = _with(column)
    pulled = 0

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal pulled
        for _ in range(5_000):
            pulled += 1
            yield from table.to_batches()

    try:
        with flightcache.connect(f"grpc://127.0.0.1:{srv.port}") as client:
            reader = pa.RecordBatchReader.from_batches(table.schema, batches())
            with pytest.raises(SchemaMismatchError) as e:
                client.put("bad/put", reader, persist=persist)
            assert "column 'bad'" in str(e.value) and str(table.schema.field("bad").type) in str(e.value)
            assert pulled < 5_000  # refused at the start, not after the whole stream
            with pytest.raises(DatasetNotFoundError):
                client.info("bad/put")
            assert client.stats()["memory_staged"] == 0
    finally:
        srv.shutdown()


def test_persist_of_a_memory_only_unstorable_dataset_fails_and_it_is_never_evicted(
    storage_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """persist(wait=True) raises, the state is persist-failed with the error (logged), info says the dataset
    cannot be spilled, and eviction passes over it to free others."""
    srv = _server(storage_dir, memory_limit=3 * 1024 * 1024)
    try:
        with flightcache.connect(f"grpc://127.0.0.1:{srv.port}") as client, caplog.at_level(logging.ERROR):
            client.put("u", _with("month_day_nano_interval"))
            with pytest.raises(SchemaMismatchError, match="month_day_nano_interval"):
                client.persist("u", wait=True)
            info = client.info("u")
            assert info["state"] == "persist-failed" and "month_day_nano_interval" in info["persist_error"]
            assert "never evicted" in info["unspillable"]
            assert any("persisting u v1 failed" in r.getMessage() for r in caplog.records)
            for i in range(6):  # 1 MiB each, persisted: the limit makes room by evicting these, never u
                client.put(f"p{i}", pa.table({"x": pa.array(range(128 * 1024), pa.int64())}), persist="sync")
            assert client.info("u")["in_memory"]
            assert client.stats()["evictions"] >= 1
    finally:
        srv.shutdown()


def test_failed_write_back_is_reported_not_in_progress(storage_dir: Path) -> None:
    """An async write-back that fails leaves persist-failed with its error; persist(wait=True) and the
    ``flightcache persist`` command fail; the drain counts it."""
    srv = _server(storage_dir)
    uri = f"grpc://127.0.0.1:{srv.port}"
    try:
        with flightcache.connect(uri) as client:
            storage_dir.mkdir(parents=True, exist_ok=True)
            (storage_dir / "blocked").write_text("a file where the dataset's directory would go")
            client.put("blocked", logs_table(100), persist="async")
            with pytest.raises(StorageError):
                client.persist("blocked", wait=True)
            info = client.info("blocked")
            assert info["state"] == "persist-failed" and info["persist_error"]
            cli = run_cli("persist", "blocked", "--uri", uri)
            assert cli.returncode != 0 and "STORAGE" in (cli.stderr + cli.stdout).upper()
    finally:
        summary = srv.drain(5)
    assert summary["persist_failed"] == 1 and summary["flush_failed"] >= 0


# -- errors in the middle of a stream ---------------------------------------------------------------


def _divide_by_zero_filter(schema: pa.Schema) -> bytes:
    """A substrait filter that binds to ``schema`` (a row of nulls passes it) but fails on the first value."""
    import pyarrow.compute as pc

    return bytes(pc.divide_checked(pc.field("bytes"), pc.scalar(0)).__gt__(0).to_substrait(schema))


def test_filter_failing_mid_stream_reaches_a_plain_flight_client_with_its_code(
    uri: str, client: flightcache.Client
) -> None:
    """A filtered do_get whose filter fails on the data ends with INVALID_REQUEST in extra_info, and
    flightcache.Client raises InvalidRequestError for it."""
    import base64

    import pyarrow.compute as pc

    from flightcache.errors import InvalidRequestError
    from flightcache.protocol import ReadRequest

    table = logs_table(1000)
    client.put("logs", table)
    raw = _divide_by_zero_filter(table.schema)
    request = ReadRequest("logs", filter_substrait=base64.b64encode(raw).decode())
    plain = flight.connect(uri)
    info = plain.get_flight_info(flight.FlightDescriptor.for_command(request.to_bytes()))  # the probe row passes
    with pytest.raises(flight.FlightError) as e:
        plain.do_get(info.endpoints[0].ticket).read_all()
    assert json.loads(e.value.extra_info) == {"code": "INVALID_REQUEST"}
    assert "divide by zero" in str(e.value)
    plain.close()
    with pytest.raises(InvalidRequestError, match="divide by zero"):
        flightcache.connect(uri, shm=False).get("logs", filter=pc.divide_checked(pc.field("bytes"), 0) > 0)


def test_sql_error_mid_stream_has_its_code(uri: str, client: flightcache.Client) -> None:
    """A SQL query failing after its first batches ends with SQL_ERROR in extra_info over plain Flight."""
    from flightcache import flightsql as fsql

    query = "SELECT CASE WHEN range > 700000 THEN error('boom') ELSE range END FROM range(1000000)"
    plain = flight.connect(uri)
    info = plain.get_flight_info(flight.FlightDescriptor.for_command(fsql.SqlRequest(query).to_command()))
    with pytest.raises(flight.FlightError) as e:
        plain.do_get(info.endpoints[0].ticket).read_all()
    assert json.loads(e.value.extra_info) == {"code": "SQL_ERROR"} and "boom" in str(e.value)
    plain.close()


def test_empty_filtered_read_of_dictionaries_still_reads(client: flightcache.Client) -> None:
    """A filter matching nothing over dictionary columns gives an empty table of the schema."""
    table = pa.table({"k": pa.array(["a", "b"]).dictionary_encode(), "n": [1, 2]})
    client.put("d", table)
    got = flightcache.connect(client.uri, shm=False).get("d", filter="n > 5")
    assert got.num_rows == 0 and got.schema.equals(table.schema)


# -- a corrupt manifest at start-up --------------------------------------------------------------------


@pytest.mark.parametrize("older_version_is_good", [False, True])
def test_corrupt_manifest_is_reported_and_its_files_kept(storage_dir: Path, older_version_is_good: bool) -> None:
    """The server starts; stats()["recovery"] and info name the corrupt manifest with its error; its files stay;
    an older good version (if any) is served; drop removes it."""
    table = logs_table(100)
    storage = Storage(str(storage_dir), grace_seconds=0)  # the only writer: a commit removes older versions at once
    storage.write_version("fine", 1, table.schema, table.to_batches())
    good: list[Path] = []
    if older_version_is_good:  # v1 kept aside while v2 commits (a commit supersedes the versions it wrote)
        storage.write_version("bad", 1, table.schema, table.to_batches())
        good = [shutil.copytree(d, storage_dir / "aside" / d.name) for d in (storage_dir / "bad").iterdir()]
    storage.write_version("bad", 2, table.schema, table.to_batches())
    bad_dir = next((storage_dir / "bad").iterdir())
    for d in good:
        shutil.move(d, storage_dir / "bad" / d.name)
    (bad_dir / "manifest.json").write_text('{"format": 1, "name": "bad", "version": 2, "schema": "garbage"')
    files_before = sorted(p.name for p in bad_dir.iterdir())
    srv = _server(storage_dir)
    try:
        with flightcache.connect(f"grpc://127.0.0.1:{srv.port}") as client:
            assert client.get("fine").equals(table)
            corrupt = client.stats()["recovery"]["corrupt"]
            shown = run_cli("stats", "--uri", f"grpc://127.0.0.1:{srv.port}").stdout
            assert "corrupt in storage" in shown and "bad v2" in shown
            assert [(c["name"], c["version"]) for c in corrupt] == [("bad", 2)]
            assert "corrupt manifest" in corrupt[0]["error"] and corrupt[0]["uri"].endswith(bad_dir.name)
            info = client.info("bad")
            assert info["corrupt_in_storage"] == corrupt
            if older_version_is_good:
                assert info["version"] == 1 and client.get("bad").equals(table)
            else:
                assert info["state"] == "corrupt-in-storage" and "corrupt manifest" in info["persist_error"]
            assert sorted(p.name for p in bad_dir.iterdir()) == files_before  # left for inspection
            client.drop("bad")
            assert not (storage_dir / "bad").exists() or not any((storage_dir / "bad").iterdir())
            with pytest.raises(DatasetNotFoundError):
                client.info("bad")
    finally:
        srv.shutdown()


# -- Spark's connections --------------------------------------------------------------------------------


class _PeerCounting(FlightcacheServer):
    """A server that keeps the peer (address and port: one per connection) of every call it serves."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.peers: dict[str, set[str]] = {"do_get": set(), "do_put": set(), "other": set()}

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        self.peers["do_get"].add(context.peer())
        return super().do_get(context, ticket)

    def do_put(self, context: flight.ServerCallContext, *args: object) -> None:
        self.peers["do_put"].add(context.peer())
        return super().do_put(context, *args)  # type: ignore[arg-type]

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> object:
        self.peers["other"].add(context.peer())
        return super().do_action(context, action)


@pytest.mark.spark
@pytest.mark.slow
@pytest.mark.timeout(900)  # three Spark jobs on a shared 2-core machine
def test_spark_reuses_one_connection_per_worker(spark: object) -> None:
    """Two reads of 8 partitions and a write of 6 tasks open one connection per Python worker (local[2]:
    two), not one per partition and per task."""
    from pyspark.sql import SparkSession

    assert isinstance(spark, SparkSession)
    srv = build_server(ServerConfig(batch_rows=2000), _PeerCounting)  # 20 batches: 8 endpoints
    uri = f"grpc://127.0.0.1:{srv.port}"
    try:
        with flightcache.connect(uri) as client:
            client.put("spark/in", logs_table(40_000))
        for _ in range(2):
            df = spark.read.format("flightcache-python").options(uri=uri, partitions="8", shm="false").load("spark/in")
            assert df.rdd.getNumPartitions() == 8 and df.count() == 40_000
        df.repartition(6).write.format("flightcache-python").option("uri", uri).mode("overwrite").save("spark/out")
        with flightcache.connect(uri) as client:
            assert client.info("spark/out")["rows"] == 40_000
        # A reused worker's tasks share its client (a third worker at most, if Spark starts one more).
        assert len(srv.peers["do_get"]) <= 3, srv.peers["do_get"]  # was 16: one per partition
        assert len(srv.peers["do_put"]) <= 3, srv.peers["do_put"]  # was 6: one per task
    finally:
        srv.shutdown()


# -- several writers on one storage --------------------------------------------------------------------


def _table(seed: int) -> pa.Table:
    return logs_table(500, seed=seed)


@pytest.mark.s3
def test_two_writers_interleaving_commits_of_one_dataset_keep_each_others_data(storage_uri: str) -> None:
    """Two Storages on one root (local and S3) committing the same dataset, the same version numbers too:
    the newest commit is what is read, and neither removes a version the other committed or is writing."""
    from flightcache.errors import InvalidNameError
    from flightcache.names import validate_name

    with pytest.raises(InvalidNameError):  # a dataset named like a version directory would be taken for one
        validate_name("d/v3-0af3c9d1")
    a, b = Storage(storage_uri), Storage(storage_uri)
    a1 = a.write_version("d", 1, _table(1).schema, _table(1).to_batches())
    b1 = b.write_version("d", 1, _table(2).schema, _table(2).to_batches())  # the same number: two directories
    assert a1.directory != b1.directory
    assert a.manifest("d") == b1 and b.read_version(a.manifest("d")).equals(_table(2))  # the later commit
    assert a.read_version(a1).equals(_table(1))  # the overwritten-looking one is whole, not mixed
    unfinished = f"{b.root}/d/v9-{b.writer}"  # b writing a newer version: no manifest yet
    b.fs.create_dir(unfinished)
    with b.fs.open_output_stream(f"{unfinished}/part-00000.parquet") as out:
        out.write(b"being written")
    a2 = a.write_version("d", 2, _table(3).schema, _table(3).to_batches())
    b3 = b.write_version("d", 3, _table(4).schema, _table(4).to_batches())
    assert a.manifest("d") == b3 and a.read_version(a.manifest("d")).equals(_table(4))
    assert b.read_version(a2).equals(_table(3))  # a's v2: b superseded it just now, a reader may be on it
    dirs = {p.rsplit("/", 1)[-1] for _, p in a._version_dirs("d")}
    # Within the grace period nothing superseded goes, whoever wrote it: another server may be reading it.
    assert {a1.directory, b1.directory, a2.directory, b3.directory, unfinished.rsplit("/", 1)[-1]} == dirs
    a.write_version("e", 1, _table(5).schema, _table(5).to_batches())  # another dataset: nothing of d changes
    assert {p.rsplit("/", 1)[-1] for _, p in a._version_dirs("d")} == dirs
    # Once a newer version has been committed for the grace period, another writer's old version goes.
    late = Storage(storage_uri, grace_seconds=0)
    late4 = late.write_version("d", 4, _table(6).schema, _table(6).to_batches())
    left = {p.rsplit("/", 1)[-1] for _, p in late._version_dirs("d")}
    assert left == {late4.directory, unfinished.rsplit("/", 1)[-1]}  # never a directory without a manifest
    assert late.read_version(late.manifest("d")).equals(_table(6))


@pytest.mark.s3
def test_two_writers_committing_concurrently(storage_uri: str) -> None:
    """Two writers committing one dataset and one of their own at the same time: at every moment the newest
    committed version reads whole, and each writer's own dataset keeps its last version."""
    import threading

    writers = [Storage(storage_uri), Storage(storage_uri)]
    errors: list[BaseException] = []

    def run(i: int, storage: Storage) -> None:
        try:
            for n in range(1, 6):
                storage.write_version("shared", n, _table(10 * i + n).schema, _table(10 * i + n).to_batches())
                storage.write_version(f"own{i}", n, _table(n).schema, _table(n).to_batches())
                newest = storage.manifest("shared")
                assert newest is not None and storage.read_version(newest).num_rows == 500
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    reader = Storage(storage_uri)
    newest = reader.manifest("shared")
    assert newest is not None and newest.version == 5
    last = 0 if newest.directory.endswith(writers[0].writer) else 1  # the writer whose v5 committed last
    assert reader.read_version(newest).equals(_table(10 * last + 5))
    for i in range(2):
        m = reader.manifest(f"own{i}")
        assert m is not None and m.version == 5 and reader.read_version(m).equals(_table(5))


def test_a_second_server_starting_leaves_a_write_under_way(storage_dir: Path) -> None:
    """Recovery at start does not remove another server's unfinished write made within the grace period,
    nor report it lost; with grace 0 (the only writer) it does both."""
    first = Storage(str(storage_dir))
    first.write_version("w", 1, _table(1).schema, _table(1).to_batches())
    under_way = storage_dir / "w" / f"v2-{first.writer}"
    under_way.mkdir()
    (under_way / "part-00000.parquet").write_bytes(b"being written")
    srv = _server(storage_dir)
    try:
        assert srv.cache.recovery["incomplete_versions"] == [] and under_way.exists()
    finally:
        srv.shutdown()
    alone = build_server(ServerConfig(storage=str(storage_dir), storage_grace=0))
    try:
        assert [v["version"] for v in alone.cache.recovery["incomplete_versions"]] == [2]
        assert not under_way.exists()
    finally:
        alone.shutdown()


def test_filtered_read_of_dictionaries_streams_them(client: flightcache.Client) -> None:
    """A filtered read over dictionary columns (batches with different dictionaries) comes back decoded right."""
    first = pa.table({"k": pa.array(["a", "b"]).dictionary_encode(), "n": [1, 2]})
    second = pa.table({"k": pa.array(["z", "y", "z"]).dictionary_encode(), "n": [3, 4, 5]})
    client.put("d2", first)
    client.put("d2", second, mode="append")
    got = flightcache.connect(client.uri, shm=False).get("d2", filter="n >= 2")
    assert got.column("k").to_pylist() == ["b", "z", "y", "z"]
