"""Who may call the server and how much a call may ask: credentials, roles, request limits.

With credentials configured, every call must carry the standard ``authorization`` header, so any
Flight client can authenticate:

* ``authorization: Bearer <token>``, a token from the credentials file;
* or basic auth, the way Flight SQL's JDBC and ADBC drivers do it: a ``Handshake`` carrying
  ``authorization: Basic base64(user:password)`` is answered with ``authorization: Bearer <session>``,
  which the client sends on its later calls (``FlightClient.authenticate_basic_token``). A session
  lasts ``session_seconds`` and ends early when its user leaves the file or changes password.

The credentials file (``flightcache serve --auth-token-file FILE``), one credential a line::

    # blank lines and lines starting with '#' are ignored
    TOKEN [ROLE]              a bearer token: at least 16 characters, no ':'
    USER:PASSWORD [ROLE]      a basic-auth user (the first ':' separates user from password)

ROLE is ``read`` or ``write`` (default ``write``). ``read`` may list, describe, read and query;
``write`` may also change what the server holds (``do_put``, and the actions ``protocol.ACTIONS``
declares ``write``). The server re-reads the file on SIGHUP; a file that does not parse leaves the
previous credentials in force.

Tokens are compared in constant time, and no token or password is ever logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.flight as flight

from ..errors import LimitExceededError, UnauthenticatedError, UnauthorizedError
from ..protocol import error_to_flight
from ..units import format_bytes

log = logging.getLogger("flightcache.auth")

READ, WRITE = "read", "write"
ROLES = (READ, WRITE)
MIN_TOKEN_CHARS = 16
MIDDLEWARE_KEY = "auth"
DEFAULT_SESSION_SECONDS = 24 * 3600.0
MAX_SESSIONS = 10_000
MAX_SESSIONS_PER_USER = 100
DEFAULT_MAX_ACTION_BYTES = 2 * 1024 * 1024  # room for the largest SQL query (1 MiB) and its parameters

# Actions that change what the server holds: they need a write role (so does do_put).
# pin, unpin and evict decide what stays in memory for every user, so they are writes too.

_TOKEN_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


# -- credentials ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """Parsed credentials: bearer tokens and basic-auth users, each with a role."""

    tokens: tuple[tuple[bytes, str], ...] = field(default=(), repr=False)  # (token, role)
    users: Mapping[str, tuple[bytes, str]] = field(default_factory=dict, repr=False)  # user -> (password, role)

    @classmethod
    def parse(cls, text: str, where: str = "credentials") -> Credentials:
        """Parse the credentials-file format; a bad line raises ValueError naming its number, never its secret."""
        tokens: list[tuple[bytes, str]] = []
        users: dict[str, tuple[bytes, str]] = {}
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) > 2 or (len(fields) == 2 and fields[1] not in ROLES):
                raise ValueError(
                    f"{where} line {number}: expected 'TOKEN [read|write]' or 'USER:PASSWORD [read|write]'"
                )
            secret, role = fields[0], fields[1] if len(fields) == 2 else WRITE
            if ":" in secret:
                user, password = secret.split(":", 1)
                if not user or not password:
                    raise ValueError(f"{where} line {number}: USER:PASSWORD needs both a user and a password")
                if user in users:
                    raise ValueError(f"{where} line {number}: user {user!r} appears twice")
                users[user] = (password.encode(), role)
            elif len(secret) < MIN_TOKEN_CHARS:
                raise ValueError(
                    f"{where} line {number}: a token needs at least {MIN_TOKEN_CHARS} characters; make one with "
                    f"{_TOKEN_HINT}"
                )
            else:
                tokens.append((secret.encode(), role))
        if not tokens and not users:
            raise ValueError(f"{where} holds no credentials: the server would refuse every call")
        return cls(tuple(tokens), users)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Credentials:
        """Read a credentials file (OSError if it cannot be read, ValueError if it does not parse)."""
        p = Path(path)
        credentials = cls.parse(p.read_text(encoding="utf-8"), str(p))
        if os.name == "posix" and p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("credentials file %s is readable by other users; chmod 600 it", p)
        return credentials


@dataclass(frozen=True)
class Principal:
    """Who a call comes from: a role, the user for basic auth, and a new session token to hand back."""

    role: str
    user: str | None = None
    session: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        return f"user {self.user!r}" if self.user else "token"


@dataclass
class _Session:
    user: str
    password_digest: bytes  # the session ends when the user's password changes
    expires: float


class Auth:
    """The credentials a server accepts; ``reload`` swaps them atomically. Thread-safe.

    ``Auth(tokens={"...": "write"}, users={"alice": ("password", "read")})`` for programmatic use;
    ``Auth.from_file(path)`` for the credentials-file format (see the module docstring).
    """

    def __init__(
        self,
        tokens: Mapping[str, str] | None = None,
        users: Mapping[str, tuple[str, str]] | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        session_seconds: float = DEFAULT_SESSION_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        lines = [f"{t} {r}" for t, r in (tokens or {}).items()]
        lines += [f"{u}:{p} {r}" for u, (p, r) in (users or {}).items()]
        self.path = path
        self.session_seconds = session_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[bytes, _Session] = {}  # sha256(session token) -> session
        self._credentials = Credentials.read(path) if path is not None else Credentials.parse("\n".join(lines))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> Auth:
        return cls(path=path, **kwargs)

    def reload(self) -> None:
        """Re-read the credentials file; on any error the previous credentials stay in force and it raises."""
        if self.path is None:
            raise ValueError("these credentials were not read from a file")
        credentials = Credentials.read(self.path)
        with self._lock:
            self._credentials = credentials
        log.warning("reloaded credentials from %s: %s", self.path, self.summary())

    def summary(self) -> str:
        c = self._credentials
        return f"{len(c.tokens)} tokens, {len(c.users)} basic-auth users"

    # -- authentication --------------------------------------------------------------------

    def authenticate(self, header: str | None, *, handshake: bool = False) -> Principal:
        """The principal behind an ``authorization`` header value, else UnauthenticatedError.

        Basic credentials on a ``handshake`` open a session whose bearer token is returned in
        ``Principal.session``; on other calls they authenticate that call only.
        """
        if not header:
            raise UnauthenticatedError(
                "this server requires authentication: send 'authorization: Bearer <token>' "
                "(flightcache: token=, --token or $FLIGHTCACHE_TOKEN) or basic auth"
            )
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return self._bearer(value.encode())
        if scheme.lower() == "basic" and value:
            return self._basic(value, handshake)
        raise UnauthenticatedError("the authorization header is neither 'Bearer <token>' nor 'Basic <user:password>'")

    def _bearer(self, token: bytes) -> Principal:
        with self._lock:
            credentials = self._credentials
        role = None
        for known, known_role in credentials.tokens:  # every entry compared, in constant time each
            if hmac.compare_digest(known, token):
                role = known_role
        if role is not None:
            return Principal(role)
        digest = hashlib.sha256(token).digest()
        now = self._clock()
        with self._lock:
            session = self._sessions.get(digest)
            if session is not None and session.expires <= now:
                del self._sessions[digest]
                session = None
        if session is not None:
            entry = credentials.users.get(session.user)
            if entry is not None and hmac.compare_digest(hashlib.sha256(entry[0]).digest(), session.password_digest):
                return Principal(entry[1], session.user)
        raise UnauthenticatedError("unknown or expired token")

    def _basic(self, value: str, handshake: bool) -> Principal:
        padded = value + "=" * (-len(value) % 4)  # the ADBC (Go) driver leaves the padding out
        try:
            user, sep, password = base64.b64decode(padded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            raise UnauthenticatedError("basic auth credentials are not base64 of 'user:password'") from None
        with self._lock:
            entry = self._credentials.users.get(user)
        # The password comparison runs whether or not the user exists, so timing does not tell.
        expected, role = entry if entry is not None else (secrets.token_bytes(16), READ)
        if not (hmac.compare_digest(expected, password.encode()) and sep and entry is not None):
            raise UnauthenticatedError("wrong user or password")
        if not handshake:
            return Principal(role, user)
        session = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            for key in [k for k, s in self._sessions.items() if s.expires <= now]:
                del self._sessions[key]
            # One user's handshakes end that user's oldest sessions, never another user's.
            own = [k for k, s in self._sessions.items() if s.user == user]
            for key in own[: max(0, len(own) - MAX_SESSIONS_PER_USER + 1)]:
                del self._sessions[key]
            if len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[hashlib.sha256(session.encode()).digest()] = _Session(
                user, hashlib.sha256(expected).digest(), now + self.session_seconds
            )
        log.info("user %r authenticated (role %s); session opened", user, role)
        return Principal(role, user, session)


# -- the Flight side ------------------------------------------------------------------------------


class AuthMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Authenticates every call before its handler runs; the handler finds the principal with
    ``context.get_middleware("auth")`` (see ``require_write``)."""

    def __init__(self, auth: Auth, on_refused: Callable[[str, BaseException], None] | None = None) -> None:
        super().__init__()
        self.auth = auth
        self.on_refused = on_refused  # (method, error): Flight completes no middleware of a refused call

    def start_call(self, info: flight.CallInfo, headers: Mapping[str, list[str]]) -> AuthMiddleware:
        values = headers.get("authorization") or []
        try:
            principal = self.auth.authenticate(
                values[0] if values else None, handshake=info.method == flight.FlightMethod.HANDSHAKE
            )
        except UnauthenticatedError as e:
            log.info("refused %s: %s", info.method.name, e)
            refusal = error_to_flight(e)
            if self.on_refused is not None:
                self.on_refused(info.method.name.lower(), refusal)
            raise refusal from None
        return AuthMiddleware(principal)


class AuthMiddleware(flight.ServerMiddleware):
    """One call's principal; answers a basic-auth handshake with the new session's bearer token."""

    def __init__(self, principal: Principal) -> None:
        super().__init__()
        self.principal = principal

    def sending_headers(self) -> dict[str, str]:
        if self.principal.session is None:
            return {}
        return {"authorization": f"Bearer {self.principal.session}"}


class HandshakeHandler(flight.ServerAuthHandler):
    """Lets ``Handshake`` succeed (Flight refuses it on a server without an auth handler): the
    middleware has already authenticated the call and sends the session token as a header."""

    def authenticate(self, outgoing: flight.ServerAuthSender, incoming: flight.ServerAuthReader) -> None:
        pass

    def is_valid(self, token: bytes) -> str:
        return ""  # every call is authenticated by the middleware, not by this legacy token


def require_write(context: flight.ServerCallContext, what: str) -> None:
    """Raise UnauthorizedError unless the call's principal may write (always may without auth)."""
    middleware = context.get_middleware(MIDDLEWARE_KEY)
    if middleware is None:
        return
    principal = middleware.principal
    if principal.role != WRITE:
        raise UnauthorizedError(f"{what} needs the write role; this {principal.describe()} has role {principal.role}")


def server_options(auth: Auth | None, on_refused: Callable[[str, BaseException], None] | None = None) -> dict[str, Any]:
    """The ``FlightServerBase`` keyword arguments that turn authentication on (none without ``auth``)."""
    if auth is None:
        return {}
    factory = AuthMiddlewareFactory(auth, on_refused)
    return {"middleware": {MIDDLEWARE_KEY: factory}, "auth_handler": HandshakeHandler()}


# -- limits ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask; ``None``: no bound beyond the memory limit."""

    max_put_bytes: int | None = None  # Arrow bytes of one do_put stream (a Spark task's part is one put)
    max_datasets: int | None = None  # names in the catalog, in memory or in storage only
    max_action_bytes: int = DEFAULT_MAX_ACTION_BYTES  # body of one action, checked before it is decoded

    def check_action(self, kind: str, body: bytes) -> None:
        if len(body) > self.max_action_bytes:
            raise LimitExceededError(
                f"the body of action {kind!r} is {format_bytes(len(body))}, over the server's limit of "
                f"{format_bytes(self.max_action_bytes)} (flightcache serve --max-action-bytes)"
            )

    def check_put(self, name: str, nbytes: int) -> None:
        if self.max_put_bytes is not None and nbytes > self.max_put_bytes:
            raise LimitExceededError(
                f"put of dataset {name!r} passed {format_bytes(self.max_put_bytes)}, the server's limit for one "
                "put (flightcache serve --max-put-bytes); nothing was published"
            )
