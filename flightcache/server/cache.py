"""The two tiers together: the memory ``Store`` in front of the Parquet ``Storage``.

* read-through: a read of a dataset that only storage holds loads it, once, however many readers
  wait for it;
* persistence per put: ``none`` (memory only), ``sync`` (write-through: Parquet commits before the
  version becomes visible), ``async`` (write-back: a background worker persists it);
* capacity: when a put or load needs room, least-recently-used unpinned datasets leave memory;
  persisted ones are evicted, unpersisted ones are written back first (spill); nothing that exists
  nowhere else is dropped;
* TTL: an expired persisted dataset is evicted, an expired memory-only one is dropped;
* recovery: at start the catalog is rebuilt from the storage manifests, leftovers are removed.

Publishes of one dataset are serialised by a per-name lock, so a write-through persist and its
publish see the same base version. The store's own lock is never held across I/O.
"""

from __future__ import annotations

import builtins
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pyarrow as pa

from ..errors import DatasetNotFoundError, FlightcacheError, InvalidRequestError, NotInMemoryError, StorageError
from ..units import DEFAULT_BATCH_ROWS
from .allocator import TRIM_BYTES, process_memory, release_memory
from .catalog import IN_STORAGE_ONLY, PERSIST_FAILED, PERSISTED, PERSISTING, VersionRecord
from .shm import SharedMemory
from .sources import Sources
from .storage import Storage, check_storable, unstorable
from .store import StagedPut, Store, Version

log = logging.getLogger("flightcache.cache")

PERSIST_MODES = ("none", "sync", "async")
CORRUPT_IN_STORAGE = "corrupt-in-storage"  # the state `info` gives a name whose stored manifest cannot be read


class Cache:
    """Coordinates a Store and an optional Storage."""

    def __init__(
        self,
        storage: Storage | None = None,
        *,
        memory_limit: int | None = None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        retain_seconds: float = 60.0,
        max_datasets: int | None = None,
        persist: str = "none",
        persist_threads: int = 2,
        sweep_seconds: float = 1.0,
        shm: SharedMemory | None = None,
    ) -> None:
        self.storage = storage
        self.shm = shm  # where the store keeps batches for same-host readers (None: process memory)
        # The cache makes its store: the store calls back into the cache's eviction when memory is full.
        self.store = Store(
            memory_limit,
            batch_rows=batch_rows,
            retain_seconds=retain_seconds,
            max_datasets=max_datasets,
            files=shm,
            on_full=self.make_room,
        )
        self.default_persist = "none"
        self.default_persist = self.persist_mode(persist)
        self._guard = threading.Lock()
        self._name_locks: dict[str, threading.RLock] = {}
        self._loads: dict[str, Future[Version]] = {}
        self._pending: dict[str, Future[None]] = {}
        self._writebacks = {"writebacks_done": 0, "writebacks_failed": 0}
        self._pool = ThreadPoolExecutor(persist_threads, thread_name_prefix="flightcache-persist") if storage else None
        self._received = 0  # bytes put since the last trim: their receive buffers are garbage by now
        self._high_water = 0  # most memory used since the last trim
        self._stop = threading.Event()
        self._sweeper = threading.Thread(
            target=self._sweep_loop, args=(sweep_seconds,), daemon=True, name="flightcache-ttl"
        )
        self._sweeper.start()
        self.recovery: dict[str, Any] = {"datasets": 0, "removed": [], "incomplete_versions": [], "corrupt": []}
        self.sources = Sources(self)  # what loaded datasets were read from, and their refreshes

    # -- lifecycle -------------------------------------------------------------------------

    def recover(self) -> dict[str, Any]:
        """Rebuild the catalog from storage manifests; remove half-written and superseded versions.

        A version directory without a manifest that is newer than its dataset's committed version is
        a write that never finished (a write-back cut short by ``kill -9``, say): it is reported, in
        the log and in ``stats()["recovery"]``, and removed; the dataset comes back at its committed
        version, if any, never half-present. Removals follow storage's rules for several writers
        (``storage.py``): a directory changed within ``grace_seconds`` is left, another server may be
        writing it.
        """
        if self.storage is None:
            return self.recovery
        manifests, corrupt = self.storage.survey()  # corrupt manifests: reported, their files left as they are
        committed = {m.name: m.version for m in manifests}
        incomplete: list[dict[str, Any]] = []
        removed: list[str] = []
        for path in self.storage.orphans():
            if not self.storage.settled(path):  # changed within the grace period: another server may be writing it
                log.info(
                    "leaving %s: written to less than %.0f s ago",
                    self.storage.describe(path),
                    self.storage.grace_seconds,
                )
                continue
            name, number = self.storage.version_of(path)
            if number > committed.get(name, 0):
                incomplete.append({"name": name, "version": number, "uri": self.storage.describe(path)})
                log.warning(
                    "version %d of dataset %s was never completely written to storage (a write-back cut short "
                    "by a stop, or a failed write); it is lost, %s",
                    number,
                    name,
                    f"version {committed[name]} is served instead" if name in committed else "the dataset is gone",
                )
            self.storage.remove(path)
            removed.append(self.storage.describe(path))
        for m in manifests:
            self.store.add_stored(VersionRecord(m.name, m.version, m.schema, m.rows, m.bytes, m.created))
        removed += self.storage.clean(manifests, keep=[c["uri"] for c in corrupt])
        if manifests or removed:
            log.info(
                "recovered %d datasets from %s; removed %d unfinished or old versions",
                len(manifests),
                self.storage.uri,
                len(removed),
            )
        self.recovery = {
            "datasets": len(manifests),
            "removed": removed,
            "incomplete_versions": incomplete,
            "corrupt": corrupt,
        }
        return self.recovery

    def close(self, flush: bool = True) -> None:
        """Stop the TTL sweeper; with ``flush``, wait for every pending write-back first."""
        self._stop.set()
        self.sources.close()
        if flush:
            self.flush()
        if self._pool is not None:
            self._pool.shutdown(wait=flush, cancel_futures=not flush)
        if self.shm is not None:
            self.shm.close()

    def flush(self) -> None:
        """Wait until every pending write-back has finished (successfully or not)."""
        while True:
            with self._guard:
                pending = list(self._pending.values())
            if not pending:
                return
            for future in pending:
                future.exception()

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        with self._guard:
            lock = self._name_locks.setdefault(name, threading.RLock())
        with lock:
            yield

    def persist_mode(self, persist: str | None) -> str:
        mode = persist or self.default_persist
        if mode not in PERSIST_MODES:
            raise InvalidRequestError(f"unknown persist mode {mode!r}: use one of {', '.join(PERSIST_MODES)}")
        if mode != "none" and self.storage is None:
            raise InvalidRequestError(
                f"persist mode {mode!r} needs a storage tier: start the server with --storage URI"
            )
        return mode

    def check_storable(self, name: str, schema: pa.Schema, persist: str | None) -> None:
        """Refuse now, before any data arrives, a put to be persisted whose schema storage cannot hold."""
        if self.persist_mode(persist) != "none":
            check_storable(name, schema)

    def _unspillable(self, version: Version) -> str | None:
        """Why ``version`` can never leave memory through storage (its schema), or None."""
        if self.storage is None:
            return None
        reason = unstorable(version.schema)
        return None if reason is None else f"never evicted: {reason}"

    # -- writes ----------------------------------------------------------------------------

    def publish(self, staged: StagedPut, *, persist: str | None = None, ttl: float | None = None) -> Version:
        """Publish a finished put with the given persistence (default: the server's)."""
        mode = self.persist_mode(persist)
        if ttl is not None and ttl <= 0:
            raise InvalidRequestError(f"ttl of dataset {staged.name!r} must be positive, got {ttl}")
        self.check_storable(staged.name, staged.schema, mode)
        if staged.mode == "append" and self.store.stored(staged.name) is not None:
            self.get(staged.name)  # an append needs the stored rows in memory
        with self.locked(staged.name):
            if mode == "sync":
                version = self._publish_through(staged)
            else:
                version = staged.publish()
        if ttl is not None:
            self.store.set_ttl(staged.name, ttl)
        if mode == "async":
            self._schedule(version)
        with self._guard:
            self._received += staged.nbytes
        return version

    def _publish_through(self, staged: StagedPut) -> Version:
        assert self.storage is not None
        staged.flush()
        previous = self.store.append_base(staged)
        number = self.store.next_version(staged.name)
        batches = [*previous, *staged.batches]
        started = time.perf_counter()
        self.storage.write_version(staged.name, number, staged.schema, batches)
        version = staged.publish(number)
        self.store.set_state(staged.name, number, PERSISTED)
        self.store.count(staged.name, bytes_persisted=version.nbytes, persist_s=time.perf_counter() - started)
        return version

    def commit(
        self,
        txn: str,
        name: str,
        mode: str = "overwrite",
        *,
        parts: list[str] | None = None,
        schema: pa.Schema | None = None,
        persist: str | None = None,
        ttl: float | None = None,
    ) -> Version:
        """Publish a transaction's staged parts as one version, with the given persistence."""
        self.persist_mode(persist)
        staged = self.store.take_parts(txn, name, mode, parts=parts, schema=schema)
        try:
            return self.publish(staged, persist=persist, ttl=ttl)
        except BaseException:
            staged.abort()
            raise

    def load(
        self,
        name: str,
        uri: str,
        *,
        mode: str = "overwrite",
        persist: str | None = None,
        ttl: float | None = None,
        progress: Callable[[int, int], None] | None = None,
        refresh: str | float | None = None,
        refresh_min_interval: float | None = None,
    ) -> Version:
        """Load an external Parquet file or directory, or an Iceberg table, as dataset ``name`` (see ``sources``)."""
        return self.sources.load(
            name,
            uri,
            mode=mode,
            persist=persist,
            ttl=ttl,
            progress=progress,
            refresh=refresh,
            refresh_min_interval=refresh_min_interval,
            s3_endpoint=self.s3_endpoint_for(uri),
        )

    def s3_endpoint_for(self, uri: str) -> str | None:
        """The S3 endpoint to read external ``uri`` at: the storage's, when both are on S3 (one object store)."""
        if self.storage is not None and self.storage.uri.startswith("s3://") and uri.startswith("s3://"):
            return self.storage.s3_endpoint
        return None

    def info(self, name: str) -> dict[str, Any]:
        """What the ``info`` action answers for ``name`` (a name whose only stored manifest is corrupt too)."""
        corrupt = [c for c in self.recovery["corrupt"] if c["name"] == name]
        try:
            info = self._described(self.store.info(name).to_dict())
        except DatasetNotFoundError:
            if not corrupt:
                raise
            newest = corrupt[-1]
            return {
                "name": name,
                "version": newest["version"],
                "state": CORRUPT_IN_STORAGE,
                "in_memory": False,
                "persist_error": newest["error"],
                "corrupt_in_storage": corrupt,
            }
        return {**info, "corrupt_in_storage": corrupt}

    def list(self) -> list[dict[str, Any]]:
        """What the ``list`` action answers: every dataset's info."""
        return [self._described(i.to_dict()) for i in self.store.list()]

    def _described(self, info: dict[str, Any]) -> dict[str, Any]:
        """``info`` with what the cache adds: why the dataset cannot be spilled, if it cannot."""
        version = self.store.current(info["name"]) if info["in_memory"] else None
        unspillable = None
        if version is not None and info["persisted_version"] != version.number:
            unspillable = self._unspillable(version)
        return {**info, "unspillable": unspillable, "source": self.sources.describe(info["name"])}

    def drop(self, name: str) -> dict[str, Any]:
        """Remove a dataset from memory and from storage."""
        with self.locked(name):
            corrupt = [c for c in self.recovery["corrupt"] if c["name"] == name]
            try:
                info = self.store.drop(name)
            except DatasetNotFoundError:
                if not corrupt or self.storage is None:
                    raise
                info = None  # only a corrupt manifest is left of it: dropping removes its files
            if self.storage is not None:
                self.storage.delete(name)
            self.recovery["corrupt"] = [c for c in self.recovery["corrupt"] if c["name"] != name]
        if info is None:
            return {"name": name, "version": corrupt[-1]["version"], "bytes": 0}
        return {"name": info.name, "version": info.version, "bytes": info.nbytes}

    @property
    def batch_rows(self) -> int:
        return self.store.batch_rows

    def schemas(self) -> builtins.list[tuple[str, pa.Schema]]:
        """(name, schema) of every dataset, by name (what SQL lists as tables)."""
        return sorted((i.name, i.schema) for i in self.store.list())

    def put(
        self,
        name: str,
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        *,
        mode: str = "overwrite",
        persist: str | None = None,
        ttl: float | None = None,
    ) -> dict[str, Any]:
        """Publish ``batches`` as a put would (atomically: a failing iterator publishes nothing); the summary."""
        staged = self.store.begin_put(name, schema, mode)
        try:
            for batch in batches:
                staged.add(batch)
            return self.publish(staged, persist=persist, ttl=ttl).summary()
        except BaseException:
            staged.abort()
            raise

    # -- reads -----------------------------------------------------------------------------

    def get(self, name: str, version: int | None = None, *, count: bool = False) -> Version:
        """A dataset version from memory, loading it from storage on a miss."""
        if version is None:
            self.sources.on_read(name)  # an on-read dataset checks its source first (never fails the read)
        try:
            v = self.store.get(name, version)
        except NotInMemoryError:
            v = self._load_stored(name)
            if count:
                self.store.count(name, misses=1)
            if version is not None and version != v.number:
                raise DatasetNotFoundError(
                    f"version {version} of dataset {name!r} is gone; the stored version is {v.number}"
                ) from None
            return v
        if count:
            self.store.count(name, hits=1)
        return v

    def _load_stored(self, name: str) -> Version:
        """Load a stored dataset into memory; concurrent callers share one load."""
        with self._guard:
            future = self._loads.get(name)
            leader = future is None
            if leader:
                future = self._loads[name] = Future()
        assert future is not None
        if not leader:
            return future.result()
        try:
            version = self._read_stored(name)
            future.set_result(version)
            return version
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with self._guard:
                self._loads.pop(name, None)

    def _read_stored(self, name: str) -> Version:
        stored = self.store.stored(name)
        if stored is None:
            return self.store.get(name)  # loaded meanwhile
        assert self.storage is not None
        started = time.perf_counter()
        manifest = self.storage.manifest(name, stored.number)
        if manifest is None or manifest.version != stored.number:
            raise StorageError(
                f"version {stored.number} of dataset {name!r} is missing from {self.storage.uri}; "
                "it was removed outside flightcache"
            )
        table = self.storage.read_version(manifest)
        version = self.store.restore(name, table, manifest.version)
        self.store.count(name, bytes_loaded=version.nbytes, load_s=time.perf_counter() - started)
        log.info(
            "loaded %s v%d from storage (%d bytes) in %.3fs",
            name,
            version.number,
            version.nbytes,
            time.perf_counter() - started,
        )
        return version

    # -- persistence -----------------------------------------------------------------------

    def _schedule(self, version: Version) -> Future[None]:
        assert self._pool is not None
        self.store.set_state(version.name, version.number, PERSISTING)
        future = self._pool.submit(self._persist_current, version.name, version.number)
        with self._guard:
            self._pending[version.name] = future
        future.add_done_callback(functools.partial(self._forget, version.name))
        return future

    def _forget(self, name: str, future: Future[None]) -> None:
        with self._guard:
            if self._pending.get(name) is future:
                del self._pending[name]
            if not future.cancelled():
                self._writebacks["writebacks_failed" if future.exception() else "writebacks_done"] += 1

    def _persist_current(self, name: str, number: int) -> None:
        """Write version ``number`` of ``name`` to storage if it is still the current one."""
        with self.locked(name):
            version = self.store.current(name)
            if version is None or version.number != number:
                return  # dropped, evicted or superseded; a newer put has its own persistence
            info = self.store.info(name)
            if info.persisted_version == number:
                return
            assert self.storage is not None
            started = time.perf_counter()
            try:
                check_storable(name, version.schema)
                self.storage.write_version(name, number, version.schema, version.batches)
            except Exception as e:  # whatever failed, the dataset must not look safe or in progress
                error = e if isinstance(e, FlightcacheError) else StorageError(f"{type(e).__name__}: {e}")
                log.error("persisting %s v%d failed: %s", name, number, error)
                self.store.set_state(name, number, PERSIST_FAILED, str(error))
                raise error from e
            self.store.set_state(name, number, PERSISTED)
            self.store.count(name, bytes_persisted=version.nbytes, persist_s=time.perf_counter() - started)

    def persist(self, name: str, wait: bool = True) -> dict[str, Any]:
        """Persist the current version of ``name`` now (or wait for its pending write-back).

        With ``wait``, a write-back that fails raises its error (the state is then persist-failed).
        """
        self.persist_mode("sync")  # needs storage
        with self._guard:
            pending = self._pending.get(name)
        if pending is not None:
            if wait:
                _raise_failure(pending)
        else:
            version = self.store.current(name)
            if version is None:
                self.store.info(name)  # raises if unknown; else it is in storage already
            elif self.store.info(name).persisted_version != version.number:
                pending = self._schedule(version)  # not looked up again: it may be done and forgotten already
                if wait:
                    _raise_failure(pending)
        return self.info(name)

    # -- capacity --------------------------------------------------------------------------

    def make_room(self, needed: int) -> int:
        """Free at least ``needed`` bytes if possible: evict persisted LRU data, spill the rest."""
        freed = 0
        for name, number, _, persisted in self.store.candidates():
            if freed >= needed:
                break
            if not persisted and self.storage is None:
                continue
            version = self.store.current(name)
            if not persisted and version is not None and self._unspillable(version) is not None:
                continue  # storage cannot hold it: as if pinned (info says why)
            with self._guard:
                lock = self._name_locks.setdefault(name, threading.RLock())
            if not lock.acquire(blocking=False):
                continue  # being written right now; try the next one
            try:
                if not persisted:
                    log.info("spilling %s v%d to storage to make room", name, number)
                    self._persist_current(name, number)
                freed += self.store.evict(name, number)
            except FlightcacheError as e:
                log.warning("could not free %s: %s", name, e)
            finally:
                lock.release()
        return freed

    def evict(self, name: str) -> dict[str, Any]:
        """Free the memory of a persisted dataset now."""
        with self.locked(name):
            version = self.store.current(name)
            if version is None:
                return self.store.info(name).to_dict()
            if self.store.evict(name, version.number) == 0 and self.store.current(name) is not None:
                raise InvalidRequestError(f"dataset {name!r} is pinned; unpin it before evicting")
        return self.store.info(name).to_dict()

    def sweep(self) -> None:
        """Apply TTLs: evict expired persisted datasets, drop expired memory-only ones."""
        for name, number, persisted in self.store.expired():
            with self.locked(name):
                try:
                    info = self.store.info(name)
                except DatasetNotFoundError:
                    continue  # dropped meanwhile
                if info.state == PERSISTING or info.pinned:
                    continue  # a write-back is under way (evict after it), or pinned: stays
                if persisted:
                    self.store.evict(name, number)
                elif info.state != IN_STORAGE_ONLY:
                    log.info("ttl of memory-only dataset %s passed: dropping it", name)
                    self.store.drop(name)

    def trim(self, threshold: int = TRIM_BYTES) -> bool:
        """Return freed memory to the OS when at least ``threshold`` bytes were freed since the last time."""
        used = self.store.stats()["memory_used"]  # also expires retained versions
        with self._guard:
            self._high_water = max(self._high_water, used)
            if self._received + self._high_water - used < threshold:
                return False
            self._received, self._high_water = 0, used
        release_memory()
        return True

    def _sweep_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.sweep()
                self.trim()
            except Exception:
                log.exception("ttl sweep failed")

    # -- reporting -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        s = self.store.stats()
        details = {i.name: i.counters for i in self.store.list()}
        totals = self.store.counter_totals()
        with self._guard:
            pending = len(self._pending)
            writebacks = dict(self._writebacks)
        return {
            **s,
            **totals,
            "pending_persists": pending,
            **writebacks,
            **self.sources.stats(),
            "storage": self.storage.uri if self.storage else None,
            "recovery": {
                "incomplete_versions": self.recovery["incomplete_versions"],
                "corrupt": self.recovery["corrupt"],
            },
            "per_dataset": details,
            "process": process_memory(),
        }


def _raise_failure(future: Future[None]) -> None:
    """Wait for a write-back; raise what made it fail."""
    error = future.exception()
    if error is not None:
        raise error
