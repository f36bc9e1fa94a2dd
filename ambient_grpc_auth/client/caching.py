"""A caching token source: refresh-ahead, single flight, keep-last-good with
backoff, and precise invalidation.

Design. The cache holds an immutable :class:`~ambient_grpc_auth.client._refresh.CacheState`
that readers take without a lock (one attribute read), so the common case —
a fresh token — costs a clock read and a comparison. When a fetch is needed,
a short-held :class:`threading.Lock` (never held across I/O) elects one
*owner* and publishes a :class:`concurrent.futures.Future` for the fetch in
flight; every other caller waits on that future:

- sync callers block in ``future.result(timeout)``;
- async callers await a loop-local future woken through
  ``call_soon_threadsafe``, so waiting never blocks their event loop, and
  cancelling one waiter never disturbs the others or the fetch;
- an async owner runs the fetch (``source.get_token_async()``) in its own
  task, so the fetch survives the cancellation of the call that started it.

Because the flight is a thread-safe future rather than a lock or an
``asyncio.Lock`` tied to one loop, a single fetch serves callers from any
mix of threads and event loops: there is exactly one fetch in flight per
cache. (The oauth2 pattern of holding a mutex across the fetch cannot be
awaited without blocking the loop, hence the future.)

Policy (the pure part lives in :mod:`ambient_grpc_auth.client._refresh`):

- a token is served while ``now < expires_at - refresh_ahead``; in the
  refresh-ahead window one caller refreshes while the others keep getting
  the still-valid token without waiting;
- a token of unknown expiry is served until invalidated, and refreshed after
  ``unknown_expiry_max_age`` seconds (None: never) — if that refresh fails it
  is still served;
- a failed fetch starts a capped, jittered exponential backoff during which
  no fetch is attempted: a still-valid token keeps being served, and once it
  has expired (or there is none) callers get :class:`TokenUnavailableError`
  at once, carrying the last failure's message;
- ``invalidate(token)`` drops the cached token only if it equals ``token``
  (constant-time comparison), so a late UNAUTHENTICATED for an old token
  neither drops the new one nor causes a fetch.

Calling the blocking :meth:`CachingTokenSource.get_token` on an event loop
whose task is fetching would deadlock; it raises TokenUnavailableError
instead. Use ``get_token_async`` on event loops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import logging
import math
import random
import threading
from dataclasses import dataclass, replace

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.client import _refresh
from ambient_grpc_auth.client._refresh import (
    REFRESH_AHEAD_SECONDS,
    UNKNOWN_EXPIRY_MAX_AGE_SECONDS,
    Action,
    CacheState,
    ErrorInfo,
    RefreshPolicy,
)
from ambient_grpc_auth.client.tokens import Token, TokenSource
from ambient_grpc_auth.errors import ConfigurationError, TokenUnavailableError

__all__ = [
    "REFRESH_AHEAD_SECONDS",
    "UNKNOWN_EXPIRY_MAX_AGE_SECONDS",
    "CachingTokenSource",
]

_log = logging.getLogger(__name__)


class _Abandoned(Exception):
    """The owner stopped without a result (cancelled, loop closed): retry."""


class _FetchFailed(Exception):
    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


@dataclass(slots=True)
class _Flight:
    future: concurrent.futures.Future[Token]
    loop: asyncio.AbstractEventLoop | None  # the owner's loop, for async owners


@dataclass(frozen=True, slots=True)
class _Plan:
    token: Token | None = None  # serve this
    error: TokenUnavailableError | None = None  # raise this
    flight: _Flight | None = None  # wait for (or, if own, run) this fetch
    own: bool = False


class CachingTokenSource:
    """Wraps a :class:`~ambient_grpc_auth.client.tokens.TokenSource`; implements
    :class:`~ambient_grpc_auth.client.tokens.RefreshableTokenSource`.

    Thread-safe and usable from any number of threads and event loops at
    once. Raises :class:`TokenUnavailableError` when no valid token can be
    served; waiting for a fetch in flight is bounded by ``wait_timeout``
    seconds. ``fetches`` and ``failures`` count calls to the wrapped source
    and the failed ones.
    """

    def __init__(
        self,
        source: TokenSource,
        *,
        refresh_ahead: float = REFRESH_AHEAD_SECONDS,
        unknown_expiry_max_age: float | None = UNKNOWN_EXPIRY_MAX_AGE_SECONDS,
        min_backoff: float = 1.0,
        max_backoff: float = 30.0,
        clock: Clock = SYSTEM_CLOCK,
        wait_timeout: float = 120.0,
        rng: random.Random | None = None,
    ) -> None:
        try:
            self._policy = RefreshPolicy(
                refresh_ahead, unknown_expiry_max_age, min_backoff, max_backoff
            )
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        if wait_timeout <= 0:
            raise ConfigurationError("wait_timeout must be positive")
        self.source = source
        self._clock = clock
        self._wait_timeout = wait_timeout
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._state = CacheState()
        # (state, wall bound, mono bound) of _refresh.fresh_until, for _fast.
        self._fresh: tuple[CacheState, float, float] = (self._state, -math.inf, -math.inf)
        self._flight: _Flight | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._fetches = 0
        self._failures = 0
        self._waiters = 0

    def __repr__(self) -> str:
        return f"CachingTokenSource({self.source!r})"

    @property
    def fetches(self) -> int:
        """How many times the wrapped source was asked for a token."""
        return self._fetches

    @property
    def failures(self) -> int:
        """How many of those fetches failed."""
        return self._failures

    @property
    def waiters(self) -> int:
        """Callers waiting right now for the fetch in flight (a gauge)."""
        return self._waiters

    def _count_waiter(self, delta: int) -> None:
        with self._lock:
            self._waiters += delta

    # --- the shared core ----------------------------------------------------

    def peek(self) -> Token | None:
        """The cached token when it can be used right now without fetching
        or waiting (not due for refresh), else ``None``. Never blocks."""
        return self._fast()

    def _fast(self) -> Token | None:
        state = self._state  # one atomic read; the state is immutable
        bounds = self._fresh
        if bounds[0] is not state:  # computed once per state (a tuple: one atomic write)
            bounds = self._fresh = (state, *_refresh.fresh_until(state, self._policy))
        clock = self._clock
        if clock.time() < bounds[1] and clock.monotonic() < bounds[2]:
            return state.token  # what decide() answers USE_CACHED for
        return None

    def _plan(self, loop: asyncio.AbstractEventLoop | None) -> _Plan:
        with self._lock:
            state = self._state
            wall, mono = self._clock.time(), self._clock.monotonic()
            action = _refresh.decide(state, self._policy, wall, mono)
            if action is Action.USE_CACHED or action is Action.SERVE_STALE:
                return _Plan(token=state.token)
            if action is Action.FAIL:
                assert state.last_error is not None
                wait = max(state.retry_at - mono, 0.0)
                return _Plan(error=state.last_error.to_error(f" (next attempt in {wait:.1f}s)"))
            if self._flight is not None:
                # Someone is fetching: a still-valid token is served meanwhile.
                current = _refresh.usable(state, self._policy, wall, mono)
                if current is not None:
                    return _Plan(token=current)
                return _Plan(flight=self._flight)
            self._flight = _Flight(concurrent.futures.Future(), loop)
            self._fetches += 1
            return _Plan(flight=self._flight, own=True)

    def _publish(
        self, flight: _Flight, token: Token | None, error: TokenUnavailableError | None
    ) -> Token | TokenUnavailableError:
        """Record a fetch's outcome, end the flight and wake its waiters.
        Returns what the owner should return or raise."""
        with self._lock:
            wall, mono = self._clock.time(), self._clock.monotonic()
            if token is not None and token.expires_at is not None and token.expires_at <= wall:
                token = None
                error = TokenUnavailableError(
                    "token source returned an already expired token (check the clocks)",
                    retryable=True,
                )
            outcome: Token | TokenUnavailableError
            if token is not None:
                self._state = _refresh.after_success(self._state, token, wall, mono)
                outcome = token
            else:
                assert error is not None
                self._failures += 1
                self._state = _refresh.after_failure(
                    self._state, error, self._policy, mono, self._rng.random()
                )
                current = _refresh.usable(self._state, self._policy, wall, mono)
                delay = self._state.retry_at - mono
                if current is not None:
                    _log.warning(
                        "token refresh failed, serving the current token; next attempt in "
                        "%.1fs: %s",
                        delay,
                        error,
                    )
                    outcome = current
                else:
                    _log.warning("token fetch failed; next attempt in %.1fs: %s", delay, error)
                    outcome = error
            if self._flight is flight:
                self._flight = None
        # Outside the lock: done-callbacks run here.
        if isinstance(outcome, Token):
            _settle(flight.future, outcome)
        else:
            _settle(flight.future, _FetchFailed(ErrorInfo.of(outcome)))
        return outcome

    def _settle_flight(
        self, flight: _Flight, token: object, error: TokenUnavailableError | None
    ) -> Token | TokenUnavailableError:
        # Whatever happens, the flight must end: waiters would otherwise wait
        # for wait_timeout on a fetch that is over.
        try:
            if token is not None and not isinstance(token, Token):
                token, error = (
                    None,
                    TokenUnavailableError(
                        f"token source {type(self.source).__name__} returned "
                        f"{type(token).__name__} instead of a Token",
                        retryable=False,
                    ),
                )
            return self._publish(flight, token, error)
        except BaseException:
            self._abandon(flight)
            raise

    def _abandon(self, flight: _Flight) -> None:
        with self._lock:
            if self._flight is flight:
                self._flight = None
        _settle(flight.future, _Abandoned())

    def _timed_out(self, flight: _Flight) -> TokenUnavailableError:
        # The owner is stuck (its loop stopped, or the source ignores its own
        # timeouts): release the flight so that the next call starts afresh.
        self._abandon(flight)
        return TokenUnavailableError(
            f"timed out after {self._wait_timeout:g}s waiting for a token fetch in progress",
            retryable=True,
        )

    def _unexpected(self, exc: Exception) -> TokenUnavailableError:
        # Only the type, and not chained: a foreign exception's text might
        # quote a secret. Its traceback goes to the DEBUG log only.
        return TokenUnavailableError(
            f"token source {type(self.source).__name__} failed unexpectedly ({type(exc).__name__})",
            retryable=True,
        )

    def invalidate(self, token: Token) -> None:
        """Drop the cached token if it equals ``token``; otherwise do nothing.

        Never fetches; the next ``get_token`` does (unless a failed fetch is
        backing off)."""
        with self._lock:
            current = self._state.token
            if current is not None and (
                current is token
                or hmac.compare_digest(current.value.encode(), token.value.encode())
            ):
                self._state = replace(self._state, token=None)

    # --- sync ---------------------------------------------------------------

    def get_token(self) -> Token:
        """A valid token, fetching at most once for all concurrent callers."""
        token = self._fast()
        if token is not None:
            return token
        while True:
            plan = self._plan(None)
            if plan.token is not None:
                return plan.token
            if plan.error is not None:
                raise plan.error
            assert plan.flight is not None
            if plan.own:
                return self._own_sync(plan.flight)
            if plan.flight.loop is not None and plan.flight.loop is _running_loop():
                raise TokenUnavailableError(
                    "get_token() called on the event loop that is fetching the token; "
                    "use get_token_async()",
                    retryable=True,
                )
            self._count_waiter(1)
            try:
                return plan.flight.future.result(timeout=self._wait_timeout)
            except _Abandoned:
                continue
            except _FetchFailed as failed:
                raise failed.info.to_error() from None
            except concurrent.futures.TimeoutError:
                raise self._timed_out(plan.flight) from None
            finally:
                self._count_waiter(-1)

    def _own_sync(self, flight: _Flight) -> Token:
        token: Token | None = None
        error: TokenUnavailableError | None = None
        try:
            token = self.source.get_token()
        except TokenUnavailableError as exc:
            error = exc
        except Exception as exc:
            _log.debug("token source raised unexpectedly", exc_info=True)
            error = self._unexpected(exc)
        except BaseException:
            self._abandon(flight)
            raise
        outcome = self._settle_flight(flight, token, error)
        if isinstance(outcome, Token):
            return outcome
        raise outcome

    # --- async --------------------------------------------------------------

    async def get_token_async(self) -> Token:
        """As :meth:`get_token`; never blocks the event loop."""
        token = self._fast()
        if token is not None:
            return token
        loop = asyncio.get_running_loop()
        while True:
            plan = self._plan(loop)
            if plan.token is not None:
                return plan.token
            if plan.error is not None:
                raise plan.error
            assert plan.flight is not None
            if plan.own:
                task = loop.create_task(self._own_async(plan.flight))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._count_waiter(1)
            try:
                async with asyncio.timeout(self._wait_timeout):
                    await _wait_async(plan.flight.future)
            except TimeoutError:
                raise self._timed_out(plan.flight) from None
            finally:
                self._count_waiter(-1)
            try:
                return plan.flight.future.result()
            except _Abandoned:
                continue
            except _FetchFailed as failed:
                raise failed.info.to_error() from None

    async def _own_async(self, flight: _Flight) -> None:
        token: Token | None = None
        error: TokenUnavailableError | None = None
        try:
            token = await self.source.get_token_async()
        except TokenUnavailableError as exc:
            error = exc
        except Exception as exc:
            _log.debug("token source raised unexpectedly", exc_info=True)
            error = self._unexpected(exc)
        except BaseException:
            # Cancelled, or the loop is closing: let a waiter take over.
            self._abandon(flight)
            raise
        self._settle_flight(flight, token, error)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _settle(future: concurrent.futures.Future[Token], outcome: Token | Exception) -> None:
    # A flight released after a wait timeout may still be completed by its
    # owner later: the first outcome wins, the late one is dropped.
    try:
        if isinstance(outcome, Token):
            future.set_result(outcome)
        else:
            future.set_exception(outcome)
    except concurrent.futures.InvalidStateError:
        pass


async def _wait_async(future: concurrent.futures.Future[Token]) -> None:
    """Wait for ``future`` (completed from any thread) without blocking the loop.

    A loop-local waiter is used instead of :func:`asyncio.wrap_future`, whose
    cancellation would cancel the shared future for every other waiter.
    """
    if future.done():
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    def on_done(_: concurrent.futures.Future[Token]) -> None:
        # RuntimeError: that loop has closed, so nobody is waiting there.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(wake)

    future.add_done_callback(on_done)
    await waiter
