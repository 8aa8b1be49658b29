"""bench/handoff.py --quick: every hand-off runs between two real processes and gives the data back unchanged."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~1 minute here; several under a machine busy with other jobs
def test_quick_handoff_benchmark_runs(tmp_path: Path) -> None:
    """The quick run measures every fast alternative (peers that are not installed are reported as such),
    the scans in the consumer match the producer's, and flightcache hands every non-dictionary type back unchanged."""
    out = tmp_path / "handoff.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "handoff.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    (size,) = data["results"].values()
    for peer in ("vineyard", "ray"):
        if importlib.util.find_spec(peer) is None:
            assert "not installed" in data["skipped"][peer]
        else:
            assert peer in size
    for alt, figures in size.items():
        assert figures["mismatches"] == 0, alt
        assert figures["reps"] == 1 and figures["total_s"] > 0
    assert {"flightcache", "flightcache-stream", "ipc-floor", "parquet-zstd"} <= set(size)
    assert data["type_differences"]["flightcache"] == {}
    assert data["type_differences"]["ipc-floor"] == {}
    assert out.with_suffix(".png").exists()
