"""Sixteen concurrent clients against one server process: only the expected errors, only whole versions, exact memory.

Every put carries its own proof of completeness: each row holds the writer, the put's sequence number,
the put's row count and the row's position in it. A version is whole when it is a run of whole puts
(appends add runs); a reader that saw part of a put, or two puts interleaved, finds a run whose length
or positions disagree with what its rows say.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import ROOT, start_server, stop_server

import flightcache
from flightcache.errors import DatasetNotFoundError, SchemaMismatchError

pytestmark = pytest.mark.slow

CLIENTS = 16
SECONDS = 4.0  # each client works this long, or MAX_OPS operations, whichever ends first
MAX_OPS = 1500
NAMES = [f"load/d{i}" for i in range(4)]
FIXED = "load/fixed"  # only appended to and read: the target of appends with the wrong schema
SCHEMA = pa.schema([("writer", pa.int32()), ("seq", pa.int32()), ("rows", pa.int32()), ("pos", pa.int32())])
# (operation, weight): reads dominate, as between pipeline stages
MIX = [("get", 45), ("put", 20), ("append", 20), ("drop", 7), ("bad_append", 4), ("get_fixed", 4)]
EXPECTED: dict[str, tuple[type[Exception], ...]] = {
    "get": (DatasetNotFoundError,),  # dropped meanwhile, or never put yet
    "drop": (DatasetNotFoundError,),
    "bad_append": (SchemaMismatchError,),
}


def chunk(writer: int, seq: int, rows: int) -> pa.Table:
    """One put's rows, each saying who wrote it, which put it is, how many rows it has and where it sits."""
    pos = np.arange(rows, dtype=np.int32)
    return pa.table(
        [np.full(rows, writer, np.int32), np.full(rows, seq, np.int32), np.full(rows, rows, np.int32), pos],
        schema=SCHEMA,
    )


def whole_puts(table: pa.Table) -> int:
    """The number of whole puts ``table`` is made of; fails if any put is partial or interleaved."""
    assert table.schema.equals(SCHEMA), table.schema
    writer, seq, rows, pos = (table[c].to_numpy() for c in SCHEMA.names)
    start, puts = 0, 0
    while start < table.num_rows:
        n = int(rows[start])
        run = slice(start, start + n)
        assert start + n <= table.num_rows, f"a put of {n} rows ends after the version's last row"
        assert (writer[run] == writer[start]).all() and (seq[run] == seq[start]).all(), "puts interleaved"
        assert (rows[run] == n).all() and (pos[run] == np.arange(n)).all(), "a put arrived partially or reordered"
        start += n
        puts += 1
    return puts


@pytest.fixture
def loaded_server() -> Iterator[str]:
    """A server process; replaced versions stay readable for 1 s (snapshot reads), then leave memory."""
    proc, uri = start_server("--storage", "none", "--memory-limit", "1GiB", "--retain-seconds", "1")
    yield uri
    assert stop_server(proc) == 0


def client_loop(uri: str, writer: int, deadline: float, outcomes: Counter[str], unexpected: list[str]) -> None:
    rnd = random.Random(writer)
    kinds, weights = zip(*MIX, strict=True)
    # small client batches: a put streams several messages, so a partial one would show
    with flightcache.connect(uri, batch_rows=256) as client:
        for seq in range(MAX_OPS):
            if time.monotonic() >= deadline:
                break
            kind = rnd.choices(kinds, weights)[0]
            name = rnd.choice(NAMES)
            try:
                if kind == "get":
                    whole_puts(client.get(name))
                elif kind == "put":
                    client.put(name, chunk(writer, seq, rnd.randint(1, 3000)))
                elif kind == "append":
                    client.put(name, chunk(writer, seq, rnd.randint(1, 1000)), mode="append")
                elif kind == "drop":
                    client.drop(name)
                elif kind == "bad_append":
                    client.put(FIXED, chunk(writer, seq, 10).append_column("extra", pa.nulls(10)), mode="append")
                else:
                    whole_puts(client.get(FIXED))
                outcomes[f"{kind} ok"] += 1
            except EXPECTED.get(kind, ()) as e:
                outcomes[f"{kind} {type(e).__name__}"] += 1
            except Exception as e:  # every other error is a finding, reported by the test
                unexpected.append(f"client {writer} {kind} {name}: {type(e).__name__}: {e}")


def test_sixteen_clients_mixed_load(loaded_server: str) -> None:
    """16 clients put, append, get and drop 4 shared datasets for a few seconds: no unexpected error, every
    read is a whole version, and at the end memory accounting equals the live versions' bytes exactly."""
    uri = loaded_server
    with flightcache.connect(uri) as client:
        client.put(FIXED, chunk(-1, 0, 100))
        per_client: list[Counter[str]] = [Counter() for _ in range(CLIENTS)]
        unexpected: list[str] = []
        deadline = time.monotonic() + SECONDS
        threads = [
            threading.Thread(target=client_loop, args=(uri, w, deadline, per_client[w], unexpected))
            for w in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outcomes = sum(per_client, Counter())

        assert unexpected == [], "\n".join(unexpected[:20])
        for kind, _ in MIX:
            assert outcomes[f"{kind} {'SchemaMismatchError' if kind == 'bad_append' else 'ok'}"] > 0, outcomes

        for name in [*NAMES, FIXED]:  # the survivors are whole too
            try:
                whole_puts(client.get(name))
            except DatasetNotFoundError:
                continue

        stats = _settled(client)
        assert stats["memory_staged"] == 0 and stats["open_transactions"] == 0
        live = [d for d in client.list() if d["in_memory"]]
        assert stats["memory_used"] == stats["dataset_bytes"] == sum(d["bytes"] for d in live)
        for d in live:
            client.drop(d["name"])
        stats = _settled(client)
        assert (stats["memory_used"], stats["memory_staged"], stats["datasets"]) == (0, 0, 0)


def _settled(client: flightcache.Client, timeout: float = 30) -> dict:
    """The server's stats once every replaced version's retention has run out."""
    deadline = time.monotonic() + timeout
    while (stats := client.stats())["retained_versions"]:
        assert time.monotonic() < deadline, f"replaced versions still retained after {timeout} s: {stats}"
        time.sleep(0.1)
    return stats


def test_load_benchmark_quick(tmp_path: Path) -> None:
    """bench/load.py --quick runs every cell (gets and puts at 1, 4 and 16 client processes) without an error
    and writes the JSON the README table is made from."""
    script = str(ROOT / "bench" / "load.py")
    assert "--quick" in subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True).stdout
    run = subprocess.run(
        [sys.executable, script, "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "load.json").read_text())
    for op in ("get", "put"):
        assert set(result["results"][op]) == {"1", "4", "16"}
        for cell in result["results"][op].values():
            assert cell["ops"] > 0 and cell["errors"] == 0 and 0 < cell["p50_ms"] <= cell["p99_ms"]
    assert result["targets"]["no_errors_under_load"]["met"] is True
    assert "2 cores" in " ".join(result["notes"])
