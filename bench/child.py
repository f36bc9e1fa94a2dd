"""Child processes of the benchmark (``python -m bench.child``).

The benchmark runs as one process tree: the bench process drives the clients
and starts these children, which talk to it over stdin/stdout (one JSON
document per line) and exit when their stdin closes.

- ``serve sync`` / ``serve aio``: the gRPC servers under test, all on
  127.0.0.1 port 0, in a process of their own so that client and server work
  do not share one interpreter lock (as in production, where the runner and
  the API server are separate processes). Reads one spec line, answers
  ``{"ports": {...}}``, then answers ``{"cmd": "cpu"}`` lines with its CPU
  time so that the bench can split each call's cost between the sides.
- ``http-load``: a load generator for the token endpoint. Reads
  ``{"url", "proofs", "concurrency"}`` lines, answers
  ``{"elapsed", "statuses"}`` per line.
- ``cache-rss N``: fills a fresh verified-token cache with N distinct tokens
  and reports the resident memory growth.
- ``serve-one MODE VARIANT SPEC`` / ``call-many MODE VARIANT PORT SPEC N``:
  one server, or one client making N calls, for :mod:`bench.instructions`.

Not part of the library's API.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import resource
import secrets
import selectors
import socket
import sys
import time
import urllib.parse
from collections.abc import Sequence
from concurrent import futures
from types import MappingProxyType
from typing import Any

import grpc
import grpc.aio

from ambient_grpc_auth.client.aio.channel import create_channel as create_aio_channel
from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.channel import create_channel
from ambient_grpc_auth.client.tokens import StaticTokenSource, Token
from ambient_grpc_auth.principal import CallerKind, Principal
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc
from ambient_grpc_auth.server.aio.interceptor import (
    ServerAuthInterceptor as AioServerAuthInterceptor,
)
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor
from ambient_grpc_auth.server.tokencache import VerifiedTokenCache
from bench.fixtures import (
    AUDIENCE,
    ISSUER,
    KID,
    SESSION_ID,
    AioNoopClientInterceptor,
    AioNoopServerInterceptor,
    AsyncEchoServicer,
    EchoServicer,
    NaiveJwtInterceptor,
    NoopClientInterceptor,
    NoopServerInterceptor,
    ours_config,
)

__all__ = ["cache_rss", "call_many", "http_load", "main", "response_status", "rss_kib"]

_LOOPBACK = "127.0.0.1:0"
_LOCAL_TCP = grpc.LocalConnectionType.LOCAL_TCP


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _cpu_seconds() -> float:
    # Nanosecond resolution (os.times() counts 10 ms ticks).
    return time.process_time()


def _answer_until_eof() -> None:
    """Answer ``{"cmd": "cpu"}`` with this process's CPU seconds (user +
    system, all threads) until stdin closes."""
    for line in sys.stdin:
        if json.loads(line).get("cmd") == "cpu":
            _emit({"cpu": _cpu_seconds()})


# --- gRPC servers -------------------------------------------------------------


def _sync_server(
    workers: int, interceptors: list[grpc.ServerInterceptor], local: bool
) -> tuple[grpc.Server, int]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-server"),
        interceptors=interceptors,
    )
    echo_pb2_grpc.add_EchoServiceServicer_to_server(EchoServicer(), server)  # type: ignore[no-untyped-call]
    if local:
        port = server.add_secure_port(_LOOPBACK, grpc.local_server_credentials(_LOCAL_TCP))
    else:
        port = server.add_insecure_port(_LOOPBACK)
    server.start()
    return server, port


def _serve_sync(spec: dict[str, Any]) -> None:
    workers = int(spec["workers"])
    pem, owners = spec["public_pem"], spec["owners"]

    def ours() -> list[grpc.ServerInterceptor]:
        # One configuration (and verified-token cache) per server.
        return [ServerAuthInterceptor(config=ours_config(pem, owners, inline_lookup=False))]

    plan: dict[str, tuple[list[grpc.ServerInterceptor], bool]] = {
        "bare": ([], False),
        "ours": (ours(), False),
        "naive": ([NaiveJwtInterceptor(public_pem=pem, owners=owners)], False),
        "noop": ([NoopServerInterceptor()], False),
        "bare_local": ([], True),
        "ours_local": (ours(), True),
        # The stampede's 1,000 concurrent calls leave a sync gRPC server
        # slower for a while (a no-op server too): it gets a server of its
        # own, so that it does not weigh on the variants measured after it.
        "stampede": (ours(), False),
    }
    servers: list[grpc.Server] = []
    ports: dict[str, int] = {}
    try:
        for name, (interceptors, local) in plan.items():
            server, ports[name] = _sync_server(workers, interceptors, local)
            servers.append(server)
        _emit({"ports": ports})
        _answer_until_eof()
    finally:
        for server in servers:
            server.stop(grace=1.0).wait(5.0)


async def _serve_aio(spec: dict[str, Any]) -> None:
    pem, owners = spec["public_pem"], spec["owners"]

    def ours() -> list[grpc.aio.ServerInterceptor]:
        return [AioServerAuthInterceptor(config=ours_config(pem, owners, inline_lookup=True))]

    plan: dict[str, list[grpc.aio.ServerInterceptor]] = {
        "aio_bare": [],
        "aio_ours": ours(),
        "aio_noop": [AioNoopServerInterceptor()],
        "aio_stampede": ours(),  # as "stampede" above
    }
    servers: list[grpc.aio.Server] = []
    ports: dict[str, int] = {}
    try:
        for name, interceptors in plan.items():
            server = grpc.aio.server(interceptors=interceptors)
            echo_pb2_grpc.add_EchoServiceServicer_to_server(AsyncEchoServicer(), server)  # type: ignore[no-untyped-call]
            ports[name] = server.add_insecure_port(_LOOPBACK)
            await server.start()
            servers.append(server)
        _emit({"ports": ports})
        await asyncio.to_thread(_answer_until_eof)
    finally:
        for server in servers:
            await server.stop(grace=1.0)


def _serve_one(mode: str, variant: str, spec: dict[str, Any]) -> None:
    """One server of ``variant`` (``bare``, ``bare_header``, ``noop``,
    ``ours``) for :mod:`bench.instructions`: prints ``{"port": N}``, serves
    until stdin closes."""
    pem, owners = spec["public_pem"], spec["owners"]
    if mode == "sync":
        sync_interceptors: list[grpc.ServerInterceptor] = []
        if variant == "noop":
            sync_interceptors = [NoopServerInterceptor()]
        elif variant == "ours":
            sync_interceptors = [
                ServerAuthInterceptor(config=ours_config(pem, owners, inline_lookup=False))
            ]
        server, port = _sync_server(8, sync_interceptors, False)
        _emit({"port": port})
        sys.stdin.read()
        server.stop(grace=1.0).wait(5.0)
        return

    async def serve() -> None:
        aio_interceptors: list[grpc.aio.ServerInterceptor] = []
        if variant == "noop":
            aio_interceptors = [AioNoopServerInterceptor()]
        elif variant == "ours":
            aio_interceptors = [
                AioServerAuthInterceptor(config=ours_config(pem, owners, inline_lookup=True))
            ]
        server = grpc.aio.server(interceptors=aio_interceptors)
        echo_pb2_grpc.add_EchoServiceServicer_to_server(AsyncEchoServicer(), server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port(_LOOPBACK)
        await server.start()
        _emit({"port": port})
        await asyncio.to_thread(sys.stdin.read)
        await server.stop(grace=1.0)

    asyncio.run(serve())


#: call-many: per-call deadline (valgrind slows a client fifty-fold), concurrency.
_CALL_MANY_TIMEOUT = 600.0
_CALL_MANY_IN_FLIGHT = 64


def call_many(mode: str, variant: str, port: int, token: str, calls: int) -> None:
    """Make ``calls`` unary Echo calls to 127.0.0.1:``port`` as client
    ``variant`` (``bare``, ``bare_header``, ``noop``, ``ours``; see
    :mod:`bench.instructions`): one after another in sync ``mode``, 64 at a
    time in ``aio``."""
    request = echo_pb2.EchoRequest(session_id=SESSION_ID, text="hello")
    header = (("authorization", "Bearer " + token),)
    metadata = None if variant in ("bare", "ours") else header
    target = f"127.0.0.1:{port}"
    source = CachingTokenSource(StaticTokenSource(Token.from_value(token)))
    if mode == "sync":
        if variant == "ours":
            channel: Any = create_channel(target, source, tls=False)
        elif variant == "noop":
            channel = grpc.intercept_channel(grpc.insecure_channel(target), NoopClientInterceptor())
        else:
            channel = grpc.insecure_channel(target)
        method = echo_pb2_grpc.EchoServiceStub(channel).Echo  # type: ignore[no-untyped-call]
        for _ in range(calls):
            method(request, timeout=_CALL_MANY_TIMEOUT, metadata=metadata)
        channel.close()
        return

    async def run() -> None:
        if variant == "ours":
            channel: Any = create_aio_channel(target, source, tls=False)
        elif variant == "noop":
            channel = grpc.aio.insecure_channel(target, interceptors=[AioNoopClientInterceptor()])
        else:
            channel = grpc.aio.insecure_channel(target)
        method = echo_pb2_grpc.EchoServiceStub(channel).Echo  # type: ignore[no-untyped-call]
        remaining = calls

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await method(request, timeout=_CALL_MANY_TIMEOUT, metadata=metadata)

        await asyncio.gather(*(worker() for _ in range(_CALL_MANY_IN_FLIGHT)))
        await channel.close()

    asyncio.run(run())


# --- token endpoint load ------------------------------------------------------


def http_load(url: str, proofs: Sequence[str], concurrency: int) -> tuple[float, dict[str, int]]:
    """GET ``url`` once per proof over ``concurrency`` kept-alive HTTP/1.1
    connections, one request in flight on each; returns (elapsed seconds,
    status counts). Connections are opened and the requests' bytes built
    before timing.

    A minimal client of our own (plain sockets and a selector) rather than an
    HTTP library: it shares the machine's cores with the server under test,
    so every microsecond it spends per request is taken from the server's
    throughput. It reads only what it needs (status line,
    ``Content-Length``, body) and refuses any other framing.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    authority = f"{host}:{port}".encode("ascii")
    path = (parts.path or "/").encode("ascii")

    def request(target: bytes, proof: str | None) -> bytes:
        auth = b"" if proof is None else b"Authorization: Bearer " + proof.encode("ascii") + b"\r\n"
        return b"GET " + target + b" HTTP/1.1\r\nHost: " + authority + b"\r\n" + auth + b"\r\n"

    health = request(path.rsplit(b"/", 1)[0] + b"/healthz", None)
    queue = [request(path, proof) for proof in reversed(proofs)]
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + 60.0
    connections = [socket.create_connection((host, port), timeout=10.0) for _ in range(concurrency)]
    selector = selectors.DefaultSelector()
    try:
        for conn in connections:
            conn.sendall(health)
            buffer = bytearray()
            while response_status(buffer) is None:
                chunk = conn.recv(65536)
                if not chunk:
                    raise RuntimeError("http-load: the server closed a connection")
                buffer += chunk
            conn.setblocking(False)
        started = time.perf_counter()
        for conn in connections:
            if queue:
                conn.sendall(queue.pop())  # a few hundred bytes: the socket buffer takes them
                selector.register(conn, selectors.EVENT_READ, bytearray())
        while selector.get_map():
            if time.monotonic() > deadline:
                raise RuntimeError("http-load: no answer within 60 s")
            for key, _ in selector.select(1.0):
                ready, buffer = key.fileobj, key.data
                assert isinstance(ready, socket.socket)  # what was registered
                chunk = ready.recv(65536)
                if not chunk:
                    raise RuntimeError("http-load: the server closed a connection")
                buffer += chunk
                status = response_status(buffer)
                if status is None:
                    continue
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                buffer.clear()
                if queue:
                    ready.sendall(queue.pop())
                else:
                    selector.unregister(ready)
        elapsed = time.perf_counter() - started
    finally:
        selector.close()
        for conn in connections:
            conn.close()
    return elapsed, statuses


def response_status(buffer: bytearray) -> int | None:
    """The status of the one response in ``buffer`` once it is complete
    (head and ``Content-Length`` body), else None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    length: int | None = None
    for line in bytes(buffer[:end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            raise RuntimeError("http-load: chunked responses are not read")
    if length is None:
        raise RuntimeError("http-load: a response without Content-Length")
    if len(buffer) < end + 4 + length:
        return None
    if len(buffer) > end + 4 + length:
        raise RuntimeError("http-load: more bytes than one response")
    return int(buffer[9:12])


def _serve_http_load() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        cpu = _cpu_seconds()
        elapsed, statuses = http_load(job["url"], job["proofs"], int(job["concurrency"]))
        _emit({"elapsed": elapsed, "statuses": statuses, "cpu": _cpu_seconds() - cpu})


# --- verified-token cache memory ------------------------------------------------


def rss_kib() -> int:
    """This process's resident set size in KiB (peak RSS where /proc is absent)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def cache_rss(count: int) -> dict[str, Any]:
    """Insert ``count`` distinct unexpired tokens into a default-bound cache,
    each with the principal the JWT authenticator builds for it; report RSS.

    Tokens are assembled with a random signature instead of being signed:
    the cache keeps only their digests and principals, so memory is the same,
    and 100,000 RSA signatures would take minutes.
    """
    header = _b64(json.dumps({"alg": "RS256", "kid": KID, "typ": "JWT"}).encode())
    signature = _b64(secrets.token_bytes(256))
    now = int(time.time())
    # The claims of mint_user_token, with per-token subject, jti and sid.
    template = json.dumps(
        {
            "iss": ISSUER,
            "aud": [AUDIENCE],
            "sub": "@user",
            "azp": "ambient-console",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "jti": "@jti",
            "sid": "@sid",
            "preferred_username": "@user",
            "email": "@user@example.com",
            "email_verified": True,
            "name": "@name",
            "groups": ["ambient-users", "team-platform"],
        },
        separators=(",", ":"),
    )
    run = secrets.token_hex(8)
    cache = VerifiedTokenCache()
    gc.collect()
    before = rss_kib()
    at_bound: int | None = None
    longest = 0
    for index in range(count):
        user = f"user-{index:06d}"
        payload = (
            template.replace("@user", user)
            .replace("@jti", f"{run}{index:024x}")
            .replace("@sid", f"{run}-{index:012d}")
            .replace("@name", f"User {index:06d}")
        )
        token = f"{header}.{_b64(payload.encode())}.{signature}"
        longest = max(longest, len(token))
        claims = json.loads(payload)  # a fresh dict, as PyJWT hands the authenticator
        principal = Principal(
            username=claims["sub"],
            kind=CallerKind.USER,
            issuer=ISSUER,
            claims=MappingProxyType(claims),
        )
        cache.put(cache.key_for(token), principal, float(claims["exp"]))
        if index + 1 == cache.max_entries:
            gc.collect()
            at_bound = rss_kib()
    gc.collect()
    after = rss_kib()
    return {
        "inserted": count,
        "entries": len(cache),
        "max_entries": cache.max_entries,
        "token_chars": longest,
        "rss_before_kib": before,
        "rss_at_bound_kib": at_bound,
        "rss_after_kib": after,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"] and args[1:2] == ["sync"]:
        _serve_sync(json.loads(sys.stdin.readline()))
    elif args[:1] == ["serve"] and args[1:2] == ["aio"]:
        asyncio.run(_serve_aio(json.loads(sys.stdin.readline())))
    elif args[:1] == ["http-load"]:
        _serve_http_load()
    elif args[:1] == ["cache-rss"] and len(args) == 2:
        _emit(cache_rss(int(args[1])))
    elif args[:1] == ["serve-one"] and len(args) == 4:
        with open(args[3], encoding="utf-8") as spec:
            _serve_one(args[1], args[2], json.load(spec))
    elif args[:1] == ["call-many"] and len(args) == 6:
        with open(args[4], encoding="utf-8") as spec:
            token = json.load(spec)["token"]  # not on the command line
        call_many(args[1], args[2], int(args[3]), token, int(args[5]))
    else:
        sys.stderr.write(
            "usage: serve sync|aio | http-load | cache-rss N"
            " | serve-one MODE VARIANT SPEC | call-many MODE VARIANT PORT SPEC N\n"
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
