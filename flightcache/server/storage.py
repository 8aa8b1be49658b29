"""Parquet in and out of any pyarrow filesystem URI (``s3://bucket/prefix``, ``file:///path``, a path).

Layout of a persisted dataset version::

    <root>/<name>/v<version>/part-00000.parquet
    <root>/<name>/v<version>/part-00001.parquet
    <root>/<name>/v<version>/manifest.json      written last: the version exists once it does

The manifest holds the schema, rows, bytes and every part's size and SHA-256. After a version
commits, older versions of the dataset are removed. A version directory without a manifest is a
write that never finished; ``catalog`` ignores it and ``clean`` removes it.

Objects are written and read whole (one request each, parts in parallel): ranged small reads on
S3 were measured orders of magnitude slower. Transient errors (throttling, 5xx, connection
trouble) are retried with exponential backoff and full jitter; permanent ones (no bucket, access
denied, not found) fail at once. Every failure is a ``StorageError`` naming the URI.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa

from ..errors import InvalidNameError, StorageError
from ..names import validate_name
from .store import batch_nbytes

# Imported where used: pyarrow.dataset brings pandas (~50 MiB), and pyarrow.fs with pyarrow.parquet
# cost ~8 MiB that a memory-only server never needs.
if TYPE_CHECKING:
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

log = logging.getLogger("flightcache.storage")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
DEFAULT_PART_BYTES = 128 * 1024 * 1024
_VERSION_DIR = re.compile(r"v(\d+)")
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

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "name": self.name,
                "version": self.version,
                "schema": base64.b64encode(self.schema.serialize().to_pybytes()).decode(),
                "rows": self.rows,
                "bytes": self.bytes,
                "files": list(self.files),
                "created": self.created,
            },
            indent=1,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        try:
            d = json.loads(raw)
            if d.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {d.get('format')!r}")
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(d["schema"])))
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
    ) -> None:
        self.uri = uri
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
        return f"{self._dataset_dir(name)}/v{version}"

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

        files = self._parallel(write_part, range(len(groups)))
        manifest = Manifest(
            name,
            version,
            schema,
            sum(f["rows"] for f in files),
            sum(batch_nbytes(b) for b in batches),
            tuple(files),
            time.time(),
        )
        self._put_object(f"{directory}/{MANIFEST}", pa.py_buffer(manifest.to_json()))
        self._remove_versions(name, keep=version)
        return manifest

    def _put_object(self, path: str, data: pa.Buffer) -> None:
        def put() -> None:
            with self.fs.open_output_stream(path) as out:
                out.write(data)

        self._retry(f"write {self.describe(path)}", put)

    def _remove_versions(self, name: str, keep: int | None) -> None:
        for version, path in self._version_dirs(name):
            if version != keep:
                self._retry(f"remove {self.describe(path)}", lambda p=path: self.fs.delete_dir(p))

    def delete(self, name: str) -> None:
        """Remove every stored version of a dataset."""
        self._remove_versions(name, keep=None)

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

    def manifest(self, name: str) -> Manifest | None:
        """The newest committed version of ``name``, or None."""
        for version, path in reversed(self._version_dirs(name)):
            raw = self._get_object(f"{path}/{MANIFEST}", missing_ok=True)
            if raw is not None:
                return Manifest.from_json(raw.to_pybytes(), self.describe(path))
            del version
        return None

    def read_version(self, manifest: Manifest, *, progress: Callable[[int], None] | None = None) -> pa.Table:
        """Read a committed version's parts in parallel, checking each one's size and SHA-256."""
        import pyarrow.parquet as pq

        directory = self._version_dir(manifest.name, manifest.version)

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

        return self._retry(f"read {self.describe(path)}", get)

    def catalog(self) -> list[Manifest]:
        """The newest committed version of every dataset under the root."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        infos = self._retry(f"list {self.uri}", lambda: self.fs.get_file_info(selector))
        manifests: dict[str, Manifest] = {}
        for info in infos:
            if info.base_name != MANIFEST or info.type != pafs.FileType.File:
                continue
            raw = self._get_object(info.path, missing_ok=True)
            if raw is None:
                continue
            try:
                m = Manifest.from_json(raw.to_pybytes(), self.describe(info.path))
                if info.path != f"{self._version_dir(m.name, m.version)}/{MANIFEST}":
                    raise StorageError(f"manifest at {self.describe(info.path)} names {m.name!r} v{m.version}")
            except (StorageError, InvalidNameError) as e:
                log.warning("ignoring %s", e)
                continue
            if m.name not in manifests or m.version > manifests[m.name].version:
                manifests[m.name] = m
        return sorted(manifests.values(), key=lambda m: m.name)

    def clean(self, manifests: Iterable[Manifest]) -> list[str]:
        """Remove version directories that are not the committed newest of a dataset; return them."""
        removed = []
        for m in manifests:
            for version, path in self._version_dirs(m.name):
                if version != m.version and not self._has_manifest_newer(path, m.version):
                    self._retry(f"remove {self.describe(path)}", lambda p=path: self.fs.delete_dir(p))
                    removed.append(self.describe(path))
        return removed

    def _has_manifest_newer(self, path: str, committed: int) -> bool:
        m = _VERSION_DIR.fullmatch(path.rsplit("/", 1)[-1])
        return bool(m) and int(m.group(1)) > committed and self._get_object(f"{path}/{MANIFEST}", True) is not None

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
        return name, int(directory[1:])

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
