"""The example pipelines at small scale, as a user runs them: every hand-off gives the same report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

# The benchmark's quick run starts one Spark application per hand-off mode. The modes are split over this
# file and test_pipeline_modes.py (each runs "local" as the common reference), so that `make test`'s two
# processes run them side by side.
pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.s3, pytest.mark.timeout(1800)]


def _run(*args: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=1700)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def quick_benchmark(tmp_path: Path, *args: str) -> dict[str, Any]:
    """bench/pipeline.py --quick with ``args``; the JSON it wrote, its reports identical across the modes.
    The shaped S3 answers after 10 ms, not the benchmark's 100: the suite checks what the modes do, not
    how long the cloud takes (each of S3A's hundreds of requests would wait for it)."""
    _run(
        str(ROOT / "bench" / "pipeline.py"),
        *("--quick", "--latency-ms", "10", *args, "--out", str(tmp_path)),
        cwd=tmp_path,
    )
    result: dict[str, Any] = json.loads((tmp_path / "pipeline.json").read_text())
    assert result["reports_identical"] is True and result["report_rows"] > 0
    return result


def test_pipeline_benchmark_quick_s3a_against_the_cache(tmp_path: Path) -> None:
    """bench/pipeline.py --quick: the log pipeline handing off through Spark's own S3A on the shaped S3, local
    Parquet and flightcache (the JVM connector) gives identical reports, and the JSON the benchmark writes has
    what the README table is made from. (The alluxio mode, whose cluster takes minutes to start, is checked by
    hand with --modes alluxio,s3a-local: README.)"""
    modes = ("s3a-cloud", "local", "flightcache")
    result = quick_benchmark(tmp_path, "--modes", ",".join(modes))
    assert set(result["modes"]) == set(modes)
    for mode in result["modes"].values():
        assert len(mode["total_s"]) == 1 and len(mode["app_start_s"]) == 1  # one application, started apart
        assert set(mode["stage_means_s"]) == {"ingest", "parse", "sessionize", "report"}
        assert mode["total_s"][0] == pytest.approx(sum(mode["stage_means_s"].values()))
    assert result["modes"]["flightcache"]["server_peak_rss_bytes"] > 0
    assert "flightcache_3x_faster_than_s3a_cloud" in result["targets"]
    assert (tmp_path / "pipeline.png").stat().st_size > 10_000


def test_iot_pipeline_spark_to_pandas(tmp_path: Path) -> None:
    """A Spark stage writes windows to the cache; a plain pandas process reads them and finds the fault."""
    stdout = _run(str(ROOT / "pipelines" / "iot.py"), "--rows", "200000", "--sensors", "10", cwd=tmp_path)
    assert "[stage 2] pandas" in stdout
    assert "'sensor-3'" in stdout  # the injected fault is found
