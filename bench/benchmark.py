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
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.tokens import StaticTokenSource, Token
from ambient_grpc_auth.controlplane.signing import DEFAULT_SIGNING_ALGORITHM, SIGNING_ALGORITHMS
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc
from bench.cp import TokenEndpointBench, cache_hit_us, cache_rss
from bench.fixtures import (
    OWNER,
    SESSION_ID,
    mint_runner_token,
    new_identity,
    ours_config,
)
from bench.grpc_paths import (
    CALL_TIMEOUT,
    SyncClients,
    aio_round,
    stampede_aio,
    stampede_sync,
    stream_round,
    sync_unary_round,
)
from bench.proc import ChildProcess, CpuMeter, latency_stats, rotated
from bench.report import Results, loadavg, machine, print_table, summarize

__all__ = ["DEFAULT_OUT", "FULL", "QUICK", "BenchCounts", "main", "run"]

DEFAULT_OUT = Path("bench/results.json")
_SYNC_VARIANTS = ("bare", "ours", "naive", "bare_local", "call_creds", "bare_header", "noop")


@dataclass(frozen=True, kw_only=True)
class BenchCounts:
    """How much work each scenario does per round.

    Each round streams ``stream_batches`` x ``stream_messages`` messages per
    variant (full mode: 10 interleaved streams of 5,000, i.e. 50,000).
    ``stream_rounds`` and ``stampede_rounds`` limit those scenarios to the
    first rounds (None: every round): streaming 50,000 messages takes seconds,
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
    concurrent_batches=6,
    concurrent_calls=500,
    stream_messages=5_000,
    stream_batches=10,
    stream_rounds=3,
    stampede_rounds=3,
    token_batches=6,
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
    stream_messages=2_000,
    stream_batches=2,
    stampede_rounds=1,
    token_batches=2,
    token_batch=20,
    token_in_process=False,
    cache_iterations=20_000,
)


def _progress(message: str) -> None:
    sys.stderr.write(f"bench: {message}\n")
    sys.stderr.flush()


def _check_auth_is_active(ports: dict[str, int], token: str) -> None:
    """Refuse to benchmark a configuration that does not authenticate: a call
    without a token and a call for someone else's session must be refused by
    both authenticating servers."""
    request = echo_pb2.EchoRequest(session_id=SESSION_ID, text="probe")
    foreign = echo_pb2.EchoRequest(session_id="session-of-someone-else", text="probe")
    header = (("authorization", "Bearer " + token),)
    for name in ("ours", "naive", "stampede"):
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
            if name != "naive" and reply.caller != OWNER:
                raise RuntimeError("bench: our server did not expose the caller to the handler")


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
    signing_alg: str = DEFAULT_SIGNING_ALGORITHM,
) -> dict[str, Any]:
    """Run the benchmark, write ``out`` (JSON) and return the document.

    ``counts`` overrides the mode's counts (tests use tiny ones); ``rounds``
    overrides their number of rounds; ``signing_alg`` is the algorithm of the
    control-plane token used as bearer and of the token endpoint's key.
    Raises RuntimeError when a scenario fails functionally (a call refused,
    a stream cut short).
    """
    chosen = counts or (QUICK if quick else FULL)
    if rounds is not None:
        chosen = dataclasses.replace(chosen, rounds=rounds)
    started = time.perf_counter()
    load_before = loadavg()
    identity = new_identity(signing_alg)
    # The bearer runners send on every call: a control-plane token.
    token = mint_runner_token(identity, now=time.time())
    owners = {SESSION_ID: OWNER}
    spec = {"workers": chosen.server_workers, "public_pem": identity.public_pem, "owners": owners}
    source = CachingTokenSource(StaticTokenSource(Token.from_value(token)))
    res = Results()
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
            streams = clients.stream_calls(("bare", "ours", "noop"), chosen.stream_messages)
            _progress("generating RSA-4096 control-plane keys, starting the token endpoint")
            endpoint = TokenEndpointBench(
                Path(workdir),
                workers=os.cpu_count() or 1,
                concurrency=chosen.token_concurrency,
                signing_alg=signing_alg,
            )
            endpoint.warm(chosen.token_concurrency * 2)
            setup_seconds = round(time.perf_counter() - setup_started, 1)
            # The principal our authenticator builds for the token (cache probe).
            reference = ours_config(identity.public_pem, owners, inline_lookup=True)
            verified = reference.authenticator.authenticate(token)
            token_bench = endpoint  # not Optional, for the closures below

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
                samples, throughput, per_batch = asyncio.run(
                    aio_round(
                        ports,
                        source,
                        token,
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
                res.aio_throughput_batches.extend(per_batch)

            def stream(index: int) -> None:
                if chosen.stream_rounds is not None and index >= chosen.stream_rounds:
                    return
                meter = CpuMeter(children[0])
                rates, per_batch = stream_round(
                    streams,
                    count=chosen.stream_messages,
                    batches=chosen.stream_batches,
                    round_index=index,
                    meter=meter,
                )
                res.stream.append({f"stream_{n}": v for n, v in rates.items()})
                res.stream_batches.extend(
                    {f"stream_{n}": v for n, v in batch.items()} for batch in per_batch
                )
                res.cpu_stream.append(meter.per_unit_us())

            def stampede(index: int) -> None:
                if chosen.stampede_rounds is not None and index >= chosen.stampede_rounds:
                    return
                calls, delay = chosen.stampede_calls, chosen.fetch_delay
                sync_result = stampede_sync(
                    ports["stampede"], token, calls=calls, fetch_delay=delay
                )
                aio_result = asyncio.run(
                    stampede_aio(ports["aio_stampede"], token, calls=calls, fetch_delay=delay)
                )
                res.stampede_sync.append(dataclasses.asdict(sync_result))
                res.stampede_aio.append(dataclasses.asdict(aio_result))

            def token_endpoint(index: int) -> None:
                rates, per_batch = token_bench.round(
                    batches=chosen.token_batches,
                    batch_size=chosen.token_batch,
                    round_index=index,
                    in_process=chosen.token_in_process,
                )
                res.token.append(rates)
                res.token_batches.extend(per_batch)

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
            res.token_cpu = token_bench.cpu_us_per_request()
        finally:
            if clients is not None:
                clients.close()
            if endpoint is not None:
                endpoint.close()
            for child in children:
                child.close()
    metrics, context = summarize(res, rss)
    doc: dict[str, Any] = dict(metrics)
    doc["_meta"] = {
        "mode": "quick" if quick else "full",
        "rounds": chosen.rounds,
        "counts": dataclasses.asdict(chosen),
        "machine": machine(),
        "duration_s": round(time.perf_counter() - started, 1),
        "phase_seconds": phases,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "token_chars": len(token),
        "signing_alg": signing_alg,
        "authorization_header_bytes": len("authorization") + len("Bearer " + token),
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
    parser.add_argument(
        "--signing-alg",
        choices=SIGNING_ALGORITHMS,
        default=DEFAULT_SIGNING_ALGORITHM,
        help="algorithm of the control-plane token and key (compare with RS256)",
    )
    args = parser.parse_args(argv)
    try:
        doc = run(args.quick, args.out, rounds=args.rounds, signing_alg=args.signing_alg)
    except (RuntimeError, OSError, grpc.RpcError) as exc:
        sys.stderr.write(f"bench failed: {exc}\n")
        return 2
    print_table(doc, sys.stdout)
    sys.stdout.write(f"results written to {args.out}\n")
    missed = [name for name, m in doc.items() if not name.startswith("_") and not m["ok"]]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
