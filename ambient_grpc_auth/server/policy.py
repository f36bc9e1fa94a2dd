"""Authorization policy for the API server (pure: no I/O, no gRPC calls).

Everything here is shared by the sync interceptor
(:mod:`ambient_grpc_auth.server.interceptor`) and its ``grpc.aio`` twin
(:mod:`ambient_grpc_auth.server.aio.interceptor`):

- :class:`CallerClassifier` turns an authenticated :class:`Principal` into a
  user or a service caller (static token, ``GRPC_SERVICE_ACCOUNT``,
  ``system:serviceaccount:<ns>:<name>`` patterns, each bound to the issuer
  that may assert it, runner tokens issued by our control plane, which are
  scoped to one session).
- :class:`OwnershipPolicy` holds one :class:`MethodRule` per full method name
  and a default for methods without a rule; :func:`session_access` and
  :func:`owner_access` decide a call from the principal, the session id found
  in the request and, for users only, the session's owner. Identities are
  ``(issuer, username)`` pairs everywhere; a name alone matches nothing.
- :func:`bypass_services` builds the selector of methods served without
  authentication (health and reflection by default).

Denial reasons are short fixed words (``missing_session_id``,
``out_of_scope``, ``not_owner``, ``no_such_session``); the pipeline
(:mod:`ambient_grpc_auth.server.engine`) logs and counts them and maps them to
the status the peer sees. Counting lives in :mod:`ambient_grpc_auth.server.metrics`.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeGuard

from ambient_grpc_auth.claims import RUNNER_TOKEN_USE, SESSION_ID_CLAIM, TOKEN_USE_CLAIM
from ambient_grpc_auth.errors import ConfigurationError, TokenRejectedError
from ambient_grpc_auth.principal import CallerKind, Identity, Principal

__all__ = [
    "ALLOW_AUTHENTICATED",
    "DEFAULT_BYPASS_SERVICES",
    "DENY",
    "MAX_SESSION_ID_CHARS",
    "SESSION_SERVICE_RULES",
    "Access",
    "CallerClassifier",
    "MethodRule",
    "OwnershipPolicy",
    "bypass_services",
    "default_bypass",
    "owner_access",
    "owner_identity",
    "rule_session_id",
    "session_access",
]

#: Longest session id the policy looks up; longer values are denied unread.
MAX_SESSION_ID_CHARS = 256


# --- caller classification --------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CallerClassifier:
    """Decides whether an authenticated caller is a user or a service.

    Rules, in order (the first that applies wins):

    1. A principal that is already a service caller (the static token) stays one.
    2. A token from one of ``control_plane_issuers`` whose ``token_use`` claim is
       the runner value is a service caller scoped to its ``session_id`` claim.
       Such a token without a usable ``session_id`` is rejected
       (UNAUTHENTICATED, reason ``runner_without_session``): it would otherwise
       fall through to broader rules. Runner claims in a token from any other
       issuer are ignored: its caller is whatever the remaining rules make it.
    3. A principal whose :attr:`~ambient_grpc_auth.principal.Principal.identity`
       ``(issuer, username)`` is in ``service_accounts`` (``GRPC_SERVICE_ACCOUNT``).
    4. A principal from the issuer a pattern is bound to whose username matches
       that pattern (:func:`fnmatch.fnmatchcase`, e.g.
       ``system:serviceaccount:*:session-*-sa``).
    5. Everyone else is a user.

    Names are never matched without their issuer, so a user of one identity
    provider cannot become a service account by picking its name. Immutable
    and thread-safe. Any iterable is accepted for the collection fields; they
    are stored as frozensets and tuples. Raises :class:`ConfigurationError`
    for an entry that is not an ``(issuer, name)`` pair.
    """

    #: ``(issuer, username)`` pairs that are service callers
    #: (``GRPC_SERVICE_ACCOUNT``); rule 3.
    service_accounts: frozenset[Identity] = frozenset()
    #: ``(issuer, glob)`` pairs: :func:`fnmatch.fnmatchcase` patterns of
    #: service-account usernames, each honoured for its issuer only; rule 4.
    service_account_patterns: tuple[tuple[str | None, str], ...] = ()
    #: Issuers of our control plane, whose runner tokens become service
    #: callers scoped to one session; rule 2.
    control_plane_issuers: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Accept any iterable for convenience but store immutable forms.
        accounts = frozenset(Identity(*_pair(a, "service account")) for a in self.service_accounts)
        patterns = tuple(_pair(p, "service-account pattern") for p in self.service_account_patterns)
        object.__setattr__(self, "service_accounts", accounts)
        object.__setattr__(self, "service_account_patterns", patterns)
        object.__setattr__(self, "control_plane_issuers", frozenset(self.control_plane_issuers))

    def classify(self, principal: Principal) -> Principal:
        """Return ``principal`` as a user or service caller.

        Raises :class:`TokenRejectedError` for a runner token without a session.
        """
        if principal.kind is CallerKind.SERVICE:
            return principal
        claims = principal.claims
        if (
            principal.issuer is not None
            and principal.issuer in self.control_plane_issuers
            and claims.get(TOKEN_USE_CLAIM) == RUNNER_TOKEN_USE
        ):
            session_id = claims.get(SESSION_ID_CLAIM)
            if not _valid_session_id(session_id):
                raise TokenRejectedError("runner_without_session")
            return _as_service(principal, session_scope=session_id)
        if principal.identity in self.service_accounts:
            return _as_service(principal, session_scope=None)
        for issuer, pattern in self.service_account_patterns:
            if issuer == principal.issuer and fnmatch.fnmatchcase(principal.username, pattern):
                return _as_service(principal, session_scope=None)
        return principal


def _pair(value: object, what: str) -> tuple[str | None, str]:
    """``value`` as an ``(issuer, name)`` pair; a bare name is refused, since
    it would match that name from every issuer."""
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not (value[0] is None or isinstance(value[0], str))
        or not isinstance(value[1], str)
        or not value[1]
    ):
        raise ConfigurationError(f"a {what} must be an (issuer, name) pair, got {value!r}")
    return value[0], value[1]


def _as_service(principal: Principal, *, session_scope: str | None) -> Principal:
    return Principal(
        username=principal.username,
        kind=CallerKind.SERVICE,
        session_scope=session_scope,
        issuer=principal.issuer,
        claims=principal.claims,
    )


def _valid_session_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= MAX_SESSION_ID_CHARS


# --- ownership ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MethodRule:
    """What a method requires once the caller is authenticated (immutable).

    With neither field set, any authenticated caller may call the method.
    """

    #: The request attribute that holds the session id. When set, the call is
    #: allowed for service callers (session-scoped ones only on their own
    #: session) and for the session's owner, and denied to everyone else.
    #: ``None``: the request is not read.
    session_field: str | None = None
    #: Refuse every caller (PERMISSION_DENIED once authenticated).
    deny: bool = False

    @classmethod
    def session(cls, field_name: str) -> MethodRule:
        """A rule reading the session id from ``field_name``."""
        if not field_name:
            raise ValueError("session field name must be non-empty")
        return cls(session_field=field_name)


#: Any authenticated caller may call the method.
ALLOW_AUTHENTICATED = MethodRule()
#: No caller may call the method.
DENY = MethodRule(deny=True)

_SESSION_SERVICE = "/ambient.v1.SessionService/"

#: Default rules for ``ambient.v1.SessionService``.
SESSION_SERVICE_RULES: Mapping[str, MethodRule] = MappingProxyType(
    {
        _SESSION_SERVICE + "GetSession": MethodRule.session("id"),
        _SESSION_SERVICE + "CreateSession": ALLOW_AUTHENTICATED,
        _SESSION_SERVICE + "PushSessionMessage": MethodRule.session("session_id"),
        _SESSION_SERVICE + "WatchSessionMessages": MethodRule.session("session_id"),
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnershipPolicy:
    """Per-method rules keyed by full method name. Immutable."""

    #: Rule per full method name (``/pkg.Service/Method``); stored as a
    #: read-only copy. Default: :data:`SESSION_SERVICE_RULES`.
    rules: Mapping[str, MethodRule] = field(default_factory=lambda: SESSION_SERVICE_RULES)
    #: The rule of methods without an entry in ``rules``. Use :data:`DENY`
    #: for a closed server.
    default: MethodRule = ALLOW_AUTHENTICATED

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", MappingProxyType(dict(self.rules)))

    def rule_for(self, method: str) -> MethodRule:
        return self.rules.get(method, self.default)

    def with_rules(self, extra: Mapping[str, MethodRule]) -> OwnershipPolicy:
        """A copy with ``extra`` rules added (replacing same-named ones)."""
        return OwnershipPolicy(rules={**self.rules, **extra}, default=self.default)


class Access(enum.Enum):
    """Outcome of :func:`session_access` before any owner lookup."""

    ALLOW = "allow"
    NEEDS_OWNER = "needs_owner"


def session_access(principal: Principal, session_id: object) -> Access | str:
    """Decide what is known without the owner.

    Returns :attr:`Access.ALLOW`, :attr:`Access.NEEDS_OWNER` (a user: look the
    owner up and call :func:`owner_access`), or a denial reason
    (``missing_session_id``, ``out_of_scope``).
    """
    if not _valid_session_id(session_id):
        return "missing_session_id"
    if principal.kind is CallerKind.SERVICE:
        if principal.may_access_session(session_id):
            return Access.ALLOW
        return "out_of_scope"
    return Access.NEEDS_OWNER


def owner_identity(owner: Identity | str | None, default_issuer: str | None) -> Identity | None:
    """The owner an owner lookup returned, as an :class:`Identity`.

    A bare name (a lookup written before owners carried their issuer, or a
    session stored before that) belongs to ``default_issuer``
    (:attr:`~ambient_grpc_auth.server.config.ServerAuthConfig.default_owner_issuer`).
    """
    if isinstance(owner, str):
        return Identity(default_issuer, owner)
    return owner


def owner_access(
    principal: Principal, owner: Identity | str | None, default_issuer: str | None = None
) -> str | None:
    """``None`` when ``principal`` owns the session, else a denial reason.

    Ownership compares ``(issuer, username)`` with the owner's identity (see
    :func:`owner_identity` for a bare owner name and ``default_issuer``). An
    unknown or ownerless session (``owner is None``) is denied like a foreign
    one, so that callers cannot probe which sessions exist.
    """
    identity = owner_identity(owner, default_issuer)
    if identity is None:
        return "no_such_session"
    if identity != principal.identity:
        return "not_owner"
    return None


def rule_session_id(rule: MethodRule, request: object) -> object:
    """The session id a request carries for ``rule`` (``None`` if absent)."""
    if rule.session_field is None:
        return None
    return getattr(request, rule.session_field, None)


# --- bypass selector ---------------------------------------------------------

#: Services served without authentication by default.
DEFAULT_BYPASS_SERVICES: tuple[str, ...] = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


def bypass_services(services: Iterable[str]) -> Callable[[str], bool]:
    """A selector that is true for every method of the named services
    (exact service names, e.g. ``grpc.health.v1.Health``)."""
    names = frozenset(services)

    def selector(method: str) -> bool:
        service, sep, _ = method[1:].rpartition("/")
        return bool(sep) and method.startswith("/") and service in names

    return selector


#: Health checks and server reflection skip authentication.
default_bypass: Callable[[str], bool] = bypass_services(DEFAULT_BYPASS_SERVICES)
