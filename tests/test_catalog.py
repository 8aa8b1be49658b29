"""The catalog seam: dataset metadata and version numbers, apart from the memory store's buffers."""

from __future__ import annotations

import pyarrow as pa
import pytest

from flightcache.errors import InvalidRequestError
from flightcache.server.catalog import IN_STORAGE_ONLY, MEMORY_ONLY, PERSISTED, LocalCatalog, VersionRecord
from flightcache.server.store import Store

SCHEMA = pa.schema([("x", pa.int64())])


def record(name: str, number: int) -> VersionRecord:
    return VersionRecord(name, number, SCHEMA, 10, 80, 0.0)


def test_publish_compares_the_version_number() -> None:
    """A publish must carry the next number: a second writer with the same number is refused."""
    catalog = LocalCatalog()
    assert catalog.next_version("a") == 1
    catalog.publish(record("a", 1), in_memory=True, state=MEMORY_ONLY)
    with pytest.raises(InvalidRequestError, match="taken; next is 2"):
        catalog.publish(record("a", 1), in_memory=True, state=MEMORY_ONLY)
    catalog.publish(record("a", 2), in_memory=True, state=MEMORY_ONLY)
    assert catalog.get("a") is not None and catalog.get("a").current.number == 2  # type: ignore[union-attr]


def test_numbers_are_never_reused_after_a_drop() -> None:
    """A dropped name's next version continues the old numbering, so a stale ticket never names new data."""
    catalog = LocalCatalog()
    catalog.publish(record("a", 1), in_memory=True, state=MEMORY_ONLY)
    catalog.remove("a")
    assert catalog.get("a") is None and len(catalog) == 0
    assert catalog.next_version("a") == 2


def test_stored_versions_and_updates() -> None:
    """A stored version is known, not in memory, persisted; updates change only the declared fields."""
    catalog = LocalCatalog()
    assert catalog.add_stored(record("s", 7)) is not None
    assert catalog.add_stored(record("s", 3)) is None  # known already
    r = catalog.get("s")
    assert r is not None and (r.in_memory, r.state, r.persisted_version) == (False, IN_STORAGE_ONLY, 7)
    assert catalog.next_version("s") == 8
    catalog.update("s", state=PERSISTED, pinned=True)
    assert (r.state, r.pinned) == (PERSISTED, True)
    with pytest.raises(AttributeError, match="counters"):
        catalog.update("s", counters={})
    assert catalog.update("unknown", pinned=True) is None


def test_the_store_keeps_its_metadata_in_the_catalog_it_is_given() -> None:
    """Everything the store publishes, pins and drops is in the catalog passed to it; buffers stay in the store."""
    catalog = LocalCatalog()
    store = Store(catalog=catalog)
    v = store.put("t", pa.table({"x": list(range(10))}))
    r = catalog.get("t")
    assert r is not None and r.current == v.record() and r.in_memory and r.state == MEMORY_ONLY
    store.set_pinned("t", True)
    assert r.pinned and store.info("t").pinned
    store.put("t", pa.table({"x": [1]}))
    assert catalog.next_version("t") == 3 and r.current.num_rows == 1
    store.drop("t")
    assert catalog.get("t") is None and store.stats()["datasets"] == 0 and store.memory_used == 0
