"""Token issuers: what the control plane hands a runner once its proof is accepted.

- :class:`JwtIssuer` mints a short-lived JWT (ES256 by default) scoped to the session, signed
  with the control plane's signing key and verifiable through its JWKS.
- :class:`~ambient_grpc_auth.controlplane.oidc_issuer.OidcClientCredentialsIssuer` (in
  :mod:`ambient_grpc_auth.controlplane.oidc_issuer`) obtains a service token from an
  upstream OAuth2/OIDC provider instead.

Both implement :class:`TokenIssuer`. An issuer that cannot produce a token
raises :class:`TokenIssueError`, which the token endpoint answers with 500 and
a short fixed body.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import jwt

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.claims import RUNNER_TOKEN_USE, SESSION_ID_CLAIM, TOKEN_USE_CLAIM
from ambient_grpc_auth.controlplane.signing import SigningKey, SigningKeySet, jwks
from ambient_grpc_auth.errors import AmbientAuthError, ConfigurationError

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_SUBJECT",
    "DEFAULT_TTL_SECONDS",
    "DEFAULT_USERNAME",
    "IssuedToken",
    "JwtIssuer",
    "TokenIssueError",
    "TokenIssuer",
    "format_rfc3339",
]

#: The identity runner tokens are issued to, as the API server sees it.
DEFAULT_SUBJECT = "system:serviceaccount:ambient-code:ambient-runner"
#: The ``preferred_username`` of runner tokens. Our API server never reads
#: it; the platform's API server names the caller by it (it skips any
#: ``sub`` holding ``:``) and treats that name as a service caller when it
#: equals its ``GRPC_SERVICE_ACCOUNT`` (or ``service-account-`` + that).
DEFAULT_USERNAME = "ambient-runner"
_USERNAME_CLAIM = "preferred_username"
_MAX_USERNAME_CHARS = 256
#: The ``aud`` the API server expects of runner tokens.
DEFAULT_AUDIENCE = "ambient-api-server"
#: Lifetime of issued runner tokens: 15 minutes.
DEFAULT_TTL_SECONDS = 900.0
#: Issued tokens never live longer than this, whatever is configured.
MAX_TTL_SECONDS = 24 * 3600.0
#: How long past its last token's expiry a retired key stays in the JWKS:
#: covers verifiers that accept ``exp`` with some leeway.
RETIRED_KEY_GRACE_SECONDS = 60.0


def format_rfc3339(moment: datetime) -> str:
    """``2026-11-29T10:00:00Z``: UTC, whole seconds (the wire format of ``expires_at``)."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class IssuedToken:
    """A token and its expiry. The repr hides the token."""

    #: The bearer value handed to the runner (secret: never logged).
    token: str = field(repr=False)
    #: When the token stops being accepted (timezone-aware, UTC).
    expires_at: datetime

    def to_json(self) -> dict[str, str]:
        """The 200 body of ``GET /token``."""
        return {"token": self.token, "expires_at": format_rfc3339(self.expires_at)}


class TokenIssueError(AmbientAuthError):
    """No token could be issued (upstream failure, no key...). The message is
    safe to log: it never contains a token, secret or proof."""


@runtime_checkable
class TokenIssuer(Protocol):
    """Issues a token for a session whose proof has been accepted.

    Implementations must be safe for concurrent use from one event loop, must
    raise :class:`TokenIssueError` (and nothing else on purpose) when no token
    can be issued, and must not log the token.
    """

    async def issue(self, session_id: str) -> IssuedToken: ...


class JwtIssuer:
    """Mints JWTs for runners, signed with the current key's algorithm
    (ES256 for an EC P-256 key, RS256 for RSA, EdDSA for Ed25519).

    Claims: ``iss``, ``aud``, ``sub``, ``iat``, ``exp`` (``iat + ttl``),
    ``session_id`` (:data:`~ambient_grpc_auth.claims.SESSION_ID_CLAIM`),
    ``token_use`` = :data:`~ambient_grpc_auth.claims.RUNNER_TOKEN_USE` and, unless
    ``username`` is None, ``preferred_username``. The header is ``alg`` and
    the signing key's ``kid`` (its RFC 7638 thumbprint).
    The bearer rides on every call, so nothing a verifier does not read is
    in it: no ``nbf`` (it would equal ``iat``, which verifiers already check
    against the clock), no ``jti`` (nothing tracks token ids; the proof
    nonce is what is single-use) and no ``typ`` header.

    ``preferred_username`` is for the platform's API server only (see
    :data:`DEFAULT_USERNAME`); our API server classifies runner tokens by
    issuer, ``token_use`` and ``session_id`` and names the caller by ``sub``,
    so this claim grants nothing there.

    Settings (keyword-only; ConfigurationError when invalid):

    - ``signing_keys``: a fixed :class:`SigningKeySet`, or a callable returning
      the current one (e.g. a :class:`~ambient_grpc_auth.controlplane.keys.SigningKeyStore`
      that follows rotations). Tokens are signed with the current key only.
    - ``issuer``: the ``iss`` claim (required; verifiers match it exactly).
    - ``audience``: the ``aud`` claim, one audience or several (required).
    - ``ttl``: token lifetime in seconds, at most :data:`MAX_TTL_SECONDS`.
    - ``subject``: the ``sub`` claim, the identity the API server sees.
    - ``username``: the ``preferred_username`` claim (None leaves it out);
      non-empty, without ``:`` (the platform would skip such a name).
    - ``clock``: time source for ``iat``/``exp`` and key retirement.
    - ``retired_key_grace``: seconds a retired key stays published after its
      last token expired (:data:`RETIRED_KEY_GRACE_SECONDS`): :meth:`jwks`
      publishes the current key plus every retired key that may still have
      unexpired tokens (retired less than ``ttl + grace`` ago).
    - ``executor``: where :meth:`issue` makes RSA signatures, off the event
      loop (default: on the calling thread). ES256 and EdDSA signatures are
      always made on the calling thread: they cost less than a thread hop.
      So is the signing-key lookup, which for a
      :class:`~ambient_grpc_auth.controlplane.keys.SigningKeyStore` means a
      look at the key directory once per ``check_interval`` (a listing and
      a few ``stat`` calls; the key files are read again only after a
      rotation).

    Thread-safe. Signing costs tens of microseconds with ES256 or EdDSA, one
    RSA-2048 private-key operation (~1-2 ms) with RS256.
    """

    def __init__(
        self,
        *,
        signing_keys: SigningKeySet | Callable[[], SigningKeySet],
        issuer: str,
        audience: str | Sequence[str] = DEFAULT_AUDIENCE,
        ttl: float = DEFAULT_TTL_SECONDS,
        subject: str = DEFAULT_SUBJECT,
        username: str | None = DEFAULT_USERNAME,
        clock: Clock = SYSTEM_CLOCK,
        retired_key_grace: float = RETIRED_KEY_GRACE_SECONDS,
        executor: Executor | None = None,
    ) -> None:
        if not issuer:
            raise ConfigurationError("JWT issuer: issuer is required")
        aud: str | list[str] = audience if isinstance(audience, str) else list(audience)
        if not aud or (isinstance(aud, list) and not all(aud)):
            raise ConfigurationError("JWT issuer: audience is required")
        if not 0 < ttl <= MAX_TTL_SECONDS:
            raise ConfigurationError(
                f"JWT issuer: ttl must be in (0, {int(MAX_TTL_SECONDS)}] seconds"
            )
        if not subject:
            raise ConfigurationError("JWT issuer: subject is required")
        if username is not None and (
            not username or ":" in username or len(username) > _MAX_USERNAME_CHARS
        ):
            raise ConfigurationError(
                f"JWT issuer: username must be 1-{_MAX_USERNAME_CHARS} characters without ':'"
            )
        self._keys: Callable[[], SigningKeySet] = (
            (lambda: signing_keys) if isinstance(signing_keys, SigningKeySet) else signing_keys
        )
        self.issuer = issuer
        self.audience = aud
        self.ttl = float(ttl)
        self.subject = subject
        self.username = username
        self._clock = clock
        self._grace = retired_key_grace
        self._executor = executor
        self._jwks_lock = threading.Lock()
        self._jwks_cache: tuple[tuple[str, ...], dict[str, Any]] | None = None

    @property
    def algorithms(self) -> list[str]:
        """The algorithms of the keys published now, current key's first."""
        keys = self._keys().published(
            now=self._clock.time(), max_token_ttl=self.ttl, grace=self._grace
        )
        return list(dict.fromkeys(k.algorithm for k in keys))

    def issue_now(self, session_id: str) -> IssuedToken:
        """Sign a token for ``session_id`` on the calling thread."""
        return self._sign(session_id, self._keys().current)

    def _sign(self, session_id: str, key: SigningKey) -> IssuedToken:
        now = int(self._clock.time())
        exp = now + int(self.ttl)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": self.subject,
            "iat": now,
            "exp": exp,
            SESSION_ID_CLAIM: session_id,
            TOKEN_USE_CLAIM: RUNNER_TOKEN_USE,
        }
        if self.username is not None:
            claims[_USERNAME_CLAIM] = self.username
        try:
            # A falsy typ makes PyJWT leave the header member out.
            token = jwt.encode(
                claims,
                key.private_key,
                algorithm=key.algorithm,
                headers={"kid": key.kid, "typ": None},
            )
        except Exception as exc:  # a broken key must not surface as a crash
            raise TokenIssueError(f"signing failed ({type(exc).__name__})") from None
        return IssuedToken(token=token, expires_at=datetime.fromtimestamp(exp, UTC))

    async def issue(self, session_id: str) -> IssuedToken:
        # An RSA signature goes off the event loop; an ES256 or EdDSA one
        # costs less than handing it to a thread and back, so it is made here.
        key = self._keys().current
        if self._executor is None or not key.signs_slowly:
            return self._sign(session_id, key)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._sign, session_id, key)

    def jwks(self) -> dict[str, Any]:
        """The JWK Set to publish now (a fresh dict each call)."""
        keys = self._keys().published(
            now=self._clock.time(), max_token_ttl=self.ttl, grace=self._grace
        )
        kids = tuple(k.kid for k in keys)
        with self._jwks_lock:
            if self._jwks_cache is None or self._jwks_cache[0] != kids:
                self._jwks_cache = (kids, jwks(keys))
            doc = self._jwks_cache[1]
        return {"keys": [dict(k) for k in doc["keys"]]}

    def __repr__(self) -> str:
        return f"JwtIssuer(issuer={self.issuer!r}, audience={self.audience!r}, ttl={self.ttl})"
