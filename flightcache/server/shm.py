"""Same-host reads through shared memory: dataset versions as Arrow IPC files under ``/dev/shm``.

Server side (``SharedMemory``): each put writes its batches, as they arrive, to one Arrow IPC file
in a private directory ``/dev/shm/flightcache-<uid>/<pid>-<start time>-<random>/`` (mode 0700, files
0600; 0750 and 0640 with a group) and the store keeps read-only mappings of the written bytes in
place of the received batches. The IPC writer pads every buffer to 8 bytes, so this write is also
the realignment copy a put needed anyway: a put still costs one copy, and the file's pages are the
dataset's memory, counted once by the store's buffer accounting. A version is a list of such files
(an append adds one). A file is unlinked when the store no longer holds a version that uses it
(drop, eviction, retention expiry); whoever mapped it keeps a valid view, as Linux keeps the pages
of an unlinked file until its last mapping goes. Shutdown removes the directory; a server killed
with ``kill -9`` leaves it behind and the next server of the same user removes it at start: a
running server holds a lock on its directory, which the kernel releases when the process ends.

Client side (``read_shared``): the ``shm`` action answers, for a version still held, each file's
path and a random nonce that the server also wrote into the file's footer. A client maps the files
and trusts them only if every nonce matches: a client on another host (or in another ``/dev/shm``
namespace) cannot open the path, or finds a different file there, and falls back to ``do_get``.
File names carry 128 random bits, and a path names exactly one file of one dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import mmap
import os
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from ..arrowtypes import schema_contains
from ..errors import InvalidRequestError, MemoryFullError
from ..units import format_bytes

if TYPE_CHECKING:
    pass  # loaded where a filter is used: ~8 MiB an idle server does without

log = logging.getLogger("flightcache.shm")

SHM_ROOT = Path("/dev/shm")
SHM_MODES = ("auto", "on", "off")
NONCE_KEY = b"flightcache.nonce"
# Mappings grow by this much: one mapping (and, before Python 3.13, one file descriptor) per region,
# not per batch. Untouched pages of a sparse tmpfs file cost nothing.
REGION_BYTES = 64 * 1024 * 1024
_PAGE = mmap.PAGESIZE
_IPC_MAGIC = 8  # "ARROW1" plus padding, before the first message of a file


class SharedMemory:
    """The server's shared-memory directory and the files of the versions it holds."""

    def __init__(self, root: Path = SHM_ROOT, *, group: str | None = None) -> None:
        import fcntl  # POSIX only, like the rest of the server side

        self.gid = _gid(group) if group else None
        base = root / f"flightcache-{os.getuid()}"
        _private_dir(base, 0o710 if self.gid is not None else 0o700, self.gid)
        self.removed_stale = remove_stale(base)
        # Made under a hidden name and locked before it gets its real one: a directory with a real name
        # and no lock is a dead server's, whatever pid namespace it ran in.
        making = base / f".{secrets.token_hex(8)}"
        making.mkdir(mode=0o700)
        self._lock = os.open(making, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # held until this process ends or closes it
        if self.gid is not None:
            os.chown(making, -1, self.gid)
            os.chmod(making, 0o750)
        self.dir = base / f"{os.getpid()}-{_start_time(os.getpid())}-{secrets.token_hex(4)}"
        making.rename(self.dir)
        self._secret = secrets.token_bytes(32)

    def open(self, name: str, schema: pa.Schema) -> SharedFile | None:
        """A file for one put's batches, or None when Arrow IPC files cannot hold them unchanged."""
        if schema_contains(schema, pa.types.is_dictionary):
            return None  # an IPC file allows one dictionary per field; batches may carry different ones
        path = self.dir / f"{secrets.token_hex(16)}.arrow"
        return SharedFile(path, schema, self._nonce(str(path)), 0o640 if self.gid is not None else 0o600)

    def _nonce(self, path: str) -> str:
        # Derived, not stored: nothing to forget when a file goes, and no answer for a path we did not make.
        return hmac.new(self._secret, path.encode(), hashlib.sha256).hexdigest()[:32]

    def remove(self, token: str) -> None:
        """Unlink a file no version uses any more (mappings of it stay valid)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(token)

    def describe(self, files: Iterable[str]) -> list[dict[str, str]]:
        """What the ``shm`` action hands out for a version's files: path and nonce of each."""
        return [{"path": f, "nonce": self._nonce(f)} for f in files]

    def close(self) -> None:
        """Remove the directory and every file in it."""
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


class SharedFile:
    """One put's batches, written to an Arrow IPC file and read back as zero-copy mappings."""

    def __init__(self, path: Path, schema: pa.Schema, nonce: str, mode: int) -> None:
        self.token = str(path)
        self.schema = schema
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        self._sink = pa.OSFile(self.token, "w")  # the file exists with its mode; this opens it for Arrow
        self._writer = pa.ipc.new_file(self._sink, schema, metadata={NONCE_KEY: nonce.encode()})
        self._view: pa.Buffer | None = None
        self._view_start = self._view_end = 0
        self._closed = False

    def keep(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Write ``batch`` to the file; return it as a read-only mapping of what was written."""
        start = self._sink.tell()
        try:
            self._writer.write_batch(batch)
        except OSError as e:
            raise MemoryFullError(
                f"cannot write to shared memory {self.token} ({e}); free space in /dev/shm, or start the "
                "server with --shm off"
            ) from e
        end = self._sink.tell()
        if self._view is None or end > self._view_end:
            floor = start - start % _PAGE
            size = -(-max(REGION_BYTES, end - floor) // _PAGE) * _PAGE
            os.ftruncate(self._fd, max(os.fstat(self._fd).st_size, floor + size))  # sparse: no pages yet
            self._view = pa.py_buffer(mmap.mmap(self._fd, size, offset=floor, access=mmap.ACCESS_READ))
            self._view_start, self._view_end = floor, floor + size
        messages = self._view.slice(start - self._view_start, end - start)
        if start == 0:
            messages = messages.slice(_IPC_MAGIC)
        last = None
        for message in pa.ipc.MessageReader.open_stream(messages):  # the schema first, then the batch
            last = message
        assert last is not None
        return pa.ipc.read_record_batch(last, self.schema)

    def finish(self) -> None:
        """Write the footer: the file is complete and can be opened by readers."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.close()
            os.ftruncate(self._fd, self._sink.tell())  # the footer must end the file
        finally:
            self._sink.close()
            os.close(self._fd)

    def discard(self) -> None:
        """Close and unlink the file (a put that published nothing)."""
        with contextlib.suppress(OSError, pa.ArrowException):
            self.finish()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.token)


def resolve(mode: str, memory_limit: int | None, *, group: str | None = None) -> SharedMemory | None:
    """The server's shared memory for ``--shm auto|on|off``: auto means on when Linux has a
    ``/dev/shm`` with room for the whole memory limit."""
    if mode not in SHM_MODES:
        raise InvalidRequestError(f"unknown shm mode {mode!r}: use one of {', '.join(SHM_MODES)}")
    if mode == "off":
        return None
    if mode == "auto":
        if not sys.platform.startswith("linux") or not SHM_ROOT.is_dir():
            log.info("shared-memory reads off: no /dev/shm on this system")
            return None
        vfs = os.statvfs(SHM_ROOT)
        room = vfs.f_bavail * vfs.f_frsize
        if memory_limit is None or room < memory_limit:
            log.info(
                "shared-memory reads off: /dev/shm has %s free, the memory limit is %s",
                format_bytes(room),
                "unbounded" if memory_limit is None else format_bytes(memory_limit),
            )
            return None
    try:
        return SharedMemory(group=group)
    except OSError as e:
        if mode == "on":
            raise
        log.warning("shared-memory reads off: %s", e)
        return None


def remove_stale(base: Path) -> list[str]:
    """Remove the directories under ``base`` whose server is gone (a crash); returns them.

    A live server holds a lock on its directory; the kernel drops it when the process ends. Unlike
    a pid, that holds across pid namespaces sharing one ``/dev/shm``. A hidden directory is one a
    server is still making, unless it is old.
    """
    import fcntl

    removed = []
    for entry in base.iterdir():
        try:
            info = entry.lstat()
        except FileNotFoundError:
            continue
        if info.st_uid != os.getuid() or not stat.S_ISDIR(info.st_mode):
            continue
        if entry.name.startswith(".") and time.time() - info.st_mtime < 60:
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its server is running
        finally:
            os.close(fd)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(str(entry))
    if removed:
        log.info("removed %d shared-memory directories of servers that are gone: %s", len(removed), removed)
    return removed


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot ('' if there is none)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _private_dir(path: Path, mode: int, gid: int | None) -> None:
    """Create ``path`` or check that the existing one is ours: a directory, not a link, not writable by others."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a directory owned by this user; refusing to use it")
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, mode)


def _gid(group: str) -> int:
    import grp  # POSIX only; clients on other systems import this module too

    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError as e:
        raise InvalidRequestError(f"unknown group {group!r} for --shm-group") from e
