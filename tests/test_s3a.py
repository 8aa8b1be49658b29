"""Spark's S3 connector for the pipelines (pipelines/s3a.py): what it needs, and what it says without it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "pipelines"))

import s3a


def test_missing_jars_say_how_to_fetch_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the Maven-fetched jars a session is not started half-configured: the error names the fix."""
    monkeypatch.setattr(s3a, "JARS", tmp_path / "jars")
    assert not s3a.available()
    with pytest.raises(RuntimeError, match="make s3a-jars"):
        s3a.configure(object(), {})


def test_to_s3a_spells_s3_uris_and_rejects_others() -> None:
    """s3://bucket/key becomes s3a://bucket/key; anything else is an error, not a silent local path."""
    assert s3a.to_s3a("s3://pipeline-data/handoff/logs/raw") == "s3a://pipeline-data/handoff/logs/raw"
    with pytest.raises(ValueError, match="not an s3:// URI"):
        s3a.to_s3a("/tmp/logs")


def test_configure_points_s3a_at_the_environment_endpoint() -> None:
    """A local endpoint gets path-style access and plain HTTP, the environment's credentials, the jars."""

    class Builder:
        def __init__(self) -> None:
            self.conf: dict[str, str] = {}

        def config(self, key: str, value: str) -> Builder:
            self.conf[key] = value
            return self

    if not s3a.available():
        pytest.skip("S3A jars not fetched (make s3a-jars)")
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    conf = s3a.configure(Builder(), env).conf
    assert conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:9"
    assert conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "false"
    assert (conf["spark.hadoop.fs.s3a.access.key"], conf["spark.hadoop.fs.s3a.secret.key"]) == ("k", "s")
    assert "hadoop-aws-3.5.0.jar" in conf["spark.driver.extraClassPath"]
