"""Same-host reads, the client side: map the Arrow IPC files a server keeps in shared memory.

The ``shm`` action answers, for a version the server still holds, each file's path and a random nonce
that the server also wrote into the file's footer (see ``flightcache.server.shm`` for the server side).
A client maps the files and trusts them only if every nonce matches: a client on another host (or in
another ``/dev/shm`` namespace) cannot open the path, or finds a different file there, and falls back
to ``do_get``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from .protocol import decode_schema

if TYPE_CHECKING:
    import pyarrow.compute as pc

log = logging.getLogger("flightcache.shm")

NONCE_KEY = b"flightcache.nonce"  # the key of the nonce in each file's footer metadata



@dataclass(frozen=True)
class SharedVersion:
    """A version mapped from shared memory: its batches, in order, zero-copy."""

    name: str
    version: int
    schema: pa.Schema
    batches: list[pa.RecordBatch]

    def table(
        self,
        columns: list[str] | None = None,
        filter: pc.Expression | None = None,
        batch_range: tuple[int, int] | None = None,
    ) -> pa.Table:
        """The version (or batches [start, end) of it) projected and filtered here, as the server's scan
        would; without a filter, zero-copy."""
        start, end = batch_range or (0, len(self.batches))
        table = pa.Table.from_batches(self.batches[start:end], self.schema)
        if filter is not None:
            import pyarrow.dataset as ds

            return ds.dataset(table).to_table(columns=columns, filter=filter)
        return table if columns is None else table.select(columns)


def read_shared(answer: dict[str, Any]) -> SharedVersion | None:
    """Map the files the ``shm`` action named; None if any cannot be opened or is not the server's."""
    batches: list[pa.RecordBatch] = []
    for f in answer["files"]:
        try:
            reader = pa.ipc.open_file(pa.memory_map(f["path"]))
        except (OSError, pa.ArrowException) as e:  # another host, or unlinked meanwhile, or not ours
            log.debug("cannot map %s: %s", f["path"], e)
            return None
        if (reader.metadata or {}).get(NONCE_KEY) != f["nonce"].encode():
            log.debug("%s is not the file the server wrote (nonce differs)", f["path"])
            return None
        batches.extend(reader.get_batch(i) for i in range(reader.num_record_batches))
    if len(batches) != answer["batches"] or sum(b.num_rows for b in batches) != answer["rows"]:
        return None
    return SharedVersion(answer["name"], answer["version"], decode_schema(answer["schema"]), batches)
