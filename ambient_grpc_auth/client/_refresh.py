"""Pure refresh decisions for the caching token source (no I/O, no locks).

The sync and async paths of :class:`~ambient_grpc_auth.client.caching.CachingTokenSource`
both call :func:`decide` on an immutable :class:`CacheState` and publish the
result of a fetch with :func:`after_success` / :func:`after_failure`, so the
policy (fresh / refresh-ahead / expired, backoff) is written exactly once.

Times: ``wall`` is ``clock.time()`` (token expiry is wall time), ``mono`` is
``clock.monotonic()`` (ages and backoff must not jump with the wall clock).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace

from ambient_grpc_auth.client.tokens import Token
from ambient_grpc_auth.errors import TokenUnavailableError

__all__ = [
    "REFRESH_AHEAD_SECONDS",
    "UNKNOWN_EXPIRY_MAX_AGE_SECONDS",
    "Action",
    "CacheState",
    "ErrorInfo",
    "Phase",
    "RefreshPolicy",
    "after_failure",
    "after_success",
    "backoff_delay",
    "decide",
    "fresh_until",
    "phase",
    "usable",
]

#: Refresh this long before ``expires_at``. A minute covers the clock skew
#: usually tolerated between pods (NTP keeps it well under a second, but
#: verifiers allow tens of seconds) plus a slow control-plane round trip with
#: retries, so a token is replaced before any server can consider it expired;
#: with the typical 15-minute tokens it costs under 7% of their lifetime.
REFRESH_AHEAD_SECONDS = 60.0

#: A token whose expiry is unknown is refreshed after this age; it is still
#: served if that refresh fails, since nothing says it has expired.
UNKNOWN_EXPIRY_MAX_AGE_SECONDS = 300.0


class Phase(enum.Enum):
    FRESH = "fresh"  # serve it
    STALE = "stale"  # still valid, but time to refresh (refresh-ahead window / max age)
    EXPIRED = "expired"  # no token, or past its expiry


class Action(enum.Enum):
    USE_CACHED = "use_cached"  # fresh token, nothing to do
    FETCH = "fetch"  # fetch now (single flight)
    SERVE_STALE = "serve_stale"  # refresh is backing off; current token still valid
    FAIL = "fail"  # backing off and no valid token: raise the last error


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    refresh_ahead: float = REFRESH_AHEAD_SECONDS
    unknown_expiry_max_age: float | None = UNKNOWN_EXPIRY_MAX_AGE_SECONDS
    min_backoff: float = 1.0
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if self.refresh_ahead < 0 or self.min_backoff < 0 or self.max_backoff < self.min_backoff:
            raise ValueError("need refresh_ahead >= 0 and 0 <= min_backoff <= max_backoff")
        if self.unknown_expiry_max_age is not None and self.unknown_expiry_max_age <= 0:
            raise ValueError("unknown_expiry_max_age must be positive or None")


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A secret-free copy of the last fetch error (exceptions are not shared
    between threads: each raiser gets a fresh one from :meth:`to_error`)."""

    message: str
    retryable: bool
    status: int | None

    @classmethod
    def of(cls, exc: TokenUnavailableError) -> ErrorInfo:
        return cls(str(exc), exc.retryable, exc.status)

    def to_error(self, suffix: str = "") -> TokenUnavailableError:
        return TokenUnavailableError(
            self.message + suffix, retryable=self.retryable, status=self.status
        )


@dataclass(frozen=True, slots=True)
class CacheState:
    token: Token | None = None
    fetched_wall: float = 0.0
    fetched_mono: float = 0.0
    failures: int = 0  # consecutive failed fetches
    retry_at: float = 0.0  # monotonic; no fetch before this after a failure
    last_error: ErrorInfo | None = None


def fresh_until(state: CacheState, policy: RefreshPolicy) -> tuple[float, float]:
    """``(wall, mono)``: the cached token is FRESH while both clocks are
    below these bounds (``-inf`` without a token, ``inf`` for no bound).
    Depends on the state only, so a caller may compute it once per state."""
    token = state.token
    if token is None:
        return (-math.inf, -math.inf)
    if token.expires_at is None:
        max_age = policy.unknown_expiry_max_age
        return (math.inf, math.inf if max_age is None else state.fetched_mono + max_age)
    # A token that lives shorter than twice the refresh-ahead window would be
    # refreshed on every call; refresh such tokens at half their lifetime.
    lifetime = token.expires_at - state.fetched_wall
    ahead = min(policy.refresh_ahead, max(lifetime, 0.0) / 2)
    return (token.expires_at - ahead, math.inf)


def phase(state: CacheState, policy: RefreshPolicy, wall: float, mono: float) -> Phase:
    token = state.token
    if token is None:
        return Phase.EXPIRED
    wall_bound, mono_bound = fresh_until(state, policy)
    if wall < wall_bound and mono < mono_bound:
        return Phase.FRESH
    if token.expires_at is not None and wall >= token.expires_at:
        return Phase.EXPIRED
    return Phase.STALE


def decide(state: CacheState, policy: RefreshPolicy, wall: float, mono: float) -> Action:
    p = phase(state, policy, wall, mono)
    if p is Phase.FRESH:
        return Action.USE_CACHED
    if state.failures and mono < state.retry_at:
        return Action.SERVE_STALE if p is Phase.STALE else Action.FAIL
    return Action.FETCH


def backoff_delay(failures: int, policy: RefreshPolicy, jitter: float) -> float:
    """Capped exponential delay after ``failures`` (>= 1) consecutive failures,
    scaled by ``0.5 + jitter / 2`` with ``jitter`` in [0, 1] so that many
    runners that failed together do not retry together."""
    exponent = min(max(failures - 1, 0), 32)
    delay = min(policy.max_backoff, policy.min_backoff * (2.0**exponent))
    return delay * (0.5 + min(max(jitter, 0.0), 1.0) / 2)


def after_success(state: CacheState, token: Token, wall: float, mono: float) -> CacheState:
    return CacheState(token=token, fetched_wall=wall, fetched_mono=mono)


def after_failure(
    state: CacheState,
    error: TokenUnavailableError,
    policy: RefreshPolicy,
    mono: float,
    jitter: float,
) -> CacheState:
    failures = state.failures + 1
    return replace(
        state,
        failures=failures,
        retry_at=mono + backoff_delay(failures, policy, jitter),
        last_error=ErrorInfo.of(error),
    )


def usable(state: CacheState, policy: RefreshPolicy, wall: float, mono: float) -> Token | None:
    """The cached token if it may still be served (fresh or stale), else None."""
    if phase(state, policy, wall, mono) is Phase.EXPIRED:
        return None
    return state.token
