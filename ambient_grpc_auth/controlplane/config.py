"""The token endpoint's configuration."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.controlplane.issuers import (
    DEFAULT_AUDIENCE,
    DEFAULT_SUBJECT,
    DEFAULT_TTL_SECONDS,
    DEFAULT_USERNAME,
    TokenIssuer,
)
from ambient_grpc_auth.controlplane.keys import (
    DEFAULT_SIGNING_ALGORITHM,
    SIGNING_ALGORITHMS,
    CPKeys,
)
from ambient_grpc_auth.controlplane.oidc_issuer import OidcSettings
from ambient_grpc_auth.controlplane.podproof import PodProofSettings
from ambient_grpc_auth.controlplane.replay import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_REDIS_KEY_PREFIX,
    DEFAULT_REDIS_TIMEOUT,
    DEFAULT_WINDOW_SECONDS,
    ReplayStore,
)
from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.proof import SessionIdRule

__all__ = [
    "SessionCheck",
    "TokenServerConfig",
]

#: ``async (session_id) -> bool``: False refuses the session (403); an
#: exception answers 500. Called on the event loop after the proof passed.
SessionCheck = Callable[[str], Awaitable[bool]]


@dataclass(frozen=True, kw_only=True)
class TokenServerConfig:
    """Configuration of the token endpoint (keyword-only, immutable).

    At least one of ``keys_dir`` and ``keys`` is required. By default tokens
    come from a :class:`~ambient_grpc_auth.controlplane.issuers.JwtIssuer`
    built from ``issuer``, ``audience``, ``ttl``, ``subject`` and ``username``; ``oidc`` or
    ``token_issuer`` replace it (not both). Invalid combinations and limits
    raise ConfigurationError at construction.
    """

    # -- keys

    #: Directory of the control plane's key files: generated on first start
    #: when ``generate_keys``, otherwise loaded (e.g. from a mounted Secret).
    #: A running server follows signing-key rotations made there.
    keys_dir: str | os.PathLike[str] | None = None
    #: Already loaded keys; used as they are (no generation, no rotation).
    keys: CPKeys | None = None
    #: Create missing keys in ``keys_dir`` (False: missing keys are an error).
    generate_keys: bool = True
    #: Seconds between checks of ``keys_dir`` for a rotated signing key.
    signing_key_check_interval: float = 10.0
    #: Algorithm of the signing key (``ES256``, ``RS256`` or ``EdDSA``). A
    #: missing key is generated for it; with ``generate_keys``, a
    #: ``signing.pem`` of another type is rotated to it at start (the old key
    #: stays published until its tokens expire). Otherwise, and when the
    #: rotation cannot be written (a read-only Secret), the algorithm follows
    #: the key and a warning says so.
    signing_algorithm: str = DEFAULT_SIGNING_ALGORITHM

    # -- issued tokens

    #: ``iss`` of issued JWTs. Default: ``public_url``, else the server's own URL.
    issuer: str | None = None
    #: Externally visible base URL, for the discovery document's ``jwks_uri``.
    #: Default: the issuer when it is a URL, else the server's own URL.
    public_url: str | None = None
    #: ``aud`` of issued JWTs: one audience or several.
    audience: str | tuple[str, ...] = DEFAULT_AUDIENCE
    #: Lifetime of issued JWTs, in seconds.
    ttl: float = DEFAULT_TTL_SECONDS
    #: ``sub`` of issued JWTs: the identity the API server sees.
    subject: str = DEFAULT_SUBJECT
    #: ``preferred_username`` of issued JWTs, the name the platform's API
    #: server classifies (None: no such claim). Our API server ignores it.
    username: str | None = DEFAULT_USERNAME
    #: Hand out a service token from an upstream OAuth2/OIDC provider instead of JWTs.
    oidc: OidcSettings | None = None
    #: Any other :class:`~ambient_grpc_auth.controlplane.issuers.TokenIssuer`
    #: (a ``JwtIssuer`` given here has its keys published on the JWKS route).
    token_issuer: TokenIssuer | None = None
    #: ``max-age`` (seconds) of the JWKS and discovery responses.
    jwks_max_age: int = 60

    # -- proofs

    #: What counts as a valid session id (403 otherwise). Default: the platform's rule.
    session_id_rule: SessionIdRule | None = None
    #: Shorthand for ``SessionIdRule(pattern=...)``; not with ``session_id_rule``.
    session_id_pattern: str | None = None
    #: Refuse v1 proofs (401 ``fresh_proof_required``): only v2 is accepted.
    require_fresh_proof: bool = False
    #: How far (seconds, either way) a v2 proof's timestamp may be from now.
    proof_window: float = DEFAULT_WINDOW_SECONDS
    #: Capacity of the default in-process replay store; not with ``replay_store``.
    replay_max_entries: int = DEFAULT_MAX_ENTRIES
    #: Where accepted v2 nonces are remembered, e.g. a store shared by all
    #: replicas. Default: in-process. Called from a worker thread, so it may block.
    replay_store: ReplayStore | None = None
    #: Shorthand for a :class:`~ambient_grpc_auth.controlplane.replay.RedisReplayStore`
    #: on this URL (``redis://host:6379/0``), shared by replicas; not with
    #: ``replay_store``. Needs the ``redis`` extra. Left out of the repr: the
    #: URL may carry the Redis password.
    replay_redis_url: str | None = field(default=None, repr=False)
    #: Prefix of the Redis store's keys (to share one Redis between deployments).
    replay_redis_prefix: str = DEFAULT_REDIS_KEY_PREFIX
    #: Connect and read timeout (seconds) of the Redis store: a slower Redis
    #: answers 503 rather than holding requests.
    replay_redis_timeout: float = DEFAULT_REDIS_TIMEOUT
    #: Last say on a session whose proof passed (see :data:`SessionCheck`).
    session_check: SessionCheck | None = None
    #: Accept pod-bound proofs: the runner's service-account token, checked
    #: against the cluster issuer (:mod:`~ambient_grpc_auth.controlplane.podproof`).
    pod_proof: PodProofSettings | None = None
    #: Refuse every request without a valid pod-bound proof (401); needs ``pod_proof``.
    require_pod_proof: bool = False

    # -- limits

    #: Proofs decrypted at once, in a thread pool. Default: ``os.cpu_count()``.
    max_concurrent_decrypts: int | None = None
    #: Requests allowed to wait for a decryption slot; beyond that, 503.
    max_pending_requests: int = 256
    #: Seconds for the whole handling of one ``/token`` request (then 500).
    request_timeout: float = 10.0
    #: Longest request line and header, in bytes (at least 1024).
    max_header_size: int = 8190
    #: Connections open at once; a connection beyond it is answered 503 and
    #: closed. Lowered at start to what RLIMIT_NOFILE leaves room for.
    max_connections: int = 1024
    #: Seconds a connection gets to deliver a complete request head, from its
    #: opening or from the end of its previous response (then it is closed).
    header_timeout: float = 10.0
    #: Seconds in-flight requests get to finish when the server closes.
    shutdown_timeout: float = 10.0

    # -- testing

    #: Time source for proof freshness, token times and key rotation checks.
    clock: Clock = SYSTEM_CLOCK

    def __post_init__(self) -> None:
        if self.keys_dir is None and self.keys is None:
            raise ConfigurationError("token server: keys_dir or keys is required")
        if self.oidc is not None and self.token_issuer is not None:
            raise ConfigurationError("token server: set oidc or token_issuer, not both")
        if self.require_pod_proof and self.pod_proof is None:
            raise ConfigurationError("token server: require_pod_proof needs pod_proof settings")
        if self.session_id_rule is not None and self.session_id_pattern is not None:
            raise ConfigurationError("token server: set session_id_rule or session_id_pattern")
        if self.replay_store is not None and self.replay_max_entries != DEFAULT_MAX_ENTRIES:
            raise ConfigurationError("token server: set replay_store or replay_max_entries")
        if self.replay_store is not None and self.replay_redis_url is not None:
            raise ConfigurationError("token server: set replay_store or replay_redis_url")
        if self.signing_algorithm not in SIGNING_ALGORITHMS:
            raise ConfigurationError(
                f"token server: signing_algorithm must be one of {', '.join(SIGNING_ALGORITHMS)}"
            )
        if self.max_concurrent_decrypts is not None and self.max_concurrent_decrypts < 1:
            raise ConfigurationError("token server: max_concurrent_decrypts must be >= 1")
        for name in (
            "request_timeout",
            "proof_window",
            "shutdown_timeout",
            "header_timeout",
            "replay_redis_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"token server: {name} must be positive")
        if self.replay_max_entries < 1:
            raise ConfigurationError("token server: replay_max_entries must be positive")
        if self.max_pending_requests < 1 or self.max_header_size < 1024 or self.max_connections < 1:
            raise ConfigurationError("token server: limits too small")
