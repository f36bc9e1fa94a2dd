"""The ``ambient-grpc-auth`` command as real processes: one-shot runs and servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

CLI = [sys.executable, "-m", "ambient_grpc_auth"]


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any runner/server settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AMBIENT_", "BOT_", "SESSION_", "GRPC_", "RESUME_"))
    }
    env.update(extra)
    return env


def run_cli(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        CLI + args,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class CliServer:
    """A CLI server process; waits (bounded) for its 'listening on' line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            CLI + args,
            env=clean_env() if env is None else env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self._first_line(timeout=60)
        assert "listening on" in line, line
        self.address = line.rsplit(" ", 1)[1]

    def _first_line(self, timeout: float) -> str:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"server did not start: {err[-2000:]}")
        return result[0].strip()

    def stop(self) -> tuple[int, str]:
        """SIGTERM, wait (bounded); returns (exit code, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
        return self.proc.returncode, err
