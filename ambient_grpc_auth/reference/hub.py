"""In-process commit notification for the reference store: "session S now has seq N".

A :class:`Hub` keeps one topic per watched session. Writers :meth:`~Hub.publish`
each committed message; watchers hold a :class:`Subscription` and either block
(:meth:`Subscription.wait`, sync servers) or await
(:meth:`Subscription.wait_async`, ``grpc.aio`` servers) until a seq above the
last one they sent is announced. Publishers may run on any thread: asyncio
waiters are woken with ``loop.call_soon_threadsafe``, one call per event loop
however many of its watchers are woken.

Each topic also keeps a small bounded tail of recently published messages, so
live watchers are served from memory (:meth:`Subscription.recent`) instead of
a database read per message. The hub is only a cache and a doorbell: the
store's database stays the source of truth, and a watcher falls back to it
whenever the tail does not hold the next seq.

A watcher that falls behind (its client stopped reading: its sends wait
while messages keep coming) is told so by :meth:`Subscription.behind`,
counted from the first message published after it subscribed, so that
replaying an old backlog never counts; the servicer then ends its stream and
the client resumes from its last seq, reading the backlog at its own pace.

One lock guards every topic; it is held for a few set, dict and short list
operations, never across I/O, so taking it on an event loop does not stall it.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
from contextlib import suppress
from typing import Final

from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2

__all__ = ["Hub", "Subscription"]

# Per-topic tail bounds: most messages and total payload characters kept.
_TAIL_MESSAGES: Final = 1024
_TAIL_CHARS: Final = 2 << 20

_Entry = tuple[int, int, sessions_pb2.SessionMessage]  # (seq, payload chars, message)


def _seq_of(entry: _Entry) -> int:
    return entry[0]


class _Topic:
    __slots__ = ("armed", "cond", "floorless", "published", "subscribers", "tail", "tail_chars")

    def __init__(self, lock: threading.Lock) -> None:
        self.cond = threading.Condition(lock)
        self.published = 0  # highest seq announced since the topic was created
        self.subscribers: set[Subscription] = set()
        self.armed: set[Subscription] = set()  # aio waiters currently suspended
        self.floorless: set[Subscription] = set()  # no publish seen since subscribing
        # Sorted by seq, bounded by _TAIL_MESSAGES and _TAIL_CHARS. Only kept
        # while someone watches (the topic goes with its last subscriber).
        self.tail: list[_Entry] = []
        self.tail_chars = 0

    def remember(self, message: sessions_pb2.SessionMessage, chars: int) -> None:
        if chars > _TAIL_CHARS:
            return
        tail = self.tail
        # Writers announce after their own COMMIT, so seqs may arrive slightly
        # out of order: insert in place (near the end, hence cheap).
        tail.insert(
            bisect.bisect_left(tail, message.seq, key=_seq_of), (message.seq, chars, message)
        )
        self.tail_chars += chars
        while len(tail) > _TAIL_MESSAGES or self.tail_chars > _TAIL_CHARS:
            self.tail_chars -= tail.pop(0)[1]


class Subscription:
    """A watcher's registration for "a higher seq was published" signals.

    Obtained from :meth:`Hub.subscribe` *before* the watcher's first read, so
    that nothing committed after that read goes unannounced. Typical loop:
    take :meth:`recent` messages, else read a page from the database; send
    them; then :meth:`wait` (or :meth:`wait_async`) for a seq above the last
    one sent.

    Thread-safe. :meth:`close` is idempotent (call it from RPC-termination
    callbacks too). After it, or after the hub is closed, waits return at
    once and :attr:`active` is False; :attr:`hub_closed` tells the two apart.
    """

    __slots__ = ("_active", "_floor", "_hub", "_hub_closed", "_topic", "_waker", "session_id")

    def __init__(self, hub: Hub, session_id: str, topic: _Topic) -> None:
        self._hub = hub
        self._topic = topic
        self.session_id = session_id
        self._active = True
        self._hub_closed = False
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        # The seq before the first one published after subscribing (None
        # until then): lag is counted above it.
        self._floor: int | None = None

    @property
    def active(self) -> bool:
        return self._active

    @property
    def hub_closed(self) -> bool:
        """True when the subscription ended because its hub was closed."""
        return self._hub_closed

    def wait(self, after_seq: int, timeout: float | None) -> bool:
        """Block until a seq above ``after_seq`` is announced or the
        subscription ends (True), or ``timeout`` seconds pass (False)."""
        topic = self._topic
        with topic.cond:
            return topic.cond.wait_for(
                lambda: not self._active or topic.published > after_seq, timeout
            )

    async def wait_async(self, after_seq: int) -> None:
        """``grpc.aio`` twin of :meth:`wait`, without timeout: cancel the task
        to stop waiting. Publishers on any thread wake it."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        topic = self._topic
        with topic.cond:
            if not self._active or topic.published > after_seq:
                return
            self._waker = (loop, event)
            topic.armed.add(self)
        try:
            await event.wait()
        finally:
            with topic.cond:
                self._waker = None
                topic.armed.discard(self)

    def recent(
        self, after_seq: int, limit: int | None = None
    ) -> tuple[sessions_pb2.SessionMessage, ...]:
        """Messages ``after_seq + 1, after_seq + 2, ...`` (contiguous, at most
        ``limit``, default no limit) from the tail of recently published
        messages; empty when ``after_seq + 1`` is not there (read the database
        then). The returned messages are shared: do not modify them."""
        expected = after_seq + 1
        out: list[sessions_pb2.SessionMessage] = []
        with self._topic.cond:
            tail = self._topic.tail
            start = bisect.bisect_left(tail, expected, key=_seq_of)
            stop = len(tail) if limit is None else start + limit
            for seq, _, message in tail[start:stop]:
                if seq != expected:
                    break
                out.append(message)
                expected += 1
        return tuple(out)

    def behind(self, after_seq: int, max_messages: int, max_chars: int) -> bool:
        """Whether a watcher that has sent up to ``after_seq`` is more than
        ``max_messages`` messages, or ``max_chars`` payload characters (as far
        as the tail holds them), behind what was published since it
        subscribed. Costs at most ``max_messages`` steps, under the hub's lock."""
        topic = self._topic
        with topic.cond:
            floor = self._floor
            if floor is None:
                return False
            base = max(after_seq, floor)
            missing = topic.published - base
            if missing <= 0:
                return False
            if missing > max_messages:
                return True
            chars = 0
            for seq, size, _ in reversed(topic.tail):
                if seq <= base:
                    break
                chars += size
            return chars > max_chars

    def close(self) -> None:
        """End the subscription and wake its waiter (idempotent)."""
        self._hub.end(self)


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


def _wake_all(loop: asyncio.AbstractEventLoop, events: list[asyncio.Event]) -> None:
    # One call per loop however many watchers it runs: each call costs the
    # loop a wake-up through its self-pipe.
    # RuntimeError: the watchers' loop is already closed; nothing to wake.
    with suppress(RuntimeError):
        loop.call_soon_threadsafe(_set_all, events)


class Hub:
    """Per-session topics of subscriptions (thread-safe, one short-held lock).

    Process-local: only writes published through this hub wake its watchers.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._topics: dict[str, _Topic] = {}
        self._closed = False

    def subscribe(self, session_id: str) -> Subscription | None:
        """A new subscription to ``session_id``; None once the hub is closed."""
        with self._lock:
            if self._closed:
                return None
            topic = self._topics.get(session_id)
            if topic is None:
                topic = self._topics[session_id] = _Topic(self._lock)
            sub = Subscription(self, session_id, topic)
            topic.subscribers.add(sub)
            topic.floorless.add(sub)
            return sub

    def publish(self, session_id: str, message: sessions_pb2.SessionMessage, chars: int) -> None:
        """Announce a committed ``message`` of ``chars`` payload characters.

        Call it only after the commit, so that a woken watcher's read sees the
        message. ``message`` is kept for watchers: do not modify it afterwards.
        """
        with self._lock:
            topic = self._topics.get(session_id)
            if topic is None:
                return
            if message.seq > topic.published:
                topic.published = message.seq
            if topic.floorless:
                for sub in topic.floorless:
                    sub._floor = message.seq - 1
                topic.floorless.clear()
            topic.remember(message, chars)
            topic.cond.notify_all()
            if not topic.armed:
                return
            by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
            for sub in topic.armed:
                if sub._waker is not None:
                    loop, event = sub._waker
                    sub._waker = None
                    by_loop.setdefault(loop, []).append(event)
            topic.armed.clear()
            for loop, events in by_loop.items():
                _wake_all(loop, events)

    def end(self, sub: Subscription) -> None:
        """End ``sub`` and wake its waiter (idempotent); see :meth:`Subscription.close`."""
        with self._lock:
            self._end_locked(sub, hub_closed=False)

    def _end_locked(self, sub: Subscription, *, hub_closed: bool) -> None:
        if not sub._active:
            return
        sub._active = False
        sub._hub_closed = hub_closed
        topic = sub._topic
        topic.subscribers.discard(sub)
        topic.floorless.discard(sub)
        if not topic.subscribers and self._topics.get(sub.session_id) is topic:
            del self._topics[sub.session_id]
        topic.cond.notify_all()
        waker, sub._waker = sub._waker, None
        topic.armed.discard(sub)
        if waker is not None:
            _wake_all(waker[0], [waker[1]])

    def close(self) -> None:
        """End every subscription (``hub_closed`` set) and refuse new ones. Idempotent."""
        with self._lock:
            self._closed = True
            for topic in list(self._topics.values()):
                for sub in list(topic.subscribers):
                    self._end_locked(sub, hub_closed=True)

    def count(self, session_id: str | None = None) -> int:
        """Open subscriptions on ``session_id`` (all sessions when None)."""
        with self._lock:
            if session_id is not None:
                topic = self._topics.get(session_id)
                return 0 if topic is None else len(topic.subscribers)
            return sum(len(t.subscribers) for t in self._topics.values())
