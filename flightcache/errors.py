"""The one exception hierarchy of flightcache.

    FlightcacheError
    ├── DatasetNotFoundError      no dataset (or no such version) by that name
    ├── DataLostError             a part was held only by a node that left the cluster (rewrite it)
    ├── DatasetExistsError        put mode "create" on a name that exists
    ├── SchemaMismatchError       append with a schema unlike the current one
    ├── InvalidNameError          a dataset name outside the documented grammar
    ├── InvalidRequestError       malformed ticket, descriptor, action body or option
    ├── MemoryFullError           the memory limit leaves no room and nothing can be freed
    ├── StorageError              the storage tier failed (URI and cause in the message)
    ├── PutAbortedError           a put stream ended abnormally; nothing was published
    ├── SqlError                  a SQL query failed, timed out or was cancelled (DuckDB's message)
    ├── NotImplementedByServerError  a request the server understands but does not implement
    ├── UnauthenticatedError      no valid credentials: a missing or unknown token, a wrong password
    ├── UnauthorizedError         valid credentials whose role may not do this (a read token writing)
    ├── LimitExceededError        a request over a server limit (put size, dataset count, action body)
    ├── ServerUnavailableError    the server cannot be reached
    └── NotInstalledError         an optional extra is missing

Each class has a stable ``code``. The server sends it with every error so the client raises the
same class again (see ``protocol.error_to_flight`` and ``protocol.error_from_flight``).
"""

from __future__ import annotations


class FlightcacheError(Exception):
    """Root of every error flightcache raises on purpose."""

    code = "INTERNAL"


class DatasetNotFoundError(FlightcacheError, KeyError):
    code = "DATASET_NOT_FOUND"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NotInMemoryError(DatasetNotFoundError):
    """Internal: the storage tier holds the dataset but memory does not (the cache loads it)."""

    code = "DATASET_NOT_FOUND"


class DataLostError(FlightcacheError):
    """A part of the dataset was held only in the memory of a node that left the cluster: write it again."""

    code = "DATA_LOST"


class DatasetExistsError(FlightcacheError):
    code = "DATASET_EXISTS"


class SchemaMismatchError(FlightcacheError, ValueError):
    code = "SCHEMA_MISMATCH"


class InvalidNameError(FlightcacheError, ValueError):
    code = "INVALID_NAME"


class InvalidRequestError(FlightcacheError, ValueError):
    code = "INVALID_REQUEST"


class MemoryFullError(FlightcacheError, MemoryError):
    code = "MEMORY_FULL"


class StorageError(FlightcacheError, OSError):
    code = "STORAGE_ERROR"


class PutAbortedError(FlightcacheError):
    code = "PUT_ABORTED"


class SqlError(FlightcacheError):
    code = "SQL_ERROR"


class NotImplementedByServerError(FlightcacheError, NotImplementedError):
    code = "NOT_IMPLEMENTED"


class UnauthenticatedError(FlightcacheError, PermissionError):
    code = "UNAUTHENTICATED"


class UnauthorizedError(FlightcacheError, PermissionError):
    code = "UNAUTHORIZED"


class LimitExceededError(FlightcacheError):
    code = "LIMIT_EXCEEDED"


class ServerUnavailableError(FlightcacheError, ConnectionError):
    code = "UNAVAILABLE"


class NotInstalledError(FlightcacheError, ImportError):
    code = "NOT_INSTALLED"


ERRORS_BY_CODE: dict[str, type[FlightcacheError]] = {
    cls.code: cls
    for cls in (
        FlightcacheError,
        DatasetNotFoundError,
        DataLostError,
        DatasetExistsError,
        SchemaMismatchError,
        InvalidNameError,
        InvalidRequestError,
        MemoryFullError,
        StorageError,
        PutAbortedError,
        SqlError,
        NotImplementedByServerError,
        UnauthenticatedError,
        UnauthorizedError,
        LimitExceededError,
        ServerUnavailableError,
        NotInstalledError,
    )
}


def require(module: str, extra: str) -> None:
    """Raise NotInstalledError naming the pip extra when an optional module is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise NotInstalledError(f"{module} is not installed; install it with: pip install 'flightcache[{extra}]'")
