"""The benchmark: what authentication costs, measured against doing without it.

``ambient-grpc-auth bench`` (full mode, a few minutes) or ``bench --quick``
(CI, well under a minute) runs one process tree on loopback: this process
drives the clients; the gRPC servers run in two child processes (sync and
grpc.aio), the token endpoint's load generator in a third, and the
cache-memory probe in a fourth. Each scenario runs once per round (at least
three rounds, scenario order rotated each round); within a scenario the
variants are interleaved in small batches with a rotated order, after a
warm-up and a ``gc.collect()``. Every ratio compares a variant with the bare
baseline measured in the same round; the reported value is the median over
rounds (the maximum for stampede fetch counts).

The results are printed as a table and written as JSON (default
``bench/results.json``): each metric maps to ``{"value", "target", "ok"}``;
``_meta`` holds the machine, the counts and the raw numbers per round.
See ``docs/benchmark.md`` for what each metric means and how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc

from ._bench_cp import RSS_BUDGET_PER_ENTRY, TokenEndpointBench, cache_hit_us, cache_rss
from ._bench_fixtures import (
    OWNER,
    SESSION_ID,
    mint_user_token,
    new_identity,
    ours_config,
)
from ._bench_grpc import (
    CALL_TIMEOUT,
    ChildProcess,
    CpuMeter,
    SyncClients,
    aio_round,
    latency_stats,
    rotated,
    stampede_aio,
    stampede_sync,
    stream_round,
    sync_unary_round,
)
from ._proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc
from .caching import CachingTokenSource
from .tokens import StaticTokenSource, Token

__all__ = ["DEFAULT_OUT", "FULL", "QUICK", "BenchCounts", "main", "run"]

DEFAULT_OUT = Path("bench/results.json")
_MIB = 1024 * 1024
_SYNC_VARIANTS = ("bare", "ours", "naive", "bare_local", "call_creds", "bare_header")


@dataclass(frozen=True, kw_only=True)
class BenchCounts:
    """How much work each scenario does per round.

    ``stream_rounds`` and ``stampede_rounds`` limit those scenarios to the
    first rounds (None: every round): a 50,000-message stream takes seconds,
    and the stampede's fetch count does not get more precise by repetition.
    """

    rounds: int
    server_workers: int = 8
    unary_batches: int
    unary_batch: int
    warmup: int
    aio_batches: int
    aio_batch: int
    concurrent_batches: int
    concurrent_calls: int
    in_flight: int = 64
    stream_messages: int
    stream_batches: int = 1
    stream_rounds: int | None = None
    stampede_calls: int = 1000
    stampede_rounds: int | None = None
    fetch_delay: float = 0.2
    token_batches: int
    token_batch: int
    token_concurrency: int = 8
    token_in_process: bool
    cache_iterations: int
    cache_repeats: int = 5
    cache_rss_tokens: int = 100_000


FULL = BenchCounts(
    rounds=5,
    unary_batches=20,
    unary_batch=50,
    warmup=100,
    aio_batches=20,
    aio_batch=50,
    concurrent_batches=3,
    concurrent_calls=1000,
    stream_messages=50_000,
    stream_rounds=3,
    stampede_rounds=3,
    token_batches=4,
    token_batch=50,
    token_in_process=True,
    cache_iterations=100_000,
)

QUICK = BenchCounts(
    rounds=3,
    unary_batches=8,
    unary_batch=25,
    warmup=30,
    aio_batches=8,
    aio_batch=25,
    concurrent_batches=2,
    concurrent_calls=320,
    stream_messages=4_000,
    stampede_rounds=1,
    token_batches=2,
    token_batch=20,
    token_in_process=False,
    cache_iterations=20_000,
)


def _progress(message: str) -> None:
    sys.stderr.write(f"bench: {message}\n")
    sys.stderr.flush()


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "grpcio": grpc.__version__,
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _check_auth_is_active(ports: dict[str, int], token: str) -> None:
    """Refuse to benchmark a configuration that does not authenticate: a call
    without a token and a call for someone else's session must be refused by
    both authenticating servers."""
    request = echo_pb2.EchoRequest(session_id=SESSION_ID, text="probe")
    foreign = echo_pb2.EchoRequest(session_id="session-of-someone-else", text="probe")
    header = (("authorization", "Bearer " + token),)
    for name in ("ours", "naive"):
        with grpc.insecure_channel(f"127.0.0.1:{ports[name]}") as channel:
            method = echo_pb2_grpc.EchoServiceStub(channel).Echo  # type: ignore[no-untyped-call]
            for req, metadata, expected in (
                (request, None, grpc.StatusCode.UNAUTHENTICATED),
                (foreign, header, grpc.StatusCode.PERMISSION_DENIED),
            ):
                try:
                    method(req, timeout=CALL_TIMEOUT, metadata=metadata)
                except grpc.RpcError as err:
                    if err.code() is expected:
                        continue
                raise RuntimeError(f"bench: the {name} server does not enforce authentication")
            reply = method(request, timeout=CALL_TIMEOUT, metadata=header)
            if name == "ours" and reply.caller != OWNER:
                raise RuntimeError("bench: our server did not expose the caller to the handler")


class _Results:
    """Raw per-round numbers, filled in by the scenarios."""

    def __init__(self) -> None:
        self.sync: list[dict[str, dict[str, float]]] = []
        self.aio_latency: list[dict[str, dict[str, float]]] = []
        self.aio_throughput: list[dict[str, float]] = []
        self.stream: list[dict[str, float]] = []
        self.stampede_sync: list[dict[str, Any]] = []
        self.stampede_aio: list[dict[str, Any]] = []
        self.token: list[dict[str, float]] = []
        self.cache_hit: list[float] = []
        self.cpu_sync: list[dict[str, dict[str, float]]] = []
        self.cpu_aio: list[dict[str, dict[str, float]]] = []
        self.cpu_stream: list[dict[str, dict[str, float]]] = []


def _metric(value: float, target: str, holds: Callable[[float], bool]) -> dict[str, Any]:
    """``{"value", "target", "ok"}``; ``ok`` is judged on the value as written."""
    shown = round(value, 4)
    return {"value": shown, "target": target, "ok": bool(holds(shown))}


def _ratios(rounds: list[dict[str, float]], num: str, den: str) -> list[float]:
    return [r[num] / r[den] for r in rounds]


def _cpu_medians(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per variant, the median over rounds of client and server CPU (us)."""
    if not rounds:
        return {}
    return {
        name: {
            side: round(_median([r[name][side] for r in rounds]), 1)
            for side in ("client_us", "server_us")
        }
        for name in rounds[0]
    }


def _p50s(rounds: list[dict[str, dict[str, float]]]) -> list[dict[str, float]]:
    return [{name: stats["p50_us"] for name, stats in r.items()} for r in rounds]


def _summarize(res: _Results, rss: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, context) from the per-round numbers."""
    sync = _p50s(res.sync)
    ours = _median(_ratios(sync, "ours", "bare"))
    naive = _median(_ratios(sync, "naive", "bare"))
    creds = _median(_ratios(sync, "call_creds", "bare_local"))
    aio_p50 = _median(_ratios(_p50s(res.aio_latency), "aio_ours", "aio_bare"))
    aio_tp = _median(_ratios(res.aio_throughput, "aio_ours", "aio_bare"))
    stream = _median(_ratios(res.stream, "stream_ours", "stream_bare"))
    token = _median(_ratios(res.token, "endpoint", "raw"))
    hit = _median(res.cache_hit)
    fetches_sync = max(r["fetches"] for r in res.stampede_sync)
    fetches_aio = max(r["fetches"] for r in res.stampede_aio)
    sync_clean = all(r["failed"] == 0 for r in res.stampede_sync)
    aio_clean = all(r["failed"] == 0 for r in res.stampede_aio)
    growth = (rss["rss_after_kib"] - rss["rss_before_kib"]) / 1024
    bound = round(rss["max_entries"] * RSS_BUDGET_PER_ENTRY / _MIB, 1)
    ours = round(ours, 4)
    metrics = {
        "sync_unary_p50_ratio": _metric(ours, "<= 1.05", lambda v: v <= 1.05),
        "sync_unary_naive_jwt_ratio": _metric(naive, f"> {ours} (ours)", lambda v: ours < v),
        "sync_unary_call_creds_ratio": _metric(creds, f"> {ours} (ours)", lambda v: ours < v),
        "aio_unary_p50_ratio": _metric(aio_p50, "<= 1.08", lambda v: v <= 1.08),
        "aio_concurrent_throughput_ratio": _metric(aio_tp, ">= 0.95", lambda v: v >= 0.95),
        "stream_throughput_ratio": _metric(stream, ">= 0.98", lambda v: v >= 0.98),
        "stampede_fetches_sync": _metric(fetches_sync, "== 1", lambda v: v == 1 and sync_clean),
        "stampede_fetches_aio": _metric(fetches_aio, "== 1", lambda v: v == 1 and aio_clean),
        "token_endpoint_vs_raw_decrypt": _metric(token, ">= 0.8", lambda v: v >= 0.8),
        "verified_cache_hit_us": _metric(hit, "<= 5", lambda v: v <= 5),
        "verified_cache_rss_mb_100k": _metric(growth, f"<= {bound}", lambda v: v <= bound),
    }
    context = {
        "sync_unary": {
            "p50_us_median": {n: _median([r[n] for r in sync]) for n in sync[0]},
            "bare_header_ratio": _median(_ratios(sync, "bare_header", "bare")),
            "cpu_us_per_call": _cpu_medians(res.cpu_sync),
            "per_round": res.sync,
        },
        "aio": {
            "p50_us_median": {
                n: _median([r[n] for r in _p50s(res.aio_latency)]) for n in res.aio_latency[0]
            },
            "throughput_per_s_median": {
                n: _median([r[n] for r in res.aio_throughput]) for n in res.aio_throughput[0]
            },
            "cpu_us_per_call_concurrent": _cpu_medians(res.cpu_aio),
            "latency_per_round": res.aio_latency,
            "throughput_per_round": res.aio_throughput,
        },
        "stream": {
            "messages_per_s_per_round": res.stream,
            "cpu_us_per_message": _cpu_medians(res.cpu_stream),
        },
        "stampede": {"sync": res.stampede_sync, "aio": res.stampede_aio},
        "token_endpoint": {
            "per_second_per_round": res.token,
            **(
                {
                    "in_process_client_ratio": _median(
                        _ratios(res.token, "endpoint_in_process", "raw")
                    )
                }
                if "endpoint_in_process" in res.token[0]
                else {}
            ),
        },
        "verified_cache": {
            "hit_us_per_round": res.cache_hit,
            "rss": rss,
            "rss_growth_mib": round(growth, 2),
            "rss_bound_mib": bound,
            "budget_bytes_per_entry": RSS_BUDGET_PER_ENTRY,
        },
    }
    return metrics, context


def _print_table(doc: dict[str, Any], stream: TextIO) -> None:
    rows = [(name, m) for name, m in doc.items() if not name.startswith("_")]
    width = max(len(name) for name, _ in rows)
    stream.write(f"{'metric':<{width}}  {'value':>10}  {'target':<22}  ok\n")
    stream.write("-" * (width + 42) + "\n")
    for name, m in rows:
        value = m["value"]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        stream.write(
            f"{name:<{width}}  {shown:>10}  {m['target']:<22}  {'yes' if m['ok'] else 'NO'}\n"
        )
    meta = doc.get("_meta", {})
    p50 = meta.get("sync_unary", {}).get("p50_us_median", {})
    if p50:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in p50.items())
        stream.write(f"sync unary p50 (us): {parts}\n")
    cpu = meta.get("sync_unary", {}).get("cpu_us_per_call", {})
    if cpu:
        parts = ", ".join(f"{k} {v['client_us']:.0f}+{v['server_us']:.0f}" for k, v in cpu.items())
        stream.write(f"sync unary CPU per call, client+server (us): {parts}\n")
    stream.write(
        f"mode {meta.get('mode')}, {meta.get('rounds')} rounds, {meta.get('duration_s')} s, "
        f"load {meta.get('loadavg_before')} -> {meta.get('loadavg_after')}\n"
    )


def _run_rounds(
    counts: BenchCounts, scenarios: dict[str, Callable[[int], None]]
) -> dict[str, float]:
    """Run every scenario once per round, in an order rotated each round;
    return the seconds spent in each."""
    names = list(scenarios)
    spent = dict.fromkeys(names, 0.0)
    for index in range(counts.rounds):
        for name in rotated(names, index):
            _progress(f"round {index + 1}/{counts.rounds}: {name}")
            started = time.perf_counter()
            scenarios[name](index)
            spent[name] += time.perf_counter() - started
    return {name: round(seconds, 1) for name, seconds in spent.items()}


def run(
    quick: bool,
    out: Path,
    *,
    counts: BenchCounts | None = None,
    rounds: int | None = None,
) -> dict[str, Any]:
    """Run the benchmark, write ``out`` (JSON) and return the document.

    ``counts`` overrides the mode's counts (tests use tiny ones); ``rounds``
    overrides their number of rounds. Raises RuntimeError when a scenario
    fails functionally (a call refused, a stream cut short).
    """
    chosen = counts or (QUICK if quick else FULL)
    if rounds is not None:
        chosen = dataclasses.replace(chosen, rounds=rounds)
    started = time.perf_counter()
    load_before = _loadavg()
    identity = new_identity()
    token = mint_user_token(identity, now=time.time())
    owners = {SESSION_ID: OWNER}
    spec = {"workers": chosen.server_workers, "public_pem": identity.public_pem, "owners": owners}
    source = CachingTokenSource(StaticTokenSource(Token.from_value(token)))
    res = _Results()
    children: list[ChildProcess] = []
    clients: SyncClients | None = None
    endpoint: TokenEndpointBench | None = None
    with tempfile.TemporaryDirectory(prefix="ambient-bench-") as workdir:
        try:
            _progress("starting servers")
            setup_started = time.perf_counter()
            children = [ChildProcess("serve", "sync"), ChildProcess("serve", "aio")]
            ports: dict[str, int] = {}
            for child in children:
                ports.update(child.request(spec)["ports"])
            _check_auth_is_active(ports, token)
            clients = SyncClients(ports, source, token)
            unary = clients.unary_calls(_SYNC_VARIANTS)
            streams = clients.stream_calls(("bare", "ours"), chosen.stream_messages)
            _progress("generating RSA-4096 control-plane keys, starting the token endpoint")
            endpoint = TokenEndpointBench(
                Path(workdir),
                workers=os.cpu_count() or 1,
                concurrency=chosen.token_concurrency,
            )
            endpoint.warm(chosen.token_concurrency * 2)
            setup_seconds = round(time.perf_counter() - setup_started, 1)
            principal = ours_config(identity.public_pem, owners, inline_lookup=True)
            verified = principal.authenticator.authenticate(token)
            bench = endpoint

            def sync_unary(index: int) -> None:
                meter = CpuMeter(children[0])
                samples = sync_unary_round(
                    unary,
                    batches=chosen.unary_batches,
                    batch_size=chosen.unary_batch,
                    warmup=chosen.warmup,
                    round_index=index,
                    meter=meter,
                )
                res.sync.append({n: latency_stats(s) for n, s in samples.items()})
                res.cpu_sync.append(meter.per_unit_us())

            def aio(index: int) -> None:
                meter = CpuMeter(children[1])
                samples, throughput = asyncio.run(
                    aio_round(
                        ports,
                        source,
                        batches=chosen.aio_batches,
                        batch_size=chosen.aio_batch,
                        warmup=chosen.warmup,
                        concurrent_batches=chosen.concurrent_batches,
                        concurrent_calls=chosen.concurrent_calls,
                        in_flight=chosen.in_flight,
                        round_index=index,
                        meter=meter,
                    )
                )
                res.cpu_aio.append(meter.per_unit_us())
                res.aio_latency.append({n: latency_stats(s) for n, s in samples.items()})
                res.aio_throughput.append(throughput)

            def stream(index: int) -> None:
                if chosen.stream_rounds is not None and index >= chosen.stream_rounds:
                    return
                meter = CpuMeter(children[0])
                rates = stream_round(
                    streams,
                    count=chosen.stream_messages,
                    batches=chosen.stream_batches,
                    round_index=index,
                    meter=meter,
                )
                res.stream.append({f"stream_{n}": v for n, v in rates.items()})
                res.cpu_stream.append(meter.per_unit_us())

            def stampede(index: int) -> None:
                if chosen.stampede_rounds is not None and index >= chosen.stampede_rounds:
                    return
                kw = {"calls": chosen.stampede_calls, "fetch_delay": chosen.fetch_delay}
                res.stampede_sync.append(
                    dataclasses.asdict(stampede_sync(ports["ours"], token, **kw))  # type: ignore[arg-type]
                )
                res.stampede_aio.append(
                    dataclasses.asdict(asyncio.run(stampede_aio(ports["aio_ours"], token, **kw)))  # type: ignore[arg-type]
                )

            def token_endpoint(index: int) -> None:
                res.token.append(
                    bench.round(
                        batches=chosen.token_batches,
                        batch_size=chosen.token_batch,
                        round_index=index,
                        in_process=chosen.token_in_process,
                    )
                )

            def cache(index: int) -> None:
                res.cache_hit.append(
                    cache_hit_us(
                        token,
                        verified,
                        iterations=chosen.cache_iterations,
                        repeats=chosen.cache_repeats,
                    )
                )

            phases = _run_rounds(
                chosen,
                {
                    "sync unary": sync_unary,
                    "grpc.aio unary": aio,
                    "server streaming": stream,
                    "stampede": stampede,
                    "token endpoint": token_endpoint,
                    "verified-token cache": cache,
                },
            )
            _progress(f"verified-token cache memory ({chosen.cache_rss_tokens} tokens)")
            rss_started = time.perf_counter()
            rss = cache_rss(chosen.cache_rss_tokens)
            phases["setup"] = setup_seconds
            phases["cache memory"] = round(time.perf_counter() - rss_started, 1)
        finally:
            if clients is not None:
                clients.close()
            if endpoint is not None:
                endpoint.close()
            for child in children:
                child.close()
    metrics, context = _summarize(res, rss)
    doc: dict[str, Any] = dict(metrics)
    doc["_meta"] = {
        "mode": "quick" if quick else "full",
        "rounds": chosen.rounds,
        "counts": dataclasses.asdict(chosen),
        "machine": _machine(),
        "duration_s": round(time.perf_counter() - started, 1),
        "phase_seconds": phases,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "token_chars": len(token),
        **context,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return doc


def _rounds(text: str) -> int:
    value = int(text)
    if value < 3:
        raise argparse.ArgumentTypeError("at least 3 rounds")
    return value


def main(argv: list[str] | None = None) -> int:
    """``ambient-grpc-auth bench [--quick] [--out PATH] [--rounds N] [--check]``.

    Returns 0 when the benchmark ran (1 with ``--check`` if a target was
    missed), 2 when it could not run.
    """
    parser = argparse.ArgumentParser(
        prog="ambient-grpc-auth bench",
        description="Measure what authentication costs against unauthenticated baselines.",
    )
    parser.add_argument("--quick", action="store_true", help="small counts (CI, under a minute)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--rounds", type=_rounds, default=None, help="rounds (>= 3)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    try:
        doc = run(args.quick, args.out, rounds=args.rounds)
    except (RuntimeError, OSError, grpc.RpcError) as exc:
        sys.stderr.write(f"bench failed: {exc}\n")
        return 2
    _print_table(doc, sys.stdout)
    sys.stdout.write(f"results written to {args.out}\n")
    missed = [name for name, m in doc.items() if not name.startswith("_") and not m["ok"]]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
