"""CPU per call of the authentication hot paths, in isolation (no sockets).

    python -m bench.hotpath [--iterations N]

Prints microseconds per call (the fastest of 5 loops, as ``timeit`` advises)
for:

- the sync server interceptor on a verified-token cache hit with an
  ownership rule, handler included, against the bare handler;
- the same for the grpc.aio server interceptor (one coroutine per call);
- the sync client: what a blocking unary call costs before it reaches gRPC,
  on the direct path and through ``grpc.intercept_channel``, against calling
  the channel's method directly with the header.

The end-to-end effect of these numbers is what ``make bench`` measures; this
script says where a difference comes from.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import timeit
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ambient_grpc_auth.client._unary import DirectUnaryUnary
from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.interceptor import AuthInterceptor as ClientInterceptor
from ambient_grpc_auth.client.tokens import StaticTokenSource, Token
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2
from ambient_grpc_auth.server.aio.interceptor import (
    ServerAuthInterceptor as AioServerAuthInterceptor,
)
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor
from bench.fixtures import (
    ECHO,
    OWNER,
    SESSION_ID,
    AsyncEchoServicer,
    EchoServicer,
    mint_user_token,
    new_identity,
    ours_config,
)

_REQUEST = echo_pb2.EchoRequest(session_id=SESSION_ID, text="hello")


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str, metadata: Any) -> None:
        self.method = method
        self.invocation_metadata = metadata


def _best_us(func: Any, iterations: int) -> float:
    return min(timeit.repeat(func, number=iterations, repeat=5)) / iterations * 1e6


async def _best_us_async(func: Any, iterations: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(iterations):
            await func()
        best = min(best, time.perf_counter() - started)
    return best / iterations * 1e6


class _FakeRaw:
    """Stands in for a channel's unary-unary method: returns the request."""

    def __call__(self, request: Any, **_kwargs: Any) -> Any:
        return request

    def with_call(self, request: Any, **_kwargs: Any) -> Any:
        return request, None


class _Outcome:
    def __init__(self, value: Any) -> None:
        self._value = value

    def done(self) -> bool:
        return True

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK

    def result(self) -> Any:
        return self._value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=50_000)
    args = parser.parse_args(argv)
    n = max(1, args.iterations)
    identity = new_identity()
    token = mint_user_token(identity, now=time.time())
    metadata = (("user-agent", "grpc-python"), ("authorization", "Bearer " + token))
    details = _Details(ECHO + "Echo", metadata)
    owners = {SESSION_ID: OWNER}

    sync_base = grpc.unary_unary_rpc_method_handler(EchoServicer().Echo)
    sync_server = ServerAuthInterceptor(
        config=ours_config(identity.public_pem, owners, inline_lookup=False)
    )

    def sync_bare() -> None:
        sync_base.unary_unary(_REQUEST, None)

    def sync_ours() -> None:
        handler = sync_server.intercept_service(lambda _d: sync_base, details)
        handler.unary_unary(_REQUEST, None)

    aio_base = grpc.unary_unary_rpc_method_handler(AsyncEchoServicer().Echo)
    aio_server = AioServerAuthInterceptor(
        config=ours_config(identity.public_pem, owners, inline_lookup=True)
    )

    async def continuation(_details: Any) -> Any:
        return aio_base

    async def aio_bare() -> None:
        handler = await continuation(details)
        await handler.unary_unary(_REQUEST, None)

    async def aio_ours() -> None:
        handler = await aio_server.intercept_service(continuation, details)
        await handler.unary_unary(_REQUEST, None)

    source = CachingTokenSource(StaticTokenSource(Token(token, time.time() + 3600)))
    client = ClientInterceptor(source)
    raw = _FakeRaw()
    direct = DirectUnaryUnary(raw, None, client)
    header = (("authorization", "Bearer " + token),)

    def client_bare() -> None:
        raw(_REQUEST, timeout=30.0, metadata=header)

    def client_direct() -> None:
        direct(_REQUEST, timeout=30.0)

    class _CallDetails(grpc.ClientCallDetails):
        def __init__(self) -> None:
            self.method = ECHO + "Echo"
            self.timeout = 30.0
            self.metadata = None
            self.credentials = None
            self.wait_for_ready = None
            self.compression = None

    call_details = _CallDetails()

    def client_interceptor() -> None:
        client.intercept_unary_unary(lambda d, r: _Outcome(r), call_details, _REQUEST).result()

    sync_ours()
    rows = [
        ("sync server: bare handler", _best_us(sync_bare, n)),
        ("sync server: interceptor + handler", _best_us(sync_ours, n)),
        ("aio server: bare handler", asyncio.run(_best_us_async(aio_bare, n))),
        ("aio server: interceptor + handler", asyncio.run(_best_us_async(aio_ours, n))),
        ("sync client: header passed by hand", _best_us(client_bare, n)),
        ("sync client: direct path", _best_us(client_direct, n)),
        ("sync client: interceptor method alone", _best_us(client_interceptor, n)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, micros in rows:
        print(f"{name:<{width}}  {micros:7.2f} us/call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
