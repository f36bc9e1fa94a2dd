"""ambient-grpc-auth: authentication for ambient session-message gRPC streams.

The front door. A runner (gRPC client) needs a token source and a channel;
an API server needs a :class:`ServerAuthConfig` and a
:class:`ServerAuthInterceptor`; handlers read :func:`current_principal`.
The ``grpc.aio`` twins have the same names in :mod:`ambient_grpc_auth.aio`.

Everything else lives in one module per concept, by party:
:mod:`ambient_grpc_auth.client` (runner), :mod:`ambient_grpc_auth.server`
(API server), :mod:`ambient_grpc_auth.controlplane` (the ``/token``
endpoint), :mod:`ambient_grpc_auth.reference` (a small SessionService), and
the generated stubs under :mod:`ambient_grpc_auth.proto`.
"""

from __future__ import annotations

from ambient_grpc_auth._version import __version__
from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.channel import (
    AuthenticatedChannel,
    create_channel,
    create_channel_from_env,
)
from ambient_grpc_auth.client.control_plane import ControlPlaneTokenSource
from ambient_grpc_auth.client.env import token_source_from_env
from ambient_grpc_auth.client.interceptor import (
    AuthInterceptor,
    TokenUnavailableRpcError,
    bearer_call_credentials,
)
from ambient_grpc_auth.client.sessions import SessionWatch, WatchRetryPolicy, push, watch
from ambient_grpc_auth.client.target import ChannelConfig
from ambient_grpc_auth.client.tokens import FileTokenSource, StaticTokenSource, Token, TokenSource
from ambient_grpc_auth.errors import (
    AmbientAuthError,
    ConfigurationError,
    TokenRejectedError,
    TokenUnavailableError,
)
from ambient_grpc_auth.principal import CallerKind, Principal, current_principal
from ambient_grpc_auth.server.authn import TrustedIssuer, kubernetes_issuer
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor
from ambient_grpc_auth.server.jwks import JwksCache, StaticKeySet

__all__ = [
    "AmbientAuthError",
    "AuthInterceptor",
    "AuthenticatedChannel",
    "CachingTokenSource",
    "CallerKind",
    "ChannelConfig",
    "ConfigurationError",
    "ControlPlaneTokenSource",
    "FileTokenSource",
    "JwksCache",
    "Principal",
    "ServerAuthConfig",
    "ServerAuthInterceptor",
    "SessionWatch",
    "StaticKeySet",
    "StaticTokenSource",
    "Token",
    "TokenRejectedError",
    "TokenSource",
    "TokenUnavailableError",
    "TokenUnavailableRpcError",
    "TrustedIssuer",
    "WatchRetryPolicy",
    "__version__",
    "bearer_call_credentials",
    "create_channel",
    "create_channel_from_env",
    "current_principal",
    "kubernetes_issuer",
    "push",
    "token_source_from_env",
    "watch",
]
