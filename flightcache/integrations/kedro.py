"""A Kedro dataset that hands DataFrames and Arrow tables between nodes through a flightcache server.

    # conf/base/catalog.yml
    features:
      type: flightcache.integrations.kedro.ArrowDataset
      uri: grpc://127.0.0.1:8815
      name: churn/features          # the dataset's name on the server (required)
      load_as: pandas               # or arrow (a pyarrow Table)
      persist: none                 # none | sync | async (default: the server's)
      credentials: flightcache      # {token: ...} or {username: ..., password: ...} from credentials.yml

Kedro's versioning (``versioned: true``) keeps each save as the dataset ``<name>/<version>/<last
segment of name>`` on the server, with Kedro's timestamp in lower case (dataset names are lower case,
so ``2026-12-04T15.27.46.123Z`` is kept as ``2026-12-04t15.27.46.123z``; a pinned load version may
be given in either case). Importing this module needs the ``kedro`` extra; ``import flightcache`` does not.
"""

from __future__ import annotations

import contextlib
import fnmatch
from pathlib import PurePosixPath
from typing import Any

# Only the package's public API: the lead may move this module into flightcache/integrations/.
from flightcache import Client, connect
from flightcache.errors import DatasetNotFoundError, NotInstalledError

try:
    from kedro.io.core import AbstractVersionedDataset, DatasetError, Version, VersionNotFoundError
except ImportError as e:  # kedro is an optional extra
    raise NotInstalledError(
        f"flightcache.integrations.kedro needs Kedro: pip install 'flightcache[kedro]' ({e})"
    ) from None

LOAD_AS = ("pandas", "arrow")


class ArrowDataset(AbstractVersionedDataset):  # type: ignore[type-arg]  # not subscripted: Kedro 0.18 is not generic
    """A named dataset on a flightcache server: saves pandas DataFrames and pyarrow Tables (and polars
    DataFrames), loads a pandas DataFrame (``load_as="pandas"``) or a pyarrow Table (``"arrow"``).

    ``load_args``: ``columns`` and ``filter`` of ``Client.get`` (read only what a node needs), and for
    pandas the keyword arguments of ``Table.to_pandas``; ``save_args``: ``mode`` of ``Client.put``
    (``overwrite``, ``append`` or ``create``). A DataFrame's index is not kept (``reset_index()``
    first to keep it). ``release_drops``: Kedro releases an intermediate dataset once the last node
    that reads it has run; with ``True`` that drops it from the server (frees its memory at once),
    by default it stays readable until its ``ttl`` or a drop.
    """

    def __init__(
        self,
        *,
        name: str,
        uri: str | None = None,
        load_as: str = "pandas",
        persist: str | None = None,
        ttl: float | None = None,
        credentials: dict[str, Any] | None = None,
        client_args: dict[str, Any] | None = None,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        release_drops: bool = False,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if load_as not in LOAD_AS:
            raise DatasetError(f"ArrowDataset {name!r}: load_as must be one of {', '.join(LOAD_AS)}, not {load_as!r}")
        credentials = dict(credentials or {})
        unknown = set(credentials) - {"token", "username", "password"}
        if unknown:
            raise DatasetError(
                f"ArrowDataset {name!r}: credentials take token, or username and password; not {sorted(unknown)}"
            )
        self._name = name
        self._uri = uri
        self._load_as = load_as
        self._persist = persist
        self._ttl = ttl
        self._credentials = credentials
        self._client_args = dict(client_args or {})
        self._load_args = dict(load_args or {})
        self._save_args = dict(save_args or {})
        self._release_drops = release_drops
        self.metadata = metadata
        self._client: Client | None = None
        super().__init__(
            filepath=PurePosixPath(name), version=version, exists_function=self._exists_name, glob_function=self._glob
        )

    # -- the server ------------------------------------------------------------------------

    @property
    def client(self) -> Client:
        """The dataset's client, connected on first use (and again in a worker process after a fork)."""
        if self._client is None:
            self._client = connect(self._uri, **self._credentials, **self._client_args)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        # A Client pickles as its settings; leaving it out keeps a ParallelRunner's copies independent.
        return {**self.__dict__, "_client": None}

    # Kedro's timestamps have an upper-case T and Z; dataset names are lower case. Both resolved versions
    # are lowered, so that Kedro's check that a save is loaded back at the version it saved holds.
    def resolve_load_version(self) -> str | None:
        version = super().resolve_load_version()
        return version.lower() if version else version

    def resolve_save_version(self) -> str | None:
        version = super().resolve_save_version()
        return version.lower() if version else version

    def _exists_name(self, name: str) -> bool:
        try:
            self.client.info(name)
        except DatasetNotFoundError:
            return False
        return True

    def _glob(self, pattern: str) -> list[str]:
        return [d["name"] for d in self.client.list() if fnmatch.fnmatchcase(d["name"], pattern)]

    # -- the dataset -------------------------------------------------------------------------

    # _load and _save (not load and save): the names both Kedro 0.18 and Kedro 1.x wrap with their error handling.
    def _load(self) -> Any:
        name = str(self._get_load_path())
        args = dict(self._load_args)
        columns, filter_ = args.pop("columns", None), args.pop("filter", None)
        try:
            table = self.client.get(name, columns, filter_)
        except DatasetNotFoundError as e:
            raise DatasetError(f"{self}: nothing to load, {e}") from None
        return table.to_pandas(**args) if self._load_as == "pandas" else table

    def _save(self, data: Any) -> None:
        name = str(self._get_save_path())
        self.client.put(name, data, self._save_args.get("mode", "overwrite"), persist=self._persist, ttl=self._ttl)

    def _exists(self) -> bool:
        return self._exists_name(str(self._get_load_path()))

    def _release(self) -> None:
        if self._release_drops:
            # dropped already, or never saved: there is nothing to free
            with contextlib.suppress(DatasetNotFoundError, VersionNotFoundError):
                self.client.drop(str(self._get_load_path()))
        super()._release()

    def _describe(self) -> dict[str, Any]:
        return {
            "name": self._name,
            "uri": self._uri,
            "load_as": self._load_as,
            "persist": self._persist,
            "ttl": self._ttl,
            "version": self._version,
        }
