"""The flightcache command end to end: a real `flightcache serve` process and the client commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import logs_table, run_cli, start_server, start_server_ready, stop_server

import flightcache
from flightcache.errors import SqlError
from flightcache.server import allocator


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A `flightcache serve --port 0` process and its URI."""
    proc, uri = start_server("--memory-limit", "256MiB", "--storage", str(tmp_path / "storage"))
    yield uri, proc
    stop_server(proc, signal.SIGKILL)


def test_commands_end_to_end(served: tuple[str, subprocess.Popen[str]], tmp_path: Path) -> None:
    """put, ls, info, get (filter, columns, -o), stats and drop, as a user types them."""
    uri, _ = served
    table = logs_table(3000)
    src = tmp_path / "in.parquet"
    pq.write_table(table, src)

    r = run_cli("put", "logs/raw", str(src), "--uri", uri)
    assert r.returncode == 0, r.stderr
    assert "version 1, 3,000 rows" in r.stdout

    r = run_cli("ls", "--uri", uri)
    assert r.returncode == 0 and "logs/raw" in r.stdout and "3,000" in r.stdout

    r = run_cli("info", "logs/raw", "--uri", uri, "--output", "json")
    info = json.loads(r.stdout)
    assert info["rows"] == 3000 and "status: int32" in info["schema"]

    out = tmp_path / "out.parquet"
    r = run_cli(
        "get", "logs/raw", "--uri", uri, "--columns", "status,method", "--filter", "status >= 500", "-o", str(out)
    )
    assert r.returncode == 0, r.stderr
    got = pq.read_table(out)
    assert got.column_names == ["status", "method"]
    assert got.num_rows == sum(1 for s in table["status"].to_pylist() if s >= 500) > 0

    r = run_cli("get", "logs/raw", "--uri", uri, "--limit", "3")
    assert r.returncode == 0 and "3,000 rows, showing 3" in r.stdout

    r = run_cli("put", "logs/raw", str(src), "--uri", uri, "--mode", "append")
    assert "version 2, 6,000 rows" in r.stdout

    r = run_cli("stats", "--uri", uri)
    assert r.returncode == 0 and "memory used" in r.stdout and "256.0 MiB" in r.stdout

    r = run_cli("drop", "logs/raw", "--uri", uri)
    assert r.returncode == 0 and "dropped logs/raw" in r.stdout
    assert "no datasets" in run_cli("ls", "--uri", uri).stdout


def test_uri_from_environment(served: tuple[str, subprocess.Popen[str]]) -> None:
    uri, _ = served
    r = run_cli("ls", env={"FLIGHTCACHE_URI": uri})
    assert r.returncode == 0 and "no datasets" in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["get", "missing"], "dataset 'missing' not found"),
        (["info", "Bad Name"], "invalid dataset name"),
        (["get", "x", "--filter", "status >"], "cannot parse filter"),
        (["put", "x", "/no/such/file.parquet"], "cannot read Parquet"),
    ],
)
def test_errors_are_one_line_and_exit_1(
    served: tuple[str, subprocess.Popen[str]], args: list[str], message: str
) -> None:
    uri, _ = served
    r = run_cli(*args, "--uri", uri)
    assert r.returncode == 1
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unreachable_server() -> None:
    r = run_cli("ls", "--uri", "grpc://127.0.0.1:1")
    assert r.returncode == 1 and "cannot reach the flightcache server" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signal(served: tuple[str, subprocess.Popen[str]], sig: int) -> None:
    _, proc = served
    assert stop_server(proc, sig) == 0


def test_help_explains_every_command() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for command in ("serve", "ls", "info", "put", "get", "drop", "stats"):
        assert command in r.stdout
    r = run_cli("get", "--help")
    assert "--filter" in r.stdout and "status >= 500" in r.stdout
    r = run_cli("serve", "--help")
    assert "--memory-limit" in r.stdout and "4GiB" in r.stdout


@pytest.mark.parametrize(("flags", "pool"), [((), "jemalloc"), (("--memory-pool", "system"), "system")])
def test_serve_sets_arrows_allocator(flags: tuple[str, ...], pool: str) -> None:
    """serve runs on jemalloc (where pyarrow has it, as here) unless told otherwise; it restarts itself in
    place to set it, whatever the pool of the process that started it."""
    proc, ready = start_server_ready("--storage", "none", *flags)
    try:
        assert ready["memory_pool"] == pool and ready["pid"] == proc.pid
        with flightcache.connect(ready["uri"]) as fc:
            fc.put("t", logs_table(100))
            assert fc.get("t").num_rows == 100
            process = fc.stats()["process"]
            assert process["memory_pool"] == pool and process["rss"] > 10 * 2**20
    finally:
        assert stop_server(proc) == 0


def test_serve_fixes_glibcs_mmap_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve fixes glibc's mmap threshold (32 MiB, or FLIGHTCACHE_MMAP_THRESHOLD); 'glibc' and a
    MALLOC_MMAP_THRESHOLD_ leave glibc's own; a bad value names the variable; no glibc, nothing set."""
    calls: list[tuple[int, int]] = []
    mallopt = lambda param, value: calls.append((param, value)) or 1  # noqa: E731
    monkeypatch.setattr(allocator, "_libc_function", lambda name: mallopt)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv(allocator.MMAP_THRESHOLD_ENV, raising=False)
    assert allocator.mmap_large_allocations() == 32 * 2**20 and calls == [(-3, 32 * 2**20)]
    monkeypatch.setenv(allocator.MMAP_THRESHOLD_ENV, "1MiB")
    assert allocator.mmap_large_allocations() == 2**20 and calls[-1] == (-3, 2**20)
    for env, value in ((allocator.MMAP_THRESHOLD_ENV, "glibc"), ("MALLOC_MMAP_THRESHOLD_", "131072")):
        monkeypatch.setenv(env, value)
        assert allocator.mmap_large_allocations() is None and len(calls) == 2
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv(allocator.MMAP_THRESHOLD_ENV, "lots")
    with pytest.raises(ValueError, match="FLIGHTCACHE_MMAP_THRESHOLD='lots'"):
        allocator.mmap_large_allocations()
    monkeypatch.delenv(allocator.MMAP_THRESHOLD_ENV)
    monkeypatch.setattr(allocator, "_libc_function", lambda name: None)  # not glibc
    assert allocator.mmap_large_allocations() is None


def test_serve_refuses_a_bad_mmap_threshold_in_one_line() -> None:
    """The real command reads FLIGHTCACHE_MMAP_THRESHOLD before serving; a bad one is one line, exit 1."""
    env = {**os.environ, "FLIGHTCACHE_MMAP_THRESHOLD": "lots"}
    done = subprocess.run([sys.executable, "-m", "flightcache.cli", "serve", "--port", "0", "--storage", "none"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and "FLIGHTCACHE_MMAP_THRESHOLD='lots'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_serve_sql_limit_flags() -> None:
    """--sql-* flags bound the server's queries (here: too little memory for a big sort); a bad one is one line."""
    proc, uri = start_server("--storage", "none", "--sql-memory-limit", "2MiB", "--sql-threads", "1")
    try:
        with flightcache.connect(uri) as c:
            c.put("big", pa.table({"x": pa.array(range(2_000_000), pa.int64())}))
            assert c.sql('SELECT count(*) AS n FROM "big"').column("n").to_pylist() == [2_000_000]
            with pytest.raises(SqlError, match=r"(?i)memory"):
                c.sql('SELECT x FROM "big" ORDER BY x DESC')
    finally:
        stop_server(proc)
    r = run_cli("serve", "--port", "0", "--storage", "none", "--sql-max-queries", "0")
    assert r.returncode == 1 and "invalid SQL limits" in r.stderr and len(r.stderr.strip().splitlines()) == 1
