"""Plumbing of the benchmark: child processes, CPU metering, interleaving
order and latency statistics. Not part of the library's API."""

from __future__ import annotations

import contextlib
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = ["ChildProcess", "CpuMeter", "child_env", "latency_stats", "rotated"]

T = TypeVar("T")


def rotated(items: Sequence[T], shift: int) -> list[T]:
    """``items`` rotated left by ``shift`` (the interleaving order)."""
    if not items:
        return []
    k = shift % len(items)
    return [*items[k:], *items[:k]]


def latency_stats(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99 in microseconds."""
    ordered = sorted(samples_ns)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] / 1000.0

    return {
        "p50_us": statistics.median(ordered) / 1000.0,
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "n": float(len(ordered)),
    }


# --- child processes ------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment for ``_bench_child`` processes: this package importable
    whatever the working directory."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


class ChildProcess:
    """A ``_bench_child`` process spoken to in JSON lines. ``close()`` ends it
    (stdin EOF, then a bounded wait, then a kill of that process only)."""

    def __init__(self, *args: str) -> None:
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.child", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=child_env(),
        )
        self.name = " ".join(args)

    def request(self, doc: Mapping[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        """Send one line, return the answer line (RuntimeError if the child
        dies or does not answer within ``timeout`` seconds)."""
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(doc) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"bench child {self.name!r} did not answer: {self._stderr_tail()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def cpu(self) -> float:
        """The child's CPU seconds so far (``serve`` children only)."""
        return float(self.request({"cmd": "cpu"})["cpu"])

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-2000:].decode("utf-8", "replace").strip() or "(no output)"

    def close(self, timeout: float = 15.0) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5.0)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()


class CpuMeter:
    """Accumulates, per variant, the CPU seconds spent by this process (the
    client side) and by a server child during measured batches. CPU time is
    far less disturbed by other processes than wall time, so it shows what
    each side of a call costs even on a busy machine."""

    def __init__(self, server: ChildProcess | None) -> None:
        self._server = server
        self.client: dict[str, float] = {}
        self.server: dict[str, float] = {}
        self.units: dict[str, int] = {}

    @staticmethod
    def _own() -> float:
        return time.process_time()  # all threads, nanosecond resolution

    def begin(self) -> tuple[float, float]:
        return self._own(), self._server.cpu() if self._server is not None else 0.0

    def end(self, name: str, start: tuple[float, float], units: int) -> None:
        client = self._own() - start[0]
        server = (self._server.cpu() - start[1]) if self._server is not None else 0.0
        self.client[name] = self.client.get(name, 0.0) + client
        self.server[name] = self.server.get(name, 0.0) + server
        self.units[name] = self.units.get(name, 0) + units

    def per_unit_us(self) -> dict[str, dict[str, float]]:
        """``{variant: {"client_us": ..., "server_us": ...}}`` per call or message."""
        return {
            name: {
                "client_us": self.client[name] / units * 1e6,
                "server_us": self.server[name] / units * 1e6,
            }
            for name, units in self.units.items()
            if units
        }
