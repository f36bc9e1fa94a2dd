"""Tokens and token sources (runner side).

A :class:`TokenSource` yields a :class:`Token`, synchronously or from a
coroutine. Contract for every source in this module: safe for concurrent use
from many threads and many asyncio tasks; the returned Token is immutable;
failures raise :class:`~ambient_grpc_auth.errors.TokenUnavailableError`
whose message never contains token material. ``get_token_async`` never
blocks the event loop (file reads run in a worker thread).

Sources here: :class:`StaticTokenSource`, :class:`EnvTokenSource`
(``BOT_TOKEN``), :class:`FileTokenSource` (the pod's service-account token)
and :class:`ChainTokenSource`. The control-plane source lives in
:mod:`ambient_grpc_auth.client.control_plane`, the caching wrapper in
:mod:`ambient_grpc_auth.client.caching`; :func:`token_source_from_env` assembles
them following the runner's environment contract.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import jwt

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.errors import ConfigurationError, TokenUnavailableError

__all__ = [
    "BOT_TOKEN_ENV",
    "DEFAULT_SERVICE_ACCOUNT_TOKEN_PATH",
    "ChainTokenSource",
    "EnvTokenSource",
    "FileTokenSource",
    "RefreshableTokenSource",
    "StaticTokenSource",
    "Token",
    "TokenSource",
    "jwt_expiry",
]

_log = logging.getLogger(__name__)

# Names, not secrets.
BOT_TOKEN_ENV = "BOT_TOKEN"  # noqa: S105
DEFAULT_SERVICE_ACCOUNT_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105
# Larger than any JWT we issue or Kubernetes projects, small enough to read at once.
_MAX_JWT_CHARS = 16 * 1024


def jwt_expiry(value: str) -> float | None:
    """The ``exp`` claim of ``value`` read *without verification*, or None.

    Used only to schedule refreshes, never to trust the token. A value that is
    not a JWT, or has no numeric finite ``exp``, has unknown expiry.
    """
    if value.count(".") != 2 or len(value) > _MAX_JWT_CHARS:
        return None
    try:
        claims = jwt.decode(value, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    exp = float(exp)
    return exp if math.isfinite(exp) else None


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token and, when known, its expiry (Unix seconds, UTC).

    The value never appears in ``repr`` or ``str``.
    """

    value: str
    expires_at: float | None = None

    def __repr__(self) -> str:
        return f"Token(<redacted {len(self.value)} chars>, expires_at={self.expires_at!r})"

    __str__ = __repr__

    @classmethod
    def from_value(cls, value: str, expires_at: float | None = None) -> Token:
        """A Token whose expiry is ``expires_at`` if given, else the JWT
        ``exp`` of ``value`` (unverified), else unknown (None)."""
        if expires_at is None:
            expires_at = jwt_expiry(value)
        return cls(value, expires_at)


@runtime_checkable
class TokenSource(Protocol):
    """Something that yields tokens, with a sync and an async way."""

    def get_token(self) -> Token: ...

    async def get_token_async(self) -> Token: ...


@runtime_checkable
class RefreshableTokenSource(TokenSource, Protocol):
    """A source that caches, and can be told that a token stopped working.

    ``invalidate(token)`` drops the cached token only if it is ``token``
    (so a late UNAUTHENTICATED for an old token triggers no extra fetch).
    """

    def invalidate(self, token: Token) -> None: ...


def _is_token_text(value: str) -> bool:
    # Visible ASCII only: what fits in "authorization: Bearer <token>".
    return bool(value) and value.isascii() and value.isprintable() and " " not in value


class StaticTokenSource:
    """Always the same token. Raises :class:`ConfigurationError` at
    construction for an empty value or one that cannot be sent as a bearer."""

    def __init__(self, token: Token | str) -> None:
        if isinstance(token, str):
            token = Token.from_value(token)
        if not _is_token_text(token.value):
            raise ConfigurationError("static token is empty or not printable ASCII")
        self._token = token

    def get_token(self) -> Token:
        return self._token

    async def get_token_async(self) -> Token:
        return self._token

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._token!r})"


class EnvTokenSource(StaticTokenSource):
    """A token taken from an environment variable (``BOT_TOKEN`` by default).

    The environment is read once, by :meth:`from_env`; later changes to the
    variable are not seen (a process's environment does not rotate).
    """

    def __init__(self, token: Token | str, *, name: str = BOT_TOKEN_ENV) -> None:
        super().__init__(token)
        self.name = name

    @classmethod
    def from_env(
        cls, name: str = BOT_TOKEN_ENV, *, environ: Mapping[str, str] | None = None
    ) -> EnvTokenSource:
        """Raises :class:`ConfigurationError` if ``name`` is unset or empty."""
        env = os.environ if environ is None else environ
        value = env.get(name, "").strip()
        if not value:
            raise ConfigurationError(f"{name} is not set")
        if not _is_token_text(value):
            raise ConfigurationError(f"{name} is not printable ASCII without spaces")
        return cls(value, name=name)

    def __repr__(self) -> str:
        return f"EnvTokenSource(name={self.name!r})"


class FileTokenSource:
    """A token read from a file, e.g. the pod's projected service-account token.

    The file is re-read when it changes (inode, device, mtime or size differ,
    which covers the kubelet's atomic symlink swap) and at least every
    ``reread_interval`` seconds (by ``clock.monotonic``). Leading and trailing
    whitespace is stripped. A read that fails (missing, unreadable, not a
    regular file, empty, larger than ``max_bytes``, not printable ASCII)
    keeps the last good token; only when no good token was ever read does it
    raise :class:`TokenUnavailableError` (``retryable=True``: the file may
    appear). Thread-safe; ``get_token_async`` reads in a worker thread.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_SERVICE_ACCOUNT_TOKEN_PATH,
        *,
        clock: Clock = SYSTEM_CLOCK,
        reread_interval: float = 60.0,
        max_bytes: int = 64 * 1024,
    ) -> None:
        if reread_interval <= 0 or max_bytes <= 0:
            raise ConfigurationError("reread_interval and max_bytes must be positive")
        self.path = os.fspath(path)
        self._clock = clock
        self._interval = reread_interval
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._token: Token | None = None
        self._signature: tuple[int, int, int, int] | None = None
        self._read_at = 0.0
        self._failing = False

    def __repr__(self) -> str:
        return f"FileTokenSource(path={self.path!r})"

    def get_token(self) -> Token:
        with self._lock:
            now = self._clock.monotonic()
            try:
                st = os.stat(self.path)
            except OSError as exc:
                return self._keep_or_raise(_describe_os_error(exc))
            if (
                self._token is not None
                and self._signature == _signature(st)
                and now - self._read_at < self._interval
            ):
                return self._token
            try:
                value, signature = self._read()
            except _FileProblem as problem:
                return self._keep_or_raise(str(problem))
            if self._token is None or self._token.value != value:
                self._token = Token.from_value(value)
            self._signature = signature
            self._read_at = now
            if self._failing:
                _log.info("token file %s is readable again", self.path)
                self._failing = False
            return self._token

    async def get_token_async(self) -> Token:
        return await asyncio.to_thread(self.get_token)

    def _read(self) -> tuple[str, tuple[int, int, int, int]]:
        try:
            # O_NONBLOCK: opening a FIFO planted at the path must not hang.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise _FileProblem(_describe_os_error(exc)) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _FileProblem("not a regular file")
            # One read more than allowed tells "too large" from "exactly max".
            data = b""
            while len(data) <= self._max_bytes:
                chunk = os.read(fd, self._max_bytes + 1 - len(data))
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise _FileProblem(_describe_os_error(exc)) from None
        finally:
            os.close(fd)
        if len(data) > self._max_bytes:
            raise _FileProblem(f"larger than {self._max_bytes} bytes")
        try:
            value = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise _FileProblem("not ASCII text") from None
        if not value:
            raise _FileProblem("empty")
        if not _is_token_text(value):
            raise _FileProblem("does not hold a single printable token")
        return value, _signature(st)

    def _keep_or_raise(self, problem: str) -> Token:
        if self._token is not None:
            if not self._failing:
                _log.warning("token file %s: %s; keeping the last good token", self.path, problem)
                self._failing = True
            return self._token
        raise TokenUnavailableError(f"token file {self.path}: {problem}", retryable=True)


class _FileProblem(Exception):
    pass


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)


def _describe_os_error(exc: OSError) -> str:
    return os.strerror(exc.errno).lower() if exc.errno else type(exc).__name__


class ChainTokenSource:
    """The first source that yields a token, tried in order on every call.

    If all fail, raises :class:`TokenUnavailableError` listing each source's
    (secret-free) failure; it is retryable if any failure was. Exceptions
    other than TokenUnavailableError propagate unchanged.
    """

    def __init__(self, *sources: TokenSource) -> None:
        if not sources:
            raise ConfigurationError("ChainTokenSource needs at least one source")
        self.sources: tuple[TokenSource, ...] = sources

    def __repr__(self) -> str:
        return f"ChainTokenSource{self.sources!r}"

    def get_token(self) -> Token:
        failures: list[tuple[TokenSource, TokenUnavailableError]] = []
        for source in self.sources:
            try:
                return source.get_token()
            except TokenUnavailableError as exc:
                failures.append((source, exc))
        raise _chain_failure(failures)

    async def get_token_async(self) -> Token:
        failures: list[tuple[TokenSource, TokenUnavailableError]] = []
        for source in self.sources:
            try:
                return await source.get_token_async()
            except TokenUnavailableError as exc:
                failures.append((source, exc))
        raise _chain_failure(failures)


def _chain_failure(
    failures: list[tuple[TokenSource, TokenUnavailableError]],
) -> TokenUnavailableError:
    summary = "; ".join(f"{type(src).__name__}: {exc}" for src, exc in failures)
    return TokenUnavailableError(
        f"no token source succeeded ({summary})",
        retryable=any(exc.retryable for _, exc in failures),
    )
