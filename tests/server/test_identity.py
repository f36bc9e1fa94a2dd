"""Identity is ``(issuer, subject)`` wherever it is compared.

A name alone never grants anything: not ownership of a session, not a
service account, not a service-account pattern, not the static token's
rights. Each attack is tried through the pure engine (the same pipeline both
interceptors run, with the real store's ``owner_of`` as the lookup); the
cross-IdP case also through real sync and grpc.aio servers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import grpc.aio
import pytest
from support.server import RunningServer, run_aio_server_in_thread

from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.principal import CallerKind, Identity
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.reference import servicer as reference
from ambient_grpc_auth.reference.aio import servicer as aio_reference
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.aio.interceptor import (
    ServerAuthInterceptor as AioServerAuthInterceptor,
)
from ambient_grpc_auth.server.authn import (
    DEFAULT_STATIC_USERNAME,
    K8S_DEFAULT_ISSUER,
    STATIC_TOKEN_ISSUER,
    JwtAuthenticator,
    StaticTokenAuthenticator,
    TrustedIssuer,
)
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.engine import Admission, AuthEngine, Denial, Verification
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor
from ambient_grpc_auth.server.metrics import AuthMetrics
from ambient_grpc_auth.server.policy import CallerClassifier, owner_access, owner_identity
from ambient_grpc_auth.testing import FakeClock, FakeIssuer

PUSH = "/ambient.v1.SessionService/PushSessionMessage"
HANDLER = object()
STATIC_TOKEN = "static-service-token-identity-0123456789"
SERVICE_ACCOUNT = "svc-backend"
RUNNER_NAME = "system:serviceaccount:ambient-code:ambient-runner"
PATTERN = "system:serviceaccount:ambient-code:*"
PATTERN_NAME = "system:serviceaccount:ambient-code:builder"


class World:
    """Two user IdPs, the cluster issuer, our control plane and the static
    token in front of a real store; sessions owned by each kind of caller."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.idp1 = FakeIssuer("https://idp-one.test", clock=self.clock)
        self.idp2 = FakeIssuer("https://idp-two.test", clock=self.clock)
        self.k8s = FakeIssuer(K8S_DEFAULT_ISSUER, clock=self.clock)
        self.cp = FakeIssuer("https://cp.test", clock=self.clock)
        self.store = SessionStore(":memory:")
        self.metrics = AuthMetrics()
        self.config = ServerAuthConfig.from_env(
            # Bare names are bound to the Kubernetes issuer, which is trusted.
            environ={"AMBIENT_API_TOKEN": STATIC_TOKEN, "GRPC_SERVICE_ACCOUNT": SERVICE_ACCOUNT},
            issuers=[
                self.idp1.trusted_issuer(),
                self.idp2.trusted_issuer(),
                self.k8s.trusted_issuer(),
                self.cp.trusted_issuer(control_plane=True),
            ],
            service_account_patterns=[PATTERN],
            owner_lookup=self.store.owner_of,
            metrics=self.metrics,
            clock=self.clock,
        )
        self.engine = AuthEngine(self.config)

        def create(name: str, issuer: str) -> str:
            session = self.store.create_session("s", created_by=name, created_by_issuer=issuer)
            return session.metadata.id

        self.alice_session = create("alice", self.idp1.issuer)
        self.static_session = create(DEFAULT_STATIC_USERNAME, STATIC_TOKEN_ISSUER)
        self.svc_session = create(SERVICE_ACCOUNT, K8S_DEFAULT_ISSUER)
        self.runner_session = create(RUNNER_NAME, self.cp.issuer)
        self.pattern_session = create(PATTERN_NAME, K8S_DEFAULT_ISSUER)

    def admission(self, token: str) -> Admission:
        decision = self.engine.admit(PUSH, (("authorization", "Bearer " + token),), HANDLER)
        if isinstance(decision, Verification):
            decision = decision.verify()
        assert isinstance(decision, Admission), decision
        return decision

    def decide(self, token: str, session_id: str) -> grpc.StatusCode:
        """The request-phase decision, by every path the adapters use."""
        admission = self.admission(token)
        request = SimpleNamespace(session_id=session_id)
        assert admission.check is not None
        outcomes = {
            admission.check(request),
            admission.decide(request),
            asyncio.run(admission.check_async(request)),
        }
        assert len(outcomes) == 1, outcomes
        (outcome,) = outcomes
        return grpc.StatusCode.OK if outcome is None else outcome.code

    def denied(self) -> dict[str, int]:
        return dict(self.metrics.snapshot().denied)


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    w.store.close()


OK, DENIED = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED


def test_alice_of_one_idp_does_not_own_alice_of_another(world: World) -> None:
    assert world.decide(world.idp1.mint("alice"), world.alice_session) == OK
    assert world.decide(world.idp2.mint("alice"), world.alice_session) == DENIED
    assert world.denied() == {"not_owner": 3}


def test_idp_user_named_like_the_static_token_is_a_plain_user(world: World) -> None:
    impostor = world.admission(world.idp1.mint(DEFAULT_STATIC_USERNAME)).principal
    assert impostor.kind is CallerKind.USER
    assert impostor.identity == (world.idp1.issuer, DEFAULT_STATIC_USERNAME)
    # Neither the static token's rights nor the sessions it created.
    assert world.decide(world.idp1.mint(DEFAULT_STATIC_USERNAME), world.alice_session) == DENIED
    assert world.decide(world.idp1.mint(DEFAULT_STATIC_USERNAME), world.static_session) == DENIED
    assert world.decide(STATIC_TOKEN, world.alice_session) == OK


def test_idp_user_named_like_grpc_service_account_is_a_plain_user(world: World) -> None:
    assert not world.admission(world.idp1.mint(SERVICE_ACCOUNT)).principal.is_service
    assert world.decide(world.idp1.mint(SERVICE_ACCOUNT), world.alice_session) == DENIED
    assert world.decide(world.idp1.mint(SERVICE_ACCOUNT), world.svc_session) == DENIED
    # The same name from the issuer it is bound to is the service account.
    assert world.admission(world.k8s.mint(SERVICE_ACCOUNT)).principal.is_service
    assert world.decide(world.k8s.mint(SERVICE_ACCOUNT), world.alice_session) == OK


def test_idp_user_named_like_a_runner_gets_nothing_of_the_runner(world: World) -> None:
    impostor = world.idp1.mint(RUNNER_NAME)
    assert not world.admission(impostor).principal.is_service
    assert world.decide(impostor, world.runner_session) == DENIED
    # The same name from the control plane, as a plain (non-runner) token, owns it.
    assert world.decide(world.cp.mint(RUNNER_NAME), world.runner_session) == OK


def test_idp_user_matching_a_service_account_pattern_is_a_plain_user(world: World) -> None:
    for issuer in (world.idp1, world.idp2, world.cp):
        assert not world.admission(issuer.mint(PATTERN_NAME)).principal.is_service
        assert world.decide(issuer.mint(PATTERN_NAME), world.alice_session) == DENIED
        assert world.decide(issuer.mint(PATTERN_NAME), world.pattern_session) == DENIED
    assert world.admission(world.k8s.mint(PATTERN_NAME)).principal.is_service
    assert world.decide(world.k8s.mint(PATTERN_NAME), world.alice_session) == OK


def test_the_static_token_issuer_cannot_be_asserted_by_a_jwt(world: World) -> None:
    static = StaticTokenAuthenticator(token=STATIC_TOKEN)
    assert static.authenticate(STATIC_TOKEN).identity == (
        STATIC_TOKEN_ISSUER,
        DEFAULT_STATIC_USERNAME,
    )
    assert "://" not in STATIC_TOKEN_ISSUER
    forger = FakeIssuer(STATIC_TOKEN_ISSUER, clock=world.clock)
    with pytest.raises(ConfigurationError):
        forger.trusted_issuer()
    # A JWT claiming it is from an unknown issuer, whatever its key.
    token = world.idp1.mint(DEFAULT_STATIC_USERNAME, issuer=STATIC_TOKEN_ISSUER)
    decision = world.engine.admit(PUSH, (("authorization", "Bearer " + token),), HANDLER)
    assert isinstance(decision, Verification)
    denial = decision.verify()
    assert isinstance(denial, Denial)
    assert denial.code is grpc.StatusCode.UNAUTHENTICATED


def test_sessions_record_their_creator_with_the_issuer(world: World) -> None:
    assert world.store.owner_of(world.alice_session) == Identity(world.idp1.issuer, "alice")
    assert world.store.owner_of(world.static_session) == (
        STATIC_TOKEN_ISSUER,
        DEFAULT_STATIC_USERNAME,
    )


# --- the pure pieces ---------------------------------------------------------------------


def test_owner_access_compares_issuer_and_subject() -> None:
    classifier = CallerClassifier()
    alice = classifier.classify(
        StaticTokenAuthenticator(token="t0123456789", username="alice").authenticate("t0123456789")
    )
    assert owner_access(alice, Identity(STATIC_TOKEN_ISSUER, "alice")) is None
    assert owner_access(alice, ("other", "alice")) == "not_owner"  # type: ignore[arg-type]
    # A bare name stands for that name from the default owner issuer only.
    assert owner_access(alice, "alice", STATIC_TOKEN_ISSUER) is None
    assert owner_access(alice, "alice", "https://idp.test") == "not_owner"
    assert owner_access(alice, "alice") == "not_owner"
    assert owner_identity("bob", "https://idp.test") == Identity("https://idp.test", "bob")
    assert owner_identity(None, "https://idp.test") is None


@pytest.mark.parametrize(
    "entry", ["svc", ("https://idp.test",), ("https://idp.test", ""), (1, "svc"), None]
)
def test_classifier_refuses_names_without_an_issuer(entry: object) -> None:
    with pytest.raises(ConfigurationError):
        CallerClassifier(service_accounts=[entry])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError):
        CallerClassifier(service_account_patterns=[entry])  # type: ignore[list-item]


def _issuer(name: str, *, control_plane: bool = False) -> TrustedIssuer:
    return FakeIssuer(name).trusted_issuer(control_plane=control_plane)


def test_from_env_binds_bare_names() -> None:
    idp, k8s = _issuer("https://idp.test"), _issuer(K8S_DEFAULT_ISSUER)
    env = {"GRPC_SERVICE_ACCOUNT": "svc"}
    # Default: the Kubernetes issuer, when trusted.
    config = ServerAuthConfig.from_env(
        environ=env, issuers=[idp, k8s], service_account_patterns=["system:*"]
    )
    assert config.classifier.service_accounts == {(K8S_DEFAULT_ISSUER, "svc")}
    assert config.classifier.service_account_patterns == ((K8S_DEFAULT_ISSUER, "system:*"),)
    # GRPC_SERVICE_ACCOUNT_ISSUER, or the argument, choose another.
    config = ServerAuthConfig.from_env(
        environ={**env, "GRPC_SERVICE_ACCOUNT_ISSUER": "https://idp.test"}, issuers=[idp, k8s]
    )
    assert config.classifier.service_accounts == {("https://idp.test", "svc")}
    config = ServerAuthConfig.from_env(
        environ=env,
        issuers=[idp, k8s],
        service_account_issuer="https://idp.test",
        service_accounts=[(K8S_DEFAULT_ISSUER, "operator")],
        service_account_patterns=["a*", (K8S_DEFAULT_ISSUER, "b*")],
        pattern_issuers=[K8S_DEFAULT_ISSUER, "https://idp.test"],
    )
    assert config.classifier.service_accounts == {
        ("https://idp.test", "svc"),
        (K8S_DEFAULT_ISSUER, "operator"),
    }
    assert set(config.classifier.service_account_patterns) == {
        (K8S_DEFAULT_ISSUER, "a*"),
        ("https://idp.test", "a*"),
        (K8S_DEFAULT_ISSUER, "b*"),
    }


def test_from_env_refuses_unbindable_names() -> None:
    idp = _issuer("https://idp.test")
    with pytest.raises(ConfigurationError, match="GRPC_SERVICE_ACCOUNT_ISSUER"):
        ServerAuthConfig.from_env(environ={"GRPC_SERVICE_ACCOUNT": "svc"}, issuers=[idp])
    with pytest.raises(ConfigurationError, match="GRPC_SERVICE_ACCOUNT_ISSUER"):
        ServerAuthConfig.from_env(environ={}, issuers=[idp], service_account_patterns=["x*"])
    with pytest.raises(ConfigurationError, match="not trusted"):
        ServerAuthConfig.from_env(
            environ={}, issuers=[idp], service_accounts=[("https://other.test", "svc")]
        )
    with pytest.raises(ConfigurationError, match="not trusted"):
        ServerAuthConfig.from_env(
            environ={"GRPC_SERVICE_ACCOUNT": "svc", "GRPC_SERVICE_ACCOUNT_ISSUER": "https://x"},
            issuers=[idp],
        )


def test_default_owner_issuer() -> None:
    idp, other, cp = (
        _issuer("https://idp.test"),
        _issuer("https://other.test"),
        _issuer("https://cp.test", control_plane=True),
    )
    assert ServerAuthConfig.from_env(environ={}, issuers=[cp, idp, other]).default_owner_issuer == (
        "https://idp.test"
    )
    assert ServerAuthConfig.from_env(environ={}, issuers=[cp]).default_owner_issuer == (
        "https://cp.test"
    )
    chosen = ServerAuthConfig.from_env(
        environ={}, issuers=[cp, idp, other], default_owner_issuer="https://other.test"
    )
    assert chosen.default_owner_issuer == "https://other.test"
    direct = ServerAuthConfig(authenticator=JwtAuthenticator(issuers=[idp]))
    assert direct.default_owner_issuer is None


# --- through real servers ------------------------------------------------------------------


@dataclasses.dataclass
class Served:
    world: World
    stub: sessions_pb2_grpc.SessionServiceStub

    def code(self, method: str, request: object, token: str) -> grpc.StatusCode:
        md = (("authorization", "Bearer " + token),)
        try:
            reply = getattr(self.stub, method)(request, metadata=md, timeout=5)
            if method == "WatchSessionMessages":
                next(reply)
                reply.cancel()
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return OK


@pytest.fixture(params=["sync", "aio"])
def served(request: pytest.FixtureRequest, world: World) -> Iterator[Served]:
    interceptor: grpc.ServerInterceptor | grpc.aio.ServerInterceptor
    if request.param == "sync":
        interceptor = ServerAuthInterceptor(config=world.config)
        server, port = reference.serve(world.store, interceptors=[interceptor])
        running = RunningServer(port, lambda: server.stop(None).wait(5))
    else:

        async def start() -> tuple[grpc.aio.Server, int]:
            aio = AioServerAuthInterceptor(config=world.config)
            return await aio_reference.serve(world.store, interceptors=[aio])

        running = run_aio_server_in_thread(start)
    channel = grpc.insecure_channel(running.target)
    try:
        yield Served(world, sessions_pb2_grpc.SessionServiceStub(channel))
    finally:
        channel.close()
        running.stop()


def test_cross_idp_alice_is_denied_by_real_servers(served: Served) -> None:
    w = served.world
    alice1, alice2 = w.idp1.mint("alice"), w.idp2.mint("alice")
    created = served.stub.CreateSession(
        sessions_pb2.CreateSessionRequest(name="mine"),
        metadata=(("authorization", "Bearer " + alice1),),
        timeout=5,
    )
    sid = created.metadata.id
    assert w.store.owner_of(sid) == (w.idp1.issuer, "alice")
    push = sessions_pb2.PushSessionMessageRequest(session_id=sid, event_type="user", payload="hi")
    get = sessions_pb2.GetSessionRequest(id=sid)
    watch = sessions_pb2.WatchSessionMessagesRequest(session_id=sid)
    for method, request in (
        ("GetSession", get),
        ("PushSessionMessage", push),
        ("WatchSessionMessages", watch),
    ):
        assert served.code(method, request, alice2) == DENIED, method
    assert w.store.read_messages(sid, 0).messages == ()
    for method, request in (
        ("GetSession", get),
        ("PushSessionMessage", push),
        ("WatchSessionMessages", watch),
    ):
        assert served.code(method, request, alice1) == OK, method


def test_rejection_logs_name_the_caller_with_its_issuer(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    # "alice" alone is ambiguous (two IdPs have one); the log says which.
    caplog.set_level(logging.INFO, logger="ambient_grpc_auth.server.interceptor")
    token = world.idp2.mint("alice")
    assert world.decide(token, world.alice_session) == DENIED
    lines = [r.getMessage() for r in caplog.records if r.message.startswith("rejected")]
    assert lines, caplog.text
    assert all(f"for 'alice' of '{world.idp2.issuer}': not_owner" in line for line in lines)
    assert token not in caplog.text
