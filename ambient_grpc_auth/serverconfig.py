"""Configuration of the API-server interceptors, and the decision core they share.

:class:`ServerAuthConfig` gathers everything the interceptors need; both
:class:`ambient_grpc_auth.server.AuthInterceptor` (sync ``grpc``) and
:class:`ambient_grpc_auth.aio.server.AsyncAuthInterceptor` (``grpc.aio``)
take one. :meth:`ServerAuthConfig.from_env` is the only place that reads the
environment: ``AMBIENT_API_TOKEN`` (static service token) and
``GRPC_SERVICE_ACCOUNT`` (a username treated as a service caller).

The pipeline per call: bypass selector -> bearer extraction -> verified-token
cache -> authenticator -> caller classification -> method rule -> (for
session rules) ownership decision -> handler. The adapters hold only the gRPC
plumbing, I/O and locking around this core.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from ._bearer import DEFAULT_MAX_TOKEN_BYTES, authorization_value, parse_bearer
from ._clock import SYSTEM_CLOCK, Clock
from .authn import (
    DEFAULT_STATIC_USERNAME,
    Authenticator,
    AuthenticatorChain,
    JwtAuthenticator,
    StaticTokenAuthenticator,
    TrustedIssuer,
)
from .errors import ConfigurationError, TokenRejectedError
from .policy import (
    Access,
    AuthMetrics,
    CallerClassifier,
    MethodRule,
    MetricsHook,
    OwnershipPolicy,
    default_bypass,
    owner_access,
    rejection_status,
    rule_session_id,
    session_access,
)
from .principal import Principal
from .tokencache import VerifiedTokenCache, token_expiry

__all__ = ["API_TOKEN_ENV", "SERVICE_ACCOUNT_ENV", "OwnerLookup", "ServerAuthConfig"]

_log = logging.getLogger("ambient_grpc_auth.server")

API_TOKEN_ENV = "AMBIENT_API_TOKEN"  # noqa: S105 (a variable name)
SERVICE_ACCOUNT_ENV = "GRPC_SERVICE_ACCOUNT"

#: ``session_id -> owner username`` (``None`` when unknown or ownerless).
#: Must be thread-safe; it is called once per checked call (per message for
#: streaming requests).
OwnerLookup = Callable[[str], str | None]

Denial = tuple[grpc.StatusCode, str]
Metadata = Iterable[tuple[str, str | bytes]] | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerAuthConfig:
    """Everything the server interceptors need (immutable).

    ``authenticator`` verifies tokens; ``classifier`` marks service callers;
    ``ownership`` holds the per-method rules (default: SessionService rules,
    other methods open to any authenticated caller); ``owner_lookup`` returns a
    session's owner (without it, users are denied on every session rule);
    ``owner_lookup_inline`` lets the aio interceptor call the lookup on the
    event loop instead of in a worker thread (only for lookups that never
    block, e.g. an in-memory map); ``bypass`` selects methods served without
    authentication (health and reflection by default); ``metrics`` receives
    counts; ``token_cache`` remembers verified tokens (``None`` disables it);
    ``max_token_bytes`` bounds the bearer value.
    """

    authenticator: Authenticator
    classifier: CallerClassifier = field(default_factory=CallerClassifier)
    ownership: OwnershipPolicy = field(default_factory=OwnershipPolicy)
    owner_lookup: OwnerLookup | None = None
    owner_lookup_inline: bool = False
    bypass: Callable[[str], bool] = default_bypass
    metrics: MetricsHook = field(default_factory=AuthMetrics)
    token_cache: VerifiedTokenCache | None = field(default_factory=VerifiedTokenCache)
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES

    @classmethod
    def from_env(
        cls,
        *,
        environ: Mapping[str, str] | None = None,
        issuers: Sequence[TrustedIssuer] = (),
        static_username: str = DEFAULT_STATIC_USERNAME,
        service_account_patterns: Iterable[str] = (),
        pattern_issuers: Iterable[str] | None = None,
        ownership: OwnershipPolicy | None = None,
        owner_lookup: OwnerLookup | None = None,
        owner_lookup_inline: bool = False,
        metrics: MetricsHook | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> ServerAuthConfig:
        """Build a configuration from ``AMBIENT_API_TOKEN`` and
        ``GRPC_SERVICE_ACCOUNT`` (read from ``environ``, default
        :data:`os.environ`) plus the given JWT issuers.

        The static token, when set, is tried first, then the issuers. Issuers
        marked ``control_plane`` have their runner tokens scoped to one session.
        Raises :class:`ConfigurationError` when nothing could authenticate.
        """
        env = os.environ if environ is None else environ
        authenticators: list[Authenticator] = []
        static_token = env.get(API_TOKEN_ENV, "").strip()
        if static_token:
            authenticators.append(
                StaticTokenAuthenticator(token=static_token, username=static_username)
            )
        if issuers:
            authenticators.append(JwtAuthenticator(issuers=issuers, clock=clock))
        if not authenticators:
            raise ConfigurationError(
                f"no authenticator configured: set {API_TOKEN_ENV} or configure a JWT issuer"
            )
        service_account = env.get(SERVICE_ACCOUNT_ENV, "").strip()
        classifier = CallerClassifier(
            service_usernames=frozenset({service_account} if service_account else ()),
            service_account_patterns=tuple(service_account_patterns),
            pattern_issuers=None if pattern_issuers is None else frozenset(pattern_issuers),
            control_plane_issuers=frozenset(i.issuer for i in issuers if i.control_plane),
        )
        authenticator = (
            authenticators[0]
            if len(authenticators) == 1
            else AuthenticatorChain(authenticators=authenticators)
        )
        return cls(
            authenticator=authenticator,
            classifier=classifier,
            ownership=ownership if ownership is not None else OwnershipPolicy(),
            owner_lookup=owner_lookup,
            owner_lookup_inline=owner_lookup_inline,
            metrics=metrics if metrics is not None else AuthMetrics(),
            token_cache=VerifiedTokenCache(clock=clock),
        )


class _AuthEngine:
    """The per-call decisions shared by the sync and aio interceptors."""

    def __init__(self, config: ServerAuthConfig) -> None:
        self.config = config
        self.metrics = config.metrics
        self.bypass = config.bypass
        self._authenticator = config.authenticator
        self._classifier = config.classifier
        self._ownership = config.ownership
        self._lookup = config.owner_lookup
        self._lookup_inline = config.owner_lookup_inline
        self._cache = config.token_cache
        self._max_token_bytes = config.max_token_bytes

    # --- authentication ---

    def _token(self, metadata: Metadata) -> tuple[str, bytes | None, Principal | None]:
        # The cache is keyed by the whole header value, so a hit skips the
        # parse as well as the signature check. Safe: only values that parsed
        # and verified are ever stored.
        value = authorization_value(metadata, max_token_bytes=self._max_token_bytes)
        if self._cache is None:
            return parse_bearer(value), None, None
        key = self._cache.key_for(value)
        principal = self._cache.get(key)
        self.metrics.cache(principal is not None)
        if principal is not None:
            return "", key, principal
        return parse_bearer(value), key, None

    def _admit(self, key: bytes | None, principal: Principal) -> Principal:
        principal = self._classifier.classify(principal)
        if self._cache is not None and key is not None:
            self._cache.put(key, principal, token_expiry(principal))
        return principal

    def authenticate(self, metadata: Metadata) -> Principal:
        """The caller, or :class:`TokenRejectedError`. May block on a key fetch."""
        token, key, principal = self._token(metadata)
        if principal is not None:
            return principal
        try:
            verified = self._authenticator.authenticate(token)
        except TokenRejectedError:
            raise
        except Exception as exc:
            raise _unexpected(exc) from None
        return self._admit(key, verified)

    async def authenticate_async(self, metadata: Metadata) -> Principal:
        """:meth:`authenticate` without blocking the event loop."""
        token, key, principal = self._token(metadata)
        if principal is not None:
            return principal
        try:
            verified = await self._authenticator.authenticate_async(token)
        except TokenRejectedError:
            raise
        except Exception as exc:
            raise _unexpected(exc) from None
        return self._admit(key, verified)

    # --- authorization ---

    def rule_for(self, method: str) -> MethodRule:
        return self._ownership.rule_for(method)

    def check(
        self, method: str, principal: Principal, rule: MethodRule, request: object
    ) -> Denial | None:
        """``None`` when ``request`` may proceed under ``rule``, else the
        (code, details) to abort with. Calls the owner lookup inline."""
        access = session_access(principal, rule_session_id(rule, request))
        if access is Access.ALLOW:
            return None
        if isinstance(access, str):
            return self.deny(
                method, TokenRejectedError(access, grpc.StatusCode.PERMISSION_DENIED), principal
            )
        session_id = rule_session_id(rule, request)
        assert isinstance(session_id, str)
        try:
            owner = self._lookup(session_id) if self._lookup is not None else None
        except Exception as exc:
            return self._lookup_failed(method, exc)
        return self._owner_decision(method, principal, owner)

    async def check_async(
        self, method: str, principal: Principal, rule: MethodRule, request: object
    ) -> Denial | None:
        """:meth:`check` with the owner lookup in a worker thread (or inline
        when configured so)."""
        access = session_access(principal, rule_session_id(rule, request))
        if access is Access.ALLOW:
            return None
        if isinstance(access, str):
            return self.deny(
                method, TokenRejectedError(access, grpc.StatusCode.PERMISSION_DENIED), principal
            )
        session_id = rule_session_id(rule, request)
        assert isinstance(session_id, str)
        lookup = self._lookup
        try:
            if lookup is None:
                owner = None
            elif self._lookup_inline:
                owner = lookup(session_id)
            else:
                owner = await asyncio.to_thread(lookup, session_id)
        except Exception as exc:
            return self._lookup_failed(method, exc)
        return self._owner_decision(method, principal, owner)

    def _owner_decision(
        self, method: str, principal: Principal, owner: str | None
    ) -> Denial | None:
        reason = owner_access(principal, owner)
        if reason is None:
            return None
        return self.deny(
            method, TokenRejectedError(reason, grpc.StatusCode.PERMISSION_DENIED), principal
        )

    def _lookup_failed(self, method: str, exc: Exception) -> Denial:
        _log.error("owner lookup failed on %s: %s", method, type(exc).__name__)
        return self.deny(
            method, TokenRejectedError("owner_lookup_failed", grpc.StatusCode.UNAVAILABLE)
        )

    # --- outcomes ---

    def deny(
        self, method: str, error: TokenRejectedError, principal: Principal | None = None
    ) -> Denial:
        """Log and count a rejection; return what the peer sees."""
        code, details = rejection_status(error)
        self.metrics.denied(error.reason)
        if principal is None:
            _log.info("rejected %s: %s (%s)", method, error.reason, code.name)
        else:
            _log.info(
                "rejected %s for %r: %s (%s)", method, principal.username, error.reason, code.name
            )
        return code, details


def _unexpected(exc: Exception) -> TokenRejectedError:
    # A bug or an unforeseen input in an authenticator must not surface as
    # INTERNAL; the message may quote the token, so only the type is logged.
    _log.error("authenticator failed unexpectedly: %s", type(exc).__name__)
    return TokenRejectedError("authenticator_error")
