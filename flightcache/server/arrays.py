"""Arrow helpers the server's tiers share: walking nested types, counting buffers, aligning batches."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from ..arrowtypes import contains


def buffer_sizes(batches: Iterable[pa.RecordBatch]) -> dict[int, int]:
    """The distinct Arrow buffers behind ``batches``, as {address: size}."""
    sizes: dict[int, int] = {}

    def visit(arr: pa.Array) -> None:
        for buf in arr.buffers():  # includes the buffers of child arrays
            if buf is not None:
                sizes[buf.address] = max(buf.size, sizes.get(buf.address, 0))
        if isinstance(arr, pa.DictionaryArray):
            visit(arr.dictionary)
        elif contains(arr.type, pa.types.is_dictionary):
            for child in _children(arr):
                visit_dictionaries(child)

    def visit_dictionaries(arr: pa.Array) -> None:
        if isinstance(arr, pa.DictionaryArray):
            visit(arr.dictionary)
        elif contains(arr.type, pa.types.is_dictionary):
            for child in _children(arr):
                visit_dictionaries(child)

    for batch in batches:
        for column in batch.columns:
            visit(column)
    return sizes


def aligned(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with every buffer 8-byte aligned, copying it once if any buffer is not.

    Flight hands a server views into gRPC slices at arbitrary addresses (measured: 1 mod 8), which
    compute kernels (filters, DuckDB, Parquet writers) read slowly or refuse. One copy through Arrow
    IPC, whose writer pads every buffer to 8 bytes, fixes it for the dataset's lifetime.
    """
    if all(address % 8 == 0 for address in buffer_sizes([batch])):
        return batch
    # Sized exactly: a growing BufferOutputStream would keep up to twice the bytes allocated.
    mock = pa.MockOutputStream()
    with pa.ipc.new_stream(mock, batch.schema) as writer:
        writer.write_batch(batch)
    buffer = pa.allocate_buffer(mock.size())
    with pa.ipc.new_stream(pa.FixedSizeBufferWriter(buffer), batch.schema) as writer:
        writer.write_batch(batch)
    return pa.ipc.open_stream(buffer).read_next_batch()


def batch_nbytes(batch: pa.RecordBatch) -> int:
    """``batch.nbytes``, but safe: for a batch with union columns, the size of all its buffers.

    pyarrow (26) crashes the process computing ``nbytes`` of an empty union read from IPC, as a list of
    nulls of unions arrives from Flight (its type-ids buffer is absent).
    """
    if any(contains(f.type, pa.types.is_union) for f in batch.schema):
        return int(batch.get_total_buffer_size())
    return int(batch.nbytes)


def _children(arr: pa.Array) -> list[pa.Array]:
    if isinstance(arr, (pa.StructArray, pa.UnionArray)):
        return [arr.field(i) for i in range(arr.type.num_fields)]
    if hasattr(arr, "values"):  # list, large list, fixed-size list, map, list view
        return [arr.values]
    return []
