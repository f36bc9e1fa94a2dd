"""Tokens and token sources (runner side).

A :class:`TokenSource` yields a :class:`Token`, synchronously or from a
coroutine. Contract for every source in this module: safe for concurrent use
from many threads and many asyncio tasks; the returned Token is immutable;
failures raise :class:`~ambient_grpc_auth.errors.TokenUnavailableError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["RefreshableTokenSource", "Token", "TokenSource"]


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token and, when known, its expiry (Unix seconds, UTC).

    The value never appears in ``repr`` or ``str``.
    """

    value: str
    expires_at: float | None = None

    def __repr__(self) -> str:
        return f"Token(<redacted {len(self.value)} chars>, expires_at={self.expires_at!r})"

    __str__ = __repr__


@runtime_checkable
class TokenSource(Protocol):
    """Something that yields tokens, with a sync and an async way."""

    def get_token(self) -> Token: ...

    async def get_token_async(self) -> Token: ...


@runtime_checkable
class RefreshableTokenSource(TokenSource, Protocol):
    """A source that caches, and can be told that a token stopped working.

    ``invalidate(token)`` drops the cached token only if it is ``token``
    (so a late UNAUTHENTICATED for an old token triggers no extra fetch).
    """

    def invalidate(self, token: Token) -> None: ...
