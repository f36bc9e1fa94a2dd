"""gRPC scenarios of the benchmark: sync and grpc.aio unary, server streaming,
and the token-refresh stampede. Not part of the library's API.

Every scenario measures its variants interleaved: a round is split into
batches, and each batch runs every variant once, in an order rotated from
batch to batch and from round to round. Load from other processes therefore
falls on all variants alike, and each ratio compares numbers taken within
the same seconds.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from ambient_grpc_auth.client.aio.channel import create_channel as create_aio_channel
from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.channel import create_channel
from ambient_grpc_auth.client.tokens import TokenSource
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc
from ambient_grpc_auth.testing import FakeClock
from bench.fixtures import (
    SESSION_ID,
    AioNoopClientInterceptor,
    CountingTokenSource,
    NoopClientInterceptor,
    PeerBearerPlugin,
)
from bench.proc import CpuMeter, rotated

__all__ = [
    "CALL_TIMEOUT",
    "StampedeResult",
    "SyncClients",
    "aio_round",
    "stampede_aio",
    "stampede_sync",
    "stream_round",
    "sync_unary_round",
]

#: Deadline of every measured call: nothing in the bench can hang.
CALL_TIMEOUT = 30.0
_STREAM_TIMEOUT = 300.0
_LOCAL_TCP = grpc.LocalConnectionType.LOCAL_TCP
_REQUEST = echo_pb2.EchoRequest(session_id=SESSION_ID, text="hello from the bench")

# --- sync unary and streaming -------------------------------------------------------


def _target(port: int) -> str:
    return f"127.0.0.1:{port}"


def _unary_call(method: Any, metadata: Any) -> Callable[[], Any]:
    if metadata is None:
        return lambda: method(_REQUEST, timeout=CALL_TIMEOUT)
    return lambda: method(_REQUEST, timeout=CALL_TIMEOUT, metadata=metadata)


class SyncClients:
    """One channel per variant (no connection is shared between variants).

    - ``bare``: plain channel to the server without interceptors;
    - ``ours``: :func:`ambient_grpc_auth.client.channel.create_channel` (client
      interceptor) to the server with our interceptor;
    - ``naive``: the same client to the server with the naive PyJWT interceptor;
    - ``bare_local``: local credentials to a server without interceptors;
    - ``call_creds``: local credentials plus a call-credentials plugin to the
      local-credentials server with our interceptor;
    - ``bare_header``: the bare server, with the same ``authorization`` header
      passed explicitly (the cost of the bytes alone);
    - ``noop``: a client interceptor that does nothing to a server with a
      server interceptor that does nothing (gRPC's own interceptor floor).
    """

    def __init__(self, ports: Mapping[str, int], source: TokenSource, token: str) -> None:
        local = grpc.local_channel_credentials(_LOCAL_TCP)
        plugin = grpc.metadata_call_credentials(PeerBearerPlugin(source), name="peer-bearer")
        self.channels: dict[str, grpc.Channel] = {
            "bare": grpc.insecure_channel(_target(ports["bare"])),
            "ours": create_channel(_target(ports["ours"]), source, tls=False),
            "naive": create_channel(_target(ports["naive"]), source, tls=False),
            "bare_local": grpc.secure_channel(_target(ports["bare_local"]), local),
            "call_creds": grpc.secure_channel(
                _target(ports["ours_local"]), grpc.composite_channel_credentials(local, plugin)
            ),
            "bare_header": grpc.insecure_channel(_target(ports["bare"])),
            "noop": grpc.intercept_channel(
                grpc.insecure_channel(_target(ports["noop"])), NoopClientInterceptor()
            ),
        }
        self.stubs = {
            name: echo_pb2_grpc.EchoServiceStub(channel)  # type: ignore[no-untyped-call]
            for name, channel in self.channels.items()
        }
        self._header = (("authorization", "Bearer " + token),)

    def unary_calls(self, names: Sequence[str]) -> dict[str, Callable[[], Any]]:
        """One blocking Echo call per variant (``bare_header`` passes the header)."""
        return {
            name: _unary_call(
                self.stubs[name].Echo, self._header if name == "bare_header" else None
            )
            for name in names
        }

    def stream_calls(self, names: Sequence[str], count: int) -> dict[str, Callable[[], int]]:
        request = echo_pb2.EchoRequest(session_id=SESSION_ID, text="tick", count=count)

        def drain(method: Any) -> int:
            received = 0
            for _ in method(request, timeout=_STREAM_TIMEOUT):
                received += 1
            return received

        def bind(method: Any) -> Callable[[], int]:
            return lambda: drain(method)

        return {name: bind(self.stubs[name].StreamEcho) for name in names}

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


def sync_unary_round(
    calls: Mapping[str, Callable[[], Any]],
    *,
    batches: int,
    batch_size: int,
    warmup: int,
    round_index: int,
    meter: CpuMeter | None = None,
) -> dict[str, list[int]]:
    """Per-call latencies (ns) of each variant, measured interleaved; CPU
    per batch goes to ``meter``."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    gc.collect()
    samples: dict[str, list[int]] = {name: [] for name in calls}
    names = list(calls)
    clock = time.perf_counter_ns
    for batch in range(batches):
        for name in rotated(names, round_index + batch):
            call, out = calls[name], samples[name]
            cpu = meter.begin() if meter is not None else None
            for _ in range(batch_size):
                started = clock()
                call()
                out.append(clock() - started)
            if meter is not None and cpu is not None:
                meter.end(name, cpu, batch_size)
    return samples


def stream_round(
    calls: Mapping[str, Callable[[], int]],
    *,
    count: int,
    batches: int,
    round_index: int,
    meter: CpuMeter | None = None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Messages per second of each variant's server stream of ``count``
    messages (one stream per variant per batch, interleaved): over the round,
    and per batch."""
    gc.collect()
    total_time = dict.fromkeys(calls, 0.0)
    total_msgs = dict.fromkeys(calls, 0)
    names = list(calls)
    per_batch: list[dict[str, float]] = []
    for batch in range(batches):
        rates: dict[str, float] = {}
        for name in rotated(names, round_index + batch):
            cpu = meter.begin() if meter is not None else None
            started = time.perf_counter()
            received = calls[name]()
            elapsed = time.perf_counter() - started
            total_time[name] += elapsed
            if meter is not None and cpu is not None:
                meter.end(name, cpu, received)
            if received != count:
                raise RuntimeError(f"stream {name}: received {received} of {count} messages")
            total_msgs[name] += received
            rates[name] = received / elapsed
        per_batch.append(rates)
    return {name: total_msgs[name] / total_time[name] for name in names}, per_batch


# --- grpc.aio ---------------------------------------------------------------------


async def _pump(call: Callable[[], Awaitable[Any]], total: int, in_flight: int) -> float:
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return time.perf_counter() - started


async def aio_round(
    ports: Mapping[str, int],
    source: TokenSource,
    token: str,
    *,
    batches: int,
    batch_size: int,
    warmup: int,
    concurrent_batches: int,
    concurrent_calls: int,
    in_flight: int,
    round_index: int,
    meter: CpuMeter | None = None,
) -> tuple[dict[str, list[int]], dict[str, float], list[dict[str, float]]]:
    """grpc.aio sequential latencies (ns) and concurrent throughput (calls/s)
    for ``aio_bare``, ``aio_ours``, ``aio_noop`` (do-nothing interceptors on
    both sides) and ``aio_bare_header`` (the bare server, with ``token``'s
    ``authorization`` header passed by hand: the cost of the bytes alone),
    interleaved; CPU of the concurrent batches goes to ``meter``. Throughput
    comes over the round and per concurrent batch."""
    bare = grpc.aio.insecure_channel(_target(ports["aio_bare"]))
    ours = create_aio_channel(_target(ports["aio_ours"]), source, tls=False)
    noop = grpc.aio.insecure_channel(
        _target(ports["aio_noop"]), interceptors=[AioNoopClientInterceptor()]
    )
    try:
        methods = {
            "aio_bare": echo_pb2_grpc.EchoServiceStub(bare).Echo,  # type: ignore[no-untyped-call]
            "aio_ours": echo_pb2_grpc.EchoServiceStub(ours).Echo,  # type: ignore[no-untyped-call]
            "aio_noop": echo_pb2_grpc.EchoServiceStub(noop).Echo,  # type: ignore[no-untyped-call]
        }
        calls = {name: _unary_call(method, None) for name, method in methods.items()}
        calls["aio_bare_header"] = _unary_call(
            methods["aio_bare"], (("authorization", "Bearer " + token),)
        )
        names = list(calls)
        for call in calls.values():
            for _ in range(warmup):
                await call()
            await _pump(call, min(warmup, in_flight * 4), in_flight)
        gc.collect()
        samples: dict[str, list[int]] = {name: [] for name in names}
        clock = time.perf_counter_ns
        for batch in range(batches):
            for name in rotated(names, round_index + batch):
                call, out = calls[name], samples[name]
                for _ in range(batch_size):
                    started = clock()
                    await call()
                    out.append(clock() - started)
        gc.collect()
        elapsed = dict.fromkeys(names, 0.0)
        per_batch: list[dict[str, float]] = []
        for batch in range(concurrent_batches):
            rates: dict[str, float] = {}
            for name in rotated(names, round_index + batch):
                # The blocking meter call happens between batches only.
                cpu = meter.begin() if meter is not None else None
                seconds = await _pump(calls[name], concurrent_calls, in_flight)
                elapsed[name] += seconds
                rates[name] = concurrent_calls / seconds
                if meter is not None and cpu is not None:
                    meter.end(name, cpu, concurrent_calls)
            per_batch.append(rates)
        throughput = {name: concurrent_calls * concurrent_batches / elapsed[name] for name in names}
        return samples, throughput, per_batch
    finally:
        await noop.close()
        await ours.close()
        await bare.close()


# --- stampede ------------------------------------------------------------------------


@dataclass(frozen=True)
class StampedeResult:
    """Fetches of the wrapped source caused by ``calls`` concurrent calls
    made right after the cached token expired; ``waiting`` is how many
    callers were waiting on that fetch when it completed."""

    fetches: int
    calls: int
    failed: int
    waiting: int
    seconds: float


class _ObservedSource(CountingTokenSource):
    """Records how many callers wait on the cache when a fetch completes."""

    cache: CachingTokenSource | None = None
    waiting_at_fetch: int = 0

    def _observe(self) -> None:
        if self.cache is not None:
            self.waiting_at_fetch = max(self.waiting_at_fetch, self.cache.waiters)

    def get_token(self) -> Any:
        token = super().get_token()
        self._observe()
        return token

    async def get_token_async(self) -> Any:
        token = await super().get_token_async()
        self._observe()
        return token


def _stampede_source(
    token: str, delay: float
) -> tuple[FakeClock, _ObservedSource, CachingTokenSource]:
    clock = FakeClock(start=time.time())
    counting = _ObservedSource(token, clock=clock, delay=delay)
    cache = CachingTokenSource(counting, clock=clock)
    counting.cache = cache
    return clock, counting, cache


def stampede_sync(port: int, token: str, *, calls: int, fetch_delay: float) -> StampedeResult:
    """``calls`` threads call Echo through our sync client interceptor at the
    moment the cached token has expired."""
    clock, counting, cache = _stampede_source(token, fetch_delay)
    channel = create_channel(_target(port), cache, tls=False)
    try:
        method = echo_pb2_grpc.EchoServiceStub(channel).Echo  # type: ignore[no-untyped-call]
        method(_REQUEST, timeout=CALL_TIMEOUT)  # primes the cache: fetch no. 1
        clock.advance(3600.0)  # the cached token is now expired
        barrier = threading.Barrier(calls + 1)
        failures: list[BaseException] = []

        def call() -> None:
            try:
                barrier.wait(CALL_TIMEOUT)
                method(_REQUEST, timeout=CALL_TIMEOUT)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=call, daemon=True) for _ in range(calls)]
        for thread in threads:
            thread.start()
        barrier.wait(CALL_TIMEOUT)
        started = time.perf_counter()
        for thread in threads:
            thread.join(CALL_TIMEOUT * 2)
        seconds = time.perf_counter() - started
    finally:
        channel.close()
    return StampedeResult(
        fetches=counting.count - 1,
        calls=calls,
        failed=len(failures),
        waiting=counting.waiting_at_fetch,
        seconds=seconds,
    )


async def stampede_aio(port: int, token: str, *, calls: int, fetch_delay: float) -> StampedeResult:
    """``calls`` concurrent grpc.aio calls through our aio client interceptor
    at the moment the cached token has expired."""
    clock, counting, cache = _stampede_source(token, fetch_delay)
    channel = create_aio_channel(_target(port), cache, tls=False)
    try:
        method = echo_pb2_grpc.EchoServiceStub(channel).Echo  # type: ignore[no-untyped-call]
        await method(_REQUEST, timeout=CALL_TIMEOUT)  # primes the cache: fetch no. 1
        clock.advance(3600.0)
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(method(_REQUEST, timeout=CALL_TIMEOUT) for _ in range(calls)),
            return_exceptions=True,
        )
        seconds = time.perf_counter() - started
    finally:
        await channel.close()
    return StampedeResult(
        fetches=counting.count - 1,
        calls=calls,
        failed=sum(isinstance(o, BaseException) for o in outcomes),
        waiting=counting.waiting_at_fetch,
        seconds=seconds,
    )
