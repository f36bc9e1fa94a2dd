"""The token endpoint's configuration."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.controlplane.issuers import (
    DEFAULT_AUDIENCE,
    DEFAULT_SUBJECT,
    DEFAULT_TTL_SECONDS,
    TokenIssuer,
)
from ambient_grpc_auth.controlplane.keys import CPKeys
from ambient_grpc_auth.controlplane.oidc_issuer import OidcSettings
from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.proof import SessionIdRule

__all__ = [
    "TokenServerConfig",
]

SessionCheck = Callable[[str], Awaitable[bool]]


@dataclass(frozen=True, kw_only=True)
class TokenServerConfig:
    """Configuration of the token endpoint (keyword-only, immutable).

    Keys: ``keys_dir`` (generated on first start when ``generate_keys``,
    otherwise loaded, e.g. from a mounted Secret) and/or already loaded
    ``keys``. With ``keys_dir`` a running server follows signing-key rotations
    (checked every ``signing_key_check_interval`` seconds).

    Tokens: by default a :class:`~ambient_grpc_auth.controlplane.issuers.JwtIssuer` with
    ``issuer`` (default: the server's own URL), ``audience``, ``ttl`` and
    ``subject``. ``oidc`` switches to an upstream client-credentials provider;
    ``token_issuer`` plugs in any other :class:`~ambient_grpc_auth.controlplane.issuers.TokenIssuer`.
    ``public_url`` is the externally visible base URL for the discovery
    document's ``jwks_uri`` (default: the issuer when it is a URL, else the
    server's own URL).

    Proofs: ``session_id_rule`` (or just a ``session_id_pattern``),
    ``require_fresh_proof`` (refuse v1), ``proof_window`` seconds for v2,
    ``replay_max_entries``; ``session_check(session_id)`` may refuse a session
    (False -> 403; an exception -> 500).

    Limits: ``max_concurrent_decrypts`` (default ``os.cpu_count()``),
    ``max_pending_requests`` waiting for a decrypt slot (then 503),
    ``request_timeout`` for the whole /token handling, ``max_header_size``
    (request line and each header), ``shutdown_timeout`` for graceful close.
    """

    keys_dir: str | os.PathLike[str] | None = None
    keys: CPKeys | None = None
    generate_keys: bool = True
    issuer: str | None = None
    public_url: str | None = None
    audience: str | tuple[str, ...] = DEFAULT_AUDIENCE
    ttl: float = DEFAULT_TTL_SECONDS
    subject: str = DEFAULT_SUBJECT
    require_fresh_proof: bool = False
    proof_window: float = 60.0
    replay_max_entries: int = 100_000
    session_id_rule: SessionIdRule | None = None
    session_id_pattern: str | None = None
    session_check: SessionCheck | None = None
    oidc: OidcSettings | None = None
    token_issuer: TokenIssuer | None = None
    max_concurrent_decrypts: int | None = None
    max_pending_requests: int = 256
    request_timeout: float = 10.0
    max_header_size: int = 8190
    shutdown_timeout: float = 10.0
    signing_key_check_interval: float = 10.0
    jwks_max_age: int = 60
    clock: Clock = SYSTEM_CLOCK

    def __post_init__(self) -> None:
        if self.keys_dir is None and self.keys is None:
            raise ConfigurationError("token server: keys_dir or keys is required")
        if self.oidc is not None and self.token_issuer is not None:
            raise ConfigurationError("token server: set oidc or token_issuer, not both")
        if self.session_id_rule is not None and self.session_id_pattern is not None:
            raise ConfigurationError("token server: set session_id_rule or session_id_pattern")
        if self.max_concurrent_decrypts is not None and self.max_concurrent_decrypts < 1:
            raise ConfigurationError("token server: max_concurrent_decrypts must be >= 1")
        for name in ("request_timeout", "proof_window", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"token server: {name} must be positive")
        if self.max_pending_requests < 1 or self.max_header_size < 1024:
            raise ConfigurationError("token server: limits too small")
