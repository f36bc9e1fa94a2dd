"""Event types: look-alikes of ``user`` are refused to services; control and
format characters are refused to everyone.

The pure check (:func:`check_push_allowed`), the store's own validation, and
one real push through the interceptor and the reference service (sync and
grpc.aio).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from types import MappingProxyType

import grpc
import grpc.aio
import pytest
from support.server import RunningServer, run_aio_server_in_thread

from ambient_grpc_auth.principal import CallerKind, Principal
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.reference import servicer as reference
from ambient_grpc_auth.reference.aio import servicer as aio_reference
from ambient_grpc_auth.reference.store import SessionStore, SessionStoreError, check_push_allowed
from ambient_grpc_auth.server.aio.interceptor import (
    ServerAuthInterceptor as AioServerAuthInterceptor,
)
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor
from ambient_grpc_auth.testing import FakeClock, FakeIssuer

SERVICE = Principal("platform", CallerKind.SERVICE, issuer="ambient-grpc-auth:static-token")
RUNNER = Principal("runner:s1", CallerKind.SERVICE, session_scope="s1", issuer="https://cp.test")
USER = Principal("alice", CallerKind.USER, issuer="https://idp.test", claims=MappingProxyType({}))

#: Read as ``user`` once normalised: refused to services (PERMISSION_DENIED).
LOOK_ALIKES = [
    "user",
    "USER",
    "User",
    " user ",
    "u\u017fer",  # LATIN SMALL LETTER LONG S: NFKC makes it "s"
    "\uff55\uff53\uff45\uff52",  # fullwidth
    "\uff35\uff33\uff25\uff32",  # fullwidth capitals
    "\u1d58ser",  # MODIFIER LETTER SMALL U
    "\u1d58\u02e2\u1d49\u02b3",  # all modifier letters
    "\U0001d42e\U0001d42c\U0001d41e\U0001d42b",  # mathematical bold
    "\u24e4ser",  # CIRCLED LATIN SMALL LETTER U
    "\u3000user",  # IDEOGRAPHIC SPACE, stripped
    "\u00a0user\u00a0",  # NO-BREAK SPACE, stripped
    "user\u2028",  # LINE SEPARATOR (Zl), stripped
    "use\u0301r",  # a combining accent
    "us\u00e9r",  # precomposed accent
    "\u00fcser",  # diaeresis
    "user\u034f",  # COMBINING GRAPHEME JOINER: invisible, a mark (Mn)
    "user\ufe0f",  # VARIATION SELECTOR-16: invisible, a mark (Mn)
]

#: Control (Cc) or format (Cf) characters: refused to everyone (INVALID_ARGUMENT).
INVISIBLES = [
    "user\u200b",  # ZERO WIDTH SPACE
    "\u200buser",
    "user\x00",
    "user\x7f",  # DEL
    "user\x85",  # NEXT LINE (C1 control)
    "user\n",
    "us\ter",
    "us\u00ader",  # SOFT HYPHEN
    "user\u2060",  # WORD JOINER
    "\ufeffuser",  # BYTE ORDER MARK
    "\u202euser",  # RIGHT-TO-LEFT OVERRIDE
    "user\u180e",  # MONGOLIAN VOWEL SEPARATOR
    "user\U000e0075",  # TAG LATIN SMALL LETTER U
    "assistant\u200d",  # not only look-alikes of "user"
]

#: Other event types a service may push.
ORDINARY = ["assistant", "users", "user-input", "user_message", "tool", "u ser", "\u00fcsers"]


@pytest.mark.parametrize("event_type", LOOK_ALIKES)
@pytest.mark.parametrize("principal", [SERVICE, RUNNER], ids=["service", "runner"])
def test_services_may_not_push_look_alikes_of_user(principal: Principal, event_type: str) -> None:
    with pytest.raises(SessionStoreError) as err:
        check_push_allowed(principal, event_type)
    assert err.value.code is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("event_type", LOOK_ALIKES)
def test_users_may_push_user_messages(event_type: str) -> None:
    check_push_allowed(USER, event_type)


@pytest.mark.parametrize("event_type", INVISIBLES)
@pytest.mark.parametrize("principal", [SERVICE, USER, None], ids=["service", "user", "anonymous"])
def test_control_and_format_characters_are_refused_to_everyone(
    principal: Principal | None, event_type: str
) -> None:
    with pytest.raises(SessionStoreError) as err:
        check_push_allowed(principal, event_type)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert event_type not in err.value.message


@pytest.mark.parametrize("event_type", INVISIBLES)
def test_the_store_refuses_control_and_format_characters(event_type: str) -> None:
    with SessionStore() as store:
        sid = store.create_session("s").metadata.id
        with pytest.raises(SessionStoreError) as err:
            store.append(sid, event_type, "{}")
        assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert store.read_messages(sid, 0).messages == ()


@pytest.mark.parametrize("event_type", ORDINARY)
def test_services_may_push_other_event_types(event_type: str) -> None:
    check_push_allowed(SERVICE, event_type)
    with SessionStore() as store:
        sid = store.create_session("s").metadata.id
        assert store.append(sid, event_type, "{}").event_type == event_type


# --- through a real server ---------------------------------------------------------------

STATIC_TOKEN = "static-service-token-for-event-types"


@dataclasses.dataclass
class Env:
    store: SessionStore
    stub: sessions_pb2_grpc.SessionServiceStub
    alice: tuple[tuple[str, str]]
    service: tuple[tuple[str, str]] = (("authorization", "Bearer " + STATIC_TOKEN),)

    def push(self, md: tuple[tuple[str, str]], session_id: str, event_type: str) -> grpc.StatusCode:
        request = sessions_pb2.PushSessionMessageRequest(
            session_id=session_id, event_type=event_type, payload="{}"
        )
        try:
            self.stub.PushSessionMessage(request, metadata=md, timeout=5)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK


@pytest.fixture(params=["sync", "aio"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    clock = FakeClock()
    idp = FakeIssuer("https://idp.test", clock=clock)
    store = SessionStore(":memory:")
    config = ServerAuthConfig.from_env(
        environ={"AMBIENT_API_TOKEN": STATIC_TOKEN},
        issuers=[idp.trusted_issuer()],
        owner_lookup=store.owner_of,
        clock=clock,
    )
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
        alice = (("authorization", "Bearer " + idp.mint("alice")),)
        yield Env(store, sessions_pb2_grpc.SessionServiceStub(channel), alice)
    finally:
        channel.close()
        running.stop()
        store.close()


def test_real_push_refuses_look_alikes_and_invisible_characters(env: Env) -> None:
    session = env.stub.CreateSession(
        sessions_pb2.CreateSessionRequest(name="s"), metadata=env.alice, timeout=5
    )
    sid = session.metadata.id
    denied, invalid = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT
    assert env.push(env.service, sid, "\uff55\uff53\uff45\uff52") == denied
    assert env.push(env.service, sid, "u\u017fer") == denied
    assert env.push(env.service, sid, "user\u200b") == invalid
    assert env.push(env.service, sid, "user\x00") == invalid
    assert env.push(env.alice, sid, "user\x00") == invalid
    assert env.store.read_messages(sid, 0).messages == ()
    # What stays allowed: the owner's user messages, the service's own types.
    assert env.push(env.alice, sid, "user") == grpc.StatusCode.OK
    assert env.push(env.service, sid, "assistant") == grpc.StatusCode.OK
    stored = [m.event_type for m in env.store.read_messages(sid, 0).messages]
    assert stored == ["user", "assistant"]
