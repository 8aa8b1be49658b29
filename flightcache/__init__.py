"""flightcache: an Arrow Flight cache for handing datasets between pipeline stages."""

from .client import Client, connect
from .errors import (
    DataLostError,
    DatasetExistsError,
    DatasetNotFoundError,
    FlightcacheError,
    InvalidNameError,
    InvalidRequestError,
    LimitExceededError,
    MemoryFullError,
    NotInstalledError,
    PutAbortedError,
    SchemaMismatchError,
    ServerUnavailableError,
    StorageError,
    UnauthenticatedError,
    UnauthorizedError,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "DataLostError",
    "DatasetExistsError",
    "DatasetNotFoundError",
    "FlightcacheError",
    "InvalidNameError",
    "InvalidRequestError",
    "LimitExceededError",
    "MemoryFullError",
    "NotInstalledError",
    "PutAbortedError",
    "SchemaMismatchError",
    "ServerUnavailableError",
    "StorageError",
    "UnauthenticatedError",
    "UnauthorizedError",
    "__version__",
    "connect",
]
