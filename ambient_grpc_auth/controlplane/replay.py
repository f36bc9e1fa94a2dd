"""Replay protection for v2 session proofs: freshness plus single use.

Two parts, so that the remembering can live elsewhere than in this process:

- :class:`ReplayGuard` is the policy. It refuses v2 proofs whose ``ts`` is
  more than a window away from now, derives one key per (session id, nonce)
  and asks a store to remember that key for as long as the proof could still
  pass the freshness check. It also decides what happens to v1 proofs.
- :class:`ReplayStore` is the memory: one atomic method, "remember this key
  until T; return False if it is already remembered".
  :class:`MemoryReplayStore` (the default) keeps keys in this process, bounded.

A control plane run as several replicas needs one store they all share,
otherwise a proof refused as a replay by one replica is accepted by another.
Such a store implements :meth:`ReplayStore.remember` with one atomic command
of its backend: :class:`RedisReplayStore` uses Redis ``SET <key> 1 NX PX <ms
until T>`` (True when the key was set). It is passed as
``TokenServerConfig.replay_store`` (or built from ``replay_redis_url``); the
token endpoint then calls the guard from a worker thread, never on its event
loop, so a blocking client is fine. A store that cannot answer raises
:class:`ReplayStoreUnavailableError` (the endpoint answers 503) or anything
else (500); either way no proof is accepted unchecked.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import threading
from collections.abc import Sized
from typing import Final, Protocol, runtime_checkable

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.errors import AmbientAuthError, ConfigurationError, ProofError
from ambient_grpc_auth.proof import DecodedProof

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # the optional "redis" extra is not installed
    redis = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_REDIS_KEY_PREFIX",
    "DEFAULT_REDIS_TIMEOUT",
    "DEFAULT_WINDOW_SECONDS",
    "MemoryReplayStore",
    "RedisReplayStore",
    "ReplayGuard",
    "ReplayStore",
    "ReplayStoreUnavailableError",
]

_log = logging.getLogger(__name__)

#: How far (seconds, either way) a v2 proof's ``ts`` may be from now.
DEFAULT_WINDOW_SECONDS: Final = 60.0
#: Capacity of the default in-process store (~200 bytes per entry).
DEFAULT_MAX_ENTRIES: Final = 100_000
# Keys are kept this long past the last instant their proof could still be
# fresh, so that the inclusive freshness bound and the expiry never meet at
# the same instant, and the moment between the freshness check and the store
# call cannot open a gap.
_RETENTION_MARGIN: Final = 1.0
# A store that evicts live keys says so at most this often (seconds).
_FULL_WARNING_INTERVAL: Final = 60.0
#: What :class:`RedisReplayStore` puts in front of its keys.
DEFAULT_REDIS_KEY_PREFIX: Final = "ambient-grpc-auth:proof:"
#: Connect and read timeout (seconds) of :class:`RedisReplayStore`.
DEFAULT_REDIS_TIMEOUT: Final = 0.5


class ReplayStoreUnavailableError(AmbientAuthError):
    """The replay store could not answer (down, unreachable, too slow). The
    proof is neither accepted nor refused; the token endpoint answers 503.
    The message names the failure's type only, never a key or proof."""


@runtime_checkable
class ReplayStore(Protocol):
    """Where accepted proof keys are remembered.

    Contract: :meth:`remember` is atomic (of any number of concurrent calls
    with one key, from any thread or replica sharing the store, at most one
    returns True before the key expires) and thread-safe. It may block on I/O:
    the token endpoint calls it on its event loop only for the default
    :class:`MemoryReplayStore`, and from a worker thread for any other store.
    It raises (anything) when it cannot answer; it must not answer True then.
    """

    def remember(self, key: str, until: float) -> bool:
        """Remember ``key`` until ``until`` (unix seconds, wall clock) and
        return True; return False when ``key`` is already remembered.

        A store may keep a key longer than asked. A bounded store may also
        return False for a key it cannot vouch for (see :class:`MemoryReplayStore`).
        ``key`` is printable text without secrets (the nonce is random and
        single-use); it may contain a NUL character as separator.
        """
        ...


class MemoryReplayStore:
    """The in-process :class:`ReplayStore` (the default), bounded by ``max_entries``.

    Keys expire on the monotonic clock after ``until - clock.time()`` seconds,
    so a wall clock that steps forward and back cannot drop them early.

    When the table is full of unexpired keys, the key due to expire first is
    evicted *safely*: the store raises a floor to its ``until`` and from then on
    returns False for every key whose ``until`` is not above the floor, so an
    evicted key can never be accepted again. The cost falls on freshness, not
    on safety: under a flood that fills the table within one window, proofs
    issued in the same second as an evicted one are refused and runners retry
    with a new proof. A key lives about one window past its proof's ``ts``, so
    the default 100 000 entries hold ~1 600 accepted proofs per second
    sustained with a 60 s window (RSA-4096 decryption manages ~100-200 per
    core per second). A warning is logged, at most once a minute, while
    live keys are being evicted.

    Thread-safe (one lock, held for O(log n) work per call).
    """

    def __init__(self, *, max_entries: int = DEFAULT_MAX_ENTRIES, clock: Clock = SYSTEM_CLOCK):
        if max_entries < 1:
            raise ConfigurationError("replay store: max_entries must be positive")
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        # (expiry on the monotonic clock, until as asked, key): the heap's top
        # is the next key to expire or to evict.
        self._heap: list[tuple[float, float, str]] = []
        self._keys: set[str] = set()
        self._floor = float("-inf")
        self._warned_at: float | None = None

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def remember(self, key: str, until: float) -> bool:
        mono = self._clock.monotonic()
        expires = mono + (until - self._clock.time())
        with self._lock:
            heap = self._heap
            while heap and heap[0][0] <= mono:
                self._keys.discard(heapq.heappop(heap)[2])
            if key in self._keys or until <= self._floor:
                return False
            if len(heap) >= self._max_entries:
                if expires <= heap[0][0]:
                    # It would be the first to go: refusing it is safe and
                    # keeps the floor where it is.
                    return False
                _, evicted_until, evicted = heapq.heappop(heap)
                self._keys.discard(evicted)
                self._floor = max(self._floor, evicted_until)
                self._warn_full(mono)
            heapq.heappush(heap, (expires, until, key))
            self._keys.add(key)
            return True

    def _warn_full(self, mono: float) -> None:
        if self._warned_at is None or mono - self._warned_at >= _FULL_WARNING_INTERVAL:
            self._warned_at = mono
            _log.warning(
                "replay store full (%d entries): evicting unexpired proofs; "
                "proofs issued as early as an evicted one are refused",
                self._max_entries,
            )


class ReplayGuard:
    """Freshness and single use for v2 proofs, over a :class:`ReplayStore`.

    A v2 proof is accepted only if ``|now - ts| <= window_seconds`` (wall
    clock) and the store had not remembered its (session id, nonce) key yet.
    The key is remembered until ``ts + window_seconds`` plus a margin: past
    that instant the proof is refused as stale anyway.

    ``store`` defaults to a :class:`MemoryReplayStore` of ``max_entries``
    (default :data:`DEFAULT_MAX_ENTRIES`); give one or the other, not both.

    v1 proofs pass unless ``require_fresh_proof`` is set (reason
    ``fresh_proof_required``). Refusals are ProofError(reason, 401): ``stale``,
    ``future``, ``replayed`` (also when a bounded store can no longer vouch
    for the key, see :class:`MemoryReplayStore`). Whatever the store raises
    propagates unchanged.

    Thread-safe when the store is. Replay protection assumes the wall clock
    does not step backwards by more than the window.
    """

    def __init__(
        self,
        *,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        require_fresh_proof: bool = False,
        clock: Clock = SYSTEM_CLOCK,
        store: ReplayStore | None = None,
        max_entries: int | None = None,
    ) -> None:
        if window_seconds <= 0:
            raise ConfigurationError("replay guard: window_seconds must be positive")
        if store is not None and max_entries is not None:
            raise ConfigurationError("replay guard: set store or max_entries, not both")
        self.window_seconds = window_seconds
        self.require_fresh_proof = require_fresh_proof
        self._clock = clock
        self._store: ReplayStore = (
            store
            if store is not None
            else MemoryReplayStore(
                max_entries=DEFAULT_MAX_ENTRIES if max_entries is None else max_entries,
                clock=clock,
            )
        )

    @property
    def store(self) -> ReplayStore:
        return self._store

    def __len__(self) -> int:
        """Keys the store remembers; TypeError for a store that cannot count them."""
        if not isinstance(self._store, Sized):
            raise TypeError(f"{type(self._store).__name__} does not count its keys")
        return len(self._store)

    def check(self, proof: DecodedProof) -> None:
        """Accept ``proof`` (remembering its nonce) or raise ProofError(reason, 401)."""
        if proof.version == 1:
            if self.require_fresh_proof:
                raise ProofError("fresh_proof_required", 401)
            return
        if proof.issued_at is None or proof.nonce is None:
            raise ProofError("malformed_v2", 401)
        ts = proof.issued_at
        now = self._clock.time()
        if ts < now - self.window_seconds:
            raise ProofError("stale", 401)
        if ts > now + self.window_seconds:
            raise ProofError("future", 401)
        # The NUL separator cannot occur in a valid session id or nonce.
        key = f"{proof.session_id}\x00{proof.nonce}"
        if not self._store.remember(key, ts + self.window_seconds + _RETENTION_MARGIN):
            raise ProofError("replayed", 401)


class RedisReplayStore:
    """A :class:`ReplayStore` in Redis, shared by every replica pointed at it.

    :meth:`remember` is one ``SET <prefix><digest> 1 NX PX <ms>`` command:
    atomic in Redis, so of any number of replicas asking for one key at once
    exactly one gets True. The key name is a digest of the (session id,
    nonce) key, so nothing of the proof is stored; Redis expires it when the
    proof could no longer pass the freshness check anyway.

    Failing closed: when Redis cannot be reached or does not answer within
    ``timeout`` seconds (connect and read, no retries), :meth:`remember`
    raises :class:`ReplayStoreUnavailableError`, so no v2 proof is accepted
    unchecked. The first failure after a success logs one warning, and the
    first success after failures logs that the store is back; the URL (it
    may hold a password) and the keys are never logged. Each call uses a
    pooled connection and reconnects as needed, so the store recovers by
    itself once Redis answers again.

    Needs the ``redis`` extra (``pip install 'ambient-grpc-auth[redis]'``);
    ConfigurationError when it is missing or ``url`` is not a Redis URL.
    Thread-safe (redis-py's connection pool); calls block, so call them off
    an event loop.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = DEFAULT_REDIS_KEY_PREFIX,
        timeout: float = DEFAULT_REDIS_TIMEOUT,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if redis is None:
            raise ConfigurationError(
                "the Redis replay store needs the redis package "
                "(pip install 'ambient-grpc-auth[redis]')"
            )
        if not 0 < timeout <= 60:
            raise ConfigurationError("Redis replay store: timeout must be in (0, 60] seconds")
        try:
            self._client = redis.Redis.from_url(
                url,
                socket_connect_timeout=timeout,
                socket_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False,
            )
        except ValueError:
            # The message could echo the URL, password included.
            raise ConfigurationError("Redis replay store: not a valid redis:// URL") from None
        self._prefix = key_prefix
        self._clock = clock
        self._lock = threading.Lock()
        self._down = False

    def remember(self, key: str, until: float) -> bool:
        ms = max(1, math.ceil((until - self._clock.time()) * 1000))
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        try:
            stored = self._client.set(self._prefix + digest, b"1", nx=True, px=ms)
        except redis.RedisError as exc:
            self._note(up=False, failure=type(exc).__name__)
            raise ReplayStoreUnavailableError(
                f"Redis replay store unavailable ({type(exc).__name__})"
            ) from None
        self._note(up=True)
        return bool(stored)

    def _note(self, *, up: bool, failure: str = "") -> None:
        with self._lock:
            if self._down != up:
                return
            self._down = not up
        if up:
            _log.warning("Redis replay store reachable again: v2 proofs are accepted")
        else:
            _log.error(
                "Redis replay store unavailable (%s): v2 proofs are refused with 503 "
                "until it answers",
                failure,
            )

    def close(self) -> None:
        """Close the pooled connections (a later call reconnects)."""
        self._client.close()

    def __repr__(self) -> str:
        return f"RedisReplayStore(key_prefix={self._prefix!r})"
