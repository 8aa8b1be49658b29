"""Cluster mode with real processes: throughput through 1, 2 and 3 nodes, the catalog's cost, dead-node recovery.

Everything runs for real on this machine: a single-member etcd (``LocalEtcd``), ``flightcache serve
--cluster etcd://...`` node processes on 127.0.0.1, .2 and .3, and a standalone server (no ``--cluster``)
as the baseline. The client is this process (the Python client), except where several clients are needed:
those are processes of their own.

* **a. put and full read**: a ~1 GB table (two 8-byte columns) is written as one part per node (a write
  transaction: the N parts are put in parallel, one through each node, then committed as one version) and
  read whole with ``flightcache.connect(uri).get(name)``, which reads every endpoint at its node, in
  parallel. Configurations: ``standalone`` (one server, one part, streamed over Flight like the cluster's),
  ``cluster-1``, ``cluster-2``, ``cluster-3`` (clusters of that many nodes, each its own etcd prefix), and
  ``standalone-shm`` for reference (the single server's same-host path: put written into its shared memory,
  read mapped; a cluster node cannot offer it, its parts are on several nodes). Repetitions interleave the
  configurations, their order rotated from repetition to repetition, after a smaller warm-up round.
* **b. the catalog's share of a read**: in the same repetitions, ``GetFlightInfo`` of the 1 GB dataset
  (on a cluster node: one etcd read of ``datasets/<name>``, members from the node's cache, endpoint planning)
  timed ``--info-calls`` times, against the whole read. Target: under 5% of the read.
* **c. catalog operations per second**: small puts (100 rows, overwriting the writer's own dataset: each is
  one publish, 2 etcd reads + 1 etcd transaction), ``GetFlightInfo`` of a 3-part dataset, ``list`` with
  ``--list-datasets`` datasets, from 1 and from 3 client processes (client i through node i), and etcd's own
  sequential put and get rate through the same client library the nodes use (etcd3gw, etcd's gRPC gateway),
  from 1 and 3 processes. Cells are interleaved, rotated per round.
* **e. the collector's listing**: every node lists the whole ``versions/`` prefix (and ``datasets/``, twice,
  and ``txn/``) every 5 s. Timed here: ``ClusterCatalog.versions()`` over K version records of P parts, and
  the size of a version record; and the largest version etcd accepts (parts per version), found by
  publishing ever larger versions with the real ``ClusterCatalog.publish``.
* **d. dead-node detection and recovery**: for the default lease (10 s) and ``--lease-seconds 2``, a
  3-node cluster with a local storage directory; a dataset is put through node 3 with ``persist="sync"``,
  node 3 is killed (``kill -9``) at a random moment of its lease-renewal period, and two pollers (50 ms)
  time (1) until node 3 is gone from ``client.nodes()`` and (2) until a read of the dataset through node 2
  succeeds (the part loaded from storage). Node 3 is started again between repetitions.

Every section records the machine's load average (``os.getloadavg``): the machine has 2 cores and is
shared; all the processes here (client, etcd, up to 7 servers) share those 2 cores.

    .venv/bin/python bench/cluster.py            # ~1 GB, 5 reps -> bench_results/cluster.json, cluster.png
    .venv/bin/python bench/cluster.py --quick    # ~64 MB, 1 rep, short cells, lease 2 only -> a temp dir
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

try:
    from ._common import (
        GB,
        launch_server,
        machine_info,
        median,
        progress,
        server_ready,
        sources_digest,
        stop_server,
        write_json,
    )
except ImportError:  # run as a script: bench/ is on sys.path
    from _common import (
        GB,
        launch_server,
        machine_info,
        median,
        progress,
        server_ready,
        sources_digest,
        stop_server,
        write_json,
    )

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "bench_results"
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
ROW_BYTES = 16  # int64 id, float64 value
SMALL_ROWS = 100  # a publish's put
CATALOG_OPS = ("publish", "flight_info", "list", "etcd_put", "etcd_get")
CATALOG_CLIENTS = (1, 3)
START_DELAY = 0.5  # seconds between handing out a cell and its start: every client starts together
POLL_S = 0.05
INFO_TARGET = 0.05  # GetFlightInfo under 5% of the full read

NOTES = [
    "All processes share the machine's 2 cores: the client, etcd, the standalone server and 6 cluster nodes (of "
    "which only those of the configuration being measured are busy). A 3-node read therefore does not get 3 "
    "machines' worth of CPU or network: the figures show the protocol's overhead and parallelism on one host, "
    "not the aggregate throughput of 3 hosts (docs/scaling.md models that).",
    "Puts: the N parts are sent in parallel by N threads of this process (one connection per node), each part a "
    "staged put of a write transaction, then one commit; timed from the first byte to the commit's answer. "
    "Reads: Client.get through node 1 (shm=False), endpoints fetched 4 at a time, each from the node holding its "
    "part. GB are decimal (1e9 bytes) of Arrow data.",
    "standalone-shm is the single server's same-host path (put written into its shared memory and adopted, read "
    "mapped without copying): a reference, not the baseline; the baseline 'standalone' streams like the cluster.",
    "Catalog cells: each client is a process with one connection, one call after another for a fixed time; "
    "ops/s = calls completed by all clients / the cell's wall time. Publish cells leave replaced versions that "
    "the nodes retain for 60 s (--retain-seconds default), so the collector's listing grows during them, as it "
    "would in use.",
    "Recovery: a poller asks node 1 for the members (client.nodes(), one etcd range read) every 50 ms; another "
    "reads the dataset through node 2 every 50 ms. The killed node's port refuses connections at once on "
    "loopback; a host that vanishes from a real network makes clients wait for a timeout instead.",
]


# -- data ----------------------------------------------------------------------------------------


def make_table(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"id": pa.array(np.arange(rows, dtype=np.int64)), "value": pa.array(rng.random(rows))})


def id_sum(rows: int) -> int:
    return rows * (rows - 1) // 2


def split(table: pa.Table, n: int) -> list[pa.Table]:
    bounds = [round(i * table.num_rows / n) for i in range(n + 1)]
    return [table.slice(a, b - a) for a, b in itertools.pairwise(bounds)]


# -- processes ---------------------------------------------------------------------------------------


class Servers:
    """Every server process of the run (stopped at the end), started in parallel where asked."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[str]] = []
        self._count = itertools.count()

    def start(self, many: list[list[str]]) -> list[tuple[subprocess.Popen[str], dict[str, Any]]]:
        launched = []
        for args in many:
            log = self.workdir / "logs" / f"server-{next(self._count)}.log"
            proc = launch_server([*args, "--log-level", "WARNING"], log)
            self.procs.append(proc)
            launched.append((proc, log))
        return [(proc, server_ready(proc, log)) for proc, log in launched]

    def stop_all(self) -> None:
        for proc in self.procs:
            stop_server(proc)


class Cluster:
    """``n`` nodes on 127.0.0.1..n under their own etcd prefix."""

    def __init__(self, servers: Servers, etcd_url: str, prefix: str, n: int, extra: list[str]) -> None:
        self.servers, self.etcd_url, self.prefix, self.extra = servers, etcd_url, prefix, extra
        self.nodes: list[tuple[subprocess.Popen[str], dict[str, Any]]] = servers.start(
            [self.args(HOSTS[i]) for i in range(n)]
        )

    def args(self, host: str) -> list[str]:
        return ["--host", host, "--cluster", self.etcd_url, "--cluster-prefix", self.prefix, *self.extra]

    @property
    def uris(self) -> list[str]:
        return [ready["uri"] for _, ready in self.nodes]

    def node_id(self, i: int) -> str:
        return str(self.nodes[i][1]["node"])

    def restart(self, i: int) -> None:
        (self.nodes[i],) = self.servers.start([self.args(HOSTS[i])])


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def spread(values: list[float]) -> dict[str, float]:
    return {"median": median(values), "min": min(values), "max": max(values)}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- a and b: put and full read through N nodes ----------------------------------------------------------


def run_throughput(args: argparse.Namespace, servers: Servers, etcd_url: str) -> tuple[dict[str, Any], Cluster]:
    import flightcache

    memory = "1GiB" if args.quick else "6GiB"
    standalone_args = ["--host", HOSTS[0], "--storage", "none", "--memory-limit", memory]
    progress("starting the standalone server and clusters of 1, 2 and 3 nodes")
    ((_, standalone),) = servers.start([standalone_args])
    clusters = {
        n: Cluster(servers, etcd_url, f"/bench-n{n}", n, ["--storage", "none", "--memory-limit", memory])
        for n in (1, 2, 3)
    }
    writers_of: dict[str, list[str]] = {"standalone": [standalone["uri"]], "standalone-shm": [standalone["uri"]]}
    writers_of.update({f"cluster-{n}": c.uris for n, c in clusters.items()})
    configs = ["standalone", "cluster-1", "cluster-2", "cluster-3"] + ([] if args.no_shm else ["standalone-shm"])
    clients = {c: [flightcache.connect(u, shm=c == "standalone-shm") for u in writers_of[c]] for c in configs}
    rows = int(args.gb * GB / ROW_BYTES)
    progress(f"making the table: {rows:,} rows")
    table = make_table(rows)
    warm = table.slice(0, max(1, rows // 8))
    pool = ThreadPoolExecutor(3, thread_name_prefix="bench-put")

    def one(config: str, data: pa.Table, tag: str) -> dict[str, Any]:
        writers = clients[config]
        reader = writers[0]
        name, txn = f"bench/{config}/{tag}", f"bench-{config}-{tag}-{secrets.token_hex(4)}"
        parts = split(data, len(writers))
        shm = config == "standalone-shm"

        def put() -> None:
            list(pool.map(lambda wp: wp[0].put(name, wp[1], txn=txn, shm=shm), zip(writers, parts, strict=True)))
            reader.commit(txn, name)

        put_s = timed(put)
        got: list[pa.Table] = []
        read_s = timed(lambda: got.append(reader.get(name)))
        assert got[0].num_rows == data.num_rows, (config, got[0].num_rows, data.num_rows)
        first = data.column("id")[0].as_py()
        assert pc.sum(got[0].column("id")).as_py() == id_sum(data.num_rows) + first * data.num_rows, config
        got.clear()
        info_s = [timed(lambda: reader.flight_info(name)) for _ in range(args.info_calls)]
        endpoints = len(reader.flight_info(name).endpoints)
        reader.drop(name)
        return {
            "put_s": put_s,
            "read_s": read_s,
            "info_s": median(info_s),
            "info_s_all": info_s,
            "endpoints": endpoints,
        }

    progress("warm-up round (1/8 of the table)")
    for config in configs:
        one(config, warm, "warm")
    reps: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    loads = []
    for rep in range(args.reps):
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        loads.append(loadavg())
        for config in order:
            r = one(config, table, str(rep))
            reps[config].append(r)
            progress(
                f"rep {rep + 1}/{args.reps} {config:15} put {r['put_s']:6.2f} s ({table.nbytes / GB / r['put_s']:.2f}"
                f" GB/s)  read {r['read_s']:6.2f} s ({table.nbytes / GB / r['read_s']:.2f} GB/s)  "
                f"flight_info {r['info_s'] * 1e3:.2f} ms  load {loadavg()[0]}"
            )
    pool.shutdown()
    for cs in clients.values():
        for c in cs:
            c.close()
    nbytes = table.nbytes
    results: dict[str, Any] = {}
    for config in configs:
        rs = reps[config]
        put_s, read_s, info_s = [r["put_s"] for r in rs], [r["read_s"] for r in rs], [r["info_s"] for r in rs]
        results[config] = {
            "nodes": len(writers_of[config]) if config.startswith("cluster") else 1,
            "endpoints": rs[0]["endpoints"],
            "put_s": spread(put_s),
            "read_s": spread(read_s),
            "put_gb_s": nbytes / GB / median(put_s),
            "read_gb_s": nbytes / GB / median(read_s),
            "flight_info_ms": {k: v * 1e3 for k, v in spread(info_s).items()},
            # per repetition: that repetition's median GetFlightInfo over its read (side by side)
            "flight_info_share_of_read": median([r["info_s"] / r["read_s"] for r in rs]),
            "put_s_reps": put_s,
            "read_s_reps": read_s,
            "flight_info_s_reps": info_s,
        }
    base = reps["standalone"]
    for config in configs:
        results[config]["vs_standalone"] = {  # per repetition ratios (same repetition, side by side), median
            "put_time_ratio": median([r["put_s"] / b["put_s"] for r, b in zip(reps[config], base, strict=True)]),
            "read_time_ratio": median([r["read_s"] / b["read_s"] for r, b in zip(reps[config], base, strict=True)]),
        }
    for n in (1, 2):  # the 3-node cluster stays for the catalog cells
        for proc, _ in clusters[n].nodes:
            stop_server(proc)
    return (
        {
            "table": {"rows": rows, "bytes": nbytes, "columns": table.column_names},
            "reps": args.reps,
            "info_calls_per_rep": args.info_calls,
            "loadavg_per_rep": loads,
            "configs": results,
        },
        clusters[3],
    )


# -- c: catalog operations per second ------------------------------------------------------------------------


def client_process(index: int, uri: str, etcd_url: str, prefix: str, tasks: Any, results: Any) -> None:
    """Run cells as they come: (operation, start, end, target) -> {"latencies": [...], "errors": [...]}."""
    import flightcache
    from flightcache.server.etcd import Etcd, EtcdSettings

    small = make_table(SMALL_ROWS, seed=index)
    etcd = Etcd(EtcdSettings(etcd_url))
    seq = 0
    with flightcache.connect(uri, shm=False) as client:
        client.list()  # connect before the first cell
        while (task := tasks.get()) is not None:
            operation, start, end, target = task
            latencies: list[float] = []
            errors: list[str] = []
            time.sleep(max(0.0, start - time.time()))
            while time.time() < end:
                began = time.perf_counter()
                try:
                    if operation == "publish":
                        client.put(f"pub/{index}", small)
                    elif operation == "flight_info":
                        client.flight_info(target)
                    elif operation == "list":
                        client.list()
                    elif operation == "etcd_put":
                        etcd.put(f"{prefix}/raw/{index}/{seq % 1000}", {"seq": seq, "pad": "x" * 64})
                        seq += 1
                    else:
                        etcd.get(f"{prefix}/raw/0/0")
                except Exception as e:  # counted and reported: the figures say how many failed
                    errors.append(f"{type(e).__name__}: {e}"[:300])
                    continue
                latencies.append(time.perf_counter() - began)
            results.put({"index": index, "latencies": latencies, "errors": errors, "last": time.time()})


class Clients:
    """Client processes (spawned: no gRPC state forked), client i talking to ``uris[i % len(uris)]``."""

    def __init__(self, uris: list[str], etcd_url: str, prefix: str, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(
                target=client_process,
                args=(i, uris[i % len(uris)], etcd_url, prefix, self.tasks[i], self.results),
                daemon=True,
            )
            for i in range(n)
        ]
        for p in self.procs:
            p.start()

    def run(self, operation: str, clients: int, seconds: float, target: str) -> dict[str, Any]:
        start = time.time() + START_DELAY
        for q in self.tasks[:clients]:
            q.put((operation, start, start + seconds, target))
        parts = [self.results.get(timeout=seconds + 300) for _ in range(clients)]
        latencies = [x for p in parts for x in p["latencies"]]
        errors = [e for p in parts for e in p["errors"]]
        wall = max(p["last"] for p in parts) - start
        return {
            "ops": len(latencies),
            "errors": len(errors),
            "first_errors": errors[:3],
            "ops_per_s": len(latencies) / wall if wall > 0 else float("nan"),
            "latencies": latencies,
        }

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def run_catalog(args: argparse.Namespace, cluster: Cluster) -> dict[str, Any]:
    import flightcache
    from flightcache.server.etcd import Etcd, EtcdSettings

    etcd = Etcd(EtcdSettings(cluster.etcd_url))
    uris = cluster.uris
    setup = [flightcache.connect(u, shm=False) for u in uris]
    progress(f"catalog cells: {args.list_datasets} datasets for list, a 3-part dataset for GetFlightInfo")
    for k in range(args.list_datasets):
        setup[k % 3].put(f"list/{k:04d}", make_table(SMALL_ROWS, seed=k))
    txn = f"fi-{secrets.token_hex(4)}"
    for i, c in enumerate(setup):
        c.put("fi/3parts", make_table(1000, seed=i), txn=txn)
    setup[0].commit(txn, "fi/3parts")
    etcd.put(f"{cluster.prefix}/raw/0/0", {"seq": 0})
    datasets = len(setup[0].list())
    clients = Clients(uris, cluster.etcd_url, cluster.prefix, max(CATALOG_CLIENTS))
    try:
        for op in CATALOG_OPS:  # warm-up: connections, imports, the first puts
            clients.run(op, max(CATALOG_CLIENTS), args.warmup, "fi/3parts")
        cells: dict[str, dict[int, list[dict[str, Any]]]] = {op: {n: [] for n in CATALOG_CLIENTS} for op in CATALOG_OPS}
        order = [(op, n) for op in CATALOG_OPS for n in CATALOG_CLIENTS]
        loads = []
        for r in range(args.rounds):
            rotated = order[r % len(order) :] + order[: r % len(order)]
            loads.append(loadavg())
            for op, n in rotated:
                cell = clients.run(op, n, args.seconds, "fi/3parts")
                cells[op][n].append(cell)
                progress(
                    f"round {r + 1}/{args.rounds} {op:11} x{n}: {cell['ops_per_s']:7.0f} ops/s, p50 "
                    f"{np.percentile(cell['latencies'], 50) * 1e3 if cell['latencies'] else float('nan'):.2f} ms, "
                    f"{cell['errors']} errors, load {loadavg()[0]}"
                )
    finally:
        clients.close()
    keys = {what: etcd.count(f"{cluster.prefix}/{what}/") for what in ("datasets", "versions", "nodes", "txn")}
    for c in setup:
        c.close()
    out: dict[str, Any] = {}
    for op in CATALOG_OPS:
        out[op] = {}
        for n in CATALOG_CLIENTS:
            runs = cells[op][n]
            lat = [x for cell in runs for x in cell["latencies"]]
            out[op][str(n)] = {
                "ops_per_s": median([cell["ops_per_s"] for cell in runs]),
                "ops_per_s_rounds": [cell["ops_per_s"] for cell in runs],
                "p50_ms": float(np.percentile(lat, 50)) * 1e3 if lat else float("nan"),
                "p99_ms": float(np.percentile(lat, 99)) * 1e3 if lat else float("nan"),
                "ops": len(lat),
                "errors": sum(cell["errors"] for cell in runs),
                "first_errors": [e for cell in runs for e in cell["first_errors"]][:3],
            }
    return {
        "seconds_per_cell": args.seconds,
        "rounds": args.rounds,
        "datasets_listed": datasets,
        "small_put_rows": SMALL_ROWS,
        "loadavg_per_round": loads,
        "etcd_keys_after": keys,
        "cells": out,
    }


# -- e: the collector's listing, record sizes, the largest version ------------------------------------------------


def version_record(name: str, number: int, parts: int, schema: pa.Schema) -> Any:
    from flightcache.server.cluster import ClusterVersion, Part

    ps = tuple(
        Part(f"_fcparts/{secrets.token_hex(8)}", secrets.token_hex(4), 1_000_000, 16_000_000, 8, False)
        for _ in range(parts)
    )
    return ClusterVersion(name, number, schema, ps, time.time(), secrets.token_hex(4))


def run_listing(args: argparse.Namespace, etcd_url: str) -> dict[str, Any]:
    from flightcache.server.cluster import ClusterCatalog
    from flightcache.server.etcd import Etcd, EtcdSettings

    etcd = Etcd(EtcdSettings(etcd_url, timeout=60))
    schema = make_table(1).schema
    sizes = {
        str(p): len(json.dumps(version_record("events/2026-12-04", 1, p, schema).to_json(), separators=(",", ":")))
        for p in (1, 3, 10, 100, 1000)
    }
    per_part = (sizes["1000"] - sizes["100"]) / 900
    grid = [(100, 3), (1000, 3)] if args.quick else [(100, 3), (1000, 3), (10000, 3), (1000, 100)]
    listing = []
    for k, p in grid:
        prefix = f"/bench-list-{k}x{p}"
        catalog = ClusterCatalog(etcd, prefix)
        progress(f"listing: writing {k} version records of {p} parts")
        one_record = len(json.dumps(version_record("d000", 0, p, schema).to_json(), separators=(",", ":")))
        batch = max(1, min(100, 500_000 // one_record))  # etcd takes 128 operations and 1.5 MiB per request
        for start in range(0, k, batch):
            puts = [
                (f"{prefix}/versions/d{j % 100:03d}/{j:012d}", version_record(f"d{j % 100:03d}", j, p, schema), None)
                for j in range(start, min(k, start + batch))
            ]
            etcd.txn([], [(key, v.to_json(), lease) for key, v, lease in puts])
        times, listed = [], []
        for _ in range(args.list_reps):
            started = time.perf_counter()
            listed = catalog.versions()
            times.append(time.perf_counter() - started)
            assert len(listed) == k
        listing.append(
            {
                "versions": k,
                "parts_per_version": p,
                "record_bytes": one_record,
                "list_s": spread(times),
                "records_per_s": k / median(times),
                "mb_per_s": k * one_record / 1e6 / median(times),
            }
        )
        progress(f"  {k} x {p} parts: {median(times) * 1e3:.1f} ms ({k / median(times):,.0f} records/s)")
        etcd.txn([], delete_prefixes=[f"{prefix}/"])
    # The largest version etcd takes: publish ever larger versions (2 copies per publish: datasets/ and versions/).
    catalog = ClusterCatalog(etcd, "/bench-maxparts")
    ok, bad, error = 1, 20000, ""
    while bad - ok > max(10, ok // 100):
        mid = (ok + bad) // 2
        record = version_record("big", 1, mid, schema)
        try:
            catalog.publish("big", lambda current, number, r=record: r)
            ok = mid
        except Exception as e:
            bad, error = mid, f"{type(e).__name__}: {e}"[:200]
    etcd.txn([], delete_prefixes=["/bench-maxparts/"])
    return {
        "record_bytes_by_parts": sizes,
        "record_bytes_per_part": per_part,
        "listing": listing,
        "max_parts_per_version": {"accepted": ok, "refused": bad, "error": error},
    }


# -- d: dead-node detection and recovery --------------------------------------------------------------------------


def run_recovery(args: argparse.Namespace, servers: Servers, etcd_url: str, workdir: Path) -> dict[str, Any]:
    import flightcache

    rows = int(args.recovery_mb * 1e6 / ROW_BYTES)
    data = make_table(rows, seed=7)
    clusters = {}
    for lease in args.leases:
        storage = workdir / f"storage-lease{lease}"
        extra = ["--storage", str(storage), "--lease-seconds", str(lease), "--memory-limit", "2GiB"]
        progress(f"recovery: a 3-node cluster with --lease-seconds {lease}")
        clusters[lease] = Cluster(servers, etcd_url, f"/bench-lease{lease}", 3, extra)
    rng = random.Random(12)
    reps: dict[int, list[dict[str, Any]]] = {lease: [] for lease in args.leases}
    for rep in range(args.recovery_reps):
        order = list(args.leases) if rep % 2 == 0 else list(reversed(args.leases))
        for lease in order:
            r = one_recovery(clusters[lease], lease, data, f"rec/{rep}", rng)
            reps[lease].append(r)
            progress(
                f"rep {rep + 1}/{args.recovery_reps} lease {lease:2d} s: gone from nodes() after "
                f"{r['detected_s']:.2f} s, read through node 2 ok after {r['read_ok_s']:.2f} s "
                f"({r['failed_reads']} failed reads), load {r['loadavg'][0]}"
            )
            clusters[lease].restart(2)
            with flightcache.connect(clusters[lease].uris[0], shm=False) as c:
                c.drop(f"rec/{rep}")
    out = {}
    for lease, rs in reps.items():
        out[str(lease)] = {
            "detected_s": spread([r["detected_s"] for r in rs]),
            "read_ok_s": spread([r["read_ok_s"] for r in rs]),
            "read_after_detection_s": spread([r["read_after_detection_s"] for r in rs]),
            "expected_detection_s": [round(2 * lease / 3, 2), lease],
            "reps": rs,
        }
    return {"dataset_bytes": data.nbytes, "poll_s": POLL_S, "leases": out}


def one_recovery(cluster: Cluster, lease: int, data: pa.Table, name: str, rng: random.Random) -> dict[str, Any]:
    import flightcache

    victim, victim_id = cluster.nodes[2][0], cluster.node_id(2)
    with flightcache.connect(cluster.uris[0], shm=False) as c:
        deadline = time.monotonic() + 5 * lease + 30
        while {n["id"] for n in c.nodes()} != {cluster.node_id(i) for i in range(3)}:
            assert time.monotonic() < deadline, "the cluster did not come back to 3 members"
            time.sleep(POLL_S)
    with flightcache.connect(cluster.uris[2], shm=False) as w:
        w.put(name, data, persist="sync")
        info = w.info(name)
    assert [p["node"] for p in info["parts"]] == [victim_id] and info["parts"][0]["persisted"], info
    phase = rng.uniform(0, lease / 3)  # a random moment of the node's renewal period (it renews every lease/3)
    time.sleep(phase)
    load = loadavg()
    killed = time.perf_counter()
    victim.kill()
    victim.wait()
    marks: dict[str, Any] = {"failed_reads": 0, "errors": []}
    limit = 5 * lease + 60

    def detect() -> None:
        with flightcache.connect(cluster.uris[0], shm=False) as c:
            while time.perf_counter() - killed < limit:
                if victim_id not in {n["id"] for n in c.nodes()}:
                    marks["detected_s"] = time.perf_counter() - killed
                    return
                time.sleep(POLL_S)

    def read() -> None:
        with flightcache.connect(cluster.uris[1], shm=False) as c:
            while time.perf_counter() - killed < limit:
                try:
                    got = c.get(name)
                    if got.num_rows == data.num_rows:
                        marks["read_ok_s"] = time.perf_counter() - killed
                        return
                except Exception as e:  # the node is dead: what a reader sees until it reads again
                    marks["failed_reads"] += 1
                    if len(marks["errors"]) < 3:
                        marks["errors"].append(f"{type(e).__name__}: {e}"[:200])
                time.sleep(POLL_S)

    threads = [threading.Thread(target=detect), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if "detected_s" not in marks or "read_ok_s" not in marks:
        raise RuntimeError(f"recovery with lease {lease} s not seen within {limit} s: {marks}")
    with flightcache.connect(cluster.uris[1], shm=False) as c:
        after: list[pa.Table] = []
        marks["read_after_detection_s"] = timed(lambda: after.append(c.get(name)))
        assert after[0].num_rows == data.num_rows
        location = c.flight_info(name).endpoints[0].locations[0].uri.decode()
    # The node the endpoint names: node 2 plans with its member view, which may be up to a third of a lease old,
    # so right after the lease expired it can still name the dead node 3 (the client then falls back to node 2).
    marks["endpoint_node_after_detection"] = next(i + 1 for i, u in enumerate(cluster.uris) if u == location)
    marks["kill_phase_s"] = phase
    marks["loadavg"] = load
    return marks


# -- etcd's own figures -----------------------------------------------------------------------------------------


def etcd_metrics(etcd_url: str) -> dict[str, Any]:
    """Means of etcd's WAL fsync and backend commit durations (its /metrics), and its database size."""
    from flightcache.server.etcd import Etcd, EtcdSettings

    host = etcd_url.split("//", 1)[1]
    text = urllib.request.urlopen(f"http://{host}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    out: dict[str, Any] = {}
    for metric in ("etcd_disk_wal_fsync_duration_seconds", "etcd_disk_backend_commit_duration_seconds"):
        count = values.get(f"{metric}_count", 0)
        out[f"{metric}_mean_ms"] = values.get(f"{metric}_sum", 0) / count * 1e3 if count else None
        out[f"{metric}_count"] = count
    status = Etcd(EtcdSettings(etcd_url)).status()
    out["db_size_bytes"] = int(status.get("dbSize", 0))
    out["db_size_in_use_bytes"] = int(status.get("dbSizeInUse", 0))
    out["revision"] = int(status["header"]["revision"])
    out["version"] = status.get("version")
    return out


# -- the run ------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from flightcache.server.etcd import LocalEtcd

    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "cluster",
        "machine": machine_info(),
        "parameters": {
            k: getattr(args, k)
            for k in (
                "quick",
                "gb",
                "reps",
                "info_calls",
                "seconds",
                "rounds",
                "list_datasets",
                "leases",
                "recovery_reps",
                "recovery_mb",
                "sections",
            )
        },
        "notes": NOTES,
        "loadavg": {"start": loadavg()},
    }
    etcd = LocalEtcd(str(workdir / "etcd")).start()
    servers = Servers(workdir)
    fs = subprocess.run(["df", "-T", str(workdir)], capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
    result["etcd"] = {"data_dir_filesystem": fs}
    try:
        cluster3 = None
        if "a" in args.sections:
            result["throughput"], cluster3 = run_throughput(args, servers, etcd.url)
            result["loadavg"]["after_throughput"] = loadavg()
        if "c" in args.sections:
            if cluster3 is None:
                cluster3 = Cluster(servers, etcd.url, "/bench-n3", 3, ["--storage", "none"])
            result["catalog"] = run_catalog(args, cluster3)
            result["loadavg"]["after_catalog"] = loadavg()
        if cluster3 is not None:
            for proc, _ in cluster3.nodes:
                stop_server(proc)
        if "e" in args.sections:
            result["listing"] = run_listing(args, etcd.url)
            result["loadavg"]["after_listing"] = loadavg()
        if "d" in args.sections:
            result["recovery"] = run_recovery(args, servers, etcd.url, workdir)
            result["loadavg"]["after_recovery"] = loadavg()
        result["etcd"].update(etcd_metrics(etcd.url))
    finally:
        servers.stop_all()
        etcd.stop()
    result["targets"] = targets(result)
    after = sources_digest("flightcache")
    if after != result["machine"].get("flightcache_sources_sha256"):
        result["flightcache_sources_changed_during_run"] = after
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    return result


def targets(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "throughput" in result:
        configs = result["throughput"]["configs"]
        shares = {c: configs[c]["flight_info_share_of_read"] * 100 for c in configs if c.startswith("cluster")}
        out["catalog_share_of_read"] = {
            "target": f"GetFlightInfo of the {result['throughput']['table']['bytes'] / GB:.2g} GB dataset on a cluster "
            f"node (etcd read + endpoint planning) under {INFO_TARGET:.0%} of its full read",
            "percent_of_read": shares,
            "flight_info_ms": {c: configs[c]["flight_info_ms"]["median"] for c in shares},
            "met": max(shares.values()) < INFO_TARGET * 100,
        }
    if "recovery" in result:
        leases = result["recovery"]["leases"]
        out["dead_node_recovery"] = {
            "target": "after kill -9 of the node holding a persisted part, it leaves the member list and its dataset "
            "reads through another node (from storage), every repetition",
            "detected_s_median": {f"lease {k} s": v["detected_s"]["median"] for k, v in leases.items()},
            "read_ok_s_median": {f"lease {k} s": v["read_ok_s"]["median"] for k, v in leases.items()},
            "met": True,  # a repetition that does not recover raises instead
        }
    return out


def load_range(result: dict[str, Any]) -> tuple[float, float]:
    """The lowest and highest 1-minute load average sampled during the run (sections, repetitions, rounds)."""
    samples = [v[0] for v in result["loadavg"].values()]
    samples += [v[0] for v in result.get("throughput", {}).get("loadavg_per_rep", [])]
    samples += [v[0] for v in result.get("catalog", {}).get("loadavg_per_round", [])]
    for lease in result.get("recovery", {}).get("leases", {}).values():
        samples += [r["loadavg"][0] for r in lease["reps"]]
    return min(samples), max(samples)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    low, high = load_range(result)
    when = f"{result['machine']['date']}, 2 shared cores, 1-min load {low:g} to {high:g} during the run"
    fig.suptitle(f"flightcache cluster mode on one host (bench/cluster.py, {when})")
    if "throughput" in result:
        t = result["throughput"]
        configs = t["configs"]
        names = list(configs)
        size = t["table"]["bytes"] / GB
        for ax, key, title in (
            (axes[0][0], "read", "full read (Client.get)"),
            (axes[0][1], "put", "put (parts + commit)"),
        ):
            med = [size / configs[c][f"{key}_s"]["median"] for c in names]
            lo = [m - size / configs[c][f"{key}_s"]["max"] for m, c in zip(med, names, strict=True)]
            hi = [size / configs[c][f"{key}_s"]["min"] - m for m, c in zip(med, names, strict=True)]
            ax.bar(names, med, yerr=[lo, hi], capsize=4, color=["grey", "C0", "C0", "C0", "lightgrey"][: len(names)])
            streamed = [m + h for m, h, c in zip(med, hi, names, strict=True) if c != "standalone-shm"]
            ax.set_ylim(0, max(streamed) * 1.3)  # the mapped read would flatten the others: its bar is cut, labelled
            for i, m in enumerate(med):
                ax.text(i, min(m, max(streamed) * 1.25), f"{m:.2f}", ha="center", va="bottom")
            ax.set_title(f"{title}, {size:.2g} GB, median of {t['reps']} (min-max)")
            ax.set_ylabel("GB/s")
            ax.tick_params(axis="x", rotation=20)
        ax = axes[0][2]
        names = [c for c in names if c != "standalone-shm"]  # a mapped read moves no bytes: no share to speak of
        shares = [configs[c]["flight_info_share_of_read"] * 100 for c in names]
        ax.bar(names, shares, color="C1")
        ax.axhline(INFO_TARGET * 100, color="red", linestyle="--", label="target 5%")
        for i, c in enumerate(names):
            ax.text(i, shares[i], f"{configs[c]['flight_info_ms']['median']:.1f} ms", ha="center", va="bottom")
        ax.set_yscale("log")
        ax.set_title("GetFlightInfo as % of the full read (label: ms)")
        ax.legend()
        ax.tick_params(axis="x", rotation=20)
    if "catalog" in result:
        ax = axes[1][0]
        cells = result["catalog"]["cells"]
        labels, values = [], []
        for op, by_n in cells.items():
            for n, cell in by_n.items():
                labels.append(f"{op} x{n}")
                values.append(cell["ops_per_s"])
        ax.barh(labels, values, color="C2")
        ax.set_xlabel("operations per second (all clients)")
        ax.set_title(f"catalog operations ({result['catalog']['datasets_listed']} datasets listed)")
    if "listing" in result:
        ax = axes[1][1]
        for p in sorted({x["parts_per_version"] for x in result["listing"]["listing"]}):
            pts = [x for x in result["listing"]["listing"] if x["parts_per_version"] == p]
            ax.plot(
                [x["versions"] for x in pts], [x["list_s"]["median"] for x in pts], "o-", label=f"{p} parts/version"
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("version records under versions/")
        ax.set_ylabel("seconds per listing (each node, every 5 s)")
        ax.set_title("the collector's listing of versions/")
        ax.legend()
    if "recovery" in result:
        ax = axes[1][2]
        leases = result["recovery"]["leases"]
        for i, v in enumerate(leases.values()):
            det = [r["detected_s"] for r in v["reps"]]
            rd = [r["read_ok_s"] for r in v["reps"]]
            ax.scatter([i - 0.1] * len(det), det, color="C3", label="gone from nodes()" if i == 0 else None)
            ax.scatter([i + 0.1] * len(rd), rd, color="C4", label="read through node 2 ok" if i == 0 else None)
            ax.hlines(v["expected_detection_s"], i - 0.3, i + 0.3, color="grey", linestyle=":")
        ax.set_xticks(range(len(leases)), [f"lease {k} s" for k in leases])
        ax.set_ylabel("seconds after kill -9")
        ax.set_title("dead node: detection and recovery (dotted: 2/3 lease .. lease)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="~64 MB, 1 rep, short cells, lease 2 s only, to a temp dir"
    )
    parser.add_argument("--gb", type=float, help="size of the table of section a (default 1.0; --quick 0.064)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions of section a (default 5; --quick 1)")
    parser.add_argument("--info-calls", type=int, help="GetFlightInfo calls per rep and config (default 30; --quick 5)")
    parser.add_argument("--seconds", type=float, help="length of a catalog cell (default 5; --quick 0.5)")
    parser.add_argument("--rounds", type=int, help="rounds over the catalog cells (default 3; --quick 1)")
    parser.add_argument(
        "--warmup", type=float, help="seconds of warm-up per catalog operation (default 1; --quick 0.2)"
    )
    parser.add_argument("--list-datasets", type=int, help="datasets in the catalog for list (default 100; --quick 10)")
    parser.add_argument("--list-reps", type=int, help="timed listings per size in section e (default 5; --quick 3)")
    parser.add_argument("--leases", type=int, nargs="+", help="lease seconds of section d (default 10 2; --quick 2)")
    parser.add_argument("--recovery-reps", type=int, help="kills per lease (default 5; --quick 1)")
    parser.add_argument("--recovery-mb", type=float, help="the killed node's dataset (default 100; --quick 8)")
    parser.add_argument("--no-shm", action="store_true", help="leave out the standalone-shm reference")
    parser.add_argument("--sections", default="acde", help="which sections to run (default: acde; b runs with a)")
    parser.add_argument(
        "--plot-only", type=Path, metavar="JSON", help="draw the PNG of an earlier run's JSON, beside it"
    )
    parser.add_argument(
        "--out", type=Path, help=f"directory for cluster.json and .png (default {DEFAULT_OUT}; --quick: a temp dir)"
    )
    args = parser.parse_args(argv)
    q = args.quick
    defaults = {
        "gb": (0.064, 1.0),
        "reps": (1, 5),
        "info_calls": (5, 30),
        "seconds": (0.5, 5.0),
        "rounds": (1, 3),
        "warmup": (0.2, 1.0),
        "list_datasets": (10, 100),
        "list_reps": (3, 5),
        "leases": ([2], [10, 2]),
        "recovery_reps": (1, 5),
        "recovery_mb": (8.0, 100.0),
    }
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if q else full)
    args.out = args.out or (Path(tempfile.mkdtemp(prefix="flightcache-cluster-")) if q else DEFAULT_OUT)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return 0
    with tempfile.TemporaryDirectory(prefix="flightcache-cluster-run-") as tmp:
        result = run(args, Path(tmp))
    result["loadavg"]["end"] = loadavg()
    out = args.out / "cluster.json"
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    if "throughput" in result:
        for name, c in result["throughput"]["configs"].items():
            print(
                f"{name:15} put {c['put_gb_s']:5.2f} GB/s  read {c['read_gb_s']:5.2f} GB/s  GetFlightInfo "
                f"{c['flight_info_ms']['median']:6.2f} ms = {c['flight_info_share_of_read']:.2%} of the read"
            )
    if "catalog" in result:
        for op, by_n in result["catalog"]["cells"].items():
            print(f"{op:11} " + "  ".join(f"x{n}: {c['ops_per_s']:7.0f}/s" for n, c in by_n.items()))
    if "recovery" in result:
        for lease, v in result["recovery"]["leases"].items():
            print(
                f"lease {lease:>2} s: gone after {v['detected_s']['median']:.2f} s, read ok after "
                f"{v['read_ok_s']['median']:.2f} s (medians)"
            )
    low, high = load_range(result)
    progress(f"wrote {out} in {result['elapsed_s']:.0f} s; 1-minute load average {low:g} to {high:g} during the run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
