"""Channel factory for runners: target parsing, TLS, plaintext policy, from_env.

One factory, :func:`create_channel`, returns an :class:`AuthenticatedChannel`
(a ``grpc.Channel``) whose every call carries the runner's bearer token
(:class:`~ambient_grpc_auth.client.interceptor.AuthInterceptor`) and which watches its own
connectivity so that a reconnect makes the next call fetch a fresh token.
The grpc.aio twin is :func:`ambient_grpc_auth.client.aio.channel.create_channel`;
both share :class:`ChannelConfig` and the plaintext policy here.

Plaintext policy: without TLS a bearer token can be read by anyone on the
path, so it is sent in plaintext only to

- loopback: ``localhost``, 127.0.0.0/8, ``::1`` (and IPv4-mapped loopback),
  and Unix-domain sockets (``unix:``, ``unix-abstract:``);
- cluster-local names: ``*.svc``, ``*.cluster.local`` and short names
  without dots that start with a letter (``ambient-api-server``). A short
  name is a Kubernetes service in the runner's own namespace — the
  platform's default target is one. Caveat: a resolver search list that
  includes a non-cluster domain could send it elsewhere; use TLS or a
  fully qualified ``*.svc.cluster.local`` name where that matters.

Every other host (public names, other IP addresses, including private
ranges) needs ``tls=True`` or an explicit ``allow_insecure_remote=True``;
otherwise :class:`~ambient_grpc_auth.errors.ConfigurationError` is raised
before any connection is made.

Environment contract (read only by :meth:`ChannelConfig.from_env`):
``AMBIENT_GRPC_URL`` (default ``ambient-api-server:9000``),
``AMBIENT_GRPC_USE_TLS`` (true/1/yes/on or false/0/no/off, case-insensitive;
default false), ``AMBIENT_GRPC_CA_CERT_FILE`` (PEM roots; when unset and the
pod's service CA file exists, that file; else the system roots).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeAlias

import grpc

from ambient_grpc_auth.client._core import check_token_source, plaintext_channel_options
from ambient_grpc_auth.client._unary import DirectUnaryUnary
from ambient_grpc_auth.client.env import token_source_from_env
from ambient_grpc_auth.client.interceptor import AuthInterceptor
from ambient_grpc_auth.client.target import ChannelConfig, check_target
from ambient_grpc_auth.client.tokens import TokenSource
from ambient_grpc_auth.errors import ConfigurationError

__all__ = [
    "AuthenticatedChannel",
    "create_channel",
    "create_channel_from_env",
]

_Options: TypeAlias = Sequence[tuple[str, Any]]
_SyncInterceptor: TypeAlias = (
    grpc.UnaryUnaryClientInterceptor
    | grpc.UnaryStreamClientInterceptor
    | grpc.StreamUnaryClientInterceptor
    | grpc.StreamStreamClientInterceptor
)


def _let_connectivity_poller_settle(channel: grpc.Channel) -> None:
    """Wait (briefly, bounded) until gRPC's connectivity-polling thread has
    made its first check. Closing a channel before that makes that thread
    die with "Cannot monitor channel state: Channel closed!" on stderr (a
    gRPC race); once it is waiting on the channel, closing ends it cleanly.
    Reads gRPC private state defensively: without it, nothing is waited for.
    """
    state = getattr(channel, "_connectivity_state", None)
    if state is None:
        return
    deadline = time.monotonic() + 1.0
    while getattr(state, "polling", False) and getattr(state, "connectivity", 0) is None:
        if time.monotonic() > deadline:
            return
        time.sleep(0.001)
    # The thread sets the state, then enters its (interruptible) wait.
    time.sleep(0.005)


def _close_at_exit(
    channel: grpc.Channel, callback: Callable[[grpc.ChannelConnectivity], None]
) -> None:
    with contextlib.suppress(Exception):
        channel.unsubscribe(callback)
        channel.close()


class AuthenticatedChannel(grpc.Channel):
    """A ``grpc.Channel`` whose calls carry the bearer token.

    Calls go through the caller's ``interceptors`` first and the
    :class:`~ambient_grpc_auth.client.interceptor.AuthInterceptor` last (innermost), so
    other interceptors never see the token and one logical call (including
    its UNAUTHENTICATED retry) looks like one call to them. With
    ``watch_reconnects`` the channel's connectivity is followed (no extra
    connection attempts) and a reconnect invalidates the token in use.

    Thread-safe like any ``grpc.Channel``. ``close()`` stops the watching and
    closes the underlying channel.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        interceptor: AuthInterceptor,
        *,
        interceptors: Sequence[_SyncInterceptor] = (),
        watch_reconnects: bool = True,
    ) -> None:
        self._raw = channel
        self._interceptor = interceptor
        self._intercepted = grpc.intercept_channel(channel, *interceptors, interceptor)
        # Without interceptors of the caller's own, blocking unary calls skip
        # gRPC's interceptor machinery (see ambient_grpc_auth.client._unary).
        self._direct = not interceptors
        self._watching: Callable[[grpc.ChannelConnectivity], None] | None = None
        self._at_exit: weakref.finalize[Any, Any] | None = None
        if watch_reconnects:
            self._watching = interceptor.on_connectivity
            channel.subscribe(self._watching, try_to_connect=False)
            # A channel left open with a connectivity subscription deadlocks
            # interpreter exit (gRPC's __del__ waits on a lock held by its
            # frozen polling thread); close it at exit, or when this object
            # is collected, if close() was never called.
            self._at_exit = weakref.finalize(self, _close_at_exit, channel, self._watching)

    def __repr__(self) -> str:
        return f"AuthenticatedChannel(interceptor={self._interceptor!r})"

    @property
    def interceptor(self) -> AuthInterceptor:
        return self._interceptor

    @property
    def reconnects(self) -> int:
        """Reconnects observed so far (see :attr:`AuthInterceptor.reconnects`)."""
        return self._interceptor.reconnects

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        self._raw.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._raw.unsubscribe(callback)

    def unary_unary(
        self, method: str, *args: Any, **kwargs: Any
    ) -> grpc.UnaryUnaryMultiCallable[Any, Any]:
        intercepted = self._intercepted.unary_unary(method, *args, **kwargs)
        if not self._direct:
            return intercepted
        raw = self._raw.unary_unary(method, *args, **kwargs)
        return DirectUnaryUnary(raw, intercepted, self._interceptor)

    def unary_stream(
        self, method: str, *args: Any, **kwargs: Any
    ) -> grpc.UnaryStreamMultiCallable[Any, Any]:
        return self._intercepted.unary_stream(method, *args, **kwargs)

    def stream_unary(
        self, method: str, *args: Any, **kwargs: Any
    ) -> grpc.StreamUnaryMultiCallable[Any, Any]:
        return self._intercepted.stream_unary(method, *args, **kwargs)

    def stream_stream(
        self, method: str, *args: Any, **kwargs: Any
    ) -> grpc.StreamStreamMultiCallable[Any, Any]:
        return self._intercepted.stream_stream(method, *args, **kwargs)

    def close(self) -> None:
        if self._at_exit is not None:
            self._at_exit.detach()
        watching, self._watching = self._watching, None
        if watching is not None:
            # Already gone (closing twice) is fine.
            with contextlib.suppress(ValueError):
                self._raw.unsubscribe(watching)
            _let_connectivity_poller_settle(self._raw)
        self._raw.close()

    def __enter__(self) -> AuthenticatedChannel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.close()


def create_channel(
    target: str,
    token_source: TokenSource,
    *,
    tls: bool,
    root_certificates: bytes | None = None,
    allow_insecure_remote: bool = False,
    options: _Options = (),
    interceptors: Sequence[_SyncInterceptor] = (),
    compression: grpc.Compression | None = None,
    retry_unauthenticated: bool = True,
    watch_reconnects: bool = True,
) -> AuthenticatedChannel:
    """A sync channel to ``target`` whose calls carry ``token_source``'s bearer.

    ``tls=True`` uses TLS with ``root_certificates`` (PEM; None: system roots).
    ``tls=False`` is plaintext and subject to the plaintext policy (module
    docs). ``options`` are passed to gRPC (e.g. ``grpc.max_reconnect_backoff_ms``
    to bound how long a restarted server stays unnoticed). No connection is
    made here. Raises :class:`ConfigurationError` for a malformed target, a
    refused plaintext target, or ``root_certificates`` without TLS, and
    TypeError when ``token_source`` is not a ``TokenSource`` (a token string
    goes in ``StaticTokenSource(token)``).
    """
    check_token_source(token_source)  # before any channel exists
    parsed = check_target(target, tls=tls, allow_insecure_remote=allow_insecure_remote)
    if root_certificates is not None and not tls:
        raise ConfigurationError("root_certificates are only used with tls=True")
    raw = (
        grpc.secure_channel(
            parsed.target, grpc.ssl_channel_credentials(root_certificates), options, compression
        )
        if tls
        else grpc.insecure_channel(parsed.target, plaintext_channel_options(options), compression)
    )
    interceptor = AuthInterceptor(token_source, retry_unauthenticated=retry_unauthenticated)
    return AuthenticatedChannel(
        raw, interceptor, interceptors=interceptors, watch_reconnects=watch_reconnects
    )


def create_channel_from_env(
    token_source: TokenSource | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    allow_insecure_remote: bool = False,
    options: _Options = (),
    interceptors: Sequence[_SyncInterceptor] = (),
    compression: grpc.Compression | None = None,
) -> AuthenticatedChannel:
    """The runner's channel from the environment contract (module docs).

    ``token_source`` defaults to
    :func:`~ambient_grpc_auth.client.env.token_source_from_env` over the same
    ``environ``. Raises :class:`ConfigurationError` for invalid settings.
    """
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
