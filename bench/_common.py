"""Small helpers shared by the benchmarks: machine facts, RSS, statistics, JSON output, the S3 shaping proxy."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

GB = 1e9  # throughput is quoted in decimal GB/s, as in the issue
_START = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    import numpy
    import pyarrow

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "memory_total_bytes": _meminfo_total(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyarrow": pyarrow.__version__,
        "numpy": numpy.__version__,
        "arrow_memory_pool": pyarrow.default_memory_pool().backend_name,
    }
    try:
        import flightcache

        info["flightcache"] = flightcache.__version__
        info["flightcache_sources_sha256"] = sources_digest("flightcache")
    except ImportError:
        pass
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _meminfo_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def sources_digest(package: str) -> str | None:
    """sha256 over a package's .py files, to tell which state of the code a run measured."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident set size of a process (or another /proc status field in kB, e.g. RssShmem), Linux."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def start_proxy(upstream_port: int, latency_ms: float, bandwidth_mbps: float, jitter: float, stack: ExitStack) -> str:
    """Start bench/shaping.py in front of 127.0.0.1:``upstream_port``; its URL. Stopped when ``stack`` closes."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve().parent / "shaping.py"),
            "--upstream",
            f"127.0.0.1:{upstream_port}",
            "--latency-ms",
            str(latency_ms),
            "--bandwidth-mbps",
            str(bandwidth_mbps),
            "--jitter",
            str(jitter),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    stack.callback(proc.wait)
    stack.callback(proc.terminate)
    assert proc.stdout is not None
    port = json.loads(proc.stdout.readline())["port"]
    proc.stdout.close()
    return f"http://127.0.0.1:{port}"


def launch_server(args: list[str], log: Path) -> subprocess.Popen[str]:
    """Start ``flightcache serve --port 0 --output json ARGS`` (stderr to ``log``); read its start-up with
    ``server_ready``. Several can be launched first and then waited for, so that they start in parallel."""
    with log.open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "flightcache.cli", "serve", "--port", "0", "--output", "json", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )


def server_ready(proc: subprocess.Popen[str], log: Path | None = None) -> dict[str, Any]:
    """The JSON start-up message of a server started by ``launch_server`` (uri, pid, node, ...), once it serves."""
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or not lines[-1].startswith("}"):  # the message spans several lines
        line = proc.stdout.readline()
        if not line:
            tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"flightcache serve exited with status {proc.wait()} before it was ready\n{tail}")
        lines.append(line)
    return dict(json.loads("".join(lines)))


def stop_server(proc: subprocess.Popen[str], timeout: float = 60) -> None:
    """SIGTERM (SIGKILL if it does not stop within ``timeout``) a server started by ``launch_server``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
