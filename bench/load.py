"""Load run: many concurrent authenticated watch streams against one server.

``ambient-grpc-auth load`` (or :func:`main`) runs three processes on 127.0.0.1:

- this one: the control plane's token endpoint (keys generated into a
  temporary directory unless ``--keys-dir`` is given; RSA-4096 takes a few
  seconds) and a pusher, a service caller with the static token that pushes
  to the sessions round robin at ``--rate`` messages per second in all;
- the session server: the reference ``grpc.aio`` SessionService behind
  :class:`~ambient_grpc_auth.server.aio.interceptor.ServerAuthInterceptor` (the same child
  process as :mod:`bench.soak` uses), alone in its process so
  that its memory can be measured honestly;
- the clients: ``--streams`` runners (default 500), each with its own
  session, control-plane token source, caching source, authenticated
  ``grpc.aio`` channel and :func:`~ambient_grpc_auth.client.aio.sessions.watch`.

Sequence: create one session per stream and push a first message to each;
measure the server's resident memory; start the clients (at most
``--ramp`` streams opening at once) and wait until every watcher has
received its first message; measure again; push for ``--duration`` seconds;
then tell the clients which seq each session ended at, wait for them to
catch up, and compare.

Reported: streams opened and how long that took, messages pushed and
delivered, lost (pushed but not delivered) and duplicated deliveries, errors,
delivery latency, the server's RSS before, with all streams open and at the
end, and the per-stream cost (RSS delta / streams), plus the client process's
peak RSS. Exits non-zero unless every stream opened and nothing was lost,
duplicated or failed. Bounded in time; talks to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import resource
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from ambient_grpc_auth import aio as aio_client
from ambient_grpc_auth.client.aio import sessions as aio_sessions
from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.control_plane import ControlPlaneTokenSource
from ambient_grpc_auth.client.sessions import WatchRetryPolicy
from ambient_grpc_auth.client.tokens import StaticTokenSource
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.issuers import DEFAULT_AUDIENCE
from ambient_grpc_auth.controlplane.keys import ensure_keys
from ambient_grpc_auth.controlplane.server import start_token_server
from ambient_grpc_auth.errors import ConfigurationError
from bench.soak import _create_sessions, _positive, _run_report_cli, _SessionServerProcess

__all__ = ["LoadConfig", "LoadReport", "main", "run_load"]

_log = logging.getLogger(__name__)

_SETUP_BUDGET = 180.0
_CATCH_UP_TIMEOUT = 30.0
_EVENT_TYPE = "load"


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    """Parameters of a load run (see the module docstring); values out of
    range raise :class:`~ambient_grpc_auth.errors.ConfigurationError`."""

    streams: int = 500
    duration: float = 30.0
    rate: float = 100.0
    ttl: float = 900.0
    ramp: int = 32
    open_timeout: float = 120.0
    keys_dir: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.streams <= 5000:
            raise ConfigurationError("streams must be between 1 and 5000")
        if not 0 < self.duration <= 3600:
            raise ConfigurationError("duration must be positive (at most an hour)")
        if not 0 < self.rate <= 10_000:
            raise ConfigurationError("rate must be in (0, 10000] messages per second")
        if not 10 <= self.ttl <= 24 * 3600:
            raise ConfigurationError("ttl must be between 10 seconds and a day")
        if not 1 <= self.ramp <= 1000 or not self.open_timeout > 0:
            raise ConfigurationError("ramp must be 1..1000 and open-timeout positive")


@dataclass
class LoadReport:
    """The outcome of a load run; :attr:`ok` is the verdict."""

    streams: int
    streams_open: int
    open_seconds: float
    duration: float
    pushed: int
    delivered: int
    lost: int
    duplicated: int
    errors: dict[str, int]
    latency_ms_p50: float
    latency_ms_p99: float
    latency_ms_max: float
    tokens_issued: int
    server_rss_base_mib: float
    server_rss_open_mib: float
    server_rss_end_mib: float
    server_kib_per_stream: float
    client_peak_rss_mib: float
    client_kib_per_stream: float

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def ok(self) -> bool:
        return (
            self.streams_open == self.streams
            and self.lost == 0
            and self.duplicated == 0
            and self.error_count == 0
        )

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["error_count"] = self.error_count
        doc["ok"] = self.ok
        return doc

    def format_text(self) -> str:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        return "\n".join(
            [
                f"load: {self.streams_open}/{self.streams} authenticated watch streams open "
                f"(in {self.open_seconds:.1f}s), held {self.duration:g}s",
                f"messages pushed {self.pushed}, delivered {self.delivered}, lost {self.lost}, "
                f"duplicated {self.duplicated}, errors {self.error_count} ({errors})",
                f"delivery latency p50 {self.latency_ms_p50:.1f} ms, p99 "
                f"{self.latency_ms_p99:.1f} ms, max {self.latency_ms_max:.1f} ms; tokens "
                f"issued {self.tokens_issued}",
                f"session server RSS: {self.server_rss_base_mib:.1f} MiB before, "
                f"{self.server_rss_open_mib:.1f} MiB with the streams open, "
                f"{self.server_rss_end_mib:.1f} MiB at the end -> "
                f"{self.server_kib_per_stream:.1f} KiB per stream",
                f"client process peak RSS {self.client_peak_rss_mib:.1f} MiB "
                f"({self.client_kib_per_stream:.1f} KiB per stream, all runner state included)",
                "result: " + ("OK" if self.ok else "FAILED"),
            ]
        )


def _rss_kib(pid: int | None) -> float:
    """Resident set size of ``pid`` in KiB (Linux /proc; 0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------- client process


class _ClientProcess:
    """The runners, in a child process (:func:`_load_client_child`). Lines of
    JSON both ways: the spec and later the expected seqs go to its stdin;
    progress and the final report come from its stdout."""

    def __init__(self, log_path: str) -> None:
        # Opened here, not on the event loop; closed by close().
        self._log = open(log_path, "ab")  # noqa: SIM115
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self, spec: Mapping[str, Any]) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys; from bench.load import _load_client_child as m; sys.exit(m())",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
            limit=64 * 1024 * 1024,
        )
        await self.send(spec)

    async def send(self, doc: Mapping[str, Any]) -> None:
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write((json.dumps(doc) + "\n").encode())
        await self._proc.stdin.drain()

    async def receive(self, key: str, within: float) -> dict[str, Any]:
        """The next line (a JSON object) holding ``key``, waiting at most
        ``within`` seconds (TimeoutError); other lines are skipped."""
        assert self._proc is not None
        assert self._proc.stdout is not None
        async with asyncio.timeout(within):
            while True:
                line = await self._proc.stdout.readline()
                if not line:
                    raise RuntimeError("load client exited early")
                doc = json.loads(line)
                if isinstance(doc, dict) and key in doc:
                    return doc

    async def close(self) -> None:
        """Close its stdin (it finishes and exits), kill it after 15 s."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self._log.close()


def _load_client_child() -> int:
    """Client process entry: open the watch streams described on stdin."""
    spec = json.loads(sys.stdin.readline())
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    return asyncio.run(_run_clients(spec))


def _emit(doc: Mapping[str, Any]) -> None:
    print(json.dumps(doc), flush=True)


@dataclass
class _Stream:
    session_id: str
    received: int = 0
    last_seq: int = 0
    duplicated: int = 0
    gaps: int = 0
    error: str | None = None
    opened: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    progress: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


async def _run_clients(spec: Mapping[str, Any]) -> int:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[Any] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(commands.put_nowait, None)

    threading.Thread(target=read_stdin, name="stdin-reader", daemon=True).start()
    streams = [_Stream(sid) for sid in spec["sessions"]]
    latencies: list[float] = []
    ramp = asyncio.Semaphore(int(spec["ramp"]))
    channels: list[aio_client.AuthenticatedChannel] = []
    watches: list[aio_sessions.SessionWatch] = []
    sources: list[CachingTokenSource] = []

    async def run_stream(stream: _Stream) -> None:
        await ramp.acquire()
        released = False
        try:
            source = CachingTokenSource(
                ControlPlaneTokenSource(
                    spec["token_url"], spec["public_pem"], stream.session_id, attempts=5
                )
            )
            sources.append(source)
            channel = aio_client.create_channel(spec["target"], source, tls=False)
            channels.append(channel)
            watch = aio_sessions.watch(
                channel, stream.session_id, policy=WatchRetryPolicy(max_delay=1.0)
            )
            watches.append(watch)
            async for message in watch:
                if message.seq <= stream.last_seq:
                    stream.duplicated += 1
                    continue
                if message.seq != stream.last_seq + 1:
                    stream.gaps += 1
                stream.last_seq = message.seq
                stream.received += 1
                sent_at = _sent_at(message.payload)
                if sent_at is not None:
                    latencies.append(time.time() - sent_at)
                if not released:
                    released = True
                    ramp.release()
                    stream.opened.set()
                stream.progress.set()
        except grpc.aio.AioRpcError as err:
            stream.error = f"watch:{err.code().name}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            stream.error = f"crash:{type(exc).__name__}"
        finally:
            if not released:
                ramp.release()
            stream.progress.set()

    started = time.monotonic()
    tasks = [loop.create_task(run_stream(s)) for s in streams]

    async def report_opening() -> None:
        opened = 0
        for stream in streams:
            await stream.opened.wait()
            opened += 1
            if opened % 50 == 0:
                _emit({"progress": opened})
        _emit({"ready": opened, "seconds": round(time.monotonic() - started, 2)})

    reporter = loop.create_task(report_opening())
    expected: dict[str, int] = {}
    while True:
        command = await commands.get()
        if command is None:
            break
        if "expect" in command:
            expected = {str(k): int(v) for k, v in command["expect"].items()}
            break
    reporter.cancel()
    by_id = {s.session_id: s for s in streams}
    deadline = loop.time() + float(spec.get("catch_up_timeout", _CATCH_UP_TIMEOUT))
    for sid, seq in expected.items():
        stream = by_id[sid]
        while stream.last_seq < seq and stream.error is None and loop.time() < deadline:
            stream.progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await stream.progress.wait()
    for watch in watches:
        watch.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, reporter, return_exceptions=True)
    await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
    errors: dict[str, int] = {}
    for stream in streams:
        if stream.error is not None:
            errors[stream.error] = errors.get(stream.error, 0) + 1
        if stream.gaps:
            errors["gap"] = errors.get("gap", 0) + stream.gaps
    _emit(
        {
            "final": {
                "received": {s.session_id: s.received for s in streams},
                "last_seq": {s.session_id: s.last_seq for s in streams},
                "duplicated": sum(s.duplicated for s in streams),
                "errors": errors,
                "opened": sum(1 for s in streams if s.opened.is_set()),
                "latency_ms": [
                    round(1000 * _percentile(latencies, q), 2) for q in (0.5, 0.99, 1.0)
                ],
                "token_fetches": sum(s.fetches for s in sources),
                "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        }
    )
    return 0


def _payload(sent_at: float, index: int, *, timed: bool) -> str:
    return f"{'load' if timed else 'hello'} t={sent_at:.6f} n={index}"


def _sent_at(payload: str) -> float | None:
    """The send time of a timed message (first messages are replayed late
    on purpose, so they carry none)."""
    parts = payload.split(" ")
    if len(parts) < 2 or parts[0] != "load" or not parts[1].startswith("t="):
        return None
    try:
        return float(parts[1][2:])
    except ValueError:
        return None


# --------------------------------------------------------------------------- coordinator


async def _push_all(
    target: str,
    service_token: str,
    sessions: Sequence[str],
    *,
    rate: float,
    until: float | None,
    acked: dict[str, list[int]],
    errors: dict[str, int],
) -> None:
    """Push round robin at ``rate``/s until ``until`` (loop time); with
    ``until`` None push exactly one message to every session."""
    loop = asyncio.get_running_loop()
    async with aio_client.create_channel(
        target, StaticTokenSource(service_token), tls=False, watch_reconnects=False
    ) as channel:
        interval = 1.0 / rate
        next_at = loop.time()
        index = 0
        while True:
            if until is None and index >= len(sessions):
                return
            if until is not None and loop.time() >= until:
                return
            sid = sessions[index % len(sessions)]
            try:
                reply = await aio_sessions.push(
                    channel,
                    sid,
                    _EVENT_TYPE,
                    _payload(time.time(), index, timed=until is not None),
                    timeout=10,
                )
            except grpc.aio.AioRpcError as err:
                key = f"push:{err.code().name}"
                errors[key] = errors.get(key, 0) + 1
            else:
                acked.setdefault(sid, []).append(reply.seq)
            index += 1
            if until is not None:
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - loop.time()))


async def run_load(
    config: LoadConfig, *, progress: Callable[[str], None] | None = None
) -> LoadReport:
    """Run the load described by ``config`` and return its report. Raises
    TimeoutError if the run overruns its overall deadline and RuntimeError
    if a child process fails to start."""
    say = progress or (lambda _line: None)
    budget = config.duration + config.open_timeout + _CATCH_UP_TIMEOUT + _SETUP_BUDGET
    async with asyncio.timeout(budget):
        with tempfile.TemporaryDirectory(prefix="ambient-load-") as tmp:
            return await _run(config, Path(tmp), say)


async def _run(config: LoadConfig, tmp: Path, say: Callable[[str], None]) -> LoadReport:
    keys_dir = Path(config.keys_dir) if config.keys_dir else tmp / "keys"
    say(f"preparing control-plane keys in {keys_dir} (RSA-4096 generation takes a few seconds)")
    keys = await asyncio.to_thread(ensure_keys, keys_dir)
    cp = await start_token_server(
        TokenServerConfig(keys_dir=keys_dir, ttl=config.ttl, max_pending_requests=1024)
    )
    service_token = secrets.token_urlsafe(32)
    server = _SessionServerProcess(
        {
            "db": str(tmp / "sessions.db"),
            "issuer": cp.url,
            "jwks_url": cp.jwks_url,
            "audience": DEFAULT_AUDIENCE,
            "leeway": 30.0,
            "service_token": service_token,
            "grace": 1.0,
        },
        str(tmp / "session-server.log"),
    )
    clients = _ClientProcess(str(tmp / "clients.log"))
    errors: dict[str, int] = {}
    acked: dict[str, list[int]] = {}
    try:
        port = await server.start(0)
        target = f"127.0.0.1:{port}"
        sessions = await _create_sessions(target, service_token, config.streams)
        # One message per session: a watcher that has it has an open stream.
        await _push_all(
            target, service_token, sessions, rate=1.0, until=None, acked=acked, errors=errors
        )
        await asyncio.sleep(0.5)
        base = _rss_kib(server.pid)
        say(f"{config.streams} sessions ready; server RSS {base / 1024:.1f} MiB; opening streams")
        await clients.start(
            {
                "target": target,
                "token_url": cp.token_url,
                "public_pem": keys.public_pem,
                "sessions": sessions,
                "ramp": config.ramp,
            }
        )
        try:
            ready = await clients.receive("ready", config.open_timeout)
            open_seconds = float(ready["seconds"])
        except TimeoutError:
            open_seconds = config.open_timeout
            errors["streams_not_open_in_time"] = 1
        await asyncio.sleep(0.5)
        open_rss = _rss_kib(server.pid)
        say(f"streams open in {open_seconds:.1f}s; server RSS {open_rss / 1024:.1f} MiB; pushing")
        loop = asyncio.get_running_loop()
        await _push_all(
            target,
            service_token,
            sessions,
            rate=config.rate,
            until=loop.time() + config.duration,
            acked=acked,
            errors=errors,
        )
        end_rss = _rss_kib(server.pid)
        expect = {sid: max(seqs) for sid, seqs in acked.items()}
        await clients.send({"expect": expect})
        final = (await clients.receive("final", _CATCH_UP_TIMEOUT + 30))["final"]
    finally:
        await clients.close()
        await server.stop(kill=False)
        server.close()
        issued = int(cp.counters.snapshot().get("issued", 0))
        await cp.close()
    return _report(config, final, acked, errors, (base, open_rss, end_rss), open_seconds, issued)


def _report(
    config: LoadConfig,
    final: Mapping[str, Any],
    acked: Mapping[str, list[int]],
    errors: dict[str, int],
    rss: tuple[float, float, float],
    open_seconds: float,
    issued: int,
) -> LoadReport:
    base, open_rss, end_rss = rss
    received: Mapping[str, int] = final["received"]
    last_seq: Mapping[str, int] = final["last_seq"]
    pushed = sum(len(v) for v in acked.values())
    delivered = sum(received.values())
    lost = sum(max(0, len(acked.get(sid, [])) - received.get(sid, 0)) for sid in acked)
    behind = sum(1 for sid, seqs in acked.items() if last_seq.get(sid, 0) != max(seqs))
    if behind:
        errors["stream_behind_at_end"] = behind
    for key, value in dict(final["errors"]).items():
        errors[key] = errors.get(key, 0) + int(value)
    p50, p99, worst = (float(x) for x in final["latency_ms"])
    opened = int(final["opened"])
    client_kib = float(final["peak_rss_kib"])
    return LoadReport(
        streams=config.streams,
        streams_open=opened,
        open_seconds=open_seconds,
        duration=config.duration,
        pushed=pushed,
        delivered=delivered,
        lost=lost,
        duplicated=int(final["duplicated"]),
        errors=errors,
        latency_ms_p50=p50,
        latency_ms_p99=p99,
        latency_ms_max=worst,
        tokens_issued=issued,
        server_rss_base_mib=round(base / 1024, 1),
        server_rss_open_mib=round(open_rss / 1024, 1),
        server_rss_end_mib=round(end_rss / 1024, 1),
        server_kib_per_stream=round((open_rss - base) / max(1, opened), 1),
        client_peak_rss_mib=round(client_kib / 1024, 1),
        client_kib_per_stream=round(client_kib / max(1, opened), 1),
    )


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ambient-grpc-auth load",
        description="Load run on loopback: many concurrent authenticated watch streams "
        "against one grpc.aio session server; exits 1 on any loss, duplicate or error.",
    )
    p.add_argument("--streams", type=int, default=500, help="watch streams (500)")
    p.add_argument("--duration", type=_positive, default=30.0, help="seconds held (30)")
    p.add_argument("--rate", type=_positive, default=100.0, help="pushes per second (100)")
    p.add_argument("--ttl", type=_positive, default=900.0, help="token lifetime (900)")
    p.add_argument("--ramp", type=int, default=32, help="streams opening at once (32)")
    p.add_argument("--keys-dir", help="use (or create) control-plane keys in this directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: run the load and print its report; 0 when every stream
    opened and nothing was lost, duplicated or failed, 1 otherwise, 2 for bad
    arguments."""

    def make_config(args: argparse.Namespace) -> LoadConfig:
        return LoadConfig(
            streams=args.streams,
            duration=args.duration,
            rate=args.rate,
            ttl=args.ttl,
            ramp=args.ramp,
            keys_dir=args.keys_dir,
        )

    return _run_report_cli("load", argv, _parser(), make_config, run_load)


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    sys.exit(main())
