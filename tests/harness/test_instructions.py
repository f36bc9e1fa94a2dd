"""bench.instructions without valgrind: its servers and clients work for every
variant (the counting itself needs valgrind and minutes; `make
bench-instructions` runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from bench import instructions
from bench.child import call_many
from bench.fixtures import OWNER, SESSION_ID, BenchIdentity, mint_runner_token, new_identity
from bench.proc import child_env

REPO = Path(__file__).resolve().parents[2]


def _spec(tmp_path: Path, identity: BenchIdentity, token: str = "") -> Path:
    spec = tmp_path / "spec.json"
    doc = {"public_pem": identity.public_pem, "owners": {SESSION_ID: OWNER}, "token": token}
    spec.write_text(json.dumps(doc))
    return spec


@pytest.mark.parametrize("mode", ["sync", "aio"])
@pytest.mark.parametrize("variant", instructions.CLIENT_VARIANTS)
def test_every_client_variant_talks_to_its_server(mode: str, variant: str, tmp_path: Path) -> None:
    identity = new_identity()
    token = mint_runner_token(identity, now=time.time())
    spec = _spec(tmp_path, identity, token)
    server, port = instructions.start_server(
        mode, instructions.server_variant_for(variant), spec, [sys.executable]
    )
    try:
        # Through a child, as the profiler runs it (there under valgrind).
        args = ["call-many", mode, variant, str(port), str(spec), "5"]
        done = subprocess.run(
            [sys.executable, "-m", "bench.child", *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
            env=child_env(),
            check=False,
        )
        assert done.returncode == 0, done.stderr
    finally:
        instructions.stop_server(server)
    assert server.returncode == 0


def test_our_server_refuses_a_client_without_the_header(tmp_path: Path) -> None:
    # The "ours" server really authenticates: the bare client is refused.
    server, port = instructions.start_server(
        "sync", "ours", _spec(tmp_path, new_identity()), [sys.executable]
    )
    try:
        with pytest.raises(grpc.RpcError) as err:
            call_many("sync", "bare", port, "not-a-token", 1)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        instructions.stop_server(server)


def test_arguments_and_missing_counts_are_refused() -> None:
    with pytest.raises(SystemExit) as exc:
        instructions.main(["--calls", "10"])
    assert exc.value.code == 2
    with pytest.raises(RuntimeError, match="no instruction count"):
        instructions.collected("valgrind: something went wrong")
    assert instructions.collected("==1== Collected : 123456\n") == 123456
