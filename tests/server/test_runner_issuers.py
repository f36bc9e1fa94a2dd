"""Only issuers explicitly marked as control plane mint runner tokens.

A token carrying runner claims (``token_use``, ``session_id``) from any other
trusted issuer is not a runner: its caller is the plain user it names. The
library has always required ``control_plane=True``; the CLI used to mark
every ``--trust`` issuer when ``--control-plane-issuer`` was not given. Also
the CLI's issuer-bound service-account flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from ambient_grpc_auth.cli import _parser, _server_auth_config
from ambient_grpc_auth.principal import CallerKind
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.authn import K8S_DEFAULT_ISSUER
from ambient_grpc_auth.server.engine import Admission, AuthEngine, Verification
from ambient_grpc_auth.testing import FakeIssuer

PUSH = "/ambient.v1.SessionService/PushSessionMessage"
CP = "https://cp.test"
IDP = "https://idp.test"


@pytest.fixture
def issuers() -> dict[str, FakeIssuer]:
    # The CLI's default audience; no kid, as a PEM key source holds one key.
    return {
        name: FakeIssuer(name, audience="ambient-api-server", kid=None)
        for name in (CP, IDP, K8S_DEFAULT_ISSUER)
    }


@pytest.fixture
def store() -> Iterator[SessionStore]:
    with SessionStore(":memory:") as s:
        yield s


def _args(tmp_path: Path, issuers: dict[str, FakeIssuer], *extra: str) -> argparse.Namespace:
    argv = ["session-server", "--db", ":memory:"]
    for name, issuer in issuers.items():
        pem = tmp_path / f"{len(argv)}.pem"
        pem.write_bytes(
            issuer.public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        argv += ["--trust", f"{name}={pem}"]
    return _parser().parse_args([*argv, *extra])


def _decide(engine: AuthEngine, token: str, session_id: str) -> tuple[CallerKind, object]:
    decision = engine.admit(PUSH, (("authorization", "Bearer " + token),), object())
    if isinstance(decision, Verification):
        decision = decision.verify()
    assert isinstance(decision, Admission), decision
    outcome = decision.decide(SimpleNamespace(session_id=session_id))
    return decision.principal.kind, None if outcome is None else outcome.code


def test_cli_honours_runner_claims_only_from_named_control_planes(
    tmp_path: Path, issuers: dict[str, FakeIssuer], store: SessionStore
) -> None:
    sid = store.create_session("s", created_by="alice", created_by_issuer=IDP).metadata.id
    cp_runner = issuers[CP].runner_token(sid)
    idp_runner = issuers[IDP].runner_token(sid)

    # No --control-plane-issuer: nobody mints runner tokens.
    engine = AuthEngine(_server_auth_config(_args(tmp_path, issuers), store.owner_of))
    assert engine.config.classifier.control_plane_issuers == frozenset()
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert _decide(engine, cp_runner, sid) == (CallerKind.USER, denied)
    assert _decide(engine, idp_runner, sid) == (CallerKind.USER, denied)

    # Named: that issuer's runner tokens are scoped service callers, others still not.
    args = _args(tmp_path, issuers, "--control-plane-issuer", CP)
    engine = AuthEngine(_server_auth_config(args, store.owner_of))
    assert engine.config.classifier.control_plane_issuers == frozenset({CP})
    assert _decide(engine, cp_runner, sid) == (CallerKind.SERVICE, None)
    assert _decide(engine, idp_runner, sid) == (CallerKind.USER, denied)
    # The owner, a user of the default owner issuer, keeps access.
    assert engine.config.default_owner_issuer == IDP
    assert _decide(engine, issuers[IDP].mint("alice"), sid) == (CallerKind.USER, None)


def test_cli_control_plane_issuer_help_states_the_default() -> None:
    text = _parser()._subparsers._group_actions[0].choices["session-server"].format_help()  # type: ignore[union-attr]
    assert "runner claims from any other issuer are ignored" in " ".join(text.split())


def test_cli_service_accounts_are_bound_to_issuers(
    tmp_path: Path, issuers: dict[str, FakeIssuer], store: SessionStore
) -> None:
    args = _args(
        tmp_path,
        issuers,
        "--service-account",
        f"{IDP}=robot",
        "--service-account",
        "operator",  # bare: the Kubernetes issuer, trusted here
        "--service-account-pattern",
        f"{CP}=system:serviceaccount:ambient-code:*",
        "--service-account-pattern",
        "system:serviceaccount:jobs:*",
    )
    classifier = _server_auth_config(args, store.owner_of).classifier
    assert classifier.service_accounts == {(IDP, "robot"), (K8S_DEFAULT_ISSUER, "operator")}
    assert set(classifier.service_account_patterns) == {
        (CP, "system:serviceaccount:ambient-code:*"),
        (K8S_DEFAULT_ISSUER, "system:serviceaccount:jobs:*"),
    }
    args = _args(tmp_path, issuers, "--service-account", "robot", "--service-account-issuer", IDP)
    classifier = _server_auth_config(args, store.owner_of).classifier
    assert classifier.service_accounts == {(IDP, "robot")}


def test_cli_refuses_bad_bindings(
    tmp_path: Path, issuers: dict[str, FakeIssuer], capsys: pytest.CaptureFixture[str]
) -> None:
    for bad in ("=robot", f"{IDP}="):
        with pytest.raises(SystemExit) as exc:
            _args(tmp_path, issuers, "--service-account", bad)
        assert exc.value.code == 2
    assert "ISSUER=NAME" in capsys.readouterr().err
