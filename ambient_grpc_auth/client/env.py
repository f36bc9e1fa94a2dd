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
    "token_source_from_env",
]


def token_source_from_env(
    environ: Mapping[str, str] | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
    service_account_token_path: str = DEFAULT_SERVICE_ACCOUNT_TOKEN_PATH,
) -> CachingTokenSource:
    """The runner's token source, chosen by the environment contract and
    wrapped in a :class:`~ambient_grpc_auth.client.caching.CachingTokenSource`:

    1. ``AMBIENT_CP_TOKEN_URL`` set: the control-plane source (then
       ``AMBIENT_CP_TOKEN_PUBLIC_KEY`` and ``SESSION_ID`` are required);
    2. else ``BOT_TOKEN`` (local development);
    3. else the service-account token file, if it exists.

    Raises :class:`ConfigurationError` when nothing is configured or the
    chosen source's settings are invalid. No network traffic happens here.
    """
    env = os.environ if environ is None else environ
    source: TokenSource
    if env.get(CP_TOKEN_URL_ENV, "").strip():
        source = ControlPlaneTokenSource.from_env(env, clock=clock)
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
