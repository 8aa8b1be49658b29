"""The catalog: what is known about each dataset, apart from the Arrow buffers that hold its data.

A dataset's record names its current version (number, schema, rows, bytes, creation time), whether this
server's memory holds it, its persistence state, pin, TTL, last read and counters; the catalog also
hands out version numbers. The memory store (``store``) keeps the buffers and their accounting and asks
the catalog everything else, through the ``Catalog`` interface:

* ``LocalCatalog``, a dictionary in this process: the single server;
* an etcd-backed catalog (cluster mode) keeps the same records as etcd keys, and ``publish`` becomes
  one etcd transaction comparing the dataset's current version, so two writers never publish the same
  number and no update is lost.

The store calls the catalog under its own lock, so a ``LocalCatalog`` needs none of its own. Every change
to a record goes through ``publish``, ``update`` or ``remove``; only a record's ``last_read`` and
``counters``, which are this server's own figures, are changed in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from ..errors import DatasetNotFoundError, InvalidRequestError

# Dataset states, as `info` reports them.
MEMORY_ONLY, PERSISTING, PERSISTED, PERSIST_FAILED, IN_STORAGE_ONLY = (
    "memory-only",
    "persisting",
    "persisted",
    "persist-failed",
    "in-storage-only",
)
STATES = (MEMORY_ONLY, PERSISTING, PERSISTED, PERSIST_FAILED, IN_STORAGE_ONLY)
COUNTERS = ("hits", "misses", "bytes_served", "bytes_loaded", "bytes_persisted", "evictions", "load_s", "persist_s")


@dataclass(frozen=True)
class VersionRecord:
    """What the catalog knows of one version, wherever its data is (memory, storage)."""

    name: str
    number: int
    schema: pa.Schema
    num_rows: int
    nbytes: int
    created: float


@dataclass
class DatasetRecord:
    """A dataset's entry in the catalog."""

    current: VersionRecord
    in_memory: bool  # whether this server's memory holds ``current`` (else only storage does)
    state: str = MEMORY_ONLY
    persisted_version: int | None = None
    persist_error: str | None = None
    pinned: bool = False
    expires: float | None = None  # when its TTL ends (None: never)
    last_read: float | None = None
    counters: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))


# What ``update`` may change; ``last_read`` and ``counters`` are this server's own figures, changed in place.
_UPDATABLE = frozenset({"current", "in_memory", "state", "persisted_version", "persist_error", "pinned", "expires"})


class Catalog(Protocol):
    """Dataset records and version numbers. Callers serialise calls for one dataset."""

    def get(self, name: str) -> DatasetRecord | None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[str, DatasetRecord]]: ...  # by name

    def next_version(self, name: str) -> int: ...

    def publish(self, version: VersionRecord, *, in_memory: bool, state: str) -> DatasetRecord:
        """Make ``version`` the current one; its number must be ``next_version`` (compare-and-set)."""
        ...

    def add_stored(self, version: VersionRecord) -> DatasetRecord | None:
        """Record a version that only storage holds (at start-up); None if the name is known already."""
        ...

    def update(self, name: str, **changes: Any) -> DatasetRecord | None:
        """Change fields of ``name``'s record (state, pinned, expires, in_memory, ...); None if unknown."""
        ...

    def remove(self, name: str) -> DatasetRecord | None: ...


class LocalCatalog:
    """The catalog of a single server: records in a dictionary of this process."""

    def __init__(self) -> None:
        self._records: dict[str, DatasetRecord] = {}
        self._next: dict[str, int] = {}  # outlives a drop: a dropped name's numbers are never reused

    def get(self, name: str) -> DatasetRecord | None:
        return self._records.get(name)

    def require(self, name: str) -> DatasetRecord:
        record = self._records.get(name)
        if record is None:
            raise DatasetNotFoundError(f"dataset {name!r} not found; list datasets with 'flightcache ls'")
        return record

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[tuple[str, DatasetRecord]]:
        return iter(sorted(self._records.items()))

    def next_version(self, name: str) -> int:
        return self._next.get(name, 1)

    def publish(self, version: VersionRecord, *, in_memory: bool, state: str) -> DatasetRecord:
        expected = self.next_version(version.name)
        if version.number != expected:
            raise InvalidRequestError(f"version {version.number} of {version.name!r} is taken; next is {expected}")
        self._next[version.name] = version.number + 1
        record = self._records.get(version.name)
        if record is None:
            record = self._records[version.name] = DatasetRecord(version, in_memory, state)
        else:
            record.current, record.in_memory, record.state, record.persist_error = version, in_memory, state, None
        return record

    def add_stored(self, version: VersionRecord) -> DatasetRecord | None:
        if version.name in self._records:
            return None
        self._next[version.name] = max(self.next_version(version.name), version.number + 1)
        record = DatasetRecord(version, False, IN_STORAGE_ONLY, persisted_version=version.number)
        self._records[version.name] = record
        return record

    def update(self, name: str, **changes: Any) -> DatasetRecord | None:
        record = self._records.get(name)
        if record is not None:
            for key, value in changes.items():
                if key not in _UPDATABLE:
                    raise AttributeError(f"a catalog update cannot change {key!r}")
                setattr(record, key, value)
        return record

    def remove(self, name: str) -> DatasetRecord | None:
        return self._records.pop(name, None)
