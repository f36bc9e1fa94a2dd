"""The runner's environment contract, read only by explicit ``*_from_env`` calls."""

from __future__ import annotations

import os
from collections.abc import Mapping

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.control_plane import CP_TOKEN_URL_ENV, ControlPlaneTokenSource
from ambient_grpc_auth.client.tokens import (
    BOT_TOKEN_ENV,
    DEFAULT_SERVICE_ACCOUNT_TOKEN_PATH,
    EnvTokenSource,
    FileTokenSource,
    TokenSource,
)
from ambient_grpc_auth.errors import ConfigurationError

__all__ = [
    "RESUME_AFTER_SEQ_ENV",
    "resume_after_seq_from_env",
    "token_source_from_env",
]

# Where a runner's session watch starts when it is not told otherwise.
RESUME_AFTER_SEQ_ENV = "RESUME_AFTER_SEQ"


def token_source_from_env(
    environ: Mapping[str, str] | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
    service_account_token_path: str = DEFAULT_SERVICE_ACCOUNT_TOKEN_PATH,
    allow_insecure_remote: bool = False,
) -> CachingTokenSource:
    """The runner's token source, chosen by the environment contract and
    wrapped in a :class:`~ambient_grpc_auth.client.caching.CachingTokenSource`:

    1. ``AMBIENT_CP_TOKEN_URL`` set: the control-plane source (then
       ``AMBIENT_CP_TOKEN_PUBLIC_KEY`` and ``SESSION_ID`` are required;
       ``AMBIENT_CP_PROOF_VERSION`` and ``AMBIENT_CP_SA_TOKEN_FILE`` choose
       the proof, see :meth:`ControlPlaneTokenSource.from_env`);
    2. else ``BOT_TOKEN`` (local development);
    3. else the service-account token file, if it exists.

    ``allow_insecure_remote`` lets the control-plane source use plain http
    to a host that is neither loopback nor cluster-local. Raises
    :class:`ConfigurationError` when nothing is configured or the chosen
    source's settings are invalid. No network traffic happens here.
    """
    env = os.environ if environ is None else environ
    source: TokenSource
    if env.get(CP_TOKEN_URL_ENV, "").strip():
        source = ControlPlaneTokenSource.from_env(
            env, clock=clock, allow_insecure_remote=allow_insecure_remote
        )
    elif env.get(BOT_TOKEN_ENV, "").strip():
        source = EnvTokenSource.from_env(BOT_TOKEN_ENV, environ=env)
    elif os.path.isfile(service_account_token_path):
        source = FileTokenSource(service_account_token_path, clock=clock)
    else:
        raise ConfigurationError(
            f"no token source configured: set {CP_TOKEN_URL_ENV} (with "
            f"AMBIENT_CP_TOKEN_PUBLIC_KEY and SESSION_ID) or {BOT_TOKEN_ENV}, or run "
            f"where {service_account_token_path} exists"
        )
    return CachingTokenSource(source, clock=clock)


def resume_after_seq_from_env(environ: Mapping[str, str] | None = None) -> int:
    """``RESUME_AFTER_SEQ`` as an int (0 when unset or empty), for the
    ``after_seq`` of :func:`ambient_grpc_auth.client.sessions.watch`.

    Raises :class:`ConfigurationError` for a value that is not a
    non-negative integer.
    """
    env = os.environ if environ is None else environ
    raw = env.get(RESUME_AFTER_SEQ_ENV, "").strip()
    if not raw:
        return 0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        raise ConfigurationError(f"{RESUME_AFTER_SEQ_ENV} must be a non-negative integer")
    value = int(raw)
    if value > 2**63 - 1:
        raise ConfigurationError(f"{RESUME_AFTER_SEQ_ENV} is out of range")
    return value
