"""Ownership on ambient.v1.SessionService through the reference servicer.

The interceptor's default rules (GetSession by ``id``; Push/Watch by
``session_id``; CreateSession open to any authenticated caller) in front of
the real reference service, sync and grpc.aio, with the store's ``owner_of``
as the owner lookup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest
from support.keys import signing_key
from support.server import (
    AUDIENCE,
    CP_ISSUER,
    CP_KID,
    IDP_ISSUER,
    IDP_KID,
    STATIC_TOKEN,
    RunningServer,
    mint,
    run_aio_server_in_thread,
    runner_token,
)

from ambient_grpc_auth.jwk import VerificationKey
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.reference import servicer as reference
from ambient_grpc_auth.reference.aio import servicer as aio_reference
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.aio.interceptor import (
    ServerAuthInterceptor as AioServerAuthInterceptor,
)
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor
from ambient_grpc_auth.server.jwks import StaticKeySet
from ambient_grpc_auth.server.metrics import AuthMetrics
from ambient_grpc_auth.server.policy import DENY, OwnershipPolicy
from ambient_grpc_auth.testing import FakeClock

DENIED = grpc.StatusCode.PERMISSION_DENIED


def make_config(store: SessionStore, clock: FakeClock, **overrides: object) -> ServerAuthConfig:
    key = signing_key().public_key()
    issuers = [
        TrustedIssuer(
            issuer=IDP_ISSUER,
            audiences=(AUDIENCE,),
            keys=StaticKeySet(keys=[VerificationKey(kid=IDP_KID, key=key)]),
        ),
        TrustedIssuer(
            issuer=CP_ISSUER,
            audiences=(AUDIENCE,),
            keys=StaticKeySet(keys=[VerificationKey(kid=CP_KID, key=key)]),
            control_plane=True,
        ),
    ]
    kwargs: dict[str, object] = {
        "environ": {"AMBIENT_API_TOKEN": STATIC_TOKEN},
        "issuers": issuers,
        "owner_lookup": store.owner_of,
        "metrics": AuthMetrics(),
        "clock": clock,
        **overrides,
    }
    return ServerAuthConfig.from_env(**kwargs)  # type: ignore[arg-type]


@dataclasses.dataclass
class Env:
    clock: FakeClock
    store: SessionStore
    stub: sessions_pb2_grpc.SessionServiceStub

    def md(self, token: str) -> tuple[tuple[str, str]]:
        return (("authorization", "Bearer " + token),)

    def user(self, name: str) -> tuple[tuple[str, str]]:
        return self.md(mint(self.clock.time(), sub=name))

    def runner(self, session_id: str) -> tuple[tuple[str, str]]:
        return self.md(runner_token(self.clock.time(), session_id))

    def create(self, owner: str) -> str:
        session = self.stub.CreateSession(
            sessions_pb2.CreateSessionRequest(name="s"), metadata=self.user(owner), timeout=5
        )
        return session.metadata.id

    def push(self, session_id: str, md: tuple[tuple[str, str]], event: str = "assistant") -> int:
        reply = self.stub.PushSessionMessage(
            sessions_pb2.PushSessionMessageRequest(
                session_id=session_id, event_type=event, payload="{}"
            ),
            metadata=md,
            timeout=5,
        )
        return reply.seq

    def watch_first(self, session_id: str, md: tuple[tuple[str, str]]) -> int:
        call = self.stub.WatchSessionMessages(
            sessions_pb2.WatchSessionMessagesRequest(session_id=session_id, after_seq=0),
            metadata=md,
            timeout=5,
        )
        try:
            return next(call).seq
        finally:
            call.cancel()


@pytest.fixture(params=["sync", "aio"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    clock = FakeClock()
    store = SessionStore(":memory:")
    config = make_config(store, clock)
    if request.param == "sync":
        server, port = reference.serve(store, interceptors=[ServerAuthInterceptor(config=config)])
        running = RunningServer(port, lambda: server.stop(None).wait(5))
    else:

        async def start() -> tuple[grpc.aio.Server, int]:
            return await aio_reference.serve(
                store, interceptors=[AioServerAuthInterceptor(config=config)]
            )

        running = run_aio_server_in_thread(start)
    channel = grpc.insecure_channel(running.target)
    try:
        yield Env(clock, store, sessions_pb2_grpc.SessionServiceStub(channel))
    finally:
        channel.close()
        running.stop()
        store.close()


def _code(fn: object, *args: object) -> grpc.StatusCode:
    """The status of ``fn(*args)``; denials must carry the generic details."""
    try:
        fn(*args)  # type: ignore[operator]
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
    else:
        return grpc.StatusCode.OK
    if code == DENIED:
        assert details == "permission denied"
    return code


def test_create_session_records_the_caller_as_owner(env: Env) -> None:
    session_id = env.create("alice")
    assert env.store.owner_of(session_id) == (IDP_ISSUER, "alice")
    got = env.stub.GetSession(
        sessions_pb2.GetSessionRequest(id=session_id), metadata=env.user("alice"), timeout=5
    )
    assert got.created_by_user_id == "alice"


def test_create_session_needs_credentials(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as err:
        env.stub.CreateSession(sessions_pb2.CreateSessionRequest(name="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_owner_can_push_and_watch(env: Env) -> None:
    session_id = env.create("alice")
    assert env.push(session_id, env.user("alice"), event="user") == 1
    assert env.watch_first(session_id, env.user("alice")) == 1


def test_non_owner_is_denied_everywhere(env: Env) -> None:
    session_id = env.create("alice")
    env.push(session_id, env.user("alice"))
    bob = env.user("bob")
    assert _code(env.push, session_id, bob) == DENIED
    assert _code(env.watch_first, session_id, bob) == DENIED
    get = env.stub.GetSession
    assert _code(lambda: get(sessions_pb2.GetSessionRequest(id=session_id), metadata=bob)) == DENIED
    assert env.store.read_messages(session_id, 0).messages[-1].seq == 1  # bob's push never landed


def test_nonexistent_session_is_denied_not_revealed(env: Env) -> None:
    alice = env.user("alice")
    assert _code(env.push, "0" * 32, alice) == DENIED
    assert _code(env.watch_first, "0" * 32, alice) == DENIED
    assert not env.store.session_exists("0" * 32)


def test_runner_is_scoped_to_its_session(env: Env) -> None:
    mine, other = env.create("alice"), env.create("bob")
    runner = env.runner(mine)
    assert env.push(mine, runner) == 1
    assert env.watch_first(mine, runner) == 1
    assert _code(env.push, other, runner) == DENIED
    assert _code(env.watch_first, other, runner) == DENIED


def test_static_service_token_acts_on_any_session(env: Env) -> None:
    session_id = env.create("alice")
    service = env.md(STATIC_TOKEN)
    assert env.push(session_id, service) == 1
    assert env.watch_first(session_id, service) == 1


def test_deny_by_default_for_methods_without_rules() -> None:
    """With ``default=DENY`` and no rule for GetSession, even its owner is refused."""
    clock = FakeClock()
    store = SessionStore(":memory:")
    rules = {
        "/ambient.v1.SessionService/CreateSession": OwnershipPolicy().rules[
            "/ambient.v1.SessionService/CreateSession"
        ]
    }
    config = make_config(store, clock, ownership=OwnershipPolicy(rules=rules, default=DENY))
    server, port = reference.serve(store, interceptors=[ServerAuthInterceptor(config=config)])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        env = Env(clock, store, sessions_pb2_grpc.SessionServiceStub(channel))
        session_id = env.create("alice")
        with pytest.raises(grpc.RpcError) as err:
            env.stub.GetSession(
                sessions_pb2.GetSessionRequest(id=session_id), metadata=env.user("alice"), timeout=5
            )
        assert err.value.code() == DENIED
    finally:
        channel.close()
        server.stop(None).wait(5)
        store.close()


async def test_aio_client_and_server_in_one_loop() -> None:
    """Native grpc.aio on both ends; the owner lookup runs in a worker thread."""
    clock = FakeClock()
    store = SessionStore(":memory:")
    config = make_config(store, clock)
    server, port = await aio_reference.serve(
        store, interceptors=[AioServerAuthInterceptor(config=config)]
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = sessions_pb2_grpc.SessionServiceStub(channel)
            alice = (("authorization", "Bearer " + mint(clock.time(), sub="alice")),)
            bob = (("authorization", "Bearer " + mint(clock.time(), sub="bob")),)
            session = await stub.CreateSession(
                sessions_pb2.CreateSessionRequest(name="n"), metadata=alice, timeout=5
            )
            sid = session.metadata.id
            pushed = await stub.PushSessionMessage(
                sessions_pb2.PushSessionMessageRequest(session_id=sid, event_type="user"),
                metadata=alice,
                timeout=5,
            )
            assert pushed.seq == 1
            watch = stub.WatchSessionMessages(
                sessions_pb2.WatchSessionMessagesRequest(session_id=sid), metadata=alice, timeout=5
            )
            assert (await watch.read()).seq == 1
            watch.cancel()
            denied = stub.WatchSessionMessages(
                sessions_pb2.WatchSessionMessagesRequest(session_id=sid), metadata=bob, timeout=5
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await denied.read()
            assert err.value.code() == DENIED
            assert err.value.details() == "permission denied"
    finally:
        await server.stop(None)
        store.close()
