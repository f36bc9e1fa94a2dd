"""Configuration of the API-server interceptors.

:class:`ServerAuthConfig` gathers everything the interceptors need; both
:class:`ambient_grpc_auth.server.interceptor.ServerAuthInterceptor` (sync ``grpc``) and
:class:`ambient_grpc_auth.server.aio.interceptor.ServerAuthInterceptor` (``grpc.aio``)
take one, and run it through the pipeline of
:class:`ambient_grpc_auth.server.engine.AuthEngine`.
:meth:`ServerAuthConfig.from_env` is the only place that reads the
environment: ``AMBIENT_API_TOKEN`` (static service token),
``GRPC_SERVICE_ACCOUNT`` (a username treated as a service caller) and
``GRPC_SERVICE_ACCOUNT_ISSUER`` (the issuer that may assert that username).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ambient_grpc_auth._bearer import DEFAULT_MAX_TOKEN_BYTES
from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.principal import Identity
from ambient_grpc_auth.server.authn import (
    DEFAULT_STATIC_USERNAME,
    K8S_DEFAULT_ISSUER,
    Authenticator,
    AuthenticatorChain,
    JwtAuthenticator,
    StaticTokenAuthenticator,
    TrustedIssuer,
)
from ambient_grpc_auth.server.metrics import AuthMetrics, MetricsHook
from ambient_grpc_auth.server.policy import CallerClassifier, OwnershipPolicy, default_bypass
from ambient_grpc_auth.server.tokencache import VerifiedTokenCache

__all__ = [
    "API_TOKEN_ENV",
    "DEFAULT_MAX_STREAMS_PER_PRINCIPAL",
    "DEFAULT_OWNER_LOOKUP_WORKERS",
    "SERVICE_ACCOUNT_ENV",
    "SERVICE_ACCOUNT_ISSUER_ENV",
    "OwnerLookup",
    "ServerAuthConfig",
]

API_TOKEN_ENV = "AMBIENT_API_TOKEN"  # noqa: S105 (a variable name)
SERVICE_ACCOUNT_ENV = "GRPC_SERVICE_ACCOUNT"
SERVICE_ACCOUNT_ISSUER_ENV = "GRPC_SERVICE_ACCOUNT_ISSUER"
#: A runner watches its session with one or two streams; a user's tools a few.
DEFAULT_MAX_STREAMS_PER_PRINCIPAL = 16
DEFAULT_OWNER_LOOKUP_WORKERS = 8

#: ``session_id -> owner`` (``None`` when unknown or ownerless): the owner's
#: :class:`~ambient_grpc_auth.principal.Identity` ``(issuer, subject)``, or a
#: bare username, which stands for that name from
#: :attr:`ServerAuthConfig.default_owner_issuer` (lookups written before
#: owners carried their issuer, sessions stored before that). Must be
#: thread-safe; it is called once per checked call (per message for
#: streaming requests).
OwnerLookup = Callable[[str], Identity | str | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerAuthConfig:
    """Everything the server interceptors need (immutable).

    Only ``authenticator`` is required; :meth:`from_env` builds a complete
    configuration from the environment and a list of JWT issuers.
    """

    #: Verifies bearer tokens: a
    #: :class:`~ambient_grpc_auth.server.authn.StaticTokenAuthenticator`, a
    #: :class:`~ambient_grpc_auth.server.authn.JwtAuthenticator`, or an
    #: :class:`~ambient_grpc_auth.server.authn.AuthenticatorChain` of several.
    authenticator: Authenticator
    #: Turns a verified caller into a user or a service caller (runners of
    #: our control plane: a service scoped to one session).
    classifier: CallerClassifier = field(default_factory=CallerClassifier)
    #: The per-method rules. Default: the ``ambient.v1.SessionService``
    #: rules; other methods are open to any authenticated caller.
    ownership: OwnershipPolicy = field(default_factory=OwnershipPolicy)
    #: ``session_id -> owner`` for session rules. Without it, users are
    #: denied on every session rule (service callers are not affected).
    owner_lookup: OwnerLookup | None = None
    #: The issuer of an owner the lookup returns as a bare name: only that
    #: name *from this issuer* owns the session. ``None``: bare owners match
    #: only principals without an issuer (authenticators that know none).
    default_owner_issuer: str | None = None
    #: Let the aio interceptor call ``owner_lookup`` on the event loop instead
    #: of in a worker thread. Only for lookups that never block (an in-memory
    #: map). The sync interceptor always calls it in the handler's thread.
    owner_lookup_inline: bool = False
    #: Selects the full method names served without authentication (health
    #: checks and reflection by default; see
    #: :func:`~ambient_grpc_auth.server.policy.bypass_services`).
    bypass: Callable[[str], bool] = default_bypass
    #: Receives counts of the decisions (must be cheap and thread-safe).
    metrics: MetricsHook = field(default_factory=AuthMetrics)
    #: Remembers verified callers until their token's ``exp`` (bounded);
    #: ``None`` verifies every call. One cache per configuration: entries hold
    #: callers already classified by this configuration.
    token_cache: VerifiedTokenCache | None = field(default_factory=VerifiedTokenCache)
    #: Longest ``authorization`` value read; a longer one is UNAUTHENTICATED.
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES
    #: Streaming calls one caller (one token's identity) may hold open at
    #: once; beyond it a new one is refused RESOURCE_EXHAUSTED. A stream
    #: counts until it ends for any reason (cancellation included). Streams
    #: of bypassed methods (health ``Watch``, reflection) are counted as one
    #: anonymous caller's. ``None``: no limit.
    max_streams_per_principal: int | None = DEFAULT_MAX_STREAMS_PER_PRINCIPAL
    #: Streaming calls all callers together may hold open (RESOURCE_EXHAUSTED
    #: beyond it); ``None``: no limit. On a sync server set it below the
    #: worker count, so that streams can never hold every worker and unary
    #: calls always find one
    #: (:func:`~ambient_grpc_auth.reference.serve.start_sync_session_server`
    #: does).
    max_concurrent_streams: int | None = None
    #: Threads the aio interceptor runs owner lookups in (its own pool, not
    #: the event loop's default executor, so that nothing else queued there,
    #: such as key fetches, can delay them).
    owner_lookup_workers: int = DEFAULT_OWNER_LOOKUP_WORKERS

    def __post_init__(self) -> None:
        for name in ("max_streams_per_principal", "max_concurrent_streams"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigurationError(f"{name} must be >= 1 or None")
        if self.owner_lookup_workers < 1:
            raise ConfigurationError("owner_lookup_workers must be >= 1")

    @classmethod
    def from_env(
        cls,
        *,
        environ: Mapping[str, str] | None = None,
        issuers: Sequence[TrustedIssuer] = (),
        static_username: str = DEFAULT_STATIC_USERNAME,
        service_accounts: Iterable[str | tuple[str, str]] = (),
        service_account_issuer: str | None = None,
        service_account_patterns: Iterable[str | tuple[str, str]] = (),
        pattern_issuers: Iterable[str] | None = None,
        ownership: OwnershipPolicy | None = None,
        owner_lookup: OwnerLookup | None = None,
        default_owner_issuer: str | None = None,
        owner_lookup_inline: bool = False,
        metrics: MetricsHook | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> ServerAuthConfig:
        """Build a configuration from ``AMBIENT_API_TOKEN``,
        ``GRPC_SERVICE_ACCOUNT`` and ``GRPC_SERVICE_ACCOUNT_ISSUER`` (read from
        ``environ``, default :data:`os.environ`) plus the given JWT issuers.

        The static token, when set, is tried first, then the issuers. Only
        issuers marked ``control_plane`` mint runner tokens (scoped to one
        session); runner claims from any other issuer are ignored.

        Service accounts (``GRPC_SERVICE_ACCOUNT`` and ``service_accounts``)
        and ``service_account_patterns`` are bound to the issuer that may
        assert them: give ``(issuer, name)`` pairs, or bare names, which are
        bound to ``service_account_issuer`` (default:
        ``GRPC_SERVICE_ACCOUNT_ISSUER``, else the Kubernetes issuer
        :data:`~ambient_grpc_auth.server.authn.K8S_DEFAULT_ISSUER` when it is
        trusted); bare patterns go to each of ``pattern_issuers`` when given.
        ``default_owner_issuer`` defaults to the first issuer not marked
        ``control_plane`` (else the first issuer): the identity provider of
        the users who created sessions stored before owners carried their
        issuer. Raises :class:`ConfigurationError` when nothing could
        authenticate, or a name cannot be bound to a trusted issuer.
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
        trusted = [i.issuer for i in issuers]
        bare_issuer = service_account_issuer or env.get(SERVICE_ACCOUNT_ISSUER_ENV, "").strip()
        if not bare_issuer and K8S_DEFAULT_ISSUER in trusted:
            bare_issuer = K8S_DEFAULT_ISSUER
        accounts = list(service_accounts)
        if service_account := env.get(SERVICE_ACCOUNT_ENV, "").strip():
            accounts.append(service_account)
        patterns: list[str | tuple[str, str]] = []
        for pattern in service_account_patterns:
            if isinstance(pattern, str) and pattern_issuers is not None:
                patterns.extend((issuer, pattern) for issuer in pattern_issuers)
            else:
                patterns.append(pattern)
        classifier = CallerClassifier(
            service_accounts=frozenset(
                Identity(*_bound(a, bare_issuer, trusted, "service account")) for a in accounts
            ),
            service_account_patterns=tuple(
                _bound(p, bare_issuer, trusted, "service-account pattern") for p in patterns
            ),
            control_plane_issuers=frozenset(i.issuer for i in issuers if i.control_plane),
        )
        if default_owner_issuer is None and issuers:
            users = [i.issuer for i in issuers if not i.control_plane]
            default_owner_issuer = (users or trusted)[0]
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
            default_owner_issuer=default_owner_issuer,
            owner_lookup_inline=owner_lookup_inline,
            metrics=metrics if metrics is not None else AuthMetrics(),
            token_cache=VerifiedTokenCache(clock=clock),
        )


def _bound(
    value: str | tuple[str, str], bare_issuer: str, trusted: Sequence[str], what: str
) -> tuple[str, str]:
    """``value`` as an ``(issuer, name)`` pair whose issuer is trusted; a bare
    name is bound to ``bare_issuer``."""
    pair = (bare_issuer, value) if isinstance(value, str) else value
    if not pair[0]:
        raise ConfigurationError(
            f"{what} {value!r} has no issuer: give ISSUER=NAME or set {SERVICE_ACCOUNT_ISSUER_ENV}"
        )
    if pair[0] not in trusted:
        raise ConfigurationError(f"{what} {pair[1]!r}: issuer {pair[0]!r} is not trusted")
    return pair
