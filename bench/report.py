"""Turning the benchmark's raw per-round numbers into metrics, JSON and a
table. Not part of the library's API."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import grpc

from bench.cp import RSS_BUDGET_PER_ENTRY

__all__ = ["Results", "loadavg", "machine", "median", "print_table", "summarize"]

_MIB = 1024 * 1024


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "grpcio": grpc.__version__,
    }


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class Results:
    """Raw per-round numbers, filled in by the scenarios."""

    def __init__(self) -> None:
        self.sync: list[dict[str, dict[str, float]]] = []
        self.aio_latency: list[dict[str, dict[str, float]]] = []
        self.aio_throughput: list[dict[str, float]] = []
        self.stream: list[dict[str, float]] = []
        # Throughput per interleaved batch, all rounds together: each holds
        # every variant, measured back to back (the headline ratios' source).
        self.aio_throughput_batches: list[dict[str, float]] = []
        self.stream_batches: list[dict[str, float]] = []
        self.token_batches: list[dict[str, float]] = []
        self.stampede_sync: list[dict[str, Any]] = []
        self.stampede_aio: list[dict[str, Any]] = []
        self.token: list[dict[str, float]] = []
        self.token_cpu: dict[str, float] = {}
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
            side: round(median([r[name][side] for r in rounds]), 1)
            for side in ("client_us", "server_us")
        }
        for name in rounds[0]
    }


def _p50s(rounds: list[dict[str, dict[str, float]]]) -> list[dict[str, float]]:
    return [{name: stats["p50_us"] for name, stats in r.items()} for r in rounds]


def summarize(res: Results, rss: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, context) from the per-round numbers."""
    sync = _p50s(res.sync)
    ours = median(_ratios(sync, "ours", "bare"))
    naive = median(_ratios(sync, "naive", "bare"))
    creds = median(_ratios(sync, "call_creds", "bare_local"))
    aio_p50 = median(_ratios(_p50s(res.aio_latency), "aio_ours", "aio_bare"))
    aio_tp = median(_ratios(res.aio_throughput_batches, "aio_ours", "aio_bare"))
    stream = median(_ratios(res.stream_batches, "stream_ours", "stream_bare"))
    token = median(_ratios(res.token_batches, "endpoint", "raw"))
    hit = median(res.cache_hit)
    fetches_sync = max(r["fetches"] for r in res.stampede_sync)
    fetches_aio = max(r["fetches"] for r in res.stampede_aio)
    sync_clean = all(r["failed"] == 0 for r in res.stampede_sync)
    aio_clean = all(r["failed"] == 0 for r in res.stampede_aio)
    growth = (rss["rss_after_kib"] - rss["rss_before_kib"]) / 1024
    bound = round(rss["max_entries"] * RSS_BUDGET_PER_ENTRY / _MIB, 1)
    # gRPC's own floor: do-nothing interceptors on both sides, same run.
    floor = {
        "sync_unary": median(_ratios(sync, "noop", "bare")),
        "aio_unary": median(_ratios(_p50s(res.aio_latency), "aio_noop", "aio_bare")),
        "aio_concurrent": median(_ratios(res.aio_throughput_batches, "aio_noop", "aio_bare")),
        "stream": median(_ratios(res.stream_batches, "stream_noop", "stream_bare")),
    }
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
        **{
            f"{mode}_noop_interceptor_ratio": _metric(value, "floor (info)", lambda v: True)
            for mode, value in floor.items()
        },
        "token_endpoint_vs_raw_decrypt": _metric(token, ">= 0.8", lambda v: v >= 0.8),
        "verified_cache_hit_us": _metric(hit, "<= 5", lambda v: v <= 5),
        "verified_cache_rss_mb_100k": _metric(growth, f"<= {bound}", lambda v: v <= bound),
    }
    context = {
        # How far ours is from the floor, per mode: ours / noop (1.0: at the floor).
        "ours_vs_noop_floor": {
            "sync_unary": median(_ratios(sync, "ours", "noop")),
            "aio_unary": median(_ratios(_p50s(res.aio_latency), "aio_ours", "aio_noop")),
            "aio_concurrent": median(_ratios(res.aio_throughput_batches, "aio_ours", "aio_noop")),
            "stream": median(_ratios(res.stream_batches, "stream_ours", "stream_noop")),
        },
        "sync_unary": {
            "p50_us_median": {n: median([r[n] for r in sync]) for n in sync[0]},
            "bare_header_ratio": median(_ratios(sync, "bare_header", "bare")),
            "cpu_us_per_call": _cpu_medians(res.cpu_sync),
            "per_round": res.sync,
        },
        "aio": {
            "p50_us_median": {
                n: median([r[n] for r in _p50s(res.aio_latency)]) for n in res.aio_latency[0]
            },
            "throughput_per_s_median": {
                n: median([r[n] for r in res.aio_throughput]) for n in res.aio_throughput[0]
            },
            "bare_header_p50_ratio": median(
                _ratios(_p50s(res.aio_latency), "aio_bare_header", "aio_bare")
            ),
            "bare_header_throughput_ratio": median(
                _ratios(res.aio_throughput_batches, "aio_bare_header", "aio_bare")
            ),
            "cpu_us_per_call_concurrent": _cpu_medians(res.cpu_aio),
            "latency_per_round": res.aio_latency,
            "throughput_per_round": res.aio_throughput,
            "throughput_per_batch": res.aio_throughput_batches,
        },
        "stream": {
            "messages_per_s_per_round": res.stream,
            "messages_per_s_per_batch": res.stream_batches,
            "cpu_us_per_message": _cpu_medians(res.cpu_stream),
        },
        "stampede": {"sync": res.stampede_sync, "aio": res.stampede_aio},
        "token_endpoint": {
            "per_second_per_round": res.token,
            "per_second_per_batch": res.token_batches,
            "cpu_us_per_request": res.token_cpu,
            **(
                {
                    "in_process_client_ratio": median(
                        _ratios(res.token_batches, "endpoint_in_process", "raw")
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


def print_table(doc: dict[str, Any], stream: TextIO) -> None:
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
    token_cpu = meta.get("token_endpoint", {}).get("cpu_us_per_request", {})
    if token_cpu:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in token_cpu.items())
        stream.write(f"/token CPU per request (us): {parts}\n")
    stream.write(
        f"mode {meta.get('mode')}, {meta.get('rounds')} rounds, {meta.get('duration_s')} s, "
        f"load {meta.get('loadavg_before')} -> {meta.get('loadavg_after')}\n"
    )
