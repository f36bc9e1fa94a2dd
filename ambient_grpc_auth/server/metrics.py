"""Counts of the API server's authentication decisions.

:class:`MetricsHook` is what the server pipeline
(:mod:`ambient_grpc_auth.server.engine`) and the JWKS cache report to;
:class:`AuthMetrics` is the default, in-memory implementation, read with
:meth:`AuthMetrics.snapshot`; :class:`PrometheusMetrics` records into
Prometheus metrics instead (served by ``session-server --metrics-listen``,
see :func:`start_metrics_server`). Plug in another hook to export the counts
elsewhere (OpenTelemetry, ...).

Denial reasons are short fixed words (``missing``, ``expired``,
``not_owner``, ...), never token material. :class:`PrometheusMetrics` exports
the reasons of :data:`DENIAL_REASONS` as label values and counts any other
(a custom authenticator's) as ``other``, so the number of series is fixed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

__all__ = [
    "DENIAL_REASONS",
    "AuthMetrics",
    "MetricsHook",
    "MetricsServer",
    "MetricsSnapshot",
    "PrometheusMetrics",
    "start_metrics_server",
]

#: Every reason the library's pipeline denies with (see
#: :class:`~ambient_grpc_auth.errors.TokenRejectedError`).
DENIAL_REASONS = frozenset(
    {
        # the authorization header
        "missing",
        "duplicate",
        "malformed",
        "oversized",
        # authenticators
        "static_mismatch",
        "unrecognized",
        "not_a_jwt",
        "unknown_issuer",
        "alg_not_allowed",
        "alg_key_mismatch",
        "bad_signature",
        "bad_key",
        "wrong_audience",
        "wrong_issuer",
        "missing_claim",
        "invalid_claims",
        "no_subject",
        "expired",
        "not_yet_valid",
        "unknown_kid",
        "keys_unavailable",
        "authenticator_error",
        # classification and method rules
        "runner_without_session",
        "method_denied",
        # session scope and ownership
        "missing_session_id",
        "out_of_scope",
        "no_such_session",
        "not_owner",
        "owner_lookup_failed",
    }
)
#: The label value of reasons outside :data:`DENIAL_REASONS`.
_OTHER_REASON = "other"
#: Latency buckets (seconds) of a token verification: from a cached key's
#: signature check (well under a millisecond) to a key fetch near its timeout.
_VERIFICATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


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

    def verification(self, seconds: float) -> None:
        """A token the verified-token cache did not hold was decided (accepted
        or not) ``seconds`` after the call arrived: the slow path of a
        decision (parse, signature, claims, and a key fetch when one was due).
        Cache hits are not timed: they cost microseconds."""


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
    #: Decisions that needed a token verification (cache misses).
    verifications: int = 0
    #: Their total time, seconds.
    verification_seconds: float = 0.0

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
        self._verifications = 0
        self._verification_seconds = 0.0

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

    def verification(self, seconds: float) -> None:
        with self._lock:
            self._verifications += 1
            self._verification_seconds += seconds

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
                verifications=self._verifications,
                verification_seconds=self._verification_seconds,
            )

    def __repr__(self) -> str:
        return f"AuthMetrics({self.snapshot()!r})"


class PrometheusMetrics:
    """A :class:`MetricsHook` recording into Prometheus metrics; thread-safe.

    The metrics live in ``registry`` (default: a new one of its own, never
    the process-wide default, so that several servers in one process do not
    collide); serve it with :func:`start_metrics_server`. Exported:

    - ``ambient_auth_decisions_total{outcome, reason}``: ``outcome`` is
      ``allowed``, ``bypassed`` or ``denied``; ``reason`` is the denial
      reason (:data:`DENIAL_REASONS` or ``other``), ``none`` otherwise;
    - ``ambient_auth_token_cache_lookups_total{result}``: ``hit`` or ``miss``;
    - ``ambient_auth_jwks_fetches_total{result}``: ``ok`` or ``error``;
    - ``ambient_auth_verification_seconds``: a histogram of
      :meth:`MetricsHook.verification`.

    Every series exists from the start (at 0). Label values come from fixed
    sets: never a token, a username or a session id.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        decisions = Counter(
            "ambient_auth_decisions",
            "Authentication decisions of the API server, by outcome and denial reason.",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self._allowed = decisions.labels("allowed", "none")
        self._bypassed = decisions.labels("bypassed", "none")
        self._denied = {
            reason: decisions.labels("denied", reason)
            for reason in sorted(DENIAL_REASONS | {_OTHER_REASON})
        }
        lookups = Counter(
            "ambient_auth_token_cache_lookups",
            "Verified-token cache lookups, by result.",
            ["result"],
            registry=self.registry,
        )
        self._hits = lookups.labels("hit")
        self._misses = lookups.labels("miss")
        fetches = Counter(
            "ambient_auth_jwks_fetches",
            "JWKS documents fetched, by result.",
            ["result"],
            registry=self.registry,
        )
        self._fetched = fetches.labels("ok")
        self._fetch_failed = fetches.labels("error")
        self._verification = Histogram(
            "ambient_auth_verification_seconds",
            "Time to decide a call whose token was not in the verified-token cache.",
            buckets=_VERIFICATION_BUCKETS,
            registry=self.registry,
        )

    def allowed(self) -> None:
        self._allowed.inc()

    def bypassed(self) -> None:
        self._bypassed.inc()

    def denied(self, reason: str) -> None:
        counter = self._denied.get(reason)
        if counter is None:
            counter = self._denied[_OTHER_REASON]
        counter.inc()

    def cache(self, hit: bool) -> None:
        (self._hits if hit else self._misses).inc()

    def jwks_fetch(self, ok: bool) -> None:
        (self._fetched if ok else self._fetch_failed).inc()

    def verification(self, seconds: float) -> None:
        self._verification.observe(seconds)

    def __repr__(self) -> str:
        return "PrometheusMetrics()"


class MetricsServer:
    """A started HTTP endpoint serving one registry in the Prometheus text
    format (``GET /metrics``; any path answers the same) from a daemon
    thread. ``close()`` is idempotent."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, host, registry)
        #: The host it listens on.
        self.host = host
        #: The port it listens on (the bound one when asked for port 0).
        self.port: int = self._server.server_port
        self._closed = False

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __repr__(self) -> str:
        return f"MetricsServer(port={self.port})"


def start_metrics_server(
    registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0
) -> MetricsServer:
    """Serve ``registry`` on ``host:port`` (0 = any free port) until
    :meth:`MetricsServer.close`. Raises OSError when the address cannot be
    bound (e.g. the port is in use)."""
    return MetricsServer(registry, host, port)
