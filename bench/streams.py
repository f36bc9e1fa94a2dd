"""Streams nobody reads, against real session servers (``make bench-streams``).

For each server kind (sync ``grpc`` and ``grpc.aio``) a session server runs
in a child process on 127.0.0.1, behind the auth interceptor with its default
stream limits. One user (a single principal) opens many Watch streams on a
session with a backlog and never reads them; another user then pushes to its
own session, and the bench reports the push latency (p50/p99 over a bounded
number of calls) and the growth of the server's resident memory (VmRSS from
``/proc/<pid>/status``). It prints the figures next to the targets; it
asserts nothing (timings depend on the machine).

Run ``python -m bench.streams [--streams-sync 70] [--streams-aio 400]
[--pushes 200] [--unbounded]``; ``--unbounded`` lifts the stream limits, to
show what they prevent (expect timeouts and memory growth).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health

from ambient_grpc_auth.jwk import VerificationKey
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2 as pb
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2_grpc as pb_grpc
from ambient_grpc_auth.reference.serve import (
    SyncSessionServer,
    start_aio_session_server,
    start_sync_session_server,
)
from ambient_grpc_auth.reference.servicer import SessionServicer
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor
from ambient_grpc_auth.server.jwks import StaticKeySet
from bench.fixtures import AUDIENCE, ISSUER, KID, BenchIdentity, mint_user_token, new_identity
from bench.proc import child_env, latency_stats

WATCHER = "mallory"
PUSHER = "alice"
BACKLOG_MESSAGES = 64
BACKLOG_CHARS = 16 * 1024
TARGET_P99_MS = 100.0
TARGET_RSS_MIB = 100.0
PUSH_TIMEOUT = 2.0


# --- the server child -----------------------------------------------------------


def _serve(kind: str, pem_path: str, unbounded: bool) -> None:
    """Run a session server; print one JSON line (port, session ids); stop
    when stdin closes."""
    with open(pem_path, "rb") as fh:
        key = serialization.load_pem_public_key(fh.read())
    store = SessionStore()
    issuer = TrustedIssuer(
        issuer=ISSUER,
        audiences=(AUDIENCE,),
        keys=StaticKeySet(keys=[VerificationKey(kid=KID, key=key)]),
    )
    config = ServerAuthConfig.from_env(environ={}, issuers=[issuer], owner_lookup=store.owner_of)
    if unbounded:
        config = dataclasses.replace(
            config, max_streams_per_principal=None, max_concurrent_streams=None
        )
    watched = store.create_session("watched", created_by=WATCHER).metadata.id
    pushed = store.create_session("pushed", created_by=PUSHER).metadata.id
    for i in range(BACKLOG_MESSAGES):
        store.append(watched, "t", f"{i:08d}" + "x" * BACKLOG_CHARS)

    def announce(port: int) -> None:
        print(json.dumps({"port": port, "watched": watched, "pushed": pushed}), flush=True)

    if kind == "sync":
        running = start_sync_session_server(store, config)
        if unbounded:  # start_sync_session_server keeps a total below the pool
            running.stop(grace=None)
            running = _unbounded_sync(store, config)
        announce(running.port)
        sys.stdin.read()
        running.stop(grace=None)
    else:

        async def run() -> None:
            server, port, _ = await start_aio_session_server(store, config)
            announce(port)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            await server.stop(None)

        asyncio.run(run())
    store.close()


def _unbounded_sync(store: SessionStore, config: ServerAuthConfig) -> SyncSessionServer:
    """A sync session server without any stream limit (the comparison)."""
    interceptor = ServerAuthInterceptor(config=config)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), interceptors=[interceptor])
    pb_grpc.add_SessionServiceServicer_to_server(SessionServicer(store), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return SyncSessionServer(server, port, interceptor, health.HealthServicer())


# --- the measuring side ---------------------------------------------------------


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _bearer(identity: BenchIdentity, user: str) -> tuple[tuple[str, str]]:
    token = mint_user_token(identity, now=time.time(), subject=user)
    return (("authorization", "Bearer " + token),)


def _run_kind(
    kind: str, identity: BenchIdentity, pem_path: str, streams: int, pushes: int, unbounded: bool
) -> dict[str, Any]:
    args = [sys.executable, "-m", "bench.streams", "--serve", kind, "--pem", pem_path]
    if unbounded:
        args.append("--unbounded")
    child = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env(), text=True
    )
    assert child.stdout is not None
    assert child.stdin is not None
    try:
        info = json.loads(child.stdout.readline())
        target = f"127.0.0.1:{info['port']}"
        watch_channel = grpc.insecure_channel(target)
        push_channel = grpc.insecure_channel(target)
        watch_stub = pb_grpc.SessionServiceStub(watch_channel)
        push_stub = pb_grpc.SessionServiceStub(push_channel)
        watcher, pusher = _bearer(identity, WATCHER), _bearer(identity, PUSHER)
        push = pb.PushSessionMessageRequest(session_id=info["pushed"], event_type="t", payload="p")
        push_stub.PushSessionMessage(push, metadata=pusher, timeout=10)  # warm up
        rss_before = _rss_mib(child.pid)
        calls = [
            watch_stub.WatchSessionMessages(
                pb.WatchSessionMessagesRequest(session_id=info["watched"]),
                metadata=watcher,
                timeout=120,
            )
            for _ in range(streams)
        ]
        time.sleep(2.0)  # let the server start (or refuse) every stream and fill its buffers
        refused = sum(
            1 for c in calls if c.done() and c.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        rss_streams = _rss_mib(child.pid)
        samples: list[int] = []
        failures: dict[str, int] = {}
        for _ in range(pushes):
            start = time.perf_counter_ns()
            try:
                push_stub.PushSessionMessage(push, metadata=pusher, timeout=PUSH_TIMEOUT)
            except grpc.RpcError as err:
                name = err.code().name  # type: ignore[attr-defined]
                failures[name] = failures.get(name, 0) + 1
            samples.append(time.perf_counter_ns() - start)
        for c in calls:
            c.cancel()
        watch_channel.close()
        push_channel.close()
        stats = latency_stats(samples)
        return {
            "kind": kind,
            "streams_opened": streams,
            "streams_refused": refused,
            "push_p50_ms": stats["p50_us"] / 1000.0,
            "push_p99_ms": stats["p99_us"] / 1000.0,
            "push_failures": failures,
            "rss_before_mib": rss_before,
            "rss_growth_mib": rss_streams - rss_before,
        }
    finally:
        child.stdin.close()
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__)
    parser.add_argument("--streams-sync", type=int, default=70)
    parser.add_argument("--streams-aio", type=int, default=400)
    parser.add_argument("--pushes", type=int, default=200)
    parser.add_argument("--unbounded", action="store_true")
    parser.add_argument("--serve", choices=["sync", "aio"], help=argparse.SUPPRESS)
    parser.add_argument("--pem", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.pem, args.unbounded)
        return 0
    identity = new_identity()
    with tempfile.TemporaryDirectory() as tmp:
        pem_path = os.path.join(tmp, "public.pem")
        with open(pem_path, "w", encoding="ascii") as fh:
            fh.write(identity.public_pem)
        limits = "no stream limits" if args.unbounded else "default stream limits"
        print(f"streams nobody reads ({limits}); one principal watches, another pushes")
        for kind, streams in (("sync", args.streams_sync), ("aio", args.streams_aio)):
            result = _run_kind(kind, identity, pem_path, streams, args.pushes, args.unbounded)
            print(
                f"[{kind}] {result['streams_opened']} unread Watch streams "
                f"({result['streams_refused']} refused RESOURCE_EXHAUSTED): "
                f"other user's Push p50 {result['push_p50_ms']:.1f} ms, "
                f"p99 {result['push_p99_ms']:.1f} ms (target p99 < {TARGET_P99_MS:.0f} ms), "
                f"failures {result['push_failures'] or 'none'}; "
                f"server RSS {result['rss_before_mib']:.0f} MiB "
                f"+{result['rss_growth_mib']:.1f} MiB (target < {TARGET_RSS_MIB:.0f} MiB)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
