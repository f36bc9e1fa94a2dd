"""The control-plane token source: trade a session proof for an API token.

``GET <url>`` with ``Authorization: Bearer <proof>`` where the proof is the
session id encrypted under the control plane's RSA public key
(:mod:`ambient_grpc_auth.proof`); the answer is
``{"token": "...", "expires_at": "<RFC 3339>"}`` (``expires_at`` optional:
older control planes omit it, and the token's JWT ``exp`` is used instead).

Failure handling, shared by the sync and async paths:

- connection errors, timeouts, 408, 429 and 5xx are retried up to
  ``attempts`` times in total with capped exponential backoff and jitter;
  the resulting error is ``retryable=True``;
- 401/403 (the proof was refused), other 4xx and 3xx (redirects are never
  followed: they would carry the proof elsewhere) are not retried:
  ``retryable=False``;
- a 200 whose body is not a JSON object with a non-empty string ``token`` is
  not retried and is ``retryable=False``: it means the URL points at
  something that is not a token endpoint, which waiting will not fix;
- an oversized response (more than ``max_response_bytes``) likewise.

Which proof: ``proof="auto"`` (the default) asks the control plane once which
proof versions it accepts (``GET`` of the discovery document next to the
token URL, ``.well-known/openid-configuration``; the
``X-Ambient-Proof-Versions`` header of any response, or the
``ambient_proof_versions_supported`` member of the document) and then uses
the strongest one it can produce: ``pod`` when advertised and the projected
service-account token file exists, else ``v2`` when advertised, else ``v1``
(a control plane that advertises nothing, like the platform's own, gets v1:
it has no v2 parser). Every ``/token`` response refreshes what is known; a
response without the header after an advertisement (the control plane was
replaced) makes the next fetch ask again, and a 401 that advertises
something else is retried at once with the fitting version. ``"v1"``,
``"v2"`` and ``"pod"`` skip the negotiation. A ``pod`` proof is a v2 proof plus
the service-account token in the ``X-Ambient-Pod-Token`` header, re-read
from its file for every request (the kubelet rotates it).

Where the proof may go: ``https`` to any host; plain ``http`` only to
loopback and cluster-local hosts (the policy of
:mod:`ambient_grpc_auth._locality`, the same as for gRPC targets), unless
``allow_insecure_remote=True``. A proof sniffed on the way can be replayed
(v1 proofs for ever, v2 proofs within their freshness window), and the token
that comes back would travel in plaintext too.

Errors name the endpoint (without its query), the HTTP status and a short
excerpt of an error body scrubbed of anything bearer-like. They never contain
the proof, the session id or a token; 200 bodies are never quoted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import posixpath
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from cryptography.hazmat.primitives.asymmetric import rsa

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth._http import (
    HttpResponse,
    TransportError,
    excerpt,
    parse_rfc3339,
    request_async,
    request_sync,
    safe_url,
    validate_http_url,
)
from ambient_grpc_auth._locality import check_url_plaintext
from ambient_grpc_auth._version import __version__
from ambient_grpc_auth.client.tokens import Token, jwt_expiry
from ambient_grpc_auth.controlplane.keys import load_public_key
from ambient_grpc_auth.errors import ConfigurationError, KeyFileError, TokenUnavailableError
from ambient_grpc_auth.proof import (
    DEFAULT_SESSION_ID_RULE,
    POD_TOKEN_HEADER,
    PROOF_VERSIONS_FIELD,
    PROOF_VERSIONS_HEADER,
    SessionIdRule,
    encrypt_v1,
    encrypt_v2,
    parse_proof_versions,
)

__all__ = [
    "CP_PROOF_VERSION_ENV",
    "CP_PUBLIC_KEY_ENV",
    "CP_SA_TOKEN_FILE_ENV",
    "CP_TOKEN_URL_ENV",
    "DEFAULT_CP_SA_TOKEN_FILE",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "SESSION_ID_ENV",
    "ControlPlaneTokenSource",
    "ProofVersion",
]

_log = logging.getLogger(__name__)

CP_TOKEN_URL_ENV = "AMBIENT_CP_TOKEN_URL"  # noqa: S105 (a variable name)
CP_PUBLIC_KEY_ENV = "AMBIENT_CP_TOKEN_PUBLIC_KEY"
SESSION_ID_ENV = "SESSION_ID"
CP_PROOF_VERSION_ENV = "AMBIENT_CP_PROOF_VERSION"
CP_SA_TOKEN_FILE_ENV = "AMBIENT_CP_SA_TOKEN_FILE"  # noqa: S105 (a variable name)
#: Where the runner's projected service-account token (audience: the control
#: plane) is mounted by default.
DEFAULT_CP_SA_TOKEN_FILE = "/var/run/secrets/tokens/ambient-cp-token"  # noqa: S105 (a path)
DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
_MAX_TOKEN_CHARS = 16 * 1024
_RETRY_STATUSES = frozenset({408, 429})
# Discovery is one small request; it must not eat the token request's budget.
_DISCOVERY_TIMEOUT = 5.0
_DISCOVERY_MAX_BYTES = 64 * 1024
_MAX_SA_TOKEN_BYTES = 16 * 1024
_HEADER_KEY = PROOF_VERSIONS_HEADER.lower()

ProofVersion = Literal["auto", "v1", "v2", "pod"]
_PROOF_CHOICES_TYPED: tuple[ProofVersion, ...] = get_args(ProofVersion)
_PROOF_CHOICES: tuple[str, ...] = _PROOF_CHOICES_TYPED


@dataclass(frozen=True, slots=True)
class _Failure:
    message: str
    retryable: bool  # may a later attempt succeed?
    status: int | None = None
    at_once: bool = False  # retry without waiting (the control plane changed)


class ControlPlaneTokenSource:
    """Fetches runner tokens from the control plane's ``/token`` endpoint.

    ``public_key`` is PEM text (or base64 of PEM, as passed through
    environment variables) or an ``RSAPublicKey``. ``proof`` selects the
    proof format: ``"auto"`` (default: negotiated, see the module docs),
    ``"v1"`` (the platform's original format), ``"v2"`` (replay resistant) or
    ``"pod"`` (v2 plus the service-account token read from
    ``sa_token_file``, which must exist then).
    ``timeout`` bounds each attempt; ``attempts`` counts all tries; the
    delay before retry *n* is drawn from [d/2, d] with
    ``d = min(backoff_cap, backoff_base * 2**(n-1))``. ``sleep`` and
    ``async_sleep`` are injectable for tests. ``allow_insecure_remote``
    permits plain ``http`` to a host that is not loopback or cluster-local
    (see the module docs). ``session_id`` must satisfy ``session_id_rule``
    (default: the control plane's default
    :class:`~ambient_grpc_auth.proof.SessionIdRule`, at least 8 printable
    characters and no whitespace; pass the rule the control plane runs with
    if it is stricter); ``session_id_name`` is how errors name it.

    Every call performs a fetch: wrap the source in a
    :class:`~ambient_grpc_auth.client.caching.CachingTokenSource`. Environment
    proxies are ignored. Thread-safe: besides the random generator, the only
    shared state is what the control plane advertised and :attr:`last_version`,
    each replaced whole (concurrent first fetches may each ask). Raises
    :class:`ConfigurationError` at construction for a bad URL (or plain http
    to a remote host), key or session id, and :class:`TokenUnavailableError`
    from ``get_token``/``get_token_async``.
    """

    def __init__(
        self,
        url: str,
        public_key: str | bytes | rsa.RSAPublicKey,
        session_id: str,
        *,
        proof: ProofVersion = "auto",
        sa_token_file: str | os.PathLike[str] = DEFAULT_CP_SA_TOKEN_FILE,
        timeout: float = 10.0,
        attempts: int = 3,
        backoff_base: float = 0.5,
        backoff_cap: float = 5.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        clock: Clock = SYSTEM_CLOCK,
        sleep: Callable[[float], object] = time.sleep,
        async_sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rng: random.Random | None = None,
        allow_insecure_remote: bool = False,
        session_id_rule: SessionIdRule = DEFAULT_SESSION_ID_RULE,
        session_id_name: str = "session id",
    ) -> None:
        self._parts = validate_http_url(url, what="control-plane token URL")
        check_url_plaintext(
            self._parts,
            allow_remote=allow_insecure_remote,
            sending="the session proof",
            what="control-plane token URL",
            allow_flag="allow_insecure_remote=True",
        )
        self.url = url
        self.endpoint = safe_url(self._parts)
        if isinstance(public_key, str | bytes):
            try:
                public_key = load_public_key(public_key, source="control-plane public key")
            except KeyFileError as exc:
                raise ConfigurationError(str(exc)) from None
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise ConfigurationError("control-plane public key must be an RSA public key")
        if proof not in _PROOF_CHOICES:
            raise ConfigurationError(f"proof must be one of {', '.join(_PROOF_CHOICES)}")
        self.sa_token_file = os.fspath(sa_token_file)
        if proof == "pod" and not os.path.isfile(self.sa_token_file):
            raise ConfigurationError(
                f"pod-bound proof: no service-account token file at {self.sa_token_file}"
            )
        if not isinstance(session_id, str) or not session_id.strip():
            raise ConfigurationError("session id is empty")
        # The control plane's own rule, checked here so that a bad id fails
        # at start instead of as a 403 at every fetch.
        session_id_rule.check(session_id, what=session_id_name)
        if not (timeout > 0 and math.isfinite(timeout)) or attempts < 1:
            raise ConfigurationError("timeout must be positive and attempts at least 1")
        if backoff_base < 0 or backoff_cap < backoff_base or max_response_bytes < 1:
            raise ConfigurationError("need 0 <= backoff_base <= backoff_cap, max bytes >= 1")
        self._key = public_key
        self._session_id = session_id
        self.proof = proof
        self.timeout = timeout
        self.attempts = attempts
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._max_bytes = max_response_bytes
        self._clock = clock
        self._sleep = sleep
        self._async_sleep = async_sleep
        self._rng = rng or random.Random()
        # What the control plane advertised; None: not known (ask first).
        self._advertised: frozenset[str] | None = None
        #: The proof version of the last token request (None before the first).
        self.last_version: str | None = None
        discovery_path = posixpath.join(
            posixpath.dirname(self._parts.path or "/"), ".well-known/openid-configuration"
        )
        self._discovery_url = f"{self._parts.scheme}://{self._parts.netloc}{discovery_path}"
        self._seal("v2")  # fails now, not at the first fetch, if the id does not fit the key

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        proof: ProofVersion | None = None,
        clock: Clock = SYSTEM_CLOCK,
        timeout: float = 10.0,
        attempts: int = 3,
        allow_insecure_remote: bool = False,
    ) -> ControlPlaneTokenSource:
        """Build from ``AMBIENT_CP_TOKEN_URL``, ``AMBIENT_CP_TOKEN_PUBLIC_KEY``
        (PEM text) and ``SESSION_ID``; ConfigurationError names what is missing.
        ``AMBIENT_CP_PROOF_VERSION`` (``auto``, ``v1``, ``v2``, ``pod``;
        default ``auto``) chooses the proof unless ``proof`` is given;
        ``AMBIENT_CP_SA_TOKEN_FILE`` overrides :data:`DEFAULT_CP_SA_TOKEN_FILE`."""
        env = os.environ if environ is None else environ
        mode = proof if proof is not None else _proof_from_env(env)
        sa_token_file = env.get(CP_SA_TOKEN_FILE_ENV, "").strip() or DEFAULT_CP_SA_TOKEN_FILE
        url = env.get(CP_TOKEN_URL_ENV, "").strip()
        pem = env.get(CP_PUBLIC_KEY_ENV, "").strip()
        session_id = env.get(SESSION_ID_ENV, "").strip()
        missing = [
            name
            for name, value in (
                (CP_TOKEN_URL_ENV, url),
                (CP_PUBLIC_KEY_ENV, pem),
                (SESSION_ID_ENV, session_id),
            )
            if not value
        ]
        if missing:
            raise ConfigurationError(
                f"control-plane token source needs {', '.join(missing)} to be set"
            )
        return cls(
            url,
            pem,
            session_id,
            proof=mode,
            sa_token_file=sa_token_file,
            clock=clock,
            timeout=timeout,
            attempts=attempts,
            allow_insecure_remote=allow_insecure_remote,
            session_id_name=SESSION_ID_ENV,
        )

    def __repr__(self) -> str:
        return f"ControlPlaneTokenSource(endpoint={self.endpoint!r}, proof={self.proof!r})"

    @property
    def advertised(self) -> frozenset[str] | None:
        """The proof versions the control plane advertised (empty: none;
        None: not asked yet, or to be asked again)."""
        return self._advertised

    # --- pure parts ---------------------------------------------------------

    def _needs_discovery(self) -> bool:
        return self.proof == "auto" and self._advertised is None

    def _choose(self) -> str:
        if self.proof != "auto":
            return self.proof
        advertised = self._advertised or frozenset()
        if "pod" in advertised and os.path.isfile(self.sa_token_file):
            return "pod"
        return "v2" if "v2" in advertised else "v1"

    def _seal(self, version: str) -> str:
        if version == "v1":
            return encrypt_v1(self._key, self._session_id)
        return encrypt_v2(self._key, self._session_id, now=self._clock.time())

    def _sa_token(self) -> str | _Failure:
        try:
            with open(self.sa_token_file, "rb") as fh:
                raw = fh.read(_MAX_SA_TOKEN_BYTES + 1)
        except OSError as exc:
            # The kubelet swaps the file atomically; a failed read may pass.
            return _Failure(f"cannot read the service-account token ({exc.strerror})", True)
        value = raw.decode("ascii", "replace").strip()
        if len(raw) > _MAX_SA_TOKEN_BYTES or not value or not value.isprintable() or " " in value:
            return _Failure("the service-account token file holds no token", retryable=False)
        return value

    def _request(self) -> tuple[str, dict[str, str]] | _Failure:
        """The version to use and the request headers for it."""
        version = self._choose()
        headers = self._headers(self._seal(version))
        if version == "pod":
            sa_token = self._sa_token()
            if isinstance(sa_token, _Failure):
                return sa_token
            headers[POD_TOKEN_HEADER] = sa_token
        self.last_version = version
        return version, headers

    def _headers(self, proof: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"ambient-grpc-auth/{__version__}"}
        if proof is not None:
            headers["Authorization"] = "Bearer " + proof
        return headers

    def _learn_discovery(self, response: HttpResponse) -> _Failure | None:
        if response.status >= 500 or response.status in _RETRY_STATUSES:
            return _Failure(
                f"discovery HTTP {response.status}", retryable=True, status=response.status
            )
        header = response.headers.get(_HEADER_KEY)
        if header is not None:
            self._advertised = parse_proof_versions(header)
            return None
        field: object = None
        if response.status == 200:
            try:
                doc = json.loads(response.body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                doc = None
            if isinstance(doc, dict):
                field = doc.get(PROOF_VERSIONS_FIELD)
        # Anything else (404, not JSON, no member): nothing advertised, v1.
        self._advertised = parse_proof_versions(field)
        return None

    def _interpret(
        self, response: HttpResponse, headers: Mapping[str, str], version: str
    ) -> Token | _Failure:
        header = response.headers.get(_HEADER_KEY)
        if self.proof == "auto":
            if header is not None:
                self._advertised = parse_proof_versions(header)
            elif self._advertised:
                self._advertised = None  # the control plane changed: ask again next time
        status = response.status
        if status == 200:
            return _parse_body(response.body)
        secrets = tuple(v for k, v in headers.items() if k in ("Authorization", POD_TOKEN_HEADER))
        detail = excerpt(response.body, secrets=secrets)
        message = f"HTTP {status}: {detail}"
        if status >= 500 or status in _RETRY_STATUSES:
            return _Failure(message, retryable=True, status=status)
        if 300 <= status < 400:
            message = f"HTTP {status} (redirects are not followed)"
        if status == 401 and self._advertised == frozenset({"pod"}) and version != "pod":
            message += (
                " (the control plane requires the pod-bound proof; no service-account"
                f" token at {self.sa_token_file})"
            )
        changed = (
            status == 401
            and self.proof == "auto"
            and (self._advertised is None or self._choose() != version)
        )
        return _Failure(message, retryable=changed, status=status, at_once=changed)

    def _delay(self, attempt: int) -> float:
        ceiling = min(self._backoff_cap, self._backoff_base * (2.0 ** min(attempt - 1, 32)))
        return self._rng.uniform(ceiling / 2, ceiling)

    def _error(self, failure: _Failure, attempt: int) -> TokenUnavailableError:
        tries = f"{attempt} attempt" + ("s" if attempt > 1 else "")
        return TokenUnavailableError(
            f"control-plane token request to {self.endpoint} failed after {tries}: "
            f"{failure.message}",
            retryable=failure.retryable,
            status=failure.status,
        )

    def _transport_failure(self, exc: TransportError) -> _Failure:
        return _Failure(exc.description, retryable=exc.retryable)

    # --- drivers ------------------------------------------------------------

    def get_token(self) -> Token:
        """Fetch a token (blocking; up to ``attempts`` HTTP requests)."""
        attempt = 0
        while True:
            attempt += 1
            outcome: Token | _Failure
            try:
                early: _Failure | None = None
                if self._needs_discovery():
                    early = self._learn_discovery(
                        request_sync(
                            self._discovery_url,
                            self._headers(None),
                            time_limit=min(self.timeout, _DISCOVERY_TIMEOUT),
                            max_bytes=_DISCOVERY_MAX_BYTES,
                        )
                    )
                planned = early if early is not None else self._request()
                if isinstance(planned, _Failure):
                    outcome = planned
                else:
                    version, headers = planned
                    response = request_sync(
                        self.url, headers, time_limit=self.timeout, max_bytes=self._max_bytes
                    )
                    outcome = self._interpret(response, headers, version)
            except TransportError as exc:
                outcome = self._transport_failure(exc)
            if isinstance(outcome, Token):
                return outcome
            delay = self._retry_delay(outcome, attempt)
            if delay is not None:
                self._sleep(delay)

    def _retry_delay(self, outcome: _Failure, attempt: int) -> float | None:
        """After attempt number ``attempt`` failed with ``outcome`` (both
        twins): raise the final error, or return the seconds to wait before
        the next attempt (``None``: at once)."""
        if not outcome.retryable or attempt >= self.attempts:
            raise self._error(outcome, attempt)
        if outcome.at_once:
            return None
        delay = self._delay(attempt)
        _log.info(
            "control-plane token request failed (%s); retrying in %.2fs",
            outcome.message,
            delay,
        )
        return delay

    async def get_token_async(self) -> Token:
        """As :meth:`get_token`, on aiohttp; never blocks the event loop."""
        attempt = 0
        while True:
            attempt += 1
            outcome: Token | _Failure
            try:
                early: _Failure | None = None
                if self._needs_discovery():
                    early = self._learn_discovery(
                        await request_async(
                            self._discovery_url,
                            self._headers(None),
                            time_limit=min(self.timeout, _DISCOVERY_TIMEOUT),
                            max_bytes=_DISCOVERY_MAX_BYTES,
                        )
                    )
                planned = early if early is not None else self._request()
                if isinstance(planned, _Failure):
                    outcome = planned
                else:
                    version, headers = planned
                    response = await request_async(
                        self.url, headers, time_limit=self.timeout, max_bytes=self._max_bytes
                    )
                    outcome = self._interpret(response, headers, version)
            except TransportError as exc:
                outcome = self._transport_failure(exc)
            if isinstance(outcome, Token):
                return outcome
            delay = self._retry_delay(outcome, attempt)
            if delay is not None:
                await self._async_sleep(delay)


def _proof_from_env(env: Mapping[str, str]) -> ProofVersion:
    chosen = env.get(CP_PROOF_VERSION_ENV, "").strip().lower() or "auto"
    for version in _PROOF_CHOICES_TYPED:
        if version == chosen:
            return version
    raise ConfigurationError(f"{CP_PROOF_VERSION_ENV} must be one of {', '.join(_PROOF_CHOICES)}")


def _parse_body(body: bytes) -> Token | _Failure:
    """The token from a 200 body. The body itself is never quoted: it may hold
    a token even when malformed."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _Failure("HTTP 200 with a body that is not JSON", retryable=False, status=200)
    if not isinstance(doc, dict):
        return _Failure("HTTP 200 with JSON that is not an object", retryable=False, status=200)
    value = doc.get("token")
    if not isinstance(value, str) or not value:
        return _Failure("HTTP 200 without a token", retryable=False, status=200)
    if (
        len(value) > _MAX_TOKEN_CHARS
        or not value.isascii()
        or not value.isprintable()
        or " " in value
    ):
        return _Failure("HTTP 200 with a malformed token", retryable=False, status=200)
    expires_at: float | None = None
    raw = doc.get("expires_at")
    if isinstance(raw, str) and raw:
        try:
            expires_at = parse_rfc3339(raw)
        except (ValueError, OverflowError):
            _log.warning("control plane sent an unparseable expires_at; using the token's exp")
    elif raw is not None:
        _log.warning("control plane sent a non-string expires_at; using the token's exp")
    if expires_at is None:
        expires_at = jwt_expiry(value)
    return Token(value, expires_at)
