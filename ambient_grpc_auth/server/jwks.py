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
does a key set older than ``refresh_interval``. The lock is held across the
fetch, so concurrent callers share one fetch (single flight) and then reuse
its result. A failed fetch keeps the last good key set. Fetches go through
the package's one bounded HTTP client (:mod:`ambient_grpc_auth._http`): bounded
by ``timeout`` and ``max_bytes``, no redirects, no proxy environment
variables. The async path resolves from memory inline and runs a due fetch in
a worker thread, so it never blocks the event loop.

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


class JwksCache:
    """Keys from a JWKS URL with last-good caching and a refetch cooldown.

    ``ca_file`` sets the trust roots for https (e.g. the pod's
    ``/var/run/secrets/kubernetes.io/serviceaccount/ca.crt``);
    ``bearer_token_file`` is re-read on every fetch and sent as
    ``Authorization: Bearer`` (the Kubernetes ``/openid/v1/jwks`` endpoint may
    require it). ``allow_insecure_remote`` permits a plain ``http`` URL whose
    host is not loopback or cluster-local. Raises :class:`ConfigurationError`
    for a bad URL or limits. Thread-safe; see the module docstring for the
    contract.
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
        if cooldown < 0 or refresh_interval <= 0 or timeout <= 0 or max_bytes <= 0:
            raise ConfigurationError("JWKS cache limits must be positive")
        self._url = url
        self._clock = clock
        self._cooldown = cooldown
        self._refresh_interval = refresh_interval
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._token_file = bearer_token_file
        self._metrics = metrics
        self._tls_context = ssl.create_default_context(
            cafile=os.fspath(ca_file) if ca_file else None
        )
        self._lock = threading.Lock()  # held across a fetch: single flight
        self._keys: Mapping[str, VerificationKey] | None = None
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._fetches = 0

    @property
    def fetch_count(self) -> int:
        """How many fetches were attempted (successful or not)."""
        return self._fetches

    @property
    def keys(self) -> Mapping[str, VerificationKey] | None:
        """The current key set (``None`` before the first successful fetch)."""
        return self._keys

    def _fresh(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at < self._refresh_interval

    def _fetch_due(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self._cooldown

    def _from_memory(self, kid: str | None) -> VerificationKey | None:
        # Lock-free read: self._keys is replaced whole, never mutated.
        if not self._fresh(self._clock.monotonic()):
            return None
        return _select(self._keys, kid)

    def get_key(self, kid: str | None) -> VerificationKey:
        key = self._from_memory(kid)
        if key is not None:
            return key
        with self._lock:
            now = self._clock.monotonic()
            # A fetch may have completed while this thread waited for the lock.
            key = _select(self._keys, kid)
            if (key is None or not self._fresh(now)) and self._fetch_due(now):
                self._refresh_locked(now)
        return _resolve(self._keys, kid)

    async def get_key_async(self, kid: str | None) -> VerificationKey:
        key = self._from_memory(kid)
        if key is not None:
            return key
        if not self._lock.locked() and not self._fetch_due(self._clock.monotonic()):
            # No fetch is running and none may start: answer from memory.
            return _resolve(self._keys, kid)
        return await asyncio.to_thread(self.get_key, kid)

    def refresh(self) -> bool:
        """Fetch now, ignoring the cooldown (e.g. to warm up at start).
        Returns whether the fetch succeeded; never raises for fetch failures."""
        with self._lock:
            return self._refresh_locked(self._clock.monotonic())

    def _refresh_locked(self, now: float) -> bool:
        self._attempted_at = now
        self._fetches += 1
        try:
            keys = parse_jwks(self._fetch())
        except (_FetchError, ValueError) as exc:
            _log.warning("JWKS fetch from %s failed: %s", self._display_url, exc)
            if self._metrics is not None:
                self._metrics.jwks_fetch(False)
            return False
        self._keys = keys
        self._fetched_at = self._clock.monotonic()
        if self._metrics is not None:
            self._metrics.jwks_fetch(True)
        return True

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
