"""Counts of the API server's authentication decisions.

:class:`MetricsHook` is what the server pipeline
(:mod:`ambient_grpc_auth.server.engine`) and the JWKS cache report to;
:class:`AuthMetrics` is the default, in-memory implementation, read with
:meth:`AuthMetrics.snapshot`. Plug in another hook to export the counts
elsewhere (Prometheus, OpenTelemetry, ...).

Denial reasons are short fixed words (``missing``, ``expired``,
``not_owner``, ...), never token material, so they are safe as metric labels.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

__all__ = ["AuthMetrics", "MetricsHook", "MetricsSnapshot"]


class MetricsHook(Protocol):
    """Receives counts of the interceptor's decisions. Implementations must be
    thread-safe and cheap (they run on every call) and must not raise."""

    def allowed(self) -> None:
        """A call passed every check and its handler starts."""

    def bypassed(self) -> None:
        """A call to a bypassed method (health, reflection) was served unchecked."""

    def denied(self, reason: str) -> None:
        """A call was refused; ``reason`` is a fixed word."""

    def cache(self, hit: bool) -> None:
        """The verified-token cache was consulted."""

    def jwks_fetch(self, ok: bool) -> None:
        """A JWKS document was fetched (``ok``) or the fetch failed."""


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """A point-in-time copy of :class:`AuthMetrics`."""

    #: Calls whose handler started.
    allowed: int
    #: Calls to bypassed methods.
    bypassed: int
    #: Refused calls per reason (a read-only mapping).
    denied: Mapping[str, int]
    #: Verified-token cache lookups that found the token.
    cache_hits: int
    #: Verified-token cache lookups that did not.
    cache_misses: int
    #: JWKS fetches attempted (successful or not).
    jwks_fetches: int
    #: JWKS fetches that failed.
    jwks_fetch_failures: int

    @property
    def denied_total(self) -> int:
        return sum(self.denied.values())


class AuthMetrics:
    """In-memory counters implementing :class:`MetricsHook`; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._allowed = 0
        self._bypassed = 0
        self._denied: dict[str, int] = {}
        self._hits = 0
        self._misses = 0
        self._fetches = 0
        self._fetch_failures = 0

    def allowed(self) -> None:
        with self._lock:
            self._allowed += 1

    def bypassed(self) -> None:
        with self._lock:
            self._bypassed += 1

    def denied(self, reason: str) -> None:
        with self._lock:
            self._denied[reason] = self._denied.get(reason, 0) + 1

    def cache(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self._hits += 1
            else:
                self._misses += 1

    def jwks_fetch(self, ok: bool) -> None:
        with self._lock:
            self._fetches += 1
            if not ok:
                self._fetch_failures += 1

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            return MetricsSnapshot(
                allowed=self._allowed,
                bypassed=self._bypassed,
                denied=MappingProxyType(dict(self._denied)),
                cache_hits=self._hits,
                cache_misses=self._misses,
                jwks_fetches=self._fetches,
                jwks_fetch_failures=self._fetch_failures,
            )

    def __repr__(self) -> str:
        return f"AuthMetrics({self.snapshot()!r})"
