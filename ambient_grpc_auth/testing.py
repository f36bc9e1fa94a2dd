"""Helpers for testing code that uses this library (no real time, no real IdP).

- :class:`FakeClock`: a manually advanced :class:`Clock`; pass it wherever a
  ``clock=`` is accepted (caching token source, JWT authenticator, token cache, JWKS
  cache, control plane) to test expiry and backoff without sleeping.
- :class:`FakeTokenSource`: a refreshable token source (sync and async) that
  hands out scripted or made-up tokens and counts fetches, failures and
  invalidations, for testing runner-side code.
- :class:`FakeIssuer`: a fresh key pair that mints signed JWTs with chosen
  claims, issuer, audience and expiry, and the matching
  :class:`~ambient_grpc_auth.server.jwks.StaticKeySet` and
  :class:`~ambient_grpc_auth.server.authn.TrustedIssuer`, for testing an API
  server's configuration end to end.

Nothing here reads the environment, sleeps, or touches the network, and the
module needs only the library's own dependencies. None of it belongs in
production code: the keys are generated in memory and the tokens are for
tests only.

Example::

    clock = FakeClock()
    idp = FakeIssuer("https://idp.test", audience="my-api", clock=clock)
    config = ServerAuthConfig.from_env(issuers=[idp.trusted_issuer()], clock=clock, ...)
    token = idp.mint("alice", ttl=60)  # accepted by a server built on ``config``
    clock.advance(60 + 30)  # past exp and the default leeway: now refused as expired
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.claims import RUNNER_TOKEN_USE, SESSION_ID_CLAIM, TOKEN_USE_CLAIM
from ambient_grpc_auth.client.tokens import Token
from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.jwk import VerificationKey, jwk_thumbprint
from ambient_grpc_auth.server.authn import DEFAULT_LEEWAY, TrustedIssuer
from ambient_grpc_auth.server.jwks import StaticKeySet

# Clock is re-exported: it is the protocol every ``clock=`` parameter accepts,
# for annotating fakes of one's own.
__all__ = ["Clock", "FakeClock", "FakeIssuer", "FakeTokenSource"]

_SigningKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# --- clock ---------------------------------------------------------------------


class FakeClock:
    """A clock that moves only when told to (:meth:`advance`).

    ``time()`` starts at ``start`` (Unix seconds; the default is a fixed date
    in 2027), ``monotonic()`` at 1000.0; both move together. Reads and
    ``advance`` are safe from any thread (one float update each).
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._wall = start
        self._mono = 1000.0

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks by ``seconds`` (negative values step wall time back,
        e.g. to simulate skew; monotonic time moves back too, so use with care)."""
        self._wall += seconds
        self._mono += seconds

    def __repr__(self) -> str:
        return f"FakeClock(time={self._wall!r})"


# --- token source ----------------------------------------------------------------

_Scripted: TypeAlias = Token | str | BaseException


class FakeTokenSource:
    """A refreshable token source for tests (sync and async).

    It behaves like a caching source: it holds at most one token and returns it
    until :meth:`invalidate` drops it or it expires (by ``clock``); the next
    call then *fetches*. A fetch takes the next scripted item (given to the
    constructor or to :meth:`enqueue`): a :class:`Token`; a ``str`` (its JWT
    ``exp``, if any, becomes the expiry); or an exception, which is raised
    (e.g. :class:`~ambient_grpc_auth.errors.TokenUnavailableError` to simulate
    an unreachable control plane). With nothing scripted it makes up
    ``"<prefix>-<n>"`` (``n`` counts the tokens handed out by fetches) valid
    for ``ttl`` seconds of ``clock``, or with unknown expiry when ``ttl`` is
    None. Raises :class:`ConfigurationError` for an empty ``prefix``.

    Counters for assertions: :attr:`fetches` (fetches that produced a token),
    :attr:`failures` (fetches that raised) and :attr:`invalidated` (the token
    values passed to :meth:`invalidate`, in order). It satisfies
    :class:`~ambient_grpc_auth.client.tokens.RefreshableTokenSource`.

    Thread-safe; ``get_token_async`` does no I/O and never blocks the event
    loop. The repr shows counters only, never token values.
    """

    def __init__(
        self,
        *script: _Scripted,
        prefix: str = "token",
        ttl: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not prefix:
            raise ConfigurationError("the token prefix must be non-empty")
        self.prefix = prefix
        self.fetches = 0
        self.failures = 0
        self.invalidated: list[str] = []
        self._ttl = ttl
        self._clock = clock
        self._script: deque[_Scripted] = deque(script)
        self._current: Token | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> Token | None:
        """The token held now (None before the first fetch or after an
        invalidation; possibly expired); reading it never fetches."""
        return self._current

    def enqueue(self, *items: _Scripted) -> None:
        """Script the results of the next fetches (after those already queued)."""
        with self._lock:
            self._script.extend(items)

    def get_token(self) -> Token:
        """The held token, or the result of a fetch (which may raise a scripted
        exception; nothing is held then, so the next call fetches again)."""
        with self._lock:
            held = self._current
            if held is None or (
                held.expires_at is not None and self._clock.time() >= held.expires_at
            ):
                self._current = None  # stays None if the fetch raises
                self._current = held = self._fetch_locked()
            return held

    async def get_token_async(self) -> Token:
        return self.get_token()

    def invalidate(self, token: Token) -> None:
        """Record ``token`` and drop it if it is the one held (a stale token
        leaves the held one in place)."""
        with self._lock:
            self.invalidated.append(token.value)
            if self._current is not None and self._current.value == token.value:
                self._current = None

    def _fetch_locked(self) -> Token:
        item = self._script.popleft() if self._script else None
        if isinstance(item, BaseException):
            self.failures += 1
            raise item
        self.fetches += 1
        if isinstance(item, Token):
            return item
        if isinstance(item, str):
            return Token.from_value(item)
        expires_at = None if self._ttl is None else self._clock.time() + self._ttl
        return Token(f"{self.prefix}-{self.fetches}", expires_at)

    def __repr__(self) -> str:
        return (
            f"FakeTokenSource(fetches={self.fetches}, failures={self.failures}, "
            f"invalidated={len(self.invalidated)})"
        )


# --- issuer ------------------------------------------------------------------------

_EC_CURVES: Mapping[str, ec.EllipticCurve] = {
    "ES256": ec.SECP256R1(),
    "ES384": ec.SECP384R1(),
    "ES512": ec.SECP521R1(),
}
_EC_ALGS: Mapping[str, str] = {curve.name: alg for alg, curve in _EC_CURVES.items()}
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})


def _new_key(algorithm: str | None) -> _SigningKey:
    curve = _EC_CURVES.get(algorithm or "")
    if curve is not None:
        return ec.generate_private_key(curve)
    # 2048 bits: the smallest size the server accepts, and the fastest to make.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _algorithm_for(key: _SigningKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    alg = _EC_ALGS.get(key.curve.name)
    if alg is None:
        raise ConfigurationError("unsupported EC curve")
    return alg


def _fits(key: _SigningKey, algorithm: str) -> bool:
    if isinstance(key, rsa.RSAPrivateKey):
        return algorithm in _RSA_ALGS
    return _EC_ALGS.get(key.curve.name) == algorithm


class FakeIssuer:
    """A JWT issuer for tests: a signing key, a way to mint tokens, and the
    server-side configuration that trusts them.

    ``key`` defaults to a new RSA-2048 key (or an EC key when ``algorithm``
    is ``ES256``/``ES384``/``ES512``); ``algorithm`` defaults to the key's
    natural one (RS256, or ES* by curve). ``kid`` is put in each token's
    header; with ``kid=None`` tokens carry none and the key set names the
    key by its RFC 7638 thumbprint. ``clock`` supplies "now" for minting, so
    share a :class:`FakeClock` with the server under test.

    Two issuers never share a key unless given the same ``key``: a token minted
    by one fails verification against the other's :meth:`key_set` (a forgery
    with a known ``kid`` is ``FakeIssuer(kid=<same kid>)``). The attributes
    are for reading; minting is thread-safe. Raises
    :class:`ConfigurationError` when ``algorithm`` does not fit ``key``.
    """

    def __init__(
        self,
        issuer: str = "https://issuer.test",
        *,
        audience: str = "ambient-api",
        key: _SigningKey | None = None,
        kid: str | None = "test-key-1",
        algorithm: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.private_key: _SigningKey = _new_key(algorithm) if key is None else key
        self.algorithm = algorithm or _algorithm_for(self.private_key)
        if not _fits(self.private_key, self.algorithm):
            raise ConfigurationError(f"algorithm {self.algorithm!r} does not fit the key")
        self.issuer = issuer
        self.audience = audience
        self.kid = kid
        self._clock = clock
        public = self.private_key.public_key()
        self.verification_key = VerificationKey(
            kid=kid if kid is not None else jwk_thumbprint(public), key=public
        )

    @property
    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    def mint(
        self,
        subject: str | None = "alice",
        *,
        claims: Mapping[str, Any] | None = None,
        ttl: float = 600.0,
        expires_at: float | None = None,
        now: float | None = None,
        issuer: str | None = None,
        audience: str | Sequence[str] | None = None,
        omit: Iterable[str] = (),
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed JWT.

        Claims: ``iss`` (this issuer unless ``issuer``), ``aud`` (this
        audience unless ``audience``), ``sub`` (``subject``; left out when
        None), ``iat`` and ``nbf`` (``now``, default ``clock.time()``),
        ``exp`` (``expires_at``, default ``now + ttl``; negative ``ttl``
        mints an expired token), all in whole seconds, and a random ``jti``; then ``claims``, which
        override any of those; then the names in ``omit`` are removed. The
        header has ``alg``, ``typ`` and ``kid``, updated with ``headers``.
        """
        issued = self._clock.time() if now is None else now
        exp = issued + ttl if expires_at is None else expires_at
        payload: dict[str, Any] = {
            "iss": self.issuer if issuer is None else issuer,
            "aud": self.audience if audience is None else _audience(audience),
            "sub": subject,
            "iat": int(issued),
            "nbf": int(issued),
            "exp": int(exp),
            "jti": uuid.uuid4().hex,
        }
        if subject is None:
            del payload["sub"]
        payload.update(claims or {})
        for name in omit:
            payload.pop(name, None)
        header: dict[str, Any] = {} if self.kid is None else {"kid": self.kid}
        header.update(headers or {})
        return jwt.encode(payload, self.private_key, algorithm=self.algorithm, headers=header)

    def runner_token(
        self, session_id: str, *, claims: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> str:
        """A token shaped like the control plane's runner tokens: scoped to
        ``session_id``, subject ``runner:<session_id>``. ``claims`` and the
        other keyword arguments are as for :meth:`mint`. Trust it with
        ``trusted_issuer(control_plane=True)``."""
        scoped = {TOKEN_USE_CLAIM: RUNNER_TOKEN_USE, SESSION_ID_CLAIM: session_id}
        kwargs.setdefault("subject", f"runner:{session_id}")
        return self.mint(claims={**scoped, **(claims or {})}, **kwargs)

    def key_set(self) -> StaticKeySet:
        """A key set holding this issuer's public key (and nothing else)."""
        return StaticKeySet(keys=[self.verification_key])

    def trusted_issuer(
        self,
        *,
        leeway: float = DEFAULT_LEEWAY,
        username_claim: str = "sub",
        control_plane: bool = False,
    ) -> TrustedIssuer:
        """The server-side configuration that accepts this issuer's tokens:
        its issuer and audience, its :meth:`key_set`, its algorithm only."""
        return TrustedIssuer(
            issuer=self.issuer,
            audiences=(self.audience,),
            keys=self.key_set(),
            algorithms=(self.algorithm,),
            leeway=leeway,
            username_claim=username_claim,
            control_plane=control_plane,
        )

    def jwks(self) -> dict[str, Any]:
        """The public key as a JWKS document (``{"keys": [...]}``), e.g. to
        serve from a local endpoint for a :class:`~ambient_grpc_auth.server.jwks.JwksCache`."""
        public = self.public_key
        family: Any = (
            jwt.algorithms.RSAAlgorithm
            if isinstance(public, rsa.RSAPublicKey)
            else jwt.algorithms.ECAlgorithm
        )
        jwk = dict(family.to_jwk(public, as_dict=True))
        jwk.update(kid=self.verification_key.kid, alg=self.algorithm, use="sig")
        return {"keys": [jwk]}

    def __repr__(self) -> str:
        return f"FakeIssuer({self.issuer!r}, kid={self.kid!r}, algorithm={self.algorithm!r})"


def _audience(audience: str | Sequence[str]) -> str | list[str]:
    return audience if isinstance(audience, str) else list(audience)
