"""Freshness: a dataset made by ``load`` remembers its source and follows it.

A source is external Parquet (a file, or a prefix with hive partitions) or an Iceberg table. Its
fingerprint is what was read: every file's path, size and ETag (S3) or modification time (other
filesystems); for Iceberg, the snapshot id and its data files. A check lists the source again and
compares:

* nothing changed: the dataset is marked fresh as of the check;
* only new files (a new hive partition is new files; an Iceberg ``append`` snapshot): their rows
  are appended as a new version that shares the old batches (``Store`` append: no copy);
* a file changed or disappeared (an Iceberg ``overwrite``/``delete``/``replace``): a full reload.

Either way the new version is published atomically; readers holding the old one finish on it (the
store retains replaced versions). A check that fails keeps the current version, marks the dataset
stale with the error, and is retried at the next check; only an explicit ``refresh`` reports the
error to its caller.

Policies, set per dataset at load: ``manual`` (checks only on ``refresh``), ``on-read`` (a read
first checks, at most once per ``min_interval`` seconds; concurrent readers share one check) and a
period in seconds (a background thread checks).

Iceberg tables are named ``iceberg://CATALOG/NAMESPACE.TABLE``, where CATALOG is a catalog of
pyiceberg's own configuration on the server (``~/.pyiceberg.yaml`` or ``PYICEBERG_CATALOG__CATALOG__*``
variables); flightcache passes no catalog settings of its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

import pyarrow as pa

from ..errors import DatasetNotFoundError, FlightcacheError, InvalidRequestError, StorageError, require
from .storage import filesystem, read_external, redacted

if TYPE_CHECKING:
    from .cache import Cache
    from .store import Version

log = logging.getLogger("flightcache.sources")

MANUAL, ON_READ, PERIOD = "manual", "on-read", "period"
DEFAULT_MIN_INTERVAL = 5.0  # seconds between two on-read checks of one dataset


# -- policies -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """When a dataset's source is checked: ``manual``, ``on-read`` or every ``period`` seconds."""

    mode: str = MANUAL
    period: float | None = None
    min_interval: float = DEFAULT_MIN_INTERVAL

    @classmethod
    def parse(cls, refresh: str | float | None, min_interval: float | None = None) -> Policy:
        """``refresh``: manual, on-read, or a period in seconds (a number, or a string of one)."""
        interval = DEFAULT_MIN_INTERVAL if min_interval is None else float(min_interval)
        if interval < 0:
            raise InvalidRequestError(f"refresh min interval must be 0 or more seconds, got {min_interval}")
        if refresh is None or refresh == MANUAL:
            return cls(MANUAL, None, interval)
        if refresh == ON_READ:
            return cls(ON_READ, None, interval)
        try:
            period = float(refresh.removesuffix("s") if isinstance(refresh, str) else refresh)
        except ValueError:
            period = -1.0
        if not period > 0 or period == float("inf"):
            raise InvalidRequestError(
                f"unknown refresh policy {refresh!r}: use manual, on-read, or a period in seconds (e.g. 60)"
            )
        return cls(PERIOD, period, interval)

    def describe(self) -> str:
        return f"every {self.period:g}s" if self.mode == PERIOD else self.mode


# -- sources ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """A source's fingerprint: {path: (size, tag)} (tag: ETag or mtime), and an Iceberg snapshot id."""

    files: dict[str, tuple[int, str]]
    snapshot: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(size for size, _ in self.files.values())


class Source(Protocol):
    uri: str

    def listing(self) -> Listing:
        """The source's fingerprint now (one listing)."""
        ...

    def diff(self, old: Listing) -> tuple[Listing, list[str] | None]:
        """(fingerprint now, what changed): [] nothing, a list of new files to append, None a full reload."""
        ...

    def read(
        self, listing: Listing, paths: Sequence[str] | None, schema: pa.Schema | None, progress: Any = None
    ) -> pa.Table:
        """The rows of ``paths`` (None: the whole ``listing``), cast to ``schema`` if given."""
        ...


def open_source(uri: str, *, s3_endpoint: str | None = None) -> Source:
    if uri.startswith("iceberg://"):
        return IcebergSource(uri)
    return ParquetSource(uri, s3_endpoint=s3_endpoint)


def _hidden(relative: str) -> bool:
    """Files pyarrow's dataset discovery skips (its default ignore_prefixes): any part starting with . or _."""
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


class ParquetSource:
    """A Parquet file or prefix on any pyarrow filesystem; on S3 listed with ETags (boto3, where installed)."""

    def __init__(self, uri: str, *, s3_endpoint: str | None = None) -> None:
        self.uri = uri
        self.s3_endpoint = s3_endpoint
        self.fs, self.root = filesystem(uri, s3_endpoint=s3_endpoint)
        self._s3: Any = None
        if urlparse(uri).scheme == "s3":
            try:
                self._s3 = _boto3_client(s3_endpoint)
            except ImportError:  # pyarrow's listing has sizes and modification times, no ETags
                self._s3 = None
        self._single = False  # the URI names one file, not a prefix

    def listing(self) -> Listing:
        try:
            files = self._list_s3() if self._s3 is not None else self._list_fs()
        except FlightcacheError:
            raise
        except Exception as e:  # botocore, OSError: the listing failed; the caller keeps what it has
            raise StorageError(f"cannot list {redacted(self.uri)}: {e}") from e
        if not files:
            raise StorageError(f"no Parquet files at {redacted(self.uri)}")
        return Listing(files)

    def _list_fs(self) -> dict[str, tuple[int, str]]:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            self._single = True
            return {info.path: (info.size or 0, str(info.mtime_ns))}
        if info.type == pafs.FileType.NotFound:
            return {}
        selector = pafs.FileSelector(self.root, recursive=True)
        return {
            f.path: (f.size or 0, str(f.mtime_ns))
            for f in self.fs.get_file_info(selector)
            if f.type == pafs.FileType.File and not _hidden(f.path[len(self.root) :])
        }

    def _list_s3(self) -> dict[str, tuple[int, str]]:
        bucket, _, key = self.root.partition("/")
        prefix = f"{key}/" if key else ""
        files: dict[str, tuple[int, str]] = {}
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/") and not _hidden(obj["Key"][len(prefix) :]):
                    files[f"{bucket}/{obj['Key']}"] = (obj["Size"], obj["ETag"])
        if not files and key:  # not a prefix: maybe one object
            try:
                head = self._s3.head_object(Bucket=bucket, Key=key)
            except self._s3.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return {}
                raise
            self._single = True
            files[self.root] = (head["ContentLength"], head["ETag"])
        return files

    def diff(self, old: Listing) -> tuple[Listing, list[str] | None]:
        new = self.listing()
        if new.files == old.files:
            return new, []
        if any(new.files.get(path) != fp for path, fp in old.files.items()):
            return new, None  # a file changed or disappeared
        return new, sorted(set(new.files) - set(old.files))

    def read(
        self, listing: Listing, paths: Sequence[str] | None, schema: pa.Schema | None, progress: Any = None
    ) -> pa.Table:
        if self._single:
            return read_external(self.uri, s3_endpoint=self.s3_endpoint, progress=progress, schema=schema)
        wanted = sorted(listing.files) if paths is None else list(paths)
        return read_external(self.uri, s3_endpoint=self.s3_endpoint, progress=progress, paths=wanted, schema=schema)


def _boto3_client(endpoint: str | None) -> Any:
    import boto3
    from botocore.config import Config

    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    return boto3.client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        # Like the pyarrow filesystem's: a check that cannot reach storage fails fast, the next one retries.
        config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=60),
    )


class IcebergSource:
    """An Iceberg table through pyiceberg: the fingerprint is its current snapshot and data files."""

    def __init__(self, uri: str) -> None:
        require("pyiceberg", "iceberg")
        parsed = urlparse(uri)
        identifier = parsed.path.strip("/")
        if not parsed.netloc or "." not in identifier or parsed.query:
            raise InvalidRequestError(
                f"Iceberg source {uri!r}: use iceberg://CATALOG/NAMESPACE.TABLE, CATALOG being a catalog of "
                "pyiceberg's configuration on the server (~/.pyiceberg.yaml or PYICEBERG_CATALOG__<NAME>__* variables)"
            )
        self.uri = uri
        self.catalog_name = parsed.netloc
        self.identifier = identifier
        self._table: Any = None  # as of the last listing: read() scans the snapshot it saw

    def _load_table(self) -> Any:
        from pyiceberg.catalog import load_catalog
        from pyiceberg.utils.config import Config

        # pyiceberg reads its configuration once, at import; read it again so that a catalog configured
        # after the server started is found.
        props = Config().get_catalog_config(self.catalog_name)
        if props is None:
            raise InvalidRequestError(
                f"no pyiceberg catalog named {self.catalog_name!r} on the server: configure it in ~/.pyiceberg.yaml "
                f"or with PYICEBERG_CATALOG__{self.catalog_name.upper()}__URI (and __WAREHOUSE, ...)"
            )
        try:
            return load_catalog(self.catalog_name, **props).load_table(self.identifier)  # type: ignore[arg-type]  # props: its own config
        except FlightcacheError:
            raise
        except Exception as e:
            raise StorageError(f"cannot load Iceberg table {self.uri}: {type(e).__name__}: {e}") from e

    def _files(self, table: Any) -> dict[str, tuple[int, str]]:
        snapshot = table.current_snapshot()
        if snapshot is None:
            return {}
        tasks = table.scan(snapshot_id=snapshot.snapshot_id).plan_files()
        return {t.file.file_path: (t.file.file_size_in_bytes, "") for t in tasks}

    def listing(self) -> Listing:
        table = self._load_table()
        try:
            files = self._files(table)
        except Exception as e:
            raise StorageError(f"cannot plan a scan of Iceberg table {self.uri}: {type(e).__name__}: {e}") from e
        self._table = table
        snapshot = table.current_snapshot()
        return Listing(files, snapshot.snapshot_id if snapshot is not None else None)

    def diff(self, old: Listing) -> tuple[Listing, list[str] | None]:
        table = self._load_table()
        snapshot = table.current_snapshot()
        if (snapshot.snapshot_id if snapshot is not None else None) == old.snapshot:
            self._table = table
            return old, []  # the snapshot id says it all: no manifest is read
        new = self.listing()
        # Append only if every snapshot since the old one is an append and kept every old file.
        only_appends = old.snapshot is not None and set(old.files) <= set(new.files)
        current = snapshot
        while only_appends and current is not None and current.snapshot_id != old.snapshot:
            operation = current.summary.operation.value if current.summary is not None else None
            only_appends = operation == "append"
            current = table.snapshot_by_id(current.parent_snapshot_id) if current.parent_snapshot_id else None
        if not only_appends or current is None:
            return new, None
        return new, sorted(set(new.files) - set(old.files))

    def read(
        self, listing: Listing, paths: Sequence[str] | None, schema: pa.Schema | None, progress: Any = None
    ) -> pa.Table:
        table = self._table
        if table is None or listing.snapshot is None:
            table = self._load_table()
            if table.current_snapshot() is None:
                return table.scan().to_arrow()
        try:
            scan = table.scan(snapshot_id=listing.snapshot)
            if paths is None:
                result = scan.to_arrow()
            else:
                from pyiceberg.io.pyarrow import ArrowScan

                wanted = set(paths)
                tasks = [t for t in scan.plan_files() if t.file.file_path in wanted]
                result = ArrowScan(
                    table.metadata, table.io, scan.projection(), scan.row_filter, scan.case_sensitive, scan.limit
                ).to_table(tasks)
        except Exception as e:
            raise StorageError(f"cannot read Iceberg table {self.uri}: {type(e).__name__}: {e}") from e
        if progress is not None:
            progress(len(listing.files), len(listing.files))
        if schema is not None:
            result = result.select(schema.names).cast(schema)
        return result


# -- the datasets that follow their sources -----------------------------------------------------


@dataclass
class Tracked:
    """A dataset made by ``load``: its source, fingerprint, policy and freshness."""

    name: str
    source: Source
    policy: Policy
    listing: Listing
    version: int  # the version this record describes; another publish (a put) ends the tracking
    persist: str | None
    verified: float  # when the source last matched the cache (the start of that listing)
    checked: float | None = None  # start of the last check, successful or not
    check_started: float = 0.0  # start of the last check, for the on-read interval
    stale: bool = False
    error: str | None = None
    last_refresh: str | None = None  # incremental or full
    running: Future[dict[str, Any]] | None = None
    running_in: int | None = None  # the thread running the check: its own reads do not wait for it
    counters: dict[str, float] = field(default_factory=dict)


COUNTERS = (
    "source_checks",
    "source_check_failures",
    "refreshes_incremental",
    "refreshes_full",
    "refresh_bytes",
)


class Sources:
    """The sources of a Cache's loaded datasets; refreshes them by policy (and a background checker)."""

    def __init__(self, cache: Cache, *, clock: Callable[[], float] = time.time, tick: float = 1.0) -> None:
        self.cache = cache
        self._clock = clock
        self._lock = threading.Lock()
        self._tracked: dict[str, Tracked] = {}
        self._counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._tick = tick  # longest sleep of the background checker
        self._thread: threading.Thread | None = None

    # -- load ------------------------------------------------------------------------------

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
        s3_endpoint: str | None = None,
    ) -> Version:
        """Load ``uri`` as ``name``; an overwrite load remembers the source and follows it by ``refresh``."""
        policy = Policy.parse(refresh, refresh_min_interval)
        if mode != "overwrite" and policy.mode != MANUAL:
            raise InvalidRequestError(
                f"load of {name!r}: a refresh policy needs mode 'overwrite' (the dataset is then its source); "
                f"mode {mode!r} mixes the source with other rows"
            )
        started = time.perf_counter()
        at = self._clock()
        source = open_source(uri, s3_endpoint=s3_endpoint)
        listing = source.listing()
        table = source.read(listing, None, None, progress)
        version = self._publish(name, table, mode, persist, ttl)
        self.cache.store.count(name, bytes_loaded=version.nbytes, load_s=time.perf_counter() - started)
        with self._lock:
            if mode == "overwrite":
                self._tracked[name] = Tracked(name, source, policy, listing, version.number, persist, verified=at)
            else:
                self._tracked.pop(name, None)  # the source now covers only some of its rows
        if policy.mode == PERIOD:
            self._start_checker()
        return version

    def _publish(self, name: str, table: pa.Table, mode: str, persist: str | None, ttl: float | None = None) -> Version:
        staged = self.cache.store.begin_put(name, table.schema, mode)
        try:
            for batch in table.to_batches():
                staged.add(batch)
            return self.cache.publish(staged, persist=persist, ttl=ttl)
        except BaseException:
            staged.abort()
            raise

    # -- checks ----------------------------------------------------------------------------

    def refresh(self, name: str) -> dict[str, Any]:
        """Check ``name``'s source now and apply what changed; a failure is raised (and kept in info)."""
        with self._lock:
            tracked = self._tracked.get(name)
        if tracked is None:
            self.cache.store.info(name)  # DatasetNotFoundError if there is no such dataset
            raise InvalidRequestError(
                f"dataset {name!r} has no source to refresh from: only a dataset made by 'load' (mode overwrite) "
                "follows its source, and a put replaces it"
            )
        return self._check(tracked, force=True, raise_errors=True)

    def on_read(self, name: str) -> None:
        """Before a read: check an ``on-read`` dataset if its last check is older than its min interval.

        Concurrent readers share one check; a failed check is recorded, never raised: the read goes on
        with the version held.
        """
        with self._lock:
            tracked = self._tracked.get(name)
            if tracked is None or tracked.policy.mode != ON_READ:
                return
        self._check(tracked, force=False, raise_errors=False)

    def _check(self, tracked: Tracked, *, force: bool, raise_errors: bool) -> dict[str, Any]:
        with self._lock:
            future = tracked.running
            if future is not None and tracked.running_in == threading.get_ident():
                # The check itself reads the dataset (an append to an evicted one loads it first).
                return {"name": tracked.name, "refreshed": "skipped"}
            leader = future is None
            if leader:
                now = self._clock()
                if not force and now - tracked.check_started < tracked.policy.min_interval:
                    return {"name": tracked.name, "refreshed": "skipped"}
                tracked.check_started = now
                future = tracked.running = Future()
                tracked.running_in = threading.get_ident()
        assert future is not None
        if not leader:
            try:
                return future.result()
            except Exception:
                if raise_errors:
                    raise
                return {"name": tracked.name, "refreshed": "failed"}
        try:
            result = self._run_check(tracked)
            future.set_result(result)
            return result
        except Exception as e:
            future.set_exception(e)
            if raise_errors:
                raise
            return {"name": tracked.name, "refreshed": "failed"}
        finally:
            with self._lock:
                tracked.running, tracked.running_in = None, None

    def _run_check(self, tracked: Tracked) -> dict[str, Any]:
        name, started = tracked.name, self._clock()
        self._count(tracked, source_checks=1)
        try:
            with self.cache.locked(name):  # no put of this name publishes in between
                info = self.cache.store.info(name)
                if info.version != tracked.version:
                    self._forget(tracked, f"replaced by version {info.version}")
                    raise InvalidRequestError(
                        f"dataset {name!r} was replaced (version {info.version}) since it was loaded from "
                        f"{redacted(tracked.source.uri)}; it no longer follows that source"
                    )
                listing, added = tracked.source.diff(tracked.listing)
                kind, nbytes, version = "none", 0, None
                if added:
                    try:
                        table = tracked.source.read(listing, added, info.schema)
                    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:  # new files of another schema
                        log.info("new files of %s do not fit its schema (%s): reloading it whole", name, e)
                        added = None
                    else:
                        version = self._publish(name, table, "append", tracked.persist)
                        kind, nbytes = "incremental", table.nbytes
                if added is None:
                    table = tracked.source.read(listing, None, None)
                    version = self._publish(name, table, "overwrite", tracked.persist)
                    kind, nbytes = "full", table.nbytes
                with self._lock:
                    tracked.listing = listing
                    if version is not None:
                        tracked.version = version.number
                        tracked.last_refresh = kind
                    tracked.checked = tracked.verified = started
                    tracked.stale, tracked.error = False, None
        except DatasetNotFoundError:
            self._forget(tracked, "dropped")
            raise
        except Exception as e:
            with self._lock:
                tracked.checked, tracked.stale = started, True
                tracked.error = f"{type(e).__name__}: {e}" if not isinstance(e, FlightcacheError) else str(e)
            self._count(tracked, source_check_failures=1)
            log.warning("refresh of %s from %s failed (the version held stays): %s", name, tracked.source.uri, e)
            if isinstance(e, FlightcacheError):
                raise
            raise StorageError(f"refresh of {name!r} from {redacted(tracked.source.uri)} failed: {e}") from e
        if kind != "none":
            assert version is not None
            self._count(tracked, **{f"refreshes_{kind}": 1, "refresh_bytes": nbytes})
            self.cache.store.count(name, bytes_loaded=nbytes)
            log.info("refreshed %s (%s): version %d, %d bytes read", name, kind, version.number, nbytes)
        return {
            "name": name,
            "refreshed": kind,
            "version": tracked.version,
            "files_added": len(added) if kind == "incremental" and added else 0,
            "bytes_read": nbytes,
        }

    def _forget(self, tracked: Tracked, why: str) -> None:
        with self._lock:
            if self._tracked.get(tracked.name) is tracked:
                del self._tracked[tracked.name]
                log.info("dataset %s no longer follows %s: %s", tracked.name, tracked.source.uri, why)

    def _count(self, tracked: Tracked, **amounts: float) -> None:
        with self._lock:
            for key, n in amounts.items():
                self._counters[key] += n
                tracked.counters[key] = tracked.counters.get(key, 0) + n

    # -- the background checker ------------------------------------------------------------

    def _start_checker(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="flightcache-refresh")
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = self._clock()
            with self._lock:
                periodic = [t for t in self._tracked.values() if t.policy.mode == PERIOD]
            due = [t for t in periodic if now - t.check_started >= (t.policy.period or 0)]
            for tracked in due:
                if self._stop.is_set():
                    return
                try:
                    self._check(tracked, force=True, raise_errors=False)
                except Exception:  # never let the checker die
                    log.exception("background refresh of %s failed", tracked.name)
            now = self._clock()
            waits = [t.check_started + (t.policy.period or 0) - now for t in periodic]
            self._wake.wait(max(0.01, min([self._tick, *waits])))
            self._wake.clear()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- reporting -------------------------------------------------------------------------

    def _prune(self) -> None:
        """Forget the sources of datasets dropped or replaced by a put since (not those being refreshed)."""
        with self._lock:
            tracked = [t for t in self._tracked.values() if t.running is None]
        for t in tracked:
            try:
                version: int | None = self.cache.store.info(t.name).version
            except DatasetNotFoundError:
                version = None
            with self._lock:
                if version != t.version and t.running is None:
                    self._tracked.pop(t.name, None)

    def describe(self, name: str) -> dict[str, Any] | None:
        """The ``source`` field of a dataset's info (None: not made by a load, or replaced since)."""
        self._prune()
        with self._lock:
            t = self._tracked.get(name)
            if t is None:
                return None
            now = self._clock()
            return {
                "uri": redacted(t.source.uri),
                "refresh": t.policy.describe(),
                "min_interval": t.policy.min_interval if t.policy.mode == ON_READ else None,
                "files": len(t.listing.files),
                "source_bytes": t.listing.nbytes,
                "snapshot": t.listing.snapshot,
                "checked": t.checked,
                "verified": t.verified,
                "staleness_s": round(now - t.verified, 3),
                "stale": t.stale,
                "error": t.error,
                "last_refresh": t.last_refresh,
                "counters": dict(t.counters),
            }

    def stats(self) -> dict[str, Any]:
        """Totals for ``stats()`` and /metrics: checks, refreshes, bytes read again, staleness."""
        self._prune()
        with self._lock:
            now = self._clock()
            tracked = list(self._tracked.values())
            return {
                **self._counters,
                "sources": len(tracked),
                "sources_stale": sum(t.stale for t in tracked),
                "source_staleness_s_max": round(max((now - t.verified for t in tracked), default=0.0), 3),
            }
