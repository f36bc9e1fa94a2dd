"""A slow JWKS fetch stalls nobody whose key is known: while tokens with
unknown ``kid`` s wait for a refetch held at a real local JWKS endpoint, a
user's call with a known ``kid`` (verification and owner lookup included)
completes on the sync and the grpc.aio session servers. Waiters are bounded:
the rest are refused UNAVAILABLE at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from support.keys import jwk_of, signing_key
from support.server import (
    AUDIENCE,
    IDP_ISSUER,
    IDP_KID,
    JwksServer,
    RunningServer,
    mint,
    run_aio_server_in_thread,
)
from support.waiting import wait_until

from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2 as pb
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2_grpc as pb_grpc
from ambient_grpc_auth.reference.serve import start_aio_session_server, start_sync_session_server
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.jwks import JwksCache

UNKNOWN_KID_CALLS = 12
MAX_WAITERS = 2


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer({"keys": [jwk_of(signing_key(), IDP_KID)]})
    try:
        yield server
    finally:
        server.close()


def _start(kind: str, store: SessionStore, config: ServerAuthConfig) -> RunningServer:
    if kind == "sync":
        # Fewer workers than unknown-kid calls: were every one of them to wait
        # for the fetch, no worker would be left for the known-kid call.
        running = start_sync_session_server(store, config, max_workers=6)
        return RunningServer(running.port, lambda: running.stop(grace=None))

    async def start() -> tuple[grpc.aio.Server, int]:
        server, port, _ = await start_aio_session_server(store, config)
        return server, port

    return run_aio_server_in_thread(start)


def _push(stub: Any, session_id: str, token: str) -> Any:
    return stub.PushSessionMessage.future(
        pb.PushSessionMessageRequest(session_id=session_id, event_type="t", payload="p"),
        metadata=(("authorization", "Bearer " + token),),
        timeout=20,
    )


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_known_kid_calls_complete_while_a_refetch_is_held(
    kind: str, jwks_server: JwksServer
) -> None:
    cache = JwksCache(jwks_server.url, cooldown=0.0, max_waiters=MAX_WAITERS, timeout=5.0)
    issuer = TrustedIssuer(issuer=IDP_ISSUER, audiences=(AUDIENCE,), keys=cache)
    store = SessionStore()
    config = ServerAuthConfig.from_env(environ={}, issuers=[issuer], owner_lookup=store.owner_of)
    session_id = store.create_session("mine", created_by="alice").metadata.id
    server = _start(kind, store, config)
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.SessionServiceStub(channel)
    release = threading.Event()
    try:
        assert _push(stub, session_id, mint(time.time())).result().seq == 1  # first fetch
        assert jwks_server.requests == 1
        jwks_server.hold = release  # the next fetch waits until released
        unknown = [
            _push(stub, session_id, mint(time.time(), kid=f"unknown-{i}"))
            for i in range(UNKNOWN_KID_CALLS)
        ]
        wait_until(lambda: jwks_server.requests == 2)  # the refetch is running
        # A fresh token with a known kid: verified, owner looked up, stored...
        known = _push(stub, session_id, mint(time.time(), jti="fresh"))
        assert known.result(timeout=4).seq == 2
        # ...before the fetch finished: the held calls are still waiting.
        assert jwks_server.requests == 2
        assert any(not f.done() for f in unknown)
        # Beyond the waiter bound, calls are refused at once (UNAVAILABLE).
        held = MAX_WAITERS + 1  # the waiters and the call that started the fetch
        wait_until(lambda: sum(f.done() for f in unknown) >= UNKNOWN_KID_CALLS - held)
        waiting = [f for f in unknown if not f.done()]
        assert 0 < len(waiting) <= held
        refused = [f.exception().code() for f in unknown if f.done()]
        assert refused == [grpc.StatusCode.UNAVAILABLE] * (UNKNOWN_KID_CALLS - len(waiting))
        release.set()
        codes = {f.exception(timeout=10).code() for f in waiting}
        assert codes == {grpc.StatusCode.UNAUTHENTICATED}  # unknown kid, after the fetch
    finally:
        release.set()
        channel.close()
        server.stop()
        store.close()
