"""Configuration of the API-server interceptors, and the decision core they share.

:class:`ServerAuthConfig` gathers everything the interceptors need; both
:class:`ambient_grpc_auth.server.interceptor.ServerAuthInterceptor` (sync ``grpc``) and
:class:`ambient_grpc_auth.server.aio.interceptor.AioServerAuthInterceptor` (``grpc.aio``)
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
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from ambient_grpc_auth._bearer import DEFAULT_MAX_TOKEN_BYTES, authorization_value, parse_bearer
from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.errors import ConfigurationError, TokenRejectedError
from ambient_grpc_auth.principal import CallerKind, Principal
from ambient_grpc_auth.server.authn import (
    DEFAULT_STATIC_USERNAME,
    Authenticator,
    AuthenticatorChain,
    JwtAuthenticator,
    StaticTokenAuthenticator,
    TrustedIssuer,
)
from ambient_grpc_auth.server.policy import (
    MAX_SESSION_ID_CHARS,
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
from ambient_grpc_auth.server.tokencache import VerifiedTokenCache, token_expiry

__all__ = ["API_TOKEN_ENV", "SERVICE_ACCOUNT_ENV", "OwnerLookup", "ServerAuthConfig"]

_log = logging.getLogger("ambient_grpc_auth.server.interceptor")

API_TOKEN_ENV = "AMBIENT_API_TOKEN"  # noqa: S105 (a variable name)
SERVICE_ACCOUNT_ENV = "GRPC_SERVICE_ACCOUNT"

#: ``session_id -> owner username`` (``None`` when unknown or ownerless).
#: Must be thread-safe; it is called once per checked call (per message for
#: streaming requests).
OwnerLookup = Callable[[str], str | None]

Denial = tuple[grpc.StatusCode, str]

#: Method names whose bypass decision and rule are remembered.
MAX_PLANNED_METHODS = 1024
#: (verified token, method) pairs whose wrapped handler is remembered. Each
#: entry holds the principal (already held by the token cache) and one small
#: handler object.
MAX_MEMO_ENTRIES = 4096
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
        # Per-method decisions that do not depend on the caller.
        self._plans: dict[str, tuple[bool, MethodRule]] = {}
        # Wrapped handlers of recent (token, method) pairs; see handler_memo.
        self._memo: dict[tuple[bytes, str], tuple[Principal, object, object]] = {}
        self._memo_lock = threading.Lock()

    @property
    def lookup_inline(self) -> bool:
        """Whether the aio interceptor may call the owner lookup on the loop."""
        return self._lookup_inline

    # --- per-method plan ---

    def plan(self, method: str) -> tuple[bool, MethodRule]:
        """``(bypassed, rule)`` for ``method``, remembered for up to
        :data:`MAX_PLANNED_METHODS` method names (beyond that, e.g. under a
        flood of made-up names, computed on every call)."""
        plan = self._plans.get(method)
        if plan is None:
            plan = (bool(self.bypass(method)), self._ownership.rule_for(method))
            if len(self._plans) < MAX_PLANNED_METHODS:
                self._plans[method] = plan
        return plan

    # --- wrapped-handler memo ---

    def memo_get(self, key: bytes, method: str, principal: Principal, handler: object) -> Any:
        """The handler built earlier for this verified token and method, if
        it was built for this very principal and service handler.

        Only consulted after the verified-token cache returned ``principal``
        (so the token is still valid), and compared by identity: a token that
        left the cache and was verified again, or a service whose handler
        changed, gets a fresh wrapper.
        """
        entry = self._memo.get((key, method))
        if entry is not None and entry[0] is principal and entry[1] is handler:
            return entry[2]
        return None

    def memo_put(
        self, key: bytes, method: str, principal: Principal, handler: object, wrapped: object
    ) -> None:
        """Remember ``wrapped``; the oldest entry goes beyond :data:`MAX_MEMO_ENTRIES`."""
        with self._memo_lock:
            memo = self._memo
            memo[(key, method)] = (principal, handler, wrapped)
            while len(memo) > MAX_MEMO_ENTRIES:
                del memo[next(iter(memo))]

    # --- authentication ---

    def lookup(self, metadata: Metadata) -> tuple[str, bytes | None, Principal | None]:
        """``(token, cache key, cached principal)``; on a cache hit the token
        is not parsed (``""``). :class:`TokenRejectedError` for a missing,
        duplicate, binary, oversized or malformed header."""
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
        token, key, principal = self.lookup(metadata)
        if principal is not None:
            return principal
        return self.verify(token, key)

    def verify(self, token: str, key: bytes | None) -> Principal:
        """Verify ``token`` (a cache miss of :meth:`lookup`), classify the
        caller and cache it under ``key``. May block on a key fetch."""
        try:
            verified = self._authenticator.authenticate(token)
        except TokenRejectedError:
            raise
        except Exception as exc:
            raise _unexpected(exc) from None
        return self._admit(key, verified)

    async def authenticate_async(self, metadata: Metadata) -> Principal:
        """:meth:`authenticate` without blocking the event loop."""
        token, key, principal = self.lookup(metadata)
        if principal is not None:
            return principal
        return await self.verify_async(token, key)

    async def verify_async(self, token: str, key: bytes | None) -> Principal:
        """:meth:`verify` without blocking the event loop."""
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
        session_id = rule_session_id(rule, request)
        access = session_access(principal, session_id)
        if access is Access.ALLOW:
            return None
        if isinstance(access, str):
            return self.deny(
                method, TokenRejectedError(access, grpc.StatusCode.PERMISSION_DENIED), principal
            )
        assert isinstance(session_id, str)
        try:
            owner = self._lookup(session_id) if self._lookup is not None else None
        except Exception as exc:
            return self._lookup_failed(method, exc)
        if owner is not None and owner == principal.username:
            return None
        return self._owner_decision(method, principal, owner)

    def gate(
        self, method: str, principal: Principal, rule: MethodRule
    ) -> Callable[[object], Denial | None]:
        """:meth:`check` bound to one caller and method, with the common
        outcome (a user's own session, a service in scope) decided in a few
        operations; everything else goes through :meth:`check`."""
        field_name = rule.session_field
        check = self.check
        if field_name is None:
            return lambda request: None
        if principal.kind is CallerKind.SERVICE:
            scope = principal.session_scope

            def service_gate(request: object) -> Denial | None:
                session_id = getattr(request, field_name, None)
                if (
                    type(session_id) is str
                    and 0 < len(session_id) <= MAX_SESSION_ID_CHARS
                    and (scope is None or scope == session_id)
                ):
                    return None
                return check(method, principal, rule, request)

            return service_gate
        lookup = self._lookup
        username = principal.username

        def user_gate(request: object) -> Denial | None:
            session_id = getattr(request, field_name, None)
            if (
                lookup is not None
                and type(session_id) is str
                and 0 < len(session_id) <= MAX_SESSION_ID_CHARS
            ):
                try:
                    owner = lookup(session_id)
                except Exception:
                    owner = None  # check() looks again, and reports a failure
                if owner is not None and owner == username:
                    return None
            return check(method, principal, rule, request)

        return user_gate

    async def check_async(
        self, method: str, principal: Principal, rule: MethodRule, request: object
    ) -> Denial | None:
        """:meth:`check` with the owner lookup in a worker thread (or inline
        when configured so)."""
        session_id = rule_session_id(rule, request)
        access = session_access(principal, session_id)
        if access is Access.ALLOW:
            return None
        if isinstance(access, str):
            return self.deny(
                method, TokenRejectedError(access, grpc.StatusCode.PERMISSION_DENIED), principal
            )
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
