"""Client-side DuckDB: query a flightcache server's datasets from a local DuckDB connection.

    import duckdb, flightcache
    from flightcache.integrations.duck import attach

    con = duckdb.connect()
    attach(con, flightcache.connect("grpc://127.0.0.1:8815"))
    con.sql('SELECT status, count(*) FROM "logs/raw" WHERE method = \\'GET\\' GROUP BY ALL')

Each dataset is registered as a ``pyarrow.dataset`` whose ``scanner()`` DuckDB calls with the columns
and the filter the query needs; the scan then reads exactly those columns from the server, with the
filter applied there (sent as Substrait), streaming. Nothing is read at ``attach``: the schemas come
from one catalog request (Flight SQL GetTables), so datasets that only storage holds are not loaded
until a query reads them. Every scan reads the dataset's current version.

(The module is not named ``duckdb`` so that it can never shadow the real package.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight

from .. import flightsql as fsql
from ..client import Client

log = logging.getLogger("flightcache.integrations.duck")


def attach(con: duckdb.DuckDBPyConnection, client: Client, names: Iterable[str] | None = None) -> list[str]:
    """Make the server's datasets (all, or ``names``) tables of ``con`` under their names; returns the names.

    Quote names with ``/`` in SQL: ``SELECT * FROM "logs/raw"``. Attach again to see datasets created since.
    """
    schemas = remote_schemas(client)
    wanted = list(schemas) if names is None else list(names)
    missing = [n for n in wanted if n not in schemas]
    if missing:
        from ..errors import DatasetNotFoundError

        raise DatasetNotFoundError(f"no dataset named {', '.join(map(repr, missing))} on {client.uri}")
    for name in wanted:
        con.register(name, RemoteDataset(client, name, schemas[name]))
    return wanted


def remote_schemas(client: Client) -> dict[str, pa.Schema]:
    """{name: Arrow schema} of every dataset on the server, from its catalog (nothing is loaded)."""
    command = fsql.pack(fsql.message("CommandGetTables", include_schema=True))

    def run() -> pa.Table:
        info = client.flight.get_flight_info(flight.FlightDescriptor.for_command(command), client._options())
        return client.flight.do_get(info.endpoints[0].ticket, client._options()).read_all()

    tables = client._call(run)
    return {
        name: _untagged(pa.ipc.read_schema(pa.py_buffer(raw)))
        for name, raw in zip(tables["table_name"].to_pylist(), tables["table_schema"].to_pylist(), strict=True)
    }


def _untagged(schema: pa.Schema) -> pa.Schema:
    """``schema`` without the Flight SQL column metadata the catalog adds."""
    fields = []
    for f in schema:
        meta = {k: v for k, v in (f.metadata or {}).items() if not k.startswith(b"ARROW:FLIGHT:SQL:")}
        fields.append(f.with_metadata(meta) if meta else f.remove_metadata())
    return pa.schema(fields, metadata=schema.metadata)


class RemoteDataset(ds.InMemoryDataset):
    """A dataset on the server, as DuckDB's Arrow scan sees a ``pyarrow.dataset``: ``scanner(columns,
    filter)`` reads just those columns, filtered on the server."""

    def __init__(self, client: Client, name: str, schema: pa.Schema) -> None:
        super().__init__(schema.empty_table())
        self.client = client
        self.name = name

    def scanner(self, *args: Any, **kwargs: Any) -> Any:
        columns = kwargs.get("columns", args[0] if args else None)
        expression = kwargs.get("filter")
        names = list(columns) if columns is not None else self.schema.names
        projected = pa.schema([self.schema.field(c) for c in names])
        if expression is not None:
            try:
                expression.to_substrait(self.schema)
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as e:
                # Substrait cannot carry this filter: read the dataset unfiltered and filter it here.
                log.info("filter %s of %s runs locally (%s)", expression, self.name, e)
                table = self.client.get(self.name)
                return ds.dataset(table).scanner(columns=names, filter=expression)
        return _Scan(projected, self.client.stream(self.name, columns=names, filter=expression))


class _Scan:
    """What DuckDB's Arrow scan uses of a ``Scanner``: ``to_reader()``. A real ``Scanner.from_batches`` would
    run the batches through Acero, which warns about (and may copy) the buffers Flight delivers unaligned."""

    def __init__(self, schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> None:
        self.projected_schema = schema
        self._batches = batches

    def to_reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.projected_schema, self._batches)
