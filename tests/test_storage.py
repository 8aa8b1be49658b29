"""The storage tier on its own, on a local directory and on a real moto S3 server (conformance)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import MotoS3, every_type_table, logs_table

from flightcache.errors import StorageError
from flightcache.server.storage import MANIFEST, Storage, is_transient, read_external, redacted


def _files(storage: Storage, name: str) -> list[str]:
    import pyarrow.fs as pafs

    selector = pafs.FileSelector(f"{storage.root}/{name}", recursive=True, allow_not_found=True)
    return sorted(
        i.path[len(storage.root) + 1 :] for i in storage.fs.get_file_info(selector) if i.type == pafs.FileType.File
    )


def test_version_round_trip_every_type(storage_uri: str) -> None:
    """A written version reads back identical, schema and all."""
    storage = Storage(storage_uri)
    table = every_type_table()
    manifest = storage.write_version("types", 1, table.schema, table.to_batches())
    assert manifest.rows == table.num_rows
    back = storage.read_version(storage.manifest("types"))  # type: ignore[arg-type]
    assert back.schema.equals(table.schema) and back.equals(table)


def test_layout_parts_manifest_and_old_versions_removed(storage_uri: str) -> None:
    """<name>/v<N>-<writer>/part-NNNNN.parquet + manifest; committing v2 removes the v1 this writer wrote."""
    storage = Storage(storage_uri, part_bytes=50_000, grace_seconds=0)  # the only writer: old versions go at once
    table = logs_table(20_000)
    storage.write_version("logs/raw", 1, table.schema, table.to_batches(max_chunksize=2000))
    m2 = storage.write_version("logs/raw", 2, table.schema, table.to_batches(max_chunksize=2000))
    files = _files(storage, "logs/raw")
    v2 = f"logs/raw/v2-{storage.writer}"
    assert m2.directory == v2.rsplit("/", 1)[-1]
    assert all(f.startswith(f"{v2}/") for f in files)
    assert f"{v2}/{MANIFEST}" in files
    assert [f for f in files if f.endswith(".parquet")] == [f"{v2}/part-{i:05d}.parquet" for i in range(len(m2.files))]
    assert len(m2.files) > 1  # parallel multi-file write
    assert all(len(f["sha256"]) == 64 for f in m2.files)
    assert storage.read_version(m2).equals(table)


def test_catalog_ignores_and_cleans_unfinished_versions(storage_uri: str) -> None:
    """A version directory without a manifest does not exist; orphans() finds it for removal."""
    storage = Storage(storage_uri)
    table = logs_table(100)
    storage.write_version("a", 1, table.schema, table.to_batches())
    half = f"{storage.root}/b/v1"
    storage.fs.create_dir(half)
    with storage.fs.open_output_stream(f"{half}/part-00000.parquet") as out:
        out.write(b"half a file")
    assert [m.name for m in storage.catalog()] == ["a"]
    assert storage.orphans() == [half]
    storage.remove(half)
    assert storage.orphans() == []


def test_checksum_mismatch_is_detected(storage_uri: str) -> None:
    storage = Storage(storage_uri)
    table = logs_table(100)
    m = storage.write_version("a", 1, table.schema, table.to_batches())
    with storage.fs.open_output_stream(f"{storage.root}/a/{m.directory}/{m.files[0]['path']}") as out:
        out.write(b"tampered")
    with pytest.raises(StorageError, match="checksum mismatch"):
        storage.read_version(m)


def test_delete_removes_every_version(storage_uri: str) -> None:
    storage = Storage(storage_uri)
    table = logs_table(10)
    storage.write_version("a/b", 3, table.schema, table.to_batches())
    storage.write_version("a", 1, table.schema, table.to_batches())
    storage.delete("a")
    assert storage.manifest("a") is None
    assert storage.manifest("a/b") is not None  # a namespace neighbour is untouched


def test_read_external_file_dir_and_hive(storage_uri: str) -> None:
    """External Parquet: one file, a directory of files, hive partitions (values from the paths)."""
    storage = Storage(storage_uri)
    table = logs_table(3000)
    base = f"{storage.root}/ext"
    storage.fs.create_dir(f"{base}/dir", recursive=True)
    pq.write_table(table, f"{base}/one.parquet", filesystem=storage.fs)
    for i in range(3):
        pq.write_table(table.slice(i * 1000, 1000), f"{base}/dir/part-{i}.parquet", filesystem=storage.fs)
    ds.write_dataset(
        table,
        f"{base}/hive",
        filesystem=storage.fs,
        format="parquet",
        partitioning=ds.partitioning(pa.schema([("method", pa.string())]), flavor="hive"),
    )
    prefix = storage_uri.rstrip("/") + "/ext"
    assert read_external(f"{prefix}/one.parquet").equals(table)
    calls: list[tuple[int, int]] = []
    got = read_external(f"{prefix}/dir", progress=lambda done, total: calls.append((done, total)))
    assert got.sort_by("ts").equals(table.sort_by("ts"))
    assert sorted(calls) == [(1, 3), (2, 3), (3, 3)]
    hive = read_external(f"{prefix}/hive")
    assert hive.num_rows == 3000 and set(hive["method"].to_pylist()) == {"GET", "POST", "PUT"}
    assert hive.sort_by("ts").select(table.column_names).equals(table.sort_by("ts"))
    with pytest.raises(StorageError):
        read_external(f"{prefix}/nothing-here")


def test_missing_bucket_fails_fast_naming_the_uri(moto_s3: MotoS3, s3_bucket: str) -> None:
    storage = Storage("s3://no-such-bucket-here/prefix", retries=5, backoff=1.0)
    table = logs_table(10)
    import time

    started = time.monotonic()
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-here/prefix.*not retried"):
        storage.write_version("a", 1, table.schema, table.to_batches())
    assert time.monotonic() - started < 5  # no backoff on a permanent error


def test_unreachable_s3_is_retried_then_fails(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connection refused is transient: retried with backoff, then a StorageError naming the URI."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    storage = Storage(f"s3://{s3_bucket}/x", retries=2, backoff=0.01)
    table = logs_table(10)
    with pytest.raises(StorageError, match=rf"s3://{s3_bucket}/x.* after 3 attempts"):
        storage.write_version("a", 1, table.schema, table.to_batches())


@pytest.mark.parametrize(
    "message,transient",
    [
        ("AWS Error SLOW_DOWN during PutObject operation", True),
        ("AWS Error NETWORK_CONNECTION during HeadBucket operation: curlCode: 7", True),
        ("HTTP response code 503 Service Unavailable", True),
        ("Connection reset by peer", True),
        ("AWS Error ACCESS_DENIED during PutObject operation: Access Denied", False),
        ("Bucket 'x' not found", False),
        ("AWS Error NO_SUCH_BUCKET during ListObjects: The specified bucket does not exist (NoSuchBucket)", False),
    ],
)
def test_error_classification(message: str, transient: bool) -> None:
    assert is_transient(OSError(message)) is transient


def test_redacted_hides_credentials_in_uris() -> None:
    """Load URIs reach the request log: a user:password part never does."""
    assert redacted("hdfs://user:secret@namenode:9000/logs") == "hdfs://namenode:9000/logs"
    assert redacted("s3://bucket/prefix/") == "s3://bucket/prefix/"
    assert redacted("/local/path") == "/local/path"
