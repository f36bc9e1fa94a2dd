"""Channel factory: target parsing, plaintext policy, from_env, TLS (real handshakes)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.client import CountingSource, EchoServer, start_echo_server
from support.tls import self_signed

from ambient_grpc_auth import aio as aio_client
from ambient_grpc_auth.client.channel import create_channel, create_channel_from_env
from ambient_grpc_auth.client.target import (
    DEFAULT_TARGET,
    ChannelConfig,
    Locality,
    check_target,
    parse_target,
)
from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc

L = Locality
R = echo_pb2.EchoRequest


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "hosts", "port", "locality"),
    [
        ("ambient-api-server:9000", ("ambient-api-server",), 9000, L.CLUSTER),
        ("ambient-api-server", ("ambient-api-server",), None, L.CLUSTER),
        ("localhost:50051", ("localhost",), 50051, L.LOOPBACK),
        ("LOCALHOST.:1", ("LOCALHOST.",), 1, L.LOOPBACK),
        ("127.0.0.1:1", ("127.0.0.1",), 1, L.LOOPBACK),
        ("127.8.9.10:65535", ("127.8.9.10",), 65535, L.LOOPBACK),
        ("[::1]:443", ("::1",), 443, L.LOOPBACK),
        ("::1", ("::1",), None, L.LOOPBACK),
        ("[::ffff:127.0.0.1]:5", ("::ffff:127.0.0.1",), 5, L.LOOPBACK),
        ("[::ffff:10.0.0.1]:5", ("::ffff:10.0.0.1",), 5, L.REMOTE),
        ("dns:///api.ns.svc:9000", ("api.ns.svc",), 9000, L.CLUSTER),
        ("dns://8.8.8.8/api.example.com:443", ("api.example.com",), 443, L.REMOTE),
        # A named DNS server decides where a name points: never local.
        ("dns://8.8.8.8/api.ns.svc:9000", ("api.ns.svc",), 9000, L.REMOTE),
        ("dns://10.96.0.10:53/ambient-api-server:9000", ("ambient-api-server",), 9000, L.REMOTE),
        ("dns://127.0.0.1/localhost:1", ("localhost",), 1, L.REMOTE),
        ("dns:///ambient-api-server:9000", ("ambient-api-server",), 9000, L.CLUSTER),
        ("dns:///127.0.0.1:1", ("127.0.0.1",), 1, L.LOOPBACK),
        ("DNS:localhost:1", ("localhost",), 1, L.LOOPBACK),
        ("api.ns.svc.cluster.local:9000", ("api.ns.svc.cluster.local",), 9000, L.CLUSTER),
        ("API.NS.SVC:1", ("API.NS.SVC",), 1, L.CLUSTER),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", ("127.0.0.1", "127.0.0.2"), None, L.LOOPBACK),
        ("ipv4:127.0.0.1:7,10.0.0.1:7", ("127.0.0.1", "10.0.0.1"), 7, L.REMOTE),
        ("ipv6:[::1]:5", ("::1",), 5, L.LOOPBACK),
        ("unix:/run/api.sock", (), None, L.LOOPBACK),
        ("unix-abstract:api", (), None, L.LOOPBACK),
        ("xds:///api", (), None, L.REMOTE),
        ("api.example.com", ("api.example.com",), None, L.REMOTE),
        ("10.0.0.5:9000", ("10.0.0.5",), 9000, L.REMOTE),
        ("0.0.0.0:1", ("0.0.0.0",), 1, L.REMOTE),
        # Numeric short names are IP addresses to the system resolver.
        ("167772161:80", ("167772161",), 80, L.REMOTE),
        ("0x7f000001:1", ("0x7f000001",), 1, L.REMOTE),
        ("my.svc.example.com:1", ("my.svc.example.com",), 1, L.REMOTE),
        ("api.cluster.local.evil.com:1", ("api.cluster.local.evil.com",), 1, L.REMOTE),
        # Not an RFC 1123 name, so not a Kubernetes service.
        ("my_api.ns.svc:1", ("my_api.ns.svc",), 1, L.REMOTE),
        ("  localhost:1  ", ("localhost",), 1, L.LOOPBACK),
    ],
)
def test_parse_target(
    target: str, hosts: tuple[str, ...], port: int | None, locality: Locality
) -> None:
    parsed = parse_target(target)
    assert (parsed.hosts, parsed.port, parsed.locality) == (hosts, port, locality)
    assert parsed.target == target.strip()


@pytest.mark.parametrize(
    "target",
    [
        "",
        "   ",
        "host:0",
        "host:65536",
        "host:abc",
        "host:",
        "host:٣",
        ":80",
        "[::1",
        "[::1]x",
        "[notip]:1",
        "http://api:80",
        "https://api.example.com",
        "ho st:1",
        "héllo:1",
        "a\nb:1",
        "1:2:3:zz",
        "ipv4:::1:5",
        "ipv6:127.0.0.1:5",
        "dns://8.8.8.8",
        "bad_label!:1",
        "x" * 2000,
        "a..b:1",
    ],
)
def test_parse_target_rejects(target: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_target(target)


def test_parse_target_rejects_non_strings() -> None:
    with pytest.raises(ConfigurationError):
        parse_target(None)  # type: ignore[arg-type]


# --- plaintext policy ------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "api.example.com:443",
        "10.1.2.3:9000",
        "xds:///api",
        "ipv4:127.0.0.1:1,8.8.8.8:1",
        "dns://8.8.8.8/api.ns.svc:9000",
    ],
)
def test_plaintext_to_remote_hosts_is_refused(target: str) -> None:
    with pytest.raises(ConfigurationError, match="plaintext") as err:
        check_target(target, tls=False)
    assert "allow_insecure_remote" in str(err.value)
    assert check_target(target, tls=True).locality is L.REMOTE
    assert check_target(target, tls=False, allow_insecure_remote=True).locality is L.REMOTE


@pytest.mark.parametrize(
    "target",
    ["localhost:1", "127.0.0.1:1", "[::1]:1", "ambient-api-server:9000", "api.ns.svc:1", "unix:/s"],
)
def test_plaintext_to_local_hosts_is_allowed(target: str) -> None:
    assert check_target(target, tls=False).locality.plaintext_allowed


def test_create_channel_refuses_before_connecting() -> None:
    with pytest.raises(ConfigurationError, match="plaintext"):
        create_channel("api.example.com:443", CountingSource(), tls=False)
    with pytest.raises(ConfigurationError, match="root_certificates"):
        create_channel("localhost:1", CountingSource(), tls=False, root_certificates=b"pem")
    with pytest.raises(ConfigurationError):
        create_channel("http://localhost:1", CountingSource(), tls=False)


def test_allow_insecure_remote_creates_the_channel() -> None:
    channel = create_channel(
        "api.example.com:443", CountingSource(), tls=False, allow_insecure_remote=True
    )
    channel.close()


# --- from_env -------------------------------------------------------------------------------------


def test_from_env_defaults(tmp_path: Path) -> None:
    config = ChannelConfig.from_env({}, service_ca_file=str(tmp_path / "none"))
    assert config == ChannelConfig(target=DEFAULT_TARGET, tls=False)
    assert config.target == "ambient-api-server:9000"
    assert config.root_certificates() is None


@pytest.mark.parametrize(
    ("raw", "tls"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        (" Yes ", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("OFF", False),
        ("", False),
    ],
)
def test_from_env_use_tls(raw: str, tls: bool, tmp_path: Path) -> None:
    env = {"AMBIENT_GRPC_USE_TLS": raw, "AMBIENT_GRPC_URL": "api.example.com:443"}
    if tls:
        config = ChannelConfig.from_env(env, service_ca_file=str(tmp_path / "none"))
        assert config.tls
    else:
        with pytest.raises(ConfigurationError, match="plaintext"):
            ChannelConfig.from_env(env)


@pytest.mark.parametrize("raw", ["maybe", "ture", "2", "enabled"])
def test_from_env_rejects_unclear_tls_values(raw: str) -> None:
    with pytest.raises(ConfigurationError, match="AMBIENT_GRPC_USE_TLS"):
        ChannelConfig.from_env({"AMBIENT_GRPC_USE_TLS": raw})


def test_from_env_url_and_policy() -> None:
    assert ChannelConfig.from_env({"AMBIENT_GRPC_URL": " 127.0.0.1:7 "}).target == "127.0.0.1:7"
    assert ChannelConfig.from_env({"AMBIENT_GRPC_URL": "  "}).target == DEFAULT_TARGET
    env = {"AMBIENT_GRPC_URL": "api.example.com:443"}
    with pytest.raises(ConfigurationError, match="plaintext"):
        ChannelConfig.from_env(env)
    assert ChannelConfig.from_env(env, allow_insecure_remote=True).allow_insecure_remote
    with pytest.raises(ConfigurationError, match="invalid gRPC target"):
        ChannelConfig.from_env({"AMBIENT_GRPC_URL": "api:99999"})


def test_from_env_ca_file_and_service_ca_fallback(tmp_path: Path) -> None:
    service_ca = tmp_path / "service-ca.crt"
    explicit = tmp_path / "explicit.pem"
    tls = {"AMBIENT_GRPC_USE_TLS": "true"}
    # No file anywhere: system roots.
    assert ChannelConfig.from_env(tls, service_ca_file=str(service_ca)).ca_cert_file is None
    service_ca.write_text("x")
    assert ChannelConfig.from_env(tls, service_ca_file=str(service_ca)).ca_cert_file == str(
        service_ca
    )
    env = {**tls, "AMBIENT_GRPC_CA_CERT_FILE": str(explicit)}
    assert ChannelConfig.from_env(env, service_ca_file=str(service_ca)).ca_cert_file == str(
        explicit
    )
    # Without TLS the CA settings are not used.
    plain = {"AMBIENT_GRPC_CA_CERT_FILE": str(explicit)}
    assert ChannelConfig.from_env(plain, service_ca_file=str(service_ca)).ca_cert_file is None


def test_ca_file_problems_are_configuration_errors(tmp_path: Path) -> None:
    missing = ChannelConfig(target="localhost:1", tls=True, ca_cert_file=str(tmp_path / "nope"))
    with pytest.raises(ConfigurationError, match="cannot read"):
        missing.root_certificates()
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(ConfigurationError, match="no PEM certificate"):
        ChannelConfig(target="localhost:1", tls=True, ca_cert_file=str(not_pem)).root_certificates()
    huge = tmp_path / "huge.pem"
    huge.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + b"A" * (1024 * 1024 + 10))
    with pytest.raises(ConfigurationError, match="larger"):
        ChannelConfig(target="localhost:1", tls=True, ca_cert_file=str(huge)).root_certificates()
    with pytest.raises(ConfigurationError, match="only used with tls"):
        ChannelConfig(target="localhost:1", ca_cert_file=str(not_pem))


def test_from_env_channel_end_to_end() -> None:
    server = start_echo_server()
    env = {"AMBIENT_GRPC_URL": server.target, "BOT_TOKEN": "bot-token-value"}
    channel = create_channel_from_env(environ=env)
    try:
        reply = echo_pb2_grpc.EchoServiceStub(channel).Echo(R(text="env"))
        assert reply.caller == "Bearer bot-token-value"
    finally:
        channel.close()
        server.stop()


def test_from_env_without_any_token_source_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        create_channel_from_env(environ={"AMBIENT_GRPC_URL": "localhost:1"})


async def test_aio_from_env_channel_end_to_end() -> None:
    server = start_echo_server()
    env = {"AMBIENT_GRPC_URL": server.target, "BOT_TOKEN": "bot-token-aio"}
    channel = aio_client.create_channel_from_env(environ=env)
    try:
        reply = await echo_pb2_grpc.EchoServiceStub(channel).Echo(R(text="env"))
        assert reply.caller == "Bearer bot-token-aio"
    finally:
        await channel.close()
        server.stop()


# --- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_material() -> tuple[bytes, bytes]:
    return self_signed()


@pytest.fixture
def tls_server(tls_material: tuple[bytes, bytes]) -> Iterator[EchoServer]:
    key_pem, cert_pem = tls_material
    srv = start_echo_server(credentials=grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    yield srv
    srv.stop()


def _echo(channel: Any) -> str:
    return str(echo_pb2_grpc.EchoServiceStub(channel).Echo(R(text="tls"), timeout=10).caller)


def test_tls_channel_with_a_ca_file_from_env(
    tls_server: EchoServer, tls_material: tuple[bytes, bytes], tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(tls_material[1])
    env = {
        "AMBIENT_GRPC_URL": f"localhost:{tls_server.port}",
        "AMBIENT_GRPC_USE_TLS": "true",
        "AMBIENT_GRPC_CA_CERT_FILE": str(ca),
        "BOT_TOKEN": "tls-bot",
    }
    channel = create_channel_from_env(environ=env)
    try:
        assert _echo(channel) == "Bearer tls-bot"
    finally:
        channel.close()


def test_tls_verifies_the_server(tls_server: EchoServer) -> None:
    _, other_ca = self_signed()
    channel = create_channel(
        f"localhost:{tls_server.port}", CountingSource(), tls=True, root_certificates=other_ca
    )
    try:
        with pytest.raises(grpc.RpcError) as err:
            _echo(channel)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert tls_server.auth.seen == []  # the token never left the client
    finally:
        channel.close()


async def test_aio_tls_channel(tls_server: EchoServer, tls_material: tuple[bytes, bytes]) -> None:
    channel = aio_client.create_channel(
        f"localhost:{tls_server.port}",
        CountingSource(),
        tls=True,
        root_certificates=tls_material[1],
    )
    try:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        reply = await asyncio.wait_for(stub.Echo(R(text="tls")), 10)
        assert reply.caller == "Bearer tok-1"
    finally:
        await channel.close()


def test_process_exits_with_a_channel_left_open() -> None:
    """gRPC deadlocks interpreter exit when a subscribed channel is never
    closed; the channel closes itself at exit instead."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import grpc
        from ambient_grpc_auth.client.channel import create_channel
        from ambient_grpc_auth.client.tokens import StaticTokenSource
        channel = create_channel("127.0.0.1:1", StaticTokenSource("t"), tls=False)
        try:
            channel.unary_unary("/x.Y/Z")(b"", timeout=0.2)
        except grpc.RpcError as err:
            print(err.code().name)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}


@pytest.mark.parametrize(
    ("target", "tls", "expected"),
    [
        ("localhost", False, "localhost:9000"),
        ("ambient-api-server", False, "ambient-api-server:9000"),
        ("::1", False, "[::1]:9000"),
        ("[::1]", False, "[::1]:9000"),
        ("dns:///localhost", False, "dns:///localhost:9000"),
        ("api.example.com", True, "api.example.com:9000"),
        ("localhost:5", False, "localhost:5"),
        ("unix:/run/api.sock", False, "unix:/run/api.sock"),
    ],
)
def test_target_without_port_gets_the_default_port(target: str, tls: bool, expected: str) -> None:
    # gRPC would use 443, also for plaintext.
    assert check_target(target, tls=tls).target == expected


def test_a_token_string_is_refused_at_once() -> None:
    for factory in (create_channel, aio_client.create_channel):
        with pytest.raises(TypeError, match="StaticTokenSource") as info:
            factory("localhost:9000", "mytoken", tls=False)  # type: ignore[arg-type]
        assert "mytoken" not in str(info.value)
