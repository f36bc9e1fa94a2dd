"""Control-plane and cache scenarios of the benchmark: the /token endpoint
against raw RSA decryption, and the verified-token cache (hit cost, memory).
Not part of the library's API.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.keys import DEFAULT_SIGNING_ALGORITHM, ensure_keys
from ambient_grpc_auth.controlplane.server import RunningTokenServer, start_token_server
from ambient_grpc_auth.principal import Principal
from ambient_grpc_auth.proof import encrypt_v2
from ambient_grpc_auth.server.tokencache import VerifiedTokenCache, token_expiry
from bench.child import http_load
from bench.fixtures import SESSION_ID
from bench.proc import ChildProcess, child_env, rotated

__all__ = ["RSS_BUDGET_PER_ENTRY", "TokenEndpointBench", "cache_hit_us", "cache_rss"]

#: Memory budget per verified-token cache entry (bytes): the SHA-256 digest,
#: the LRU link, the (principal, deadline) tuple, the principal and the
#: decoded claims of a ~850-character token take about 2.5 KiB in CPython;
#: twice that leaves room for allocator overhead (pymalloc arenas, dict
#: resizing). The memory target is ``max_entries * RSS_BUDGET_PER_ENTRY``.
RSS_BUDGET_PER_ENTRY = 5 * 1024

_CPU_SIDES = ("raw", "server", "load_generator")

_OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)


class TokenEndpointBench:
    """The real token server (fresh RSA-4096 encryption key and a
    ``signing_alg`` signing key in ``workdir``) on an event loop in a thread of this process,
    a load-generating child process, and a pool of ``workers`` threads for
    the raw decryption baseline (the server's ``max_concurrent_decrypts``)."""

    def __init__(
        self,
        workdir: Path,
        *,
        workers: int,
        concurrency: int,
        signing_alg: str = DEFAULT_SIGNING_ALGORITHM,
    ) -> None:
        keys = ensure_keys(workdir / "cp-keys", signing_algorithm=signing_alg)
        self.workers = workers
        self.concurrency = concurrency
        self._private_key = keys.private_key
        self._public_key = keys.public_key
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-decrypt")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="bench-token-server", daemon=True
        )
        self._thread.start()
        self._server: RunningTokenServer | None = None
        self._client: ChildProcess | None = None
        # CPU seconds (and requests) of measured batches: raw decryption and
        # the token server (this process), the load generator (the child).
        self._cpu = dict.fromkeys(_CPU_SIDES, 0.0)
        self._cpu_requests = dict.fromkeys(_CPU_SIDES, 0)
        config = TokenServerConfig(
            keys=keys, max_concurrent_decrypts=workers, max_pending_requests=4 * concurrency + 16
        )
        try:
            self._server = asyncio.run_coroutine_threadsafe(
                start_token_server(config), self._loop
            ).result(120)
            self.url = self._server.token_url
            self._client = ChildProcess("http-load")
        except BaseException:
            self.close()
            raise

    def _proofs(self, count: int) -> list[str]:
        # Made before timing starts: encryption is the runner's cost.
        now = time.time()
        return [encrypt_v2(self._public_key, SESSION_ID, now=now) for _ in range(count)]

    def raw_batch(self, count: int) -> float:
        """Seconds to RSA-OAEP-decrypt ``count`` proofs on the worker pool."""
        ciphertexts = [base64.b64decode(p) for p in self._proofs(count)]
        key = self._private_key
        cpu = time.process_time()
        started = time.perf_counter()
        list(self._pool.map(lambda c: key.decrypt(c, _OAEP), ciphertexts))
        elapsed = time.perf_counter() - started
        self._cpu["raw"] += time.process_time() - cpu
        self._cpu_requests["raw"] += count
        return elapsed

    def endpoint_batch(self, count: int, *, in_process: bool = False) -> float:
        """Seconds for ``count`` GET /token requests with fresh v2 proofs,
        sent by the child process (or by this process when ``in_process``)."""
        proofs = self._proofs(count)
        if in_process:
            elapsed, statuses = http_load(self.url, proofs, self.concurrency)
        else:
            assert self._client is not None
            cpu = time.process_time()  # this process serves; the child only loads
            answer = self._client.request(
                {"url": self.url, "proofs": proofs, "concurrency": self.concurrency}
            )
            self._cpu["server"] += time.process_time() - cpu
            self._cpu["load_generator"] += float(answer["cpu"])
            self._cpu_requests["server"] += count
            self._cpu_requests["load_generator"] += count
            elapsed, statuses = float(answer["elapsed"]), dict(answer["statuses"])
        if statuses != {"200": count}:
            raise RuntimeError(f"token endpoint answered {statuses}, expected {count} x 200")
        return elapsed

    def warm(self, count: int) -> None:
        self.raw_batch(self.workers * 2)
        self.endpoint_batch(count)
        self._cpu = dict.fromkeys(_CPU_SIDES, 0.0)
        self._cpu_requests = dict.fromkeys(_CPU_SIDES, 0)

    def cpu_us_per_request(self) -> dict[str, float]:
        """Microseconds of CPU per request so far: ``raw`` (one decryption on
        the pool), ``server`` (the whole token server, decryption included)
        and ``load_generator`` (the client child). The two cores are shared,
        so the endpoint's throughput is bounded by ``server`` plus
        ``load_generator``, the raw baseline by ``raw`` alone."""
        return {
            side: round(self._cpu[side] / self._cpu_requests[side] * 1e6, 1)
            for side in _CPU_SIDES
            if self._cpu_requests[side]
        }

    def round(
        self, *, batches: int, batch_size: int, round_index: int, in_process: bool
    ) -> tuple[dict[str, float], list[dict[str, float]]]:
        """Requests (decrypts) per second of each side, interleaved: over the
        round, and per batch (each side once, back to back)."""
        kinds = ["raw", "endpoint", *(["endpoint_in_process"] if in_process else [])]
        seconds = dict.fromkeys(kinds, 0.0)
        per_batch: list[dict[str, float]] = []
        gc.collect()
        for batch in range(batches):
            rates: dict[str, float] = {}
            for kind in rotated(kinds, round_index + batch):
                if kind == "raw":
                    elapsed = self.raw_batch(batch_size)
                else:
                    elapsed = self.endpoint_batch(
                        batch_size, in_process=kind == "endpoint_in_process"
                    )
                seconds[kind] += elapsed
                rates[kind] = batch_size / elapsed
            per_batch.append(rates)
        return {kind: batches * batch_size / seconds[kind] for kind in kinds}, per_batch

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._server is not None:
            server, self._server = self._server, None
            asyncio.run_coroutine_threadsafe(server.close(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
        self._pool.shutdown(wait=True)


def cache_hit_us(token: str, principal: Principal, *, iterations: int, repeats: int = 5) -> float:
    """Microseconds per :class:`VerifiedTokenCache` hit, digest included
    (``get(key_for(token))``, as the interceptor does on every call): the
    fastest of ``repeats`` loops of ``iterations`` hits (as ``timeit``
    advises: slower repeats measure other processes, not the code)."""
    cache = VerifiedTokenCache()
    cache.put(cache.key_for(token), principal, token_expiry(principal))
    if cache.get(cache.key_for(token)) is None:
        raise RuntimeError("verified-token cache: the entry was not stored")
    per_op: list[float] = []
    get, key_for = cache.get, cache.key_for
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(iterations):
            get(key_for(token))
        per_op.append((time.perf_counter() - started) / iterations * 1e6)
    return min(per_op)


def cache_rss(count: int, timeout: float = 600.0) -> dict[str, Any]:
    """Run ``_bench_child cache-rss count`` in a fresh process (a clean heap)
    and return its report."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.child", "cache-rss", str(count)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cache-rss child failed: {done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report
