"""The soak run, shortened: a few runners for a few seconds with restarts.

The full run (``ambient-grpc-auth soak``: 50 runners, 60 s) is too long for
CI; this drives the same code path in-process and asserts its verdict, and
checks separately that the accounting catches losses, duplicates and gaps.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from pathlib import Path

import pytest
from support.cp import copy_keys

from ambient_grpc_auth.errors import ConfigurationError
from bench.load import main as load_main
from bench.soak import SoakConfig, _Ledger, main


def _children() -> list[int]:
    """Live child processes of this process (Linux /proc)."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[1] == me and fields[0] != "Z":
            found.append(int(entry))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to check for child processes")
def test_short_soak_loses_and_duplicates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = copy_keys(tmp_path / "keys", encryption_key_bits=2048)  # RSA-4096 costs seconds
    threads = set(threading.enumerate())
    children = set(_children())
    started = time.monotonic()
    code = main(
        [
            "--runners", "4",
            "--duration", "6",
            "--ttl", "2",
            "--restart-every", "2",
            "--rate", "5",
            "--drain", "20",
            "--keys-dir", str(keys),
            "--json",
            "--quiet",
        ]
    )  # fmt: skip
    elapsed = time.monotonic() - started
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["ok"] is True
    assert (report["lost"], report["duplicated"], report["error_count"]) == (0, 0, 0)
    assert report["restarts"] == 2  # one graceful stop, one kill
    assert report["pushed"] > 4 * 6
    # Every delivery is an acknowledged push or a settled unacknowledged one.
    assert report["received"] == report["pushed"] + report["unacked_stored"]
    # Every runner noticed a reconnect (back-to-back restarts may show as one)
    # and refreshed its short-lived token several times.
    assert report["reconnects"] >= 4
    assert report["token_fetches"] >= 4 * 4
    assert report["tokens_issued"] == report["token_fetches"]
    assert report["peak_rss_mib"] > 0
    assert elapsed < 60
    # Nothing left behind: session-server processes reaped, threads ended.
    assert set(_children()) <= children
    deadline = time.monotonic() + 10
    while True:
        gc.collect()  # grpc.aio's poller thread ends once its channels are collected
        if not [t for t in threading.enumerate() if t not in threads]:
            break
        assert time.monotonic() < deadline, threading.enumerate()
        time.sleep(0.05)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc for memory figures")
def test_short_load_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = copy_keys(tmp_path / "keys", encryption_key_bits=2048)
    children = set(_children())
    code = load_main(
        ["--streams", "6", "--duration", "2", "--rate", "20", "--keys-dir", str(keys)]
        + ["--json", "--quiet"]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["streams_open"] == 6
    assert (report["lost"], report["duplicated"], report["error_count"]) == (0, 0, 0)
    # One first message per session, then about 20/s for 2 s, all delivered.
    assert report["pushed"] >= 6 + 20
    assert report["delivered"] == report["pushed"]
    assert report["tokens_issued"] == 6
    assert report["server_rss_open_mib"] > 0
    assert set(_children()) <= children


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--runners", "0", "--quiet"]) == 2
    assert "runners" in capsys.readouterr().err
    assert load_main(["--streams", "0", "--quiet"]) == 2
    assert "streams" in capsys.readouterr().err
    # A separator passed on by "ambient-grpc-auth soak -- --option" is accepted.
    assert main(["--", "--runners", "0", "--quiet"]) == 2
    assert "runners" in capsys.readouterr().err
    with pytest.raises(ConfigurationError):
        SoakConfig(restart_every=0.5)
    with pytest.raises(SystemExit):
        main(["--duration", "-1"])


def test_ledger_counts_acknowledged_deliveries() -> None:
    ledger = _Ledger()
    for message_id, seq in ((1, 1), (2, 2), (3, 3)):
        ledger.on_ack(message_id, seq)
        ledger.on_delivery(message_id, seq)
    assert (ledger.lost(), ledger.duplicated, dict(ledger.errors)) == ([], 0, {})
    assert ledger.received == 3


def test_ledger_detects_loss_duplicates_gaps_and_strangers() -> None:
    ledger = _Ledger()
    ledger.on_ack(1, 1)
    ledger.on_ack(2, 2)
    ledger.on_ack(3, 3)
    ledger.on_delivery(1, 1)
    ledger.on_delivery(1, 1)  # same seq again
    ledger.on_delivery(3, 3)  # seq 2 skipped
    ledger.on_delivery(3, 4)  # same message at another seq
    ledger.on_delivery(None, 5)  # not ours
    assert ledger.lost() == [2]
    assert ledger.duplicated == 2
    assert ledger.errors == {"gap": 1, "foreign_message": 1}


def test_ledger_settles_unacknowledged_pushes_at_the_next_fence() -> None:
    ledger = _Ledger()
    ledger.on_ack(1, 1)
    ledger.on_delivery(1, 1)
    ledger.on_failure(2)  # stored although the reply was lost
    ledger.on_failure(3)  # never stored
    ledger.on_delivery(2, 2)
    assert ledger.unsettled == 2
    ledger.on_ack(4, 3)  # the fence
    assert ledger.unsettled == 2  # the watcher has not reached seq 3 yet
    ledger.on_delivery(4, 3)
    assert (ledger.unacked_stored, ledger.retried, list(ledger.retry)) == (1, 1, [3])
    ledger.retry.popleft()
    ledger.on_ack(3, 4)
    ledger.on_delivery(3, 4)
    assert ledger.unsettled == 0
    assert (ledger.lost(), ledger.duplicated, dict(ledger.errors)) == ([], 0, {})
    assert ledger.received == len(ledger.acked) + ledger.unacked_stored


def test_ledger_flags_a_settled_message_that_arrives_later() -> None:
    """If a push judged unsent were stored after all, the retry would store
    it twice: the check reports it instead of hiding it."""
    ledger = _Ledger()
    ledger.on_failure(1)
    ledger.on_ack(2, 1)
    ledger.on_delivery(2, 1)
    assert list(ledger.retry) == [1]
    ledger.retry.popleft()
    ledger.on_delivery(1, 2)  # the "unsent" message shows up late
    ledger.on_ack(1, 3)
    ledger.on_delivery(1, 3)
    assert ledger.duplicated == 1
