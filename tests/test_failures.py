"""Failures a new user ran into (issue 14): each one is reported as what it is, never as success."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import logs_table, run_cli

import flightcache
from flightcache.errors import DatasetNotFoundError, SchemaMismatchError, StorageError
from flightcache.server.flight import FlightcacheServer
from flightcache.server.storage import Storage, unstorable
from flightcache.server.store import Store

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
    return FlightcacheServer(
        "grpc://127.0.0.1:0",
        store=Store(memory_limit),
        storage=Storage(str(storage_dir), retries=1, backoff=0.01),
        persist=persist,
    )


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
