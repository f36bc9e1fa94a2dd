"""Server reflection on the reference session server: a real reflection client
(grpcio-reflection's descriptor database, the protocol grpcurl, grpcui and
Postman speak) lists the services and resolves ``ambient.v1.SessionService``
without credentials, on the sync and the aio server, over both ``v1alpha`` and
``v1``; with reflection switched off a reflection call gets UNIMPLEMENTED."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.reference.serve import start_aio_session_server, start_sync_session_server
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.config import API_TOKEN_ENV, ServerAuthConfig

SERVICE_TOKEN = "reflection-test-service-token-0123456789"  # noqa: S105 (test value)
SESSIONS = "ambient.v1.SessionService"
V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


def _config(store: SessionStore) -> ServerAuthConfig:
    return ServerAuthConfig.from_env(
        environ={API_TOKEN_ENV: SERVICE_TOKEN}, owner_lookup=store.owner_of
    )


def _discover(address: str) -> tuple[set[str], list[str]]:
    """What a reflection tool sees: the service list, and the methods of the
    session service resolved from the descriptors the server sends."""
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        pool = DescriptorPool(database)
        service = pool.FindServiceByName(SESSIONS)
        return services, sorted(m.name for m in service.methods)


def _list_services(address: str, method: str) -> list[str]:
    """One raw ``list_services`` exchange on ``method`` (v1 has no Python
    stub; its messages are the v1alpha ones under another package)."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = list(call(iter([request]), timeout=10))
    return [s.name for s in replies[0].list_services_response.service]


def _reflection_code(address: str, method: str) -> grpc.StatusCode:
    try:
        _list_services(address, method)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _session_call_code(address: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        stub = sessions_pb2_grpc.SessionServiceStub(channel)
        try:
            stub.CreateSession(sessions_pb2.CreateSessionRequest(name="x"), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _check_discovery(address: str) -> None:
    services, methods = _discover(address)
    assert {SESSIONS, "grpc.health.v1.Health"} <= services
    assert methods == [
        "CreateSession",
        "GetSession",
        "PushSessionMessage",
        "WatchSessionMessages",
    ]
    assert SESSIONS in _list_services(address, V1)
    # Reflection is open; the service it describes is not.
    assert _session_call_code(address) is grpc.StatusCode.UNAUTHENTICATED


def _check_off(address: str) -> None:
    assert _reflection_code(address, V1ALPHA) is grpc.StatusCode.UNIMPLEMENTED
    assert _reflection_code(address, V1) is grpc.StatusCode.UNIMPLEMENTED
    assert _session_call_code(address) is grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
def store() -> Iterator[SessionStore]:
    store = SessionStore(":memory:")
    yield store
    store.close()


def test_sync_server_serves_reflection_without_credentials(store: SessionStore) -> None:
    server = start_sync_session_server(store, _config(store))
    try:
        _check_discovery(f"127.0.0.1:{server.port}")
    finally:
        server.stop(None)


def test_sync_server_without_reflection(store: SessionStore) -> None:
    server = start_sync_session_server(store, _config(store), reflection=False)
    try:
        _check_off(f"127.0.0.1:{server.port}")
    finally:
        server.stop(None)


@pytest.mark.parametrize("reflection", [True, False])
async def test_aio_server_reflection(store: SessionStore, reflection: bool) -> None:
    server, port, _ = await start_aio_session_server(store, _config(store), reflection=reflection)
    try:
        # The blocking reflection client runs off the loop that serves it.
        check = _check_discovery if reflection else _check_off
        await asyncio.to_thread(check, f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


def test_cli_no_reflection_flag(tmp_path: Path) -> None:
    token_file = tmp_path / "service.token"
    token_file.write_text(SERVICE_TOKEN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ambient_grpc_auth", "session-server", "--no-reflection"]
        + ["--db", str(tmp_path / "s.db"), "--service-token-file", str(token_file)]
        + ["--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(60)
        assert lines, "session-server did not start"
        assert "listening on" in lines[0]
        _check_off(lines[0].split()[-1])
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
