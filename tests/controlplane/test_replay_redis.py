"""Replay protection shared by token-server replicas through a real Redis.

Three token-server processes share one ``redis-server``: a proof is accepted
once across all of them, however it is spread. A Redis that is down or hung
refuses v2 proofs with 503 (fail closed) and the server recovers when Redis
answers again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO

import aiohttp
import pytest

try:
    import redis as redis_client
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("needs the redis package (pip install -e '.[dev]')", allow_module_level=True)
from support.cliproc import run_cli
from support.cp import copy_keys, get, public_pem, serving
from support.redis_server import RedisServer, redis_server, require_redis

from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.keys import load_public_key
from ambient_grpc_auth.controlplane.replay import RedisReplayStore
from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.proof import encrypt_v1, encrypt_v2

SID = "session-0123456789abcdef"
REPO = Path(__file__).resolve().parents[2]
REPLICAS = 3


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    yield from redis_server()


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    # RSA-2048 encryption: these tests are about sharing, not the key size.
    return copy_keys(tmp_path / "keys", encryption_key_bits=2048)


class _Replica:
    """A ``token-server`` CLI process; its log goes to a file (never a full pipe)."""

    def __init__(
        self,
        keys_dir: Path,
        redis_url: str,
        log_path: Path,
        *,
        url_flag: str = "--replay-redis-url",
    ) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ambient_grpc_auth",
                "token-server",
                "--keys",
                str(keys_dir),
                "--no-generate",
                "--listen",
                "127.0.0.1:0",
                url_flag,
                redis_url,
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def url(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert "listening on" in line, self.log_path.read_text()
        return line.rsplit(" ", 1)[1] + "/token"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@pytest.fixture
async def replicas(keys_dir: Path, redis: RedisServer, tmp_path: Path) -> AsyncIterator[list[str]]:
    started = [_Replica(keys_dir, redis.url, tmp_path / f"replica{i}.log") for i in range(REPLICAS)]
    try:
        yield [await asyncio.to_thread(r.url) for r in started]
    finally:
        for r in started:
            r.stop()


async def _statuses(
    http: aiohttp.ClientSession, jobs: list[tuple[str, str]], concurrency: int
) -> list[int]:
    gate = asyncio.Semaphore(concurrency)

    async def one(url: str, bearer: str) -> int:
        async with gate:
            return (await get(http, url, bearer))[0]

    return list(await asyncio.gather(*(one(u, b) for u, b in jobs)))


async def test_three_replicas_accept_each_proof_exactly_once(
    replicas: list[str], keys_dir: Path
) -> None:
    key = load_public_key(public_pem(keys_dir))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        # The same proof to all three replicas at once, four times each, for
        # several proofs: one 200 per proof, every other copy a 401.
        for _ in range(5):
            proof = encrypt_v2(key, SID, now=time.time())
            jobs = [(url, proof) for url in replicas for _ in range(4)]
            statuses = Counter(await _statuses(http, jobs, concurrency=len(jobs)))
            assert statuses == {200: 1, 401: len(jobs) - 1}, statuses
        # 1,000 distinct proofs spread over the replicas: each accepted once.
        proofs = [encrypt_v2(key, f"{SID}-{i:04d}", now=time.time()) for i in range(1000)]
        spread = list(zip(itertools.cycle(replicas), proofs, strict=False))
        statuses = Counter(await _statuses(http, spread, concurrency=24))
        assert statuses == {200: 1000}, statuses
        # Replayed at another replica than the one that took them: refused.
        again = [(replicas[(i + 1) % REPLICAS], p) for i, p in enumerate(proofs[:60])]
        assert Counter(await _statuses(http, again, concurrency=24)) == {401: 60}


async def test_redis_down_or_hung_refuses_v2_with_503_and_recovers(
    redis: RedisServer, keys_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    key = load_public_key(public_pem(keys_dir))
    config = TokenServerConfig(
        keys_dir=keys_dir,
        issuer="https://cp.ambient.test",
        replay_redis_url=redis.url,
        replay_redis_timeout=0.3,
    )
    async with (
        serving(config) as srv,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
    ):
        assert (await get(http, srv.token_url, encrypt_v2(key, SID, now=time.time())))[0] == 200

        await asyncio.to_thread(redis.stop)
        refused = encrypt_v2(key, SID, now=time.time())
        status, body, headers = await get(http, srv.token_url, refused)
        assert (status, body, headers.get("Retry-After")) == (503, "replay store unavailable", "1")
        # v1 proofs never touch the replay store.
        assert (await get(http, srv.token_url, encrypt_v1(key, SID)))[0] == 200
        assert "Redis replay store unavailable (ConnectionError)" in caplog.text
        assert refused not in caplog.text
        assert refused[:24] not in caplog.text

        await asyncio.to_thread(redis.start)
        # Never stored while Redis was down, so its first accepted use is now.
        assert (await get(http, srv.token_url, refused))[0] == 200
        assert (await get(http, srv.token_url, refused))[0] == 401
        assert "Redis replay store reachable again" in caplog.text

        # A Redis that accepts connections but does not answer: bounded by the
        # store's timeout (0.3 s), so 503 rather than the request's 10 s timeout.
        await asyncio.to_thread(redis.pause)
        try:
            status, body, _ = await get(http, srv.token_url, encrypt_v2(key, SID, now=time.time()))
        finally:
            await asyncio.to_thread(redis.resume)
        assert (status, body) == (503, "replay store unavailable")
        assert "Redis replay store unavailable (TimeoutError)" in caplog.text
        assert (await get(http, srv.token_url, encrypt_v2(key, SID, now=time.time())))[0] == 200
        assert srv.counters.snapshot()["replay_store_unavailable"] == 2


def test_redis_store_contract(redis: RedisServer) -> None:
    store = RedisReplayStore(redis.url, key_prefix="test:")
    try:
        until = time.time() + 30
        assert store.remember("sid\x00nonce", until) is True
        assert store.remember("sid\x00nonce", until) is False
        assert store.remember("sid\x00other", until) is True
        # Keys are digests under the prefix, with the expiry asked for.
        client = redis_client.Redis.from_url(redis.url)
        try:
            names = sorted(client.keys("test:*"))
            assert len(names) == 2
            assert all(len(n) == len(b"test:") + 32 for n in names)
            assert 28_000 < client.pttl(names[0]) <= 30_000
        finally:
            client.close()
        assert b"nonce" not in b"".join(names)
        assert "redis://" not in repr(store)
    finally:
        store.close()


def test_redis_store_configuration_errors() -> None:
    require_redis()
    with pytest.raises(ConfigurationError, match="URL") as err:
        RedisReplayStore("http://user:hunter2@example")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigurationError, match="timeout"):
        RedisReplayStore("redis://127.0.0.1:1/0", timeout=0)
    with pytest.raises(ConfigurationError, match="replay_redis_url"):
        TokenServerConfig(
            keys_dir="k",
            replay_redis_url="redis://127.0.0.1:1/0",
            replay_store=RedisReplayStore("redis://127.0.0.1:1/0"),
        )


def test_the_redis_url_stays_out_of_the_config_repr() -> None:
    config = TokenServerConfig(keys_dir="k", replay_redis_url="redis://:hunter2@redis:6379/0")
    assert "hunter2" not in repr(config)
    assert "replay_redis_url" not in repr(config)


@pytest.fixture
def locked_redis() -> Iterator[RedisServer]:
    yield from redis_server(password="s3cret-replay-pw")


async def test_a_url_file_keeps_the_redis_password_out_of_the_process_list(
    keys_dir: Path, locked_redis: RedisServer, tmp_path: Path
) -> None:
    password = locked_redis.password
    assert password is not None
    url_file = tmp_path / "redis-url"
    url_file.write_text(locked_redis.url + "\n")
    replica = _Replica(
        keys_dir,
        str(url_file),
        tmp_path / "replica.log",
        url_flag="--replay-redis-url-file",
    )
    try:
        url = await asyncio.to_thread(replica.url)
        cmdline = Path(f"/proc/{replica.proc.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        proof = encrypt_v2(load_public_key(public_pem(keys_dir)), SID, now=time.time())
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            # Accepted once through the password-protected Redis, then refused.
            assert (await get(http, url, proof))[0] == 200
            assert (await get(http, url, proof))[0] == 401
    finally:
        replica.stop()
    assert password not in replica.log_path.read_text()


def test_a_password_on_the_command_line_is_warned_about(keys_dir: Path, tmp_path: Path) -> None:
    url = "redis://:hunter2@127.0.0.1:1/0"
    missing = tmp_path / "no-keys"  # the start fails after the warning was written
    done = run_cli(
        ["token-server", "--keys", str(missing), "--no-generate", "--replay-redis-url", url]
    )
    assert done.returncode != 0
    assert "visible to anyone who can list processes" in done.stderr
    assert "--replay-redis-url-file" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, [], "cannot read --replay-redis-url-file"),
        ("", [], "must hold one Redis URL"),
        ("redis://a:1/0 redis://b:1/0", [], "must hold one Redis URL"),
        ("redis://127.0.0.1:1/0", ["--replay-redis-url", "redis://x:1/0"], "not both"),
    ],
)
def test_bad_redis_url_files_are_refused_clearly(
    keys_dir: Path, tmp_path: Path, content: str | None, extra: list[str], message: str
) -> None:
    url_file = tmp_path / "redis-url"
    if content is not None:
        url_file.write_text(content)
    done = run_cli(
        ["token-server", "--keys", str(keys_dir), "--replay-redis-url-file", str(url_file), *extra]
    )
    assert done.returncode == 1, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
