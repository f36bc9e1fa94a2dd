"""Soak run: many runners pushing and watching through restarts and token expiry.

``ambient-grpc-auth soak`` (or :func:`main`) starts, all on 127.0.0.1:

- the control plane's token endpoint (:mod:`ambient_grpc_auth.controlplane.server`)
  in this process, with keys generated into a temporary directory (RSA-4096:
  generation takes a few seconds) and a short token TTL (``--ttl``), so that
  every runner's token expires and is fetched again many times;
- the reference ``SessionService`` (``grpc.aio``) in a child process, behind
  :class:`~ambient_grpc_auth.server.aio.interceptor.ServerAuthInterceptor` trusting the
  token endpoint's JWKS (runner tokens are scoped to their session) and a
  static service token, over one SQLite file. Every ``--restart-every``
  seconds the child is replaced on the same port and file, alternately
  stopped gracefully (SIGTERM) and killed (SIGKILL);
- ``--runners`` runners (default 50) in this process on one event loop. Each
  has its own session (created up front by the service caller), its own
  :class:`~ambient_grpc_auth.client.control_plane.ControlPlaneTokenSource` wrapped in a
  :class:`~ambient_grpc_auth.client.caching.CachingTokenSource`, its own
  authenticated channel (:func:`ambient_grpc_auth.client.aio.channel.create_channel`),
  a watcher (:func:`ambient_grpc_auth.client.aio.sessions.watch`) and a pusher
  (:func:`ambient_grpc_auth.client.aio.sessions.push`) at ``--rate`` messages per
  second, for ``--duration`` seconds.

Definitions (per runner; the report sums them):

- every message carries a unique id in its payload. A push that returns is
  *acknowledged* (the server stored it under the returned seq);
- a push that fails without a reply (UNAVAILABLE or CANCELLED, as happens
  around restarts) is *unacknowledged*: the server may or may not have stored
  it, and :func:`~ambient_grpc_auth.client.aio.sessions.push` never retries it. The
  soak runner settles it with the next acknowledged push (seq ``S``): once
  its watcher has delivered everything up to ``S``, the message was stored iff
  the watcher saw its id (counted in ``unacked_stored``); otherwise it is
  pushed again with the same id (``retried``). This relies on a message
  whose push failed never being committed after a later push of the same
  runner was, which holds for process restarts (the old process is gone
  before the new one accepts calls); if it ever failed, the message would be
  delivered twice and counted as duplicated, so the check cannot pass by
  accident. A call that was not sent because no token could be obtained is
  retried at once (``token_unavailable``);
- **lost**: an acknowledged message that the runner's watcher never
  delivered by the end of the drain;
- **duplicated**: a delivery whose message id, or seq, the watcher had
  already delivered;
- **errors**: anything unexpected: a push failing with another status (or
  with UNAVAILABLE/CANCELLED when no restarts are configured), a watch that
  gives up, a gap in the delivered seqs, a delivered message that the runner
  did not push or with a seq other than the acknowledged one, an
  unacknowledged push still unsettled at the end, an UNAUTHENTICATED retry by
  the client interceptor, a rejection counted by the session server (as it
  reports them at each graceful stop), a runner crash.

After ``--duration`` the pushers stop, settle what is unacknowledged and wait
for their watchers to catch up (at most ``--drain`` seconds). The run is
bounded in time (everything sits under one overall deadline), talks only to
loopback and exits non-zero on any loss, duplicate or error.

The runners share one asyncio event loop (thousands of idle tasks cost less
than threads on a two-core machine); the session server has its own process,
so that restarts are real process restarts and it gets the other core.

Also reported: restarts and the longest outage they caused, channel
reconnects (as the runners' channels observed them; back-to-back restarts
may show as one), watch streams reopened (every attempt after the first,
including those that failed while the server was down), token fetches by
the runners and tokens issued by the control plane, UNAUTHENTICATED retries
by the client interceptor, and the peak RSS of this process and of the
largest child process (``resource.getrusage``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import random
import resource
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from ambient_grpc_auth import aio as aio_client
from ambient_grpc_auth.client._core import status_code_of
from ambient_grpc_auth.client.aio import sessions as aio_sessions
from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.control_plane import ControlPlaneTokenSource
from ambient_grpc_auth.client.sessions import WatchRetryPolicy
from ambient_grpc_auth.client.tokens import StaticTokenSource
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.issuers import DEFAULT_AUDIENCE
from ambient_grpc_auth.controlplane.keys import DEFAULT_SIGNING_ALGORITHM, ensure_keys
from ambient_grpc_auth.controlplane.server import start_token_server
from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.reference.aio import servicer as aio_reference
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.aio.interceptor import ServerAuthInterceptor
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.config import API_TOKEN_ENV, ServerAuthConfig
from ambient_grpc_auth.server.jwks import JwksCache
from ambient_grpc_auth.server.metrics import AuthMetrics

__all__ = ["SoakConfig", "SoakReport", "main", "run_soak"]

_log = logging.getLogger(__name__)

#: Seconds allowed for everything besides the pushing and the drain (key
#: generation, starting processes, creating sessions, closing).
_SETUP_BUDGET = 120.0
_CHILD_READY_TIMEOUT = 60.0
_EVENT_TYPE = "soak"
# Codes a push may end with when the server goes away under it.
_RESTART_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
_CHANNEL_OPTIONS = (
    # A restarted server is found again within a second, not gRPC's default 120 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


@dataclass(frozen=True, kw_only=True)
class SoakConfig:
    """Parameters of a soak run (see the module docstring).

    ``restart_every`` 0 disables restarts; ``keys_dir`` reuses (or creates)
    keys there instead of generating fresh ones in a temporary directory;
    ``leeway`` is the API server's clock leeway for token expiry (kept short
    so that a runner presenting an expired token is noticed).
    Raises :class:`~ambient_grpc_auth.errors.ConfigurationError` for values
    out of range.
    """

    runners: int = 50
    duration: float = 60.0
    ttl: float = 5.0
    restart_every: float = 15.0
    rate: float = 2.0
    payload_bytes: int = 200
    push_timeout: float = 5.0
    drain: float = 30.0
    leeway: float = 1.0
    keys_dir: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.runners <= 2000:
            raise ConfigurationError("runners must be between 1 and 2000")
        if not 0 < self.duration <= 24 * 3600:
            raise ConfigurationError("duration must be positive (at most a day)")
        if not 2 <= self.ttl <= 3600:
            raise ConfigurationError("ttl must be between 2 and 3600 seconds")
        if self.restart_every != 0 and self.restart_every < 1:
            raise ConfigurationError("restart-every must be 0 (never) or at least 1 second")
        if not 0 < self.rate <= 100:
            raise ConfigurationError("rate must be in (0, 100] messages per second per runner")
        if not 0 <= self.payload_bytes <= 64 * 1024:
            raise ConfigurationError("payload-bytes must be between 0 and 65536")
        if not (self.push_timeout > 0 and self.drain > 0 and 0 <= self.leeway <= 300):
            raise ConfigurationError("push-timeout and drain must be positive, leeway 0..300")


@dataclass
class SoakReport:
    """The outcome of a soak run; :attr:`ok` is the verdict."""

    runners: int
    duration: float
    elapsed: float
    keygen_seconds: float
    restarts: int
    max_restart_downtime: float
    pushed: int
    received: int
    unacked_stored: int
    retried: int
    token_unavailable: int
    push_failures: dict[str, int]
    reconnects: int
    watch_reopens: int
    token_fetches: int
    token_fetch_failures: int
    tokens_issued: int
    unauthenticated_retries: int
    server_denials: dict[str, int]
    lost: int
    duplicated: int
    errors: dict[str, int]
    peak_rss_mib: float
    server_peak_rss_mib: float

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.error_count == 0

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["error_count"] = self.error_count
        doc["ok"] = self.ok
        return doc

    def format_text(self) -> str:
        failures = ", ".join(f"{k} {v}" for k, v in sorted(self.push_failures.items())) or "none"
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        lines = [
            f"soak: {self.runners} runners, {self.duration:g}s pushing, {self.restarts} "
            f"session-server restarts (longest outage {self.max_restart_downtime:.1f}s), "
            f"{self.elapsed:.1f}s in all (key generation {self.keygen_seconds:.1f}s)",
            f"messages pushed (acknowledged) {self.pushed}, received {self.received}, "
            f"unacknowledged but stored {self.unacked_stored}, retried after verification "
            f"{self.retried}",
            f"push failures without reply: {failures}; calls not sent for lack of a token "
            f"{self.token_unavailable}",
            f"channel reconnects {self.reconnects}, watch streams reopened "
            f"{self.watch_reopens} (attempts, failed ones included), token fetches "
            f"{self.token_fetches} (failed {self.token_fetch_failures}, issued by the control "
            f"plane {self.tokens_issued}), UNAUTHENTICATED retries {self.unauthenticated_retries}",
            f"lost {self.lost}, duplicated {self.duplicated}, errors {self.error_count} ({errors})",
            f"peak RSS: soak process {self.peak_rss_mib:.1f} MiB, session server "
            f"{self.server_peak_rss_mib:.1f} MiB",
            "result: " + ("OK" if self.ok else "FAILED"),
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------- ledger


@dataclass
class _Fence:
    seq: int
    ids: list[int]


@dataclass
class _Ledger:
    """One runner's bookkeeping of pushes and deliveries (pure; used from one
    event loop). Implements the definitions in the module docstring."""

    acked: dict[int, int] = field(default_factory=dict)  # message id -> seq
    delivered: dict[int, int] = field(default_factory=dict)  # message id -> first seq
    received: int = 0
    last_seq: int = 0
    duplicated: int = 0
    unacked_stored: int = 0
    retried: int = 0
    token_unavailable: int = 0
    push_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    uncertain: list[int] = field(default_factory=list)  # failed, no later ack yet
    fences: collections.deque[_Fence] = field(default_factory=collections.deque)
    retry: collections.deque[int] = field(default_factory=collections.deque)

    def on_ack(self, message_id: int, seq: int) -> None:
        """A push returned: record it and open a fence for earlier failures."""
        if message_id in self.acked:
            self.errors["acked_twice"] += 1
        self.acked[message_id] = seq
        if self.uncertain:
            self.fences.append(_Fence(seq, self.uncertain))
            self.uncertain = []
            self._settle()

    def on_failure(self, message_id: int) -> None:
        """A push failed without a reply: its fate is settled by a later ack."""
        self.uncertain.append(message_id)

    def on_delivery(self, message_id: int | None, seq: int) -> None:
        """The watcher delivered ``seq`` carrying ``message_id`` (None: not ours)."""
        self.received += 1
        if seq <= self.last_seq:
            self.duplicated += 1
            return
        if seq != self.last_seq + 1:
            self.errors["gap"] += 1
        self.last_seq = seq
        if message_id is None:
            self.errors["foreign_message"] += 1
        elif message_id in self.delivered:
            self.duplicated += 1
        else:
            self.delivered[message_id] = seq
            acked = self.acked.get(message_id)
            if acked is not None and acked != seq:
                self.errors["seq_mismatch"] += 1
        self._settle()

    def _settle(self) -> None:
        # Everything up to a fence's seq has been delivered: a failed push is
        # stored iff it was seen; otherwise it provably was not, so retry it.
        while self.fences and self.fences[0].seq <= self.last_seq:
            for message_id in self.fences.popleft().ids:
                if message_id in self.delivered:
                    self.unacked_stored += 1
                else:
                    self.retried += 1
                    self.retry.append(message_id)

    @property
    def unsettled(self) -> int:
        return len(self.uncertain) + len(self.retry) + sum(len(f.ids) for f in self.fences)

    @property
    def max_acked_seq(self) -> int:
        return max(self.acked.values(), default=0)

    def lost(self) -> list[int]:
        """Acknowledged ids the watcher never delivered."""
        return [i for i in self.acked if i not in self.delivered]


def _payload(runner: int, message_id: int, pad: str) -> str:
    return f"soak r={runner} m={message_id} {pad}"


def _message_id(runner: int, payload: str) -> int | None:
    parts = payload.split(" ", 3)
    if len(parts) < 3 or parts[0] != "soak" or parts[1] != f"r={runner}":
        return None
    if not parts[2].startswith("m=") or not parts[2][2:].isdigit():
        return None
    return int(parts[2][2:])


def _code_of(err: grpc.RpcError) -> grpc.StatusCode:
    code = status_code_of(err)
    return grpc.StatusCode.UNKNOWN if code is None else code


# --------------------------------------------------------------------------- session server


class _SessionServerProcess:
    """The reference aio SessionService in a child process (see :func:`_session_server_child`).

    ``start(port)`` launches it (0: any free port) and returns the bound port;
    ``stop(kill=...)`` ends it with SIGTERM (graceful, returns the child's
    final auth metrics) or SIGKILL. The spec, including the static service
    token, travels over the child's stdin, never its command line. When this
    process dies the child's stdin closes and it exits by itself.
    """

    def __init__(self, spec: Mapping[str, Any], log_path: str) -> None:
        self._spec = dict(spec)
        self._log_path = log_path
        # Opened once here (not on the event loop); every child appends to it.
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed by close())
        self._proc: asyncio.subprocess.Process | None = None

    def close(self) -> None:
        """Release the log file (after the last :meth:`stop`)."""
        self._log.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, port: int) -> int:
        if self._proc is not None:
            raise RuntimeError("session server already running")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys; from bench.soak import _session_server_child as m; sys.exit(m())",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
        )
        self._proc = proc
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write((json.dumps({**self._spec, "port": port}) + "\n").encode())
        await proc.stdin.drain()
        try:
            async with asyncio.timeout(_CHILD_READY_TIMEOUT):
                line = await proc.stdout.readline()
            bound = int(json.loads(line)["ready"])
        except (TimeoutError, ValueError, KeyError, TypeError):
            await self.stop(kill=True)
            raise RuntimeError(
                f"session server did not start; see {self._log_path}:\n{self._log_tail()}"
            ) from None
        return bound

    async def stop(self, *, kill: bool, grace_timeout: float = 15.0) -> dict[str, Any] | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        assert proc.stdout is not None
        assert proc.stdin is not None
        metrics: dict[str, Any] | None = None
        with contextlib.suppress(ProcessLookupError):
            if kill:
                proc.kill()
            else:
                proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace_timeout):
                if not kill:
                    line = await proc.stdout.readline()
                    with contextlib.suppress(ValueError, TypeError, KeyError):
                        metrics = dict(json.loads(line)["metrics"])
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        proc.stdin.close()
        return metrics

    def _log_tail(self) -> str:
        try:
            return Path(self._log_path).read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


def _session_server_child() -> int:
    """Child process entry: serve until SIGTERM/SIGINT or stdin EOF.

    Reads one JSON line from stdin (``db``, ``port``, ``issuer``,
    ``jwks_url``, ``audience``, ``leeway``, ``service_token``, ``grace``),
    prints ``{"ready": port}`` once serving and ``{"metrics": ...}`` after a
    graceful stop.
    """
    spec = json.loads(sys.stdin.readline())
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    return asyncio.run(_serve_sessions(spec))


async def _serve_sessions(spec: Mapping[str, Any]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def watch_stdin() -> None:
        # EOF: the parent is gone (or done with us); never outlive it.
        sys.stdin.read()
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    store = SessionStore(spec["db"])
    issuer = TrustedIssuer(
        issuer=spec["issuer"],
        audiences=(spec["audience"],),
        keys=JwksCache(spec["jwks_url"], cooldown=1.0),
        # What the soak's token server signs with (a fresh key directory).
        algorithms=(DEFAULT_SIGNING_ALGORITHM,),
        leeway=float(spec["leeway"]),
        control_plane=True,
    )
    metrics = AuthMetrics()
    config = ServerAuthConfig.from_env(
        environ={API_TOKEN_ENV: spec["service_token"]},
        issuers=[issuer],
        owner_lookup=store.owner_of,
        metrics=metrics,
    )
    server, port = await aio_reference.serve(
        store,
        f"127.0.0.1:{int(spec['port'])}",
        interceptors=[ServerAuthInterceptor(config=config)],
    )
    print(json.dumps({"ready": port}), flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(float(spec.get("grace", 1.0)))
        store.close()
    snap = metrics.snapshot()
    print(
        json.dumps({"metrics": {"allowed": snap.allowed, "denied": dict(snap.denied)}}),
        flush=True,
    )
    return 0


# --------------------------------------------------------------------------- runners


@dataclass
class _RunnerResult:
    ledger: _Ledger
    reconnects: int
    streams: int
    fetches: int
    fetch_failures: int
    unauthenticated_retries: int


class _Runner:
    def __init__(
        self,
        index: int,
        session_id: str,
        *,
        target: str,
        token_url: str,
        public_pem: str,
        config: SoakConfig,
    ) -> None:
        self.index = index
        self.session_id = session_id
        self.target = target
        self.config = config
        self.ledger = _Ledger()
        self.source = CachingTokenSource(
            ControlPlaneTokenSource(token_url, public_pem, session_id, timeout=5.0, attempts=3),
            min_backoff=0.2,
            max_backoff=2.0,
        )
        self._pad = "x" * config.payload_bytes
        self._progress = asyncio.Event()
        self._rng = random.Random(index)
        self._restarts_expected = config.restart_every > 0
        self._next_id = 1

    async def run(self, stop_at: float, drain_until: float) -> _RunnerResult:
        channel = aio_client.create_channel(
            self.target, self.source, tls=False, options=_CHANNEL_OPTIONS
        )
        watch = aio_sessions.watch(
            channel, self.session_id, policy=WatchRetryPolicy(base_delay=0.05, max_delay=1.0)
        )
        watcher = asyncio.get_running_loop().create_task(self._watch(watch))
        try:
            await self._push_until(channel, stop_at)
            await self._drain(channel, drain_until, watcher)
        finally:
            watch.close()
            watcher.cancel()
            await asyncio.wait([watcher])
            await channel.close()
        return _RunnerResult(
            ledger=self.ledger,
            reconnects=channel.reconnects,
            streams=watch.streams,
            fetches=self.source.fetches,
            fetch_failures=self.source.failures,
            unauthenticated_retries=channel.interceptor.unauthenticated_retries,
        )

    async def _watch(self, watch: aio_sessions.SessionWatch) -> None:
        ledger = self.ledger
        try:
            async for message in watch:
                ledger.on_delivery(_message_id(self.index, message.payload), message.seq)
                self._progress.set()
        except grpc.aio.AioRpcError as err:
            ledger.errors[f"watch:{_code_of(err).name}"] += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            ledger.errors[f"watch_crash:{type(exc).__name__}"] += 1

    async def _push(self, channel: grpc.aio.Channel, message_id: int) -> bool:
        ledger = self.ledger
        try:
            reply = await aio_sessions.push(
                channel,
                self.session_id,
                _EVENT_TYPE,
                _payload(self.index, message_id, self._pad),
                timeout=self.config.push_timeout,
            )
        except grpc.aio.AioRpcError as err:
            code = _code_of(err)
            if getattr(err, "token_error", None) is not None:
                # Never sent: nothing to settle, push it again.
                ledger.token_unavailable += 1
                ledger.retry.appendleft(message_id)
            else:
                ledger.on_failure(message_id)
                ledger.push_failures[code.name] += 1
                if code not in _RESTART_CODES or not self._restarts_expected:
                    ledger.errors[f"push:{code.name}"] += 1
            return False
        ledger.on_ack(message_id, reply.seq)
        return True

    async def _push_until(self, channel: grpc.aio.Channel, stop_at: float) -> None:
        interval = 1.0 / self.config.rate
        loop = asyncio.get_running_loop()
        # Spread the runners' first pushes over one interval.
        await asyncio.sleep(self._rng.uniform(0, interval))
        while loop.time() < stop_at:
            message_id = self.ledger.retry.popleft() if self.ledger.retry else self._take_id()
            ok = await self._push(channel, message_id)
            pause = interval if ok else self._rng.uniform(0.2, 0.5)
            await asyncio.sleep(min(pause, max(0.0, stop_at - loop.time())))

    async def _drain(
        self, channel: grpc.aio.Channel, drain_until: float, watcher: asyncio.Task[None]
    ) -> None:
        """Settle unacknowledged pushes, then wait for the watcher to catch up."""
        ledger = self.ledger
        loop = asyncio.get_running_loop()
        while loop.time() < drain_until and not watcher.done():
            if ledger.retry:
                ok = await self._push(channel, ledger.retry.popleft())
            elif ledger.uncertain:
                # A fence: any acknowledged push settles the failures before it.
                ok = await self._push(channel, self._take_id())
            elif ledger.fences or ledger.last_seq < ledger.max_acked_seq:
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(1.0, max(0.0, drain_until - loop.time()))):
                        await self._progress.wait()
                continue
            else:
                return
            if not ok:
                await asyncio.sleep(self._rng.uniform(0.2, 0.5))

    def _take_id(self) -> int:
        message_id: int = self._next_id
        self._next_id += 1
        return message_id


# --------------------------------------------------------------------------- the run


async def _create_sessions(target: str, service_token: str, count: int) -> list[str]:
    """Sessions created up front by a service caller (the static token)."""
    async with aio_client.create_channel(
        target, StaticTokenSource(service_token), tls=False, watch_reconnects=False
    ) as channel:
        stub = sessions_pb2_grpc.SessionServiceStub(channel)  # type: ignore[no-untyped-call]
        sessions: list[str] = []
        for i in range(count):
            created = await stub.CreateSession(
                sessions_pb2.CreateSessionRequest(name=f"soak-{i}"),
                timeout=10.0,
                wait_for_ready=True,
            )
            sessions.append(created.metadata.id)
        return sessions


async def _restart_loop(
    server: _SessionServerProcess,
    port: int,
    every: float,
    stop_at: float,
    restarts: list[dict[str, Any] | None],
    downtimes: list[float],
) -> None:
    """Restart at every multiple of ``every`` before ``stop_at`` (a restart
    that overruns its slot delays the next one), alternately graceful and killed."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    slot = 1
    while start + slot * every < stop_at:
        await asyncio.sleep(max(0.0, start + slot * every - loop.time()))
        slot += 1
        kill = len(restarts) % 2 == 1
        began = loop.time()
        restarts.append(await server.stop(kill=kill))
        await server.start(port)
        downtimes.append(loop.time() - began)


def _rss_mib(who: int) -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(who).ru_maxrss / 1024.0


async def run_soak(
    config: SoakConfig, *, progress: Callable[[str], None] | None = None
) -> SoakReport:
    """Run the soak described by ``config`` and return its report.

    ``progress`` receives short status lines. Raises TimeoutError if the run
    overruns its overall deadline (duration + drain + a setup budget), and
    RuntimeError if the session server cannot be started.
    """
    say = progress or (lambda _line: None)
    started = time.monotonic()
    async with asyncio.timeout(config.duration + config.drain + _SETUP_BUDGET):
        with tempfile.TemporaryDirectory(prefix="ambient-soak-") as tmp:
            return await _run(config, Path(tmp), say, started)


async def _run(
    config: SoakConfig, tmp: Path, say: Callable[[str], None], started: float
) -> SoakReport:
    keys_dir = Path(config.keys_dir) if config.keys_dir else tmp / "keys"
    t0 = time.monotonic()
    say(f"preparing control-plane keys in {keys_dir} (RSA-4096 generation takes a few seconds)")
    keys = await asyncio.to_thread(ensure_keys, keys_dir)
    keygen = time.monotonic() - t0
    cp = await start_token_server(
        TokenServerConfig(keys_dir=keys_dir, ttl=config.ttl, signing_key_check_interval=3600)
    )
    service_token = secrets.token_urlsafe(32)
    server = _SessionServerProcess(
        {
            "db": str(tmp / "sessions.db"),
            "issuer": cp.url,
            "jwks_url": cp.jwks_url,
            "audience": DEFAULT_AUDIENCE,
            "leeway": config.leeway,
            "service_token": service_token,
            "grace": 1.0,
        },
        str(tmp / "session-server.log"),
    )
    restarts: list[dict[str, Any] | None] = []
    downtimes: list[float] = []
    final_metrics: dict[str, Any] | None = None
    try:
        port = await server.start(0)
        target = f"127.0.0.1:{port}"
        sessions = await _create_sessions(target, service_token, config.runners)
        say(f"{config.runners} sessions on {target}; token endpoint {cp.token_url}")
        runners = [
            _Runner(
                i,
                sid,
                target=target,
                token_url=cp.token_url,
                public_pem=keys.public_pem,
                config=config,
            )
            for i, sid in enumerate(sessions)
        ]
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + config.duration
        drain_until = stop_at + config.drain
        restarter: asyncio.Task[None] | None = None
        if config.restart_every > 0:
            restarter = loop.create_task(
                _restart_loop(server, port, config.restart_every, stop_at, restarts, downtimes)
            )
        outcomes = await asyncio.gather(
            *(r.run(stop_at, drain_until) for r in runners), return_exceptions=True
        )
        if restarter is not None:
            await restarter
        final_metrics = await server.stop(kill=False)
    finally:
        await server.stop(kill=True)
        server.close()
        await cp.close()
    say("done")
    report = _report(config, outcomes, restarts, final_metrics, _issued(cp), keygen, started)
    report.max_restart_downtime = round(max(downtimes, default=0.0), 2)
    return report


def _issued(cp: Any) -> int:
    return int(cp.counters.snapshot().get("issued", 0))


def _report(
    config: SoakConfig,
    outcomes: Sequence[_RunnerResult | BaseException],
    restarts: Sequence[dict[str, Any] | None],
    final_metrics: dict[str, Any] | None,
    issued: int,
    keygen: float,
    started: float,
) -> SoakReport:
    errors: collections.Counter[str] = collections.Counter()
    failures: collections.Counter[str] = collections.Counter()
    denials: collections.Counter[str] = collections.Counter()
    totals = collections.Counter[str]()
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            errors[f"runner_crash:{type(outcome).__name__}"] += 1
            continue
        ledger = outcome.ledger
        errors.update(ledger.errors)
        failures.update(ledger.push_failures)
        if ledger.unsettled:
            errors["unsettled_push"] += ledger.unsettled
        if outcome.unauthenticated_retries:
            errors["unauthenticated_retry"] += outcome.unauthenticated_retries
        totals.update(
            pushed=len(ledger.acked),
            received=ledger.received,
            unacked_stored=ledger.unacked_stored,
            retried=ledger.retried,
            token_unavailable=ledger.token_unavailable,
            reconnects=outcome.reconnects,
            watch_reopens=max(0, outcome.streams - 1),
            fetches=outcome.fetches,
            fetch_failures=outcome.fetch_failures,
            unauth=outcome.unauthenticated_retries,
            lost=len(ledger.lost()),
            duplicated=ledger.duplicated,
        )
    for metrics in (*restarts, final_metrics):
        if metrics:
            denials.update({str(k): int(v) for k, v in dict(metrics.get("denied", {})).items()})
    if denials:
        errors["server_denial"] += sum(denials.values())
    return SoakReport(
        runners=config.runners,
        duration=config.duration,
        elapsed=round(time.monotonic() - started, 2),
        keygen_seconds=round(keygen, 2),
        restarts=len(restarts),
        max_restart_downtime=0.0,
        pushed=totals["pushed"],
        received=totals["received"],
        unacked_stored=totals["unacked_stored"],
        retried=totals["retried"],
        token_unavailable=totals["token_unavailable"],
        push_failures=dict(failures),
        reconnects=totals["reconnects"],
        watch_reopens=totals["watch_reopens"],
        token_fetches=totals["fetches"],
        token_fetch_failures=totals["fetch_failures"],
        tokens_issued=issued,
        unauthenticated_retries=totals["unauth"],
        server_denials=dict(denials),
        lost=totals["lost"],
        duplicated=totals["duplicated"],
        errors=dict(errors),
        peak_rss_mib=round(_rss_mib(resource.RUSAGE_SELF), 1),
        server_peak_rss_mib=round(_rss_mib(resource.RUSAGE_CHILDREN), 1),
    )


# --------------------------------------------------------------------------- CLI


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ambient-grpc-auth soak",
        description="Soak run on loopback: runners push and watch through session-server "
        "restarts with short-lived tokens; exits 1 on any loss, duplicate or error.",
    )
    p.add_argument("--runners", type=int, default=50, help="concurrent runners (default 50)")
    p.add_argument("--duration", type=_positive, default=60.0, help="seconds of pushing (60)")
    p.add_argument("--ttl", type=_positive, default=5.0, help="token lifetime in seconds (5)")
    p.add_argument(
        "--restart-every",
        type=float,
        default=15.0,
        help="seconds between session-server restarts; 0 disables (15)",
    )
    p.add_argument("--rate", type=_positive, default=2.0, help="pushes/s per runner (2)")
    p.add_argument("--payload-bytes", type=int, default=200, help="payload padding (200)")
    p.add_argument("--drain", type=_positive, default=30.0, help="max seconds to settle (30)")
    p.add_argument("--leeway", type=float, default=1.0, help="server exp leeway, seconds (1)")
    p.add_argument("--keys-dir", help="use (or create) control-plane keys in this directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _run_report_cli(
    name: str,
    argv: Sequence[str] | None,
    parser: argparse.ArgumentParser,
    make_config: Callable[[argparse.Namespace], Any],
    run: Callable[..., Any],
) -> int:
    """The shared shape of the soak and load entry points: parse, build the
    config (ConfigurationError -> exit 2), run with progress on stderr, print
    the report (text or --json); exit 0 when the report is ok, else 1."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--"]:  # "ambient-grpc-auth <command> -- --option ..." passes it on
        args_list = args_list[1:]
    args = parser.parse_args(args_list)
    try:
        config = make_config(args)
    except ConfigurationError as exc:
        print(f"ambient-grpc-auth {name}: error: {exc}", file=sys.stderr)
        return 2

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"{name}: {line}", file=sys.stderr, flush=True)

    report = asyncio.run(run(config, progress=progress))
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        print(report.format_text())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: run the soak and print its report; 0 when nothing was lost,
    duplicated or unexpected, 1 otherwise, 2 for bad arguments."""

    def make_config(args: argparse.Namespace) -> SoakConfig:
        return SoakConfig(
            runners=args.runners,
            duration=args.duration,
            ttl=args.ttl,
            restart_every=args.restart_every,
            rate=args.rate,
            payload_bytes=args.payload_bytes,
            drain=args.drain,
            leeway=args.leeway,
            keys_dir=args.keys_dir,
        )

    return _run_report_cli("soak", argv, _parser(), make_config, run_soak)


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    sys.exit(main())
