"""Slow watchers: a watch whose client stops reading is ended with ABORTED
once it falls too far behind, and the client helper resumes from its last
seq with nothing lost or repeated (sync and grpc.aio servers, real sockets)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from support.server import RunningServer, run_aio_server_in_thread
from support.waiting import wait_until

from ambient_grpc_auth.client.sessions import watch
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2 as pb
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2_grpc as pb_grpc
from ambient_grpc_auth.reference.aio.servicer import AsyncSessionServicer
from ambient_grpc_auth.reference.hub import Hub
from ambient_grpc_auth.reference.servicer import SessionServicer
from ambient_grpc_auth.reference.store import BEHIND_STATUS, SessionStore

#: Big enough that a few unread ones fill the client's flow-control window,
#: so the server's sends wait while the backlog grows.
PAYLOAD_CHARS = 60_000
MAX_LAG = 4
#: Without BDP probing the client's stream window stays at its initial 64 KiB,
#: so the server's sends wait as soon as a couple of messages are unread.
CLIENT_OPTIONS = [("grpc.http2.bdp_probe", 0)]


def _start(kind: str, store: SessionStore, **limits: Any) -> RunningServer:
    if kind == "sync":
        pool = futures.ThreadPoolExecutor(max_workers=4)
        server = grpc.server(pool)
        pb_grpc.add_SessionServiceServicer_to_server(SessionServicer(store, **limits), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()

        def stop() -> None:
            server.stop(None).wait(5)
            pool.shutdown(wait=False)

        return RunningServer(port, stop)

    async def start() -> tuple[grpc.aio.Server, int]:
        aio_server = grpc.aio.server()
        pb_grpc.add_SessionServiceServicer_to_server(
            AsyncSessionServicer(store, **limits), aio_server
        )
        port = aio_server.add_insecure_port("127.0.0.1:0")
        await aio_server.start()
        return aio_server, port

    return run_aio_server_in_thread(start)


@pytest.fixture
def store() -> Iterator[SessionStore]:
    s = SessionStore()
    yield s
    s.close()


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_slow_watcher_is_cut_and_the_helper_resumes_exactly_once(
    kind: str, store: SessionStore
) -> None:
    sid = store.create_session("lag").metadata.id
    store.append(sid, "t", "first")
    server = _start(kind, store, max_lag_messages=MAX_LAG, max_send_wait=0.0)
    channel = grpc.insecure_channel(server.target, options=CLIENT_OPTIONS)
    endings: list[str] = []
    try:
        with watch(channel, sid, sleep=lambda _delay: None) as messages:
            assert next(messages).seq == 1
            # The client reads nothing while far more than MAX_LAG messages
            # of PAYLOAD_CHARS arrive: the server's sends wait on flow control.
            total = 1 + 12 * MAX_LAG
            for i in range(2, total + 1):
                store.append(sid, "t", f"{i:06d}" + "x" * PAYLOAD_CHARS)
            seqs = [1]
            while seqs[-1] < total:
                seqs.append(next(messages).seq)
            endings.append(f"streams={messages.streams}")
        assert seqs == list(range(1, total + 1))  # nothing lost, nothing repeated
        assert endings == ["streams=2"]  # cut once, resumed once
    finally:
        channel.close()
        server.stop()
    wait_until(lambda: store.subscriber_count() == 0)


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_slow_watcher_sees_aborted_resume_from_after_seq(kind: str, store: SessionStore) -> None:
    """The status a cut watcher gets is one the client helpers resume on."""
    sid = store.create_session("lag").metadata.id
    store.append(sid, "t", "first")
    server = _start(kind, store, max_lag_messages=MAX_LAG, max_send_wait=0.0)
    channel = grpc.insecure_channel(server.target, options=CLIENT_OPTIONS)
    stub = pb_grpc.SessionServiceStub(channel)
    try:
        call = stub.WatchSessionMessages(pb.WatchSessionMessagesRequest(session_id=sid), timeout=30)
        assert next(call).seq == 1
        for i in range(12 * MAX_LAG):
            store.append(sid, "t", f"{i:06d}" + "x" * PAYLOAD_CHARS)
        received: list[int] = []
        with pytest.raises(grpc.RpcError) as err:
            received.extend(message.seq for message in call)
        assert (err.value.code(), err.value.details()) == BEHIND_STATUS
        # Whatever arrived before the status is contiguous: the client
        # resumes after the last one.
        assert received == list(range(2, 2 + len(received)))
    finally:
        channel.close()
        server.stop()


def test_lag_counts_only_what_was_published_after_the_watch_began() -> None:
    """Replaying an old backlog at the client's pace is never "behind"; the
    byte bound is the payload characters of the missing messages."""
    hub = Hub()
    sub = hub.subscribe("s")
    assert sub is not None
    assert not sub.behind(0, max_messages=2, max_chars=100)
    hub.publish("s", pb.SessionMessage(seq=1001), 10)  # the watcher replays seqs 1..1000
    assert not sub.behind(5, max_messages=2, max_chars=100)
    hub.publish("s", pb.SessionMessage(seq=1002), 10)
    hub.publish("s", pb.SessionMessage(seq=1003), 10)
    assert sub.behind(5, max_messages=2, max_chars=100)  # 3 live messages missing
    assert not sub.behind(1001, max_messages=2, max_chars=100)
    assert sub.behind(1001, max_messages=2, max_chars=19)  # 20 chars missing
    assert not sub.behind(1003, max_messages=0, max_chars=0)
    sub.close()
