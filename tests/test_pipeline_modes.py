"""The log pipeline's other hand-off modes at small scale, beside test_pipelines.py (split for `make test`'s two
processes): S3A unshaped, pyarrow's S3, write-back through the cache, one application per stage."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_pipelines import quick_benchmark

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.s3, pytest.mark.timeout(1800)]


def test_pipeline_benchmark_quick_other_modes_identical(tmp_path: Path) -> None:
    """S3A on unshaped moto, pyarrow's S3 on the shaped one, and the cache with write-back to it give the report
    local Parquet gives (test_pipelines.py checks local against S3A on the shaped S3 and the cache)."""
    modes = ("s3a-local", "s3-cloud", "local", "flightcache-async")
    result = quick_benchmark(tmp_path, "--modes", ",".join(modes))
    assert set(result["modes"]) == set(modes)


def test_pipeline_benchmark_one_application_per_stage(tmp_path: Path) -> None:
    """--spark per-stage: each stage its own application, whose start counts in the stage's time."""
    result = quick_benchmark(tmp_path, "--spark", "per-stage", "--modes", "flightcache")
    assert result["parameters"]["spark"].endswith("one application per stage")
    for mode in result["modes"].values():
        assert "app_start_s" not in mode
        for profile in mode["stage_profile_s"].values():  # a new JVM per stage: seconds, not milliseconds
            assert profile["spark_session"] > 1.0
