"""Every mistake explained, nothing silent: the CLI as a new user meets it.

Real processes on loopback: a token server, session servers and runner
commands, each bounded in time.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cliproc import CLI, CliServer, clean_env, run_cli
from support.cp import KEY_FILES, master_keys_dir

SERVICE_TOKEN = "experience-service-token-0123456789"  # noqa: S105 (test value)


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("experience") / "keys"
    directory.mkdir()
    for name in KEY_FILES:
        shutil.copy(master_keys_dir() / name, directory / name)
        (directory / name).chmod(0o600)
    return directory


@pytest.fixture(scope="module")
def token_server(keys_dir: Path) -> Iterator[str]:
    server = CliServer(
        ["token-server", "--keys", str(keys_dir), "--listen", "127.0.0.1:0", "--ttl", "60"]
    )
    yield server.address
    server.stop()


@pytest.fixture(scope="module")
def service_token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("experience-token") / "service.token"
    path.write_text(SERVICE_TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def session_server(
    token_server: str, service_token_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    # The issuer URL alone: the keys are found through its discovery document.
    server = CliServer(
        [
            "session-server",
            "--db",
            str(tmp_path_factory.mktemp("experience-db") / "sessions.db"),
            "--listen",
            "127.0.0.1:0",
            "--trust",
            token_server,
            "--control-plane-issuer",
            token_server,
            "--service-token-file",
            str(service_token_file),
        ]
    )
    yield server.address
    server.stop()


def _service_env(address: str) -> dict[str, str]:
    return clean_env(AMBIENT_GRPC_URL=address, BOT_TOKEN=SERVICE_TOKEN)


def _runner_env(address: str, cp: str, keys_dir: Path, session_id: str) -> dict[str, str]:
    return clean_env(
        AMBIENT_GRPC_URL=address,
        AMBIENT_CP_TOKEN_URL=f"{cp}/token",
        AMBIENT_CP_TOKEN_PUBLIC_KEY=(keys_dir / "public.pem").read_text(),
        SESSION_ID=session_id,
    )


def _create_session(address: str) -> str:
    created = run_cli(["create-session", "--name", "experience"], _service_env(address))
    assert created.returncode == 0, created.stderr
    session_id: str = json.loads(created.stdout)["id"]
    return session_id


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class _Watch:
    """A ``watch`` process whose stderr lines are collected as they come."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*CLI, "watch", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._out: list[str] = []
        # One reader per pipe (communicate() would compete for stderr).
        self._readers = [
            threading.Thread(target=self._read_err, daemon=True),
            threading.Thread(target=self._read_out, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        self._out.append(self.proc.stdout.read())

    def finish(self, timeout: float = 60) -> tuple[int, str, list[str]]:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
        for reader in self._readers:
            reader.join(5)
        return self.proc.returncode, "".join(self._out), [text for _, text in self.lines]


# --------------------------------------------------------------- 1. port in use


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_session_server_refuses_a_port_in_use(
    mode: str, service_token_file: Path, tmp_path: Path
) -> None:
    flags = ["--aio"] if mode == "aio" else []
    base = ["session-server", *flags, "--service-token-file", str(service_token_file)]
    first = CliServer([*base, "--db", str(tmp_path / "a.db"), "--listen", "127.0.0.1:0"])
    try:
        second = run_cli([*base, "--db", str(tmp_path / "b.db"), "--listen", first.address])
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert lines == [
            f"ambient-grpc-auth session-server: error: cannot listen on {first.address}: "
            "address already in use (another server on that port?)"
        ], second.stderr
    finally:
        first.stop()


# --------------------------------------------------------------- 4. clean shutdown


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_sigterm_with_an_open_watch_is_clean(
    mode: str, service_token_file: Path, tmp_path: Path
) -> None:
    flags = ["--aio"] if mode == "aio" else []
    server = CliServer(
        [
            "session-server",
            *flags,
            "--db",
            str(tmp_path / "s.db"),
            "--listen",
            "127.0.0.1:0",
            "--service-token-file",
            str(service_token_file),
        ]
    )
    env = _service_env(server.address)
    watcher = None
    try:
        sid = _create_session(server.address)
        pushed = run_cli(["push", "--session", sid, "--event-type", "a", "--payload", "p"], env)
        assert pushed.returncode == 0, pushed.stderr
        watcher = subprocess.Popen(
            [*CLI, "watch", "--session", sid],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert watcher.stdout is not None
        assert watcher.stdout.readline().startswith("1\t")  # the watch is open
    finally:
        code, err = server.stop()
        if watcher is not None:
            watcher.kill()
            watcher.communicate(timeout=10)
    assert code == 0, err
    assert "Traceback" not in err, err
    assert "CancelledError" not in err, err


# --------------------------------------------------------------- 2. watch never hangs silently


def test_watch_on_a_wrong_port_says_so_at_once_and_times_out() -> None:
    env = clean_env(AMBIENT_GRPC_URL=f"127.0.0.1:{_free_port()}", BOT_TOKEN=SERVICE_TOKEN)
    started = time.monotonic()
    watch = _Watch(["--session", "session-12345678", "--timeout", "8"], env)
    code, _, lines = watch.finish()
    assert code == 1
    assert time.monotonic() - started < 25
    # Printed when it happened (well before the deadline), not at the end.
    first_at, first = watch.lines[0]
    assert first_at < 7, watch.lines
    assert first.startswith("ambient-grpc-auth watch: UNAVAILABLE: "), lines
    assert first.endswith("(retrying)")
    assert lines[-1].startswith("ambient-grpc-auth watch: error: DEADLINE_EXCEEDED: --timeout 8s")
    assert "last failure: UNAVAILABLE" in lines[-1]
    assert len(lines) <= 3, lines  # a changed failure is shown, a repeated one is not
    assert SERVICE_TOKEN not in "\n".join(lines)


def test_watch_without_control_plane_prints_the_cause(keys_dir: Path) -> None:
    env = _runner_env(
        f"127.0.0.1:{_free_port()}",
        f"http://127.0.0.1:{_free_port()}",
        keys_dir,
        "session-unreachable-1",
    )
    watch = _Watch(["--session", "session-unreachable-1", "--timeout", "8"], env)
    code, _, lines = watch.finish()
    assert code == 1
    first = lines[0]
    assert first.startswith(
        "ambient-grpc-auth watch: UNAVAILABLE: could not obtain an access token: "
    )
    assert "control-plane token request to http://127.0.0.1:" in first
    assert "connection refused" in first
    assert lines[-1].startswith("ambient-grpc-auth watch: error: DEADLINE_EXCEEDED")


def test_watch_gives_up_when_the_server_does_not_trust_the_issuer(
    keys_dir: Path, service_token_file: Path, tmp_path: Path
) -> None:
    # A control plane of its own, to count the tokens it issues.
    cp = CliServer(["token-server", "--keys", str(keys_dir), "--listen", "127.0.0.1:0"])
    token_server = cp.address
    # A session server that trusts no control plane at all.
    server = CliServer(
        [
            "session-server",
            "--db",
            str(tmp_path / "u.db"),
            "--listen",
            "127.0.0.1:0",
            "--service-token-file",
            str(service_token_file),
        ]
    )
    try:
        sid = _create_session(server.address)
        env = _runner_env(server.address, token_server, keys_dir, sid)
        started = time.monotonic()
        watch = _Watch(["--session", sid], env)  # no --timeout: it must end by itself
        code, _, lines = watch.finish(timeout=60)
        assert code == 1
        assert time.monotonic() - started < 30
        assert lines[0] == (
            "ambient-grpc-auth watch: UNAUTHENTICATED: missing or invalid credentials (retrying)"
        ) or lines[0].startswith("ambient-grpc-auth watch: UNAUTHENTICATED"), lines
        last = lines[-1]
        assert last.startswith("ambient-grpc-auth watch: error: UNAUTHENTICATED 3 times in a row")
        assert f"issuer {token_server!r}" in last
        assert "--trust" in last
        assert "eyJ" not in "\n".join(lines)
    finally:
        server.stop()
        _, cp_log = cp.stop()
    # Not one token per retry for ever: a handful, then the watch stops.
    assert 3 <= cp_log.count("issued token for session") <= 5, cp_log


def test_watch_permission_denied_ends_with_the_reason(
    session_server: str, token_server: str, keys_dir: Path
) -> None:
    mine, other = _create_session(session_server), _create_session(session_server)
    env = _runner_env(session_server, token_server, keys_dir, mine)
    watch = _Watch(["--session", other, "--timeout", "30"], env)
    code, _, lines = watch.finish()
    assert code == 1
    assert lines == [
        f"ambient-grpc-auth watch: error: PERMISSION_DENIED: permission denied "
        f"(the token is scoped to session {mine!r}, not {other!r}: SESSION_ID must be "
        "the session you push to or watch)"
    ] or (len(lines) == 1 and f"scoped to session {mine!r}, not {other!r}" in lines[0]), lines


def test_watch_count_zero_is_refused() -> None:
    result = run_cli(["watch", "--session", "session-12345678", "--count", "0"])
    assert result.returncode == 2
    assert "leave --count out to watch until interrupted" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 2


# --------------------------------------------------------------- 3, 5. causes and hints


def test_token_failure_cause_reaches_push_and_create_session(
    session_server: str, token_server: str, keys_dir: Path
) -> None:
    sid = _create_session(session_server)
    env = _runner_env(session_server, token_server, keys_dir, sid)
    env["AMBIENT_CP_TOKEN_URL"] = f"{token_server}/no-such-endpoint"
    for args in (
        ["push", "--session", sid, "--event-type", "a", "--payload", "b"],
        ["create-session", "--name", "x"],
    ):
        result = run_cli(args, env)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "could not obtain an access token: " in lines[0]
        assert f"{token_server}/no-such-endpoint" in lines[0]
        assert "HTTP 404" in lines[0]


def test_push_explains_not_found_and_scope(
    session_server: str, token_server: str, keys_dir: Path
) -> None:
    mine, other = _create_session(session_server), _create_session(session_server)
    env = _runner_env(session_server, token_server, keys_dir, mine)
    argv = ["--event-type", "a", "--payload", "b"]

    ok = run_cli(["push", "--session", mine, *argv], env)
    assert ok.returncode == 0, ok.stderr
    hop = run_cli(["push", "--session", other, *argv], env)
    assert hop.returncode == 1
    assert f"the token is scoped to session {mine!r}, not {other!r}" in hop.stderr
    missing = run_cli(
        ["push", "--session", "no-such-session-1", *argv], _service_env(session_server)
    )
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr
    assert "does not exist on this server" in missing.stderr
    assert "create-session" in missing.stderr


# --------------------------------------------------------------- 6. session-id rule


def test_session_id_rule_is_checked_before_any_network_call(keys_dir: Path) -> None:
    env = _runner_env(f"127.0.0.1:{_free_port()}", "http://127.0.0.1:1", keys_dir, "abc")
    started = time.monotonic()
    result = run_cli(["fetch-token"], env)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "ambient-grpc-auth fetch-token: error: SESSION_ID is too short (3 characters); "
        "a session id has 8 to 256 printable characters, no whitespace"
    )
    assert time.monotonic() - started < 10
    bad = run_cli(["push", "--session", "has space!", "--event-type", "a", "--payload", "b"])
    assert bad.returncode == 2
    assert "--session contains whitespace" in bad.stderr
    help_text = run_cli(["push", "--help"]).stdout
    assert "8 to 256 printable characters, no" in help_text


# --------------------------------------------------------------- 7. --trust


@pytest.mark.parametrize(
    ("trust", "expected"),
    [
        (
            "http://127.0.0.1:8080/.well-known/jwks.json=http://127.0.0.1:8080",
            "looks like a key source, not an issuer",
        ),
        ("https://cp.example=ftp://cp.example/keys.json", "scheme must be http or https"),
        ("https://cp.example=/no/such/file.pem", "no such file"),
        ("just-a-name", "only an issuer URL may stand alone"),
        ("has space=/etc/hostname", "neither an http(s) URL nor a plain name"),
    ],
)
def test_trust_mistakes_are_caught_at_start(trust: str, expected: str) -> None:
    result = run_cli(["session-server", "--db", ":memory:", "--trust", trust])
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 2


def test_trust_issuer_alone_without_discovery_fails_clearly() -> None:
    issuer = f"http://127.0.0.1:{_free_port()}"
    result = run_cli(
        ["session-server", "--db", ":memory:", "--listen", "127.0.0.1:0", "--trust", issuer]
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith(
        f"ambient-grpc-auth session-server: error: cannot fetch the discovery document of {issuer}"
    )


def test_trust_issuer_alone_uses_discovery(
    session_server: str, token_server: str, keys_dir: Path
) -> None:
    # session_server trusts `token_server` by its URL alone: a runner token works.
    sid = _create_session(session_server)
    env = _runner_env(session_server, token_server, keys_dir, sid)
    pushed = run_cli(["push", "--session", sid, "--event-type", "a", "--payload", "b"], env)
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["seq"] == 1


# --------------------------------------------------------------- 9. the CLI itself


def test_version_and_grouped_help() -> None:
    version = run_cli(["--version"])
    assert version.returncode == 0
    assert version.stdout.startswith("ambient-grpc-auth ")
    top = run_cli(["--help"]).stdout
    for title in ("control plane:", "API server:", "runner (", "tools:"):
        assert title in top
    session_help = run_cli(["session-server", "--help"]).stdout
    assert "examples:" in session_help
    assert "AMBIENT_API_TOKEN" in session_help
    assert "(default: 127.0.0.1:9000)" in session_help
    push_help = run_cli(["push", "--help"]).stdout
    assert "AMBIENT_CP_TOKEN_URL" in push_help
    assert "(default: 10.0)" in push_help


def test_log_level_after_the_command_and_validated() -> None:
    after = run_cli(["fetch-token", "--log-level", "debug"], clean_env())
    assert after.returncode == 1  # no token source configured, but the flag is accepted
    assert "no token source configured" in after.stderr
    bad = run_cli(["fetch-token", "--log-level", "loud"])
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 2
    assert "expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in lines[0]


def test_plaintext_refusal_names_the_cli_switch() -> None:
    env = clean_env(AMBIENT_GRPC_URL="api.example.com:9000", BOT_TOKEN=SERVICE_TOKEN)
    result = run_cli(
        ["push", "--session", "session-12345678", "--event-type", "a", "--payload", "b"], env
    )
    assert result.returncode == 1
    assert "--allow-insecure-remote" in result.stderr
    assert "AMBIENT_GRPC_USE_TLS=true" in result.stderr
    assert "allow_insecure_remote=True" not in result.stderr
