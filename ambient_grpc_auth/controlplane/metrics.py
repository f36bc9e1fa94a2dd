"""Prometheus metrics of the token endpoint, served at ``GET /metrics``.

The request counts are the token server's own counters (see
:class:`~ambient_grpc_auth.controlplane.app.TokenServerCounters`), read when
scraped, so nothing is counted twice; the latency histogram is observed per
``/token`` request. Exported:

- ``ambient_cp_token_requests_total{outcome}``: ``issued``, ``unauthorized``,
  ``forbidden``, ``method_not_allowed``, ``busy``, ``upstream_error``,
  ``timeout``, ``internal_error``;
- ``ambient_cp_proof_refusals_total{reason}``: why a proof was refused (401
  and 403), one of :data:`PROOF_REFUSAL_REASONS` or ``other``;
- ``ambient_cp_proof_decrypts_total``: proofs handed to the decryption pool;
- ``ambient_cp_token_request_seconds``: a histogram of ``/token`` latency,
  whatever the outcome.

Label values come from fixed sets: never a proof, a token or a session id.
Each server has a registry of its own (not the process-wide default), so
several servers in one process do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

from ambient_grpc_auth.server.metrics import DENIAL_REASONS

__all__ = ["PROOF_REFUSAL_REASONS", "TOKEN_OUTCOMES", "TokenServerMetrics"]

#: The outcomes of a ``/token`` request.
TOKEN_OUTCOMES = (
    "issued",
    "unauthorized",
    "forbidden",
    "method_not_allowed",
    "busy",
    "upstream_error",
    "timeout",
    "internal_error",
)
#: Every reason the token endpoint refuses a proof with
#: (:class:`~ambient_grpc_auth.errors.ProofError`).
PROOF_REFUSAL_REASONS = frozenset(
    {
        # the Authorization header
        "header_missing",
        "header_malformed",
        "header_oversized",
        "header_duplicate",
        # decoding and decryption
        "bad_length",
        "bad_base64",
        "decrypt_failed",
        "not_utf8",
        "unsupported_version",
        "malformed_v2",
        # freshness and single use
        "fresh_proof_required",
        "stale",
        "future",
        "replayed",
        # the session id
        "session_id_too_short",
        "session_id_too_long",
        "session_id_charset",
        "session_id_pattern",
        "unknown_session",
        # the pod-bound proof (controlplane/podproof.py)
        "pod_header_duplicate",
        "pod_header_malformed",
        "pod_proof_required",
        "pod_too_long",
        "pod_keys_unavailable",
        "pod_not_a_service_account",
        "pod_claims_mismatch",
        "pod_not_bound",
        "pod_namespace",
        "pod_session_mismatch",
    }
    # A service-account token the JWT verifier refused, by its reason.
    | {f"pod_{reason}" for reason in DENIAL_REASONS}
)
_OTHER = "other"
#: Seconds; a proof's RSA decryption alone takes several milliseconds, an
#: upstream OIDC issuer up to its timeout.
_LATENCY_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Counts = Callable[[], Mapping[str, int]]


def _bounded(counts: Mapping[str, int], known: Iterable[str]) -> dict[str, int]:
    """Every known label at its count (0 if unseen); unknown labels summed
    into ``other`` (present only when non-zero)."""
    out = dict.fromkeys(known, 0)
    other = 0
    for label, value in counts.items():
        if label in out:
            out[label] += value
        else:
            other += value
    if other:
        out[_OTHER] = other
    return out


class _CountsCollector:
    """Exposes the server's counters at scrape time."""

    def __init__(self, outcomes: Counts, reasons: Counts) -> None:
        self._outcomes = outcomes
        self._reasons = reasons

    def collect(self) -> Iterator[Metric]:
        outcomes = dict(self._outcomes())
        decrypts = outcomes.pop("decrypts", 0)
        requests = CounterMetricFamily(
            "ambient_cp_token_requests",
            "Token requests, by outcome.",
            labels=["outcome"],
        )
        for outcome, value in _bounded(outcomes, TOKEN_OUTCOMES).items():
            requests.add_metric([outcome], value)
        yield requests
        refusals = CounterMetricFamily(
            "ambient_cp_proof_refusals",
            "Session proofs refused, by reason.",
            labels=["reason"],
        )
        reasons = _bounded(self._reasons(), sorted(PROOF_REFUSAL_REASONS))
        for reason, value in reasons.items():
            refusals.add_metric([reason], value)
        yield refusals
        yield CounterMetricFamily(
            "ambient_cp_proof_decrypts",
            "Session proofs handed to the decryption pool.",
            value=decrypts,
        )


class TokenServerMetrics:
    """The metrics of one token server, in :attr:`registry` (its own).

    ``outcomes`` and ``reasons`` return the server's cumulative counts by
    outcome (plus ``decrypts``) and by refusal reason; they are called at
    each scrape and must be thread-safe. Thread-safe.
    """

    def __init__(self, outcomes: Counts, reasons: Counts) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_CountsCollector(outcomes, reasons))
        self._latency = Histogram(
            "ambient_cp_token_request_seconds",
            "Time to answer a /token request, whatever the outcome.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_request(self, seconds: float) -> None:
        """One ``/token`` request was answered after ``seconds``."""
        self._latency.observe(seconds)

    def __repr__(self) -> str:
        return "TokenServerMetrics()"
