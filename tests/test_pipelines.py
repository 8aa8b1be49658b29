"""The example pipelines at small scale, as a user runs them: every hand-off gives the same report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.s3]


def _run(*args: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_log_pipeline_same_report_with_every_handoff(tmp_path: Path) -> None:
    """flightcache, s3 and local hand-offs: four stage processes each, identical final reports."""
    reports = {}
    for handoff in ("flightcache", "s3", "local"):
        out_file = tmp_path / f"{handoff}.json"
        stdout = _run(str(ROOT / "pipelines" / "logs.py"), "run", "--handoff", handoff, "--rows", "20000",
                      "--files", "2", "--work", str(tmp_path / "work"), "--report-out", str(out_file), cwd=tmp_path)
        assert "stage 4 report" in stdout and f"{handoff} hand-off: 4 stages" in stdout
        reports[handoff] = json.loads(out_file.read_text())
    assert len(reports["flightcache"]) > 0
    assert reports["flightcache"] == reports["s3"] == reports["local"]
    assert sum(r["requests"] for r in reports["local"]) == 20_000  # every parsable line is counted once


def test_iot_pipeline_spark_to_pandas(tmp_path: Path) -> None:
    """A Spark stage writes windows to the cache; a plain pandas process reads them and finds the fault."""
    stdout = _run(str(ROOT / "pipelines" / "iot.py"), "--rows", "200000", "--sensors", "10", cwd=tmp_path)
    assert "[stage 2] pandas" in stdout
    assert "'sensor-3'" in stdout  # the injected fault is found
