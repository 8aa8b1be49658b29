"""The server process's memory allocator: hand freed memory back to the OS, and glibc's mmap threshold.

Kept apart from the cache's logic: these are process-wide settings of malloc and Arrow's memory pool,
tuned from the figures of bench/flight_throughput.py, and only ``flightcache serve`` (the process that
owns ``main``) fixes the threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from ..units import parse_bytes

# Freed memory is handed back to the OS once this much has been freed since the last time: trimming
# costs 2-20 ms, and without it a server's RSS stayed at 1.3-1.6x the bytes it holds.
TRIM_BYTES = 64 * 1024 * 1024


# glibc's malloc maps blocks at least this large on their own (and unmaps them when freed); smaller ones,
# such as gRPC's receive buffers for Flight batches of ~64Ki rows, come from its arenas and are reused.
# FLIGHTCACHE_MMAP_THRESHOLD overrides it (a size, or "glibc": glibc's own threshold, which moves).
MMAP_THRESHOLD = 32 * 1024 * 1024
MMAP_THRESHOLD_ENV = "FLIGHTCACHE_MMAP_THRESHOLD"
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


def _libc_function(name: str) -> Callable[..., int] | None:
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), name, None) if libc else None  # glibc only


_MALLOC_TRIM = _libc_function("malloc_trim")


def release_memory() -> None:
    """Return freed memory to the OS: Arrow's pool (ingest copies) and malloc's (gRPC's receive buffers)."""
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def mmap_large_allocations() -> int | None:
    """Fix glibc's mmap threshold (``MMAP_THRESHOLD``, or ``$FLIGHTCACHE_MMAP_THRESHOLD``); the value set,
    or None where nothing was set (not glibc, ``glibc`` asked for, or ``MALLOC_MMAP_THRESHOLD_`` given).

    glibc's own threshold starts at 128 KiB and rises to the size of each mapped block freed, with a trim
    threshold twice that: after a few puts gRPC's buffers stay in arenas and freed arena memory is kept.
    A fixed threshold also fixes the trim threshold (128 KiB), so freed arena tops go back to the OS. In
    bench/flight_throughput.py (put/flightcache-*, rss_experiments malloc=*), glibc's moving threshold
    held more after a 1 GiB put and put no faster; 1 MiB, which maps every gRPC buffer afresh, put slowest.
    For the process that owns ``main`` (``flightcache serve``).
    """
    raw = os.environ.get(MMAP_THRESHOLD_ENV, "")
    if raw.strip().lower() == "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    try:
        threshold = parse_bytes(raw) if raw else MMAP_THRESHOLD
    except ValueError as e:
        raise ValueError(f"{MMAP_THRESHOLD_ENV}={raw!r} is not a size or 'glibc': {e}") from e
    mallopt = _libc_function("mallopt")
    if mallopt is None or not mallopt(_M_MMAP_THRESHOLD, threshold):
        return None
    return threshold


def process_memory() -> dict[str, Any]:
    """The server process's resident bytes (None where /proc is missing) and its Arrow pool."""
    pool = pa.default_memory_pool()
    try:
        with open("/proc/self/statm") as f:
            rss: int | None = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = None
    return {"rss": rss, "memory_pool": pool.backend_name, "arrow_pool_bytes": pool.bytes_allocated()}
