"""The benchmark harness, end to end with tiny counts (shape and behaviour, no timing)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import benchmark as bench
from bench.child import response_status
from bench.proc import latency_stats, rotated

METRICS = {
    "sync_unary_p50_ratio",
    "sync_unary_naive_jwt_ratio",
    "sync_unary_call_creds_ratio",
    "aio_unary_p50_ratio",
    "aio_concurrent_throughput_ratio",
    "stream_throughput_ratio",
    "sync_unary_noop_interceptor_ratio",
    "aio_unary_noop_interceptor_ratio",
    "aio_concurrent_noop_interceptor_ratio",
    "stream_noop_interceptor_ratio",
    "stampede_fetches_sync",
    "stampede_fetches_aio",
    "token_endpoint_vs_raw_decrypt",
    "verified_cache_hit_us",
    "verified_cache_rss_mb_100k",
}

TINY = bench.BenchCounts(
    rounds=3,
    server_workers=4,
    unary_batches=2,
    unary_batch=5,
    warmup=2,
    aio_batches=2,
    aio_batch=5,
    concurrent_batches=1,
    concurrent_calls=32,
    in_flight=8,
    stream_messages=200,
    stream_rounds=2,
    stampede_calls=40,
    stampede_rounds=1,
    fetch_delay=0.1,
    token_batches=1,
    token_batch=4,
    token_concurrency=2,
    token_in_process=True,
    cache_iterations=200,
    cache_repeats=2,
    cache_rss_tokens=300,
)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict[str, Any]]:
    """``main(["--quick", "--out", ...])`` once, with the quick counts made tiny."""
    out = tmp_path_factory.mktemp("bench") / "nested" / "results.json"
    capture = tmp_path_factory.mktemp("stdout") / "stdout.txt"
    with pytest.MonkeyPatch.context() as mp, capture.open("w", encoding="utf-8") as sink:
        mp.setattr(bench, "QUICK", TINY)
        mp.setattr("sys.stdout", sink)
        code = bench.main(["--quick", "--out", str(out)])
    return code, capture.read_text(encoding="utf-8"), json.loads(out.read_text(encoding="utf-8"))


def _holds(value: float, target: str) -> bool | None:
    """Evaluate a numeric target such as "<= 1.05"; None for relative ones."""
    match = re.fullmatch(r"(<=|>=|==) (\S+)", target)
    if match is None:
        return None
    op, bound = match.group(1), float(match.group(2))
    return {"<=": value <= bound, ">=": value >= bound, "==": value == bound}[op]


def test_cli_writes_every_metric_with_value_target_ok(
    cli_run: tuple[int, str, dict[str, Any]],
) -> None:
    code, _, doc = cli_run
    assert code == 0
    assert set(doc) == METRICS | {"_meta"}
    for name in METRICS:
        metric = doc[name]
        assert set(metric) == {"value", "target", "ok"}, name
        assert isinstance(metric["value"], int | float), name
        assert isinstance(metric["target"], str), name
        assert metric["target"], name
        assert isinstance(metric["ok"], bool), name
        holds = _holds(metric["value"], metric["target"])
        if holds is not None:
            assert metric["ok"] is holds, name


def test_relative_targets_compare_against_ours(cli_run: tuple[int, str, dict[str, Any]]) -> None:
    _, _, doc = cli_run
    ours = doc["sync_unary_p50_ratio"]["value"]
    for name in ("sync_unary_naive_jwt_ratio", "sync_unary_call_creds_ratio"):
        assert doc[name]["target"].startswith(">")
        assert doc[name]["ok"] is (ours < doc[name]["value"])


def test_stampede_costs_one_fetch_and_every_call_succeeds(
    cli_run: tuple[int, str, dict[str, Any]],
) -> None:
    _, _, doc = cli_run
    assert doc["stampede_fetches_sync"] == {"value": 1, "target": "== 1", "ok": True}
    assert doc["stampede_fetches_aio"] == {"value": 1, "target": "== 1", "ok": True}
    for flavour in ("sync", "aio"):
        (result,) = doc["_meta"]["stampede"][flavour]
        assert result["calls"] == TINY.stampede_calls
        assert result["failed"] == 0


def test_meta_records_rounds_counts_and_raw_numbers(
    cli_run: tuple[int, str, dict[str, Any]],
) -> None:
    _, _, doc = cli_run
    meta = doc["_meta"]
    assert meta["mode"] == "quick"
    assert meta["rounds"] == 3
    assert meta["counts"]["unary_batch"] == TINY.unary_batch
    assert meta["machine"]["cpu_count"] >= 1
    per_round = meta["sync_unary"]["per_round"]
    assert len(per_round) == 3
    for round_stats in per_round:
        assert set(round_stats) == {
            "bare",
            "ours",
            "naive",
            "bare_local",
            "call_creds",
            "bare_header",
            "noop",
        }
        for stats in round_stats.values():
            assert stats["n"] == TINY.unary_batches * TINY.unary_batch
            assert 0 < stats["p50_us"] <= stats["p90_us"] <= stats["p99_us"]
    cpu = meta["sync_unary"]["cpu_us_per_call"]
    assert set(cpu) == set(per_round[0])
    # Verifying a call costs the authenticating server more CPU than echoing it.
    assert all(v["client_us"] > 0 for v in cpu.values())
    assert cpu["naive"]["server_us"] > cpu["bare"]["server_us"]
    assert set(meta["aio"]["cpu_us_per_call_concurrent"]) == {
        "aio_bare",
        "aio_ours",
        "aio_noop",
        "aio_bare_header",
    }
    assert meta["aio"]["bare_header_p50_ratio"] > 0
    assert meta["aio"]["bare_header_throughput_ratio"] > 0
    # Throughput ratios come from batches: every variant in each, back to back.
    batches = meta["aio"]["throughput_per_batch"]
    assert len(batches) == TINY.rounds * TINY.concurrent_batches
    assert all(set(b) == set(meta["aio"]["cpu_us_per_call_concurrent"]) for b in batches)
    streams = meta["stream"]["messages_per_s_per_batch"]
    assert len(streams) == (TINY.stream_rounds or TINY.rounds) * TINY.stream_batches
    assert all(set(b) == {"stream_bare", "stream_ours", "stream_noop"} for b in streams)
    assert set(meta["stream"]["cpu_us_per_message"]) == {"bare", "ours", "noop"}
    # The floor is reported per mode, and how far ours is from it.
    assert set(meta["ours_vs_noop_floor"]) == {
        "sync_unary",
        "aio_unary",
        "aio_concurrent",
        "stream",
    }
    assert all(v > 0 for v in meta["ours_vs_noop_floor"].values())
    for mode in ("sync_unary", "aio_unary", "aio_concurrent", "stream"):
        assert doc[f"{mode}_noop_interceptor_ratio"]["value"] > 0
    # The bearer is a control-plane token, ES256 by default.
    assert meta["signing_alg"] == "ES256"
    assert meta["token_chars"] < 600
    assert len(meta["aio"]["latency_per_round"]) == 3
    assert len(meta["stream"]["messages_per_s_per_round"]) == TINY.stream_rounds
    token = meta["token_endpoint"]["per_second_per_round"]
    assert len(token) == 3
    assert all(set(r) == {"raw", "endpoint", "endpoint_in_process"} for r in token)
    assert meta["token_endpoint"]["in_process_client_ratio"] > 0
    token_batches = meta["token_endpoint"]["per_second_per_batch"]
    assert len(token_batches) == 3 * TINY.token_batches
    # Where the endpoint's CPU goes: the server does at least the decryption.
    cpu_split = meta["token_endpoint"]["cpu_us_per_request"]
    assert set(cpu_split) == {"raw", "server", "load_generator"}
    assert cpu_split["server"] > 0
    assert 0 < cpu_split["load_generator"] < cpu_split["server"]
    rss = meta["verified_cache"]["rss"]
    assert rss["inserted"] == rss["entries"] == TINY.cache_rss_tokens
    assert rss["max_entries"] == 10_000
    assert rss["token_chars"] > 700


def test_cli_prints_the_table(cli_run: tuple[int, str, dict[str, Any]]) -> None:
    _, stdout, _ = cli_run
    for name in METRICS:
        assert name in stdout
    assert "results written to" in stdout


@pytest.mark.parametrize("argv", [["--rounds", "2"], ["--rounds", "x"], ["--bogus"]])
def test_cli_refuses_bad_arguments(argv: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--out", str(tmp_path / "r.json")])
    assert exc.value.code == 2
    assert not (tmp_path / "r.json").exists()


def test_rotation_puts_every_variant_in_every_position() -> None:
    items = ["a", "b", "c"]
    orders = [rotated(items, shift) for shift in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for position in range(3):
        assert {order[position] for order in orders} == set(items)
    assert rotated([], 5) == []


def test_latency_stats_in_microseconds() -> None:
    stats = latency_stats([1000 * i for i in range(1, 101)])
    assert stats["n"] == 100
    assert stats["p50_us"] == pytest.approx(50.5)
    assert stats["p90_us"] == pytest.approx(91.0)
    assert stats["p99_us"] == pytest.approx(100.0)


def test_hotpath_script_reports_every_path() -> None:
    script = Path(__file__).resolve().parents[2] / "bench" / "hotpath.py"
    done = subprocess.run(  # noqa: S603 (this interpreter, a file of this repository)
        [sys.executable, str(script), "--iterations", "50"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = dict(
        line.rsplit("  ", 1) for line in done.stdout.strip().splitlines() if "us/call" in line
    )
    assert len(rows) == 7
    for name, value in rows.items():
        assert float(value.split()[0]) > 0, name


def test_the_load_generator_reads_exactly_one_response() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
    assert response_status(bytearray(head[:20])) is None
    assert response_status(bytearray(head + b"{")) is None
    assert response_status(bytearray(head + b"{}")) == 200
    assert response_status(bytearray(b"HTTP/1.1 503 x\r\ncontent-length: 0\r\n\r\n")) == 503
    with pytest.raises(RuntimeError, match="more bytes"):
        response_status(bytearray(head + b"{}HTTP/1.1"))
    with pytest.raises(RuntimeError, match="chunked"):
        response_status(bytearray(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"))
    with pytest.raises(RuntimeError, match="Content-Length"):
        response_status(bytearray(b"HTTP/1.1 200 OK\r\n\r\n"))
