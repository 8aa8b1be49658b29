"""The in-memory catalog on its own: no Flight, no I/O."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import every_type_table, logs_table

from flightcache.errors import (
    DatasetExistsError,
    DatasetNotFoundError,
    InvalidNameError,
    InvalidRequestError,
    MemoryFullError,
    SchemaMismatchError,
)
from flightcache.names import validate_name
from flightcache.server.arrays import buffer_sizes
from flightcache.server.store import Store
from flightcache.units import format_bytes, parse_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_put_get_round_trip_every_type() -> None:
    """A put table comes back identical, type for type."""
    store = Store()
    table = every_type_table()
    store.put("t", table)
    assert store.get("t").table().equals(table)


def test_overwrite_creates_new_version() -> None:
    """overwrite replaces the table and bumps the version."""
    store = Store()
    assert store.put("a", logs_table(10)).number == 1
    v2 = store.put("a", logs_table(20, seed=1))
    assert v2.number == 2
    assert store.get("a").num_rows == 20


def test_append_adds_rows_and_checks_schema() -> None:
    """append concatenates; a different schema is refused with both schemas shown."""
    store = Store()
    store.put("a", logs_table(10))
    store.put("a", logs_table(5, seed=2), mode="append")
    assert store.get("a").num_rows == 15
    with pytest.raises(SchemaMismatchError) as err:
        store.put("a", logs_table(5).drop_columns(["bytes"]), mode="append")
    message = str(err.value)
    assert "current schema" in message and "appended schema" in message and "bytes: int64" in message
    assert store.get("a").num_rows == 15


def test_append_to_missing_dataset_creates_it() -> None:
    """append on a new name behaves like create."""
    store = Store()
    store.put("fresh", logs_table(3), mode="append")
    assert store.get("fresh").num_rows == 3


def test_create_refuses_existing_name() -> None:
    """create fails on an existing name and leaves it untouched."""
    store = Store()
    store.put("a", logs_table(10), mode="create")
    with pytest.raises(DatasetExistsError, match="already exists"):
        store.put("a", logs_table(1), mode="create")
    assert store.get("a").num_rows == 10


def test_unknown_mode_refused() -> None:
    with pytest.raises(InvalidRequestError, match="unknown put mode 'upsert'"):
        Store().put("a", logs_table(1), mode="upsert")


@pytest.mark.parametrize("name", ["a", "logs/raw", "team_1/2026-11-24/v1.parquet", "_x", "a" * 200])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "A",
        "logs//raw",
        "/abs",
        "trailing/",
        "../etc",
        "a/../b",
        ".hidden",
        "sp ace",
        "ü",
        "a\x00b",
        "a" * 201,
        "semi;colon",
        "back\\slash",
    ],
)
def test_invalid_names_refused(name: str) -> None:
    """Names outside the grammar are refused with the grammar in the message."""
    with pytest.raises(InvalidNameError, match="lowercase letters"):
        Store().put(name, logs_table(1))


def test_missing_dataset_errors_name_it() -> None:
    store = Store()
    for call in (lambda: store.get("nope"), lambda: store.info("nope"), lambda: store.drop("nope")):
        with pytest.raises(DatasetNotFoundError, match="'nope'"):
            call()


def test_info_list_drop() -> None:
    """info reports schema, rows, bytes, version and times; drop frees memory."""
    clock = Clock()
    store = Store(clock=clock)
    table = logs_table(100)
    store.put("b", table)
    store.put("a", table)
    assert [i.name for i in store.list()] == ["a", "b"]
    info = store.info("a")
    assert (info.num_rows, info.version, info.created, info.last_read) == (100, 1, 1000.0, None)
    assert info.schema.equals(table.schema)
    clock.now = 1005.0
    store.get("a")
    assert store.info("a").last_read == 1005.0
    store.drop("a")
    store.drop("b")
    assert store.list() == []
    assert store.memory_used == 0


def test_memory_accounting_counts_shared_buffers_once() -> None:
    """Exact Arrow buffer bytes: the same buffers under two names or two versions count once."""
    store = Store(retain_seconds=0)
    table = logs_table(1000).combine_chunks()
    expected = sum(buffer_sizes(table.to_batches()).values())
    store.put("a", table)
    assert store.memory_used == expected
    store.put("b", table)  # same buffers, second name
    assert store.memory_used == expected
    extra = logs_table(10, seed=3)
    store.put("a", extra, mode="append")  # keeps the old buffers, adds the new ones
    assert store.memory_used == expected + sum(buffer_sizes(extra.to_batches()).values())
    store.drop("a")
    assert store.memory_used == expected  # still held by "b"
    store.drop("b")
    assert store.memory_used == 0


def test_buffer_sizes_sees_nested_dictionaries() -> None:
    """Dictionaries inside lists are counted too."""
    table = every_type_table()
    col = table.column("list_of_dict").chunk(0)
    sizes = buffer_sizes([pa.record_batch([col], names=["x"])])
    dictionary_buffers = {b.address for b in col.values.dictionary.buffers() if b is not None}
    assert dictionary_buffers <= set(sizes)


def test_memory_limit_refuses_put_and_keeps_old_data() -> None:
    """A put that does not fit fails with MemoryFullError and changes nothing."""
    table = logs_table(5000)
    size = sum(buffer_sizes(table.to_batches()).values())
    store = Store(memory_limit=int(size * 1.5), retain_seconds=0)
    store.put("a", table)
    with pytest.raises(MemoryFullError) as err:
        store.put("b", logs_table(5000, seed=1))
    assert "memory full" in str(err.value) and "'b'" in str(err.value) and "a (" in str(err.value)
    assert store.stats()["memory_staged"] == 0
    assert [i.name for i in store.list()] == ["a"]
    assert store.memory_used == size


def test_retained_versions_are_released_when_memory_is_needed() -> None:
    """Old versions kept for readers give way to new puts."""
    table = logs_table(5000)
    size = sum(buffer_sizes(table.to_batches()).values())
    store = Store(memory_limit=int(size * 2.5), retain_seconds=3600)
    store.put("a", table)
    store.put("a", logs_table(5000, seed=1))  # version 1 retained
    assert store.stats()["retained_versions"] == 1
    store.put("b", logs_table(5000, seed=2))  # needs the retained room
    assert store.stats()["retained_versions"] == 0


def test_snapshot_read_of_replaced_version() -> None:
    """A reader on version N can still read N after N+1 is published, until retention ends."""
    clock = Clock()
    store = Store(retain_seconds=30, clock=clock)
    store.put("a", logs_table(10))
    v1 = store.get("a")
    store.put("a", logs_table(20))
    assert store.get("a", version=1).num_rows == 10
    assert store.get("a").num_rows == 20
    assert v1.table().num_rows == 10  # objects a reader holds stay valid regardless
    clock.now += 31
    with pytest.raises(DatasetNotFoundError, match="version 1 of dataset 'a' is no longer held"):
        store.get("a", version=1)


def test_large_batches_sliced_small_ones_coalesced() -> None:
    """Batches are re-chunked to about batch_rows rows without changing the data."""
    store = Store(batch_rows=1000)
    big = logs_table(3500).combine_chunks()
    v = store.put("big", big)
    assert [b.num_rows for b in v.batches] == [1000, 1000, 1000, 500]
    small = pa.Table.from_batches([b for b in logs_table(2000).to_batches(max_chunksize=10)])
    v = store.put("small", small)
    assert [b.num_rows for b in v.batches] == [1000, 1000]
    assert v.table().equals(small)


def test_scan_projection_and_filter() -> None:
    store = Store(batch_rows=1000)
    table = logs_table(5000)
    v = store.put("a", table)
    out = store.scan(v, columns=["status"], filter=pc.field("status") >= 500).read_all()
    assert out.column_names == ["status"]
    assert out.num_rows == pc.sum(pc.greater_equal(table["status"], 500)).as_py() > 0
    part = store.scan(v, batch_range=(1, 3)).read_all()
    assert part.equals(table.slice(1000, 2000))


def test_scan_errors_are_clear() -> None:
    store = Store()
    v = store.put("a", logs_table(10))
    with pytest.raises(InvalidRequestError, match="no column"):
        store.scan(v, columns=["nope"])
    with pytest.raises(InvalidRequestError, match="batch range"):
        store.scan(v, batch_range=(0, 99))
    with pytest.raises(InvalidRequestError, match="cannot apply filter"):
        store.scan(v, filter=pc.field("nope") > 1)


def test_staged_put_is_invisible_until_published_and_abort_frees_it() -> None:
    """A put in progress is neither listed nor readable; abort discards it."""
    store = Store()
    table = logs_table(100)
    staged = store.begin_put("a", table.schema)
    for batch in table.to_batches():
        staged.add(batch)
    assert store.list() == []
    assert store.stats()["memory_staged"] > 0
    staged.abort()
    assert store.stats()["memory_staged"] == 0 and store.list() == []


def test_concurrent_writers_and_readers_see_complete_versions() -> None:
    """Thread-safety: readers always see a whole version whose rows all carry its number."""
    store = Store(batch_rows=100)
    store.put("a", pa.table({"v": pa.array([0] * 1000)}))
    errors: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        for i in range(1, 60):
            store.put("a", pa.table({"v": pa.array([i] * 1000)}))
        stop.set()

    def reader() -> None:
        while not stop.is_set():
            t = store.get("a").table()
            values = set(t["v"].to_pylist())
            if t.num_rows != 1000 or len(values) != 1:
                errors.append(f"torn read: {t.num_rows} rows, values {values}")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.get("a").table()["v"][0].as_py() == 59


def test_sizes_parse_and_format() -> None:
    assert parse_bytes("4GiB") == 4 * 1024**3
    assert parse_bytes("512MB") == 512 * 1000**2
    assert parse_bytes("1.5 KiB") == 1536
    assert parse_bytes("100") == 100
    with pytest.raises(ValueError, match="4GiB"):
        parse_bytes("lots")
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(10) == "10 B"


def test_misaligned_buffers_are_realigned_once() -> None:
    """Batches whose buffers sit at odd addresses (as Flight delivers them) are stored aligned."""
    from flightcache.server.arrays import aligned

    values = pa.py_buffer(b"\x00" + (42).to_bytes(8, "little") * 1000)
    odd = pa.Array.from_buffers(pa.int64(), 1000, [None, values.slice(1)])
    assert odd.buffers()[1].address % 8 != 0
    batch = pa.record_batch([odd, pa.array(["x"] * 1000)], names=["n", "s"])
    fixed = aligned(batch)
    assert fixed.equals(batch)
    assert all(b.address % 8 == 0 for col in fixed.columns for b in col.buffers() if b is not None)
    assert aligned(fixed) is fixed  # no copy when nothing needs it
    stored = Store().put("a", pa.Table.from_batches([batch] * 20))
    assert all(a % 8 == 0 for a in buffer_sizes(stored.batches))
