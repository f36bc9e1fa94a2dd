"""The README's code samples run as written, against real servers on loopback;
they import only public modules, and every module path the README and
docs/*.md name exists."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import re
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.cp import copy_keys
from support.names import resolves
from support.waiting import LoopThread

from ambient_grpc_auth.client.channel import create_channel
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.keys import ensure_keys
from ambient_grpc_auth.controlplane.server import RunningTokenServer, start_token_server
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.reference.serve import start_sync_session_server
from ambient_grpc_auth.reference.servicer import SessionServicer
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.jwks import JwksCache
from ambient_grpc_auth.testing import FakeClock, FakeTokenSource

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SERVICE_TOKEN = "readme-service-token-0123456789"  # noqa: S105 (test value)


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _is_private(component: str) -> bool:
    return component.startswith("_") and not (
        component.startswith("__") and component.endswith("__")
    )


def private_imports(source: str) -> list[str]:
    """The dotted paths imported by ``source`` (a module path, or a module
    path plus an imported name) that have a component starting with ``_``;
    ``__future__`` and other dunder names do not count."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            paths = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            sep = "" if module.endswith(".") else "."
            paths = [f"{module}{sep}{alias.name}" for alias in node.names]
        else:
            continue
        found += [p for p in paths if any(_is_private(c) for c in p.split(".") if c)]
    return found


def _inline_code(text: str) -> list[str]:
    """The inline code spans of a Markdown text, fenced blocks left out."""
    prose = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def module_paths(text: str) -> set[str]:
    """Every ``ambient_grpc_auth.<...>`` dotted path named in inline code."""
    paths: set[str] = set()
    for span in _inline_code(text):
        paths.update(re.findall(r"\bambient_grpc_auth(?:\.[A-Za-z_]\w*)+", span))
    return paths


@pytest.fixture(scope="module")
def control_plane(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningTokenServer, str]]:
    keys = ensure_keys(copy_keys(tmp_path_factory.mktemp("readme") / "keys"))
    loop = LoopThread()
    cp = loop.run(start_token_server(TokenServerConfig(keys=keys)))
    try:
        yield cp, keys.public_pem
    finally:
        loop.run(cp.close())
        loop.close()


@pytest.fixture
def api_server(
    control_plane: tuple[RunningTokenServer, str],
) -> Iterator[tuple[str, str, SessionStore]]:
    cp, _ = control_plane
    store = SessionStore(":memory:")
    issuer = TrustedIssuer(
        issuer=cp.url,
        audiences=("ambient-api-server",),
        keys=JwksCache(cp.jwks_url),
        control_plane=True,
    )
    config = ServerAuthConfig.from_env(
        environ={"AMBIENT_API_TOKEN": SERVICE_TOKEN}, issuers=[issuer], owner_lookup=store.owner_of
    )
    server = start_sync_session_server(store, config)
    address = f"127.0.0.1:{server.port}"
    with grpc.insecure_channel(address) as channel:
        stub = sessions_pb2_grpc.SessionServiceStub(channel)
        session = stub.CreateSession(
            sessions_pb2.CreateSessionRequest(name="readme"),
            metadata=(("authorization", f"Bearer {SERVICE_TOKEN}"),),
        )
    try:
        yield address, session.metadata.id, store
    finally:
        server.stop(None)
        store.close()


@pytest.fixture
def runner_env(
    monkeypatch: pytest.MonkeyPatch,
    control_plane: tuple[RunningTokenServer, str],
    api_server: tuple[str, str, SessionStore],
) -> str:
    cp, public_pem = control_plane
    address, session_id, _ = api_server
    for name in ("BOT_TOKEN", "AMBIENT_GRPC_USE_TLS", "RESUME_AFTER_SEQ"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AMBIENT_GRPC_URL", address)
    monkeypatch.setenv("AMBIENT_CP_TOKEN_URL", cp.token_url)
    monkeypatch.setenv("AMBIENT_CP_TOKEN_PUBLIC_KEY", public_pem)
    monkeypatch.setenv("SESSION_ID", session_id)
    return session_id


def test_readme_has_the_samples() -> None:
    assert len(_python_blocks()) == 4


def test_readme_samples_import_no_private_module() -> None:
    for block in _python_blocks():
        assert private_imports(block) == [], block


def test_private_import_check_sees_every_form() -> None:
    source = (
        "from __future__ import annotations\n"
        "import ambient_grpc_auth._bearer\n"
        "import os, ambient_grpc_auth.client._core as core\n"
        "from ambient_grpc_auth.client._refresh import decide\n"
        "from ambient_grpc_auth.principal import _current\n"
        "from ambient_grpc_auth import __version__, push\n"
        "from . import _sibling\n"
    )
    assert private_imports(source) == [
        "ambient_grpc_auth._bearer",
        "ambient_grpc_auth.client._core",
        "ambient_grpc_auth.client._refresh.decide",
        "ambient_grpc_auth.principal._current",
        "._sibling",
    ]


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_module_paths_named_in_docs_exist(doc: Path) -> None:
    named = module_paths(doc.read_text(encoding="utf-8"))
    assert not {p for p in named if not resolves(p)}, f"{doc.name} names missing modules"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_python_samples_import_public_modules_that_exist(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    blocks = re.findall(r"^([ \t]*)```python\n(.*?)^\1```", text, re.S | re.M)
    for _, block in blocks:
        source = textwrap.dedent(block)
        assert private_imports(source) == [], source
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    assert resolves(f"{node.module}.{alias.name}"), source


def test_module_path_check_tells_real_from_stale() -> None:
    text = (
        "`ambient_grpc_auth.aio.ServerAuthInterceptor.from_env(**kw)` and "
        "`ambient_grpc_auth.client.caching.REFRESH_AHEAD_SECONDS`, not "
        "`ambient_grpc_auth.cpsource` or `ambient_grpc_auth.server.AuthInterceptor`\n"
        "```\nambient_grpc_auth.in_a_fenced_block\n```\n"
    )
    named = module_paths(text)
    assert named == {
        "ambient_grpc_auth.aio.ServerAuthInterceptor.from_env",
        "ambient_grpc_auth.client.caching.REFRESH_AHEAD_SECONDS",
        "ambient_grpc_auth.cpsource",
        "ambient_grpc_auth.server.AuthInterceptor",
    }
    assert {p for p in named if not resolves(p)} == {
        "ambient_grpc_auth.cpsource",
        "ambient_grpc_auth.server.AuthInterceptor",
    }


def test_sync_runner_sample(runner_env: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(_python_blocks()[0], {"session_id": runner_env})  # noqa: S102 (the README sample)
    assert out.getvalue().strip() == "1 assistant hello"


def test_aio_runner_sample(runner_env: str) -> None:
    namespace: dict[str, Any] = {}
    exec(_python_blocks()[1], namespace)  # noqa: S102 (the README sample)
    assert asyncio.run(namespace["run_runner"](runner_env)) == 1


def test_server_sample(
    monkeypatch: pytest.MonkeyPatch, control_plane: tuple[RunningTokenServer, str]
) -> None:
    cp, _ = control_plane
    monkeypatch.setenv("AMBIENT_API_TOKEN", SERVICE_TOKEN)
    monkeypatch.delenv("GRPC_SERVICE_ACCOUNT", raising=False)
    store = SessionStore(":memory:")
    namespace: dict[str, Any] = {"cp_url": cp.url, "owner_of": store.owner_of}
    exec(_python_blocks()[2], namespace)  # noqa: S102 (the README sample)
    server: grpc.Server = namespace["server"]
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(store), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = sessions_pb2_grpc.SessionServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.CreateSession(sessions_pb2.CreateSessionRequest(name="x"), timeout=5)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            created = stub.CreateSession(
                sessions_pb2.CreateSessionRequest(name="x"),
                metadata=(("authorization", f"Bearer {SERVICE_TOKEN}"),),
                timeout=5,
            )
            assert created.created_by_user_id == "ambient-api-token"
    finally:
        server.stop(None)
        store.close()


def test_testing_sample() -> None:
    namespace: dict[str, Any] = {}
    exec(_python_blocks()[3], namespace)  # noqa: S102 (the README sample)
    clock: FakeClock = namespace["clock"]
    source: FakeTokenSource = namespace["source"]
    store = SessionStore(":memory:")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[namespace["interceptor"]]
    )
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(store), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = create_channel(f"127.0.0.1:{port}", source, tls=False)
    try:
        stub = sessions_pb2_grpc.SessionServiceStub(channel)
        created = stub.CreateSession(sessions_pb2.CreateSessionRequest(name="x"), timeout=5)
        assert created.created_by_user_id == "alice"
        assert source.fetches == 1
        clock.advance(120)  # the minted token expired; the made-up ones are refused
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateSession(sessions_pb2.CreateSessionRequest(name="y"), timeout=5)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert source.fetches >= 2
    finally:
        channel.close()
        server.stop(None)
        store.close()
