"""Verification keys for JWT issuers: static key sets and a JWKS URL cache.

A :class:`KeySource` maps a token's ``kid`` to a :class:`VerificationKey`.
Sources:

- :class:`StaticKeySet`: keys loaded once from PEM public key files
  (:meth:`StaticKeySet.from_pem_files`; each key's ``kid`` is its RFC 7638
  thumbprint), a JWKS JSON file (:meth:`StaticKeySet.from_jwks_file`), or
  keys given directly.
- :class:`JwksCache`: keys fetched from an ``http``/``https`` JWKS URL, such as
  a control plane's ``/.well-known/jwks.json`` or the Kubernetes API server's
  ``/openid/v1/jwks``.

JwksCache contract: the key set is fetched on first use; an unknown ``kid``
triggers a refetch at most once per ``cooldown`` (monotonic clock), and so
does a key set older than ``refresh_interval``. One fetch runs at a time
(single flight) and no lock is held while it runs:

- a call whose ``kid`` is in the current key set never waits: a stale key set
  is served while a background thread refreshes it;
- a call whose ``kid`` is unknown while a fetch runs waits for that fetch,
  at most ``timeout`` seconds; at most ``max_waiters`` calls wait at once,
  further ones are answered UNAVAILABLE at once (so an unknown-``kid`` flood
  during a slow fetch cannot hold every worker of a sync server).

A failed fetch keeps the last good key set. Fetches go through the package's
one bounded HTTP client (:mod:`ambient_grpc_auth._http`): bounded by
``timeout`` and ``max_bytes``, no redirects, no proxy environment variables.
The async path never blocks the event loop: it resolves from memory inline,
waits for a running fetch without a thread, and runs a fetch it starts in a
worker thread.

Where keys may come from: ``https`` from any host; plain ``http`` only from
loopback and cluster-local hosts (the policy of
:mod:`ambient_grpc_auth._locality`), unless ``allow_insecure_remote=True``.
The same policy as for secrets applies although a JWKS is public: keys read
over plaintext from a remote host can be replaced on the way, and whoever
replaces them can mint tokens this server accepts; the optional
``bearer_token_file`` value is a secret besides.

Only asymmetric public keys are ever loaded: symmetric (``oct``) JWKs and
private members are ignored, RSA keys shorter than 2048 bits are skipped.
Errors raised to callers: :class:`TokenRejectedError` ``unknown_kid``
(UNAUTHENTICATED) and :class:`KeysUnavailableError` (UNAVAILABLE, no key set
has ever been loaded). Messages and logs never contain key bytes or tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import os
import ssl
import threading
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Protocol, runtime_checkable

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth._http import TransportError, request_sync, safe_url, validate_http_url
from ambient_grpc_auth._locality import check_url_plaintext
from ambient_grpc_auth.errors import ConfigurationError, KeyFileError, TokenRejectedError
from ambient_grpc_auth.jwk import (
    MIN_RSA_BITS,
    VerificationKey,
    jwk_thumbprint,
    parse_jwks,
    safe_kid,
)
from ambient_grpc_auth.server.metrics import MetricsHook

__all__ = [
    "DEFAULT_JWKS_COOLDOWN",
    "DEFAULT_JWKS_MAX_BYTES",
    "DEFAULT_JWKS_MAX_WAITERS",
    "DEFAULT_JWKS_REFRESH_INTERVAL",
    "DEFAULT_JWKS_TIMEOUT",
    "JwksCache",
    "KeySource",
    "KeysUnavailableError",
    "StaticKeySet",
]

_log = logging.getLogger(__name__)

DEFAULT_JWKS_COOLDOWN = 30.0
DEFAULT_JWKS_REFRESH_INTERVAL = 600.0
DEFAULT_JWKS_TIMEOUT = 5.0
DEFAULT_JWKS_MAX_BYTES = 1024 * 1024
#: Calls that may wait at once for a running fetch (unknown ``kid``). Keep it
#: well below a sync server's worker count: each waiter holds a worker.
DEFAULT_JWKS_MAX_WAITERS = 16
_MAX_FILE_BYTES = 1024 * 1024


class KeysUnavailableError(TokenRejectedError):
    """No key set is available to verify with (e.g. the JWKS endpoint has not
    answered yet). The peer sees UNAVAILABLE: retrying later may succeed."""

    def __init__(self) -> None:
        super().__init__("keys_unavailable", grpc.StatusCode.UNAVAILABLE)


def _select(keys: Mapping[str, VerificationKey] | None, kid: str | None) -> VerificationKey | None:
    if not keys:
        return None
    if kid is None:
        # A token without a kid is accepted only when there is no choice to make.
        return next(iter(keys.values())) if len(keys) == 1 else None
    return keys.get(kid)


def _resolve(keys: Mapping[str, VerificationKey] | None, kid: str | None) -> VerificationKey:
    if keys is None:
        raise KeysUnavailableError()
    key = _select(keys, kid)
    if key is None:
        raise TokenRejectedError("unknown_kid")
    return key


# --- sources -----------------------------------------------------------------


@runtime_checkable
class KeySource(Protocol):
    """Resolves a ``kid`` (``None`` when the token has none) to a key.

    ``get_key`` may block (a fetch); ``get_key_async`` must not block the
    event loop. Both raise :class:`TokenRejectedError` (``unknown_kid``) or
    :class:`KeysUnavailableError`. Implementations are thread-safe.
    """

    def get_key(self, kid: str | None) -> VerificationKey: ...

    async def get_key_async(self, kid: str | None) -> VerificationKey: ...


def _read_file(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {os.fspath(path)!s}: {exc.strerror}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise KeyFileError(f"key file {os.fspath(path)!s} is larger than {_MAX_FILE_BYTES} bytes")
    return data


class StaticKeySet:
    """A fixed set of keys; never fetches. Immutable and thread-safe."""

    def __init__(self, *, keys: Iterable[VerificationKey]) -> None:
        table: dict[str, VerificationKey] = {}
        for key in keys:
            if key.kid in table:
                raise ConfigurationError(f"duplicate key id {safe_kid(key.kid)!r}")
            table[key.kid] = key
        if not table:
            raise ConfigurationError("a key set needs at least one key")
        self._keys: Mapping[str, VerificationKey] = MappingProxyType(table)

    @classmethod
    def from_pem_files(cls, paths: Iterable[str | os.PathLike[str]]) -> StaticKeySet:
        """Public keys from PEM files (``PUBLIC KEY`` or ``RSA PUBLIC KEY``);
        each key's ``kid`` is its RFC 7638 thumbprint. Raises
        :class:`KeyFileError` for unreadable, malformed or unsupported keys."""
        keys = []
        for path in paths:
            try:
                loaded = serialization.load_pem_public_key(_read_file(path))
            except (ValueError, TypeError):
                raise KeyFileError(f"{os.fspath(path)!s} is not a PEM public key") from None
            if not isinstance(
                loaded,
                rsa.RSAPublicKey
                | ec.EllipticCurvePublicKey
                | ed25519.Ed25519PublicKey
                | ed448.Ed448PublicKey,
            ):
                raise KeyFileError(f"{os.fspath(path)!s}: unsupported key type")
            if isinstance(loaded, rsa.RSAPublicKey) and loaded.key_size < MIN_RSA_BITS:
                raise KeyFileError(f"{os.fspath(path)!s}: RSA key shorter than {MIN_RSA_BITS} bits")
            try:
                kid = jwk_thumbprint(loaded)
            except ValueError:
                raise KeyFileError(f"{os.fspath(path)!s}: unsupported key type") from None
            keys.append(VerificationKey(kid=kid, key=loaded))
        return cls(keys=keys)

    @classmethod
    def from_jwks_file(cls, path: str | os.PathLike[str]) -> StaticKeySet:
        """Keys from a JWKS JSON file. Raises :class:`KeyFileError`."""
        try:
            keys = parse_jwks(_read_file(path))
        except ValueError as exc:
            raise KeyFileError(f"{os.fspath(path)!s}: {exc}") from None
        return cls(keys=keys.values())

    @property
    def keys(self) -> Mapping[str, VerificationKey]:
        return self._keys

    def get_key(self, kid: str | None) -> VerificationKey:
        return _resolve(self._keys, kid)

    async def get_key_async(self, kid: str | None) -> VerificationKey:
        return _resolve(self._keys, kid)

    def __repr__(self) -> str:
        return f"StaticKeySet(kids={sorted(self._keys)!r})"


class _FetchError(Exception):
    pass


class _Role(enum.Enum):
    """What a call that missed the fresh key set does next."""

    FOUND = "found"  # the key is known: use it (a refresh may run in the background)
    MEMORY = "memory"  # no fetch is due: answer from the current key set
    LEAD = "lead"  # run the fetch this call started
    WAIT = "wait"  # wait for the running fetch (counted in the waiters)


#: A fetch in progress; its result is whether it succeeded. Created running,
#: so that a cancelled waiter (``asyncio.wrap_future``) cannot cancel it.
_Flight = concurrent.futures.Future[bool]


class JwksCache:
    """Keys from a JWKS URL with last-good caching and a refetch cooldown.

    ``ca_file`` sets the trust roots for https (e.g. the pod's
    ``/var/run/secrets/kubernetes.io/serviceaccount/ca.crt``);
    ``bearer_token_file`` is re-read on every fetch and sent as
    ``Authorization: Bearer`` (the Kubernetes ``/openid/v1/jwks`` endpoint may
    require it). ``allow_insecure_remote`` permits a plain ``http`` URL whose
    host is not loopback or cluster-local. ``max_waiters`` bounds the calls
    waiting for a running fetch. Raises :class:`ConfigurationError` for a bad
    URL or limits. Thread-safe; see the module docstring for the contract.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Clock = SYSTEM_CLOCK,
        cooldown: float = DEFAULT_JWKS_COOLDOWN,
        refresh_interval: float = DEFAULT_JWKS_REFRESH_INTERVAL,
        timeout: float = DEFAULT_JWKS_TIMEOUT,
        max_bytes: int = DEFAULT_JWKS_MAX_BYTES,
        max_waiters: int = DEFAULT_JWKS_MAX_WAITERS,
        ca_file: str | os.PathLike[str] | None = None,
        bearer_token_file: str | os.PathLike[str] | None = None,
        metrics: MetricsHook | None = None,
        allow_insecure_remote: bool = False,
    ) -> None:
        parts = validate_http_url(url, what="JWKS URL")
        check_url_plaintext(
            parts,
            allow_remote=allow_insecure_remote,
            sending="JWKS requests",
            what="JWKS URL",
            allow_flag="allow_insecure_remote=True",
        )
        self._display_url = safe_url(parts)
        if (
            cooldown < 0
            or refresh_interval <= 0
            or timeout <= 0
            or max_bytes <= 0
            or max_waiters < 0
        ):
            raise ConfigurationError("JWKS cache limits must be positive")
        self._url = url
        self._clock = clock
        self._cooldown = cooldown
        self._refresh_interval = refresh_interval
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._max_waiters = max_waiters
        self._token_file = bearer_token_file
        self._metrics = metrics
        self._tls_context = ssl.create_default_context(
            cafile=os.fspath(ca_file) if ca_file else None
        )
        # Guards the fields below for a few operations at a time; never held
        # across a fetch, so taking it on an event loop is fine.
        self._lock = threading.Lock()
        self._keys: Mapping[str, VerificationKey] | None = None
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._fetches = 0
        self._flight: _Flight | None = None
        self._waiters = 0

    @property
    def fetch_count(self) -> int:
        """How many fetches were attempted (successful or not)."""
        return self._fetches

    @property
    def keys(self) -> Mapping[str, VerificationKey] | None:
        """The current key set (``None`` before the first successful fetch)."""
        return self._keys

    @property
    def waiters(self) -> int:
        """Calls currently waiting for a running fetch."""
        return self._waiters

    def _fresh(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at < self._refresh_interval

    def _fetch_due(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self._cooldown

    def _from_memory(self, kid: str | None) -> VerificationKey | None:
        # Lock-free read: self._keys is replaced whole, never mutated.
        if not self._fresh(self._clock.monotonic()):
            return None
        return _select(self._keys, kid)

    def _start_locked(self, now: float) -> _Flight:
        flight: _Flight = concurrent.futures.Future()
        flight.set_running_or_notify_cancel()
        self._flight = flight
        self._attempted_at = now
        self._fetches += 1
        return flight

    def _join(self, kid: str | None) -> tuple[_Role, VerificationKey | _Flight | None]:
        """Decide, under the lock, how a call that missed the fresh key set
        proceeds. Raises :class:`KeysUnavailableError` when too many calls
        already wait."""
        background = None
        with self._lock:
            now = self._clock.monotonic()
            key = _select(self._keys, kid)
            flight = self._flight
            if key is not None:
                # Known kid, stale set: serve it and refresh behind it.
                if flight is None and not self._fresh(now) and self._fetch_due(now):
                    background = self._start_locked(now)
            elif flight is not None:
                if self._waiters >= self._max_waiters:
                    raise KeysUnavailableError()
                self._waiters += 1
                return _Role.WAIT, flight
            elif self._fetch_due(now):
                return _Role.LEAD, self._start_locked(now)
            else:
                return _Role.MEMORY, None
        if background is not None:
            threading.Thread(
                target=self._run, args=(background,), name="ambient-jwks-refresh", daemon=True
            ).start()
        return _Role.FOUND, key

    def _left(self) -> None:
        with self._lock:
            self._waiters -= 1

    def get_key(self, kid: str | None) -> VerificationKey:
        key = self._from_memory(kid)
        if key is not None:
            return key
        role, value = self._join(kid)
        if role is _Role.FOUND:
            assert isinstance(value, VerificationKey)
            return value
        if role is _Role.LEAD:
            assert isinstance(value, concurrent.futures.Future)
            self._run(value)
        elif role is _Role.WAIT:
            assert isinstance(value, concurrent.futures.Future)
            try:
                value.result(timeout=self._timeout)
            except concurrent.futures.TimeoutError:
                raise KeysUnavailableError() from None
            finally:
                self._left()
        return _resolve(self._keys, kid)

    async def get_key_async(self, kid: str | None) -> VerificationKey:
        key = self._from_memory(kid)
        if key is not None:
            return key
        role, value = self._join(kid)
        if role is _Role.FOUND:
            assert isinstance(value, VerificationKey)
            return value
        if role is _Role.LEAD:
            assert isinstance(value, concurrent.futures.Future)
            # The fetch completes the flight even if this task is cancelled.
            await asyncio.to_thread(self._run, value)
        elif role is _Role.WAIT:
            assert isinstance(value, concurrent.futures.Future)
            try:
                await asyncio.wait_for(asyncio.wrap_future(value), self._timeout)
            except TimeoutError:
                raise KeysUnavailableError() from None
            finally:
                self._left()
        return _resolve(self._keys, kid)

    def refresh(self) -> bool:
        """Fetch now, ignoring the cooldown (e.g. to warm up at start), or
        wait for the fetch already running. Returns whether the fetch
        succeeded; never raises for fetch failures."""
        with self._lock:
            flight = self._flight
            lead = flight is None
            if flight is None:
                flight = self._start_locked(self._clock.monotonic())
        if lead:
            return self._run(flight)
        try:
            return flight.result(timeout=self._timeout)
        except concurrent.futures.TimeoutError:
            return False

    def _run(self, flight: _Flight) -> bool:
        """Fetch, install the result, and complete ``flight`` (whatever happens)."""
        ok = False
        try:
            try:
                keys = parse_jwks(self._fetch())
            except (_FetchError, ValueError) as exc:
                _log.warning("JWKS fetch from %s failed: %s", self._display_url, exc)
                if self._metrics is not None:
                    self._metrics.jwks_fetch(False)
            else:
                with self._lock:
                    self._keys = keys
                    self._fetched_at = self._clock.monotonic()
                if self._metrics is not None:
                    self._metrics.jwks_fetch(True)
                ok = True
        finally:
            with self._lock:
                self._flight = None
            flight.set_result(ok)
        return ok

    def _fetch(self) -> bytes:
        headers = {"Accept": "application/json"}
        if self._token_file is not None:
            try:
                bearer = _read_file(self._token_file).decode("ascii").strip()
            except (KeyFileError, UnicodeDecodeError):
                raise _FetchError("cannot read the bearer token file") from None
            headers["Authorization"] = "Bearer " + bearer
        try:
            response = request_sync(
                self._url,
                headers,
                time_limit=self._timeout,
                max_bytes=self._max_bytes,
                tls_context=self._tls_context,
            )
        except TransportError as exc:
            raise _FetchError(exc.description) from None
        if response.status != 200:
            raise _FetchError(f"HTTP {response.status}")
        return response.body

    def __repr__(self) -> str:
        kids = sorted(self._keys) if self._keys is not None else None
        return f"JwksCache(url={self._display_url!r}, kids={kids!r})"
