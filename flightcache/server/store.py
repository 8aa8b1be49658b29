"""The in-memory catalog: named, versioned, immutable Arrow tables.

Pure Python and pyarrow: no I/O, no Flight. Every public method is thread-safe. Heavy work (slicing,
coalescing, scanning) happens outside the catalog lock; the lock only guards the small dictionaries.

Memory is accounted in Arrow buffer bytes. A buffer shared by two versions (an append keeps the old
batches) or by two datasets is counted once, by address, through a reference count.

Batches can live in files instead of process memory (shared memory, see ``shm``): the store is
given ``files``, which opens a ``BatchFile`` per put; the store counts the references to each
file as it counts buffers, and hands a file back to ``files.remove`` when no version uses it.

A version that is replaced stays readable for ``retain_seconds`` so that a reader holding a ticket
for version N can finish it while N+1 is published (snapshot reads). Retained versions count
against the memory limit and are the first thing released when room is needed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from ..errors import (
    DatasetExistsError,
    DatasetNotFoundError,
    InvalidRequestError,
    LimitExceededError,
    MemoryFullError,
    NotInMemoryError,
    PutAbortedError,
    SchemaMismatchError,
)
from ..names import validate_name
from ..units import DEFAULT_BATCH_ROWS, format_bytes
from .arrays import aligned, buffer_sizes
from .catalog import (
    COUNTERS,
    IN_STORAGE_ONLY,
    MEMORY_ONLY,
    PERSISTED,
    STATES,
    Catalog,
    DatasetRecord,
    LocalCatalog,
    VersionRecord,
)

if TYPE_CHECKING:
    import pyarrow.compute as pc  # loaded where a filter is used: ~8 MiB an idle server does without

PUT_MODES = ("overwrite", "append", "create")
class BatchFile(Protocol):
    """Where one put's batches are kept instead of process memory."""

    token: str  # names the file to ``BatchFiles.remove``

    def keep(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Store ``batch``; return it as now held (aligned, zero-copy from the file)."""
        ...

    def finish(self) -> None: ...  # complete; idempotent
    def discard(self) -> None: ...  # nothing will use it: close and remove


class BatchFiles(Protocol):
    def open(self, name: str, schema: pa.Schema) -> BatchFile | None: ...  # None: keep in memory
    def remove(self, token: str) -> None: ...  # quick: called under the store's lock


@dataclass(frozen=True)
class Version:
    """One immutable version of a dataset."""

    name: str
    number: int
    schema: pa.Schema
    batches: tuple[pa.RecordBatch, ...]
    num_rows: int
    nbytes: int
    created: float
    files: tuple[str, ...] = ()  # the batch files behind ``batches``, in order
    in_files: bool = False  # whether every batch is in ``files``

    def table(self) -> pa.Table:
        return pa.Table.from_batches(self.batches, self.schema)

    def summary(self) -> dict[str, Any]:
        """What a put, commit, load or ``sql into`` answers: {"name", "version", "rows", "bytes"}."""
        return {"name": self.name, "version": self.number, "rows": self.num_rows, "bytes": self.nbytes}

    def record(self) -> VersionRecord:
        """What the catalog keeps of this version."""
        return VersionRecord(self.name, self.number, self.schema, self.num_rows, self.nbytes, self.created)

    def batch_ranges(self, max_bytes: int, max_ranges: int, at_least: int = 1) -> list[tuple[int, int]]:
        """Split the batches into contiguous [start, end) ranges of about ``max_bytes`` each, and at least
        ``at_least`` of them where there are that many batches (never more than ``max_ranges``)."""
        n = len(self.batches)
        if n == 0:
            return [(0, 0)]
        wanted = max(1, min(max_ranges, n, max(at_least, -(-self.nbytes // max(1, max_bytes)))))
        bounds = [round(i * n / wanted) for i in range(wanted + 1)]
        return [(bounds[i], bounds[i + 1]) for i in range(wanted)]


@dataclass
class DatasetInfo:
    name: str
    version: int
    schema: pa.Schema
    num_rows: int
    nbytes: int
    num_batches: int
    created: float
    last_read: float | None
    state: str = MEMORY_ONLY
    in_memory: bool = True
    persisted_version: int | None = None
    persist_error: str | None = None
    pinned: bool = False
    expires: float | None = None
    counters: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "rows": self.num_rows,
            "bytes": self.nbytes,
            "batches": self.num_batches,
            "created": self.created,
            "last_read": self.last_read,
            "state": self.state,
            "in_memory": self.in_memory,
            "persisted_version": self.persisted_version,
            "persist_error": self.persist_error,
            "pinned": self.pinned,
            "expires": self.expires,
            "counters": self.counters,
            "schema": self.schema.to_string(show_schema_metadata=False),
        }


@dataclass
class _Txn:
    name: str
    mode: str
    schema: pa.Schema
    parts: dict[str, StagedPut]
    touched: float


@dataclass
class _Retained:
    version: Version
    until: float


class Store:
    """Named, versioned Arrow tables in memory, with a memory limit; their metadata is in ``catalog``."""

    def __init__(
        self,
        memory_limit: int | None = None,
        *,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        retain_seconds: float = 60.0,
        txn_timeout: float = 3600.0,
        clock: Callable[[], float] = time.time,
        on_full: Callable[[int], int] | None = None,
        max_datasets: int | None = None,
        files: BatchFiles | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        self.memory_limit = memory_limit
        self.batch_rows = batch_rows
        self.retain_seconds = retain_seconds
        self.txn_timeout = txn_timeout
        self._clock = clock
        self.on_full = on_full  # called (without the lock) with the shortfall; returns bytes it freed
        self.max_datasets = max_datasets  # bound on names in the catalog (memory and storage-only)
        self.files = files
        self._lock = threading.RLock()
        self.catalog: Catalog = catalog if catalog is not None else LocalCatalog()
        self._memory: dict[str, Version] = {}  # the current version of each dataset this memory holds
        self._retained: list[_Retained] = []
        self._refs: dict[int, list[int]] = {}  # address -> [size, count]
        self._file_refs: dict[str, int] = {}  # batch file token -> versions using it
        self._used = 0  # bytes of buffers held by published and retained versions
        self._staged = 0  # bytes of puts in progress
        self._txns: dict[str, _Txn] = {}
        self._aborted: dict[str, float] = {}  # txn -> until when late parts are refused
        self._committed: dict[str, float] = {}  # txn -> until when a second commit or a late part is refused
        self._dropped_counters: dict[str, float] = dict.fromkeys(COUNTERS, 0.0)  # totals never go down

    # -- writing ---------------------------------------------------------------------------

    def begin_put(self, name: str, schema: pa.Schema, mode: str = "overwrite") -> StagedPut:
        """Start a put. Checks name, mode and (for append) schema before any data arrives."""
        validate_name(name)
        if mode not in PUT_MODES:
            raise InvalidRequestError(
                f"unknown put mode {mode!r} for dataset {name!r}: use one of {', '.join(PUT_MODES)}"
            )
        with self._lock:
            self._check_mode(name, schema, mode)
            self._check_room_for(name)  # now, before any data arrives; again at publish
        return StagedPut(self, name, schema, mode)

    def put(self, name: str, data: pa.Table | pa.RecordBatchReader, mode: str = "overwrite") -> Version:
        """Put a whole table or stream in one call."""
        staged = self.begin_put(name, data.schema, mode)
        try:
            batches = data.to_batches() if isinstance(data, pa.Table) else data
            for batch in batches:
                staged.add(batch)
            return staged.publish()
        except BaseException:
            staged.abort()
            raise

    # -- multi-part writes (one part per Spark task, say), published together -----------------

    def _stage_part(self, txn: str, staged: StagedPut) -> str:
        with self._lock:
            self._expire_retained()
            if txn in self._aborted:
                raise PutAbortedError(f"transaction {txn!r} of dataset {staged.name!r} was aborted; part refused")
            if txn in self._committed:
                raise PutAbortedError(f"transaction {txn!r} of dataset {staged.name!r} was committed; part refused")
            t = self._txns.get(txn)
            if t is None:
                t = self._txns[txn] = _Txn(staged.name, staged.mode, staged.schema, {}, self._clock())
            elif (t.name, t.mode) != (staged.name, staged.mode):
                raise InvalidRequestError(
                    f"transaction {txn!r} writes dataset {t.name!r} in mode {t.mode!r}; a part for "
                    f"{staged.name!r} in mode {staged.mode!r} cannot join it"
                )
            elif not t.schema.equals(staged.schema):
                raise SchemaMismatchError(
                    f"a part of transaction {txn!r} for dataset {t.name!r} has a different schema.\n"
                    f"first part:\n{_show(t.schema)}\nthis part:\n{_show(staged.schema)}"
                )
            part = f"{len(t.parts):06d}"
            t.parts[part] = staged
            t.touched = self._clock()
            return part

    def take_parts(
        self,
        txn: str,
        name: str,
        mode: str = "overwrite",
        *,
        parts: list[str] | None = None,
        schema: pa.Schema | None = None,
    ) -> StagedPut:
        """The staged parts of ``txn`` (all, or those listed, in that order) as one unpublished put.

        Parts not listed are discarded (a retried task's first attempt, say). With no part staged,
        ``schema`` gives the schema of the empty version.
        """
        validate_name(name)
        with self._lock:
            # An ended transaction is refused: committing it again (a retried commit, or one after an abort
            # or expiry) would otherwise publish an empty version when a schema is given.
            if txn in self._aborted:
                raise InvalidRequestError(f"transaction {txn!r} of dataset {name!r} has no staged parts (aborted)")
            if txn in self._committed:
                raise InvalidRequestError(f"transaction {txn!r} of dataset {name!r} was committed (or failed to)")
            t = self._txns.pop(txn, None)
            self._committed[txn] = self._clock() + self.txn_timeout
        if t is None:
            if parts:
                raise InvalidRequestError(f"transaction {txn!r} of dataset {name!r} has no staged parts (expired?)")
            if schema is None:
                raise InvalidRequestError(f"transaction {txn!r} of dataset {name!r} is empty: give its schema")
            t = _Txn(name, mode, schema, {}, self._clock())
        chosen: list[StagedPut] = []
        try:
            if (t.name, t.mode) != (name, mode):
                raise InvalidRequestError(
                    f"transaction {txn!r} staged dataset {t.name!r} in mode {t.mode!r}, not {name!r} in {mode!r}"
                )
            keys = sorted(t.parts) if parts is None else parts
            unknown = [k for k in keys if k not in t.parts]
            if unknown:
                raise InvalidRequestError(f"transaction {txn!r} of dataset {name!r} has no part(s) {unknown}")
            chosen = [t.parts.pop(k) for k in keys]
        finally:
            self._discard_parts(t.parts.values())  # parts not chosen
        combined = StagedPut(self, name, t.schema, mode)
        combined.batches = [b for p in chosen for b in p.batches]
        combined.nbytes = sum(p.nbytes for p in chosen)
        combined.num_rows = sum(p.num_rows for p in chosen)
        combined.files = [f for p in chosen for f in p.files]
        combined.in_files = all(p.in_files for p in chosen)
        return combined

    def abort(self, txn: str) -> int:
        """Discard every staged part of ``txn``; returns how many there were (0 if none)."""
        with self._lock:
            t = self._txns.pop(txn, None)
            self._aborted[txn] = self._clock() + self.txn_timeout
        if t is None:
            return 0
        self._discard_parts(t.parts.values())
        return len(t.parts)

    def _discard_parts(self, parts: Iterable[StagedPut]) -> None:
        parts = list(parts)
        self._unreserve(sum(p.nbytes for p in parts))
        for f in (f for p in parts for f in p.files):
            f.discard()

    def _check_mode(self, name: str, schema: pa.Schema, mode: str) -> None:
        record = self.catalog.get(name)
        held = None if record is None else record.current
        if mode == "create" and held is not None:
            raise DatasetExistsError(
                f"dataset {name!r} already exists (version {held.number}); "
                "use mode 'overwrite' to replace it or 'append' to add rows"
            )
        if mode == "append" and held is not None and not held.schema.equals(schema):
            raise SchemaMismatchError(
                f"cannot append to dataset {name!r}: the schema differs from the current one "
                f"(version {held.number}).\n"
                f"current schema:\n{_show(held.schema)}\n"
                f"appended schema:\n{_show(schema)}\n"
                "cast the data to the current schema, or use mode 'overwrite' to replace it"
            )

    def _check_room_for(self, name: str) -> None:
        known = self.catalog.get(name) is not None
        if self.max_datasets is not None and not known and len(self.catalog) >= self.max_datasets:
            raise LimitExceededError(
                f"cannot create dataset {name!r}: the server holds at most {self.max_datasets} datasets "
                "(flightcache serve --max-datasets); drop one first"
            )

    def append_base(self, staged: StagedPut) -> tuple[pa.RecordBatch, ...]:
        """Check that ``staged`` may publish now; the batches an append adds to (none for other modes)."""
        with self._lock:
            self._check_mode(staged.name, staged.schema, staged.mode)
            current = self._memory.get(staged.name)
            return current.batches if staged.mode == "append" and current is not None else ()

    def next_version(self, name: str) -> int:
        """The number the next publish of ``name`` gets (callers serialise publishes of one name)."""
        with self._lock:
            return self.catalog.next_version(name)

    def _publish(self, staged: StagedPut, number: int | None = None) -> Version:
        with self._lock:
            self._expire_retained()
            self._check_mode(staged.name, staged.schema, staged.mode)
            self._check_room_for(staged.name)
            previous = self._memory.get(staged.name)
            batches = tuple(staged.batches)
            files = tuple(f.token for f in staged.files)
            in_files = staged.in_files
            if staged.mode == "append" and self.catalog.get(staged.name) is not None:
                if previous is None:
                    raise NotInMemoryError(f"dataset {staged.name!r} must be loaded before an append")
                batches = previous.batches + batches
                files = previous.files + files
                in_files = in_files and previous.in_files
            expected = self.catalog.next_version(staged.name)
            if number is not None and number != expected:
                raise InvalidRequestError(f"version {number} of {staged.name!r} is taken; next is {expected}")
            number = expected
            sizes = buffer_sizes(batches)
            version = Version(
                name=staged.name,
                number=number,
                schema=staged.schema,
                batches=batches,
                num_rows=sum(b.num_rows for b in batches),
                nbytes=sum(sizes.values()),
                created=self._clock(),
                files=files,
                in_files=in_files,
            )
            self.catalog.publish(version.record(), in_memory=True, state=MEMORY_ONLY)
            self._acquire(sizes, files)
            self._staged -= staged.nbytes
            if previous is not None:
                self._retire(previous)
            self._memory[staged.name] = version
            return version

    def restore(self, name: str, table: pa.Table, number: int) -> Version:
        """Bring a stored version back into memory under its own number (a read-through load)."""
        staged = self.begin_put(name, table.schema, "overwrite")
        try:
            for batch in table.to_batches():
                staged.add(batch)
            staged.flush()
            staged._finish_files()
            with self._lock:
                record = self.catalog.get(name)
                if record is None or record.in_memory or record.current.number != number:
                    raise InvalidRequestError(f"dataset {name!r} changed while version {number} was loading")
                batches = tuple(staged.batches)
                sizes = buffer_sizes(batches)
                files = tuple(f.token for f in staged.files)
                version = Version(
                    name,
                    number,
                    table.schema,
                    batches,
                    table.num_rows,
                    sum(sizes.values()),
                    record.current.created,
                    files,
                    staged.in_files,
                )
                self._acquire(sizes, files)
                self._staged -= staged.nbytes
                staged._done = True
                self._memory[name] = version
                self.catalog.update(name, current=version.record(), in_memory=True, state=PERSISTED)
                return version
        except BaseException:
            staged.abort()
            raise

    def _reserve(self, name: str, nbytes: int) -> None:
        while True:
            with self._lock:
                if self.memory_limit is None or self._used + self._staged + nbytes <= self.memory_limit:
                    self._staged += nbytes
                    return
                self._release_retained(everything=True)
                shortfall = self._used + self._staged + nbytes - self.memory_limit
                if shortfall <= 0:
                    self._staged += nbytes
                    return
            if self.on_full is None or self.on_full(shortfall) <= 0:
                with self._lock:
                    raise MemoryFullError(self._full_message(name, nbytes))

    def _unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._staged -= nbytes

    def _full_message(self, name: str, nbytes: int) -> str:
        largest = sorted(self._memory.values(), key=lambda v: -v.nbytes)[:3]
        holders = ", ".join(f"{v.name} ({format_bytes(v.nbytes)}, {self._held_as(v.name)})" for v in largest)
        return (
            f"memory full: putting dataset {name!r} needs {format_bytes(nbytes)} more, but "
            f"{format_bytes(self._used + self._staged)} of the {format_bytes(self.memory_limit or 0)} "
            f"limit is in use (largest datasets: {holders or 'none'}; puts in progress: "
            f"{format_bytes(self._staged)}). Drop datasets you no longer need or start the server "
            "with a larger --memory-limit"
        )

    # -- reading ---------------------------------------------------------------------------

    def get(self, name: str, version: int | None = None) -> Version:
        """The current version of ``name`` (or the given version while it is retained)."""
        validate_name(name)
        with self._lock:
            self._expire_retained()
            record = self.catalog.get(name)
            if record is None:
                raise DatasetNotFoundError(
                    f"dataset {name!r} not found; list datasets with 'flightcache ls' or put it first"
                )
            current = self._memory.get(name)
            if current is None:
                raise NotInMemoryError(f"dataset {name!r} is held by the storage tier only; load it first")
            record.last_read = self._clock()
            if version is None or version == current.number:
                return current
            for r in self._retained:
                if r.version.name == name and r.version.number == version:
                    r.until = max(r.until, self._clock() + self.retain_seconds)  # still being read
                    return r.version
            raise DatasetNotFoundError(
                f"version {version} of dataset {name!r} is no longer held (the current version "
                f"is {current.number}); fetch the flight info again to read the current one"
            )

    # -- tier metadata: states, pins, TTL, eviction candidates, counters -------------------

    def add_stored(self, stored: VersionRecord) -> None:
        """Register a dataset the storage tier holds but memory does not (at start-up)."""
        with self._lock:
            self.catalog.add_stored(stored)

    def current(self, name: str) -> Version | None:
        """The version of ``name`` in memory, without counting it as a read."""
        with self._lock:
            return self._memory.get(name)

    def stored(self, name: str) -> VersionRecord | None:
        """What storage holds of ``name`` when it is not in memory."""
        with self._lock:
            record = self.catalog.get(name)
            return record.current if record is not None and not record.in_memory else None

    def record(self, name: str) -> DatasetRecord | None:
        """A copy of the catalog's record of ``name`` (None: unknown)."""
        with self._lock:
            record = self.catalog.get(name)
            return None if record is None else replace(record, counters=dict(record.counters))

    def evict(self, name: str, number: int) -> int:
        """Free the memory of version ``number`` of a persisted dataset; returns the bytes freed."""
        with self._lock:
            record, v = self.catalog.get(name), self._memory.get(name)
            if record is None or v is None or v.number != number or record.pinned:
                return 0
            if record.persisted_version != number:
                raise InvalidRequestError(f"dataset {name!r} version {number} is not persisted; it cannot be evicted")
            before = self._used
            self._release(v)
            self._release_retained_of(name)
            del self._memory[name]
            self.catalog.update(name, in_memory=False, state=IN_STORAGE_ONLY)
            record.counters["evictions"] += 1
            return before - self._used

    def set_state(self, name: str, number: int, state: str, error: str | None = None) -> None:
        """Record the persistence state of version ``number`` (ignored if it is no longer current)."""
        with self._lock:
            record = self.catalog.get(name)
            if record is None:
                return
            if state == PERSISTED:
                self.catalog.update(name, persisted_version=max(record.persisted_version or 0, number))
            if record.in_memory and record.current.number == number:
                self.catalog.update(name, state=state, persist_error=error)

    def set_pinned(self, name: str, pinned: bool) -> None:
        with self._lock:
            self._record(name)
            self.catalog.update(name, pinned=pinned)

    def set_ttl(self, name: str, ttl: float | None) -> None:
        """Make ``name`` leave memory ``ttl`` seconds from now (None: never)."""
        with self._lock:
            self._record(name)
            self.catalog.update(name, expires=None if ttl is None else self._clock() + ttl)

    def count(self, name: str, **amounts: float) -> None:
        with self._lock:
            record = self.catalog.get(name)
            if record is not None:
                for key, n in amounts.items():
                    record.counters[key] += n

    def candidates(self) -> list[tuple[str, int, int, bool]]:
        """(name, version, bytes, persisted) of evictable datasets, least recently used first."""
        with self._lock:
            held = [(r, self._memory[name]) for name, r in self.catalog if r.in_memory and not r.pinned]
            held.sort(key=lambda rv: max(rv[0].last_read or 0.0, rv[1].created))
            return [(v.name, v.number, v.nbytes, r.persisted_version == v.number) for r, v in held]

    def expired(self) -> list[tuple[str, int, bool]]:
        """(name, version, persisted) of datasets in memory whose TTL has passed."""
        with self._lock:
            now = self._clock()
            return [
                (name, r.current.number, r.persisted_version == r.current.number)
                for name, r in self.catalog
                if r.in_memory and r.expires is not None and r.expires <= now
            ]

    def _record(self, name: str) -> DatasetRecord:
        validate_name(name)
        record = self.catalog.get(name)
        if record is None:
            raise DatasetNotFoundError(f"dataset {name!r} not found; list datasets with 'flightcache ls'")
        return record

    def _held_as(self, name: str) -> str:
        record = self.catalog.get(name)
        return "pinned" if record is None or record.pinned else record.state

    def scan(
        self,
        version: Version,
        *,
        columns: list[str] | None = None,
        filter: pc.Expression | None = None,
        batch_range: tuple[int, int] | None = None,
    ) -> pa.RecordBatchReader:
        """Stream (part of) a version, optionally projected and filtered, without copying."""
        start, end = batch_range or (0, len(version.batches))
        if not 0 <= start <= end <= len(version.batches):
            raise InvalidRequestError(
                f"batch range [{start}, {end}) is outside version {version.number} of dataset "
                f"{version.name!r}, which has {len(version.batches)} batches"
            )
        batches = version.batches[start:end]
        if columns is not None:
            missing = [c for c in columns if c not in version.schema.names]
            if missing:
                raise InvalidRequestError(
                    f"dataset {version.name!r} has no column(s) {missing}; its columns are {version.schema.names}"
                )
        if filter is None:
            table = pa.Table.from_batches(batches, version.schema)
            return (table if columns is None else table.select(columns)).to_reader()
        import pyarrow.dataset as ds  # only filtered reads need it; it brings pandas, ~50 MiB

        dataset = ds.dataset(list(batches), schema=version.schema)
        try:
            scanner = dataset.scanner(columns=columns, filter=filter, batch_size=self.batch_rows)
            return scanner.to_reader()
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise InvalidRequestError(f"cannot apply filter {filter} to dataset {version.name!r}: {e}") from e

    def check_read(
        self, version: Version, *, columns: list[str] | None = None, filter: pc.Expression | None = None
    ) -> None:
        """Fail now, not mid-stream, on unknown columns or a filter that does not bind to the schema."""
        try:
            rows = (pa.RecordBatch.from_arrays([pa.nulls(1, f.type) for f in version.schema], schema=version.schema),)
        except pa.ArrowInvalid:  # pyarrow cannot make nulls of every type (a list of run-end encoded values)
            rows = tuple(b.slice(0, 1) for b in version.batches[:1])  # its first row, if it has one
        probe = Version(version.name, version.number, version.schema, rows, len(rows), 0, version.created)
        try:  # an empty scan never evaluates the filter; one row of nulls does
            self.scan(probe, columns=columns, filter=filter).read_all()
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise InvalidRequestError(f"cannot apply filter {filter} to dataset {version.name!r}: {e}") from e

    # -- catalog ---------------------------------------------------------------------------

    def list(self) -> list[DatasetInfo]:
        with self._lock:
            return [self._info(r) for _, r in self.catalog]

    def info(self, name: str) -> DatasetInfo:
        with self._lock:
            return self._info(self._record(name))

    def drop(self, name: str) -> DatasetInfo:
        """Remove a dataset and free its memory (open streams keep what they already hold)."""
        validate_name(name)
        with self._lock:
            record = self.catalog.remove(name)
            if record is None:
                raise DatasetNotFoundError(f"cannot drop dataset {name!r}: not found")
            held = self._memory.pop(name, None)
            info = self._info(record, held)
            if held is not None:
                self._release(held)
            self._release_retained_of(name)
            for key, n in record.counters.items():
                self._dropped_counters[key] += n
            return info

    def _release_retained_of(self, name: str) -> None:
        keep = []
        for r in self._retained:
            if r.version.name == name:
                self._release(r.version)
            else:
                keep.append(r)
        self._retained = keep

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._expire_retained()
            return {
                "datasets": len(self.catalog),
                "memory_used": self._used,
                "memory_staged": self._staged,
                "memory_limit": self.memory_limit,
                "dataset_bytes": sum(v.nbytes for v in self._memory.values()),
                "states": {s: sum(r.state == s for _, r in self.catalog) for s in STATES},
                "pinned": sum(r.pinned for _, r in self.catalog),
                "retained_versions": len(self._retained),
                "open_transactions": len(self._txns),
            }

    def counter_totals(self) -> dict[str, float]:
        """Each counter summed over every dataset there has been, dropped ones included."""
        with self._lock:
            live = [r.counters for _, r in self.catalog]
            return {k: n + sum(c[k] for c in live) for k, n in self._dropped_counters.items()}

    @property
    def memory_used(self) -> int:
        """Bytes of distinct buffers held by published and retained versions."""
        with self._lock:
            return self._used

    def _info(self, record: DatasetRecord, held: Version | None = None) -> DatasetInfo:
        v = record.current
        held = held or self._memory.get(v.name)
        batches = len(held.batches) if held is not None else 0
        return DatasetInfo(
            v.name,
            v.number,
            v.schema,
            v.num_rows,
            v.nbytes,
            batches,
            v.created,
            record.last_read,
            record.state,
            record.in_memory,
            record.persisted_version,
            record.persist_error,
            record.pinned,
            record.expires,
            dict(record.counters),
        )

    # -- accounting ------------------------------------------------------------------------

    def _acquire(self, sizes: dict[int, int], files: tuple[str, ...]) -> None:
        for address, size in sizes.items():
            ref = self._refs.get(address)
            if ref is None:
                self._refs[address] = [size, 1]
                self._used += size
            else:
                ref[1] += 1
        for token in files:
            self._file_refs[token] = self._file_refs.get(token, 0) + 1

    def _release(self, version: Version) -> None:
        for address in buffer_sizes(version.batches):
            ref = self._refs[address]
            ref[1] -= 1
            if ref[1] == 0:
                del self._refs[address]
                self._used -= ref[0]
        for token in version.files:
            self._file_refs[token] -= 1
            if self._file_refs[token] == 0:
                del self._file_refs[token]
                if self.files is not None:
                    self.files.remove(token)

    def _retire(self, version: Version) -> None:
        if self.retain_seconds > 0:
            self._retained.append(_Retained(version, self._clock() + self.retain_seconds))
        else:
            self._release(version)

    def _expire_retained(self) -> None:
        self._release_retained(everything=False)
        now = self._clock()
        for txn in [k for k, t in self._txns.items() if t.touched + self.txn_timeout <= now]:
            self.abort(txn)  # its writer went away without committing or aborting
        self._aborted = {k: until for k, until in self._aborted.items() if until > now}
        self._committed = {k: until for k, until in self._committed.items() if until > now}

    def _release_retained(self, everything: bool) -> None:
        now = self._clock()
        keep = []
        for r in self._retained:
            if everything or r.until <= now:
                self._release(r.version)
            else:
                keep.append(r)
        self._retained = keep


@dataclass
class StagedPut:
    """A put in progress: batches are held privately until ``publish``; ``abort`` drops them."""

    store: Store
    name: str
    schema: pa.Schema
    mode: str
    batches: list[pa.RecordBatch] = field(default_factory=list)
    nbytes: int = 0
    num_rows: int = 0
    _pending: list[pa.RecordBatch] = field(default_factory=list)
    _pending_rows: int = 0
    _pending_bytes: int = 0
    _seen: set[int] = field(default_factory=set)
    _done: bool = False
    files: list[BatchFile] = field(default_factory=list)  # finished at publish; the version then owns them
    in_files: bool = True  # every batch so far is in ``files``
    _file: BatchFile | None = None  # this put's own file, opened at its first batch

    def add(self, batch: pa.RecordBatch) -> None:
        """Add one batch: large ones are sliced (no copy), runs of small ones coalesced."""
        if self._done:
            raise InvalidRequestError(f"put of dataset {self.name!r} is already finished")
        if not batch.schema.equals(self.schema):
            raise SchemaMismatchError(
                f"a batch put to dataset {self.name!r} does not match the stream's schema.\n"
                f"stream schema:\n{_show(self.schema)}\nbatch schema:\n{_show(batch.schema)}"
            )
        rows = self.store.batch_rows
        if batch.num_rows >= rows // 4:
            self.flush()
            if self._to_file():  # the file write is the copy that aligns; each slice is written once
                for offset in range(0, batch.num_rows, rows):
                    self._keep(self._file.keep(batch.slice(offset, rows)))  # type: ignore[union-attr]
                return
            batch = aligned(batch)
            if batch.num_rows <= rows:
                self._keep(batch)
            else:
                for offset in range(0, batch.num_rows, rows):
                    self._keep(batch.slice(offset, rows))
        elif batch.num_rows > 0:
            pending_bytes = sum(buffer_sizes([batch]).values())
            self.store._reserve(self.name, pending_bytes)  # held while it waits to be coalesced
            self._pending.append(batch)
            self._pending_rows += batch.num_rows
            self._pending_bytes += pending_bytes
            if self._pending_rows >= rows:
                self.flush()

    def adopt(self, file: BatchFile, batches: list[pa.RecordBatch], sizes: dict[int, int]) -> None:
        """Take ``batches`` (their buffers ``sizes``), held in ``file`` already (written by a same-host client:
        ``flightcache.server.adopt``), as this put's, unsliced: readers of the file see the same batches. Their bytes
        are reserved as a put's are, in one go."""
        if self._done or self.batches or self._pending:
            raise InvalidRequestError(f"put of dataset {self.name!r}: only a fresh put adopts a file")
        self.files.append(file)
        added = sum(sizes.values())
        self.store._reserve(self.name, added)
        self._seen.update(sizes)
        self.nbytes += added
        self.num_rows += sum(b.num_rows for b in batches)
        self.batches.extend(batches)

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        merged = pending[0] if len(pending) == 1 else pa.concat_batches(pending)  # concat copies
        if self._to_file():
            merged = self._file.keep(merged)  # type: ignore[union-attr]
        elif len(pending) == 1:
            merged = aligned(merged)
        self.store._unreserve(self._pending_bytes)
        self._pending_bytes = 0
        self._keep(merged)

    def _to_file(self) -> bool:
        """Whether batches go to this put's file (opened on first use) rather than process memory."""
        if self._file is None and self.in_files:
            files = self.store.files
            self._file = files.open(self.name, self.schema) if files is not None else None
            if self._file is None:
                self.in_files = False
            else:
                self.files.append(self._file)
        return self._file is not None

    def _finish_files(self) -> None:
        for f in self.files:
            f.finish()

    def _keep(self, batch: pa.RecordBatch) -> None:
        new = {a: s for a, s in buffer_sizes([batch]).items() if a not in self._seen}
        added = sum(new.values())
        self.store._reserve(self.name, added)
        self._seen.update(new)
        self.nbytes += added
        self.num_rows += batch.num_rows
        self.batches.append(batch)

    def publish(self, number: int | None = None) -> Version:
        """Make the staged batches the dataset's new version (numbered ``number`` if given), atomically."""
        self.flush()
        if self._done:
            raise InvalidRequestError(f"put of dataset {self.name!r} is already finished")
        try:
            self._finish_files()
            version = self.store._publish(self, number)
        except BaseException:
            self.abort()
            raise
        self._done = True
        self.batches = []
        return version

    def stage(self, txn: str) -> str:
        """Keep the batches as a part of transaction ``txn``, published by ``Store.commit``."""
        self.flush()
        if self._done:
            raise InvalidRequestError(f"put of dataset {self.name!r} is already finished")
        try:
            self._finish_files()
            part = self.store._stage_part(txn, self)
        except BaseException:
            self.abort()
            raise
        self._done = True  # the transaction owns the batches and their reservation now
        return part

    def abort(self) -> None:
        """Discard everything staged; nothing becomes visible."""
        if self._done:
            return
        self._done = True
        self.store._unreserve(self.nbytes + self._pending_bytes)
        self.batches, self._pending, self._pending_bytes = [], [], 0
        for f in self.files:
            f.discard()


def _show(schema: pa.Schema) -> str:
    return "  " + str(schema.to_string(show_schema_metadata=False)).replace("\n", "\n  ")
