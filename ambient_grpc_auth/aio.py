"""The ``grpc.aio`` front door: the same names as :mod:`ambient_grpc_auth`
for everything that does I/O, with the same contracts.

Token sources, configuration, errors and :func:`current_principal` are shared
with the sync side and are imported from :mod:`ambient_grpc_auth`.
"""

from __future__ import annotations

from ambient_grpc_auth.client.aio.channel import (
    AuthenticatedChannel,
    create_channel,
    create_channel_from_env,
)
from ambient_grpc_auth.client.aio.interceptor import AuthInterceptor, TokenUnavailableRpcError
from ambient_grpc_auth.client.aio.sessions import SessionWatch, push, watch
from ambient_grpc_auth.server.aio.interceptor import ServerAuthInterceptor

__all__ = [
    "AuthInterceptor",
    "AuthenticatedChannel",
    "ServerAuthInterceptor",
    "SessionWatch",
    "TokenUnavailableRpcError",
    "create_channel",
    "create_channel_from_env",
    "push",
    "watch",
]
