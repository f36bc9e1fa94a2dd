"""Instructions per unary call, side by side, counted by valgrind's callgrind.

    python -m bench.instructions [--calls N] [--mode sync|aio|both] [--side client|server|both]
                                 [--out FILE] [--keep DIR]

Wall and CPU times on a shared machine drift by several percent from one
second to the next; instruction counts do not. This profiles one side of a
unary Echo call at a time, the other side running natively:

- ``server``: the gRPC server runs under callgrind, once per variant, and a
  native client makes the calls; the server variants are ``bare`` (no
  interceptor, no header), ``bare_header`` (no interceptor, the client sends
  the ``authorization`` header: the cost of the bytes), ``noop`` (an
  interceptor that only calls its continuation: gRPC's floor) and ``ours``
  (our interceptor: JWT cache hit, ownership rule);
- ``client``: the client runs under callgrind against a native server; the
  variants are ``bare``, ``bare_header`` (the header passed by hand),
  ``noop`` (a client interceptor that only calls its continuation) and
  ``ours`` (``create_channel`` with a caching token source).

Each variant runs twice, with ``--calls`` more calls the second time; the
difference divided by ``--calls`` cancels start-up and import costs. grpc.aio
calls run 64 at a time, sync calls one after another. Valgrind does not use
the CPU's SHA extensions, so the SHA-256 of the verified-token cache key
counts about ten times what it costs natively (about 13,000 instructions for
a 440-byte header against about 0.4 µs). Thread scheduling under valgrind
varies a little from run to run: counts repeat within about 2 %.

Needs ``valgrind`` (Debian package ``valgrind``); prints a table, writes
JSON with ``--out`` and keeps callgrind's profiles (``callgrind_annotate``
reads them) with ``--keep DIR``. Takes about 15 minutes. Not part of the
library's API.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.child import call_many
from bench.fixtures import (
    OWNER,
    SESSION_ID,
    mint_runner_token,
    new_identity,
)
from bench.proc import child_env
from bench.report import machine

__all__ = [
    "CLIENT_VARIANTS",
    "SERVER_VARIANTS",
    "collected",
    "main",
    "server_variant_for",
    "start_server",
    "stop_server",
]

SERVER_VARIANTS = ("bare", "bare_header", "noop", "ours")
CLIENT_VARIANTS = ("bare", "bare_header", "noop", "ours")
_BASE_CALLS = 100
_TIMEOUT = 600.0  # valgrind slows a side down fifty-fold
_COLLECTED = re.compile(r"Collected : (\d+)")


def _valgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]


def collected(stderr: str) -> int:
    match = _COLLECTED.search(stderr)
    if match is None:
        raise RuntimeError(f"no instruction count from valgrind: {stderr[-1000:]}")
    return int(match.group(1))


def start_server(mode: str, variant: str, spec: Path, prefix: list[str]) -> tuple[Any, int]:
    """A ``serve-one`` child (under ``prefix``, e.g. valgrind) and its port."""
    proc = subprocess.Popen(
        [*prefix, "-m", "bench.child", "serve-one", mode, variant, str(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError(f"server child failed: {proc.communicate(timeout=30)[1][-2000:]}")
    return proc, int(json.loads(line)["port"])


def stop_server(proc: Any) -> str:
    """Close the child's stdin (it stops serving) and return its stderr."""
    _, stderr = proc.communicate(input="", timeout=_TIMEOUT)
    return str(stderr)


def _server_count(mode: str, variant: str, spec: Path, token: str, calls: int, work: Path) -> int:
    proc, port = start_server(
        mode, variant, spec, _valgrind(work / f"server-{variant}-{calls}.out")
    )
    try:
        client = "bare" if variant == "bare" else "bare_header"
        call_many(mode, client, port, token, calls)
    finally:
        stderr = stop_server(proc)
    return collected(stderr)


def _client_count(mode: str, variant: str, port: int, spec: Path, calls: int, work: Path) -> int:
    # The token travels in the spec file: a command line is visible to every
    # process, and valgrind prints it.
    done = subprocess.run(
        [
            *_valgrind(work / f"client-{variant}-{calls}.out"),
            "-m",
            "bench.child",
            "call-many",
            mode,
            variant,
            str(port),
            str(spec),
            str(calls),
        ],
        capture_output=True,
        text=True,
        timeout=_TIMEOUT * 2,
        env=child_env(),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"client child failed: {done.stderr[-2000:]}")
    return collected(done.stderr)


def server_variant_for(client_variant: str) -> str:
    """The server a client variant is profiled against: one that accepts
    what it sends."""
    return {"ours": "ours", "noop": "noop"}.get(client_variant, "bare")


def profile(mode: str, side: str, calls: int, work: Path) -> dict[str, float]:
    """Instructions per call of each variant of ``side`` in ``mode``."""
    identity = new_identity()
    token = mint_runner_token(identity, now=time.time())
    spec = work / "spec.json"
    spec.write_text(
        json.dumps(
            {"public_pem": identity.public_pem, "owners": {SESSION_ID: OWNER}, "token": token}
        ),
        encoding="utf-8",
    )
    per_call: dict[str, float] = {}
    if side == "server":
        for variant in SERVER_VARIANTS:
            low = _server_count(mode, variant, spec, token, _BASE_CALLS, work)
            high = _server_count(mode, variant, spec, token, _BASE_CALLS + calls, work)
            per_call[variant] = (high - low) / calls
        return per_call
    for variant in CLIENT_VARIANTS:
        proc, port = start_server(mode, server_variant_for(variant), spec, [sys.executable])
        try:
            low = _client_count(mode, variant, port, spec, _BASE_CALLS, work)
            high = _client_count(mode, variant, port, spec, _BASE_CALLS + calls, work)
        finally:
            stop_server(proc)
        per_call[variant] = (high - low) / calls
    return per_call


def _print(results: dict[str, dict[str, float]]) -> None:
    for name, counts in results.items():
        bare = counts["bare"]
        parts = ", ".join(
            f"{variant} {count / 1000:.1f}k ({count / bare:.3f})"
            for variant, count in counts.items()
        )
        sys.stdout.write(f"{name}: {parts}\n")
    sys.stdout.write("instructions per call (ratio to bare)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--calls", type=int, default=500, help="measured calls per variant")
    parser.add_argument("--mode", choices=("sync", "aio", "both"), default="both")
    parser.add_argument("--side", choices=("client", "server", "both"), default="both")
    parser.add_argument("--out", type=Path, help="also write the counts as JSON")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep callgrind's profiles in DIR")
    args = parser.parse_args(argv)
    if args.calls < 100:
        parser.error("--calls must be at least 100")
    if shutil.which("valgrind") is None:
        sys.stderr.write("bench.instructions: valgrind is not installed\n")
        return 2
    modes = ("sync", "aio") if args.mode == "both" else (args.mode,)
    sides = ("server", "client") if args.side == "both" else (args.side,)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ambient-instructions-") as scratch:
        work = Path(scratch) if args.keep is None else args.keep
        work.mkdir(parents=True, exist_ok=True)
        for mode in modes:
            for side in sides:
                sys.stderr.write(f"bench.instructions: {mode} {side}\n")
                results[f"{mode} {side}"] = profile(mode, side, args.calls, work)
    _print(results)
    if args.out is not None:
        valgrind = subprocess.run(
            ["valgrind", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        doc = {
            "instructions_per_call": {
                name: {variant: round(count) for variant, count in counts.items()}
                for name, counts in results.items()
            },
            "_meta": {"calls": args.calls, "valgrind": valgrind, "machine": machine()},
        }
        args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
