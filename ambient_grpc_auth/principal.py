"""The authenticated caller, as handlers see it.

The server interceptor sets the principal in a :mod:`contextvars` variable
around the handler's own work, so :func:`current_principal` works in unary
and streaming handlers, in sync ``grpc`` and in ``grpc.aio``. Outside an
authenticated call it returns ``None``.
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

__all__ = ["CallerKind", "Identity", "Principal", "current_principal", "principal_scope"]


class CallerKind(enum.Enum):
    USER = "user"
    SERVICE = "service"


class Identity(NamedTuple):
    """A caller's identity: the issuer that vouched for it and the subject.

    Names are only ever compared together with their issuer: ``alice`` from
    one identity provider is not ``alice`` from another. ``issuer`` is the
    JWT ``iss``, the reserved
    :data:`~ambient_grpc_auth.server.authn.STATIC_TOKEN_ISSUER` for the static
    service token, or ``None`` for principals of authenticators that know no
    issuer.
    """

    issuer: str | None
    subject: str


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling.

    ``username`` is the token's subject (or the configured name of the static
    service token); ``session_scope`` is set for runner tokens that may act on
    one session only; ``claims`` are the verified JWT claims (empty for the
    static token); ``issuer`` is who vouched for ``username`` (see
    :class:`Identity`). Authorization compares :attr:`identity`, never the
    username alone.
    """

    username: str
    kind: CallerKind
    session_scope: str | None = None
    issuer: str | None = None
    claims: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def identity(self) -> Identity:
        """``(issuer, username)``: what ownership and service accounts match."""
        return Identity(self.issuer, self.username)

    @property
    def is_service(self) -> bool:
        return self.kind is CallerKind.SERVICE

    def may_access_session(self, session_id: str) -> bool:
        """True when a session scope, if any, allows ``session_id``."""
        return self.session_scope is None or self.session_scope == session_id

    def __repr__(self) -> str:
        # Claims may carry personal data; keep reprs short.
        return (
            f"Principal(username={self.username!r}, kind={self.kind.value}, "
            f"session_scope={self.session_scope!r}, issuer={self.issuer!r})"
        )


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "ambient_grpc_auth_principal", default=None
)

#: ``token = set_current_principal(p)`` ... ``reset_current_principal(token)``
#: does what ``with principal_scope(p):`` does, without a scope object: for
#: the server interceptors' per-call path. Not part of the public API.
set_current_principal = _current.set
reset_current_principal = _current.reset


def current_principal() -> Principal | None:
    """The caller of the RPC being handled, or ``None`` when unauthenticated."""
    return _current.get()


class principal_scope:
    """Make ``principal`` current for the duration of the ``with`` block.

    A plain class rather than ``@contextmanager``: it runs on every call and
    streamed message, and costs about a third as much.
    """

    __slots__ = ("_principal", "_token")

    def __init__(self, principal: Principal | None) -> None:
        self._principal = principal

    def __enter__(self) -> None:
        self._token = _current.set(self._principal)

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._token)
