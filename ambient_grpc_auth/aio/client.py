"""Runner-side gRPC authentication for ``grpc.aio``: interceptor and channel factory.

The mirror of :mod:`ambient_grpc_auth.client` and
:mod:`ambient_grpc_auth.channel`; the same contracts hold:

- :class:`AuthInterceptor` adds ``authorization: Bearer <token>`` to calls of
  all four RPC shapes, keeping every ``grpc.aio.ClientCallDetails`` field
  (method, timeout, metadata, credentials, wait_for_ready; in grpc.aio the
  call's compression travels inside the metadata and is kept with it). The
  token comes from ``get_token_async()``: the event loop is never blocked.
- A unary-unary call, and a stream-unary call whose requests are a list or
  tuple, is retried ONCE with a fresh token after UNAUTHENTICATED, within the
  caller's deadline. Streaming responses are not retried (see
  :mod:`ambient_grpc_auth.aio.sessions`), but every call that ends
  UNAUTHENTICATED drops its token from a refreshable source before the caller
  sees the error.
- When no token can be obtained the call is not sent; the caller gets a
  :class:`TokenUnavailableAioRpcError` (a ``grpc.aio.AioRpcError``):
  UNAVAILABLE for retryable failures, else UNAUTHENTICATED.
- :class:`AuthenticatedChannel` follows its connectivity in a background task
  (cancelled by ``close()``) and invalidates the token in use on a reconnect.

Known grpc.aio race: when a server refuses a client-streaming call before it
has read the requests, grpc.aio may report a locally made-up INTERNAL instead
of the server's status; such a call is then neither retried nor is its token
dropped (runners use unary and server-streaming calls, which are unaffected).

grpc.aio (as of 1.85) files an interceptor object under the first RPC shape
it implements only, so :class:`AuthInterceptor` is not itself a grpc.aio
interceptor: :meth:`AuthInterceptor.interceptors` returns one single-shape
interceptor per shape, and :func:`create_channel` installs all four.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeAlias

import grpc
import grpc.aio

from .._client_core import (
    TOKEN_UNAVAILABLE_DETAILS,
    InterceptorState,
    as_token_error,
    is_replayable,
    plaintext_channel_options,
    remaining_timeout,
    token_error_code,
    with_authorization,
)
from ..channel import ChannelConfig, check_target
from ..errors import ConfigurationError, TokenUnavailableError
from ..tokens import Token, TokenSource
from ._unarycall import DirectAioUnaryUnary

__all__ = [
    "AuthInterceptor",
    "AuthenticatedChannel",
    "TokenUnavailableAioRpcError",
    "create_channel",
    "create_channel_from_env",
]

_log = logging.getLogger(__name__)

_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
_Options: TypeAlias = Sequence[tuple[str, Any]]
_Continuation: TypeAlias = Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]]


class TokenUnavailableAioRpcError(grpc.aio.AioRpcError):
    """Raised for a call that was not sent because no token was obtained.

    ``code()`` is UNAVAILABLE when ``token_error.retryable`` else
    UNAUTHENTICATED; ``details()`` is fixed; the
    :class:`~ambient_grpc_auth.errors.TokenUnavailableError` is ``token_error``
    and ``__cause__``.
    """

    def __init__(self, token_error: TokenUnavailableError) -> None:
        super().__init__(
            token_error_code(token_error),
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details=TOKEN_UNAVAILABLE_DETAILS,
        )
        self.token_error = token_error
        self.__cause__ = token_error


class _CallDetails(grpc.aio.ClientCallDetails):
    """grpc.aio's call details with a repr that shows metadata keys only
    (the values include the bearer)."""

    __slots__ = ()

    def __repr__(self) -> str:
        keys = [key for key, _ in self.metadata or ()]
        return (
            f"_CallDetails(method={self.method!r}, timeout={self.timeout!r}, "
            f"metadata_keys={keys!r}, wait_for_ready={self.wait_for_ready!r})"
        )


def _rebuild(
    details: grpc.aio.ClientCallDetails, token: str, timeout: float | None
) -> grpc.aio.ClientCallDetails:
    return _CallDetails(
        details.method,
        timeout,
        grpc.aio.Metadata(*with_authorization(details.metadata, token)),
        details.credentials,
        details.wait_for_ready,
    )


class _CallProxy:
    """Delegates to a grpc.aio call and reports UNAUTHENTICATED to the
    interceptor before the caller sees the error. Unknown attributes fall
    through to the wrapped call (grpc.aio's intercepted calls read private
    flags from whatever the interceptor returned)."""

    def __init__(self, call: Any, interceptor: AuthInterceptor, token: Token) -> None:
        self._call = call
        self._interceptor = interceptor
        self._token = token
        self._reported = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._call!r})"

    def _report(self, code: grpc.StatusCode) -> None:
        if code is _UNAUTHENTICATED and not self._reported:
            self._reported = True
            self._interceptor._token_rejected(self._token)

    def cancel(self) -> bool:
        return self._call.cancel()  # type: ignore[no-any-return]

    def cancelled(self) -> bool:
        return self._call.cancelled()  # type: ignore[no-any-return]

    def done(self) -> bool:
        return self._call.done()  # type: ignore[no-any-return]

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()  # type: ignore[no-any-return]

    def add_done_callback(self, callback: Any) -> None:
        self._call.add_done_callback(lambda _call: callback(self))

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return await self._call.initial_metadata()  # type: ignore[no-any-return]

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return await self._call.trailing_metadata()  # type: ignore[no-any-return]

    async def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = await self._call.code()
        self._report(code)
        return code

    async def details(self) -> str:
        return await self._call.details()  # type: ignore[no-any-return]

    async def wait_for_connection(self) -> None:
        await self._call.wait_for_connection()

    async def _iterate(self) -> AsyncIterator[Any]:
        try:
            async for item in self._call:
                yield item
        except grpc.aio.AioRpcError as err:
            self._report(err.code())
            raise

    async def read(self) -> Any:
        try:
            return await self._call.read()
        except grpc.aio.AioRpcError as err:
            self._report(err.code())
            raise

    async def write(self, request: Any) -> None:
        await self._call.write(request)

    async def done_writing(self) -> None:
        await self._call.done_writing()


class _AuthUnaryStreamCall(_CallProxy, grpc.aio.UnaryStreamCall[Any, Any]):
    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()


class _AuthStreamStreamCall(_CallProxy, grpc.aio.StreamStreamCall[Any, Any]):
    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()


class _AuthStreamUnaryCall(_CallProxy, grpc.aio.StreamUnaryCall[Any, Any]):
    def __await__(self) -> Generator[Any, None, Any]:
        try:
            return (yield from self._call.__await__())
        except grpc.aio.AioRpcError as err:
            self._report(err.code())
            raise


class AuthInterceptor(InterceptorState):
    """Adds the bearer token to grpc.aio calls of all four RPC shapes.

    See :class:`ambient_grpc_auth.client.AuthInterceptor` for the contract.
    Use one instance per event loop (it is not thread-safe; grpc.aio channels
    are bound to one loop anyway).

    Pass :meth:`interceptors` to a grpc.aio channel, not the instance itself:
    grpc.aio files an interceptor object under the first RPC shape it
    implements only, so one object implementing all four would leave
    streaming calls without a token. :func:`create_channel` does this.
    """

    def __init__(self, token_source: TokenSource, *, retry_unauthenticated: bool = True) -> None:
        # One event loop: no lock is needed around the shared state.
        super().__init__(
            token_source,
            retry_unauthenticated=retry_unauthenticated,
            lock=contextlib.nullcontext(),
        )

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """One single-shape grpc.aio interceptor per RPC shape, all backed by
        this instance (for ``grpc.aio.*_channel(..., interceptors=...)``)."""
        return [
            _UnaryUnary(self),
            _UnaryStream(self),
            _StreamUnary(self),
            _StreamStream(self),
        ]

    async def _get_token(self) -> Token:
        try:
            token = await self._source.get_token_async()
        except Exception as exc:
            err = as_token_error(exc)
            _log.debug("no token for a call: %s", err)
            raise TokenUnavailableAioRpcError(err) from err
        self._last_token = token
        return token

    async def _retry_after(
        self, rejected: Token, call_timeout: float | None, elapsed: float
    ) -> tuple[Token, float | None] | None:
        """After ``rejected`` got UNAUTHENTICATED: the fresh token and the
        timeout left (of ``call_timeout``) for the one retry, or ``None`` when
        not retrying (retries off, deadline spent, no token, or the same
        token again)."""
        if not self._retry:
            return None
        remaining = remaining_timeout(call_timeout, elapsed)
        if remaining is not None and remaining <= 0:
            return None
        try:
            fresh = await self._get_token()
        except TokenUnavailableAioRpcError:
            return None  # the server's answer is more useful than ours
        if fresh.value == rejected.value:
            return None
        self._count_retry()
        return fresh, remaining

    @staticmethod
    async def _code(call: Any) -> grpc.StatusCode:
        # Awaiting the call, not call.code(): when the server answers before
        # all requests of a client stream were sent, grpc.aio's code() can
        # report a locally made-up INTERNAL while the call raises the
        # server's real status.
        try:
            await call
        except grpc.aio.AioRpcError as err:
            return err.code()
        except asyncio.CancelledError:
            # The caller gave up on the call while we waited for its status.
            call.cancel()
            raise
        return grpc.StatusCode.OK

    async def _unary(
        self,
        continuation: _Continuation,
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        loop = asyncio.get_running_loop()
        started = loop.time()
        token = await self._get_token()
        call = await continuation(_rebuild(details, token.value, details.timeout), request)
        if await self._code(call) is not _UNAUTHENTICATED:
            return call
        self._token_rejected(token)
        retry = await self._retry_after(token, details.timeout, loop.time() - started)
        if retry is None:
            return call
        fresh, timeout = retry
        second = await continuation(_rebuild(details, fresh.value, timeout), request)
        if await self._code(second) is _UNAUTHENTICATED:
            self._token_rejected(fresh)
        return second

    async def intercept_unary_unary(
        self,
        continuation: _Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await self._unary(continuation, client_call_details, request)

    async def intercept_stream_unary(
        self,
        continuation: _Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        if is_replayable(request_iterator):
            return await self._unary(continuation, client_call_details, request_iterator)
        # Not replayable (a generator, or call.write()): return at once, since
        # the caller's writes wait for this interceptor to finish.
        token = await self._get_token()
        call = await continuation(
            _rebuild(client_call_details, token.value, client_call_details.timeout),
            request_iterator,
        )
        return _AuthStreamUnaryCall(call, self, token)

    async def intercept_unary_stream(
        self,
        continuation: _Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        token = await self._get_token()
        call = await continuation(
            _rebuild(client_call_details, token.value, client_call_details.timeout), request
        )
        return _AuthUnaryStreamCall(call, self, token)

    async def intercept_stream_stream(
        self,
        continuation: _Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        token = await self._get_token()
        call = await continuation(
            _rebuild(client_call_details, token.value, client_call_details.timeout),
            request_iterator,
        )
        return _AuthStreamStreamCall(call, self, token)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, auth: AuthInterceptor) -> None:
        self._auth = auth

    async def intercept_unary_unary(
        self,
        continuation: _Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await self._auth.intercept_unary_unary(continuation, client_call_details, request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, auth: AuthInterceptor) -> None:
        self._auth = auth

    async def intercept_unary_stream(
        self,
        continuation: _Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await self._auth.intercept_unary_stream(continuation, client_call_details, request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, auth: AuthInterceptor) -> None:
        self._auth = auth

    async def intercept_stream_unary(
        self,
        continuation: _Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await self._auth.intercept_stream_unary(
            continuation, client_call_details, request_iterator
        )


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, auth: AuthInterceptor) -> None:
        self._auth = auth

    async def intercept_stream_stream(
        self,
        continuation: _Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await self._auth.intercept_stream_stream(
            continuation, client_call_details, request_iterator
        )


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
    :func:`ambient_grpc_auth.channel.create_channel`; the caller's
    ``interceptors`` run outside the auth interceptor. Must be called from a
    running event loop when ``watch_reconnects`` is True (RuntimeError
    otherwise).
    """
    parsed = check_target(target, tls=tls, allow_insecure_remote=allow_insecure_remote)
    if root_certificates is not None and not tls:
        raise ConfigurationError("root_certificates are only used with tls=True")
    if watch_reconnects:
        asyncio.get_running_loop()  # fail before creating anything
    interceptor = AuthInterceptor(token_source, retry_unauthenticated=retry_unauthenticated)
    # Without interceptors of the caller's own, unary-unary calls skip
    # grpc.aio's interceptor machinery (see ambient_grpc_auth.aio._unarycall).
    direct = not interceptors
    ours = interceptor.interceptors()
    chain = (
        [i for i in ours if not isinstance(i, _UnaryUnary)] if direct else [*interceptors, *ours]
    )
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
    :class:`ambient_grpc_auth.channel.ChannelConfig`). ``token_source``
    defaults to :func:`~ambient_grpc_auth.tokens.token_source_from_env`."""
    config = ChannelConfig.from_env(environ, allow_insecure_remote=allow_insecure_remote)
    if token_source is None:
        from ..tokens import token_source_from_env

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
