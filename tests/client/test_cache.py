"""CachingTokenSource: refresh-ahead, single flight (threads, tasks, both),
backoff with keep-last-good, invalidation, and the pure refresh decisions."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.client import FakeSource
from support.waiting import async_wait_until, wait_until

from ambient_grpc_auth.client import _refresh
from ambient_grpc_auth.client._refresh import Action, CacheState, RefreshPolicy
from ambient_grpc_auth.client.caching import REFRESH_AHEAD_SECONDS, CachingTokenSource
from ambient_grpc_auth.client.tokens import Token
from ambient_grpc_auth.errors import ConfigurationError, TokenUnavailableError
from ambient_grpc_auth.testing import FakeClock

TTL = 900.0  # a typical 15-minute runner token


def tok(clock: FakeClock, name: str, ttl: float | None = TTL) -> Token:
    return Token(name, None if ttl is None else clock.time() + ttl)


def make(source: FakeSource, clock: FakeClock, **kw: object) -> CachingTokenSource:
    kw.setdefault("rng", random.Random(7))
    return CachingTokenSource(source, clock=clock, **kw)  # type: ignore[arg-type]


def test_refresh_ahead_is_a_minute() -> None:
    # The module's __all__ is pinned in tests/test_public_api.py.
    assert REFRESH_AHEAD_SECONDS == 60.0


# --- pure decisions -------------------------------------------------------------


def test_decide_phases() -> None:
    policy = RefreshPolicy()
    token = Token("t", 1000.0 + TTL)
    st = _refresh.after_success(CacheState(), token, wall=1000.0, mono=0.0)
    assert _refresh.decide(CacheState(), policy, 0, 0) is Action.FETCH
    assert _refresh.decide(st, policy, 1000.0 + TTL - 61, 0) is Action.USE_CACHED
    assert _refresh.decide(st, policy, 1000.0 + TTL - 60, 0) is Action.FETCH
    assert _refresh.phase(st, policy, 1000.0 + TTL - 1, 0) is _refresh.Phase.STALE
    assert _refresh.phase(st, policy, 1000.0 + TTL, 0) is _refresh.Phase.EXPIRED
    failed = _refresh.after_failure(
        st, TokenUnavailableError("x", retryable=True), policy, mono=0.0, jitter=1.0
    )
    assert failed.retry_at == 1.0  # min_backoff with full jitter
    assert _refresh.decide(failed, policy, 1000.0 + TTL - 30, 0.5) is Action.SERVE_STALE
    assert _refresh.decide(failed, policy, 1000.0 + TTL + 1, 0.5) is Action.FAIL
    assert _refresh.decide(failed, policy, 1000.0 + TTL + 1, 1.0) is Action.FETCH


def test_backoff_is_capped_exponential_with_jitter() -> None:
    policy = RefreshPolicy(min_backoff=1.0, max_backoff=30.0)
    full = [_refresh.backoff_delay(n, policy, 1.0) for n in range(1, 10)]
    assert full == [1, 2, 4, 8, 16, 30, 30, 30, 30]
    assert _refresh.backoff_delay(3, policy, 0.0) == 2.0  # half of 4
    assert _refresh.backoff_delay(10_000, policy, 0.5) <= 30.0


def test_short_lived_tokens_refresh_at_half_life() -> None:
    policy = RefreshPolicy()
    st = _refresh.after_success(CacheState(), Token("t", 1030.0), wall=1000.0, mono=0.0)
    # A 30 s token would always be inside a 60 s refresh-ahead window.
    assert _refresh.decide(st, policy, 1014.0, 0) is Action.USE_CACHED
    assert _refresh.decide(st, policy, 1015.0, 0) is Action.FETCH


def test_policy_validation() -> None:
    with pytest.raises(ConfigurationError):
        CachingTokenSource(FakeSource(), refresh_ahead=-1)
    with pytest.raises(ConfigurationError):
        CachingTokenSource(FakeSource(), min_backoff=5, max_backoff=1)
    with pytest.raises(ConfigurationError):
        CachingTokenSource(FakeSource(), unknown_expiry_max_age=0)
    with pytest.raises(ConfigurationError):
        CachingTokenSource(FakeSource(), wait_timeout=0)


# --- sync behaviour -----------------------------------------------------------------


def test_caches_until_refresh_ahead() -> None:
    clock = FakeClock()
    src = FakeSource(tok(clock, "one"), tok(clock, "two", ttl=2 * TTL))
    cache = make(src, clock)
    assert cache.get_token().value == "one"
    clock.advance(TTL - 61)
    assert cache.get_token().value == "one"
    assert src.calls == 1
    clock.advance(1)  # now exactly expires_at - 60
    assert cache.get_token().value == "two"
    assert cache.get_token().value == "two"
    assert (src.calls, cache.fetches, cache.failures) == (2, 2, 0)


def test_peek_never_fetches_and_only_offers_a_token_usable_now() -> None:
    clock = FakeClock()
    src = FakeSource(tok(clock, "one"), tok(clock, "two", ttl=2 * TTL))
    cache = make(src, clock)
    assert cache.peek() is None  # nothing cached yet, and no fetch made
    assert src.calls == 0
    first = cache.get_token()
    assert cache.peek() is first
    clock.advance(TTL - 60)  # due for refresh: the caller must go the regular way
    assert cache.peek() is None
    assert src.calls == 1
    assert cache.get_token().value == "two"
    assert cache.peek() is not None
    cache.invalidate(cache.peek())  # type: ignore[arg-type]
    assert cache.peek() is None
    assert src.calls == 2


def test_unknown_expiry_kept_until_max_age_or_invalidate() -> None:
    clock = FakeClock()
    src = FakeSource(
        tok(clock, "a", None),
        tok(clock, "b", None),
        TokenUnavailableError("down", retryable=True),
        tok(clock, "c", None),
    )
    cache = make(src, clock, unknown_expiry_max_age=300)
    assert cache.get_token().value == "a"
    clock.advance(299)
    assert cache.get_token().value == "a"
    cache.invalidate(Token("a"))
    assert cache.get_token().value == "b"
    clock.advance(300)
    # Max age reached and the refresh fails: nothing says "b" expired, so serve it.
    assert cache.get_token().value == "b"
    assert cache.failures == 1
    clock.advance(31)
    assert cache.get_token().value == "c"
    forever = make(FakeSource(tok(clock, "z", None)), clock, unknown_expiry_max_age=None)
    forever.get_token()
    clock.advance(10**6)
    assert forever.get_token().value == "z"
    assert forever.fetches == 1


def test_failed_refresh_serves_valid_token_and_backs_off() -> None:
    clock = FakeClock()
    src = FakeSource(
        tok(clock, "one"),
        TokenUnavailableError("cp down", retryable=True, status=503),
        TokenUnavailableError("cp down", retryable=True, status=503),
        tok(clock, "two", ttl=2 * TTL),
    )
    cache = make(src, clock, min_backoff=2.0, max_backoff=8.0)
    assert cache.get_token().value == "one"
    clock.advance(TTL - 30)  # inside the refresh-ahead window
    assert cache.get_token().value == "one"  # refresh failed; still valid
    assert (cache.fetches, cache.failures) == (2, 1)
    for _ in range(5):
        assert cache.get_token().value == "one"
    assert cache.fetches == 2  # backing off: no new attempt
    clock.advance(2.0)  # first backoff is at most min_backoff
    assert cache.get_token().value == "one"
    assert (cache.fetches, cache.failures) == (3, 2)
    clock.advance(4.0)  # second backoff is at most 2 * min_backoff
    assert cache.get_token().value == "two"
    assert (cache.fetches, cache.failures) == (4, 2)


def test_expired_and_failing_raises_then_recovers() -> None:
    clock = FakeClock()
    src = FakeSource(
        tok(clock, "one"),
        TokenUnavailableError("cp down", retryable=True, status=503),
        tok(clock, "two", ttl=2 * TTL),
    )
    cache = make(src, clock, min_backoff=1.0, max_backoff=1.0)
    cache.get_token()
    clock.advance(TTL)  # expired
    with pytest.raises(TokenUnavailableError, match="cp down") as info:
        cache.get_token()
    assert info.value.retryable is True
    assert info.value.status == 503
    with pytest.raises(TokenUnavailableError, match="next attempt in"):
        cache.get_token()  # fails fast while backing off
    assert cache.fetches == 2
    clock.advance(1.0)
    assert cache.get_token().value == "two"


def test_invalidate_is_precise() -> None:
    clock = FakeClock()
    src = FakeSource(tok(clock, "old-token"), tok(clock, "new-token"), tok(clock, "third"))
    cache = make(src, clock)
    old = cache.get_token()
    cache.invalidate(old)
    new = cache.get_token()
    assert new.value == "new-token"
    assert cache.fetches == 2
    # A late UNAUTHENTICATED for the old token: no drop, no fetch.
    cache.invalidate(old)
    cache.invalidate(Token("old-token"))
    cache.invalidate(Token("something-else-entirely"))
    assert cache.get_token() is new
    assert cache.fetches == 2
    # Equal value, different object: dropped (compared by value).
    cache.invalidate(Token("new-token"))
    assert cache.get_token().value == "third"


def test_invalidate_never_fetches() -> None:
    clock = FakeClock()
    src = FakeSource(tok(clock, "one"))
    cache = make(src, clock)
    cache.invalidate(Token("nothing-cached"))
    token = cache.get_token()
    cache.invalidate(token)
    assert src.calls == 1


def test_source_returning_expired_token_is_a_failure() -> None:
    clock = FakeClock()
    src = FakeSource(Token("stale", clock.time() - 1), tok(clock, "good"))
    cache = make(src, clock, min_backoff=1, max_backoff=1)
    with pytest.raises(TokenUnavailableError, match="already expired"):
        cache.get_token()
    clock.advance(1)
    assert cache.get_token().value == "good"


def test_unexpected_exception_becomes_token_unavailable() -> None:
    clock = FakeClock()
    secret = "leaky-secret-123"
    cache = make(FakeSource(RuntimeError(f"oops {secret}")), clock)
    with pytest.raises(TokenUnavailableError) as info:
        cache.get_token()
    assert "RuntimeError" in str(info.value)
    assert secret not in str(info.value)
    assert cache.failures == 1


def test_repr_hides_token() -> None:
    clock = FakeClock()
    cache = make(FakeSource(tok(clock, "hidden-value-xyz")), clock)
    cache.get_token()
    assert "hidden-value-xyz" not in repr(cache)


def test_single_flight_1000_threads() -> None:
    clock = FakeClock()
    src = FakeSource(tok(clock, "first"), tok(clock, "second", ttl=2 * TTL))
    cache = make(src, clock)
    cache.get_token()
    clock.advance(TTL)  # expired: every caller must wait for the refresh
    src.gate = threading.Event()
    n = 1000
    start = threading.Barrier(n)
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        start.wait()
        try:
            value = cache.get_token().value
        except BaseException as exc:  # pragma: no cover - reported below
            with lock:
                errors.append(exc)
            return
        with lock:
            results.append(value)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        # All but the owner (blocked in the source) wait for its result.
        wait_until(lambda: cache.waiters == n - 1, timeout=20)
        assert src.calls == 1
        assert src.entered.is_set()
    finally:
        src.gate.set()
        for t in threads:
            t.join(30)
    assert not errors
    assert results == ["second"] * n
    assert src.calls == 2
    assert cache.fetches == 2
    assert cache.waiters == 0


def test_waiters_share_a_failure() -> None:
    clock = FakeClock()
    src = FakeSource(TokenUnavailableError("denied (HTTP 403)", retryable=False, status=403))
    src.gate = threading.Event()
    cache = make(src, clock)
    errors: list[TokenUnavailableError] = []

    def worker() -> None:
        try:
            cache.get_token()
        except TokenUnavailableError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    wait_until(lambda: cache.waiters == 19)
    src.gate.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 20
    assert {(str(e), e.retryable, e.status) for e in errors} == {("denied (HTTP 403)", False, 403)}
    assert len({id(e) for e in errors}) == 20  # each caller gets its own exception
    assert src.calls == 1


def test_stale_window_does_not_block_other_callers() -> None:
    clock = FakeClock()
    src = FakeSource(tok(clock, "one"), tok(clock, "two"))
    cache = make(src, clock)
    cache.get_token()
    clock.advance(TTL - 30)
    src.gate = threading.Event()
    owner_result: list[str] = []
    owner = threading.Thread(target=lambda: owner_result.append(cache.get_token().value))
    owner.start()
    try:
        assert src.entered.wait(5)
        # While the owner refreshes, others get the still-valid token at once.
        assert cache.get_token().value == "one"
        assert cache.waiters == 0
    finally:
        src.gate.set()
        owner.join(5)
    assert owner_result == ["two"]
    assert cache.fetches == 2


def test_stuck_fetch_times_out_and_is_released() -> None:
    clock = FakeClock()
    src = FakeSource(tok(clock, "late"), tok(clock, "fresh"))
    src.gate = threading.Event()
    cache = make(src, clock, wait_timeout=0.2)
    owner = threading.Thread(target=cache.get_token)
    owner.start()
    try:
        assert src.entered.wait(5)
        with pytest.raises(TokenUnavailableError, match="timed out"):
            cache.get_token()
    finally:
        src.gate.set()
        owner.join(5)
    # The late owner's result was still recorded (first outcome wins on the flight).
    assert cache.get_token().value in {"late", "fresh"}


# --- async behaviour -----------------------------------------------------------------


async def test_async_single_flight_1000_tasks() -> None:
    clock = FakeClock()
    src = FakeSource(tok(clock, "first"), tok(clock, "second", ttl=2 * TTL))
    cache = make(src, clock)
    assert (await cache.get_token_async()).value == "first"
    clock.advance(TTL)
    src.async_gate = asyncio.Event()
    n = 1000
    tasks = [asyncio.create_task(cache.get_token_async()) for _ in range(n)]
    try:
        await async_wait_until(lambda: cache.waiters == n, timeout=20)
        assert src.calls == 1  # only the initial fetch completed
    finally:
        src.async_gate.set()
        results = await asyncio.gather(*tasks)
    assert {t.value for t in results} == {"second"}
    assert src.calls == 2
    assert cache.fetches == 2


async def test_async_fetch_does_not_block_the_loop() -> None:
    clock = FakeClock()
    src = FakeSource(tok(clock, "one"))
    src.async_gate = asyncio.Event()
    cache = make(src, clock)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    fetch = asyncio.create_task(cache.get_token_async())
    try:
        await async_wait_until(src.entered.is_set)
        before = ticks
        await async_wait_until(lambda: ticks > before + 100)
        assert not fetch.done()
    finally:
        src.async_gate.set()
        token = await fetch
        stop.set()
        await ticking
    assert token.value == "one"


async def test_async_backoff_and_expiry() -> None:
    clock = FakeClock()
    src = FakeSource(
        tok(clock, "one"),
        TokenUnavailableError("down", retryable=True),
        TokenUnavailableError("still down", retryable=True),
    )
    cache = make(src, clock, min_backoff=30, max_backoff=30)
    await cache.get_token_async()
    clock.advance(TTL - 10)
    assert (await cache.get_token_async()).value == "one"  # refresh failed, still valid
    assert (await cache.get_token_async()).value == "one"
    assert cache.fetches == 2
    clock.advance(10)  # expired, and still backing off (>= 15 s)
    with pytest.raises(TokenUnavailableError, match="next attempt"):
        await cache.get_token_async()
    assert cache.fetches == 2
    clock.advance(30)
    with pytest.raises(TokenUnavailableError, match="still down"):
        await cache.get_token_async()
    assert cache.failures == 2


async def test_async_cancelled_caller_does_not_cancel_the_fetch() -> None:
    clock = FakeClock()
    src = FakeSource(tok(clock, "one"))
    src.async_gate = asyncio.Event()
    cache = make(src, clock)
    first = asyncio.create_task(cache.get_token_async())
    await async_wait_until(src.entered.is_set)
    second = asyncio.create_task(cache.get_token_async())
    await async_wait_until(lambda: cache.waiters == 2)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    src.async_gate.set()
    assert (await second).value == "one"
    assert cache.fetches == 1


async def test_async_abandoned_fetch_is_taken_over() -> None:
    clock = FakeClock()
    src = FakeSource(asyncio.CancelledError(), tok(clock, "one"))
    cache = make(src, clock)
    assert (await cache.get_token_async()).value == "one"
    assert cache.fetches == 2
    assert cache.failures == 0


async def test_sync_call_on_fetching_loop_raises_instead_of_deadlocking() -> None:
    clock = FakeClock()
    src = FakeSource(tok(clock, "one"))
    src.async_gate = asyncio.Event()
    cache = make(src, clock)
    task = asyncio.create_task(cache.get_token_async())
    await async_wait_until(src.entered.is_set)
    with pytest.raises(TokenUnavailableError, match="get_token_async"):
        cache.get_token()
    src.async_gate.set()
    assert (await task).value == "one"


async def test_threads_and_tasks_share_one_fetch() -> None:
    clock = FakeClock()
    src = FakeSource(tok(clock, "shared"))
    src.async_gate = asyncio.Event()
    cache = make(src, clock)
    owner = asyncio.create_task(cache.get_token_async())
    await async_wait_until(src.entered.is_set)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_token().value)) for _ in range(50)
    ]
    for t in threads:
        t.start()
    # A second event loop in another thread waits on the same flight.
    other_loop: list[str] = []
    other = threading.Thread(
        target=lambda: other_loop.append(asyncio.run(cache.get_token_async()).value)
    )
    other.start()
    await async_wait_until(lambda: cache.waiters == 52)
    src.async_gate.set()
    assert (await owner).value == "shared"
    await asyncio.to_thread(lambda: [t.join(10) for t in [*threads, other]])
    assert results == ["shared"] * 50
    assert other_loop == ["shared"]
    assert cache.fetches == 1


async def test_source_returning_a_non_token_fails_cleanly() -> None:
    class Bad:
        def get_token(self) -> object:
            return "a-bare-string"

        async def get_token_async(self) -> object:
            return "a-bare-string"

    cache = CachingTokenSource(Bad(), clock=FakeClock(), wait_timeout=5)  # type: ignore[arg-type]
    with pytest.raises(TokenUnavailableError, match="instead of a Token") as info:
        await cache.get_token_async()
    assert "a-bare-string" not in str(info.value)
    with pytest.raises(TokenUnavailableError, match="next attempt"):
        cache.get_token()


async def test_async_invalidate_old_after_refresh() -> None:
    clock = FakeClock()
    src = FakeSource(tok(clock, "old-token"), tok(clock, "new-token", ttl=2 * TTL))
    cache = make(src, clock)
    old = await cache.get_token_async()
    clock.advance(TTL)
    new = await cache.get_token_async()
    cache.invalidate(old)
    assert await cache.get_token_async() is new
    assert cache.fetches == 2


def _phase_by_the_rules(
    state: CacheState, policy: RefreshPolicy, wall: float, mono: float
) -> _refresh.Phase:
    """The refresh rules spelled out case by case, independently of the
    bounds ``CachingTokenSource`` computes once per state."""
    token = state.token
    if token is None:
        return _refresh.Phase.EXPIRED
    if token.expires_at is None:
        max_age = policy.unknown_expiry_max_age
        if max_age is not None and mono - state.fetched_mono >= max_age:
            return _refresh.Phase.STALE
        return _refresh.Phase.FRESH
    if wall >= token.expires_at:
        return _refresh.Phase.EXPIRED
    ahead = min(policy.refresh_ahead, max(token.expires_at - state.fetched_wall, 0.0) / 2)
    return _refresh.Phase.STALE if wall >= token.expires_at - ahead else _refresh.Phase.FRESH


_times = st.floats(min_value=0.0, max_value=10_000.0, allow_nan=False)


@given(
    expires=st.one_of(st.none(), _times),
    fetched_wall=_times,
    fetched_mono=_times,
    wall=_times,
    mono=_times,
    ahead=st.floats(min_value=0.0, max_value=600.0),
    max_age=st.one_of(st.none(), st.floats(min_value=0.001, max_value=600.0)),
    has_token=st.booleans(),
)
def test_phase_and_the_fast_path_follow_the_rules(
    expires: float | None,
    fetched_wall: float,
    fetched_mono: float,
    wall: float,
    mono: float,
    ahead: float,
    max_age: float | None,
    has_token: bool,
) -> None:
    policy = RefreshPolicy(refresh_ahead=ahead, unknown_expiry_max_age=max_age)
    token = Token("t", expires) if has_token else None
    state = CacheState(token=token, fetched_wall=fetched_wall, fetched_mono=fetched_mono)
    expected = _phase_by_the_rules(state, policy, wall, mono)
    assert _refresh.phase(state, policy, wall, mono) is expected
    # The caching source's lock-free path serves the token exactly when FRESH.
    wall_bound, mono_bound = _refresh.fresh_until(state, policy)
    assert (wall < wall_bound and mono < mono_bound) is (expected is _refresh.Phase.FRESH)
