"""Cluster mode with real processes: etcd, and three ``flightcache serve --cluster`` nodes on 127.0.0.1-3.

Each test gets its own cluster (its own etcd prefix, its own storage directory) of fresh node processes,
so that a node can be killed with ``kill -9`` or stopped with SIGSTOP without touching the next test.
Leases are 2 s, so a lost node is noticed within a few seconds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
from conftest import run_cli, start_server_ready, stop_server, wait_until

import flightcache
from flightcache.errors import (
    DataLostError,
    DatasetExistsError,
    DatasetNotFoundError,
    FlightcacheError,
    InvalidNameError,
    InvalidRequestError,
    NotImplementedByServerError,
    ServerUnavailableError,
)
from flightcache.protocol import Ticket
from flightcache.server.etcd import Etcd, EtcdSettings, LocalEtcd

pytestmark = pytest.mark.cluster

LEASE = 2


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    server = LocalEtcd(str(tmp_path_factory.mktemp("etcd") / "data")).start()
    yield server
    server.stop()


class Cluster:
    """Node processes of one cluster; ``nodes[i]`` serves on 127.0.0.{i+1}."""

    def __init__(self, etcd: LocalEtcd, storage: Path) -> None:
        self.etcd = etcd
        self.storage = storage
        self.prefix = f"/test-{uuid.uuid4().hex[:8]}"
        self.procs: list[subprocess.Popen[str]] = []
        self.ready: list[dict[str, Any]] = []

    def start(self, host: str, *extra: str) -> int:
        proc, ready = start_server_ready(
            "--host",
            host,
            "--cluster",
            self.etcd.url,
            "--cluster-prefix",
            self.prefix,
            "--lease-seconds",
            str(LEASE),
            "--retain-seconds",
            "2",
            "--storage",
            str(self.storage),
            "--memory-limit",
            "256MiB",
            "--log-level",
            "INFO",
            *extra,
        )
        self.procs.append(proc)
        self.ready.append(ready)
        return len(self.procs) - 1

    def uri(self, i: int) -> str:
        return str(self.ready[i]["uri"])

    def node(self, i: int) -> str:
        return str(self.ready[i]["node"])

    def client(self, i: int) -> flightcache.Client:
        return flightcache.connect(self.uri(i))

    def members(self) -> set[str]:
        etcd = Etcd(EtcdSettings(self.etcd.url))
        return {e.value["id"] for e in etcd.prefix(f"{self.prefix}/nodes/")}

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
            stop_server(proc)


@pytest.fixture
def cluster(etcd: LocalEtcd, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(etcd, tmp_path / "storage")
    for i in (1, 2, 3):
        c.start(f"127.0.0.{i}")
    yield c
    c.stop()


def table(rows: int, start: int = 0) -> pa.Table:
    return pa.table({"id": pa.array(range(start, start + rows), pa.int64()), "tag": [f"r{i % 7}" for i in range(rows)]})


def hosts_of(info: flight.FlightInfo) -> list[str]:
    return [e.locations[0].uri.decode().split("//")[1].split(":")[0] for e in info.endpoints]


def test_put_on_one_node_reads_on_every_node(cluster: Cluster) -> None:
    """A put through node 1 is read whole through nodes 2 and 3, by the Python client and by a plain Flight client."""
    data = table(200_000)
    assert cluster.client(0).put("events", data)["version"] == 1
    assert cluster.client(1).get("events").equals(data)
    plain = flight.connect(cluster.uri(2))
    info = plain.get_flight_info(flight.FlightDescriptor.for_path("events"))
    assert set(hosts_of(info)) == {"127.0.0.1"}, "the endpoints are located at the node holding the part"
    # A plain client redeeming every ticket where it asked (not at the location) still gets every row.
    assert pa.concat_tables(plain.do_get(e.ticket).read_all() for e in info.endpoints).equals(data)
    # And one that follows the locations.
    at = {h: flight.connect(e.locations[0]) for e, h in zip(info.endpoints, hosts_of(info), strict=True)}
    assert pa.concat_tables(
        at[h].do_get(e.ticket).read_all() for e, h in zip(info.endpoints, hosts_of(info), strict=True)
    ).equals(data)
    assert [d["name"] for d in cluster.client(2).list()] == ["events"]


def test_nodes_lists_members_with_their_hosts(cluster: Cluster) -> None:
    """client.nodes() and `flightcache nodes` list the three members, their hosts and which one answered."""
    nodes = cluster.client(1).nodes()
    assert sorted(n["host"] for n in nodes) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert [n["id"] for n in nodes if n["self"]] == [cluster.node(1)]
    assert all(n["state"] == "up" and n["location"].startswith("grpc://127.0.0.") for n in nodes)
    out = run_cli("nodes", "--uri", cluster.uri(0), "--output", "json")
    assert out.returncode == 0, out.stderr
    assert {n["id"] for n in json.loads(out.stdout)} == {cluster.node(i) for i in range(3)}
    text = run_cli("nodes", "--uri", cluster.uri(0))
    assert cluster.node(0) + " *" in text.stdout


def test_appends_through_two_nodes_keep_parts_where_written(cluster: Cluster) -> None:
    """An append through node 2 adds a part on node 2; the endpoints name node 1 then node 2, in row order."""
    first, second = table(50_000), table(30_000, start=50_000)
    cluster.client(0).put("t", first)
    assert cluster.client(1).put("t", second, mode="append") == {
        "name": "t",
        "version": 2,
        "rows": 80_000,
        "bytes": pytest.approx(first.nbytes + second.nbytes, rel=0.1),
    }
    info = flight.connect(cluster.uri(2)).get_flight_info(flight.FlightDescriptor.for_path("t"))
    assert hosts_of(info) == ["127.0.0.1", "127.0.0.2"]
    assert cluster.client(2).get("t").equals(pa.concat_tables([first, second]))
    described = cluster.client(2).info("t")
    assert [p["node"] for p in described["parts"]] == [cluster.node(0), cluster.node(1)]
    with pytest.raises(FlightcacheError, match="schema"):
        cluster.client(2).put("t", pa.table({"other": [1]}), mode="append")
    with pytest.raises(DatasetExistsError):
        cluster.client(2).put("t", second, mode="create")
    with pytest.raises(InvalidNameError):
        cluster.client(0).put("_fcparts/x", second)


def test_transaction_parts_on_three_nodes_commit_as_one_version(cluster: Cluster) -> None:
    """Parts staged on each node become one version when committed on another node; unlisted parts are dropped."""
    clients = [cluster.client(i) for i in range(3)]
    parts = [clients[i].put("job", table(1000 * (i + 1), start=10_000 * i), txn="t1")["part"] for i in range(3)]
    spare = clients[0].put("job", table(5, start=99_000), txn="t1")["part"]  # a speculative attempt, not listed
    assert len(set([*parts, spare])) == 4
    with pytest.raises(DatasetNotFoundError):
        clients[2].info("job")  # nothing visible before the commit
    result = clients[1].commit("t1", "job", parts=parts)
    assert result["version"] == 1 and result["rows"] == 6000
    expected = pa.concat_tables([table(1000 * (i + 1), start=10_000 * i) for i in range(3)])
    assert clients[2].get("job").equals(expected)
    info = flight.connect(cluster.uri(0)).get_flight_info(flight.FlightDescriptor.for_path("job"))
    assert hosts_of(info) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    with pytest.raises(InvalidRequestError, match="ended"):
        clients[0].commit("t1", "job")
    with pytest.raises(FlightcacheError):
        clients[0].put("job", table(5), txn="t1")
    # A commit naming a part that does not exist publishes nothing and ends the transaction.
    clients[2].put("job", table(10), txn="t2")
    with pytest.raises(InvalidRequestError, match="no staged parts"):
        clients[0].commit("t2", "job", parts=["nosuch.000001"])
    assert clients[0].info("job")["version"] == 1


def test_concurrent_writers_of_one_dataset(cluster: Cluster) -> None:
    """Creates race on three nodes: one wins. Appends race: none is lost, every version number is used once."""
    clients = [cluster.client(i) for i in range(3)]
    outcomes: list[Any] = []

    def create(i: int) -> None:
        try:
            outcomes.append(clients[i].put("once", table(100, start=i * 1000), mode="create"))
        except DatasetExistsError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(o, dict) for o in outcomes) == 1, outcomes
    versions: list[int] = []
    lock = threading.Lock()

    def append(i: int) -> None:
        for j in range(5):
            v = clients[i].put("log", table(10, start=i * 100 + j * 10), mode="append")["version"]
            with lock:
                versions.append(v)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 16)), "each publish got its own number"
    got = clients[0].get("log")
    assert got.num_rows == 150 and sorted(got["id"].to_pylist()) == sorted(
        i * 100 + j * 10 + k for i in range(3) for j in range(5) for k in range(10)
    )


def test_killed_node_persisted_parts_load_elsewhere_memory_only_parts_are_lost(cluster: Cluster) -> None:
    """kill -9 of node 3: its persisted part is read from storage by a live node; its memory-only part fails
    every read with DATA_LOST naming the dataset, the part and the node; the rest of the cluster serves on."""
    kept, lost = table(40_000), table(20_000)
    cluster.client(2).put("kept", kept, persist="sync")
    cluster.client(2).put("lost", lost)
    cluster.client(0).put("other", lost)
    node3 = cluster.node(2)
    part = cluster.client(0).info("lost")["parts"][0]["part"]
    cluster.procs[2].kill()
    cluster.procs[2].wait()
    wait_until(lambda: node3 not in cluster.members(), "the dead node's lease to expire", timeout=LEASE * 5)
    reader = cluster.client(0)
    assert reader.get("kept").equals(kept)
    for _attempt in range(2):  # every read, not only the first
        with pytest.raises(DataLostError) as lost_error:
            reader.get("lost")
        message = str(lost_error.value)
        assert "'lost'" in message and part in message and node3 in message
    assert reader.get("other").equals(lost)
    assert cluster.client(1).info("lost")["state"] in ("node-gone", "node-unreachable", "lost")
    # Rewriting it makes it readable again.
    cluster.client(1).put("lost", lost)
    assert reader.get("lost").equals(lost)


def test_node_killed_mid_read_gives_an_error_not_a_partial_result(cluster: Cluster) -> None:
    """A stream from a node killed mid-read raises; the rows already yielded are never taken for the dataset."""
    big = table(2_000_000)
    cluster.client(2).put("big", big)
    reader = cluster.client(0)
    got = 0
    with pytest.raises((FlightcacheError, flight.FlightError, OSError)):
        for i, batch in enumerate(reader.stream("big")):
            got += batch.num_rows
            if i == 0:
                cluster.procs[2].kill()
    assert got < big.num_rows


def test_node_killed_mid_write_publishes_nothing(cluster: Cluster) -> None:
    """A put streaming to a node that is killed mid-stream fails, and no version of the dataset appears."""
    cluster.client(0).put("target", table(10))
    writer = flight.connect(cluster.uri(2))
    schema = table(1).schema
    put, _ = writer.do_put(
        flight.FlightDescriptor.for_command(json.dumps({"name": "target", "mode": "append", "trailer": True}).encode()),
        schema,
    )
    put.write_table(table(100_000))
    cluster.procs[2].kill()
    cluster.procs[2].wait()
    with pytest.raises((flight.FlightError, OSError)):
        put.write_table(table(100_000))
        put.done_writing()
        put.close()
    info = cluster.client(0).info("target")
    assert info["version"] == 1 and info["rows"] == 10


def test_node_cut_off_by_sigstop_leaves_then_rejoins(cluster: Cluster) -> None:
    """SIGSTOP: the node's lease expires and it leaves the member list, its memory-only data reads as lost;
    SIGCONT: it joins again with the same id and its data reads again."""
    data = table(10_000)
    cluster.client(1).put("held", data)
    node2 = cluster.node(1)
    cluster.procs[1].send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: node2 not in cluster.members(), "the stopped node's lease to expire", timeout=LEASE * 5)
        assert node2 not in {n["id"] for n in cluster.client(0).nodes()}
        with pytest.raises(DataLostError):
            cluster.client(0).get("held")
    finally:
        cluster.procs[1].send_signal(signal.SIGCONT)
    wait_until(lambda: node2 in cluster.members(), "the node to join again", timeout=LEASE * 5)
    assert cluster.client(2).get("held").equals(data)


def test_etcd_restart(cluster: Cluster) -> None:
    """With etcd stopped, calls that need the catalog fail with UNAVAILABLE naming etcd; started again (same
    data), the nodes carry on and the datasets are there."""
    data = table(1000)
    cluster.client(0).put("survives", data)
    cluster.etcd.stop()
    try:
        with pytest.raises(ServerUnavailableError, match="etcd"):
            cluster.client(1).get("survives")
    finally:
        cluster.etcd.start()
    wait_until(lambda: len(cluster.members()) == 3, "the nodes to be members again", timeout=LEASE * 10)
    assert cluster.client(1).get("survives").equals(data)
    assert cluster.client(2).put("after", data)["version"] == 1


def test_replaced_and_dropped_parts_are_freed(cluster: Cluster) -> None:
    """A version replaced longer than --retain-seconds ago, and a dropped dataset, free their parts' memory."""
    c = cluster.client(0)
    c.put("x", table(100_000))
    old = c.info("x")["parts"][0]["part"]
    ticket = Ticket.from_bytes(
        flight.connect(cluster.uri(0)).get_flight_info(flight.FlightDescriptor.for_path("x")).endpoints[0].ticket.ticket
    )
    c.put("x", table(10))
    # The old version's ticket still reads during the retention time.
    assert flight.connect(cluster.uri(1)).do_get(flight.Ticket(ticket.to_bytes())).read_all().num_rows > 0
    node = cluster.node(0)

    def parts_on_node() -> list[str]:
        return [p["part"] for p in c.info("x")["parts"]]

    def held() -> int:
        return next(n["datasets"] for n in c.nodes() if n["id"] == node)

    wait_until(lambda: held() == 1, "the replaced version's part to be freed", timeout=90)
    assert old not in parts_on_node()
    c.drop("x")
    wait_until(lambda: held() == 0, "the dropped dataset's part to be freed", timeout=90)


def test_sql_on_a_node_reads_parts_of_every_node(cluster: Cluster) -> None:
    """SQL through node 3 reads the parts on nodes 1 and 2 (over Flight); `sql ... into` publishes a cluster
    dataset that another node reads."""
    cluster.client(0).put("s", table(1000))
    cluster.client(1).put("s", table(500, start=1000), mode="append")
    result = cluster.client(2).sql("SELECT count(*) AS n, sum(id) AS total FROM s")
    assert result.to_pylist() == [{"n": 1500, "total": sum(range(1500))}]
    summary = cluster.client(2).sql("SELECT tag, count(*) AS n FROM s GROUP BY tag", into="s_by_tag")
    assert summary["version"] == 1 and summary["rows"] == 7
    assert sorted(cluster.client(0).get("s_by_tag")["n"].to_pylist()) == sorted(
        [sum(1 for i in range(1000) if i % 7 == k) + sum(1 for i in range(500) if i % 7 == k) for k in range(7)]
    )
    assert cluster.client(0).info("s_by_tag")["nodes"] == [cluster.node(2)]


def test_secured_cluster_calls_between_nodes_carry_the_node_token_over_tls(etcd: LocalEtcd, tmp_path: Path) -> None:
    """With --auth-token-file and TLS, a node fetches another's part with --node-token over TLS; a node with
    credentials but no node token refuses to start."""
    from test_security import self_signed

    cert, key = self_signed(tmp_path, ips=("127.0.0.1", "127.0.0.2"))
    tokens = tmp_path / "tokens"
    tokens.write_text("writer-token-0123456789 write\nreader-token-0123456789 read\nnode-token-0123456789 write\n")
    tokens.chmod(0o600)
    c = Cluster(etcd, tmp_path / "storage")
    secure = ("--auth-token-file", str(tokens), "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        for host in ("127.0.0.1", "127.0.0.2"):
            c.start(host, *secure, "--node-token", "node-token-0123456789")
        assert c.uri(0).startswith("grpc+tls://")
        data = table(5000)
        flightcache.connect(c.uri(0), token="writer-token-0123456789", tls_ca=cert.read_bytes()).put("sec", data)
        plain = flight.connect(c.uri(1), tls_root_certs=cert.read_bytes())
        options = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer reader-token-0123456789")])
        info = plain.get_flight_info(flight.FlightDescriptor.for_path("sec"), options)
        assert hosts_of(info) == ["127.0.0.1"]
        # Redeemed at node 2, which fetches the part from node 1 with its node token.
        assert pa.concat_tables(plain.do_get(e.ticket, options).read_all() for e in info.endpoints).equals(data)
        with pytest.raises(flight.FlightUnauthenticatedError):
            plain.get_flight_info(flight.FlightDescriptor.for_path("sec"))
        refused = run_cli("serve", "--host", "127.0.0.3", "--port", "0", "--cluster", etcd.url, *secure, timeout=60)
        assert refused.returncode == 1 and "needs --node-token" in refused.stderr
    finally:
        c.stop()


def test_etcd_with_authentication(tmp_path: Path) -> None:
    """A node logs in to an etcd that has authentication on (--etcd-user, --etcd-password-file); a wrong
    password stops it at start with a clear error."""
    import sys

    secured = LocalEtcd(str(tmp_path / "etcd")).start()
    etcdctl = [str(Path(sys.executable).parent / "etcdctl"), f"--endpoints=http://127.0.0.1:{secured.client_port}"]
    try:
        for args in (["user", "add", "root:s3cret-pass"], ["auth", "enable"]):
            done = subprocess.run([*etcdctl, *args], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
        good, bad = tmp_path / "good", tmp_path / "bad"
        good.write_text("s3cret-pass\n")
        bad.write_text("wrong\n")
        c = Cluster(secured, tmp_path / "storage")
        try:
            c.start("127.0.0.1", "--etcd-user", "root", "--etcd-password-file", str(good))
            c.client(0).put("a", table(10))
            assert c.client(0).get("a").num_rows == 10 and len(c.client(0).nodes()) == 1
            refused = run_cli(
                "serve",
                "--port",
                "0",
                "--cluster",
                secured.url,
                "--etcd-user",
                "root",
                "--etcd-password-file",
                str(bad),
            )
            assert refused.returncode == 1 and "refused user 'root'" in refused.stderr, refused.stderr
        finally:
            c.stop()
    finally:
        secured.stop()


def test_same_host_reads_map_each_part_from_its_nodes_shared_memory(cluster: Cluster) -> None:
    """A client on the nodes' host maps every part from the shared memory of the node holding it (no stream),
    projected and filtered here as the node would."""
    cluster.client(0).put("m", table(70_000))
    cluster.client(1).put("m", table(30_000, start=70_000), mode="append")
    reader = flightcache.connect(cluster.uri(2), shm=True)
    assert reader.get("m").equals(pa.concat_tables([table(70_000), table(30_000, start=70_000)]))
    got = reader.get("m", columns=["id"], filter="id >= 69990 and id < 70010")
    assert got["id"].to_pylist() == list(range(69_990, 70_010))
    stats = [cluster.client(i).stats() for i in range(3)]
    assert stats[0]["shm_reads"] > 0 and stats[1]["shm_reads"] > 0, "each node's part was mapped"
    assert all(s["gets"] == s["shm_reads"] for s in stats), "nothing was streamed"
    # A part asked of a node that does not hold it is not mapped there (the client streams it: do_get proxies
    # it, loads it from storage or says it is lost), rather than failing as an unknown dataset.
    part = next(p["part"] for p in reader.info("m")["parts"] if p["node"] == cluster.node(0))
    assert cluster.client(1).shared(part) is None
    assert cluster.client(0).shared(part) is not None


def test_load_reads_parquet_into_a_part_of_the_loading_node(cluster: Cluster, tmp_path: Path) -> None:
    """load on a node: a snapshot of external Parquet becomes a part of that node, read through every node;
    a refresh policy that would follow the source is refused (not in cluster mode yet), and nothing appears."""
    source = tmp_path / "lake"
    source.mkdir()
    parts = [table(30_000), table(20_000, start=30_000)]
    pq.write_table(parts[0], source / "a.parquet")
    pq.write_table(parts[1], source / "b.parquet")
    summary = cluster.client(1).load("lake", str(source))
    assert summary["rows"] == 50_000
    info = cluster.client(2).info("lake")
    assert [p["node"] for p in info["parts"]] == [cluster.node(1)]
    assert cluster.client(0).get("lake").sort_by("id").equals(pa.concat_tables(parts).combine_chunks())
    cluster.client(0).load("lake", str(source / "a.parquet"), mode="append")
    assert cluster.client(2).get("lake").num_rows == 80_000
    with pytest.raises(NotImplementedByServerError, match="refresh policy 'on-read' is not in cluster mode"):
        cluster.client(0).load("fresh", str(source), refresh="on-read")
    with pytest.raises(FlightcacheError, match="nowhere"):
        cluster.client(0).load("fresh", str(tmp_path / "nowhere"))
    assert "fresh" not in {d["name"] for d in cluster.client(2).list()}
