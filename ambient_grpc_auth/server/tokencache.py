"""A bounded cache of verified tokens (server side).

Verifying a JWT signature costs on the order of a hundred microseconds; a
SHA-256 of the token plus a dict lookup costs about one. The interceptor
therefore remembers, per token digest, the classified :class:`Principal` until
the token's ``exp`` (without leeway) or ``max_ttl`` seconds, whichever comes
first, evicting the least recently used entry beyond ``max_entries``.

Security notes: keys are SHA-256 digests, never tokens. A cached token stays
accepted until its entry expires even if its signing key is withdrawn from the
JWKS meanwhile; ``max_ttl`` bounds that window. One cache must serve one
authentication configuration only (entries hold already-classified callers).
Thread-safe: one lock around a short critical section.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.principal import Principal

__all__ = [
    "DEFAULT_CACHE_MAX_ENTRIES",
    "DEFAULT_CACHE_MAX_TTL",
    "VerifiedTokenCache",
    "token_expiry",
]

DEFAULT_CACHE_MAX_ENTRIES = 10_000
DEFAULT_CACHE_MAX_TTL = 300.0


def token_expiry(principal: Principal) -> float | None:
    """The ``exp`` claim of a verified principal, if it is a finite number."""
    exp = principal.claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    value = float(exp)
    return value if math.isfinite(value) else None


class VerifiedTokenCache:
    """LRU map from token digest to verified principal, with expiry.

    ``max_entries`` bounds memory (default 10,000); ``max_ttl`` bounds how
    long any entry lives (default 300 s), also for principals without ``exp``
    (the static token).
    """

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_CACHE_MAX_ENTRIES,
        max_ttl: float = DEFAULT_CACHE_MAX_TTL,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if max_entries < 1 or not (max_ttl > 0):
            raise ConfigurationError("token cache needs max_entries >= 1 and max_ttl > 0")
        self._max_entries = max_entries
        self._max_ttl = max_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()

    @staticmethod
    def key_for(token: str) -> bytes:
        """The cache key of ``token``: its SHA-256 digest."""
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def get(self, key: bytes) -> Principal | None:
        """The principal cached under ``key``, or ``None`` if absent or expired."""
        now = self._clock.time()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if now >= entry[1]:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: bytes, principal: Principal, expires_at: float | None) -> None:
        """Remember ``principal`` until ``min(expires_at, now + max_ttl)``.
        Entries that would already be expired are not stored."""
        now = self._clock.time()
        until = now + self._max_ttl
        if expires_at is not None:
            until = min(until, expires_at)
        if until <= now:
            return
        with self._lock:
            self._entries[key] = (principal, until)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"VerifiedTokenCache(entries={len(self)}, max_entries={self._max_entries})"
