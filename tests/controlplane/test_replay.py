"""Replay protection for v2 proofs: the guard's policy and the in-process store."""

from __future__ import annotations

import contextlib
import threading

import pytest

from ambient_grpc_auth.controlplane.replay import (
    DEFAULT_MAX_ENTRIES,
    MemoryReplayStore,
    ReplayGuard,
    ReplayStore,
)
from ambient_grpc_auth.errors import ConfigurationError, ProofError
from ambient_grpc_auth.proof import DecodedProof
from ambient_grpc_auth.testing import FakeClock

SID = "session-0123456789abcdef"
T0 = 1_800_000_000


def _v2(sid: str = SID, ts: int = T0, nonce: str = "n" * 21 + "A") -> DecodedProof:
    return DecodedProof(sid, 2, ts, nonce)


class SteppingClock:
    """Wall and monotonic time that move independently (a wall clock step)."""

    def __init__(self, wall: float, mono: float = 1000.0) -> None:
        self.wall = wall
        self.mono = mono

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


class RecordingStore:
    """A ReplayStore that remembers forever and records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self.fail = False

    def remember(self, key: str, until: float) -> bool:
        if self.fail:
            raise ConnectionError("store unreachable")
        seen = any(k == key for k, _ in self.calls)
        self.calls.append((key, until))
        return not seen


# ---------------------------------------------------------------- the guard


def test_guard_accepts_once_and_refuses_replay() -> None:
    clock = FakeClock(T0)
    guard = ReplayGuard(window_seconds=60, clock=clock)
    guard.check(_v2())
    with pytest.raises(ProofError, match="replayed") as info:
        guard.check(_v2())
    assert info.value.status == 401
    guard.check(_v2(nonce="m" * 21 + "A"))  # another nonce
    guard.check(_v2(sid="session-other-1"))  # same nonce, another session
    assert len(guard) == 3


def test_guard_window_edges() -> None:
    clock = FakeClock(T0)
    guard = ReplayGuard(window_seconds=60, clock=clock)
    guard.check(_v2(ts=T0 - 60, nonce="a" * 21 + "A"))
    guard.check(_v2(ts=T0 + 60, nonce="b" * 21 + "A"))
    with pytest.raises(ProofError, match="stale"):
        guard.check(_v2(ts=T0 - 61, nonce="c" * 21 + "A"))
    with pytest.raises(ProofError, match="future"):
        guard.check(_v2(ts=T0 + 61, nonce="d" * 21 + "A"))


def test_guard_replay_after_expiry_is_stale_and_memory_is_released() -> None:
    clock = FakeClock(T0)
    guard = ReplayGuard(window_seconds=60, clock=clock)
    guard.check(_v2())
    clock.advance(61)
    with pytest.raises(ProofError, match="stale"):
        guard.check(_v2())
    clock.advance(60)
    guard.check(_v2(ts=int(clock.time()), nonce="z" * 21 + "A"))
    assert len(guard) == 1  # the first entry expired


def test_guard_v1_policy() -> None:
    ReplayGuard().check(DecodedProof(SID, 1))
    with pytest.raises(ProofError, match="fresh_proof_required") as info:
        ReplayGuard(require_fresh_proof=True).check(DecodedProof(SID, 1))
    assert info.value.status == 401


def test_guard_bounded_with_safe_eviction() -> None:
    clock = FakeClock(T0)
    guard = ReplayGuard(window_seconds=60, max_entries=3, clock=clock)
    for i in range(3):
        guard.check(_v2(ts=T0 - 10 + i, nonce=f"{i}" * 21 + "A"))
    guard.check(_v2(ts=T0, nonce="x" * 21 + "A"))  # evicts the oldest (ts T0-10)
    assert len(guard) == 3
    # The evicted proof cannot come back, although its nonce was forgotten.
    with pytest.raises(ProofError, match="replayed"):
        guard.check(_v2(ts=T0 - 10, nonce="0" * 21 + "A"))
    # Remembered ones are still refused as replays; newer proofs pass.
    with pytest.raises(ProofError, match="replayed"):
        guard.check(_v2(ts=T0, nonce="x" * 21 + "A"))
    guard.check(_v2(ts=T0 + 1, nonce="y" * 21 + "A"))
    for i in range(50):
        guard.check(_v2(ts=T0 + 2 + i % 50, nonce=f"{i:021d}A"))
    assert len(guard) == 3


def test_guard_thread_safety_one_winner() -> None:
    guard = ReplayGuard(clock=FakeClock(T0))
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def attempt() -> None:
        barrier.wait(timeout=10)
        try:
            guard.check(_v2())
            outcomes.append("ok")
        except ProofError as exc:
            outcomes.append(exc.reason)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(outcomes) == ["ok"] + ["replayed"] * 7


def test_guard_asks_its_store_to_remember_until_the_proof_goes_stale() -> None:
    store = RecordingStore()
    assert isinstance(store, ReplayStore)
    guard = ReplayGuard(window_seconds=30, clock=FakeClock(T0), store=store)
    guard.check(_v2(ts=T0 + 5))
    # One second past the last instant the proof is fresh (ts + window).
    assert store.calls == [(f"{SID}\x00{'n' * 21}A", T0 + 5 + 30 + 1.0)]
    with pytest.raises(ProofError, match="replayed"):
        guard.check(_v2(ts=T0 + 5))
    # Stale, future and v1 proofs never reach the store.
    for proof in (_v2(ts=T0 - 31), _v2(ts=T0 + 31), DecodedProof(SID, 1)):
        with contextlib.suppress(ProofError):
            guard.check(proof)
    assert len(store.calls) == 2


def test_guard_lets_store_failures_through() -> None:
    store = RecordingStore()
    store.fail = True
    guard = ReplayGuard(clock=FakeClock(T0), store=store)
    with pytest.raises(ConnectionError):
        guard.check(_v2())


def test_guard_configuration() -> None:
    with pytest.raises(ConfigurationError):
        ReplayGuard(window_seconds=0)
    with pytest.raises(ConfigurationError):
        ReplayGuard(store=RecordingStore(), max_entries=10)
    with pytest.raises(ConfigurationError):
        ReplayGuard(max_entries=0)
    default = ReplayGuard().store
    assert isinstance(default, MemoryReplayStore)
    assert default.max_entries == DEFAULT_MAX_ENTRIES
    with pytest.raises(TypeError):
        len(ReplayGuard(store=RecordingStore()))


# ---------------------------------------------------------------- the in-process store


def test_store_expires_on_the_monotonic_clock() -> None:
    clock = SteppingClock(wall=T0)
    store = MemoryReplayStore(clock=clock)
    assert store.remember("k", T0 + 10)
    # A wall clock step forward does not drop the key early...
    clock.wall += 3600
    assert not store.remember("k", T0 + 10)
    clock.wall -= 3600
    assert not store.remember("k", T0 + 10)
    # ...it goes once its 10 s have passed on the monotonic clock.
    clock.mono += 9.9
    assert not store.remember("k", T0 + 10)
    clock.mono += 0.1
    assert store.remember("k", T0 + 20)
    assert len(store) == 1


def test_full_store_evicts_the_first_to_expire_and_refuses_what_it_forgot() -> None:
    clock = FakeClock(T0)
    store = MemoryReplayStore(max_entries=2, clock=clock)
    assert store.remember("a", T0 + 30)
    assert store.remember("b", T0 + 10)
    # Full: a key due before everything held is refused, nothing evicted.
    assert not store.remember("c", T0 + 5)
    assert len(store) == 2
    # A later key evicts "b" (due first) and raises the floor to T0 + 10.
    assert store.remember("d", T0 + 40)
    assert not store.remember("b", T0 + 10)  # forgotten, but still refused
    assert not store.remember("e", T0 + 10)  # at the floor: cannot vouch
    assert not store.remember("a", T0 + 30)  # still remembered
    assert len(store) == 2


def test_store_warns_when_evicting_live_keys(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(T0)
    store = MemoryReplayStore(max_entries=1, clock=clock)
    with caplog.at_level("WARNING", logger="ambient_grpc_auth.controlplane.replay"):
        for i in range(5):
            assert store.remember(f"k{i}", T0 + 10 + i)
    assert caplog.text.count("replay store full") == 1
    assert "k0" not in caplog.text


def test_store_configuration() -> None:
    with pytest.raises(ConfigurationError):
        MemoryReplayStore(max_entries=0)
