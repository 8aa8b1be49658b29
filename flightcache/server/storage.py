"""Parquet in and out of any pyarrow filesystem URI (``s3://bucket/prefix``, ``file:///path``, a path).

Layout of a persisted dataset version::

    <root>/<name>/v<version>-<writer>/part-00000.parquet
    <root>/<name>/v<version>-<writer>/part-00001.parquet
    <root>/<name>/v<version>-<writer>/manifest.json      written last: the version exists once it does

The manifest holds the schema, rows, bytes and every part's size and SHA-256. A version directory
without a manifest is a write that never finished (or is still under way); ``catalog`` ignores it.
Directories written before writers were named (``v<version>``) are read the same way.

Several writers (servers) may share one root. The rules that keep them from destroying each other's
data:

* ``<writer>`` is a random id per ``Storage``, so two writers that pick the same version number write
  two directories, never the same files (object stores have no portable put-if-absent); of two
  committed directories with the same number, the one committed last is that version.
* A commit removes older versions of the dataset, its own and other writers', once a newer version
  has been committed for ``grace_seconds``: a reader (of this server or another) that picked one has
  had that long to finish. It never removes a newer version, the same number, a directory without a
  manifest (another writer may be writing it), nor one whose manifest cannot be read (kept for
  inspection). With ``grace_seconds`` 0 (``serve --storage-grace 0``: this server is the only writer)
  a commit removes every older version at once.
* A manifest appears whole or not at all: on a local filesystem it is written to a temporary name and
  renamed (object stores make a put visible whole). A version that vanishes between a listing and its
  read (superseded and removed meanwhile) is passed over for the next newest.
* At start-up (``clean``, ``settled``), superseded versions follow the same grace rule, and a directory
  without a manifest is removed only when nothing in it changed for ``grace_seconds``.
* ``delete`` (dropping a dataset) removes every version: dropping is meant for all writers.

Version numbers come from each writer's own catalog; without a catalog shared by the writers (the
cluster issue) "newest" means the highest number, then the latest commit.

Objects are written and read whole (one request each, parts in parallel): ranged small reads on
S3 were measured orders of magnitude slower. Transient errors (throttling, 5xx, connection
trouble) are retried with exponential backoff and full jitter; permanent ones (no bucket, access
denied, not found) fail at once. Every failure is a ``StorageError`` naming the URI.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import json
import logging
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa

from ..errors import InvalidNameError, SchemaMismatchError, StorageError
from ..names import VERSION_SEGMENT, validate_name
from ..protocol import decode_schema, encode_schema
from .arrays import batch_nbytes

# Imported where used: pyarrow.dataset brings pandas (~50 MiB), and pyarrow.fs with pyarrow.parquet
# cost ~8 MiB that a memory-only server never needs.
if TYPE_CHECKING:
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

log = logging.getLogger("flightcache.storage")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
DEFAULT_PART_BYTES = 128 * 1024 * 1024
_VERSION_DIR = re.compile(VERSION_SEGMENT)  # the segments dataset names may not use
DEFAULT_STORAGE_GRACE_SECONDS = 600.0
_PART_FILE = re.compile(r"part-\d{5}\.parquet")
_TRANSIENT = re.compile(
    r"slow[ _]?down|throttl|too[ _]many[ _]requests|request[ _]?timeout|timed?[ _]?out|internal[ _]?error"
    r"|service[ _]?unavailable"
    r"|\b5\d\d\b|connection|connect|reset by peer|broken pipe|network|curl|temporar|unavailable|eof",
    re.IGNORECASE,
)
_PERMANENT = re.compile(
    r"no[ _]?such[ _]?bucket|access[ _]?denied|forbidden|\b403\b|invalid[ _]?access[ _]?key|signature", re.I
)

T = TypeVar("T")


@dataclass(frozen=True)
class Manifest:
    """What a committed version holds."""

    name: str
    version: int
    schema: pa.Schema
    rows: int
    bytes: int
    files: tuple[dict[str, Any], ...]  # {"path": relative, "rows": n, "size": bytes, "sha256": hex}
    created: float
    directory: str = ""  # the version directory's name (``v<version>-<writer>``); set where it is read

    def to_json(self) -> builtins.bytes:  # builtins: the field `bytes` hides the type here
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "name": self.name,
                "version": self.version,
                "schema": encode_schema(self.schema),
                "rows": self.rows,
                "bytes": self.bytes,
                "files": list(self.files),
                "created": self.created,
            },
            indent=1,
        ).encode()

    @classmethod
    def from_json(cls, raw: builtins.bytes, where: str) -> Manifest:
        try:
            d = json.loads(raw)
            if d.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {d.get('format')!r}")
            schema = decode_schema(d["schema"])
            if not all(_PART_FILE.fullmatch(str(f["path"])) for f in d["files"]):
                raise ValueError("a part path is not part-NNNNN.parquet")
            return cls(
                d["name"],
                int(d["version"]),
                schema,
                int(d["rows"]),
                int(d["bytes"]),
                tuple(d["files"]),
                float(d["created"]),
            )
        except (ValueError, KeyError, TypeError, pa.ArrowException) as e:
            raise StorageError(f"corrupt manifest at {where}: {e}") from e


class Storage:
    """Persist dataset versions as Parquet under a root URI, and load external Parquet."""

    def __init__(
        self,
        uri: str,
        *,
        s3_endpoint: str | None = None,
        retries: int = 5,
        backoff: float = 0.2,
        threads: int = 8,
        part_bytes: int = DEFAULT_PART_BYTES,
        grace_seconds: float = DEFAULT_STORAGE_GRACE_SECONDS,
    ) -> None:
        self.uri = uri
        self.writer = secrets.token_hex(4)  # names the version directories this Storage writes
        self.grace_seconds = grace_seconds
        self.s3_endpoint = s3_endpoint
        self.fs, self.root = filesystem(uri, s3_endpoint=s3_endpoint)
        self.retries = retries
        self.backoff = backoff
        self.threads = threads
        self.part_bytes = part_bytes

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    # -- paths -------------------------------------------------------------------------------

    def _dataset_dir(self, name: str) -> str:
        validate_name(name)  # the grammar keeps every path under the root: no '..', '/', '\\' or NUL
        return f"{self.root}/{name}" if self.root else name

    def _version_dir(self, name: str, version: int) -> str:
        """The directory this writer writes version ``version`` of ``name`` to."""
        return f"{self._dataset_dir(name)}/v{version}-{self.writer}"

    def describe(self, path: str) -> str:
        """The URI of a path under the root, for messages."""
        relative = path[len(self.root) :].lstrip("/") if path.startswith(self.root) else path
        return f"{self.uri.rstrip('/')}/{relative}"

    # -- writing -----------------------------------------------------------------------------

    def write_version(
        self,
        name: str,
        version: int,
        schema: pa.Schema,
        batches: Sequence[pa.RecordBatch],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> Manifest:
        """Write a version as Parquet parts in parallel, then its manifest, then remove older versions."""
        import pyarrow.parquet as pq

        directory = self._version_dir(name, version)
        groups = _split(batches, self.part_bytes)
        self._retry(f"create {self.describe(directory)}", lambda: self.fs.create_dir(directory, recursive=True))

        def write_part(i: int) -> dict[str, Any]:
            table = pa.Table.from_batches(groups[i], schema)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd", row_group_size=1024 * 1024)
            data = sink.getvalue()
            path = f"{directory}/part-{i:05d}.parquet"
            self._put_object(path, data)
            if progress is not None:
                progress(sum(batch_nbytes(b) for b in groups[i]))
            return {
                "path": f"part-{i:05d}.parquet",
                "rows": table.num_rows,
                "size": data.size,
                "sha256": hashlib.sha256(data).hexdigest(),
            }

        try:
            files = self._parallel(write_part, range(len(groups)))
        except StorageError:
            raise
        except Exception as e:  # Parquet refused the data, or anything else: a StorageError naming the URI
            raise StorageError(
                f"cannot write version {version} of dataset {name!r} to {self.describe(directory)}: "
                f"{type(e).__name__}: {_first_line(e)}"
            ) from e
        manifest = Manifest(
            name,
            version,
            schema,
            sum(f["rows"] for f in files),
            sum(batch_nbytes(b) for b in batches),
            tuple(files),
            time.time(),
            directory.rsplit("/", 1)[-1],
        )
        self._put_object(f"{directory}/{MANIFEST}", pa.py_buffer(manifest.to_json()))
        self._supersede(name, version)
        return manifest

    def _put_object(self, path: str, data: pa.Buffer) -> None:
        import pyarrow.fs as pafs

        def put() -> None:
            if isinstance(self.fs, pafs.LocalFileSystem):  # whole or not at all: written aside, then renamed
                temporary = f"{path}.{self.writer}.tmp"
                with self.fs.open_output_stream(temporary) as out:
                    out.write(data)
                self.fs.move(temporary, path)
            else:
                with self.fs.open_output_stream(path) as out:
                    out.write(data)

        self._retry(f"write {self.describe(path)}", put)

    def _supersede(self, name: str, version: int) -> list[str]:
        """After version ``version`` of ``name`` committed: remove the older versions the rules allow
        (see the module docstring); return their URIs."""
        dirs = self._version_dirs(name)
        removable = [(n, p) for n, p in dirs if n < version]
        if not removable:
            return []
        committed: dict[str, Manifest | None] = {}
        if self.grace_seconds > 0:  # when each version was committed, to know since when one is superseded
            committed = {p: self._manifest_at(p) for n, p in dirs if n > min(n for n, _ in removable)}
        deadline = time.time() - self.grace_seconds
        removed = []
        for number, path in removable:
            if self.grace_seconds > 0:
                if (committed[path] if path in committed else self._manifest_at(path)) is None:
                    continue  # being written by another writer, or unreadable: not ours to remove
                newer = [m.created for p, m in committed.items() if m is not None and m.version > number]
                if not newer or min(newer) > deadline:
                    continue  # superseded less than grace_seconds ago: a reader may still be reading it
            self._retry(f"remove {self.describe(path)}", functools.partial(self.fs.delete_dir, path))
            removed.append(self.describe(path))
        return removed

    def _manifest_at(self, path: str) -> Manifest | None:
        """The manifest of the version directory ``path``; None if it has none or it cannot be read."""
        raw = self._get_object(f"{path}/{MANIFEST}", missing_ok=True)
        if raw is None:
            return None
        try:
            return self._parse(raw, path)
        except StorageError:
            return None

    def _parse(self, raw: pa.Buffer, path: str) -> Manifest:
        return replace(Manifest.from_json(raw.to_pybytes(), self.describe(path)), directory=path.rsplit("/", 1)[-1])

    def delete(self, name: str) -> None:
        """Remove every stored version of a dataset (every writer's: dropping is meant for all)."""
        for _, path in self._version_dirs(name):
            self._retry(f"remove {self.describe(path)}", functools.partial(self.fs.delete_dir, path))

    # -- reading -----------------------------------------------------------------------------

    def _version_dirs(self, name: str) -> list[tuple[int, str]]:
        import pyarrow.fs as pafs

        directory = self._dataset_dir(name)
        infos = self._retry(
            f"list {self.describe(directory)}",
            lambda: self.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True)),
        )
        found = []
        for info in infos:
            m = _VERSION_DIR.fullmatch(info.base_name)
            if info.type == pafs.FileType.Directory and m:
                found.append((int(m.group(1)), info.path))
        return sorted(found)

    def manifest(self, name: str, version: int | None = None) -> Manifest | None:
        """The newest committed version of ``name`` (or its version ``version``), or None."""
        best: Manifest | None = None
        for number, path in reversed(self._version_dirs(name)):
            if version is not None and number != version:
                continue
            if best is not None and number < best.version:
                break  # the newest number is found; of its directories, the latest commit is taken
            raw = self._get_object(f"{path}/{MANIFEST}", missing_ok=True)
            if raw is not None:
                m = self._parse(raw, path)
                if best is None or m.created > best.created:
                    best = m
        return best

    def read_version(self, manifest: Manifest, *, progress: Callable[[int], None] | None = None) -> pa.Table:
        """Read a committed version's parts in parallel, checking each one's size and SHA-256."""
        import pyarrow.parquet as pq

        directory = f"{self._dataset_dir(manifest.name)}/{manifest.directory or f'v{manifest.version}'}"

        def read_part(i: int) -> pa.Table:
            entry = manifest.files[i]
            path = f"{directory}/{entry['path']}"
            data = self._get_object(path)
            assert data is not None
            if data.size != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise StorageError(f"checksum mismatch in {self.describe(path)}: the file is corrupt or was changed")
            table = pq.read_table(pa.BufferReader(data), schema=manifest.schema)
            if progress is not None:
                progress(table.nbytes)
            return table

        tables = self._parallel(read_part, range(len(manifest.files)))
        return pa.concat_tables(tables) if tables else manifest.schema.empty_table()

    def _get_object(self, path: str, missing_ok: bool = False) -> pa.Buffer | None:
        def get() -> pa.Buffer | None:
            try:
                with self.fs.open_input_file(path) as f:
                    return f.read_buffer()
            except FileNotFoundError:
                if missing_ok:
                    return None
                raise
            except OSError as e:  # S3: removed between the HEAD that opened it and the GET that reads it
                if missing_ok and "RESOURCE_NOT_FOUND" in str(e):
                    return None
                raise

        return self._retry(f"read {self.describe(path)}", get)

    def catalog(self) -> list[Manifest]:
        """The newest committed version of every dataset under the root."""
        return self.survey()[0]

    def survey(self) -> tuple[list[Manifest], list[dict[str, Any]]]:
        """(the newest committed version of every dataset, the manifests that cannot be read).

        A manifest that cannot be read is reported as {"name", "version", "uri", "error"} (name and
        version from its path) and its directory is left as it is, for inspection.
        """
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        infos = self._retry(f"list {self.uri}", lambda: self.fs.get_file_info(selector))
        manifests: dict[str, Manifest] = {}
        corrupt: list[dict[str, Any]] = []
        for info in infos:
            if info.base_name != MANIFEST or info.type != pafs.FileType.File:
                continue
            raw = self._get_object(info.path, missing_ok=True)
            if raw is None:
                continue
            try:
                m = Manifest.from_json(raw.to_pybytes(), self.describe(info.path))
                directory = info.path.rsplit("/", 1)[0]
                found = _VERSION_DIR.fullmatch(directory.rsplit("/", 1)[-1])
                if (
                    found is None
                    or int(found.group(1)) != m.version
                    or directory.rsplit("/", 1)[0] != self._dataset_dir(m.name)
                ):
                    raise StorageError(f"manifest at {self.describe(info.path)} names {m.name!r} v{m.version}")
                m = replace(m, directory=directory.rsplit("/", 1)[-1])
            except (StorageError, InvalidNameError) as e:
                directory = info.path.rsplit("/", 1)[0]
                try:
                    name, number = self.version_of(directory)
                except ValueError:  # not in a version directory: named by its path
                    name, number = directory[len(self.root) :].strip("/"), None
                log.error("%s; its files are left as they are, for inspection", e)
                corrupt.append({"name": name, "version": number, "uri": self.describe(directory), "error": str(e)})
                continue
            held = manifests.get(m.name)
            if held is None or (m.version, m.created) > (held.version, held.created):
                manifests[m.name] = m
        return sorted(manifests.values(), key=lambda m: m.name), corrupt

    def clean(self, manifests: Iterable[Manifest], keep: Iterable[str] = ()) -> list[str]:
        """Remove version directories that are not the committed newest of a dataset; return them.

        ``keep``: URIs of directories left as they are (those whose manifest is corrupt, for inspection).
        """
        kept = set(keep)
        removed = []
        for m in manifests:
            dirs = self._version_dirs(m.name)
            manifests_at = {p: self._manifest_at(p) for _, p in dirs if p.rsplit("/", 1)[-1] != m.directory}
            deadline = time.time() - self.grace_seconds
            for version, path in dirs:
                if path not in manifests_at or self.describe(path) in kept or version > m.version:
                    continue
                held = manifests_at[path]
                if held is None:
                    continue  # no manifest: a write that never finished, or one under way (see ``settled``)
                newer = [x.created for x in (m, *manifests_at.values()) if x is not None and x.version > held.version]
                if version == m.version or not newer or min(newer) > deadline:
                    continue  # the same number as the newest (another writer's), or superseded too recently
                self._retry(f"remove {self.describe(path)}", functools.partial(self.fs.delete_dir, path))
                removed.append(self.describe(path))
        return removed

    def settled(self, path: str) -> bool:
        """Whether nothing under the version directory ``path`` changed for ``grace_seconds`` (a write that
        never finished, not one under way)."""
        import pyarrow.fs as pafs

        if self.grace_seconds <= 0:
            return True
        selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
        infos = self._retry(f"list {self.describe(path)}", lambda: self.fs.get_file_info(selector))
        times = [i.mtime.timestamp() for i in infos if i.mtime is not None]
        return bool(times) and max(times) <= time.time() - self.grace_seconds

    def orphans(self) -> list[str]:
        """Version directories with no manifest anywhere under the root (writes that never finished)."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        infos = self._retry(f"list {self.uri}", lambda: self.fs.get_file_info(selector))
        dirs = {i.path for i in infos if i.type == pafs.FileType.Directory and _VERSION_DIR.fullmatch(i.base_name)}
        with_manifest = {i.path.rsplit("/", 1)[0] for i in infos if i.base_name == MANIFEST}
        return sorted(dirs - with_manifest)

    def version_of(self, path: str) -> tuple[str, int]:
        """(dataset name, version) of a version directory under the root."""
        relative = path[len(self.root) :].strip("/") if path.startswith(self.root) else path.strip("/")
        name, _, directory = relative.rpartition("/")
        m = _VERSION_DIR.fullmatch(directory)
        if m is None:
            raise ValueError(f"{path!r} is not a version directory")
        return name, int(m.group(1))

    def remove(self, path: str) -> None:
        self._retry(f"remove {self.describe(path)}", lambda: self.fs.delete_dir(path))

    # -- helpers -----------------------------------------------------------------------------

    def _parallel(self, fn: Callable[[int], T], items: range) -> list[T]:
        if len(items) <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(min(self.threads, len(items))) as pool:
            return list(pool.map(fn, items))

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return retry(what, fn, retries=self.retries, backoff=self.backoff)


def retry(what: str, fn: Callable[[], T], *, retries: int = 5, backoff: float = 0.2) -> T:
    """Run ``fn``; retry transient storage errors with exponential backoff and full jitter."""
    attempt = 0
    while True:
        try:
            return fn()
        except StorageError:
            raise
        except (OSError, pa.ArrowException) as e:
            transient = is_transient(e)
            if not transient or attempt >= retries:
                kind = f"after {attempt + 1} attempts" if transient else "(not retried)"
                raise StorageError(f"cannot {what} {kind}: {_first_line(e)}") from e
            delay = random.uniform(0, backoff * 2**attempt)
            log.warning("cannot %s (attempt %d, retrying in %.2fs): %s", what, attempt + 1, delay, _first_line(e))
            time.sleep(delay)
            attempt += 1


def is_transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    text = str(e)
    if _PERMANENT.search(text):
        return False
    return isinstance(e, (ConnectionError, TimeoutError)) or bool(_TRANSIENT.search(text))


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def unstorable(schema: pa.Schema) -> str | None:
    """Why Parquet cannot hold ``schema`` (naming the column and its type), or None if it can.

    The judge is pyarrow's own Parquet writer, opened on the schema: it refuses exactly the types a
    write would refuse (measured with pyarrow 26: unions, month_day_nano_interval, run-end encoded,
    a struct with no fields, at any depth: in lists, structs, maps and dictionaries).
    """
    return _unstorable(schema)


@lru_cache(maxsize=256)  # one check per distinct schema: opening a writer costs ~1 ms
def _unstorable(schema: pa.Schema) -> str | None:
    if _parquet_refuses(schema) is None:
        return None
    for f in schema:
        reason = _parquet_refuses(pa.schema([f]))
        if reason is not None:
            return f"column {f.name!r} of type {f.type} cannot be stored as Parquet ({reason})"
    return f"the schema cannot be stored as Parquet ({_parquet_refuses(schema)})"


def _parquet_refuses(schema: pa.Schema) -> str | None:
    import pyarrow.parquet as pq

    try:
        pq.ParquetWriter(pa.MockOutputStream(), schema).close()
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as e:
        return _first_line(e)
    return None


def check_storable(name: str, schema: pa.Schema) -> None:
    """Raise SchemaMismatchError if storage cannot hold dataset ``name`` of ``schema``."""
    reason = unstorable(schema)
    if reason is not None:
        raise SchemaMismatchError(
            f"dataset {name!r} cannot be persisted: {reason}; put it with persist='none' "
            "(memory only), or cast that column to a type Parquet stores"
        )


def _split(batches: Sequence[pa.RecordBatch], part_bytes: int) -> list[list[pa.RecordBatch]]:
    groups: list[list[pa.RecordBatch]] = [[]]
    size = 0
    for batch in batches:
        if groups[-1] and size + batch_nbytes(batch) > part_bytes:
            groups.append([])
            size = 0
        groups[-1].append(batch)
        size += batch_nbytes(batch)
    return groups if groups[0] else []


def redacted(uri: str) -> str:
    """``uri`` without a ``user:password@`` part, for logs (some pyarrow filesystems take credentials there)."""
    parsed = urlparse(uri)
    if parsed.password is None and parsed.username is None:
        return uri
    return parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()


def filesystem(uri: str, *, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) for a URI or plain path.

    S3 settings come from the standard AWS variables; ``s3_endpoint`` (else ``AWS_ENDPOINT_URL_S3``
    or ``AWS_ENDPOINT_URL``) points at an S3-compatible server such as moto or MinIO.
    """
    import pyarrow.fs as pafs

    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options: dict[str, Any] = {
            "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2),
            "connect_timeout": 5,
            "request_timeout": 60,
        }
        if endpoint:
            ep = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
            options.update(endpoint_override=ep.netloc, scheme=ep.scheme or "http")
        root = f"{parsed.netloc}{parsed.path}".rstrip("/")
        if not parsed.netloc:
            raise StorageError(f"storage URI {uri!r} names no bucket; use s3://BUCKET/PREFIX")
        return pafs.S3FileSystem(**options), root
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = os.path.abspath(parsed.path if parsed.scheme == "file" else uri)
        return pafs.LocalFileSystem(), path.rstrip("/") or "/"
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError) as e:
        raise StorageError(f"unsupported storage URI {uri!r}: {e}") from e
    return fs, root.rstrip("/")


def read_external(
    uri: str,
    *,
    s3_endpoint: str | None = None,
    threads: int = 8,
    progress: Callable[[int, int], None] | None = None,
    paths: Sequence[str] | None = None,
    schema: pa.Schema | None = None,
) -> pa.Table:
    """Read an external Parquet file or directory (hive partitions too) whole, files in parallel.

    ``progress(done_files, total_files)`` is called as files finish. ``paths``: read only these files
    of the directory (as listed; hive partitions relative to ``uri``); ``schema``: the rows' schema.
    """
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    fs, path = filesystem(uri, s3_endpoint=s3_endpoint)

    def discover() -> ds.Dataset:
        try:
            if paths is not None:
                return ds.dataset(
                    list(paths), filesystem=fs, format="parquet", partitioning="hive", partition_base_dir=path,
                    schema=schema,
                )
            return ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive", schema=schema)
        except FileNotFoundError as e:
            raise StorageError(f"no Parquet files at {uri}: nothing exists there") from e

    dataset = retry(f"list {uri}", discover)
    fragments = list(dataset.get_fragments())
    if not fragments:
        raise StorageError(f"no Parquet files at {uri}")
    done = 0
    lock = threading.Lock()

    def read(fragment: ds.ParquetFileFragment) -> pa.Table:
        nonlocal done

        def whole() -> pa.Table:
            with fs.open_input_file(fragment.path) as f:
                data = f.read_buffer()
            table = pq.read_table(pa.BufferReader(data))
            for field in dataset.schema:  # hive partition values live in the path, not the file
                if field.name not in table.column_names:
                    value = ds.get_partition_keys(fragment.partition_expression).get(field.name)
                    table = table.append_column(field, pa.array([value] * table.num_rows, field.type))
            return table.select(dataset.schema.names).cast(dataset.schema)

        table = retry(f"read {fs.type_name}://{fragment.path}", whole)
        with lock:  # pool threads finish concurrently
            done += 1
            if progress is not None:
                progress(done, len(fragments))
        return table

    with ThreadPoolExecutor(min(threads, len(fragments))) as pool:
        tables = list(pool.map(read, fragments))
    return pa.concat_tables(tables)
