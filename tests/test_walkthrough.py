"""The README's "By hand" walk-through, run as written with real processes.

The shell block is taken from the README and run by bash in an empty
directory, bounded in time. Only its two fixed ports are replaced by free
ones, so that the run cannot collide with anything else on the machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from support.cliproc import clean_env

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _by_hand_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## By hand\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the By hand section has one sh block"
    return str(blocks[0])


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _cli_on_path(directory: Path) -> Path:
    """A directory whose ``ambient-grpc-auth`` runs this checkout's package."""
    directory.mkdir()
    script = directory / "ambient-grpc-auth"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ambient_grpc_auth "$@"\n')
    script.chmod(0o755)
    return directory


def test_by_hand_walkthrough_runs_as_written(tmp_path: Path) -> None:
    script = _by_hand_block()
    cp_port, api_port = _free_ports(2)
    assert "127.0.0.1:8080" in script
    assert "127.0.0.1:9000" in script
    script = script.replace("127.0.0.1:8080", f"127.0.0.1:{cp_port}")
    script = script.replace("127.0.0.1:9000", f"127.0.0.1:{api_port}")

    bin_dir = _cli_on_path(tmp_path / "bin")
    work = tmp_path / "work"
    work.mkdir()
    env = clean_env(
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        # Whatever happened, no server outlives the test.
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    logs = {
        name: (work / name).read_text() for name in ("cp.log", "api.log") if (work / name).exists()
    }
    assert proc.returncode == 0, f"{err}\n{logs}"
    lines = out.strip().splitlines()
    # fetch-token: the token's session scope is the created session.
    scope = next(line for line in lines if line.startswith("session_scope: "))
    session_id = scope.split(": ", 1)[1]
    assert len(session_id) >= 8
    # push prints the stored message, watch prints it back.
    assert any(f'"session_id": "{session_id}"' in line and '"seq": 1' in line for line in lines)
    assert lines[-1] == "1\tassistant\thello"
    assert "Traceback" not in err
