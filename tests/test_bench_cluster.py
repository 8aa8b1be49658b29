"""bench/cluster.py --quick: etcd, a standalone server and cluster nodes really start, and every section reports
figures of the right shape (no timed assertions: the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.mark.timeout(600)  # ~45 s here; more on a machine busy with other jobs
def test_quick_cluster_benchmark_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cluster.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "cluster.json").read_text())
    assert (tmp_path / "cluster.png").stat().st_size > 0
    assert data["benchmark"] == "cluster" and data["parameters"]["quick"]
    assert all(len(load) == 3 for load in data["loadavg"].values())

    # a, b: every configuration put and read the same table, through as many nodes as it has
    throughput = data["throughput"]
    configs = throughput["configs"]
    assert {"standalone", "cluster-1", "cluster-2", "cluster-3", "standalone-shm"} == set(configs)
    assert throughput["table"]["bytes"] == throughput["table"]["rows"] * 16
    for name, c in configs.items():
        assert len(c["put_s_reps"]) == len(c["read_s_reps"]) == throughput["reps"] == 1, name
        assert 0 < c["put_s"]["min"] <= c["put_s"]["median"] <= c["put_s"]["max"], name
        assert 0 < c["read_s"]["min"] <= c["read_s"]["median"] <= c["read_s"]["max"], name
        assert c["read_gb_s"] > 0 and c["put_gb_s"] > 0 and c["flight_info_ms"]["median"] > 0, name
        assert c["endpoints"] >= c["nodes"], name
    assert [configs[f"cluster-{n}"]["nodes"] for n in (1, 2, 3)] == [1, 2, 3]
    assert configs["standalone"]["vs_standalone"] == {"put_time_ratio": 1.0, "read_time_ratio": 1.0}
    share = data["targets"]["catalog_share_of_read"]
    assert set(share["percent_of_read"]) == {"cluster-1", "cluster-2", "cluster-3"}
    assert share["met"] == (max(share["percent_of_read"].values()) < 5)

    # c: every catalog operation ran from 1 and 3 clients without errors
    catalog = data["catalog"]
    assert catalog["datasets_listed"] == 11  # --quick: 10 for list, and the 3-part one for GetFlightInfo
    for op in ("publish", "flight_info", "list", "etcd_put", "etcd_get"):
        for n in ("1", "3"):
            cell = catalog["cells"][op][n]
            assert cell["errors"] == 0, (op, n, cell["first_errors"])
            assert cell["ops"] > 0 and cell["ops_per_s"] > 0 and 0 < cell["p50_ms"] <= cell["p99_ms"], (op, n)
    assert catalog["etcd_keys_after"]["versions"] >= catalog["datasets_listed"]

    # e: listings grow with the records listed; the largest version is bracketed
    listing = data["listing"]
    assert [x["versions"] for x in listing["listing"]] == [100, 1000]
    assert all(x["list_s"]["median"] > 0 and x["record_bytes"] > 0 for x in listing["listing"])
    sizes = listing["record_bytes_by_parts"]
    assert sizes["1"] < sizes["3"] < sizes["100"] < sizes["1000"]
    most = listing["max_parts_per_version"]
    assert 0 < most["accepted"] < most["refused"]

    # d: the killed node left the member list and its persisted dataset was read through node 2
    (lease,) = data["recovery"]["leases"].items()
    assert lease[0] == "2"
    (rep,) = lease[1]["reps"]
    assert rep["detected_s"] > 0 and rep["read_ok_s"] > 0 and rep["read_after_detection_s"] > 0
    assert rep["endpoint_node_after_detection"] in (1, 2, 3)  # 3: node 2's member view, up to a third of a lease old
    assert data["targets"]["dead_node_recovery"]["met"]
    assert data["etcd"]["db_size_bytes"] > 0 and data["etcd"]["revision"] > 0
