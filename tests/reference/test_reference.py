"""Reference SessionService: the SQLite store, and the sync and grpc.aio servers
driven through the generated stubs over real loopback sockets."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.reference import (
    AsyncPrincipalInterceptor,
    PrincipalInterceptor,
    as_service,
    as_user,
    extra_threads,
)
from support.waiting import async_wait_until, wait_until

from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.principal import CallerKind, Principal
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2 as pb
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2_grpc as pb_grpc
from ambient_grpc_auth.reference.aio.servicer import serve as aio_serve
from ambient_grpc_auth.reference.hub import Hub
from ambient_grpc_auth.reference.servicer import serve
from ambient_grpc_auth.reference.store import (
    MAX_EVENT_TYPE_CHARS,
    MAX_ID_CHARS,
    PAGE_SIZE,
    SessionStore,
    SessionStoreError,
    check_push_allowed,
    status_of,
    validate_watch,
)
from ambient_grpc_auth.testing import FakeClock

Code = grpc.StatusCode
MiB = 1 << 20


# --- the store alone -------------------------------------------------------------


@pytest.fixture
def store() -> Iterator[SessionStore]:
    s = SessionStore()
    yield s
    s.close()


def _code(exc_info: pytest.ExceptionInfo[SessionStoreError]) -> Code:
    return exc_info.value.code


def test_store_session_round_trip_and_metadata() -> None:
    clock = FakeClock(start=1_800_000_000.25)
    with SessionStore(clock=clock) as s:
        created = s.create_session("demo", project_id="proj-1", created_by="alice")
        sid = created.metadata.id
        assert len(sid) == 32
        assert created.metadata.kind == "Session"
        assert created.metadata.href == f"/api/ambient/v1/sessions/{sid}"
        assert created.metadata.created_at.ToMicroseconds() == 1_800_000_000_250_000
        assert created.metadata.updated_at == created.metadata.created_at
        assert s.get_session(sid) == created
        assert (created.name, created.project_id, created.created_by_user_id) == (
            "demo",
            "proj-1",
            "alice",
        )
        bare = s.create_session("")
        assert not bare.HasField("project_id")
        assert not bare.HasField("created_by_user_id")
        assert s.owner_of(sid) == "alice"
        assert s.owner_of(bare.metadata.id) is None
        assert s.owner_of("nope") is None
        assert s.owner_of("") is None
        assert s.owner_of("x" * (MAX_ID_CHARS + 1)) is None
        assert s.owner_of("\ud800") is None
        assert not s.session_exists("\ud800")
        assert s.read_messages(sid, 1 << 70).messages == ()
        assert s.session_exists(sid)
        assert s.session_exists(bare.metadata.id)
        assert not s.session_exists("nope")
        s.require_session(sid)
        for bad, code in (("nope", Code.NOT_FOUND), ("", Code.INVALID_ARGUMENT)):
            with pytest.raises(SessionStoreError) as exc_info:
                s.require_session(bad)
            assert _code(exc_info) is code
        clock.advance(2)
        message = s.append(sid, "assistant", "hi")
        assert (message.seq, message.session_id, message.event_type, message.payload) == (
            1,
            sid,
            "assistant",
            "hi",
        )
        assert message.created_at.ToMicroseconds() == 1_800_000_002_250_000
        assert len(message.id) == 32
        assert s.append(sid, "assistant", "").seq == 2
        assert s.append(bare.metadata.id, "user", "x").seq == 1


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda s, sid: s.get_session(""), Code.INVALID_ARGUMENT),
        (lambda s, sid: s.get_session("x" * (MAX_ID_CHARS + 1)), Code.INVALID_ARGUMENT),
        (lambda s, sid: s.get_session("unknown"), Code.NOT_FOUND),
        (lambda s, sid: s.append("", "t", "p"), Code.INVALID_ARGUMENT),
        (lambda s, sid: s.append("unknown", "t", "p"), Code.NOT_FOUND),
        (lambda s, sid: s.append(sid, "", "p"), Code.INVALID_ARGUMENT),
        (
            lambda s, sid: s.append(sid, "t" * (MAX_EVENT_TYPE_CHARS + 1), "p"),
            Code.INVALID_ARGUMENT,
        ),
        (lambda s, sid: s.append(sid, "t", "x" * 101), Code.INVALID_ARGUMENT),
        (lambda s, sid: s.append(sid, "t", "é" * 51), Code.INVALID_ARGUMENT),
        (lambda s, sid: s.append(sid, "t", "\ud800"), Code.INVALID_ARGUMENT),
        (lambda s, sid: s.create_session("n" * 5000), Code.INVALID_ARGUMENT),
        (lambda s, sid: s.create_session("n", project_id="p" * 300), Code.INVALID_ARGUMENT),
        (lambda s, sid: validate_watch("", 0), Code.INVALID_ARGUMENT),
        (lambda s, sid: validate_watch(sid, -1), Code.INVALID_ARGUMENT),
    ],
)
def test_store_refusals(call: Any, code: Code) -> None:
    with SessionStore(max_payload_bytes=100) as s:
        sid = s.create_session("n").metadata.id
        with pytest.raises(SessionStoreError) as exc_info:
            call(s, sid)
        assert _code(exc_info) is code
        # Nothing half-written: the next push still gets seq 1.
        assert s.append(sid, "t", "p").seq == 1


def test_payload_limit_counts_utf8_bytes() -> None:
    with SessionStore(max_payload_bytes=100) as s:
        sid = s.create_session("n").metadata.id
        assert s.append(sid, "t", "é" * 50).seq == 1  # exactly 100 bytes
        assert s.append(sid, "t", "x" * 100).seq == 2
        assert s.append(sid, "t" * MAX_EVENT_TYPE_CHARS, "").seq == 3


def test_storage_failures_are_unavailable_and_roll_back(tmp_path: Any, caplog: Any) -> None:
    path = tmp_path / "s.db"
    with SessionStore(path) as s:
        sid = s.create_session("n").metadata.id
        assert s.append(sid, "t", "a").seq == 1
        with sqlite3.connect(path) as other:
            other.execute("ALTER TABLE messages RENAME TO gone")
        with pytest.raises(SessionStoreError) as exc_info:
            s.append(sid, "t", "secret-payload")
        assert status_of(exc_info.value) == (Code.UNAVAILABLE, "session storage unavailable")
        assert "secret-payload" not in caplog.text
        with sqlite3.connect(path) as other:
            other.execute("ALTER TABLE gone RENAME TO messages")
        # The failed push did not consume a seq.
        assert s.append(sid, "t", "b").seq == 2


def test_bad_configuration(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError):
        SessionStore(tmp_path)  # a directory
    with pytest.raises(ConfigurationError):
        SessionStore(max_payload_bytes=-1)


def test_push_permission_rule_and_status_mapping() -> None:
    service = Principal("runner", CallerKind.SERVICE)
    user = Principal("alice", CallerKind.USER)
    for event_type in ("user", "User", " user "):
        with pytest.raises(SessionStoreError) as exc_info:
            check_push_allowed(service, event_type)
        assert status_of(exc_info.value) == (
            Code.PERMISSION_DENIED,
            "service callers may not push user messages",
        )
    check_push_allowed(service, "assistant")
    check_push_allowed(user, "user")
    check_push_allowed(None, "user")


def test_read_messages_pages_are_bounded(store: SessionStore) -> None:
    sid = store.create_session("n").metadata.id
    for i in range(PAGE_SIZE + 3):
        store.append(sid, "t", str(i))
    first = store.read_messages(sid, 0)
    assert [m.seq for m in first.messages] == list(range(1, PAGE_SIZE + 1))
    assert first.more
    rest = store.read_messages(sid, PAGE_SIZE)
    assert [m.seq for m in rest.messages] == [PAGE_SIZE + 1, PAGE_SIZE + 2, PAGE_SIZE + 3]
    assert not rest.more
    by_bytes = store.read_messages(sid, 0, max_bytes=5)
    assert [m.seq for m in by_bytes.messages] == [1, 2, 3, 4, 5]
    assert by_bytes.more
    assert store.read_messages("unknown", 0).messages == ()


def test_subscription_signals_and_close(store: SessionStore) -> None:
    sid = store.create_session("n").metadata.id
    sub = store.subscribe(sid)
    other = store.subscribe(sid)
    assert store.subscriber_count(sid) == 2
    assert store.subscriber_count() == 2
    assert sub.wait(0, timeout=0.01) is False
    store.append(sid, "t", "p")
    assert sub.wait(0, timeout=0) is True
    assert sub.wait(1, timeout=0.01) is False
    sub.close()
    sub.close()  # idempotent
    assert not sub.active
    assert not sub.hub_closed
    assert sub.wait(1, timeout=None) is True
    assert store.subscriber_count(sid) == 1
    store.close()
    assert not other.active
    assert other.hub_closed
    assert store.subscriber_count() == 0
    with pytest.raises(SessionStoreError) as exc_info:
        store.subscribe(sid)
    assert _code(exc_info) is Code.UNAVAILABLE
    with pytest.raises(SessionStoreError) as exc_info:
        store.append(sid, "t", "p")
    assert _code(exc_info) is Code.UNAVAILABLE


async def test_async_subscription_woken_from_another_thread(store: SessionStore) -> None:
    sid = store.create_session("n").metadata.id
    sub = store.subscribe(sid)
    waiter = asyncio.create_task(sub.wait_async(0))
    await asyncio.sleep(0)
    assert not waiter.done()
    await asyncio.to_thread(store.append, sid, "t", "p")
    await asyncio.wait_for(waiter, 5)
    # Cancelling a waiter disarms it; closing wakes a pending one.
    cancelled = asyncio.create_task(sub.wait_async(1))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    pending = asyncio.create_task(sub.wait_async(1))
    await asyncio.sleep(0)
    await asyncio.to_thread(store.close)
    await asyncio.wait_for(pending, 5)
    assert sub.hub_closed


@settings(max_examples=40, deadline=None)
@given(
    # Control and format characters are refused in event types.
    event_type=st.text(
        st.characters(blacklist_categories=("Cc", "Cf", "Cs")), min_size=1, max_size=20
    ),
    payload=st.text(max_size=200),
)
def test_text_round_trips_unchanged(event_type: str, payload: str) -> None:
    with SessionStore() as s:
        sid = s.create_session(payload[:50]).metadata.id
        pushed = s.append(sid, event_type, payload)
        (read,) = s.read_messages(sid, 0).messages
        assert read == pushed
        assert (read.event_type, read.payload) == (event_type, payload)
        assert s.get_session(sid).name == payload[:50]


# --- one façade over sync and aio clients ---------------------------------------------


@dataclass
class Api:
    """Calls a sync server through sync stubs (in a worker thread) or an aio
    server through aio stubs, behind the same awaitable methods."""

    kind: str
    store: SessionStore
    stub: Any

    async def call(self, method: str, request: Any, metadata: Any = ()) -> Any:
        fn = getattr(self.stub, method)
        if self.kind == "sync":
            return await asyncio.to_thread(fn, request, metadata=metadata, timeout=10)
        return await fn(request, metadata=metadata, timeout=10)

    async def code_of(self, method: str, request: Any, metadata: Any = ()) -> Code:
        if method == "WatchSessionMessages":
            with pytest.raises(grpc.RpcError) as exc_info:
                await self.watch(request, 1)
        else:
            with pytest.raises(grpc.RpcError) as exc_info:
                await self.call(method, request, metadata)
        code: Code = exc_info.value.code()
        return code

    async def watch(self, request: pb.WatchSessionMessagesRequest, count: int) -> list[int]:
        """Read ``count`` messages, then cancel; returns their seqs."""
        if self.kind == "sync":
            return await asyncio.to_thread(self._watch_sync, request, count)
        call = self.stub.WatchSessionMessages(request, timeout=10)
        seqs: list[int] = []
        try:
            async for message in call:
                seqs.append(message.seq)
                if len(seqs) == count:
                    break
        finally:
            call.cancel()
        return seqs

    def _watch_sync(self, request: pb.WatchSessionMessagesRequest, count: int) -> list[int]:
        call = self.stub.WatchSessionMessages(request, timeout=10)
        seqs: list[int] = []
        try:
            for message in call:
                seqs.append(message.seq)
                if len(seqs) == count:
                    break
        finally:
            call.cancel()
        return seqs


@pytest.fixture(params=["sync", "aio"])
async def api(request: pytest.FixtureRequest) -> AsyncIterator[Api]:
    store = SessionStore()
    if request.param == "sync":
        server, port = serve(store, interceptors=[PrincipalInterceptor()])
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield Api("sync", store, pb_grpc.SessionServiceStub(channel))
        channel.close()
        server.stop(None).wait(5)
    else:
        aserver, port = await aio_serve(store, interceptors=[AsyncPrincipalInterceptor()])
        achannel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        yield Api("aio", store, pb_grpc.SessionServiceStub(achannel))
        await achannel.close()
        await aserver.stop(None)
    store.close()


async def test_create_get_round_trip(api: Api) -> None:
    created = await api.call(
        "CreateSession", pb.CreateSessionRequest(name="demo", project_id="p1"), as_user("alice")
    )
    sid = created.metadata.id
    assert created.created_by_user_id == "alice"
    assert created.project_id == "p1"
    assert created.metadata.href == f"/api/ambient/v1/sessions/{sid}"
    got = await api.call("GetSession", pb.GetSessionRequest(id=sid))
    assert got == created
    assert api.store.owner_of(sid) == "alice"
    anonymous = await api.call("CreateSession", pb.CreateSessionRequest(name="anon"))
    assert not anonymous.HasField("created_by_user_id")
    assert not anonymous.HasField("project_id")
    assert await api.code_of("GetSession", pb.GetSessionRequest(id="unknown")) is Code.NOT_FOUND
    assert await api.code_of("GetSession", pb.GetSessionRequest(id="")) is Code.INVALID_ARGUMENT


async def test_push_then_watch_replays_and_streams(api: Api) -> None:
    sid = api.store.create_session("n").metadata.id
    for i in range(3):
        pushed = await api.call(
            "PushSessionMessage",
            pb.PushSessionMessageRequest(session_id=sid, event_type="t", payload=str(i)),
        )
        assert pushed.seq == i + 1
        assert pushed.payload == str(i)
    assert await api.watch(pb.WatchSessionMessagesRequest(session_id=sid), 3) == [1, 2, 3]
    live = asyncio.create_task(
        api.watch(pb.WatchSessionMessagesRequest(session_id=sid, after_seq=2), 3)
    )
    assert await async_wait_until(lambda: api.store.subscriber_count(sid) == 1)
    await asyncio.to_thread(api.store.append, sid, "t", "x")
    await asyncio.to_thread(api.store.append, sid, "t", "y")
    assert await asyncio.wait_for(live, 10) == [3, 4, 5]
    assert await async_wait_until(lambda: api.store.subscriber_count(sid) == 0)


async def test_bad_input_statuses(api: Api) -> None:
    sid = api.store.create_session("n").metadata.id

    def push(session_id: str = sid, event_type: str = "t", payload: str = "") -> Any:
        return pb.PushSessionMessageRequest(
            session_id=session_id, event_type=event_type, payload=payload
        )

    cases = [
        ("PushSessionMessage", push(session_id=""), Code.INVALID_ARGUMENT),
        ("PushSessionMessage", push(event_type=""), Code.INVALID_ARGUMENT),
        ("PushSessionMessage", push(session_id="unknown"), Code.NOT_FOUND),
        ("PushSessionMessage", push(session_id="s" * 300), Code.INVALID_ARGUMENT),
        ("PushSessionMessage", push(event_type="e" * 257), Code.INVALID_ARGUMENT),
        ("PushSessionMessage", push(payload="x" * (MiB + 1)), Code.INVALID_ARGUMENT),
        ("PushSessionMessage", push(payload="é" * (MiB // 2) + "x"), Code.INVALID_ARGUMENT),
        (
            "WatchSessionMessages",
            pb.WatchSessionMessagesRequest(session_id=""),
            Code.INVALID_ARGUMENT,
        ),
        (
            "WatchSessionMessages",
            pb.WatchSessionMessagesRequest(session_id=sid, after_seq=-1),
            Code.INVALID_ARGUMENT,
        ),
        (
            "WatchSessionMessages",
            pb.WatchSessionMessagesRequest(session_id="unknown"),
            Code.NOT_FOUND,
        ),
    ]
    for method, request, code in cases:
        assert await api.code_of(method, request) is code, (method, code)
    # The limits are inclusive and no refused push consumed a seq.
    ok = await api.call("PushSessionMessage", push(payload="é" * (MiB // 2)))
    assert ok.seq == 1
    assert api.store.subscriber_count() == 0


async def test_service_caller_may_not_push_user_messages(api: Api) -> None:
    sid = api.store.create_session("n", created_by="alice").metadata.id
    user_msg = pb.PushSessionMessageRequest(session_id=sid, event_type="user", payload="hi")
    code = await api.code_of("PushSessionMessage", user_msg, as_service("runner"))
    assert code is Code.PERMISSION_DENIED
    other = pb.PushSessionMessageRequest(session_id=sid, event_type="assistant", payload="ok")
    assert (await api.call("PushSessionMessage", other, as_service("runner"))).seq == 1
    assert (await api.call("PushSessionMessage", user_msg, as_user("alice"))).seq == 2


# --- concurrency -------------------------------------------------------------------

PUSHERS = 8
PER_PUSHER = 1000
TOTAL = PUSHERS * PER_PUSHER
#: Four watchers start before any push; four start once MIDWAY seqs exist.
EARLY_AFTER = (0, 0, 0, 0)
LATE_AFTER = (1000, 1999, 3000, TOTAL - 1)
MIDWAY = 2000


def _check_concurrent_run(
    pushed: list[list[int]], watched: dict[int, list[int]], replay: list[pb.SessionMessage]
) -> None:
    assert sorted(seq for seqs in pushed for seq in seqs) == list(range(1, TOTAL + 1))
    for seqs in pushed:
        assert seqs == sorted(seqs)
    for after, seqs in watched.items():
        assert seqs == list(range(after + 1, TOTAL + 1)), after
    assert [m.seq for m in replay] == list(range(1, TOTAL + 1))
    for pusher in range(PUSHERS):  # each pusher's messages are stored in its own order
        mine = [m.payload for m in replay if m.payload.startswith(f"{pusher}:")]
        assert mine == [f"{pusher}:{i}" for i in range(PER_PUSHER)]


def _all_messages(store: SessionStore, sid: str) -> list[pb.SessionMessage]:
    out: list[pb.SessionMessage] = []
    while page := store.read_messages(sid, out[-1].seq if out else 0).messages:
        out.extend(page)
    return out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_concurrent_pushers_and_watchers_sync(capsys: pytest.CaptureFixture[str]) -> None:
    store = SessionStore()
    server, port = serve(store, max_workers=PUSHERS + 12)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.SessionServiceStub(channel)
    sid = store.create_session("load").metadata.id
    watched: dict[int, list[int]] = {}
    pushed: list[list[int]] = [[] for _ in range(PUSHERS)]
    failures: list[BaseException] = []

    def watcher(slot: int, after: int) -> None:
        seqs: list[int] = []
        call = stub.WatchSessionMessages(
            pb.WatchSessionMessagesRequest(session_id=sid, after_seq=after), timeout=60
        )
        try:
            for message in call:
                seqs.append(message.seq)
                if message.seq >= TOTAL:
                    break
        except BaseException as exc:
            failures.append(exc)
        finally:
            call.cancel()
        watched[slot] = seqs

    def pusher(n: int) -> None:
        try:
            for i in range(PER_PUSHER):
                request = pb.PushSessionMessageRequest(
                    session_id=sid, event_type="t", payload=f"{n}:{i}"
                )
                pushed[n].append(stub.PushSessionMessage(request, timeout=30).seq)
        except BaseException as exc:
            failures.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=watcher, args=(i, a)) for i, a in enumerate(EARLY_AFTER)]
    for t in threads:
        t.start()
    assert wait_until(lambda: store.subscriber_count(sid) == len(EARLY_AFTER))
    pushers = [threading.Thread(target=pusher, args=(n,)) for n in range(PUSHERS)]
    for t in pushers:
        t.start()
    assert wait_until(lambda: sum(map(len, pushed)) >= MIDWAY, 30)
    late = [
        threading.Thread(target=watcher, args=(len(EARLY_AFTER) + i, a))
        for i, a in enumerate(LATE_AFTER)
    ]
    for t in late:
        t.start()
    for t in [*pushers, *threads, *late]:
        t.join(60)
    elapsed = time.perf_counter() - started
    try:
        assert not failures, failures
        assert not any(t.is_alive() for t in [*pushers, *threads, *late])
        slots = {i: a for i, a in enumerate((*EARLY_AFTER, *LATE_AFTER))}
        _check_concurrent_run(
            pushed,
            {slots[i]: s for i, s in watched.items() if i >= 4} | {0: watched[0]},
            _all_messages(store, sid),
        )
        for i in range(len(EARLY_AFTER)):
            assert watched[i] == list(range(1, TOTAL + 1))
        assert wait_until(lambda: store.subscriber_count() == 0)
    finally:
        channel.close()
        server.stop(None).wait(5)
        store.close()
    with capsys.disabled():
        print(f"\n[sync] {TOTAL} pushes, 8 watchers: {elapsed:.2f}s")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_concurrent_pushers_and_watchers_aio(capsys: pytest.CaptureFixture[str]) -> None:
    store = SessionStore()
    server, port = await aio_serve(store)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.SessionServiceStub(channel)
    sid = store.create_session("load").metadata.id
    pushed: list[list[int]] = [[] for _ in range(PUSHERS)]

    async def watcher(after: int) -> list[int]:
        seqs: list[int] = []
        call = stub.WatchSessionMessages(
            pb.WatchSessionMessagesRequest(session_id=sid, after_seq=after), timeout=60
        )
        try:
            async for message in call:
                seqs.append(message.seq)
                if message.seq >= TOTAL:
                    break
        finally:
            call.cancel()
        return seqs

    async def pusher(n: int) -> None:
        for i in range(PER_PUSHER):
            request = pb.PushSessionMessageRequest(
                session_id=sid, event_type="t", payload=f"{n}:{i}"
            )
            pushed[n].append((await stub.PushSessionMessage(request, timeout=30)).seq)

    started = time.perf_counter()
    try:
        early = [asyncio.create_task(watcher(a)) for a in EARLY_AFTER]
        assert await async_wait_until(lambda: store.subscriber_count(sid) == len(EARLY_AFTER))
        pushers = [asyncio.create_task(pusher(n)) for n in range(PUSHERS)]
        assert await async_wait_until(lambda: sum(map(len, pushed)) >= MIDWAY, 30)
        late = [asyncio.create_task(watcher(a)) for a in LATE_AFTER]
        async with asyncio.timeout(60):
            await asyncio.gather(*pushers)
            early_seqs = await asyncio.gather(*early)
            late_seqs = await asyncio.gather(*late)
        elapsed = time.perf_counter() - started
        for seqs in early_seqs:
            assert seqs == list(range(1, TOTAL + 1))
        _check_concurrent_run(
            pushed, dict(zip(LATE_AFTER, late_seqs, strict=True)), _all_messages(store, sid)
        )
        assert await async_wait_until(lambda: store.subscriber_count() == 0)
    finally:
        await channel.close()
        await server.stop(None)
        store.close()
    with capsys.disabled():
        print(f"\n[aio] {TOTAL} pushes, 8 watchers: {elapsed:.2f}s")


def test_recent_tail_serves_contiguous_committed_messages(store: SessionStore) -> None:
    sid = store.create_session("n").metadata.id
    store.append(sid, "t", "before")  # committed before anyone watched: not in the tail
    sub = store.subscribe(sid)
    for i in range(3):
        store.append(sid, "t", str(i))
    assert sub.recent(0) == ()
    assert [m.seq for m in sub.recent(1)] == [2, 3, 4]
    assert [m.seq for m in sub.recent(2, limit=1)] == [3]
    assert sub.recent(4) == ()
    # Bounded: old entries fall out and are then read from the database.
    with SessionStore() as small:
        sid2 = small.create_session("n").metadata.id
        sub2 = small.subscribe(sid2)
        for _ in range(1100):
            small.append(sid2, "t", "")
        assert sub2.recent(0) == ()
        assert sub2.recent(75) == ()
        assert [m.seq for m in sub2.recent(76, limit=2000)] == list(range(77, 1101))
    # A message too large for the tail is announced but served from the database.
    with SessionStore(max_payload_bytes=3 << 20) as large:
        sid3 = large.create_session("n").metadata.id
        sub3 = large.subscribe(sid3)
        large.append(sid3, "t", "x" * (3 << 20))
        assert sub3.recent(0) == ()
        assert sub3.wait(0, timeout=0)
        (read,) = large.read_messages(sid3, 0).messages
        assert len(read.payload) == 3 << 20


# --- the notification hub alone ----------------------------------------------------


def test_hub_tail_orders_out_of_order_announcements() -> None:
    """Writers announce after their own commit, so seqs may arrive out of
    order; the tail serves only a contiguous run starting at the next seq."""
    hub = Hub()
    sub = hub.subscribe("s")
    assert sub is not None
    msg = {seq: pb.SessionMessage(session_id="s", seq=seq) for seq in (1, 2, 3)}
    hub.publish("s", msg[2], 0)
    assert sub.recent(0) == ()
    assert sub.wait(1, timeout=0)  # seq 2 was announced
    hub.publish("s", msg[1], 0)
    hub.publish("s", msg[3], 0)
    assert [m.seq for m in sub.recent(0)] == [1, 2, 3]
    assert [m.seq for m in sub.recent(0, limit=2)] == [1, 2]
    assert not sub.wait(3, timeout=0)


def test_hub_publishes_only_to_watched_sessions_and_forgets_unwatched_ones() -> None:
    hub = Hub()
    hub.publish("s", pb.SessionMessage(session_id="s", seq=1), 0)  # nobody watches: dropped
    sub = hub.subscribe("s")
    assert sub is not None
    assert sub.recent(0) == ()
    assert hub.count("s") == 1
    sub.close()
    sub.close()
    assert (hub.count("s"), hub.count()) == (0, 0)
    assert not sub.active
    assert not sub.hub_closed
    # A new subscription starts a new topic with an empty tail.
    hub.publish("s", pb.SessionMessage(session_id="s", seq=2), 0)
    again = hub.subscribe("s")
    assert again is not None
    assert again.recent(1) == ()


async def test_hub_wakes_aio_waiters_from_another_thread_and_on_close() -> None:
    hub = Hub()
    first, second = hub.subscribe("s"), hub.subscribe("s")
    assert first is not None
    assert second is not None
    waiting = asyncio.gather(first.wait_async(0), second.wait_async(0))
    await asyncio.sleep(0)
    assert not waiting.done()
    publisher = threading.Thread(
        target=hub.publish, args=("s", pb.SessionMessage(session_id="s", seq=1), 0)
    )
    publisher.start()
    await asyncio.wait_for(waiting, 5)
    publisher.join()
    # Closing the hub ends every subscription, wakes waiters, refuses new ones.
    waiter = asyncio.ensure_future(first.wait_async(1))
    await asyncio.sleep(0)
    hub.close()
    await asyncio.wait_for(waiter, 5)
    assert first.hub_closed
    assert not first.active
    assert hub.subscribe("s") is None


# --- durability --------------------------------------------------------------------


def _push(stub: Any, sid: str, payload: str) -> pb.PushSessionMessageRequest:
    return pb.PushSessionMessageRequest(session_id=sid, event_type="t", payload=payload)


def test_seqs_survive_restart_sync(tmp_path: Any) -> None:
    path = tmp_path / "sessions.db"
    seqs: list[int] = []
    sid = ""
    for run in range(2):
        store = SessionStore(path)
        server, port = serve(store)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.SessionServiceStub(channel)
        try:
            if run == 0:
                sid = stub.CreateSession(pb.CreateSessionRequest(name="durable")).metadata.id
            assert stub.GetSession(pb.GetSessionRequest(id=sid)).name == "durable"
            for i in range(5):
                seqs.append(stub.PushSessionMessage(_push(stub, sid, f"{run}:{i}"), timeout=10).seq)
            if run == 1:
                call = stub.WatchSessionMessages(
                    pb.WatchSessionMessagesRequest(session_id=sid), timeout=10
                )
                replay = [next(call) for _ in range(10)]
                call.cancel()
                assert [m.seq for m in replay] == list(range(1, 11))
                assert [m.payload for m in replay] == [
                    f"{r}:{i}" for r in range(2) for i in range(5)
                ]
        finally:
            channel.close()
            server.stop(None).wait(5)
            store.close()
        with sqlite3.connect(path) as check:
            assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert seqs == list(range(1, 11))


async def test_seqs_survive_restart_aio(tmp_path: Any) -> None:
    path = tmp_path / "sessions.db"
    seqs: list[int] = []
    sid = ""
    for run in range(2):
        store = SessionStore(path)
        server, port = await aio_serve(store)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.SessionServiceStub(channel)
        try:
            if run == 0:
                sid = (
                    await stub.CreateSession(pb.CreateSessionRequest(name="durable"))
                ).metadata.id
            for i in range(5):
                seqs.append((await stub.PushSessionMessage(_push(stub, sid, f"{run}:{i}"))).seq)
            if run == 1:
                call = stub.WatchSessionMessages(
                    pb.WatchSessionMessagesRequest(session_id=sid), timeout=10
                )
                replay = [await call.read() for _ in range(10)]
                call.cancel()
                assert [m.seq for m in replay] == list(range(1, 11))
                assert [m.payload for m in replay] == [
                    f"{r}:{i}" for r in range(2) for i in range(5)
                ]
        finally:
            await channel.close()
            await server.stop(None)
            store.close()
    assert seqs == list(range(1, 11))


# --- cancellation and shutdown ------------------------------------------------------


def _filled_store(count: int) -> tuple[SessionStore, str]:
    store = SessionStore()
    sid = store.create_session("n").metadata.id
    for i in range(count):
        store.append(sid, "t", f"{i:0100d}")
    return store, sid


def test_cancelled_watch_mid_replay_frees_everything_sync() -> None:
    store, sid = _filled_store(3 * PAGE_SIZE)
    baseline = set(threading.enumerate())
    pool = futures.ThreadPoolExecutor(max_workers=4)
    server, port = serve(store, thread_pool=pool)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.SessionServiceStub(channel)
    try:
        call = stub.WatchSessionMessages(pb.WatchSessionMessagesRequest(session_id=sid), timeout=30)
        assert [next(call).seq for _ in range(10)] == list(range(1, 11))
        assert store.subscriber_count(sid) == 1
        call.cancel()
        assert wait_until(lambda: store.subscriber_count() == 0)
        # The freed worker serves the next watch.
        again = stub.WatchSessionMessages(
            pb.WatchSessionMessagesRequest(session_id=sid, after_seq=3 * PAGE_SIZE - 1), timeout=30
        )
        assert next(again).seq == 3 * PAGE_SIZE
        again.cancel()
        assert wait_until(lambda: store.subscriber_count() == 0)
    finally:
        channel.close()
        server.stop(None).wait(5)
        pool.shutdown(wait=False)
        store.close()
    # A worker stuck in the watch would never exit.
    assert wait_until(lambda: not extra_threads(baseline)), extra_threads(baseline)


async def test_cancelled_watch_mid_replay_frees_everything_aio() -> None:
    store, sid = _filled_store(3 * PAGE_SIZE)
    server, port = await aio_serve(store)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.SessionServiceStub(channel)
    # grpc.aio's own poller thread exists by now; worker threads do not yet.
    baseline = set(threading.enumerate())
    tasks_before = len(asyncio.all_tasks())
    try:
        call = stub.WatchSessionMessages(pb.WatchSessionMessagesRequest(session_id=sid), timeout=30)
        assert [(await call.read()).seq for _ in range(10)] == list(range(1, 11))
        assert store.subscriber_count(sid) == 1
        call.cancel()
        assert await async_wait_until(lambda: store.subscriber_count() == 0)
        assert await async_wait_until(lambda: len(asyncio.all_tasks()) <= tasks_before)
        # Every database call ran in the default executor; none may be left blocked.
        await asyncio.wait_for(asyncio.get_running_loop().shutdown_default_executor(), 5)
        assert await async_wait_until(lambda: not extra_threads(baseline)), extra_threads(baseline)
    finally:
        await channel.close()
        await server.stop(None)
        store.close()


@pytest.mark.parametrize("how", ["server_stop", "store_close"])
def test_live_watchers_end_promptly_on_shutdown_sync(how: str) -> None:
    store = SessionStore()
    sid = store.create_session("n").metadata.id
    store.append(sid, "t", "first")
    baseline = set(threading.enumerate())
    pool = futures.ThreadPoolExecutor(max_workers=8)
    server, port = serve(store, thread_pool=pool)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.SessionServiceStub(channel)
    received: list[int] = []
    outcomes: list[tuple[Code, str]] = []

    def watcher() -> None:
        call = stub.WatchSessionMessages(pb.WatchSessionMessagesRequest(session_id=sid), timeout=30)
        try:
            for message in call:
                received.append(message.seq)
            outcomes.append((Code.OK, ""))
        except grpc.RpcError as exc:
            outcomes.append((exc.code(), exc.details() or ""))

    threads = [threading.Thread(target=watcher) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: len(received) == 3 and store.subscriber_count(sid) == 3)
        started = time.monotonic()
        if how == "server_stop":
            server.stop(0)
        else:
            store.close()
        for t in threads:
            t.join(5)
        assert not any(t.is_alive() for t in threads)
        assert wait_until(lambda: store.subscriber_count() == 0)
        assert time.monotonic() - started < 5
        if how == "store_close":
            assert outcomes == [(Code.UNAVAILABLE, "session store is closed")] * 3
        else:
            assert {code for code, _ in outcomes} <= {Code.CANCELLED, Code.UNAVAILABLE}
            assert len(outcomes) == 3
    finally:
        channel.close()
        server.stop(None).wait(5)
        pool.shutdown(wait=False)
        store.close()
    assert wait_until(lambda: not extra_threads(baseline)), extra_threads(baseline)


@pytest.mark.parametrize("how", ["server_stop", "store_close"])
async def test_live_watchers_end_promptly_on_shutdown_aio(how: str) -> None:
    store = SessionStore()
    sid = store.create_session("n").metadata.id
    store.append(sid, "t", "first")
    server, port = await aio_serve(store)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.SessionServiceStub(channel)
    received: list[int] = []

    async def watcher() -> tuple[Code, str]:
        call = stub.WatchSessionMessages(pb.WatchSessionMessagesRequest(session_id=sid), timeout=30)
        try:
            async for message in call:
                received.append(message.seq)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return Code.OK, ""

    tasks = [asyncio.create_task(watcher()) for _ in range(3)]
    try:
        assert await async_wait_until(
            lambda: len(received) == 3 and store.subscriber_count(sid) == 3
        )
        started = time.monotonic()
        if how == "server_stop":
            await server.stop(0)
        else:
            store.close()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert await async_wait_until(lambda: store.subscriber_count() == 0)
        assert time.monotonic() - started < 5
        if how == "store_close":
            assert outcomes == [(Code.UNAVAILABLE, "session store is closed")] * 3
        else:
            assert {code for code, _ in outcomes} <= {Code.CANCELLED, Code.UNAVAILABLE}
    finally:
        for task in tasks:
            task.cancel()
        await channel.close()
        await server.stop(None)
        store.close()
