"""The Flight face of a cluster node: every call for every dataset, answered from etcd and the parts.

A ``ClusterServer`` is a ``FlightcacheServer`` whose datasets are the cluster's (``cluster.py``):

* a put keeps its batches here, as a local part (``_fcparts/<id>``, persisted as the put asks), then
  publishes a version naming it in etcd; an append's version names the earlier parts too;
* a transaction's parts stay on the nodes that received them; the commit, on any node, publishes them
  all as one version;
* ``GetFlightInfo`` answers one or more endpoints per part, located at the node holding it, so a
  reader (Spark's ``preferredLocations``, the Python client) reads each part from its node, in parallel;
* ``DoGet`` serves a part held here, fetches it from its node for a reader that came to the wrong one,
  or, when that node has left the cluster, loads it from storage; a part that was only in a lost node's
  memory fails the read with ``DATA_LOST`` (never a partial result).

A background loop frees what no one can read any more: versions replaced more than ``retain_seconds``
ago, parts that no version and no open transaction names, datasets whose TTL ended.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from ..errors import (
    DataLostError,
    DatasetExistsError,
    DatasetNotFoundError,
    InvalidNameError,
    InvalidRequestError,
    NotImplementedByServerError,
    PutAbortedError,
    SchemaMismatchError,
    ServerUnavailableError,
)
from ..protocol import (
    AbortRequest,
    AdoptRequest,
    CommitRequest,
    LoadRequest,
    NameRequest,
    PersistRequest,
    PutOptions,
    ReadRequest,
    ShmRequest,
    Ticket,
    descriptor_name,
)
from ..sql.engine import SqlLimits
from .catalog import IN_STORAGE_ONLY, PERSISTED, VersionRecord
from .cluster import (
    PART_PREFIX,
    ClusterCatalog,
    ClusterSettings,
    ClusterVersion,
    Membership,
    Node,
    Part,
    StagedPart,
    rendezvous,
)
from .flight import FlightcacheServer, Service, _filter, _translated
from .operations import note
from .peers import Peers
from .sources import MANUAL, Policy, open_source
from .storage import redacted
from .store import StagedPut, Version
from .translate import translated_stream

log = logging.getLogger("flightcache.cluster")


class ClusterServer(FlightcacheServer):
    """A node of a cluster (``flightcache serve --cluster etcd://...``)."""

    def __init__(
        self,
        location: str,
        *,
        cluster: ClusterSettings,
        catalog: ClusterCatalog,
        sql: Service | None = None,
        sql_limits: SqlLimits | None = None,
        **kwargs: Any,
    ) -> None:
        from ..sql.service import SqlService

        # Set before the Flight server starts: a call may come at once.
        self.tables = ClusterTables(self, kwargs["cache"].batch_rows)
        if sql is None:
            sql = SqlService(self.tables, sql_limits)
        self.settings = cluster
        self.catalog = catalog
        self.peers = Peers(cluster.token, cluster.tls_ca or _own_certificate(kwargs))
        self._sequence = itertools.count()
        self._stored: set[str] = set()  # parts known to be in storage (they never leave it while named)
        self._named: set[str] = set()  # local parts some version or transaction has named (or that it published)
        self._stop = threading.Event()
        self.membership = Membership(catalog, cluster, self._describe)
        super().__init__(location, sql=sql, **kwargs)
        if cluster.advertise_port is None:  # --advertise grpc://HOST: this server's own port
            self.settings = cluster.with_port(self.port)
            self.membership.settings = self.settings
        self.membership.join()
        self._gc = threading.Thread(target=self._gc_loop, daemon=True, name="cluster-gc")
        self._gc.start()

    @property
    def id(self) -> str:
        return self.membership.id

    def _describe(self) -> dict[str, Any]:
        figures = self.figures()
        return {k: figures[k] for k in ("memory_used", "memory_limit", "datasets", "in_flight", "state")}

    def shutdown(self) -> None:
        self._leave()
        super().shutdown()

    def drain(self, grace: float) -> dict[str, Any]:
        summary = super().drain(grace)  # write-backs flushed first: the others then load its parts from storage
        self._leave()
        return summary

    def _leave(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self.membership.leave()
            self.peers.close()

    # -- reads -----------------------------------------------------------------------------

    @_translated
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> list[flight.FlightInfo]:
        members = self.membership.members()
        infos = []
        for version in self.catalog.datasets():
            try:
                infos.append(
                    self._cluster_info(
                        version, ReadRequest(version.name), flight.FlightDescriptor.for_path(version.name), members
                    )
                )
            except DataLostError:
                continue  # listed by the list action, with the part it lost
        return infos

    @_translated
    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        if self.sql is not None and self.sql.handles_descriptor(descriptor):
            return self.sql.get_flight_info(context, descriptor)
        name, command = descriptor_name(descriptor)
        request = ReadRequest.from_bytes(command) if command else ReadRequest(name)
        note(context, dataset=request.name)
        if request.endpoints is not None and request.endpoints < 1:
            raise InvalidRequestError(f"read request for {request.name!r}: endpoints must be at least 1")
        version = self.catalog.require(request.name, request.version)
        probe = Version(version.name, version.number, version.schema, (), 0, 0, version.created)
        self.store.check_read(probe, columns=request.columns, filter=_filter(request))
        return self._cluster_info(version, request, descriptor, self.membership.members())

    def _cluster_info(
        self,
        version: ClusterVersion,
        request: ReadRequest,
        descriptor: flight.FlightDescriptor,
        members: dict[str, Node],
    ) -> flight.FlightInfo:
        schema = version.schema
        if request.columns is not None:
            schema = pa.schema([schema.field(c) for c in request.columns], metadata=schema.metadata)
        exact = request.filter is None and request.filter_substrait is None
        total = max(1, version.nbytes)
        endpoints = []
        for part in version.parts:
            location = self._where(version, part, members)
            wanted = max(
                math.ceil(part.bytes / self.endpoint_bytes), math.ceil((request.endpoints or 1) * part.bytes / total)
            )
            n = max(1, min(part.batches, wanted))
            bounds = [round(i * part.batches / n) for i in range(n + 1)]
            for start, end in itertools.pairwise(bounds):
                ticket = Ticket(
                    version.name,
                    version.number,
                    start,
                    end,
                    request.columns,
                    request.filter,
                    request.filter_substrait,
                    part=part.part,
                    node=part.node,
                )
                endpoints.append(flight.FlightEndpoint(ticket.to_bytes(), [location]))
        if not endpoints:  # an empty version: one empty endpoint, read here
            endpoints.append(flight.FlightEndpoint(Ticket(version.name, version.number, 0, 0).to_bytes(), []))
        rows = version.num_rows if exact else -1
        nbytes = version.nbytes if exact and request.columns is None else -1
        return flight.FlightInfo(schema, descriptor, endpoints, rows, nbytes, ordered=True)

    def _where(self, version: ClusterVersion, part: Part, members: dict[str, Node]) -> str:
        """The location to read ``part`` at: its node, or, that node gone, the live node that loads it from storage."""
        owner = members.get(part.node) or self.membership.find(part.node)
        if owner is not None:
            return owner.location
        if not self._in_storage(part.part):
            raise self._lost(version.name, part.part, part.node, part.rows)
        substitute = rendezvous(part.part, members.values())
        if substitute is None:
            raise ServerUnavailableError("no node of the cluster is alive")  # not even this one: its lease lapsed
        return substitute.location

    def _in_storage(self, part: str) -> bool:
        if part in self._stored:
            return True
        storage = self.cache.storage
        if storage is None or storage.manifest(part, 1) is None:
            return False
        self._stored.add(part)
        return True

    def _lost(self, name: str, part: str, node: str, rows: int | None = None) -> DataLostError:
        held = f"part {part}" + (f" ({rows} rows)" if rows is not None else "")
        return DataLostError(
            f"dataset {name!r} cannot be read: its {held} was held only in the memory of node {node}, which "
            "left the cluster, and is not in storage; write the dataset again (persist: sync or async keeps a "
            "copy in storage that another node loads)"
        )

    @_translated
    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        if self.sql is not None and self.sql.handles_ticket(ticket.ticket):
            return self.sql.do_get(context, ticket)
        t = Ticket.from_bytes(ticket.ticket)
        note(context, dataset=t.name, version=t.version)
        if t.part is None or t.node is None:
            if t.start == t.end == 0:  # the endpoint of an empty version
                version = self.catalog.require(t.name, t.version)
                empty = Version(t.name, t.version, version.schema, (), 0, 0, version.created)
                return self._serve(context, t, empty)
            raise InvalidRequestError(f"a cluster node's ticket names a part; got {ticket.ticket[:200]!r}")
        if not t.part.startswith(PART_PREFIX):
            raise InvalidRequestError(f"ticket part {t.part!r} is not a part name")
        local = self._local_part(t)
        if local is not None:
            return self._serve(context, t, local)
        owner = self.membership.find(t.node)
        if owner is None:  # it left between the two looks
            return self._serve(context, t, self._local_part(t) or _never())
        note(context, proxied=owner.location)
        try:
            reader = self.peers.do_get(owner.location, ticket.ticket)
            schema = reader.schema
        except (ServerUnavailableError, flight.FlightUnavailableError):
            local = self._from_storage(t)  # the node died and this node's view of the members is behind
            if local is None:
                self._raise_if_gone(t)
                raise
            return self._serve(context, t, local)
        return flight.GeneratorStream(schema, translated_stream("do_get", _relay(reader)))

    def _local_part(self, t: Ticket) -> Version | None:
        """The part of ``t`` as held here (loaded from storage if evicted); None if its node should serve it."""
        assert t.part is not None and t.node is not None
        if self.store.record(t.part) is not None:
            return self.cache.get(t.part)
        if t.node != self.id and self.membership.find(t.node) is not None:
            return None
        local = self._from_storage(t)
        if local is None:
            raise self._lost(t.name, t.part, t.node)
        return local

    def _raise_if_gone(self, t: Ticket) -> None:
        """DATA_LOST if the node of ``t``'s part has left the cluster (as etcd says now), else return."""
        assert t.part is not None and t.node is not None
        if t.node not in self.membership.refresh_members():
            raise self._lost(t.name, t.part, t.node)

    def _from_storage(self, t: Ticket) -> Version | None:
        """Load a part of a node that left the cluster from storage; None if storage does not hold it."""
        assert t.part is not None
        storage = self.cache.storage
        if storage is None:
            return None
        with self.cache.locked(t.part):
            if self.store.record(t.part) is None:
                manifest = storage.manifest(t.part, 1)
                if manifest is None:
                    return None
                self.store.add_stored(
                    VersionRecord(t.part, 1, manifest.schema, manifest.rows, manifest.bytes, manifest.created)
                )
                log.info("loading part %s of %s from storage: its node %s left the cluster", t.part, t.name, t.node)
        return self.cache.get(t.part)

    def gather(self, name: str, number: int | None = None) -> Version:
        """A whole version as one ``Version``: the parts held here as they are, the others fetched (for SQL)."""
        version = self.catalog.require(name, number)
        batches: list[pa.RecordBatch] = []
        for part in version.parts:
            t = Ticket(name, version.number, 0, part.batches, part=part.part, node=part.node)
            local = self._local_part(t)
            if local is None:
                owner = self.membership.find(part.node)
                try:
                    if owner is None:
                        raise ServerUnavailableError(f"node {part.node} left the cluster")
                    local_table = self.peers.read_all(owner.location, t.to_bytes())
                    batches.extend(local_table.to_batches())
                    continue
                except ServerUnavailableError:
                    local = self._from_storage(t)
                    if local is None:
                        self._raise_if_gone(t)
                        raise
            batches.extend(local.batches)
        return Version(
            name, version.number, version.schema, tuple(batches), version.num_rows, version.nbytes, version.created
        )

    # -- writes ----------------------------------------------------------------------------

    def _begin_put(self, name: str, schema: pa.Schema, options: PutOptions) -> StagedPut:
        _check_name(name)
        if options.mode not in ("overwrite", "append", "create"):
            raise InvalidRequestError(f"unknown put mode {options.mode!r}; use overwrite, append or create")
        if options.txn is not None:
            if self.catalog.ended(options.txn):
                raise PutAbortedError(f"transaction {options.txn!r} has ended (committed, aborted or expired)")
            staged = self.catalog.staged(options.txn)
            if staged:
                _check_same_txn(options.txn, staged[0], name, options.mode, schema)
        if options.mode != "overwrite":
            _check_mode(self.catalog.current(name), name, options.mode, schema)
        return self.store.begin_put(f"{PART_PREFIX}{secrets.token_hex(8)}", schema, "create")

    def _finish_put(self, name: str, options: PutOptions, staged: StagedPut, rows: int) -> dict[str, Any]:
        persist = "none" if options.txn is not None else self.cache.persist_mode(options.persist)
        local = self.cache.publish(staged, persist=persist, ttl=options.ttl if persist != "none" else None)
        part = Part(local.name, self.id, local.num_rows, local.nbytes, len(local.batches), persist == "sync")
        try:
            if options.txn is not None:
                sid = f"{self.id}.{next(self._sequence):06d}"
                self.catalog.stage(
                    options.txn, StagedPart(sid, name, options.mode, staged.schema, part), self.membership.lease
                )
                return {"txn": options.txn, "part": sid, "rows": rows, "bytes": local.nbytes}
            expires = time.time() + options.ttl if options.ttl is not None and persist == "none" else None
            version = self.catalog.publish(
                name,
                lambda current, number: self._version(
                    name, options.mode, staged.schema, [part], current, number, expires
                ),
            )
        except (DatasetExistsError, SchemaMismatchError, InvalidRequestError, PutAbortedError):
            self.cache.drop(local.name)  # refused before anything was written to etcd: the part goes now
            raise
        # Any other failure (etcd unreachable mid-call, say) may have published it all the same: the
        # collector frees the part after gc_grace unless a version names it.
        self._named.add(local.name)
        return version.summary()

    def _version(
        self,
        name: str,
        mode: str,
        schema: pa.Schema,
        parts: list[Part],
        current: ClusterVersion | None,
        number: int,
        expires: float | None = None,
    ) -> ClusterVersion:
        _check_mode(current, name, mode, schema)
        if mode == "append" and current is not None:
            return ClusterVersion(name, number, current.schema, (*current.parts, *parts), time.time(), self.id, expires)
        return ClusterVersion(name, number, schema, tuple(parts), time.time(), self.id, expires)

    def _do_commit(self, context: flight.ServerCallContext, c: CommitRequest) -> dict[str, Any]:
        _check_name(c.name)
        if self.catalog.ended(c.txn):
            raise InvalidRequestError(f"transaction {c.txn!r} has ended already (committed or aborted)")
        staged = self.catalog.staged(c.txn)
        try:
            chosen = _choose(c.txn, staged, c.parts)
            for s in chosen:
                _check_same_txn(c.txn, s, c.name, c.mode, s.schema)
            schema = chosen[0].schema if chosen else c.arrow_schema()
            if schema is None:
                raise InvalidRequestError(
                    f"transaction {c.txn!r} has no parts: give the dataset's schema in the commit"
                )
            for s in chosen[1:]:
                if not s.schema.equals(schema, check_metadata=False):
                    raise SchemaMismatchError(f"part {s.id} of transaction {c.txn!r} has another schema than the first")
            persist = self.cache.persist_mode(c.persist)
            parts = [s.part for s in chosen]
            if persist != "none":
                self._on_parts(c.name, parts, "persist", {"wait": persist == "sync"})
                parts = [Part(p.part, p.node, p.rows, p.bytes, p.batches, persist == "sync") for p in parts]
            expires = time.time() + c.ttl if c.ttl is not None else None
            version = self.catalog.publish(
                c.name,
                lambda current, number: self._version(c.name, c.mode, schema, parts, current, number, expires),
                txn=c.txn,
            )
        except BaseException:
            self.catalog.end(c.txn)  # a refused commit ends the transaction (as on a single server)
            raise
        note(context, version=version.number, txn=c.txn)
        return version.summary()

    def _do_abort(self, context: flight.ServerCallContext, a: AbortRequest) -> dict[str, Any]:
        return {"txn": a.txn, "parts_discarded": len(self.catalog.end(a.txn))}

    # -- actions ---------------------------------------------------------------------------

    def _do_nodes(self, context: flight.ServerCallContext, _: None) -> list[dict[str, Any]]:
        members = self.membership.refresh_members()
        return [{**n.to_json(), "self": n.id == self.id} for _, n in sorted(members.items())]

    def _do_list(self, context: flight.ServerCallContext, _: None) -> list[dict[str, Any]]:
        members = self.membership.members()
        return [self._summary(v, members) for v in self.catalog.datasets()]

    def _do_info(self, context: flight.ServerCallContext, request: NameRequest) -> dict[str, Any]:
        if request.name.startswith(PART_PREFIX):
            return super()._do_info(context, request)  # a node asking about a part held here
        version = self.catalog.require(request.name)
        members = self.membership.members()
        info = self._summary(version, members)
        states = self._on_parts(version.name, list(version.parts), "info", {})
        for part, state in zip(info["parts"], states, strict=True):
            part["state"], part["pinned"], part["in_memory"] = state["state"], state["pinned"], state["in_memory"]
        info["state"] = _overall({p["state"] for p in info["parts"]})
        info["pinned"] = bool(info["parts"]) and all(p["pinned"] for p in info["parts"])
        return info

    def _summary(self, version: ClusterVersion, members: dict[str, Node]) -> dict[str, Any]:
        parts = []
        for p in version.parts:
            owner = members.get(p.node)
            parts.append(
                {
                    **p.to_json(),
                    "location": owner.location if owner else None,
                    "state": (PERSISTED if p.persisted else "memory-only") if owner else "node-gone",
                }
            )
        return {
            **version.summary(),
            "batches": sum(p.batches for p in version.parts),
            "created": version.created,
            "writer": version.writer,
            "expires": version.expires,
            "schema": version.schema.to_string(show_schema_metadata=False),
            "nodes": sorted({p.node for p in version.parts}),
            "parts": parts,
            "state": _overall({p["state"] for p in parts}),
        }

    def _on_parts(self, name: str, parts: list[Part], kind: str, body: dict[str, Any]) -> list[Any]:
        """Run action ``kind`` on each part at the node holding it (in parallel), in ``parts`` order."""
        members = self.membership.members()

        def one(part: Part) -> Any:
            request = {"name": part.part, **body}
            owner = members.get(part.node) or self.membership.find(part.node)
            if owner is None or owner.id == self.id:
                if owner is None and self._from_storage(Ticket(name, 0, 0, 0, part=part.part, node=part.node)) is None:
                    if kind == "info":
                        return {"state": "lost", "pinned": False, "in_memory": False}
                    raise self._lost(name, part.part, part.node, part.rows)
                spec_request = NameRequest(part.part) if kind != "persist" else PersistRequest(part.part, body["wait"])
                return self._actions[kind](None, spec_request)
            try:
                return self.peers.action(owner.location, kind, request)
            except ServerUnavailableError:
                if kind == "info":  # died, and its lease has not expired yet
                    return {"state": "node-unreachable", "pinned": False, "in_memory": False}
                raise

        if len(parts) <= 1:
            return [one(p) for p in parts]
        with ThreadPoolExecutor(max_workers=min(16, len(parts)), thread_name_prefix="cluster-call") as pool:
            return list(pool.map(one, parts))

    def _part_action(self, kind: str, request: NameRequest | PersistRequest, context: flight.ServerCallContext) -> Any:
        """``kind`` on a cluster dataset: on each of its parts, where they are; then its info."""
        if request.name.startswith(PART_PREFIX):
            return getattr(super(), f"_do_{kind}")(context, request)
        version = self.catalog.require(request.name)
        body = {"wait": request.wait} if isinstance(request, PersistRequest) else {}
        self._on_parts(version.name, list(version.parts), kind, body)
        return self._do_info(context, NameRequest(request.name))

    def _do_persist(self, context: flight.ServerCallContext, request: PersistRequest) -> dict[str, Any]:
        return self._part_action("persist", request, context)  # type: ignore[no-any-return]

    def _do_pin(self, context: flight.ServerCallContext, request: NameRequest) -> dict[str, Any]:
        return self._part_action("pin", request, context)  # type: ignore[no-any-return]

    def _do_unpin(self, context: flight.ServerCallContext, request: NameRequest) -> dict[str, Any]:
        return self._part_action("unpin", request, context)  # type: ignore[no-any-return]

    def _do_evict(self, context: flight.ServerCallContext, request: NameRequest) -> dict[str, Any]:
        return self._part_action("evict", request, context)  # type: ignore[no-any-return]

    def _do_drop(self, context: flight.ServerCallContext, request: NameRequest) -> dict[str, Any]:
        _check_name(request.name)
        version = self.catalog.drop(request.name)
        note(context, version=version.number, bytes=version.nbytes)
        return {"name": version.name, "version": version.number, "bytes": version.nbytes}

    def _do_shm(self, context: flight.ServerCallContext, request: ShmRequest) -> dict[str, Any]:
        if request.name.startswith(PART_PREFIX) and self.store.record(request.name) is not None:
            return self._shm(request)  # a client on this host maps a part held here
        # A dataset is in parts, perhaps on several nodes: the client maps each part at its node, or streams. A
        # part not held here (another node's, or a dead node's): the client streams it, and do_get proxies it,
        # loads it from storage or says it is lost.
        return {"name": request.name, "files": None, "enabled": True}

    def _do_load(self, context: flight.ServerCallContext, request: LoadRequest) -> Iterator[bytes]:
        """A snapshot of external Parquet (or an Iceberg table) read by this node and published as one of its
        parts, as a put to it would be. Following the source needs a tracker every node agrees on: not yet."""
        _check_name(request.name)
        if Policy.parse(request.refresh, request.refresh_min_interval).mode != MANUAL:
            raise NotImplementedByServerError(
                f"load of {request.name!r}: refresh policy {request.refresh!r} is not in cluster mode yet (only "
                "'manual'); load it again to take what changed, or load it on a standalone server"
            )
        note(context, dataset=request.name, mode=request.mode)
        source = open_source(request.uri, s3_endpoint=self.cache.s3_endpoint_for(request.uri))
        table = source.read(source.listing(), None, None)
        summary = self.tables.put(
            request.name,
            table.schema,
            table.to_batches(max_chunksize=self.tables.batch_rows),
            mode=request.mode,
            persist=request.persist,
            ttl=request.ttl,
        )
        log.info("loaded %s v%s from %s", request.name, summary.get("version"), redacted(request.uri))
        return iter([json.dumps(summary).encode()])  # read before returning: errors are translated as any call's

    def _do_refresh(self, context: flight.ServerCallContext, request: NameRequest) -> dict[str, Any]:
        raise NotImplementedByServerError(_NOT_IN_CLUSTER.format("refresh"))

    def _do_adopt(self, context: flight.ServerCallContext, request: AdoptRequest) -> dict[str, Any]:
        if request.path is None:  # asked for a file: no file, so the client streams its put (protocol §9.1)
            return {"name": request.name, "path": None}
        raise NotImplementedByServerError(_NOT_IN_CLUSTER.format("adopt (same-host puts)"))

    def stats(self) -> dict[str, Any]:
        members = self.membership.members()
        return {
            **super().stats(),
            "cluster": {
                "node": self.id,
                "advertise": self.settings.advertise,
                "etcd": self.catalog.etcd.describe(),
                "members": len(members),
                "lease_renewals_failed": self.membership.lease_renewals_failed,
            },
        }

    # -- collection ------------------------------------------------------------------------

    def _gc_loop(self) -> None:
        while not self._stop.wait(self.settings.gc_seconds):
            try:
                self.collect()
            except Exception as e:  # etcd unreachable, say: try again next round
                log.warning("cluster collection failed: %s", e)

    def collect(self) -> dict[str, int]:
        """Free versions replaced long enough ago, the parts no one names, datasets whose TTL ended."""
        now = time.time()
        dropped = 0
        for version in self.catalog.datasets():
            if version.expires is not None and version.expires < now:
                try:
                    self.catalog.drop(version.name)
                    dropped += 1
                except DatasetNotFoundError:
                    pass
        kept = self.catalog.collect_versions(self.store.retain_seconds, now)
        named = {p.part for v in kept for p in v.parts} | self.catalog.staged_parts()
        freed = 0
        held = self.store.list()
        self._named |= named & {info.name for info in held}
        for info in held:
            if not info.name.startswith(PART_PREFIX) or info.name in named:
                continue
            # A part never seen named may be one whose publish is on its way: it gets gc_grace to be named.
            if info.name in self._named or now - info.created > self.settings.gc_grace:
                try:
                    self.cache.drop(info.name)
                    freed += 1
                except DatasetNotFoundError:
                    pass
                self._stored.discard(info.name)
                self._named.discard(info.name)
        return {"datasets_expired": dropped, "parts_freed": freed}


_NOT_IN_CLUSTER = "{} is not available in cluster mode yet; run it on a single server"


class ClusterTables:
    """What SQL on a node reads and writes: the cluster's datasets (``sql.engine.Tables``)."""

    def __init__(self, node: ClusterServer, batch_rows: int) -> None:
        self.node = node
        self.batch_rows = batch_rows

    def get(self, name: str, version: int | None = None, *, count: bool = False) -> Version:
        return self.node.gather(name, version)

    def schemas(self) -> list[tuple[str, pa.Schema]]:
        return sorted((v.name, v.schema) for v in self.node.catalog.datasets())

    def put(
        self,
        name: str,
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        *,
        mode: str,
        persist: str | None,
        ttl: float | None,
    ) -> dict[str, Any]:
        """``sql ... into``: a part on this node, published as a put of this node publishes it."""
        options = PutOptions(name=name, mode=mode, persist=persist, ttl=ttl)
        staged = self.node._begin_put(name, schema, options)
        rows = 0
        try:
            for batch in batches:
                staged.add(batch)
                rows += batch.num_rows
            return self.node._finish_put(name, options, staged, rows)
        except BaseException:
            staged.abort()
            raise


def _check_name(name: str) -> None:
    if name.startswith(PART_PREFIX):
        raise InvalidNameError(f"dataset names starting with {PART_PREFIX!r} are the cluster's own; choose another")


def _check_mode(current: ClusterVersion | None, name: str, mode: str, schema: pa.Schema) -> None:
    if mode == "create" and current is not None:
        raise DatasetExistsError(f"dataset {name!r} exists (version {current.number}); use mode overwrite or append")
    if mode == "append" and current is not None and not current.schema.equals(schema, check_metadata=False):
        raise SchemaMismatchError(
            f"cannot append to dataset {name!r}: its schema is {current.schema.to_string(show_schema_metadata=False)}, "
            f"the put's is {schema.to_string(show_schema_metadata=False)}"
        )


def _check_same_txn(txn: str, first: StagedPart, name: str, mode: str, schema: pa.Schema) -> None:
    if first.name != name or first.mode != mode:
        raise InvalidRequestError(
            f"transaction {txn!r} writes dataset {first.name!r} in mode {first.mode!r}, not {name!r} in mode {mode!r}"
        )
    if not first.schema.equals(schema, check_metadata=False):
        raise SchemaMismatchError(f"a part of transaction {txn!r} has another schema than its first part")


def _choose(txn: str, staged: list[StagedPart], wanted: list[str] | None) -> list[StagedPart]:
    if wanted is None:
        return staged
    by_id = {s.id: s for s in staged}
    if unknown := [p for p in wanted if p not in by_id]:
        raise InvalidRequestError(
            f"transaction {txn!r} has no staged parts {unknown[:5]}: their node left the cluster, or they never "
            "finished staging; nothing was published, write the job again"
        )
    if len(set(wanted)) != len(wanted):
        raise InvalidRequestError(f"transaction {txn!r}: a part is listed twice in the commit")
    return [by_id[p] for p in wanted]


def _overall(states: set[str]) -> str:
    """One state for a dataset from its parts' states: the weakest one."""
    weakest_first = ("lost", "node-gone", "node-unreachable", "persist-failed", "memory-only", "persisting")
    for state in (*weakest_first, IN_STORAGE_ONLY, PERSISTED):
        if state in states:
            return state
    return "memory-only" if not states else sorted(states)[0]


def _never() -> Version:
    raise AssertionError("a part whose node left is served here or reported lost")


def _relay(reader: flight.FlightStreamReader) -> Iterator[pa.Table]:
    """The batches another node sends, passed on (one-batch tables: a GeneratorStream sends their dictionaries)."""
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        if chunk.data is not None:
            yield pa.Table.from_batches([chunk.data])


def _own_certificate(kwargs: dict[str, Any]) -> bytes | None:
    """This node's certificate, as the CA of the others' when none is given (one certificate for the cluster)."""
    pairs = kwargs.get("tls_certificates") or []
    return bytes(pairs[0].cert) if pairs else None
