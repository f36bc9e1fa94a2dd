"""Where we are stricter than the platform, on purpose (README, "Compatibility").

Each test pins one decision against real servers on loopback, so that a
change of behaviour is a deliberate change of this file and of the README.

The platform's behaviour, for reference: its control plane accepts a
decrypted session id of at least 8 *bytes* holding none of space, tab, CR,
LF (no upper bound but the RSA-OAEP plaintext limit, 446 bytes under its
4096-bit key), reads ``Bearer `` plus the rest of the header as the proof;
its API server trims whitespace around the token (``Bearer  t`` and
``Bearer t `` are accepted) and takes any non-empty session id.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from support.cp import copy_keys, get, public_pem, runner_style_bearer, serving
from support.server import run_aio_server_in_thread

from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.reference.serve import start_aio_session_server, start_sync_session_server
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.config import API_TOKEN_ENV, ServerAuthConfig
from ambient_grpc_auth.server.policy import MAX_SESSION_ID_CHARS

SERVICE_TOKEN = "differences-service-token-0123456789"  # noqa: S105 (test value)

# --- control plane: session ids ----------------------------------------------------


@pytest.fixture(scope="module")
def cp_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_keys(tmp_path_factory.mktemp("diff") / "keys")


async def _token_status(keys: Path, session_id: str, *, raw: str | None = None) -> int:
    async with serving(TokenServerConfig(keys_dir=keys)) as cp, aiohttp.ClientSession() as http:
        proof = runner_style_bearer(public_pem(keys), session_id)
        headers = {"Authorization": raw.format(proof=proof)} if raw else {}
        status, _, _ = await get(http, cp.url + "/token", None if raw else proof, headers=headers)
        return status


@pytest.mark.parametrize(
    ("session_id", "status"),
    [
        # Counted in characters, not bytes: 4 two-byte characters are 8
        # bytes (the platform accepts them) but 4 characters (we refuse).
        ("\u00e9" * 4, 403),
        ("\u00e9" * 8, 200),
        # At most 256 characters; the platform takes up to 446 bytes.
        ("a" * MAX_SESSION_ID_CHARS, 200),
        ("a" * (MAX_SESSION_ID_CHARS + 1), 403),
        # Every whitespace and control character is refused, not only the
        # four the platform refuses.
        ("abcdefgh\x0b", 403),
        ("abcd\u00a0efgh", 403),
        ("abcdefgh\x00", 403),
    ],
)
async def test_cp_session_id_rules(cp_keys: Path, session_id: str, status: int) -> None:
    assert await _token_status(cp_keys, session_id) == status


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ("Bearer {proof}", 200),
        # Same as the platform: the proof after two spaces is not base64.
        ("Bearer  {proof}", 401),
        # Same as the platform: HTTP drops whitespace around a header value.
        ("Bearer {proof} ", 200),
    ],
)
async def test_cp_proof_header_spacing(cp_keys: Path, header: str, status: int) -> None:
    assert await _token_status(cp_keys, "session-0001", raw=header) == status


# --- API server: bearer spacing and session ids ------------------------------------


@pytest.fixture(params=["sync", "aio"])
def address(request: pytest.FixtureRequest) -> Iterator[str]:
    store = SessionStore(":memory:")
    config = ServerAuthConfig.from_env(
        environ={API_TOKEN_ENV: SERVICE_TOKEN}, owner_lookup=store.owner_of
    )
    if request.param == "sync":
        sync = start_sync_session_server(store, config)
        stop, target = (lambda: sync.stop(None)), f"127.0.0.1:{sync.port}"
    else:

        async def start() -> tuple[grpc.aio.Server, int]:
            server, port, _ = await start_aio_session_server(store, config)
            return server, port

        running = run_aio_server_in_thread(start)
        stop, target = running.stop, running.target
    try:
        yield target
    finally:
        stop()
        store.close()


def _push_code(address: str, authorization: str, session_id: str = "session-0001") -> str:
    request = sessions_pb2.PushSessionMessageRequest(
        session_id=session_id, event_type="e", payload="p"
    )
    with grpc.insecure_channel(address) as channel:
        stub = sessions_pb2_grpc.SessionServiceStub(channel)
        try:
            stub.PushSessionMessage(
                request, metadata=(("authorization", authorization),), timeout=10
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


@pytest.mark.parametrize(
    ("value", "code"),
    [
        # The session does not exist: authentication passed.
        ("Bearer {t}", "NOT_FOUND"),
        ("bearer {t}", "NOT_FOUND"),
        # The platform trims around the token and accepts these two; we
        # take exactly "<scheme> <token>", as every gRPC client sends it.
        ("Bearer  {t}", "UNAUTHENTICATED"),
        ("Bearer {t} ", "UNAUTHENTICATED"),
    ],
)
def test_api_server_bearer_spacing(address: str, value: str, code: str) -> None:
    assert _push_code(address, value.format(t=SERVICE_TOKEN)) == code


@pytest.mark.parametrize(
    ("session_id", "code"),
    [
        ("a" * MAX_SESSION_ID_CHARS, "NOT_FOUND"),
        # 512 bytes, 256 characters: counted in characters.
        ("\u00e9" * MAX_SESSION_ID_CHARS, "NOT_FOUND"),
        # Longer ids are refused before the handler (the platform's handler
        # takes any non-empty id; its message table holds 36 characters).
        ("a" * (MAX_SESSION_ID_CHARS + 1), "PERMISSION_DENIED"),
    ],
)
def test_api_server_session_id_length(address: str, session_id: str, code: str) -> None:
    assert _push_code(address, f"Bearer {SERVICE_TOKEN}", session_id) == code
