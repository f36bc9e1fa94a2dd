"""``ambient-grpc-auth demo``: the whole mission, end to end, on loopback.

It starts the control-plane token endpoint (fresh RSA-4096 keys in a
temporary directory, short-lived tokens), the reference SessionService behind
the server interceptor (SQLite file in the same directory), and a runner that
proves its session to the control plane, then pushes and watches messages
while its tokens expire and the session server restarts once. An intruder
without a token and users on someone else's session are refused. The run
ends with a summary table and exits 1 if any invariant fails.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.channel import AuthenticatedChannel, create_channel
from ambient_grpc_auth.client.control_plane import ControlPlaneTokenSource
from ambient_grpc_auth.client.sessions import WatchRetryPolicy, push, watch
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.keys import ensure_keys
from ambient_grpc_auth.controlplane.server import RunningTokenServer, start_token_server
from ambient_grpc_auth.jwk import VerificationKey
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.reference.serve import SyncSessionServer, start_sync_session_server
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.jwks import JwksCache, StaticKeySet

__all__ = ["DemoReport", "main", "run_demo"]

_IDP_ISSUER = "https://idp.demo.invalid"
_AUDIENCE = "ambient-api-server"
_SERVICE_TOKEN_ENV_VALUE = "demo-platform-service-token-" + uuid.uuid4().hex


@dataclass
class DemoReport:
    """What the demo observed; ``failures`` lists broken invariants."""

    pushed: int = 0
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    token_fetches: int = 0
    tokens_issued: int = 0
    reconnects: int = 0
    restarts: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _Narrator:
    def __init__(self, quiet: bool) -> None:
        self._start = time.monotonic()
        self._quiet = quiet

    def say(self, text: str) -> None:
        if not self._quiet:
            print(f"[{time.monotonic() - self._start:5.1f}s] {text}", flush=True)


class _LoopThread:
    """An asyncio loop in a daemon thread, for the aiohttp token server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="demo-cp", daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def _user_token(key: rsa.RSAPrivateKey, kid: str, user: str, ttl: float = 600.0) -> str:
    now = int(time.time())
    claims = {"iss": _IDP_ISSUER, "aud": _AUDIENCE, "sub": user, "iat": now, "exp": now + ttl}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def _status_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


class _Watcher(threading.Thread):
    """Consumes a session watch and records every seq it sees."""

    def __init__(self, channel: AuthenticatedChannel, session_id: str, expected: int) -> None:
        super().__init__(name="demo-watch", daemon=True)
        self.seqs: list[int] = []
        self.error: BaseException | None = None
        self._expected = expected
        self._watch = watch(
            channel,
            session_id,
            after_seq=0,
            policy=WatchRetryPolicy(base_delay=0.05, max_delay=0.5, max_failure_duration=20.0),
        )
        self.done = threading.Event()

    def run(self) -> None:
        try:
            for message in self._watch:
                self.seqs.append(message.seq)
                if len(self.seqs) >= self._expected:
                    break
        except BaseException as exc:  # reported in the summary
            self.error = exc
        finally:
            self.done.set()

    def stop(self) -> None:
        self._watch.close()
        self.join(5)


@contextmanager
def _session_server(
    db: Path, config: ServerAuthConfig, address: str
) -> Iterator[tuple[SyncSessionServer, SessionStore]]:
    store = SessionStore(str(db))
    server = start_sync_session_server(store, config, address)
    try:
        yield server, store
    finally:
        server.stop()
        store.close()


def run_demo(*, messages: int = 120, ttl: float = 4.0, quiet: bool = False) -> DemoReport:
    """Run the demo and return what it observed (see the module docstring)."""
    report = DemoReport()
    say = _Narrator(quiet).say
    started = time.monotonic()
    loop = _LoopThread()
    with tempfile.TemporaryDirectory(prefix="ambient-demo-") as tmp:
        workdir = Path(tmp)
        say("generating control-plane keys (RSA-4096 encryption, ES256 signing) ...")
        keys = ensure_keys(workdir / "keys")
        cp: RunningTokenServer = loop.run(
            start_token_server(TokenServerConfig(keys=keys, ttl=ttl, audience=_AUDIENCE))
        )
        say(f"control plane: token endpoint at {cp.token_url} (tokens live {ttl:g}s)")
        try:
            _run_with_cp(report, say, workdir, cp, keys.public_pem, messages)
        finally:
            report.tokens_issued = int(cp.counters.snapshot().get("issued", 0))
            loop.run(cp.close())
            loop.close()
    report.seconds = time.monotonic() - started
    _check(report, messages)
    return report


def _run_with_cp(
    report: DemoReport,
    say: Callable[[str], None],
    workdir: Path,
    cp: RunningTokenServer,
    public_pem: str,
    messages: int,
) -> None:
    idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    idp_kid = "demo-idp-1"
    issuers = [
        TrustedIssuer(
            issuer=cp.url,
            audiences=(_AUDIENCE,),
            keys=JwksCache(cp.jwks_url),
            control_plane=True,
        ),
        TrustedIssuer(
            issuer=_IDP_ISSUER,
            audiences=(_AUDIENCE,),
            keys=StaticKeySet(keys=[VerificationKey(idp_kid, idp_key.public_key())]),
        ),
    ]
    db = workdir / "sessions.db"
    holder: dict[str, Any] = {}

    def config() -> ServerAuthConfig:
        return ServerAuthConfig.from_env(
            environ={"AMBIENT_API_TOKEN": _SERVICE_TOKEN_ENV_VALUE},
            issuers=issuers,
            owner_lookup=lambda sid: holder["store"].owner_of(sid),
        )

    with _session_server(db, config(), "127.0.0.1:0") as (server, store):
        holder["store"] = store
        address = f"127.0.0.1:{server.port}"
        say(f"API server: SessionService with auth interceptor on {address}")
        alice = _user_token(idp_key, idp_kid, "alice")
        bob = _user_token(idp_key, idp_kid, "bob")
        raw = grpc.insecure_channel(address)
        stub = sessions_pb2_grpc.SessionServiceStub(raw)  # type: ignore[no-untyped-call]
        auth_a = (("authorization", f"Bearer {alice}"),)
        auth_b = (("authorization", f"Bearer {bob}"),)
        session = stub.CreateSession(
            sessions_pb2.CreateSessionRequest(name="demo"), metadata=auth_a
        )
        bob_session = stub.CreateSession(
            sessions_pb2.CreateSessionRequest(name="b"), metadata=auth_b
        )
        sid = session.metadata.id
        say(f"alice created session {sid} (owner {session.created_by_user_id})")

        _refusals(report, say, stub, sid, bob_session.metadata.id, auth_b)

        source = CachingTokenSource(
            ControlPlaneTokenSource(cp.token_url, public_pem, sid), refresh_ahead=1.0
        )
        options = (
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 500),
        )
        with create_channel(address, source, tls=False, options=options) as channel:
            denied = _status_of(
                lambda: push(channel, bob_session.metadata.id, "assistant", "hop", timeout=5)
            )
            report.refusals[denied.name] += 1
            say(f"runner pushing into bob's session -> {denied.name}")

            watcher = _Watcher(channel, sid, messages)
            watcher.start()
            say("runner: watching its session (one long-lived stream) and pushing messages")
            half = messages // 2
            pace = 0.1
            for i in range(1, messages + 1):
                if i == half + 1:
                    say("restarting the session server (same port, same database) ...")
                    server.stop()
                    store.close()
                    store = SessionStore(str(db))
                    holder["store"] = store
                    server = start_sync_session_server(store, config(), address)
                    report.restarts += 1
                    say("session server is back; the runner reconnects with a fresh token")
                push(channel, sid, "assistant", f"message {i}", timeout=10, wait_for_ready=True)
                report.pushed += 1
                if i % 20 == 0:
                    say(
                        f"pushed {i}/{messages}, watched {len(watcher.seqs)}, "
                        f"token fetches {source.fetches}, reconnects {channel.reconnects}"
                    )
                time.sleep(pace)
            watcher.done.wait(20)
            watcher.stop()
            report.reconnects = channel.reconnects
        report.token_fetches = source.fetches
        if watcher.error is not None:
            report.failures.append(f"watch failed: {type(watcher.error).__name__}")
        seqs = watcher.seqs
        report.received = len(seqs)
        report.duplicated = len(seqs) - len(set(seqs))
        report.lost = len(set(range(1, messages + 1)) - set(seqs))
        report.out_of_order = sum(1 for a, b in itertools.pairwise(seqs) if b <= a)
        say(f"runner watched {report.received} messages")
        server.stop()
        store.close()
        raw.close()


def _refusals(
    report: DemoReport,
    say: Callable[[str], None],
    stub: Any,
    sid: str,
    bob_sid: str,
    auth_b: tuple[tuple[str, str], ...],
) -> None:
    watch_req = sessions_pb2.WatchSessionMessagesRequest(session_id=sid)
    push_req = sessions_pb2.PushSessionMessageRequest(session_id=sid, event_type="x", payload="y")
    forged_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = _user_token(forged_key, "demo-idp-1", "alice")
    cases = [
        ("intruder without a token pushes", lambda: stub.PushSessionMessage(push_req, timeout=5)),
        (
            "intruder with a forged token watches",
            lambda: next(
                iter(
                    stub.WatchSessionMessages(
                        watch_req, timeout=5, metadata=(("authorization", f"Bearer {forged}"),)
                    )
                )
            ),
        ),
        (
            "bob watches alice's session",
            lambda: next(iter(stub.WatchSessionMessages(watch_req, timeout=5, metadata=auth_b))),
        ),
        (
            "bob pushes into alice's session",
            lambda: stub.PushSessionMessage(push_req, timeout=5, metadata=auth_b),
        ),
    ]
    for text, call in cases:
        code = _status_of(call)
        report.refusals[code.name] += 1
        say(f"{text} -> {code.name}")
    _ = bob_sid


def _check(report: DemoReport, messages: int) -> None:
    f = report.failures
    if report.pushed != messages:
        f.append(f"pushed {report.pushed} of {messages}")
    if report.lost or report.duplicated or report.out_of_order:
        f.append("watch lost, duplicated or reordered messages")
    if report.received != messages:
        f.append(f"received {report.received} of {messages}")
    if report.token_fetches < 3:
        f.append("tokens were not refreshed mid-stream")
    if report.restarts != 1:
        f.append("the session server did not restart")
    if report.refusals.get("UNAUTHENTICATED", 0) != 2:
        f.append("intruders were not refused with UNAUTHENTICATED")
    if report.refusals.get("PERMISSION_DENIED", 0) != 3:
        f.append("cross-session access was not refused with PERMISSION_DENIED")
    if set(report.refusals) - {"UNAUTHENTICATED", "PERMISSION_DENIED"}:
        f.append(f"unexpected statuses: {dict(report.refusals)}")


def _table(report: DemoReport) -> str:
    rows: list[tuple[str, object]] = [
        ("messages pushed", report.pushed),
        ("messages received", report.received),
        ("lost", report.lost),
        ("duplicated", report.duplicated),
        ("out of order", report.out_of_order),
        ("token fetches (runner)", report.token_fetches),
        ("tokens issued (control plane)", report.tokens_issued),
        ("channel reconnects", report.reconnects),
        ("session-server restarts", report.restarts),
    ]
    rows += [(f"refused {code}", n) for code, n in sorted(report.refusals.items())]
    rows.append(("seconds", f"{report.seconds:.1f}"))
    width = max(len(name) for name, _ in rows)
    lines = ["", "summary", "-" * (width + 12)]
    lines += [f"{name:<{width}}  {value:>8}" for name, value in rows]
    lines.append("-" * (width + 12))
    lines.append(
        "result: " + ("OK" if not report.failures else "FAILED: " + "; ".join(report.failures))
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ambient-grpc-auth demo", description=__doc__)
    parser.add_argument("--messages", type=int, default=120, help="messages to push (>= 10)")
    parser.add_argument("--ttl", type=float, default=4.0, help="token lifetime in seconds (>= 2)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)
    if args.messages < 10 or args.ttl < 2:
        parser.error("--messages must be >= 10 and --ttl >= 2")
    report = run_demo(messages=args.messages, ttl=args.ttl, quiet=args.quiet)
    print(_table(report), flush=True)
    return 0 if not report.failures else 1
