"""Fault injection: the runner stack against failing control planes and servers.

Everything runs on 127.0.0.1 with real sockets: the real token endpoint (or
a scripted one for malformed answers), the reference SessionService behind
the server interceptor, and the runner side (ControlPlaneTokenSource +
CachingTokenSource + authenticated channel + session watch/push), in sync
``grpc`` and in ``grpc.aio``. Time that matters for expiry and backoff comes
from FakeClocks (shared by the parties, or skewed on purpose); injected sleeps
record their delays and advance the clock instead of waiting.

Every scenario checks that nothing is lost or duplicated (the watcher's seqs
are exactly 1..N and every payload arrives once), that retries are bounded
(attempts are counted) and that no thread or asyncio task outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from aiohttp import web
from support.cp import copy_keys
from support.waiting import LoopThread, async_wait_until, wait_until

from ambient_grpc_auth import aio as aio_client
from ambient_grpc_auth.client import sessions as sync_sessions
from ambient_grpc_auth.client.aio import sessions as aio_sessions
from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.channel import create_channel
from ambient_grpc_auth.client.control_plane import ControlPlaneTokenSource
from ambient_grpc_auth.client.sessions import WatchRetryPolicy
from ambient_grpc_auth.client.tokens import StaticTokenSource
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.issuers import DEFAULT_AUDIENCE
from ambient_grpc_auth.controlplane.keys import (
    DEFAULT_SIGNING_ALGORITHM,
    load_keys,
    rotate_signing_key,
)
from ambient_grpc_auth.controlplane.server import RunningTokenServer, start_token_server
from ambient_grpc_auth.errors import TokenUnavailableError
from ambient_grpc_auth.jwk import VerificationKey
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.reference import servicer as reference
from ambient_grpc_auth.reference.aio import servicer as aio_reference
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.aio.interceptor import (
    ServerAuthInterceptor as AioServerAuthInterceptor,
)
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.config import API_TOKEN_ENV, ServerAuthConfig
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor
from ambient_grpc_auth.server.jwks import JwksCache, KeySource, StaticKeySet
from ambient_grpc_auth.server.metrics import AuthMetrics
from ambient_grpc_auth.testing import FakeClock

T = TypeVar("T")

SERVICE_TOKEN = "fault-service-token-0123456789abcdef"
OWNER = "owner-user"
#: Codes a call in flight may end with when its server goes away.
GONE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


# --------------------------------------------------------------------------- plumbing


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    # RSA-2048 encryption key: the proof format does not depend on the size,
    # and a 4096-bit key would cost seconds to generate.
    return copy_keys(tmp_path / "keys", encryption_key_bits=2048)


# Quick reconnects after a server restart (gRPC's defaults wait a second and more).
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)]

_ISSUED_PORTS: set[int] = set()


def free_port() -> int:
    """A port that was just free on 127.0.0.1 and that this process has not
    handed out before: worlds reserve several ports before binding any, and
    the kernel may offer a just-released port again."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _ISSUED_PORTS:
            _ISSUED_PORTS.add(port)
            return port
    raise RuntimeError("no fresh loopback port")


def assert_no_new_threads(before: set[threading.Thread], timeout: float = 10.0) -> None:
    """Every thread started since ``before`` ends within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        # grpc.aio stops its poller thread once its last channel or server is
        # collected; cycles (calls <-> callbacks) wait for the collector.
        gc.collect()
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        assert time.monotonic() < deadline, f"leaked threads: {[t.name for t in extra]}"
        time.sleep(0.02)


async def assert_no_new_tasks(timeout: float = 10.0) -> None:
    me = asyncio.current_task()
    deadline = time.monotonic() + timeout
    while True:
        extra = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if not extra:
            return
        assert time.monotonic() < deadline, f"leaked tasks: {extra}"
        await asyncio.sleep(0.02)


def run_isolated(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run an aio scenario on a fresh loop, then prove it leaked nothing:
    no task is left when it returns and no thread outlives the loop."""
    before = set(threading.enumerate())

    async def checked() -> T:
        result = await scenario()
        await assert_no_new_tasks()
        return result

    result = asyncio.run(checked())
    assert_no_new_threads(before)
    return result


class SyncSleeps:
    """An injected blocking sleep: records delays, advances the clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.clock.advance(delay)


class AsyncSleeps:
    """An injected async sleep: records delays, advances the clock, and runs
    ``hooks[n]`` (a coroutine function) at the n-th call (1-based)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.delays: list[float] = []
        self.hooks: dict[int, Callable[[], Awaitable[None]]] = {}

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.clock.advance(delay)
        hook = self.hooks.get(len(self.delays))
        if hook is not None:
            await hook()
        await asyncio.sleep(0)


@dataclasses.dataclass
class Gate:
    entered: threading.Event = dataclasses.field(default_factory=threading.Event)
    release: threading.Event = dataclasses.field(default_factory=threading.Event)

    def hold(self) -> None:
        self.entered.set()
        assert self.release.wait(10), "gate never released"


class GatedStore(SessionStore):
    """A SessionStore whose ``append`` can be held before or after its commit
    for chosen payloads, and which counts appends per payload."""

    def __init__(self, path: str, gates: dict[str, tuple[str, Gate]], appends: Counter[str]):
        super().__init__(path)
        self._gates = gates
        self._appends = appends

    def append(self, session_id: str, event_type: str, payload: str) -> sessions_pb2.SessionMessage:
        self._appends[payload] += 1
        where, gate = self._gates.get(payload, ("", Gate()))
        if where == "before_commit":
            gate.hold()
        message = super().append(session_id, event_type, payload)
        if where == "after_commit":
            gate.hold()
        return message


def cp_issuer_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def static_keys(keys_dir: Path) -> StaticKeySet:
    signing = load_keys(keys_dir).signing
    assert signing is not None
    current = signing.current
    return StaticKeySet(
        keys=[VerificationKey(kid=current.kid, key=current.private_key.public_key())]
    )


def server_config(
    *,
    cp_port: int,
    keys: KeySource,
    clock: FakeClock,
    store: SessionStore,
    metrics: AuthMetrics,
    leeway: float = 30.0,
) -> ServerAuthConfig:
    issuer = TrustedIssuer(
        issuer=cp_issuer_url(cp_port),
        audiences=(DEFAULT_AUDIENCE,),
        keys=keys,
        algorithms=(DEFAULT_SIGNING_ALGORITHM,),
        leeway=leeway,
        control_plane=True,
    )
    return ServerAuthConfig.from_env(
        environ={API_TOKEN_ENV: SERVICE_TOKEN},
        issuers=[issuer],
        owner_lookup=store.owner_of,
        metrics=metrics,
        clock=clock,
    )


def cp_config(keys_dir: Path, clock: FakeClock, ttl: float = 900.0) -> TokenServerConfig:
    return TokenServerConfig(
        keys_dir=keys_dir, clock=clock, ttl=ttl, shutdown_timeout=1.0, signing_key_check_interval=1
    )


def public_pem(keys_dir: Path) -> str:
    return (keys_dir / "public.pem").read_text()


def assert_exactly_once(seqs: list[int], payloads: list[str], expected: set[str]) -> None:
    """Nothing lost, nothing duplicated, nothing reordered."""
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert len(payloads) == len(set(payloads)), Counter(payloads).most_common(3)
    assert set(payloads) == expected


def assert_secret_free(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        if secret:
            assert secret not in text


# --------------------------------------------------------------------------- sync world


class SyncWorld:
    """A control plane (in a loop thread) and a sync session server on fixed
    ports that tests stop and restart, plus sync runners."""

    def __init__(self, keys_dir: Path, tmp: Path, clock: FakeClock, *, gated: bool = False):
        self.keys_dir = keys_dir
        self.db = str(tmp / "sessions.db")
        self.clock = clock
        self.server_clock = clock
        self.cp_port = free_port()
        self.port = free_port()
        self.loop = LoopThread()
        self.cp: RunningTokenServer | None = None
        self.server: grpc.Server | None = None
        self.pool: futures.ThreadPoolExecutor | None = None
        self.store: SessionStore | None = None
        self.metrics = AuthMetrics()
        self.keys: KeySource = static_keys(keys_dir)
        self.gates: dict[str, tuple[str, Gate]] = {}
        self.appends: Counter[str] = Counter()
        self._gated = gated
        self.channels: list[Any] = []
        self.ttl = 900.0
        self.leeway = 30.0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_cp(self) -> None:
        config = cp_config(self.keys_dir, self.clock, self.ttl)
        self.cp = self.loop.run(start_token_server(config, "127.0.0.1", self.cp_port))

    def stop_cp(self) -> None:
        cp, self.cp = self.cp, None
        if cp is not None:
            self.loop.run(cp.close())

    def start_sessions(self) -> None:
        store: SessionStore = (
            GatedStore(self.db, self.gates, self.appends) if self._gated else SessionStore(self.db)
        )
        config = server_config(
            cp_port=self.cp_port,
            keys=self.keys,
            clock=self.server_clock,
            store=store,
            metrics=self.metrics,
            leeway=self.leeway,
        )
        self.pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fault-server")
        self.server, bound = reference.serve(
            store,
            self.target,
            interceptors=[ServerAuthInterceptor(config=config)],
            thread_pool=self.pool,
        )
        assert bound == self.port
        self.store = store

    def stop_sessions(
        self, grace: float | None = 0, *, before_close: Callable[[], None] | None = None
    ) -> None:
        """Stop the server; ``before_close`` runs after the stop began and
        before the store closes (e.g. to let a held call fail first)."""
        server, self.server = self.server, None
        stopped = server.stop(grace) if server is not None else None
        if before_close is not None:
            before_close()
        store, self.store = self.store, None
        if store is not None:
            store.close()
        for _, gate in self.gates.values():
            gate.release.set()
        if stopped is not None:
            assert stopped.wait(10)

    def finish_pool(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def restart_sessions(self, *, before_close: Callable[[], None] | None = None) -> None:
        """Same port, same SQLite file, a new server and store."""
        self.stop_sessions(before_close=before_close)
        self.finish_pool()
        self.start_sessions()

    def create_session(self) -> str:
        assert self.store is not None
        return self.store.create_session("fault", created_by=OWNER).metadata.id

    def source(self, session_id: str, **kw: Any) -> CachingTokenSource:
        cp_kw = {k: kw.pop(k) for k in ("attempts", "sleep", "timeout") if k in kw}
        cp_kw.setdefault("timeout", 2.0)
        inner = ControlPlaneTokenSource(
            cp_issuer_url(self.cp_port) + "/token",
            public_pem(self.keys_dir),
            session_id,
            clock=self.clock,
            **cp_kw,
        )
        kw.setdefault("min_backoff", 1.0)
        kw.setdefault("max_backoff", 8.0)
        return CachingTokenSource(inner, clock=self.clock, rng=random.Random(7), **kw)

    def channel(self, source: CachingTokenSource) -> Any:
        channel = create_channel(
            self.target,
            source,
            tls=False,
            options=FAST_RECONNECT,
        )
        self.channels.append(channel)
        return channel

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        for _, gate in self.gates.values():
            gate.release.set()
        self.stop_sessions()
        self.finish_pool()
        self.stop_cp()
        self.loop.close()


@contextlib.contextmanager
def sync_world(keys_dir: Path, tmp: Path, **kw: Any) -> Iterator[SyncWorld]:
    before = set(threading.enumerate())
    world = SyncWorld(keys_dir, tmp, kw.pop("clock", None) or FakeClock(time.time()), **kw)
    try:
        yield world
    finally:
        world.close()
    assert_no_new_threads(before)


class Collector:
    """Runs a sync watch in a thread and collects what it delivers."""

    def __init__(self, watch: sync_sessions.SessionWatch) -> None:
        self.watch = watch
        self.seqs: list[int] = []
        self.payloads: list[str] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fault-watcher")
        self._thread.start()

    def _run(self) -> None:
        try:
            for message in self.watch:
                self.seqs.append(message.seq)
                self.payloads.append(message.payload)
        except BaseException as exc:
            self.error = exc

    def wait_for(self, count: int) -> None:
        wait_until(lambda: len(self.seqs) >= count or self.error is not None)
        assert self.error is None, self.error

    def close(self) -> None:
        self.watch.close()
        self._thread.join(10)
        assert not self._thread.is_alive()


def collect(
    watch: aio_sessions.SessionWatch,
) -> tuple[list[int], list[str], asyncio.Future[None]]:
    """Consume an aio watch in a task: the seqs and payloads it delivers, as
    they come, and the task (it ends when the watch is closed)."""
    seqs: list[int] = []
    payloads: list[str] = []

    async def consume() -> None:
        async for message in watch:
            seqs.append(message.seq)
            payloads.append(message.payload)

    return seqs, payloads, asyncio.ensure_future(consume())


def aio_runner(
    keys_dir: Path, cp_port: int, port: int, session_id: str, clock: FakeClock
) -> tuple[CachingTokenSource, Any]:
    """An aio runner: the control plane's token source (cached) and a channel."""
    source = CachingTokenSource(
        ControlPlaneTokenSource(
            cp_issuer_url(cp_port) + "/token", public_pem(keys_dir), session_id, clock=clock
        ),
        clock=clock,
    )
    channel = aio_client.create_channel(
        f"127.0.0.1:{port}", source, tls=False, options=FAST_RECONNECT
    )
    return source, channel


async def serve_aio(store: SessionStore, port: int, config: ServerAuthConfig) -> Any:
    """The aio reference SessionService behind the aio interceptor, on ``port``."""
    server, _ = await aio_reference.serve(
        store, f"127.0.0.1:{port}", interceptors=[AioServerAuthInterceptor(config=config)]
    )
    return server


def sync_push(channel: Any, session_id: str, payload: str, **kw: Any) -> int:
    return sync_sessions.push(channel, session_id, "assistant", payload, timeout=5, **kw).seq


async def push_unsent_again(push: Callable[[str], Awaitable[int]], payload: str) -> int:
    """Push; a call that was not sent (no token yet) is safe to repeat."""
    for _ in range(20):
        try:
            return await push(payload)
        except grpc.aio.AioRpcError as err:
            if getattr(err, "token_error", None) is None:
                raise
            await asyncio.sleep(0.05)
    raise AssertionError("no token after 20 attempts")


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


# --------------------------------------------------------------------------- 1. CP down at start


def test_token_endpoint_down_at_start_backs_off_then_recovers(
    keys_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ambient_grpc_auth")
    with sync_world(keys_dir, tmp_path) as w:
        w.start_sessions()
        sid = w.create_session()
        sleeps = SyncSleeps(FakeClock())  # the source's own retry pauses
        source = w.source(sid, attempts=3, sleep=sleeps)
        channel = w.channel(source)

        err = rpc_error(lambda: sync_push(channel, sid, "m-0"))
        # Not sent: the runner could not get a token; retrying later may help.
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        token_error = err.token_error  # type: ignore[attr-defined]
        assert isinstance(token_error, TokenUnavailableError)
        assert token_error.retryable
        message = str(token_error)
        assert "failed after 3 attempts" in message
        assert f"127.0.0.1:{w.cp_port}/token" in message
        # Capped exponential pauses between the source's attempts.
        assert len(sleeps.delays) == 2
        assert all(0 < d <= 5.0 for d in sleeps.delays)
        assert source.fetches == 1
        assert w.metrics.snapshot().allowed == 0
        assert w.metrics.snapshot().denied_total == 0

        # Within the cache's backoff no request is made at all.
        for _ in range(5):
            assert rpc_error(lambda: sync_push(channel, sid, "m-x")).code() is (
                grpc.StatusCode.UNAVAILABLE
            )
        assert source.fetches == 1

        # The backoff is capped: after max_backoff (8 s) a fetch is always due,
        # however many failures came before; so each step is one more fetch.
        for n in range(2, 9):
            w.clock.advance(8.0)
            rpc_error(lambda: sync_push(channel, sid, "m-x"))
            assert source.fetches == n
        assert len(sleeps.delays) == 2 * 8  # attempts - 1 pauses per fetch, no more

        w.start_cp()
        w.clock.advance(8.0)
        watcher = Collector(sync_sessions.watch(channel, sid))
        try:
            assert sync_push(channel, sid, "m-1") == 1
            assert sync_push(channel, sid, "m-2") == 2
            watcher.wait_for(2)
        finally:
            watcher.close()
        assert_exactly_once(watcher.seqs, watcher.payloads, {"m-1", "m-2"})
        assert source.fetches == 9
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "Bearer" not in logged


def test_token_endpoint_down_at_start_aio_watch_waits_for_it(
    keys_dir: Path, tmp_path: Path
) -> None:
    async def scenario() -> None:
        clock = FakeClock(time.time())
        cp_port, port = free_port(), free_port()
        store = SessionStore(str(tmp_path / "db"))
        sid = store.create_session("fault", created_by=OWNER).metadata.id
        metrics = AuthMetrics()
        config = server_config(
            cp_port=cp_port, keys=static_keys(keys_dir), clock=clock, store=store, metrics=metrics
        )
        server, _ = await aio_reference.serve(
            store, f"127.0.0.1:{port}", interceptors=[AioServerAuthInterceptor(config=config)]
        )
        cp: list[RunningTokenServer] = []

        async def cp_comes_back() -> None:
            cp.append(await start_token_server(cp_config(keys_dir, clock), "127.0.0.1", cp_port))

        sleeps = AsyncSleeps(clock)
        sleeps.hooks[4] = cp_comes_back
        source = CachingTokenSource(
            ControlPlaneTokenSource(
                cp_issuer_url(cp_port) + "/token",
                public_pem(keys_dir),
                sid,
                attempts=2,
                async_sleep=AsyncSleeps(FakeClock()),
                clock=clock,
            ),
            clock=clock,
            min_backoff=0.5,
            max_backoff=1.0,
            rng=random.Random(3),
        )
        channel = aio_client.create_channel(f"127.0.0.1:{port}", source, tls=False)
        policy = WatchRetryPolicy(base_delay=0.5, max_delay=2.0)
        watch = aio_sessions.watch(channel, sid, policy=policy, sleep=sleeps, random=lambda: 0.99)
        try:
            first = asyncio.ensure_future(anext(watch))
            await async_wait_until(lambda: bool(cp))
            await aio_sessions.push(channel, sid, "assistant", "after", timeout=5)
            message = await asyncio.wait_for(first, 10)
        finally:
            watch.close()
            await channel.close()
            await server.stop(None)
            store.close()
            for running in cp:
                await running.close()
        assert (message.seq, message.payload) == (1, "after")
        # Four failed attempts (no token), capped delays, then the stream.
        assert len(sleeps.delays) == 4
        assert all(d <= 2.0 for d in sleeps.delays)
        assert watch.streams == 5
        assert 1 <= source.failures <= 4
        assert source.fetches <= 5
        assert metrics.snapshot().denied_total == 0

    run_isolated(scenario)


# --------------------------------------------------------------------------- 2. bad answers


SECRET_IN_BODY = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2Vu.c2lnbmF0dXJl"


@dataclasses.dataclass
class FakeCP:
    """A scripted control plane: answers every /token request per ``mode``."""

    mode: str
    bearers: list[str] = dataclasses.field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        self.bearers.append(auth.partition(" ")[2])
        if self.mode == "slow":
            await asyncio.sleep(5)
            return web.json_response({"token": SECRET_IN_BODY})
        if self.mode == "500":
            # A careless upstream that echoes the request's credentials.
            return web.Response(status=500, text=f"upstream failed for {auth}")
        if self.mode == "malformed":
            text = '{"token": "' + SECRET_IN_BODY + '", "expires_at": '
            return web.Response(status=200, text=text, content_type="application/json")
        assert self.mode == "no_token"
        return web.json_response({"expires_at": "2030-01-01T00:00:00Z", "note": SECRET_IN_BODY})

    async def start(self) -> tuple[web.AppRunner, str]:
        app = web.Application()
        app.router.add_get("/token", self.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return runner, f"http://127.0.0.1:{port}/token"


# mode -> (retryable, status, requests per fetch with attempts=3, grpc code)
BAD_ANSWERS = {
    "slow": (True, None, 3, grpc.StatusCode.UNAVAILABLE),
    "500": (True, 500, 3, grpc.StatusCode.UNAVAILABLE),
    "malformed": (False, 200, 1, grpc.StatusCode.UNAUTHENTICATED),
    "no_token": (False, 200, 1, grpc.StatusCode.UNAUTHENTICATED),
}


@pytest.mark.parametrize("mode", sorted(BAD_ANSWERS))
def test_bad_token_endpoint_answers_sync(
    mode: str, keys_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ambient_grpc_auth")
    retryable, status, requests, code = BAD_ANSWERS[mode]
    fake = FakeCP(mode)
    with sync_world(keys_dir, tmp_path) as w:
        runner, url = w.loop.run(fake.start())
        try:
            w.start_sessions()
            sid = w.create_session()
            sleeps = SyncSleeps(FakeClock())
            inner = ControlPlaneTokenSource(
                url, public_pem(keys_dir), sid, attempts=3, timeout=0.3, sleep=sleeps
            )
            source = CachingTokenSource(inner, clock=w.clock, min_backoff=1.0, max_backoff=4.0)
            channel = w.channel(source)

            err = rpc_error(lambda: sync_push(channel, sid, "never"))
            assert err.code() is code
            token_error = err.token_error  # type: ignore[attr-defined]
            assert isinstance(token_error, TokenUnavailableError)
            assert token_error.retryable is retryable
            assert token_error.status == status
            assert len(fake.bearers) == requests
            assert len(sleeps.delays) == requests - 1
            # The call never reached the API server.
            assert w.metrics.snapshot().allowed == 0
            assert w.metrics.snapshot().denied_total == 0

            # A watch gives up at once when retrying cannot help, and retries
            # with capped backoff (bounded here by the policy) when it can.
            policy = WatchRetryPolicy(base_delay=0.5, max_delay=1.0, max_consecutive_failures=3)
            watch_sleeps = SyncSleeps(w.clock)
            watch = sync_sessions.watch(channel, sid, policy=policy, sleep=watch_sleeps)
            with pytest.raises(grpc.RpcError) as info:
                next(watch)
            assert info.value.code() is code
            if retryable:
                assert watch.streams == 4
                assert watch_sleeps.delays
                assert max(watch_sleeps.delays) <= 1.0
            else:
                assert watch.streams == 1
            # Fetches are bounded: the cache backs off between them.
            assert source.fetches <= watch.streams + 1
            assert len(fake.bearers) <= requests * source.fetches

            texts = [str(token_error), repr(err), err.details() or "", str(err)]
            texts += [r.getMessage() for r in caplog.records]
            for text in texts:
                assert_secret_free(text, [*fake.bearers, SECRET_IN_BODY])
        finally:
            w.loop.run(runner.cleanup())


@pytest.mark.parametrize("mode", ["500", "no_token"])
def test_bad_token_endpoint_answers_aio(mode: str, keys_dir: Path) -> None:
    retryable, status, requests, code = BAD_ANSWERS[mode]
    fake = FakeCP(mode)

    async def scenario() -> None:
        runner, url = await fake.start()
        port = free_port()
        store = SessionStore(":memory:")
        sid = store.create_session("fault", created_by=OWNER).metadata.id
        metrics = AuthMetrics()
        clock = FakeClock(time.time())
        config = server_config(
            cp_port=1, keys=static_keys(keys_dir), clock=clock, store=store, metrics=metrics
        )
        server, _ = await aio_reference.serve(
            store, f"127.0.0.1:{port}", interceptors=[AioServerAuthInterceptor(config=config)]
        )
        sleeps = AsyncSleeps(FakeClock())
        inner = ControlPlaneTokenSource(
            url, public_pem(keys_dir), sid, attempts=3, async_sleep=sleeps, clock=clock
        )
        source = CachingTokenSource(inner, clock=clock)
        channel = aio_client.create_channel(f"127.0.0.1:{port}", source, tls=False)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await aio_sessions.push(channel, sid, "assistant", "never", timeout=5)
            token_error = getattr(info.value, "token_error", None)
            assert isinstance(token_error, TokenUnavailableError)
            assert info.value.code() is code
            assert token_error.retryable is retryable
            assert token_error.status == status
            assert len(fake.bearers) == requests
            assert_secret_free(str(token_error) + str(info.value), [*fake.bearers, SECRET_IN_BODY])
            assert metrics.snapshot().allowed == 0
        finally:
            await channel.close()
            await server.stop(None)
            store.close()
            await runner.cleanup()

    run_isolated(scenario)


# --------------------------------------------------------------------------- 3. CP down mid-session


def test_token_endpoint_down_mid_session_aio(keys_dir: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock(time.time())
        cp_port, port = free_port(), free_port()
        db = str(tmp_path / "db")
        metrics = AuthMetrics()
        keys = static_keys(keys_dir)
        state: dict[str, Any] = {}

        async def start_cp() -> None:
            state["cp"] = await start_token_server(
                cp_config(keys_dir, clock, ttl=60), "127.0.0.1", cp_port
            )

        async def stop_cp() -> None:
            await state.pop("cp").close()

        async def start_server() -> None:
            store = SessionStore(db)
            config = server_config(
                cp_port=cp_port, keys=keys, clock=clock, store=store, metrics=metrics
            )
            state["server"] = await serve_aio(store, port, config)
            state["store"] = store

        async def stop_server() -> None:
            await state.pop("server").stop(0)
            state.pop("store").close()

        await start_cp()
        await start_server()
        sid = state["store"].create_session("fault", created_by=OWNER).metadata.id
        cp_sleeps = AsyncSleeps(FakeClock())
        source = CachingTokenSource(
            ControlPlaneTokenSource(
                cp_issuer_url(cp_port) + "/token",
                public_pem(keys_dir),
                sid,
                attempts=2,
                async_sleep=cp_sleeps,
                clock=clock,
            ),
            clock=clock,
            min_backoff=0.5,
            max_backoff=1.0,
            rng=random.Random(5),
        )
        channel = aio_client.create_channel(
            f"127.0.0.1:{port}",
            source,
            tls=False,
            options=FAST_RECONNECT,
        )
        watch_sleeps = AsyncSleeps(clock)
        watch_sleeps.hooks[3] = start_cp  # the control plane returns during the 3rd pause
        watch = aio_sessions.watch(
            channel,
            sid,
            policy=WatchRetryPolicy(base_delay=0.5, max_delay=2.0),
            sleep=watch_sleeps,
            random=lambda: 0.99,
        )
        seqs, payloads, consumer = collect(watch)

        async def push(payload: str) -> int:
            reply = await aio_sessions.push(channel, sid, "assistant", payload, timeout=5)
            return int(reply.seq)

        try:
            for i in range(3):
                await push(f"m-{i}")
            await async_wait_until(lambda: len(seqs) == 3)
            assert source.fetches == 1

            await stop_cp()
            # In the refresh-ahead window: the refresh fails, the valid token is served.
            clock.advance(35)
            assert await push("m-3") == 4
            assert (source.fetches, source.failures) == (2, 1)
            # Past its expiry the cached token is never sent; the call is not made.
            clock.advance(30)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await push("m-lost")
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert getattr(info.value, "token_error", None) is not None

            # The stream breaks; the watch needs a token, backs off, and
            # resumes once the control plane is back (3rd pause).
            await stop_server()
            await start_server()
            await async_wait_until(lambda: "cp" in state)
            for i in range(4, 6):
                assert await push_unsent_again(push, f"m-{i}") == i + 1
            await async_wait_until(lambda: len(seqs) == 6)
        finally:
            watch.close()
            await asyncio.wait([consumer], timeout=5)
            await channel.close()
            if "server" in state:
                await stop_server()
            if "cp" in state:
                await stop_cp()
        assert consumer.done()
        assert consumer.exception() is None
        # "m-lost" was never sent, so it is not there; everything else once.
        assert_exactly_once(seqs, payloads, {f"m-{i}" for i in range(6)})
        assert metrics.snapshot().denied_total == 0
        # Bounded: a handful of pauses, all capped, and few fetches.
        assert 3 <= len(watch_sleeps.delays) <= 6
        assert max(watch_sleeps.delays) <= 2.0
        assert watch.streams <= 8
        assert source.fetches <= 8

    run_isolated(scenario)


# --------------------------------------------------------------------------- 4. server restarts


def test_session_server_restart_mid_stream_sync(keys_dir: Path, tmp_path: Path) -> None:
    with sync_world(keys_dir, tmp_path) as w:
        w.start_cp()
        w.start_sessions()
        sid = w.create_session()
        source = w.source(sid)
        channel = w.channel(source)
        policy = WatchRetryPolicy(base_delay=0.05, max_delay=0.2)
        watcher = Collector(sync_sessions.watch(channel, sid, policy=policy))
        try:
            for i in range(5):
                sync_push(channel, sid, f"a-{i}")
            watcher.wait_for(5)
            assert source.fetches == 1
            w.restart_sessions()
            # The watch reconnects by itself; the reconnect drops the token in use.
            wait_until(lambda: channel.reconnects >= 1)
            for i in range(5):
                sync_push(channel, sid, f"b-{i}", wait_for_ready=True)
            watcher.wait_for(10)
        finally:
            watcher.close()
        assert_exactly_once(
            watcher.seqs, watcher.payloads, {f"{p}-{i}" for p in "ab" for i in range(5)}
        )
        assert 2 <= watcher.watch.streams <= 20
        # A reconnect makes the next call fetch a fresh token, once.
        assert 2 <= source.fetches <= 3
        assert w.metrics.snapshot().denied_total == 0


@pytest.mark.parametrize("where", ["before_commit", "after_commit"])
def test_session_server_restart_mid_push_sync(where: str, keys_dir: Path, tmp_path: Path) -> None:
    with sync_world(keys_dir, tmp_path, gated=True) as w:
        w.start_cp()
        w.start_sessions()
        sid = w.create_session()
        channel = w.channel(w.source(sid))
        policy = WatchRetryPolicy(base_delay=0.05, max_delay=0.2)
        watcher = Collector(sync_sessions.watch(channel, sid, policy=policy))
        outcome: dict[str, Any] = {}

        def held_push() -> None:
            try:
                outcome["seq"] = sync_push(channel, sid, "held")
            except grpc.RpcError as err:
                outcome["code"] = err.code()

        try:
            sync_push(channel, sid, "first")
            watcher.wait_for(1)
            gate = Gate()
            w.gates["held"] = (where, gate)
            pusher = threading.Thread(target=held_push)
            pusher.start()
            assert gate.entered.wait(10)
            # The server goes away while the push is inside the handler.
            w.restart_sessions(before_close=lambda: wait_until(lambda: bool(outcome)))
            pusher.join(10)
            del w.gates["held"]
            assert outcome.get("code") in GONE, outcome
            assert w.appends["held"] == 1  # push() never retries on its own

            # Settle it the way a runner must: a later acknowledged push is a
            # fence; once the watcher passed it, "held" was stored iff seen.
            fence = sync_push(channel, sid, "fence", wait_for_ready=True)
            wait_until(lambda: bool(watcher.seqs) and watcher.seqs[-1] >= fence)
            stored = "held" in watcher.payloads
            assert stored is (where == "after_commit")
            if not stored:
                sync_push(channel, sid, "held", wait_for_ready=True)
            watcher.wait_for(3)
        finally:
            watcher.close()
        assert_exactly_once(watcher.seqs, watcher.payloads, {"first", "held", "fence"})
        assert w.appends["held"] == (1 if where == "after_commit" else 2)
        assert w.metrics.snapshot().denied_total == 0


@pytest.mark.parametrize("where", ["before_commit", "after_commit"])
def test_session_server_restart_mid_stream_and_push_aio(
    where: str, keys_dir: Path, tmp_path: Path
) -> None:
    async def scenario() -> None:
        clock = FakeClock(time.time())
        cp_port, port = free_port(), free_port()
        cp = await start_token_server(cp_config(keys_dir, clock), "127.0.0.1", cp_port)
        db = str(tmp_path / "db")
        gates: dict[str, tuple[str, Gate]] = {}
        appends: Counter[str] = Counter()
        metrics = AuthMetrics()
        keys = static_keys(keys_dir)
        live: dict[str, Any] = {}

        async def start_server() -> None:
            store = GatedStore(db, gates, appends)
            config = server_config(
                cp_port=cp_port, keys=keys, clock=clock, store=store, metrics=metrics
            )
            live["server"] = await serve_aio(store, port, config)
            live["store"] = store

        await start_server()
        sid = live["store"].create_session("fault", created_by=OWNER).metadata.id
        source, channel = aio_runner(keys_dir, cp_port, port, sid, clock)
        watch = aio_sessions.watch(
            channel, sid, policy=WatchRetryPolicy(base_delay=0.05, max_delay=0.2)
        )
        seqs, payloads, consumer = collect(watch)

        async def push(payload: str, **kw: Any) -> int:
            reply = await aio_sessions.push(channel, sid, "assistant", payload, timeout=5, **kw)
            return int(reply.seq)

        try:
            for i in range(3):
                await push(f"a-{i}")
            await async_wait_until(lambda: len(seqs) == 3)
            gate = Gate()
            gates["held"] = (where, gate)
            held = asyncio.ensure_future(push("held"))
            await async_wait_until(gate.entered.is_set)
            # Restart while the watch streams and the push is in the handler.
            stopping = asyncio.ensure_future(live.pop("server").stop(0))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(held, 10)
            assert info.value.code() in GONE
            live.pop("store").close()
            gate.release.set()
            await stopping
            del gates["held"]
            await start_server()
            assert appends["held"] == 1

            fence = await push("fence", wait_for_ready=True)
            await async_wait_until(lambda: bool(seqs) and seqs[-1] >= fence)
            stored = "held" in payloads
            assert stored is (where == "after_commit")
            if not stored:
                await push("held", wait_for_ready=True)
            for i in range(3):
                await push(f"b-{i}")
            await async_wait_until(lambda: len(seqs) == 8)
        finally:
            watch.close()
            await asyncio.wait([consumer], timeout=5)
            await channel.close()
            if "server" in live:
                await live.pop("server").stop(None)
            if "store" in live:
                live.pop("store").close()
            for _, gate in gates.values():
                gate.release.set()
            await cp.close()
        expected = {"held", "fence", *(f"{p}-{i}" for p in "ab" for i in range(3))}
        assert_exactly_once(seqs, payloads, expected)
        assert appends["held"] == (1 if where == "after_commit" else 2)
        assert 2 <= watch.streams <= 20
        assert channel.reconnects >= 1
        assert 2 <= source.fetches <= 3
        assert metrics.snapshot().denied_total == 0

    run_isolated(scenario)


# --------------------------------------------------------------------------- 5. token expiry


def test_token_expiry_mid_stream_aio(keys_dir: Path, tmp_path: Path) -> None:
    """An open stream outlives its token (authentication happens at call
    start); every new call, including the watch's resumption after a
    restart, carries a token that is valid at that moment."""

    async def scenario() -> None:
        clock = FakeClock(time.time())
        cp_port, port = free_port(), free_port()
        cp = await start_token_server(cp_config(keys_dir, clock, ttl=30), "127.0.0.1", cp_port)
        db = str(tmp_path / "db")
        metrics = AuthMetrics()
        keys = static_keys(keys_dir)
        live: dict[str, Any] = {}

        async def start_server() -> None:
            store = SessionStore(db)
            config = server_config(
                cp_port=cp_port, keys=keys, clock=clock, store=store, metrics=metrics, leeway=5
            )
            live["server"] = await serve_aio(store, port, config)
            live["store"] = store

        async def restart() -> None:
            await live.pop("server").stop(0)
            live.pop("store").close()
            await start_server()

        async def platform_push(payload: str) -> None:
            # Another writer (e.g. the API itself), straight into the store.
            await asyncio.to_thread(live["store"].append, sid, "assistant", payload)

        await start_server()
        sid = live["store"].create_session("fault", created_by=OWNER).metadata.id
        source, channel = aio_runner(keys_dir, cp_port, port, sid, clock)
        watch = aio_sessions.watch(
            channel, sid, policy=WatchRetryPolicy(base_delay=0.05, max_delay=0.2)
        )
        seqs, payloads, consumer = collect(watch)
        try:
            await platform_push("p-0")
            await async_wait_until(lambda: len(seqs) == 1)
            clock.advance(40)  # past exp + leeway, for the runner and the server
            await platform_push("p-1")
            await async_wait_until(lambda: len(seqs) == 2)
            assert watch.streams == 1  # the stream was not cut at expiry
            assert source.fetches == 1
            # A new call never carries the expired token.
            reply = await aio_sessions.push(channel, sid, "assistant", "r-0", timeout=5)
            assert reply.seq == 3
            assert source.fetches == 2
            await restart()
            await platform_push("p-2")
            await async_wait_until(lambda: len(seqs) == 4)
            clock.advance(40)
            await restart()
            await platform_push("p-3")
            await async_wait_until(lambda: len(seqs) == 5)
        finally:
            watch.close()
            await asyncio.wait([consumer], timeout=5)
            await channel.close()
            if "server" in live:
                await live.pop("server").stop(None)
                live.pop("store").close()
            await cp.close()
        assert_exactly_once(seqs, payloads, {"p-0", "p-1", "r-0", "p-2", "p-3"})
        # Each resumption used a valid token: the server refused nothing.
        assert metrics.snapshot().denied_total == 0
        assert source.fetches == 3
        assert 3 <= watch.streams <= 20

    run_isolated(scenario)


# --------------------------------------------------------------------------- 6. JWKS down


@dataclasses.dataclass
class JwksEndpoint:
    """Serves the control plane's current JWKS on a fixed port, on demand."""

    world: SyncWorld
    port: int = dataclasses.field(default_factory=free_port)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self.world.cp is not None
        return web.json_response(self.world.cp.issuer.jwks())  # type: ignore[attr-defined]

    def start(self) -> None:
        async def go() -> web.AppRunner:
            app = web.Application()
            app.router.add_get("/jwks", self._handle)
            runner = web.AppRunner(app, shutdown_timeout=0.2)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            return runner

        self.runner = self.world.loop.run(go())

    def stop(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            self.world.loop.run(runner.cleanup())


def test_jwks_endpoint_down_uses_last_good_key_set(keys_dir: Path, tmp_path: Path) -> None:
    with sync_world(keys_dir, tmp_path) as w:
        jwks = JwksEndpoint(w)
        cache = JwksCache(jwks.url, clock=w.clock, cooldown=10, refresh_interval=60, timeout=2)
        w.keys = cache
        try:
            w.start_cp()
            jwks.start()
            w.start_sessions()

            def runner() -> tuple[str, Any, CachingTokenSource]:
                sid = w.create_session()
                source = w.source(sid)
                return sid, w.channel(source), source

            def code(sid: str, channel: Any) -> grpc.StatusCode:
                result = grpc.StatusCode.OK
                try:
                    sync_push(channel, sid, "m")
                except grpc.RpcError as err:
                    result = err.code()
                assert result not in NEVER
                return result

            sid_a, ch_a, _ = runner()
            assert code(sid_a, ch_a) is grpc.StatusCode.OK
            assert cache.fetch_count == 1

            jwks.stop()
            w.clock.advance(120)  # the key set is due for a refresh
            sid_b, ch_b, _ = runner()
            assert code(sid_b, ch_b) is grpc.StatusCode.OK  # last good set, refresh failed
            assert cache.fetch_count == 2
            sid_c, ch_c, _ = runner()
            assert code(sid_c, ch_c) is grpc.StatusCode.OK  # within the cooldown: no fetch
            assert cache.fetch_count == 2

            # New tokens signed with a key the cached set lacks: refused as
            # UNAUTHENTICATED (never INTERNAL), one refetch per cooldown at most.
            rotate_signing_key(keys_dir)
            w.clock.advance(2)
            sid_d, ch_d, src_d = runner()
            for _ in range(3):
                assert code(sid_d, ch_d) is grpc.StatusCode.UNAUTHENTICATED
            assert cache.fetch_count == 2
            assert src_d.fetches == 6  # one interceptor retry per call, no more
            w.clock.advance(11)
            assert code(sid_d, ch_d) is grpc.StatusCode.UNAUTHENTICATED
            assert cache.fetch_count == 3
            assert code(sid_d, ch_d) is grpc.StatusCode.UNAUTHENTICATED
            assert cache.fetch_count == 3

            jwks.start()
            w.clock.advance(11)
            assert code(sid_d, ch_d) is grpc.StatusCode.OK
            assert cache.fetch_count == 4
            assert code(sid_a, ch_a) is grpc.StatusCode.OK  # old-kid tokens still fine
            denied = dict(w.metrics.snapshot().denied)
            assert denied == {"unknown_kid": 10}
        finally:
            w.stop_sessions()
            jwks.stop()


# --------------------------------------------------------------------------- 7. clock skew

SKEWS = {
    # server clock minus control-plane clock -> denial reason (None: accepted)
    "ahead_within_leeway": (65.0, None),
    "ahead_beyond_leeway": (75.0, "expired"),
    "behind_within_leeway": (-5.0, None),
    "behind_beyond_leeway": (-20.0, "not_yet_valid"),
}


@pytest.mark.parametrize("case", sorted(SKEWS))
def test_clock_skew(case: str, keys_dir: Path, tmp_path: Path) -> None:
    """Tokens live 60 s; the API server allows 10 s of leeway; the runner and
    the control plane share one clock and the server's is skewed."""
    skew, reason = SKEWS[case]
    clock = FakeClock(time.time())
    with sync_world(keys_dir, tmp_path, clock=clock) as w:
        w.ttl = 60.0
        w.leeway = 10.0
        w.server_clock = FakeClock(clock.time() + skew)
        w.start_cp()
        w.start_sessions()
        sid = w.create_session()
        source = w.source(sid)
        channel = w.channel(source)
        if reason is None:
            assert sync_push(channel, sid, "m-0") == 1
            assert sync_push(channel, sid, "m-1") == 2
            assert source.fetches == 1
            assert w.metrics.snapshot().denied_total == 0
            return
        err = rpc_error(lambda: sync_push(channel, sid, "m-0"))
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        assert err.details() == "invalid credentials"
        # One retry with a fresh token (refused too), then the error surfaces.
        assert source.fetches == 2
        assert dict(w.metrics.snapshot().denied) == {reason: 2}

        # A watch keeps trying (the server might be fixed) but only as its
        # policy allows, with a fresh token each time.
        policy = WatchRetryPolicy(base_delay=0.1, max_delay=0.4, max_consecutive_failures=3)
        sleeps = SyncSleeps(FakeClock())
        watch = sync_sessions.watch(channel, sid, policy=policy, sleep=sleeps)
        with pytest.raises(grpc.RpcError) as info:
            next(watch)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert watch.streams == 4
        assert len(sleeps.delays) == 2  # first retry is immediate, then capped backoff
        assert max(sleeps.delays) <= 0.4
        assert source.fetches == 2 + 4
        assert dict(w.metrics.snapshot().denied) == {reason: 2 + 4}
        assert w.store is not None
        assert w.store.read_messages(sid, 0).messages == ()


# --------------------------------------------------------------------------- 8. a sloppy server


class OverReplayingServicer(aio_reference.AsyncSessionServicer):
    """Replays a few messages too many on every watch (as a server restored
    from a slightly stale position might): the runner must drop them."""

    async def WatchSessionMessages(
        self, request: sessions_pb2.WatchSessionMessagesRequest, context: Any
    ) -> AsyncIterator[sessions_pb2.SessionMessage]:
        replay = sessions_pb2.WatchSessionMessagesRequest(
            session_id=request.session_id, after_seq=max(0, request.after_seq - 3)
        )
        async for message in super().WatchSessionMessages(replay, context):
            yield message


def test_watch_drops_what_a_server_replays_twice(keys_dir: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock(time.time())
        port = free_port()
        store = SessionStore(":memory:")
        sid = store.create_session("fault", created_by=OWNER).metadata.id
        metrics = AuthMetrics()
        config = server_config(
            cp_port=1, keys=static_keys(keys_dir), clock=clock, store=store, metrics=metrics
        )
        server = grpc.aio.server(interceptors=[AioServerAuthInterceptor(config=config)])
        sessions_pb2_grpc.add_SessionServiceServicer_to_server(  # type: ignore[no-untyped-call]
            OverReplayingServicer(store), server
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        channel = aio_client.create_channel(
            f"127.0.0.1:{port}", StaticTokenSource(SERVICE_TOKEN), tls=False
        )
        watch = aio_sessions.watch(
            channel, sid, after_seq=2, policy=WatchRetryPolicy(base_delay=0.01, max_delay=0.05)
        )
        seqs: list[int] = []

        async def consume() -> None:
            async for message in watch:
                seqs.append(message.seq)

        def last_is(seq: int) -> Callable[[], bool]:
            return lambda: bool(seqs) and seqs[-1] == seq

        for i in range(5):
            await asyncio.to_thread(store.append, sid, "assistant", f"m-{i}")
        consumer = asyncio.ensure_future(consume())
        try:
            await async_wait_until(lambda: len(seqs) == 3)
            # Every resumption replays three old messages again.
            for round_ in range(3):
                await server.stop(0)
                server = grpc.aio.server(interceptors=[AioServerAuthInterceptor(config=config)])
                sessions_pb2_grpc.add_SessionServiceServicer_to_server(  # type: ignore[no-untyped-call]
                    OverReplayingServicer(store), server
                )
                server.add_insecure_port(f"127.0.0.1:{port}")
                await server.start()
                await asyncio.to_thread(store.append, sid, "assistant", "more")
                await async_wait_until(last_is(6 + round_))
        finally:
            watch.close()
            await asyncio.wait([consumer], timeout=5)
            await channel.close()
            await server.stop(None)
            store.close()
        assert seqs == list(range(3, 9))
        assert watch.streams >= 4

    run_isolated(scenario)


# --------------------------------------------------------------------------- 9. oversized metadata


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_oversized_metadata_is_refused_before_any_handler(flavour: str, tmp_path: Path) -> None:
    """Huge or numerous headers end as UNAUTHENTICATED (the interceptor's
    bound) or RESOURCE_EXHAUSTED (gRPC's metadata limit), never INTERNAL;
    no handler runs, nothing echoes the value, and the server keeps serving."""
    before = set(threading.enumerate())
    loop = LoopThread() if flavour == "aio" else None
    store = SessionStore(":memory:")
    metrics = AuthMetrics()
    config = dataclasses.replace(
        ServerAuthConfig.from_env(environ={API_TOKEN_ENV: SERVICE_TOKEN}, metrics=metrics),
        max_token_bytes=1024,
    )
    pool = futures.ThreadPoolExecutor(max_workers=4)
    servers: dict[str, Any] = {}
    if loop is None:
        servers["sync"], port = reference.serve(
            store, interceptors=[ServerAuthInterceptor(config=config)], thread_pool=pool
        )
    else:

        async def start() -> tuple[grpc.aio.Server, int]:
            return await aio_reference.serve(
                store, interceptors=[AioServerAuthInterceptor(config=config)]
            )

        servers["aio"], port = loop.run(start())

    def stop() -> None:
        if "sync" in servers:
            servers.pop("sync").stop(None).wait(10)
        if "aio" in servers and loop is not None:
            loop.run(servers.pop("aio").stop(None))

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = sessions_pb2_grpc.SessionServiceStub(channel)  # type: ignore[no-untyped-call]

    def create(metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
        result, details = grpc.StatusCode.OK, ""
        try:
            stub.CreateSession(
                sessions_pb2.CreateSessionRequest(name="x"), metadata=metadata, timeout=5
            )
        except grpc.RpcError as err:
            result, details = err.code(), err.details() or ""
        assert "zzzz" not in details
        return result

    try:
        cases = {
            "token over the interceptor's bound": (("authorization", "Bearer " + "z" * 2000),),
            "token over gRPC's limit": (("authorization", "Bearer " + "z" * 40_000),),
            "padding over gRPC's limit": (
                ("authorization", "Bearer " + SERVICE_TOKEN),
                ("x-pad", "zzzz" * 10_000),
            ),
            "many entries": tuple((f"x-pad-{i}", "zzzz" * 50) for i in range(200)),
        }
        for name, metadata in cases.items():
            code = create(metadata)
            assert code in {
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            }, (name, code)
        assert metrics.snapshot().denied.get("oversized") == 1
        assert metrics.snapshot().allowed == 0
        # Still serving, and nothing was created by the refused calls.
        assert create((("authorization", "Bearer " + SERVICE_TOKEN),)) is grpc.StatusCode.OK
        assert metrics.snapshot().allowed == 1
    finally:
        channel.close()
        stop()
        store.close()
        pool.shutdown(wait=True)
        if loop is not None:
            loop.close()
    assert_no_new_threads(before)


# --------------------------------------------------------------------------- 10. proxies


@dataclasses.dataclass
class ProxyTrap:
    """A TCP listener standing in for an HTTP proxy: it records the first
    line of every connection (``GET http://...`` or ``CONNECT host:port``)
    and answers 502."""

    seen: list[str] = dataclasses.field(default_factory=list)
    server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
            async with asyncio.timeout(5):
                line = await reader.readline()
                self.seen.append(line.decode("latin-1").strip())
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        writer.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _proxy_env(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    for name in ("no_proxy", "NO_PROXY", "grpc_proxy"):
        monkeypatch.delenv(name, raising=False)


def test_proxy_environment_is_ignored_by_http_fetches(
    keys_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session proof (sync and async) and the JWKS fetch go to the
    configured URL only: a proxy named by the environment would see the
    proof. A plain urllib request shows that the variables are in effect."""
    import urllib.request

    trap = ProxyTrap()
    with sync_world(keys_dir, tmp_path) as w:
        w.start_cp()
        port = w.loop.run(trap.start())
        try:
            _proxy_env(monkeypatch, port)
            # A fresh opener: urlopen() would cache one built with the proxy
            # for the rest of the process.
            plain = urllib.request.build_opener()
            with contextlib.suppress(OSError):
                plain.open(cp_issuer_url(w.cp_port) + "/healthz", timeout=5)
            assert len(trap.seen) == 1  # the environment does name a proxy
            source = ControlPlaneTokenSource(
                cp_issuer_url(w.cp_port) + "/token",
                public_pem(keys_dir),
                "session-1",
                clock=w.clock,
            )
            assert source.get_token().value
            assert asyncio.run(source.get_token_async()).value
            jwks = JwksCache(cp_issuer_url(w.cp_port) + "/.well-known/jwks.json", clock=w.clock)
            assert jwks.refresh()
            assert len(trap.seen) == 1
        finally:
            w.loop.run(trap.stop())


def test_plaintext_channel_ignores_proxy_environment(
    keys_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trap = ProxyTrap()
    with sync_world(keys_dir, tmp_path) as w:
        w.start_cp()
        w.start_sessions()
        port = w.loop.run(trap.start())
        try:
            _proxy_env(monkeypatch, port)
            sid = w.create_session()
            channel = w.channel(w.source(sid))
            outcome: int | grpc.StatusCode
            try:
                outcome = sync_push(channel, sid, "m")
            except grpc.RpcError as err:
                outcome = err.code()
            assert trap.seen == []  # the bearer never goes through the proxy
            assert outcome == 1
        finally:
            w.loop.run(trap.stop())
