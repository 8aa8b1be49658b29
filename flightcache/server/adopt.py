"""Same-host puts by adoption: the client writes the Arrow IPC file into the server's shared memory itself.

A streamed put costs the client's serialisation, gRPC, and the server's copy into its shared-memory file;
a client on the server's host can instead write that file itself (one copy, as Vineyard's and Ray's
puts cost) and hand it over. The ``adopt`` action (write role, like a put) does it in two calls:

1. ``{"name": N, "nbytes": B}`` asks for a file: the server answers a fresh path in its shared-memory
   directory (``in-<128 random bits>.arrow``) and the nonce that the file's footer must carry (the
   nonce readers check, derived from the server's secret and the path the file will have once adopted).
   A size over the memory limit or ``--max-put-bytes`` is refused here, before anything is written.
2. The client writes the IPC file there (created with O_EXCL, mode 0600) and sends
   ``{"name": N, "path": P, "rows": R, "mode": ..., "persist": ..., "ttl": ..., "txn": ...}``. The
   server takes the file out of the client's name (a link to ``<same bits>.arrow``, then unlink: a
   path is adopted once), checks it (a regular file of the server's own user with one link, a complete
   IPC file with the nonce of that path, no dictionaries, every buffer aligned inside the file, each
   batch structurally valid, the promised rows) and publishes it as a put would: under the same memory
   limit (its bytes are reserved as a put's are), atomically, or as a transaction part. Anything
   refused is unlinked and nothing is published. The version's batches are the file's, as the client
   wrote them (``Client.batch_rows`` rows each), so that readers mapping the file see the same batches.

Only the server's own user can write into its directory (0700, or 0750 with ``--shm-group``), so only
same-user clients adopt; others stream. Like the files a server writes itself, an adopted file is
trusted to stay unchanged once handed over (a same-user process could write either). Batches get the
checks a streamed put's get (the IPC reader's and ``RecordBatch.validate``), not a full validation of
every string, which would cost about as much as the put itself. A file a client wrote but never handed
over is removed ``ORPHAN_SECONDS`` after its last write (at the next request for a file) or at shutdown.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..arrowtypes import schema_contains
from ..errors import InvalidRequestError, MemoryFullError, UnauthorizedError
from ..protocol import AdoptRequest
from ..shm import NONCE_KEY
from ..units import format_bytes
from .arrays import buffer_sizes
from .shm import SharedMemory

if TYPE_CHECKING:
    from .auth import Limits
    from .cache import Cache

ADOPT_NAME = re.compile(r"in-([0-9a-f]{32})\.arrow")
ORPHAN_SECONDS = 600.0


class AdoptedFile:
    """A client-written IPC file that a version now owns (``store.BatchFile``: nothing more is written)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def keep(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        raise InvalidRequestError("an adopted file takes no more batches")

    def finish(self) -> None:
        pass

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.token)


def adopt(cache: Cache, limits: Limits, request: AdoptRequest) -> dict[str, Any]:
    """Answer an ``adopt`` action: a file to write, or the published version (or staged part) of a written one."""
    shm = cache.shm
    if request.path is None:
        return _hand_out(shm, cache, limits, request)
    if shm is None:
        raise InvalidRequestError(
            f"put of dataset {request.name!r}: this server keeps nothing in shared memory (--shm off); stream it"
        )
    given = Path(request.path)
    match = ADOPT_NAME.fullmatch(given.name)
    if given.parent != shm.dir or match is None:
        raise InvalidRequestError(
            f"put of dataset {request.name!r}: {request.path!r} is not a file this server handed out for adoption"
        )
    final = shm.dir / f"{match.group(1)}.arrow"
    try:
        fd = os.open(given, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidRequestError(
            f"put of dataset {request.name!r}: no file at {request.path!r} (already adopted, or written on "
            "another host); nothing was published"
        ) from None
    except OSError as e:
        _unlink(given)
        raise InvalidRequestError(f"put of dataset {request.name!r}: cannot open {request.path!r}: {e}") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid():
            _unlink(given)
            raise UnauthorizedError(
                f"put of dataset {request.name!r}: {request.path!r} belongs to user {info.st_uid}, not to the "
                "server's; nothing was published"
            )
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            _unlink(given)
            raise InvalidRequestError(
                f"put of dataset {request.name!r}: {request.path!r} is not a plain file with a single link; "
                "nothing was published"
            )
        try:
            os.link(given, final)  # fails if the path was adopted already (or is being adopted)
        except FileExistsError:
            raise InvalidRequestError(
                f"put of dataset {request.name!r}: {request.path!r} was adopted already; nothing was published"
            ) from None
        except FileNotFoundError:
            raise InvalidRequestError(
                f"put of dataset {request.name!r}: {request.path!r} was adopted already; nothing was published"
            ) from None
        _unlink(given)
        try:
            return _publish(cache, shm, limits, request, fd, info.st_size, str(final))
        except BaseException:
            _unlink(final)
            raise
    finally:
        os.close(fd)


def _hand_out(shm: SharedMemory | None, cache: Cache, limits: Limits, request: AdoptRequest) -> dict[str, Any]:
    if shm is None:
        return {"name": request.name, "path": None, "enabled": False}
    if request.nbytes is not None:
        limits.check_put(request.name, request.nbytes)
        limit = cache.store.memory_limit
        if limit is not None and request.nbytes > limit:
            raise MemoryFullError(
                f"memory full: put of dataset {request.name!r} ({format_bytes(request.nbytes)}) is larger than the "
                f"server's memory limit of {format_bytes(limit)}; nothing was published"
            )
    _remove_orphans(shm.dir)
    bits = secrets.token_hex(16)
    path = shm.dir / f"in-{bits}.arrow"
    return {"name": request.name, "path": str(path), "nonce": shm._nonce(str(shm.dir / f"{bits}.arrow"))}


def _publish(
    cache: Cache, shm: SharedMemory, limits: Limits, request: AdoptRequest, fd: int, size: int, token: str
) -> dict[str, Any]:
    name = request.name
    refused = f"put of dataset {name!r}: the file handed over"
    limits.check_put(name, size)
    if size == 0:
        raise InvalidRequestError(f"{refused} is empty; nothing was published")
    view = pa.py_buffer(mmap.mmap(fd, size, access=mmap.ACCESS_READ))
    try:
        reader = pa.ipc.open_file(view)
        if (reader.metadata or {}).get(NONCE_KEY) != shm._nonce(token).encode():
            raise InvalidRequestError(f"{refused} lacks the nonce this server gave for it; nothing was published")
        schema = reader.schema
        if schema_contains(schema, pa.types.is_dictionary):
            raise InvalidRequestError(f"{refused} has dictionary columns, which are streamed; nothing was published")
        table = reader.read_all()  # the batches, zero-copy, in one call (a Python loop costs ~10 us a batch)
        table.validate()
        batches = table.to_batches()
    except (pa.ArrowException, OSError) as e:
        # e.g. truncated: "Not an Arrow file", or a footer or message that does not parse
        raise InvalidRequestError(
            f"{refused} is not a complete, valid Arrow IPC file ({e}); nothing was published"
        ) from None
    start, end = view.address, view.address + view.size
    sizes = buffer_sizes(batches)
    for address, nbytes in sizes.items():
        if address % 8 or not start <= address <= address + nbytes <= end:
            raise InvalidRequestError(
                f"{refused} has a buffer that is compressed or not 8-byte aligned in the file; nothing was published"
            )
    rows = sum(b.num_rows for b in batches)
    if request.rows is not None and request.rows != rows:
        raise InvalidRequestError(
            f"{refused} holds {rows} rows, not the {request.rows} the client wrote; nothing was published"
        )
    if shm.gid is not None:  # readable by the group, as the server's own files are
        os.fchown(fd, -1, shm.gid)
        os.fchmod(fd, 0o640)
    staged = cache.store.begin_put(name, schema, request.mode)
    try:
        staged.adopt(AdoptedFile(token), batches, sizes)
    except BaseException:
        staged.abort()
        raise
    try:
        if request.txn is not None:
            part = staged.stage(request.txn)
            return {"txn": request.txn, "part": part, "rows": rows, "bytes": staged.nbytes}
        version = cache.publish(staged, persist=request.persist, ttl=request.ttl)
    except BaseException:
        staged.abort()
        raise
    return {"name": name, "version": version.number, "rows": version.num_rows, "bytes": version.nbytes}


def _remove_orphans(directory: Path) -> None:
    """Unlink handed-out files nobody handed back (their writer died) ``ORPHAN_SECONDS`` after their last write."""
    now = time.time()
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if ADOPT_NAME.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime > ORPHAN_SECONDS:
                        os.unlink(entry.path)


def _unlink(path: Path | str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
