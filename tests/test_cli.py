"""The command line, driven as real processes on loopback.

``keygen`` -> ``token-server`` -> ``session-server`` -> ``create-session`` /
``push`` / ``watch`` configured only through the runner environment
contract, including a session-server restart under a live ``watch``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cliproc import CLI, CliServer, run_cli

SERVICE_TOKEN = "cli-test-service-token-0123456789"  # noqa: S105 (test value)


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "keys"
    result = run_cli(["keygen", "--dir", str(directory)])
    assert result.returncode == 0, result.stderr
    assert "signing key" in result.stdout
    for name in ("private.pem", "public.pem", "signing.pem"):
        assert (directory / name).stat().st_mode & 0o077 == 0
    return directory


@pytest.fixture(scope="module")
def token_server(keys_dir: Path) -> Iterator[CliServer]:
    server = CliServer(
        ["token-server", "--keys", str(keys_dir), "--listen", "127.0.0.1:0", "--ttl", "60"]
    )
    yield server
    assert server.stop()[0] == 0


def test_keygen_is_idempotent_and_prints_secret(keys_dir: Path) -> None:
    before = (keys_dir / "private.pem").read_bytes()
    again = run_cli(["keygen", "--dir", str(keys_dir), "--k8s-secret", "--namespace", "ambient"])
    assert again.returncode == 0, again.stderr
    assert (keys_dir / "private.pem").read_bytes() == before
    assert "name: ambient-cp-token-keypair" in again.stdout
    assert "namespace: ambient" in again.stdout
    for key in ("private.pem:", "public.pem:", "signing.pem:"):
        assert key in again.stdout


def test_push_and_watch_across_session_server_restart(
    keys_dir: Path, token_server: CliServer, tmp_path: Path
) -> None:
    cp_url = token_server.address
    token_file = tmp_path / "service.token"
    token_file.write_text(SERVICE_TOKEN + "\n")
    db = tmp_path / "sessions.db"
    server_args = [
        "session-server",
        "--db",
        str(db),
        "--trust",
        f"{cp_url}={cp_url}/.well-known/jwks.json",
        "--control-plane-issuer",
        cp_url,
        "--service-token-file",
        str(token_file),
    ]
    server = CliServer([*server_args, "--listen", "127.0.0.1:0"])
    address = server.address
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AMBIENT_", "BOT_", "SESSION_"))
    }
    base_env["AMBIENT_GRPC_URL"] = address
    try:
        created = run_cli(
            ["create-session", "--name", "cli"], {**base_env, "BOT_TOKEN": SERVICE_TOKEN}
        )
        assert created.returncode == 0, created.stderr
        session_id = json.loads(created.stdout)["id"]

        runner_env = {
            **base_env,
            "AMBIENT_CP_TOKEN_URL": f"{cp_url}/token",
            "AMBIENT_CP_TOKEN_PUBLIC_KEY": (keys_dir / "public.pem").read_text(),
            "SESSION_ID": session_id,
        }
        token = run_cli(["fetch-token", "--json"], runner_env)
        assert token.returncode == 0, token.stderr
        info = json.loads(token.stdout)
        assert info["session_scope"] == session_id
        assert info["issuer"] == cp_url
        # The token itself is never printed.
        assert "eyJ" not in token.stdout

        def push(payload: str) -> subprocess.CompletedProcess[str]:
            argv = ["push", "--session", session_id, "--event-type", "assistant"]
            return run_cli([*argv, "--payload", payload], runner_env)

        watcher = subprocess.Popen(
            [*CLI, "watch", "--session", session_id, "--count", "6", "--json"],
            env=runner_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3):
            pushed = push(f"m{i}")
            assert pushed.returncode == 0, pushed.stderr
            assert json.loads(pushed.stdout)["seq"] == i + 1

        assert server.stop()[0] == 0  # SIGTERM: graceful, exit 0
        server = CliServer([*server_args, "--listen", address])
        for i in range(3, 6):
            pushed = push(f"m{i}")
            assert pushed.returncode == 0, pushed.stderr

        out, err = watcher.communicate(timeout=60)
        assert watcher.returncode == 0, err
        messages = [json.loads(line) for line in out.splitlines()]
        assert [m["seq"] for m in messages] == [1, 2, 3, 4, 5, 6]
        assert [m["payload"] for m in messages] == [f"m{i}" for i in range(6)]
        assert all(set(m) >= {"seq", "event_type", "payload", "created_at"} for m in messages)

        # A runner may not push into a session it was not issued a token for.
        other = run_cli(
            ["create-session", "--name", "other"], {**base_env, "BOT_TOKEN": SERVICE_TOKEN}
        )
        other_id = json.loads(other.stdout)["id"]
        hop = run_cli(
            ["push", "--session", other_id, "--event-type", "a", "--payload", "b"], runner_env
        )
        assert hop.returncode == 1
        assert hop.stderr.strip().count("\n") == 0
        assert "PERMISSION_DENIED" in hop.stderr

        # No token at all: UNAUTHENTICATED, one line, exit 1.
        anon = run_cli(
            ["push", "--session", session_id, "--event-type", "a", "--payload", "b"],
            {**base_env, "BOT_TOKEN": "not-a-valid-token"},
        )
        assert anon.returncode == 1
        assert "UNAUTHENTICATED" in anon.stderr
        assert "not-a-valid-token" not in anon.stderr
    finally:
        server.stop()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["no-such-command"],
        ["push", "--event-type", "a", "--payload", "b"],
        ["watch", "--session", "s", "--count", "-1"],
        ["token-server", "--keys", "k", "--listen", "nonsense"],
        ["session-server", "--db", "x", "--trust", "no-equals-sign"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = run_cli(args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_every_subcommand_has_help() -> None:
    for command in (
        "keygen",
        "token-server",
        "session-server",
        "create-session",
        "push",
        "watch",
        "fetch-token",
    ):
        result = run_cli([command, "--help"])
        assert result.returncode == 0, command
        assert "usage:" in result.stdout


def test_unreachable_token_endpoint_is_one_clear_line(keys_dir: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "AMBIENT_GRPC_URL": "127.0.0.1:1",
        "AMBIENT_CP_TOKEN_URL": "http://127.0.0.1:1/token",
        "AMBIENT_CP_TOKEN_PUBLIC_KEY": (keys_dir / "public.pem").read_text(),
        "SESSION_ID": "session-unreachable-1",
    }
    started = time.monotonic()
    result = run_cli(["fetch-token"], env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ambient-grpc-auth fetch-token: error:")
    assert time.monotonic() - started < 45


def test_unreachable_session_server_is_one_clear_line() -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "AMBIENT_GRPC_URL": "127.0.0.1:1",
        "BOT_TOKEN": SERVICE_TOKEN,
    }
    result = run_cli(
        [
            "push",
            "--session",
            "s-12345678",
            "--event-type",
            "a",
            "--payload",
            "b",
            "--timeout",
            "2",
        ],
        env,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "UNAVAILABLE" in lines[0] or "DEADLINE_EXCEEDED" in lines[0]
    assert SERVICE_TOKEN not in result.stderr


def test_missing_keys_without_generation_fails_cleanly(tmp_path: Path) -> None:
    result = run_cli(
        [
            "token-server",
            "--keys",
            str(tmp_path / "absent"),
            "--no-generate",
            "--listen",
            "127.0.0.1:0",
        ]
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("ambient-grpc-auth token-server: error:")


def test_aio_session_server_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    token_file = tmp_path / "service.token"
    token_file.write_text(SERVICE_TOKEN)
    server = CliServer(
        [
            "session-server",
            "--aio",
            "--db",
            str(tmp_path / "aio.db"),
            "--service-token-file",
            str(token_file),
            "--listen",
            "127.0.0.1:0",
        ]
    )
    try:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "AMBIENT_GRPC_URL": server.address,
            "BOT_TOKEN": SERVICE_TOKEN,
        }
        created = run_cli(["create-session", "--name", "aio"], env)
        assert created.returncode == 0, created.stderr
        sid = json.loads(created.stdout)["id"]
        pushed = run_cli(["push", "--session", sid, "--event-type", "a", "--payload", "b"], env)
        assert pushed.returncode == 0, pushed.stderr
        watched = run_cli(["watch", "--session", sid, "--count", "1", "--json"], env)
        assert json.loads(watched.stdout)["payload"] == "b"
    finally:
        assert server.stop()[0] == 0
