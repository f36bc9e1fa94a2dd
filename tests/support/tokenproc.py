"""Real ``ambient-grpc-auth token-server`` processes whose whole stderr a test reads.

stderr goes to a file, so that a test can read everything a process logged.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType

CLI = [sys.executable, "-m", "ambient_grpc_auth"]

# Lowers RLIMIT_NOFILE to argv[1], then execs argv[2:]. The limit is set in
# the new program rather than by ``preexec_fn``: a fork of a process with live
# gRPC threads runs gRPC's fork handlers, which restart a poller in the child;
# subprocess then closes that poller's descriptor and the child aborts before
# it reaches exec.
_WITH_NOFILE = [
    sys.executable,
    "-c",
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])",
]


def run_cli(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run one CLI command to completion (``timeout`` seconds at most)."""
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, check=False)


class TokenServerProcess:
    """``ambient-grpc-auth token-server --keys KEYS --listen 127.0.0.1:0 ARGS...``.

    ``nofile`` lowers the process's RLIMIT_NOFILE before it starts. Waits
    (``timeout`` seconds at most) for its "listening on" line.
    """

    def __init__(
        self,
        keys: Path,
        *args: str,
        stderr_path: Path,
        nofile: int | None = None,
        log_level: str = "INFO",
        timeout: float = 60,
    ) -> None:
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")

        limit = [] if nofile is None else [*_WITH_NOFILE, str(nofile)]
        self.proc = subprocess.Popen(
            [
                *limit,
                *CLI,
                "--log-level",
                log_level,
                "token-server",
                "--keys",
                str(keys),
                "--listen",
                "127.0.0.1:0",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not line or "listening on" not in line[0]:
            self.stop()
            raise AssertionError(f"token server did not start: {self.stderr()[-2000:]}")
        self.url = line[0].strip().rsplit(" ", 1)[1]
        self.port = int(self.url.rsplit(":", 1)[1])

    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        return self.stderr_path.read_bytes().decode("utf-8", "replace")

    def stop(self) -> int:
        """SIGTERM, then wait (SIGKILL after 20 s); returns the exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(timeout=10)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._stderr.close()

    def __enter__(self) -> TokenServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
