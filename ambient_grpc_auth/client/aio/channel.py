"""grpc.aio channel factory for runners: the mirror of :mod:`ambient_grpc_auth.client.channel`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeAlias

import grpc
import grpc.aio

from ambient_grpc_auth.client._core import (
    check_token_source,
    plaintext_channel_options,
)
from ambient_grpc_auth.client.aio._unary import DirectAioUnaryUnary
from ambient_grpc_auth.client.aio.interceptor import AuthInterceptor
from ambient_grpc_auth.client.env import token_source_from_env
from ambient_grpc_auth.client.target import ChannelConfig, check_target
from ambient_grpc_auth.client.tokens import TokenSource
from ambient_grpc_auth.errors import ConfigurationError

__all__ = [
    "AuthenticatedChannel",
    "create_channel",
    "create_channel_from_env",
]

_log = logging.getLogger(__name__)
_Options: TypeAlias = Sequence[tuple[str, Any]]


class AuthenticatedChannel(grpc.aio.Channel):
    """A ``grpc.aio.Channel`` whose calls carry the bearer token.

    With ``watch_reconnects`` a background task follows the channel's
    connectivity (without triggering connections) and feeds
    :meth:`AuthInterceptor.on_connectivity`; it is created on the running
    loop and cancelled by :meth:`close` (always close the channel).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        interceptor: AuthInterceptor,
        *,
        watch_reconnects: bool = True,
        direct_unary: bool = False,
    ) -> None:
        self._channel = channel
        self._interceptor = interceptor
        # Set by create_channel when ``channel`` has no unary-unary
        # interceptor: those calls then take the direct path.
        self._direct_unary = direct_unary
        self._watcher: asyncio.Task[None] | None = None
        if watch_reconnects:
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(), name="ambient-grpc-auth-connectivity"
            )

    def __repr__(self) -> str:
        return f"AuthenticatedChannel(interceptor={self._interceptor!r})"

    @property
    def interceptor(self) -> AuthInterceptor:
        return self._interceptor

    @property
    def reconnects(self) -> int:
        return self._interceptor.reconnects

    async def _watch(self) -> None:
        try:
            ready = grpc.ChannelConnectivity.READY
            state = self._channel.get_state(try_to_connect=False)
            while True:
                self._interceptor.on_connectivity(state)
                if state is grpc.ChannelConnectivity.SHUTDOWN:
                    return
                previous = state
                await self._channel.wait_for_state_change(state)
                state = self._channel.get_state(try_to_connect=False)
                if previous is ready and state is ready:
                    # Woken by a change yet READY again: the connection
                    # dropped and came back before this task ran.
                    self._interceptor.on_connectivity(grpc.ChannelConnectivity.IDLE)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let watching break the channel
            _log.warning("stopped watching channel connectivity (%s)", type(exc).__name__)

    async def close(self, grace: float | None = None) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            # wait() does not raise, so a cancellation of close() itself still propagates.
            await asyncio.wait([watcher])
        await self._channel.close(grace)

    async def __aenter__(self) -> AuthenticatedChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    def unary_unary(
        self, method: str, *args: Any, **kwargs: Any
    ) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        raw = self._channel.unary_unary(method, *args, **kwargs)
        if not self._direct_unary:
            return raw
        return DirectAioUnaryUnary(raw, self._interceptor)

    def unary_stream(
        self, method: str, *args: Any, **kwargs: Any
    ) -> grpc.aio.UnaryStreamMultiCallable[Any, Any]:
        return self._channel.unary_stream(method, *args, **kwargs)

    def stream_unary(
        self, method: str, *args: Any, **kwargs: Any
    ) -> grpc.aio.StreamUnaryMultiCallable[Any, Any]:
        return self._channel.stream_unary(method, *args, **kwargs)

    def stream_stream(
        self, method: str, *args: Any, **kwargs: Any
    ) -> grpc.aio.StreamStreamMultiCallable[Any, Any]:
        return self._channel.stream_stream(method, *args, **kwargs)


def create_channel(
    target: str,
    token_source: TokenSource,
    *,
    tls: bool,
    root_certificates: bytes | None = None,
    allow_insecure_remote: bool = False,
    options: _Options = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    compression: grpc.Compression | None = None,
    retry_unauthenticated: bool = True,
    watch_reconnects: bool = True,
) -> AuthenticatedChannel:
    """A grpc.aio channel to ``target`` whose calls carry the bearer token.

    Same arguments, policy and errors as
    :func:`ambient_grpc_auth.client.channel.create_channel`; the caller's
    ``interceptors`` run outside the auth interceptor. Must be called from a
    running event loop when ``watch_reconnects`` is True (RuntimeError
    otherwise).
    """
    check_token_source(token_source)  # before any channel exists
    parsed = check_target(target, tls=tls, allow_insecure_remote=allow_insecure_remote)
    if root_certificates is not None and not tls:
        raise ConfigurationError("root_certificates are only used with tls=True")
    if watch_reconnects:
        asyncio.get_running_loop()  # fail before creating anything
    interceptor = AuthInterceptor(token_source, retry_unauthenticated=retry_unauthenticated)
    # Without interceptors of the caller's own, unary-unary calls skip
    # grpc.aio's interceptor machinery (see ambient_grpc_auth.client.aio._unary).
    direct = not interceptors
    chain = [*interceptors, *interceptor.interceptors(unary_unary=not direct)]
    raw = (
        grpc.aio.secure_channel(
            parsed.target,
            grpc.ssl_channel_credentials(root_certificates),
            options,
            compression,
            interceptors=chain,
        )
        if tls
        else grpc.aio.insecure_channel(
            parsed.target, plaintext_channel_options(options), compression, interceptors=chain
        )
    )
    return AuthenticatedChannel(
        raw, interceptor, watch_reconnects=watch_reconnects, direct_unary=direct
    )


def create_channel_from_env(
    token_source: TokenSource | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    allow_insecure_remote: bool = False,
    options: _Options = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    compression: grpc.Compression | None = None,
) -> AuthenticatedChannel:
    """The runner's grpc.aio channel from the environment contract (see
    :class:`ambient_grpc_auth.client.channel.ChannelConfig`). ``token_source``
    defaults to :func:`~ambient_grpc_auth.client.env.token_source_from_env`."""
    config = ChannelConfig.from_env(environ, allow_insecure_remote=allow_insecure_remote)
    if token_source is None:
        token_source = token_source_from_env(environ)
    return create_channel(
        config.target,
        token_source,
        tls=config.tls,
        root_certificates=config.root_certificates(),
        allow_insecure_remote=config.allow_insecure_remote,
        options=options,
        interceptors=interceptors,
        compression=compression,
    )
