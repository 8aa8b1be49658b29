"""flightcache.integrations.kedro.ArrowDataset against a real server, alone and in a real Kedro pipeline run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

pytest.importorskip("kedro", reason="the kedro extra is not installed")

from kedro.io import DataCatalog
from kedro.io.core import DatasetError, Version
from kedro.pipeline import node, pipeline
from kedro.runner import SequentialRunner

import flightcache
from flightcache.integrations.kedro import ArrowDataset
from flightcache.server.auth import Auth
from flightcache.server.config import ServerConfig, build_server

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "kedro-write-token-0123456789"


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "1")


def frame(rows: int = 1000) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user": [i % 37 for i in range(rows)],
            "amount": [i * 0.5 for i in range(rows)],
            "city": [f"c{i % 5}" for i in range(rows)],
        }
    )


def test_kedro_is_imported_only_by_flightcache_kedro() -> None:
    """import flightcache (and its client) leaves Kedro unloaded; only flightcache.integrations.kedro needs it."""
    code = "import sys, flightcache; flightcache.connect; assert 'kedro' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_save_and_load_pandas_and_arrow(uri: str) -> None:
    """A DataFrame saved loads back equal, as pandas or as a pyarrow Table; a Table saves too."""
    df = frame()
    ArrowDataset(name="k/raw", uri=uri).save(df)
    pd.testing.assert_frame_equal(ArrowDataset(name="k/raw", uri=uri).load(), df, check_dtype=False)
    table = ArrowDataset(name="k/raw", uri=uri, load_as="arrow").load()
    assert isinstance(table, pa.Table) and table.num_rows == len(df)
    ArrowDataset(name="k/table", uri=uri, load_as="arrow").save(table)
    assert ArrowDataset(name="k/table", uri=uri, load_as="arrow").load().equals(table)


def test_load_args_save_args_persist_and_ttl(uri: str, client: flightcache.Client) -> None:
    """columns/filter read only part; mode=append adds rows; persist and ttl reach the server."""
    ds = ArrowDataset(
        name="k/part", uri=uri, persist="none", ttl=3600, load_args={"columns": ["user"], "filter": "user < 3"}
    )
    ds.save(frame(100))
    assert list(ds.load().columns) == ["user"] and set(ds.load()["user"]) == {0, 1, 2}
    ArrowDataset(name="k/part", uri=uri, save_args={"mode": "append"}).save(frame(100))
    info = client.info("k/part")
    assert info["rows"] == 200 and info["state"] == "memory-only"


def test_exists_release_and_describe(uri: str, client: flightcache.Client) -> None:
    """exists follows the server; release keeps the data unless release_drops; _describe has no secrets."""
    ds = ArrowDataset(name="k/e", uri=uri, release_drops=True, credentials={"token": "secret-token-0123456789"})
    assert not ds.exists()
    ArrowDataset(name="k/e", uri=uri).save(frame(10))
    assert ds.exists()
    ArrowDataset(name="k/e", uri=uri).release()
    assert ds.exists()
    ds.release()
    assert not ds.exists() and [d["name"] for d in client.list()] == []
    ds.release()  # nothing left to drop: not an error
    assert "secret" not in str(ds) and "k/e" in str(ds) and uri in str(ds)


def test_versioned_names(uri: str, client: flightcache.Client) -> None:
    """Kedro's versioning: each save is <name>/<timestamp, lower case>/<leaf>; load takes the latest or a pinned one."""
    first = ArrowDataset(name="k/model/features", uri=uri, version=Version(None, "2026-12-04T10.00.00.000Z"))
    first.save(frame(10))
    second = ArrowDataset(name="k/model/features", uri=uri, version=Version(None, None))
    second.save(frame(20))
    names = sorted(d["name"] for d in client.list())
    assert names[0] == "k/model/features/2026-12-04t10.00.00.000z/features" and len(names) == 2
    assert all(n.startswith("k/model/features/") and n.endswith("/features") for n in names)
    assert len(ArrowDataset(name="k/model/features", uri=uri, version=Version(None, None)).load()) == 20
    pinned = ArrowDataset(name="k/model/features", uri=uri, version=Version("2026-12-04T10.00.00.000Z", None))
    assert len(pinned.load()) == 10 and pinned.exists()
    with pytest.raises(DatasetError, match=r"must not exist"):  # a version is written once
        ArrowDataset(name="k/model/features", uri=uri, version=Version(None, "2026-12-04T10.00.00.000Z")).save(frame())
    missing = ArrowDataset(name="k/other", uri=uri, version=Version(None, None))
    assert not missing.exists()
    with pytest.raises(DatasetError, match=r"k/other"):
        missing.load()


def test_errors_name_the_dataset(uri: str, tmp_path: Path) -> None:
    """Every failure is a DatasetError that names the dataset: missing data, bad names, bad data, auth, no server."""
    with pytest.raises(DatasetError, match=r"(?s)ArrowDataset\(name='k/missing'.*not found"):
        ArrowDataset(name="k/missing", uri=uri).load()
    with pytest.raises(DatasetError, match=r"(?s)ArrowDataset\(name='K/Bad'.*lowercase"):
        ArrowDataset(name="K/Bad", uri=uri).save(frame(3))
    with pytest.raises(DatasetError, match=r"ArrowDataset 'k/x': load_as"):
        ArrowDataset(name="k/x", uri=uri, load_as="numpy")
    with pytest.raises(DatasetError, match=r"ArrowDataset 'k/x': credentials"):
        ArrowDataset(name="k/x", uri=uri, credentials={"secret": "x"})
    with pytest.raises(DatasetError, match=r"(?s)ArrowDataset\(name='k/list'.*cannot put a list"):
        ArrowDataset(name="k/list", uri=uri).save([1, 2, 3])
    with pytest.raises(DatasetError, match=r"(?s)ArrowDataset\(name='k/schema'.*(?i:schema)"):
        ArrowDataset(name="k/schema", uri=uri).save(frame(3))
        ArrowDataset(name="k/schema", uri=uri, save_args={"mode": "append"}).save(pd.DataFrame({"other": [1]}))
    with pytest.raises(DatasetError, match=r"(?s)ArrowDataset\(name='k/down', uri='grpc://127.0.0.1:1'"):
        ArrowDataset(name="k/down", uri="grpc://127.0.0.1:1", client_args={"timeout": 2}).save(frame(3))
    credentials = tmp_path / "credentials"
    credentials.write_text(f"{TOKEN}\n")
    credentials.chmod(0o600)
    secured = build_server(ServerConfig(credentials=Auth.from_file(credentials)))
    try:
        secured_uri = f"grpc://127.0.0.1:{secured.port}"
        with pytest.raises(DatasetError, match=r"(?s)ArrowDataset\(name='k/auth'.*(?i:token)"):
            ArrowDataset(name="k/auth", uri=secured_uri, credentials={"token": "wrong-token-0123456789"}).save(frame())
        ArrowDataset(name="k/auth", uri=secured_uri, credentials={"token": TOKEN}).save(frame(5))
        assert len(ArrowDataset(name="k/auth", uri=secured_uri, credentials={"token": TOKEN}).load()) == 5
    finally:
        secured.shutdown()


# -- a real Kedro pipeline through a real server ------------------------------------------------------


def clean(raw: pd.DataFrame) -> pd.DataFrame:
    return raw[raw["amount"] > 10].reset_index(drop=True)


def featurize(cleaned: pd.DataFrame) -> pa.Table:
    cleaned = cleaned.assign(big=cleaned["amount"] > 200, city_len=cleaned["city"].str.len())
    return pa.Table.from_pandas(cleaned, preserve_index=False)


def aggregate(features: pd.DataFrame) -> pd.DataFrame:
    return features.groupby("user", as_index=False).agg(total=("amount", "sum"), big=("big", "sum"))


def join(features: pa.Table, per_user: pd.DataFrame) -> pd.DataFrame:
    return features.to_pandas().merge(per_user, on="user", suffixes=("", "_user")).sort_values(["user", "amount"])


def feature_pipeline():  # type: ignore[no-untyped-def]
    return pipeline(
        [
            node(clean, "raw", "cleaned"),
            node(featurize, "cleaned", "features"),
            node(aggregate, "features", "per_user"),
            node(join, ["features_arrow", "per_user"], "joined"),
        ]
    )


@pytest.fixture
def catalog_config(uri: str) -> Iterator[dict[str, dict[str, object]]]:
    """The README's catalog YAML, as Kedro's config loader would hand it over."""
    entries: dict[str, dict[str, object]] = {
        name: {
            "type": "flightcache.integrations.kedro.ArrowDataset",
            "uri": uri,
            "name": f"churn/{name}",
            "persist": "none",
        }
        for name in ("raw", "cleaned", "features", "per_user", "joined")
    }
    # features read a second time, as a pyarrow Table, by the last node
    entries["features_arrow"] = {**entries["features"], "load_as": "arrow"}
    entries["per_user"]["credentials"] = "flightcache"
    yield entries


def test_a_kedro_pipeline_runs_through_the_server(uri: str, client: flightcache.Client, catalog_config: dict) -> None:
    """Four nodes hand DataFrames and Tables through the server; the result equals the same functions run directly."""
    raw = frame(5000)
    client.put("churn/raw", raw)
    catalog = DataCatalog.from_config(catalog_config, credentials={"flightcache": {"token": TOKEN}})
    SequentialRunner().run(feature_pipeline(), catalog)
    features = featurize(clean(raw))
    expected = join(features, aggregate(features.to_pandas()))
    got = client.to_pandas("churn/joined")
    pd.testing.assert_frame_equal(got, expected.reset_index(drop=True), check_dtype=False)
    names = {f"churn/{n}" for n in ("raw", "cleaned", "features", "per_user", "joined")}
    assert {d["name"] for d in client.list()} == names


def test_a_versioned_kedro_pipeline_keeps_each_run(uri: str, client: flightcache.Client, catalog_config: dict) -> None:
    """versioned: true on the intermediate datasets: two runs leave two versions of each, the last one read."""
    for name in ("cleaned", "features", "features_arrow", "per_user"):
        catalog_config[name]["versioned"] = True
    client.put("churn/raw", frame(300))
    for save_version in ("2026-12-04T10.00.00.000Z", "2026-12-04T11.00.00.000Z"):
        catalog = DataCatalog.from_config(
            catalog_config, credentials={"flightcache": {"token": TOKEN}}, save_version=save_version
        )
        SequentialRunner().run(feature_pipeline(), catalog)
    names = {d["name"] for d in client.list()}
    assert "churn/features/2026-12-04t11.00.00.000z/features" in names
    assert len([n for n in names if n.startswith("churn/cleaned/")]) == 2
    assert client.get("churn/joined").num_rows == len(clean(frame(300)))


@pytest.mark.slow
@pytest.mark.s3
def test_bench_kedro_quick(tmp_path: Path) -> None:
    """bench/kedro.py --quick runs the pipeline through shaped S3 and flightcache and writes its JSON."""
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "kedro.py"),
            "--quick",
            "--modes",
            "s3-cloud,flightcache",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "kedro.json").read_text())
    for mode in ("s3-cloud", "flightcache"):
        assert result["summary"][mode]["runs"] >= 1
    assert result["checks"]["same_result"] is True
