"""Flight handlers: decode the request, call the store, encode the answer, translate errors once.

A put streams into a ``StagedPut`` and becomes visible only when the stream ended cleanly: a
client that disconnects mid-stream looks to ``reader`` like a normal end of stream, so the call
context's ``is_cancelled()`` is checked before anything is published.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from .. import __version__
from ..errors import InvalidRequestError, PutAbortedError
from ..protocol import (
    ACTIONS,
    CORE,
    HEALTHCHECK,
    SQL,
    WRITE,
    AbortRequest,
    AdoptRequest,
    CommitRequest,
    EndOfStream,
    LoadRequest,
    NameRequest,
    PersistRequest,
    PutOptions,
    ReadRequest,
    ShmRequest,
    Ticket,
    descriptor_name,
    encode_schema,
)
from .adopt import adopt
from .arrays import batch_nbytes
from .auth import MIDDLEWARE_KEY as AUTH_KEY
from .auth import Auth, Limits, require_write, server_options
from .cache import Cache
from .catalog import PERSIST_FAILED
from .operations import MIDDLEWARE_KEY, Operations, draining_error, note
from .storage import redacted
from .store import StagedPut, Version
from .translate import flight_error, translated_stream

if TYPE_CHECKING:
    import pyarrow.compute as pc  # loaded where a filter is used: ~8 MiB an idle server does without

log = logging.getLogger("flightcache.server")

DEFAULT_ENDPOINT_BYTES = 128 * 1024 * 1024
DEFAULT_MAX_ENDPOINTS = 64

F = TypeVar("F", bound=Callable[..., Any])


class Service(Protocol):
    """Another Flight service sharing the port (SQL): it claims the requests it recognises."""

    def handles_descriptor(self, descriptor: flight.FlightDescriptor) -> bool: ...
    def handles_ticket(self, ticket: bytes) -> bool: ...
    def handles_action(self, action_type: str) -> bool: ...
    def get_flight_info(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> Any: ...
    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> Any: ...
    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None: ...
    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterable[bytes]: ...


def _translated(fn: F) -> F:
    """Run a handler; turn every exception into the Flight error a client should see."""

    @functools.wraps(fn)
    def wrapper(self: FlightcacheServer, context: flight.ServerCallContext, *args: Any) -> Any:
        note(context, peer=context.peer())
        try:
            return fn(self, context, *args)
        except Exception as e:
            raise flight_error(fn.__name__, e) from None

    return wrapper  # type: ignore[return-value]


class FlightcacheServer(flight.FlightServerBase):
    """The Flight face of a ``Cache``: decodes requests, calls the cache, encodes answers, translates errors.

    Built by ``config.build_server`` from a ``ServerConfig``; its collaborators come ready-made: the
    ``cache`` (memory store and storage tier), the ``sql`` service sharing the port (None: no SQL),
    ``auth`` (the credentials every call must carry; None: open to anyone who reaches the port) and
    ``limits`` (request bounds). For TLS, a ``grpc+tls://`` location and ``tls_certificates``.
    """

    def __init__(
        self,
        location: str,
        *,
        cache: Cache,
        sql: Service | None,
        auth: Auth | None = None,
        limits: Limits | None = None,
        endpoint_bytes: int = DEFAULT_ENDPOINT_BYTES,
        max_endpoints: int = DEFAULT_MAX_ENDPOINTS,
        middleware: Mapping[str, flight.ServerMiddlewareFactory] | None = None,
        **kwargs: Any,
    ) -> None:
        self.ops = Operations(set(ACTIONS))
        # Authentication first: Flight completes none of the middlewares started before one that refuses a
        # call, so the operations middleware (in-flight count, request log) hears of refusals through on_refused.
        security = server_options(auth, on_refused=self.ops.refused)
        extra = dict(middleware or {})
        if taken := {MIDDLEWARE_KEY, AUTH_KEY} & set(extra):
            raise ValueError(f"middleware keys {sorted(taken)} are flightcache's own; name yours differently")
        middleware = {**security.pop("middleware", {}), MIDDLEWARE_KEY: self.ops, **extra}
        # Everything a handler uses is set before the base class starts serving: a call may come at once.
        self.auth = auth
        self.limits = limits or Limits()
        self.cache = cache
        self.store = cache.store
        self.endpoint_bytes = endpoint_bytes
        self.sql = sql  # SQL over cached datasets, routed below
        self.max_endpoints = max_endpoints
        self._actions = self._action_handlers()
        self._counters_lock = threading.Lock()
        self._counters: dict[str, int] = {
            "gets": 0,
            "puts": 0,
            "puts_aborted": 0,
            "bytes_served": 0,
            "bytes_received": 0,
            "shm_reads": 0,
        }
        self.started = time.time()
        super().__init__(location, middleware=middleware, **security, **kwargs)

    def shutdown(self) -> None:
        """Stop serving, then flush pending write-backs."""
        super().shutdown()
        self.cache.close(flush=True)

    def drain(self, grace: float) -> dict[str, Any]:
        """Refuse new calls, give the calls in flight ``grace`` seconds, flush write-backs, stop serving.

        Calls still running after ``grace`` (a reader that stopped reading, say) are left running:
        the Flight server would wait for them without bound, so it is stopped only when none are
        left (``cut`` is 0); else the caller ends them by exiting the process.
        """
        started, before = time.monotonic(), self.cache.stats()
        finished, cut = self.ops.drain(grace)
        self.cache.close(flush=True)
        if not cut:
            super().shutdown()
        after = self.cache.stats()
        return {
            "finished": finished,
            "cut": cut,
            "flushed": after["writebacks_done"] - before["writebacks_done"],
            "flush_failed": after["writebacks_failed"] - before["writebacks_failed"],
            "persist_failed": after["states"][PERSIST_FAILED],
            "seconds": round(time.monotonic() - started, 3),
        }

    def _count(self, **amounts: int) -> None:
        with self._counters_lock:
            for key, n in amounts.items():
                self._counters[key] += n

    # -- reads -----------------------------------------------------------------------------

    @_translated
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> list[flight.FlightInfo]:
        infos = []
        for info in self.store.list():
            version = self.store.current(info.name)
            if version is None:
                continue  # in storage only: listed by the list action, not loaded by a listing
            infos.append(
                self._flight_info(version, ReadRequest(info.name), flight.FlightDescriptor.for_path(info.name))
            )
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
        version = self.cache.get(request.name, request.version, count=True)
        # Fail now, not in do_get, on unknown columns or a filter that does not bind.
        self.store.check_read(version, columns=request.columns, filter=_filter(request))
        return self._flight_info(version, request, descriptor)

    def _flight_info(
        self, version: Version, request: ReadRequest, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        schema = version.schema
        if request.columns is not None:
            schema = pa.schema([schema.field(c) for c in request.columns], metadata=schema.metadata)
        exact = request.filter is None and request.filter_substrait is None
        endpoints = [
            flight.FlightEndpoint(
                Ticket(
                    version.name, version.number, start, end, request.columns, request.filter, request.filter_substrait
                ).to_bytes(),
                [],  # no location: read it from this same server
            )
            for start, end in version.batch_ranges(self.endpoint_bytes, self.max_endpoints, request.endpoints or 1)
        ]
        rows = version.num_rows if exact else -1
        nbytes = version.nbytes if exact and request.columns is None else -1
        return flight.FlightInfo(schema, descriptor, endpoints, rows, nbytes, ordered=True)  # concatenate in order

    @_translated
    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        if self.sql is not None and self.sql.handles_ticket(ticket.ticket):
            return self.sql.do_get(context, ticket)
        t = Ticket.from_bytes(ticket.ticket)
        note(context, dataset=t.name, version=t.version)
        return self._serve(context, t, self.cache.get(t.name, t.version))

    def _serve(self, context: flight.ServerCallContext, t: Ticket, version: Version) -> flight.FlightDataStream:
        """Stream the batches of ``version`` that ticket ``t`` selects."""
        request = t.read_request()
        expression = _filter(request)
        if expression is not None:  # a ticket is client bytes: fail here, not mid-stream, if the filter is wrong
            self.store.check_read(version, columns=t.columns, filter=expression)
        reader = self.store.scan(version, columns=t.columns, filter=expression, batch_range=(t.start, t.end))
        self._count(gets=1)
        if expression is None:  # what will be sent is known: stream the stored batches with no Python per batch
            batches = version.batches[t.start : t.end]
            if t.columns is not None:
                batches = tuple(b.select(t.columns) for b in batches)
            served = sum(batch_nbytes(b) for b in batches)
            self._served(version.name, served)
            note(context, rows=sum(b.num_rows for b in batches), bytes=served)
            return flight.RecordBatchStream(reader)
        # A GeneratorStream, so that an error while filtering reaches the client with its code (translate.py).
        return flight.GeneratorStream(reader.schema, translated_stream("do_get", self._counting(reader, version.name)))

    def _counting(self, reader: pa.RecordBatchReader, name: str) -> Iterator[pa.Table]:
        """A filtered read's batches, their bytes counted as served when the stream ends or is cut (not in
        the request log: the call may be over by then). Each is yielded as a one-batch table: a GeneratorStream
        sends a table's dictionaries, a bare batch's not (measured with pyarrow 26: the client then fails)."""
        nbytes = 0
        try:
            for batch in reader:
                if batch.num_rows == 0:
                    continue
                nbytes += batch_nbytes(batch)
                yield pa.Table.from_batches([batch])
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            # The filter bound to the schema but fails on a value (divide_checked by a zero, say).
            raise InvalidRequestError(f"cannot apply the filter to dataset {name!r}: {e}") from e
        finally:
            self._served(name, nbytes)

    def _served(self, name: str, nbytes: int) -> None:
        self._count(bytes_served=nbytes)
        self.store.count(name, bytes_served=nbytes)

    # -- writes ----------------------------------------------------------------------------

    @_translated
    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        if self.sql is not None and self.sql.handles_descriptor(descriptor):
            return self.sql.do_put(context, descriptor, reader, writer)  # binds query parameters: a read
        name, command = descriptor_name(descriptor)
        require_write(context, f"put of dataset {name!r}")
        options = PutOptions.from_bytes(command) if command else None
        first = _next_chunk(reader)
        carrier = None  # the message whose app_metadata held the options: never the end-of-stream message
        if options is None:
            meta = first.app_metadata if first is not None else None
            options = PutOptions.from_bytes(meta.to_pybytes()) if meta is not None and meta.size else PutOptions()
            carrier = first
        if options.name is not None and options.name != name:
            raise InvalidRequestError(f"put options name {options.name!r} differs from the descriptor's {name!r}")
        note(context, dataset=name, mode=options.mode, txn=options.txn)
        if options.txn is None or options.persist is not None:  # a part's persistence is its commit's
            self.cache.check_storable(name, reader.schema, options.persist)  # at the first message, not after the data
        staged = self._begin_put(name, reader.schema, options)
        rows = received = 0
        ended: EndOfStream | None = None
        try:
            chunk = first
            while chunk is not None:
                if chunk.data is not None:
                    if ended is not None:
                        raise InvalidRequestError(f"put of dataset {name!r} sent data after its end-of-stream message")
                    received += batch_nbytes(chunk.data)
                    self.limits.check_put(name, received)
                    staged.add(chunk.data)
                    rows += chunk.data.num_rows
                elif options.trailer and chunk is not carrier and chunk.app_metadata is not None:
                    ended = EndOfStream.from_bytes(chunk.app_metadata.to_pybytes())
                chunk = _next_chunk(reader)
            if context.is_cancelled():
                raise PutAbortedError(
                    f"put of dataset {name!r} was cancelled by the client after {rows} rows; nothing was published"
                )
            if options.trailer and (ended is None or ended.rows != rows):
                raise PutAbortedError(
                    f"put of dataset {name!r} ended after {rows} rows without the client's end-of-stream "
                    "message (its data source failed?); nothing was published"
                )
            if options.expect_rows is not None and options.expect_rows != rows:
                raise PutAbortedError(
                    f"put of dataset {name!r} ended after {rows} of the {options.expect_rows} rows "
                    "the client announced; nothing was published, send it again"
                )
            result = self._finish_put(name, options, staged, rows)
        except BaseException:
            staged.abort()
            self._count(puts_aborted=1)
            raise
        self._count(puts=1, bytes_received=staged.nbytes)
        note(context, rows=rows, bytes=staged.nbytes, version=result.get("version"))
        writer.write(pa.py_buffer(json.dumps(result).encode()))

    def _begin_put(self, name: str, schema: pa.Schema, options: PutOptions) -> StagedPut:
        """Where a put's batches go while they arrive (checks the mode against the dataset first)."""
        return self.store.begin_put(name, schema, options.mode)

    def _finish_put(self, name: str, options: PutOptions, staged: StagedPut, rows: int) -> dict[str, Any]:
        """Publish a put that arrived whole (or stage it as a transaction's part); the put's answer."""
        if options.txn is not None:
            return {"txn": options.txn, "part": staged.stage(options.txn), "rows": rows, "bytes": staged.nbytes}
        return self.cache.publish(staged, persist=options.persist, ttl=options.ttl).summary()

    # -- actions ---------------------------------------------------------------------------

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return [(a.name, a.describe()) for a in ACTIONS.values() if a.service == CORE or self.sql is not None]

    @_translated
    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterable[bytes]:
        body = action.body.to_pybytes() if action.body is not None else b""
        kind = action.type
        note(context, action=kind[:100])  # the client's string: bounded in the log
        if self.ops.draining and kind != HEALTHCHECK:
            raise draining_error()
        self.limits.check_action(kind, body)
        spec = ACTIONS.get(kind)
        if spec is None or (spec.service == SQL and self.sql is None):
            if self.sql is not None and self.sql.handles_action(kind):
                return list(self.sql.do_action(context, action))  # Flight SQL actions it declines, with the reason
            raise InvalidRequestError(f"unknown action {kind!r}; the actions are: {', '.join(ACTIONS)}")
        if spec.role == WRITE:
            require_write(context, f"action {kind!r}")
        if spec.service == SQL:
            assert self.sql is not None
            return list(self.sql.do_action(context, action))
        results = self._actions[kind](context, spec.decode(body))
        if spec.streams:
            return results  # type: ignore[no-any-return]  # an iterator of encoded results
        if isinstance(results, dict) and isinstance(results.get("name"), str):
            note(context, dataset=results["name"])
        return [json.dumps(results).encode()]

    def _action_handlers(self) -> dict[str, Callable[[flight.ServerCallContext, Any], Any]]:
        """The handler of each core action of the registry, checked complete when the server is built."""
        handlers = {name: getattr(self, f"_do_{name}", None) for name, a in ACTIONS.items() if a.service == CORE}
        if missing := sorted(name for name, fn in handlers.items() if fn is None):
            raise AssertionError(f"actions {missing} are declared in protocol.ACTIONS with no handler")
        return handlers  # type: ignore[return-value]

    def _do_healthcheck(self, context: flight.ServerCallContext, _: None) -> dict[str, Any]:
        result = self.health()
        result["in_flight"] -= 1  # not this call
        return result

    def _do_stats(self, context: flight.ServerCallContext, _: None) -> dict[str, Any]:
        result = self.stats()
        result["in_flight"] -= 1
        return result

    def _do_nodes(self, context: flight.ServerCallContext, _: None) -> list[dict[str, Any]]:
        """A single server is a cluster of one: no location (read it where you asked), no host."""
        alone = {"id": "standalone", "name": "standalone", "location": None, "host": None}
        return [{**alone, **self.figures(), "self": True}]

    def figures(self) -> dict[str, Any]:
        """This server's memory, load and state, as ``nodes`` reports each member."""
        s = self.store.stats()
        return {
            "memory_used": s["memory_used"],
            "memory_limit": s["memory_limit"],
            "datasets": s["datasets"],
            "load": round(os.getloadavg()[0], 2),
            "in_flight": max(0, self.ops.in_flight - 1),  # not the call asking
            "state": "draining" if self.ops.draining else "up",
            "started": self.started,
        }

    def _do_drop(self, context: flight.ServerCallContext, request: NameRequest) -> dict[str, Any]:
        result = self.cache.drop(request.name)
        note(context, version=result["version"], bytes=result["bytes"])
        return result

    def _do_load(self, context: flight.ServerCallContext, request: LoadRequest) -> Iterator[bytes]:
        note(context, dataset=request.name, uri=redacted(request.uri))
        return self._load(request)

    def _do_refresh(self, context: flight.ServerCallContext, request: NameRequest) -> dict[str, Any]:
        return self.cache.sources.refresh(request.name)

    def _do_persist(self, context: flight.ServerCallContext, request: PersistRequest) -> dict[str, Any]:
        return self.cache.persist(request.name, wait=request.wait)

    def _do_pin(self, context: flight.ServerCallContext, request: NameRequest) -> dict[str, Any]:
        self.cache.get(request.name)  # pinning keeps it in memory, so bring it there first
        self.store.set_pinned(request.name, True)
        return self.cache.info(request.name)

    def _do_unpin(self, context: flight.ServerCallContext, request: NameRequest) -> dict[str, Any]:
        self.store.set_pinned(request.name, False)
        return self.cache.info(request.name)

    def _do_evict(self, context: flight.ServerCallContext, request: NameRequest) -> dict[str, Any]:
        return self.cache.evict(request.name)

    def _do_info(self, context: flight.ServerCallContext, request: NameRequest) -> dict[str, Any]:
        return self.cache.info(request.name)

    def _do_list(self, context: flight.ServerCallContext, _: None) -> list[dict[str, Any]]:
        return self.cache.list()

    def _do_shm(self, context: flight.ServerCallContext, request: ShmRequest) -> dict[str, Any]:
        return self._shm(request)

    def _do_adopt(self, context: flight.ServerCallContext, request: AdoptRequest) -> dict[str, Any]:
        note(context, dataset=request.name, mode=request.mode, txn=request.txn)
        try:
            result = adopt(self.cache, self.limits, request)
        except BaseException:
            self._count(puts_aborted=1)  # a same-host put refused, as a streamed one would count
            raise
        if "bytes" in result:
            self._count(puts=1, bytes_received=result["bytes"])
            note(context, rows=result["rows"], bytes=result["bytes"], version=result.get("version"))
        return result

    def _do_commit(self, context: flight.ServerCallContext, c: CommitRequest) -> dict[str, Any]:
        version = self.cache.commit(
            c.txn, c.name, c.mode, parts=c.parts, schema=c.arrow_schema(), persist=c.persist, ttl=c.ttl
        )
        note(context, version=version.number, txn=c.txn)
        return version.summary()

    def _do_abort(self, context: flight.ServerCallContext, a: AbortRequest) -> dict[str, Any]:
        return {"txn": a.txn, "parts_discarded": self.store.abort(a.txn)}

    def _shm(self, request: ShmRequest) -> dict[str, Any]:
        """The shared-memory files of a version still held (loading it on a miss), or "files": null."""
        shm = self.cache.shm
        if shm is None:
            return {"name": request.name, "files": None, "enabled": False}
        # A hit, or a miss that loads it; a client that falls back to do_get adds a hit of its own.
        version = self.cache.get(request.name, request.version, count=True)
        files = shm.describe(version.files) if version.in_files else None
        if files is not None:  # a fallback to do_get counts its own
            self._count(gets=1, shm_reads=1, bytes_served=version.nbytes)
            self.store.count(version.name, bytes_served=version.nbytes)
        return {
            "name": version.name,
            "version": version.number,
            "rows": version.num_rows,
            "batches": len(version.batches),
            "schema": encode_schema(version.schema),
            "files": files,
        }

    def _load(self, request: LoadRequest) -> Iterator[bytes]:
        """Run a load in a worker thread, streaming {"progress": ...} results, then the summary."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue()

        def run() -> None:
            try:
                version = self.cache.load(
                    request.name,
                    request.uri,
                    mode=request.mode,
                    persist=request.persist,
                    ttl=request.ttl,
                    refresh=request.refresh,
                    refresh_min_interval=request.refresh_min_interval,
                    progress=lambda done, total: events.put(("progress", {"files_done": done, "files": total})),
                )
                events.put(("done", version))
            except Exception as e:
                events.put(("error", e))

        threading.Thread(target=run, daemon=True, name=f"load-{request.name}").start()
        while True:
            kind, value = events.get()
            if kind == "progress":
                yield json.dumps({"progress": value}).encode()
            elif kind == "error":
                raise flight_error("load", value)
            else:
                log.info("loaded %s v%d from %s", value.name, value.number, redacted(request.uri))
                yield json.dumps(value.summary()).encode()
                return

    def stats(self) -> dict[str, Any]:
        with self._counters_lock:
            counters = dict(self._counters)
        return {
            **self.cache.stats(),
            **counters,
            "uptime_s": round(time.time() - self.started, 3),
            "in_flight": self.ops.in_flight,
            "draining": self.ops.draining,
            "requests": self.ops.requests.snapshot(),
        }

    def health(self) -> dict[str, Any]:
        """What an orchestrator's health check needs (the healthcheck action, answered while draining)."""
        s = self.cache.stats()
        return {
            "status": "draining" if self.ops.draining else "ok",
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 3),
            "memory_used": s["memory_used"],
            "memory_limit": s["memory_limit"],
            "datasets": s["datasets"],
            "pending_persists": s["pending_persists"],
            "in_flight": self.ops.in_flight,
            "draining": self.ops.draining,
        }


def _next_chunk(reader: flight.MetadataRecordBatchReader) -> flight.FlightStreamChunk | None:
    try:
        return reader.read_chunk()
    except StopIteration:
        return None


def _filter(request: ReadRequest) -> pc.Expression | None:
    if request.filter is not None and request.filter_substrait is not None:
        raise InvalidRequestError("give either filter or filter_substrait, not both")
    if request.filter is not None:
        from ..filters import parse_filter

        return parse_filter(request.filter)
    raw = request.substrait_bytes()
    if raw is None:
        return None
    import pyarrow.compute as pc

    try:
        bound = pc.Expression.from_substrait(raw)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise InvalidRequestError(f"filter_substrait of dataset {request.name!r} is not a valid expression: {e}") from e
    return bound  # bound by field index to the version's full schema; Store.scan checks it
