"""The ``arrow-parquet`` format for Spark: Parquet on any pyarrow filesystem URI (``s3://``, a path).

The pipelines' own baseline, not part of the flightcache library: ``pipelines/common.py`` registers it
and ships this file to Spark's Python workers (``addPyFile``).

Before Spark's own S3A was set up here (``pipelines/s3a.py``), the object-storage hand-off that
flightcache was measured against read and wrote Parquet through pyarrow's filesystems inside Spark's
Python workers; the pipeline benchmark keeps it as its ``s3-cloud``/``s3-local`` modes:

    df.write.format("arrow-parquet").mode("overwrite").save("s3://bucket/handoff/logs/clean")
    spark.read.format("arrow-parquet").load("s3://bucket/handoff/logs/clean")

Reads make one Spark partition per file and read each object whole (one request; ranged small
reads on S3 were measured far slower). Writes put one file per task; the job's commit removes the
files an overwrite replaces and writes ``_SUCCESS``, and an abort removes the job's files. Files
whose names start with ``_`` or ``.`` are not data. S3 has no atomic rename, so, as with Spark's
own committers on S3, readers during a commit may see a mix: this is the baseline, not the cache.
S3 settings come from the standard AWS variables (``AWS_ENDPOINT_URL`` for moto or MinIO).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql.datasource import (
    DataSource,
    DataSourceArrowWriter,
    DataSourceReader,
    InputPartition,
    WriterCommitMessage,
)
from pyspark.sql.types import StructType

from flightcache.errors import InvalidRequestError, StorageError
from flightcache.integrations.spark import _conform, arrow_schema, spark_schema
from flightcache.server.storage import filesystem, retry

FORMAT = "arrow-parquet"


def _location(options: Mapping[str, str]) -> tuple[pafs.FileSystem, str, str]:
    uri = options.get("path")
    if not uri:
        raise InvalidRequestError(f"give {FORMAT!r} a location: .load('s3://bucket/prefix') or .save(...)")
    fs, root = filesystem(uri)
    return fs, root, uri


def _data_files(fs: pafs.FileSystem, root: str, uri: str) -> list[str]:
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    infos = retry(f"list {uri}", lambda: fs.get_file_info(selector))
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File and not any(p[:1] in "_." for p in i.path[len(root) :].split("/") if p)
    )


class ArrowParquetDataSource(DataSource):
    """``format("arrow-parquet")``: Parquet through pyarrow filesystems; option ``path`` only."""

    @classmethod
    def name(cls) -> str:
        return FORMAT

    def schema(self) -> StructType:
        fs, root, uri = _location(self.options)
        files = _data_files(fs, root, uri)
        if not files:
            raise StorageError(f"no Parquet files at {uri}")
        with fs.open_input_file(files[0]) as f:
            return spark_schema(pq.read_schema(f))

    def reader(self, schema: StructType) -> DataSourceReader:
        return _Reader(self.options, schema)

    def writer(self, schema: StructType, overwrite: bool) -> DataSourceArrowWriter:
        return _Writer(self.options, schema, overwrite)


class _File(InputPartition):
    def __init__(self, path: str) -> None:
        self.path = path


class _Reader(DataSourceReader):
    def __init__(self, options: Mapping[str, str], schema: StructType) -> None:
        self.options = dict(options)
        self.target = arrow_schema(schema)

    def partitions(self) -> list[InputPartition]:
        fs, root, uri = _location(self.options)
        return [_File(p) for p in _data_files(fs, root, uri)]

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        assert isinstance(partition, _File)
        fs, _, _ = _location(self.options)

        def whole() -> pa.Buffer:
            with fs.open_input_file(partition.path) as f:
                return f.read_buffer()

        data = retry(f"read {fs.type_name}://{partition.path}", whole)
        table = pq.read_table(pa.BufferReader(data), columns=self.target.names)
        for batch in table.to_batches(max_chunksize=64 * 1024):
            yield _conform(batch, self.target)


@dataclass(frozen=True)
class _Written(WriterCommitMessage):
    path: str | None


class _Writer(DataSourceArrowWriter):
    def __init__(self, options: Mapping[str, str], schema: StructType, overwrite: bool) -> None:
        self.options = dict(options)
        self.schema = arrow_schema(schema)
        self.overwrite = overwrite
        self.job = uuid.uuid4().hex[:12]

    def write(self, iterator: Iterator[pa.RecordBatch]) -> WriterCommitMessage:
        fs, root, uri = _location(self.options)
        batches = [_conform(b, self.schema) for b in iterator]
        if not batches:
            return _Written(None)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_batches(batches, self.schema), sink, compression="zstd")
        data = sink.getvalue()
        path = f"{root}/part-{self.job}-{uuid.uuid4().hex[:12]}.parquet"

        def put() -> None:
            _make_dir(fs, root)
            with fs.open_output_stream(path) as out:
                out.write(data)

        retry(f"write {uri}", put)
        return _Written(path)

    def commit(self, messages: list[WriterCommitMessage | None]) -> None:
        fs, root, uri = _location(self.options)
        written = {m.path for m in messages if isinstance(m, _Written) and m.path}
        if self.overwrite:
            for path in _data_files(fs, root, uri):
                if path not in written:
                    retry(f"delete {path}", functools.partial(fs.delete_file, path))
        _make_dir(fs, root)
        if not written:  # an empty result still needs a file that carries the schema
            empty = f"{root}/part-{self.job}-empty.parquet"
            with fs.open_output_stream(empty) as out:
                pq.write_table(self.schema.empty_table(), out)
        with fs.open_output_stream(f"{root}/_SUCCESS") as out:
            out.write(b"")

    def abort(self, messages: list[WriterCommitMessage | None]) -> None:
        fs, _, _ = _location(self.options)
        for m in messages:
            if isinstance(m, _Written) and m.path:
                fs.delete_file(m.path)


def _make_dir(fs: pafs.FileSystem, root: str) -> None:
    """A local destination needs its directory; object stores have none (creating one costs a request)."""
    if fs.type_name == "local":
        fs.create_dir(root, recursive=True)


def register(spark: Any) -> None:
    """Register ``arrow-parquet`` in a session, shipping this file to its Python workers."""
    spark.sparkContext.addPyFile(__file__)
    spark.dataSource.register(ArrowParquetDataSource)


__all__ = ["FORMAT", "ArrowParquetDataSource", "register"]
