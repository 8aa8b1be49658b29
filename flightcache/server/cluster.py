"""The cluster's shared state in etcd: members, datasets, versions and the parts that make them up.

Every node of a cluster runs a whole flightcache server. What a node holds in memory it keeps in its
own store, as local datasets named ``_fcparts/<id>``: the **parts**. What the cluster knows is in etcd,
under one prefix (default ``/flightcache``):

==============================  ==========================================================================
``nodes/<id>``                  a member: location, host, memory, load; under the node's lease, so a node
                                that stops renewing it is gone ``lease_seconds`` later
``datasets/<name>``             the current version of a dataset (the record below)
``versions/<name>/<number>``    every version still readable: the current one, and replaced ones for
                                ``retain_seconds`` (snapshot reads of tickets handed out before)
``next/<name>``                 the next version number; it outlives a drop, so numbers are never reused
``txn/<txn>/<part id>``         a staged part of an open write transaction, under its node's lease
``txnend/<txn>``                a committed or aborted transaction (kept an hour, under a lease)
==============================  ==========================================================================

A version record names its parts in row order: for each, the node holding it, its local name, rows,
bytes and batches. Publishing is one etcd transaction that compares ``next/<name>`` and
``datasets/<name>`` with what the writer read: two writers never publish the same number and neither
loses the other's append (the loser reads again and retries). Storage needs no lock of its own: parts
are written once, under their own names, and only their node removes them, when no version names them.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa

from ..errors import DatasetNotFoundError, InvalidRequestError, PutAbortedError, ServerUnavailableError
from ..protocol import decode_schema, encode_schema
from .etcd import Entry, Etcd, EtcdSettings, absent, unchanged

log = logging.getLogger("flightcache.cluster")

PART_PREFIX = "_fcparts/"  # local names of parts; refused as dataset names in cluster mode
TXN_SECONDS = 3600  # an ended transaction's id stays taken this long (as on a single server)
PUBLISH_ATTEMPTS = 100


@dataclass(frozen=True)
class ClusterSettings:
    """How a node joins a cluster (``flightcache serve --cluster ... --advertise ...``)."""

    etcd: EtcdSettings
    advertise: str  # grpc://HOST:PORT where the other nodes and clients reach this node
    prefix: str = "/flightcache"  # the cluster's keys; clusters sharing one etcd use different prefixes
    node_id: str | None = None  # default: a new random id each start (a restarted node is a new member)
    lease_seconds: int = 10  # a node that stops renewing its lease is gone this long after
    gc_seconds: float = 5.0  # how often a node collects versions and parts no one can read any more
    gc_grace: float = 60.0  # a part no version names is removed only when older than this (a publish may be on its way)
    token: str | None = None  # the bearer token of node-to-node calls (a server with --auth needs one)
    tls_ca: bytes | None = None  # PEM: the CA of the other nodes' certificates (default: this node's own)

    def __post_init__(self) -> None:
        parts = urlsplit(self.advertise)
        try:
            parts.port  # noqa: B018  # raises on a port that is not a number
        except ValueError:
            parts = parts._replace(netloc="")
        if parts.scheme not in ("grpc", "grpc+tcp", "grpc+tls") or not parts.hostname:
            raise InvalidRequestError(
                f"--advertise {self.advertise!r} is not grpc://HOST[:PORT] (or grpc+tls://): give the address "
                "at which the other nodes and the clients reach this node (no port: the one it listens on)"
            )
        if self.lease_seconds < 1:
            raise InvalidRequestError(f"lease_seconds must be at least 1, got {self.lease_seconds}")

    @property
    def host(self) -> str:
        host = urlsplit(self.advertise).hostname
        assert host is not None
        return host

    @property
    def advertise_port(self) -> int | None:
        return urlsplit(self.advertise).port or None

    def with_port(self, port: int) -> ClusterSettings:
        """These settings, advertising ``port`` (the one the server got) where none was given."""
        parts = urlsplit(self.advertise)
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
        return replace(self, advertise=f"{parts.scheme}://{host}:{port}")


@dataclass(frozen=True)
class Part:
    """One part of a version: batches that one node holds, under a local name."""

    part: str  # the dataset name the node keeps it under (``_fcparts/...``)
    node: str  # the id of the node that wrote it
    rows: int
    bytes: int
    batches: int
    persisted: bool  # written to storage when the version was published

    def to_json(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "node": self.node,
            "rows": self.rows,
            "bytes": self.bytes,
            "batches": self.batches,
            "persisted": self.persisted,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Part:
        return cls(d["part"], d["node"], d["rows"], d["bytes"], d["batches"], d["persisted"])


@dataclass(frozen=True)
class ClusterVersion:
    """A version of a dataset as the cluster knows it."""

    name: str
    number: int
    schema: pa.Schema
    parts: tuple[Part, ...]
    created: float
    writer: str  # the node that published it
    expires: float | None = None  # its TTL's end (None: never)

    @property
    def num_rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.bytes for p in self.parts)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.number, "rows": self.num_rows, "bytes": self.nbytes}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.number,
            "schema": encode_schema(self.schema),
            "parts": [p.to_json() for p in self.parts],
            "created": self.created,
            "writer": self.writer,
            "expires": self.expires,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClusterVersion:
        return cls(
            d["name"],
            d["version"],
            decode_schema(d["schema"]),
            tuple(Part.from_json(p) for p in d["parts"]),
            d["created"],
            d["writer"],
            d.get("expires"),
        )


@dataclass(frozen=True)
class Node:
    """A member of the cluster, as it last described itself."""

    id: str
    name: str
    location: str
    host: str
    memory_used: int = 0
    memory_limit: int | None = None
    datasets: int = 0  # parts held
    load: float = 0.0  # the host's 1-minute load average
    in_flight: int = 0
    state: str = "up"
    started: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "location": self.location,
            "host": self.host,
            "memory_used": self.memory_used,
            "memory_limit": self.memory_limit,
            "datasets": self.datasets,
            "load": self.load,
            "in_flight": self.in_flight,
            "state": self.state,
            "started": self.started,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Node:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class StagedPart:
    """A part staged for a write transaction, waiting for its commit."""

    id: str  # "<node id>.<six digits>"
    name: str  # the dataset the transaction writes
    mode: str
    schema: pa.Schema
    part: Part
    order: int = 0  # etcd's create revision: the order in which parts finished staging

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "mode": self.mode,
            "schema": encode_schema(self.schema),
            "part": self.part.to_json(),
        }

    @classmethod
    def from_entry(cls, e: Entry) -> StagedPart:
        d = e.value
        return cls(
            d["id"], d["name"], d["mode"], decode_schema(d["schema"]), Part.from_json(d["part"]), e.create_revision
        )


class ClusterCatalog:
    """Datasets, versions, transactions and members, as etcd keys under ``prefix``."""

    def __init__(self, etcd: Etcd, prefix: str = "/flightcache") -> None:
        self.etcd = etcd
        self.prefix = prefix.rstrip("/")

    def _key(self, *segments: str) -> str:
        return "/".join((self.prefix, *segments))

    # -- datasets and versions -----------------------------------------------------------------

    def current(self, name: str) -> ClusterVersion | None:
        entry = self.etcd.get(self._key("datasets", name))
        return None if entry is None else ClusterVersion.from_json(entry.value)

    def require(self, name: str, number: int | None = None) -> ClusterVersion:
        """The current version of ``name``, or version ``number`` while it is retained."""
        if number is None:
            version = self.current(name)
        else:
            entry = self.etcd.get(self._key("versions", name, f"{number:012d}"))
            version = None if entry is None else ClusterVersion.from_json(entry.value)
        if version is None:
            what = f"dataset {name!r}" if number is None else f"version {number} of dataset {name!r}"
            raise DatasetNotFoundError(f"{what} not found in the cluster; list datasets with 'flightcache ls'")
        return version

    def datasets(self) -> list[ClusterVersion]:
        return [ClusterVersion.from_json(e.value) for e in self.etcd.prefix(self._key("datasets", ""))]

    def versions(self) -> list[ClusterVersion]:
        """Every version still readable, current or retained."""
        return [ClusterVersion.from_json(e.value) for e in self.etcd.prefix(self._key("versions", ""))]

    def publish(
        self,
        name: str,
        build: Callable[[ClusterVersion | None, int], ClusterVersion],
        *,
        txn: str | None = None,
    ) -> ClusterVersion:
        """Publish ``build(current, number)`` as the next version of ``name``, as one etcd transaction.

        ``build`` sees the current version (None: none) and the number to use; it raises to refuse
        (``mode: create`` on an existing name, an append of another schema). If another writer publishes
        first, the comparison fails and ``build`` runs again on what that writer published. With ``txn``,
        the same transaction ends the write transaction: its staged parts' keys go, its id is marked ended,
        and if it had ended already nothing is published.
        """
        next_key, current_key = self._key("next", name), self._key("datasets", name)
        for _ in range(PUBLISH_ATTEMPTS):
            next_entry, current_entry = self.etcd.get(next_key), self.etcd.get(current_key)
            number = int(next_entry.value) if next_entry is not None else 1
            current = ClusterVersion.from_json(current_entry.value) if current_entry is not None else None
            version = build(current, number)
            compare = [
                unchanged(next_key, next_entry.mod_revision if next_entry else 0),
                unchanged(current_key, current_entry.mod_revision if current_entry else 0),
            ]
            puts: list[tuple[str, Any, int | None]] = [
                (next_key, number + 1, None),
                (current_key, version.to_json(), None),
                (self._key("versions", name, f"{number:012d}"), version.to_json(), None),
            ]
            prefixes = []
            if txn is not None:
                compare.append(absent(self._key("txnend", txn)))
                puts.append((self._key("txnend", txn), {"ended": time.time(), "committed": True}, self._txn_lease()))
                prefixes.append(self._key("txn", txn, ""))
            if self.etcd.txn(compare, puts, delete_prefixes=prefixes):
                return version
            if txn is not None and self.ended(txn):
                raise InvalidRequestError(f"transaction {txn!r} has ended already (committed or aborted)")
        raise ServerUnavailableError(
            f"could not publish dataset {name!r}: {PUBLISH_ATTEMPTS} other writers published first; try again"
        )

    def drop(self, name: str) -> ClusterVersion:
        """Remove ``name`` and its versions from the catalog (their nodes free the parts)."""
        key = self._key("datasets", name)
        while True:
            entry = self.etcd.get(key)
            if entry is None:
                raise DatasetNotFoundError(f"dataset {name!r} not found in the cluster")
            if self.etcd.txn(
                [unchanged(key, entry.mod_revision)],
                deletes=[key],
                delete_prefixes=[self._key("versions", name, "")],
            ):
                return ClusterVersion.from_json(entry.value)

    def set_expires(self, name: str, expires: float | None) -> None:
        """Change the TTL's end of the current version (a compare-and-set; retried on a race)."""
        key = self._key("datasets", name)
        while True:
            entry = self.etcd.get(key)
            if entry is None:
                raise DatasetNotFoundError(f"dataset {name!r} not found in the cluster")
            version = replace(ClusterVersion.from_json(entry.value), expires=expires)
            vkey = self._key("versions", name, f"{version.number:012d}")
            if self.etcd.txn(
                [unchanged(key, entry.mod_revision)], [(key, version.to_json(), None), (vkey, version.to_json(), None)]
            ):
                return

    # -- write transactions --------------------------------------------------------------------

    def ended(self, txn: str) -> bool:
        return self.etcd.get(self._key("txnend", txn)) is not None

    def stage(self, txn: str, staged: StagedPart, lease: int) -> None:
        """Record a staged part; it goes with its node's lease (a dead node's parts cannot be committed)."""
        if not self.etcd.txn(
            [absent(self._key("txnend", txn))], [(self._key("txn", txn, staged.id), staged.to_json(), lease)]
        ):
            raise PutAbortedError(f"transaction {txn!r} has ended (committed or aborted); nothing was staged")

    def staged(self, txn: str) -> list[StagedPart]:
        """The parts staged under ``txn``, in the order they finished staging."""
        parts = [StagedPart.from_entry(e) for e in self.etcd.prefix(self._key("txn", txn, ""))]
        return sorted(parts, key=lambda p: (p.order, p.id))

    def end(self, txn: str) -> list[StagedPart]:
        """Abort ``txn``: its id is taken for an hour, its parts are freed by their nodes."""
        parts = self.staged(txn)
        self.etcd.txn(
            [absent(self._key("txnend", txn))],
            [(self._key("txnend", txn), {"ended": time.time(), "committed": False}, self._txn_lease())],
            delete_prefixes=[self._key("txn", txn, "")],
        )
        return parts

    def staged_parts(self) -> set[str]:
        """The local names of every staged part of every open transaction."""
        return {e.value["part"]["part"] for e in self.etcd.prefix(self._key("txn", ""))}

    def _txn_lease(self) -> int:
        return self.etcd.grant(TXN_SECONDS)

    # -- members --------------------------------------------------------------------------------

    def nodes(self) -> dict[str, Node]:
        return {n.id: n for n in (Node.from_json(e.value) for e in self.etcd.prefix(self._key("nodes", "")))}

    def announce(self, node: Node, lease: int) -> None:
        self.etcd.put(self._key("nodes", node.id), node.to_json(), lease=lease)

    def leave(self, node_id: str) -> None:
        self.etcd.delete(self._key("nodes", node_id))

    # -- collection -----------------------------------------------------------------------------

    def collect_versions(self, retain_seconds: float, now: float | None = None) -> list[ClusterVersion]:
        """Delete the records of versions replaced more than ``retain_seconds`` ago; the versions left."""
        now = time.time() if now is None else now
        by_name: dict[str, list[ClusterVersion]] = {}
        for v in self.versions():
            by_name.setdefault(v.name, []).append(v)
        currents = {v.name: v.number for v in self.datasets()}
        kept = []
        for name, versions in by_name.items():
            versions.sort(key=lambda v: v.number)
            for v, newer in zip(versions, [*versions[1:], None], strict=True):
                current = currents.get(name)
                replaced_at = newer.created if newer is not None else None
                stale = v.number != current and (replaced_at is None or now - replaced_at > retain_seconds)
                if stale and (current is None or v.number < current):
                    self.etcd.delete(self._key("versions", name, f"{v.number:012d}"))
                else:
                    kept.append(v)
        return kept


class Membership:
    """This node's place in the cluster: its lease kept alive, its record kept current, the members known.

    A thread renews the lease every third of ``lease_seconds`` and rewrites this node's record (memory,
    load). When the lease has expired (the node was stopped, or cut off from etcd longer than the lease),
    the node joins again under a new lease with the same id: its parts are still its own.
    """

    def __init__(
        self,
        catalog: ClusterCatalog,
        settings: ClusterSettings,
        describe: Callable[[], dict[str, Any]],
    ) -> None:
        self.catalog = catalog
        self.settings = settings
        self.id = settings.node_id or secrets.token_hex(4)
        self.describe = describe  # memory_used, memory_limit, datasets, in_flight of this node
        self.started = time.time()
        self._lease: int | None = None
        self._members: dict[str, Node] = {}
        self._members_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lease_renewals_failed = 0

    def node(self) -> Node:
        return Node(
            id=self.id,
            name=f"{self.settings.host}:{urlsplit(self.settings.advertise).port}",
            location=self.settings.advertise,
            host=self.settings.host,
            load=os.getloadavg()[0],
            started=self.started,
            **self.describe(),
        )

    def join(self) -> None:
        self._lease = self.catalog.etcd.grant(self.settings.lease_seconds)
        self.catalog.announce(self.node(), self._lease)
        self.refresh_members()
        log.info(
            "node %s joined the cluster at %s as %s", self.id, self.catalog.etcd.describe(), self.settings.advertise
        )
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cluster-lease")
        self._thread.start()

    @property
    def lease(self) -> int:
        assert self._lease is not None, "join the cluster first"
        return self._lease

    def _loop(self) -> None:
        every = max(0.2, self.settings.lease_seconds / 3)
        while not self._stop.wait(every):
            try:
                self.beat()
            except Exception as e:  # etcd unreachable: keep trying, the lease may yet hold
                self.lease_renewals_failed += 1
                log.warning("could not renew node %s's lease in etcd: %s", self.id, e)

    def beat(self) -> None:
        """Renew the lease (joining again if it expired), publish this node's figures, read the members."""
        if self._lease is None or not self.catalog.etcd.refresh(self._lease):
            log.warning("node %s's lease had expired (cut off from etcd?): joining the cluster again", self.id)
            self._lease = self.catalog.etcd.grant(self.settings.lease_seconds)
        self.catalog.announce(self.node(), self._lease)
        self.refresh_members()

    def refresh_members(self) -> dict[str, Node]:
        members = self.catalog.nodes()
        with self._lock:
            self._members, self._members_at = members, time.monotonic()
        return members

    def members(self, max_age: float | None = None) -> dict[str, Node]:
        """The live members, as read at most ``max_age`` seconds ago (default: a third of the lease)."""
        max_age = self.settings.lease_seconds / 3 if max_age is None else max_age
        with self._lock:
            if time.monotonic() - self._members_at <= max_age:
                return dict(self._members)
        return self.refresh_members()

    def find(self, node_id: str) -> Node | None:
        """The live member ``node_id``; a member missing from the view is looked up again (it may be new)."""
        node = self.members().get(node_id)
        return node if node is not None else self.refresh_members().get(node_id)

    def leave(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._lease is not None:
            try:
                self.catalog.etcd.revoke(self._lease)  # its member key and staged parts go at once
            except ServerUnavailableError as e:
                log.warning("could not leave the cluster cleanly (the lease will expire): %s", e)


def rendezvous(key: str, nodes: Iterable[Node]) -> Node | None:
    """The node that serves ``key`` when its own node is gone: the same on every node (highest random weight)."""
    import hashlib

    best: tuple[bytes, Node] | None = None
    for n in nodes:
        weight = hashlib.blake2b(f"{key}|{n.id}".encode(), digest_size=8).digest()
        if best is None or weight > best[0]:
            best = (weight, n)
    return None if best is None else best[1]
