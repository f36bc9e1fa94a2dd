"""Authenticators: turn a bearer token into a :class:`Principal` (server side).

One small protocol, :class:`Authenticator`, with a sync path
(``authenticate``, may block on a key fetch) and an async path
(``authenticate_async``, never blocks the event loop: cached keys and the
static token are checked inline, a key fetch runs in a worker thread). Both
raise :class:`TokenRejectedError`; :class:`UnrecognizedTokenError` means "not
my kind of token" so that an :class:`AuthenticatorChain` tries the next one.

- :class:`StaticTokenAuthenticator`: the shared service token
  (``AMBIENT_API_TOKEN``), compared in constant time as SHA-256 digests.
- :class:`JwtAuthenticator`: JWTs from configured issuers (:class:`TrustedIssuer`).
  The unverified ``iss`` only selects one configured issuer; verification then
  uses that issuer's name, audiences, algorithm allow-list and keys (selected
  by ``kid``; a token without ``kid`` is accepted only when the issuer has
  exactly one key). ``exp`` is required; ``exp``/``nbf``/``iat`` are checked
  against the injected clock with a bounded leeway. HMAC and ``none`` can
  never be allowed, and the key type must fit the algorithm.

Kubernetes service-account tokens are JWTs from the cluster's issuer; see
:func:`kubernetes_issuer` for a ready configuration (issuer name, the API
server's ``/openid/v1/jwks`` URL, the pod's CA file and token for that fetch).
The audience is whatever the caller's projected token was requested for.

Reasons (fixed words) for rejections: ``static_mismatch``, ``not_a_jwt``,
``unknown_issuer``, ``malformed``, ``alg_not_allowed``, ``alg_key_mismatch``,
``unknown_kid``, ``bad_signature``, ``bad_key``, ``wrong_audience``,
``wrong_issuer``, ``missing_claim``, ``invalid_claims``, ``expired``,
``not_yet_valid``, ``no_subject``, ``keys_unavailable`` (UNAVAILABLE).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import jwt

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.errors import ConfigurationError, TokenRejectedError
from ambient_grpc_auth.jwk import VerificationKey
from ambient_grpc_auth.principal import CallerKind, Principal
from ambient_grpc_auth.server.jwks import JwksCache, KeySource
from ambient_grpc_auth.server.metrics import MetricsHook

__all__ = [
    "DEFAULT_ALGORITHMS",
    "DEFAULT_LEEWAY",
    "DEFAULT_STATIC_USERNAME",
    "K8S_CA_FILE",
    "K8S_DEFAULT_ISSUER",
    "K8S_DEFAULT_JWKS_URL",
    "K8S_TOKEN_FILE",
    "MAX_LEEWAY",
    "STATIC_TOKEN_ISSUER",
    "SUPPORTED_ALGORITHMS",
    "Authenticator",
    "AuthenticatorChain",
    "JwtAuthenticator",
    "StaticTokenAuthenticator",
    "TrustedIssuer",
    "UnrecognizedTokenError",
    "kubernetes_issuer",
]

DEFAULT_STATIC_USERNAME = "ambient-api-token"
#: The issuer of the static token's principal. Not a URL, and refused as a
#: :class:`TrustedIssuer` name, so no JWT can ever carry it: an identity
#: provider's user named like the static token's username is someone else.
STATIC_TOKEN_ISSUER = "ambient-grpc-auth:static-token"  # noqa: S105 (a name)
#: Asymmetric algorithms accepted unless configured otherwise.
DEFAULT_ALGORITHMS: tuple[str, ...] = (
    "RS256",
    "RS384",
    "RS512",
    "ES256",
    "ES384",
    "PS256",
    "EdDSA",
)
#: Everything an issuer may allow. No HMAC (a public key must never double as
#: an HMAC secret) and no ``none``.
SUPPORTED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
#: Clock skew tolerated on exp/nbf/iat; bounded so a misconfiguration cannot
#: keep expired tokens alive for long.
DEFAULT_LEEWAY = 30.0
MAX_LEEWAY = 300.0

K8S_DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"
K8S_DEFAULT_JWKS_URL = "https://kubernetes.default.svc/openid/v1/jwks"
K8S_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
K8S_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 (a path)

_MAX_USERNAME_CHARS = 1024


class UnrecognizedTokenError(TokenRejectedError):
    """The token is not of the kind this authenticator handles (not a JWT,
    unknown issuer, not the static token); a chain tries the next one."""


@runtime_checkable
class Authenticator(Protocol):
    """Verifies a bearer token. Implementations are thread-safe.

    ``authenticate`` may block (e.g. fetching keys); ``authenticate_async``
    must not block the event loop. Both return the caller or raise
    :class:`TokenRejectedError` (never with token material in it).
    """

    def authenticate(self, token: str) -> Principal: ...

    async def authenticate_async(self, token: str) -> Principal: ...


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class StaticTokenAuthenticator:
    """Accepts one shared secret token as a service caller named ``username``,
    issued by :data:`STATIC_TOKEN_ISSUER`.

    Only the SHA-256 digest of the token is kept; comparison uses
    :func:`hmac.compare_digest` on equal-length digests.
    """

    def __init__(self, *, token: str, username: str = DEFAULT_STATIC_USERNAME) -> None:
        if not token or not token.isascii() or not token.isprintable() or " " in token:
            raise ConfigurationError("the static token must be non-empty visible ASCII")
        if not username:
            raise ConfigurationError("the static token's username must be non-empty")
        self._digest = _digest(token)
        self._principal = Principal(
            username=username, kind=CallerKind.SERVICE, issuer=STATIC_TOKEN_ISSUER
        )

    def authenticate(self, token: str) -> Principal:
        if hmac.compare_digest(_digest(token), self._digest):
            return self._principal
        raise UnrecognizedTokenError("static_mismatch")

    async def authenticate_async(self, token: str) -> Principal:
        return self.authenticate(token)

    def __repr__(self) -> str:
        return f"StaticTokenAuthenticator(username={self._principal.username!r})"


class AuthenticatorChain:
    """Tries authenticators in order. The first success wins; a definitive
    rejection stops the chain; if every one reports
    :class:`UnrecognizedTokenError`, the last such error is raised."""

    def __init__(self, *, authenticators: Sequence[Authenticator]) -> None:
        if not authenticators:
            raise ConfigurationError("an authenticator chain needs at least one authenticator")
        self._authenticators = tuple(authenticators)

    def authenticate(self, token: str) -> Principal:
        last = UnrecognizedTokenError("unrecognized")
        for authenticator in self._authenticators:
            try:
                return authenticator.authenticate(token)
            except UnrecognizedTokenError as exc:
                last = exc
        raise last

    async def authenticate_async(self, token: str) -> Principal:
        last = UnrecognizedTokenError("unrecognized")
        for authenticator in self._authenticators:
            try:
                return await authenticator.authenticate_async(token)
            except UnrecognizedTokenError as exc:
                last = exc
        raise last

    def __repr__(self) -> str:
        return f"AuthenticatorChain({list(self._authenticators)!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustedIssuer:
    """One trusted token issuer (immutable).

    Raises :class:`ConfigurationError` for invalid values.
    """

    #: The issuer name; must equal the tokens' ``iss``. It selects this
    #: configuration, and verification then checks it again.
    issuer: str
    #: Accepted audiences (at least one; a single string is accepted too);
    #: a token's ``aud`` must contain one of them.
    audiences: tuple[str, ...]
    #: Where verification keys come from, by ``kid``
    #: (:class:`~ambient_grpc_auth.server.jwks.StaticKeySet` or
    #: :class:`~ambient_grpc_auth.server.jwks.JwksCache`).
    keys: KeySource
    #: Allowed signature algorithms, a subset of :data:`SUPPORTED_ALGORITHMS`.
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    #: Clock skew tolerated on ``exp``/``nbf``/``iat``, in seconds (0 to
    #: :data:`MAX_LEEWAY`).
    leeway: float = DEFAULT_LEEWAY
    #: The claim used as the username, e.g. ``preferred_username``.
    username_claim: str = "sub"
    #: Marks our control plane: its runner tokens become service callers
    #: scoped to one session (see
    #: :class:`~ambient_grpc_auth.server.policy.CallerClassifier`).
    control_plane: bool = False

    def __post_init__(self) -> None:
        audiences = (self.audiences,) if isinstance(self.audiences, str) else tuple(self.audiences)
        object.__setattr__(self, "audiences", audiences)
        object.__setattr__(self, "algorithms", tuple(self.algorithms))
        if not self.issuer:
            raise ConfigurationError("JWT issuer name must be non-empty")
        if self.issuer == STATIC_TOKEN_ISSUER:
            raise ConfigurationError(f"{STATIC_TOKEN_ISSUER!r} is reserved for the static token")
        if not audiences or not all(isinstance(a, str) and a for a in audiences):
            raise ConfigurationError(f"issuer {self.issuer!r}: at least one audience is required")
        if not self.algorithms:
            raise ConfigurationError(f"issuer {self.issuer!r}: the algorithm allow-list is empty")
        refused = [a for a in self.algorithms if a not in SUPPORTED_ALGORITHMS]
        if refused:
            raise ConfigurationError(
                f"issuer {self.issuer!r}: algorithms {refused!r} are not allowed "
                "(only asymmetric signature algorithms; never HMAC or none)"
            )
        if not (0 <= self.leeway <= MAX_LEEWAY) or math.isnan(self.leeway):
            raise ConfigurationError(f"issuer {self.issuer!r}: leeway must be 0..{MAX_LEEWAY} s")
        if not self.username_claim:
            raise ConfigurationError(f"issuer {self.issuer!r}: username claim must be non-empty")
        if not isinstance(self.keys, KeySource):
            raise ConfigurationError(f"issuer {self.issuer!r}: keys must be a KeySource")


def kubernetes_issuer(
    *,
    audiences: str | Iterable[str],
    issuer: str = K8S_DEFAULT_ISSUER,
    jwks_url: str = K8S_DEFAULT_JWKS_URL,
    ca_file: str | os.PathLike[str] | None = K8S_CA_FILE,
    bearer_token_file: str | os.PathLike[str] | None = K8S_TOKEN_FILE,
    clock: Clock = SYSTEM_CLOCK,
    metrics: MetricsHook | None = None,
    leeway: float = DEFAULT_LEEWAY,
) -> TrustedIssuer:
    """An issuer for Kubernetes service-account tokens.

    ``issuer`` must match the cluster's ``--service-account-issuer`` (see
    ``kubectl get --raw /.well-known/openid-configuration``); ``audiences``
    are those the callers' projected tokens are requested for. Keys come from
    the API server's JWKS, fetched with the pod's CA and service-account token
    (the pod needs the ``system:service-account-issuer-discovery`` role).
    Kubernetes signs with RS256.
    """
    cache = JwksCache(
        jwks_url,
        clock=clock,
        ca_file=ca_file,
        bearer_token_file=bearer_token_file,
        metrics=metrics,
    )
    return TrustedIssuer(
        issuer=issuer,
        audiences=(audiences,) if isinstance(audiences, str) else tuple(audiences),
        keys=cache,
        algorithms=("RS256",),
        leeway=leeway,
    )


@dataclass(frozen=True, slots=True)
class _Candidate:
    issuer: TrustedIssuer
    alg: str
    kid: str | None


def _segment(segment: str) -> Any:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return json.loads(raw)
    except (ValueError, binascii.Error, RecursionError):
        return None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


#: Header parameters RFC 7515/7518 define; ``crit`` may not name them.
_STANDARD_HEADERS = frozenset(
    {"alg", "jku", "jwk", "kid", "x5u", "x5c", "x5t", "x5t#S256", "typ", "cty", "crit"}
)


def _crit_reason(crit: object) -> str:
    """Why a token with a ``crit`` header is refused (RFC 7515 section 4.1.11).

    ``crit`` lists extensions the recipient must understand; this verifier
    understands none, so every token carrying it is refused, whatever
    version of PyJWT is installed: ``malformed`` when the value is not a
    non-empty list of distinct strings naming non-standard parameters,
    ``unsupported_crit`` otherwise.
    """
    if (
        not isinstance(crit, list)
        or not crit
        or not all(isinstance(name, str) and name for name in crit)
        or len(set(crit)) != len(crit)
        or any(name in _STANDARD_HEADERS for name in crit)
    ):
        return "malformed"
    return "unsupported_crit"


class JwtAuthenticator:
    """Verifies JWTs from the configured :class:`TrustedIssuer` s with PyJWT.

    Thread-safe (immutable configuration; key sources are thread-safe).
    Unknown issuers and non-JWT tokens raise :class:`UnrecognizedTokenError`.
    """

    def __init__(self, *, issuers: Iterable[TrustedIssuer], clock: Clock = SYSTEM_CLOCK) -> None:
        table: dict[str, TrustedIssuer] = {}
        for item in issuers:
            if item.issuer in table:
                raise ConfigurationError(f"issuer {item.issuer!r} is configured twice")
            table[item.issuer] = item
        if not table:
            raise ConfigurationError("a JWT authenticator needs at least one issuer")
        self._issuers: Mapping[str, TrustedIssuer] = MappingProxyType(table)
        self._clock = clock
        # Time claims are checked below against the injected clock, not by PyJWT.
        self._jwt = jwt.PyJWT(options={"enforce_minimum_key_length": True})

    @property
    def issuers(self) -> Mapping[str, TrustedIssuer]:
        return self._issuers

    def authenticate(self, token: str) -> Principal:
        candidate = self._select(token)
        key = candidate.issuer.keys.get_key(candidate.kid)
        return self._verify(token, candidate, key)

    async def authenticate_async(self, token: str) -> Principal:
        candidate = self._select(token)
        key = await candidate.issuer.keys.get_key_async(candidate.kid)
        return self._verify(token, candidate, key)

    def _select(self, token: str) -> _Candidate:
        """Read the unverified header and ``iss`` only to pick an issuer."""
        parts = token.split(".")
        if len(parts) != 3:
            raise UnrecognizedTokenError("not_a_jwt")
        header, payload = _segment(parts[0]), _segment(parts[1])
        if not isinstance(header, dict) or not isinstance(payload, dict):
            raise UnrecognizedTokenError("not_a_jwt")
        iss = payload.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise UnrecognizedTokenError("unknown_issuer")
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise TokenRejectedError("alg_not_allowed")
        if (kid is not None and not isinstance(kid, str)) or header.get("b64", True) is not True:
            raise TokenRejectedError("malformed")
        if "crit" in header:
            raise TokenRejectedError(_crit_reason(header["crit"]))
        return _Candidate(issuer=issuer, alg=alg, kid=kid)

    def _verify(self, token: str, candidate: _Candidate, key: VerificationKey) -> Principal:
        issuer = candidate.issuer
        if not key.allows(candidate.alg):
            raise TokenRejectedError("alg_key_mismatch")
        try:
            claims = self._jwt.decode(
                token,
                key=key.key,
                algorithms=[candidate.alg],
                audience=list(issuer.audiences),
                issuer=issuer.issuer,
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["exp", "iss", "aud"],
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenRejectedError("bad_signature") from None
        except jwt.InvalidAudienceError:
            raise TokenRejectedError("wrong_audience") from None
        except jwt.InvalidIssuerError:
            raise TokenRejectedError("wrong_issuer") from None
        except jwt.MissingRequiredClaimError:
            raise TokenRejectedError("missing_claim") from None
        except jwt.InvalidAlgorithmError:
            raise TokenRejectedError("alg_not_allowed") from None
        except jwt.DecodeError:
            raise TokenRejectedError("malformed") from None
        except jwt.InvalidKeyError:
            raise TokenRejectedError("bad_key") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise TokenRejectedError("invalid_claims") from None
        self._check_times(claims, issuer.leeway)
        username = claims.get(issuer.username_claim)
        if not isinstance(username, str) or not username or len(username) > _MAX_USERNAME_CHARS:
            raise TokenRejectedError("no_subject")
        return Principal(
            username=username,
            kind=CallerKind.USER,
            issuer=issuer.issuer,
            claims=MappingProxyType(claims),
        )

    def _check_times(self, claims: Mapping[str, Any], leeway: float) -> None:
        now = self._clock.time()
        exp = _number(claims.get("exp"))
        if exp is None:
            raise TokenRejectedError("invalid_claims")
        if now >= exp + leeway:
            raise TokenRejectedError("expired")
        for name in ("nbf", "iat"):
            if name in claims:
                value = _number(claims[name])
                if value is None:
                    raise TokenRejectedError("invalid_claims")
                if value > now + leeway:
                    raise TokenRejectedError("not_yet_valid")

    def __repr__(self) -> str:
        return f"JwtAuthenticator(issuers={sorted(self._issuers)!r})"
