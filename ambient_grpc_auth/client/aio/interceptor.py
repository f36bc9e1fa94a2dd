"""Runner-side gRPC authentication for ``grpc.aio``: interceptor and channel factory.

The mirror of :mod:`ambient_grpc_auth.client.interceptor` and
:mod:`ambient_grpc_auth.client.channel`; the same contracts hold:

- :class:`AuthInterceptor` adds ``authorization: Bearer <token>`` to calls of
  all four RPC shapes, keeping every ``grpc.aio.ClientCallDetails`` field
  (method, timeout, metadata, credentials, wait_for_ready; in grpc.aio the
  call's compression travels inside the metadata and is kept with it). The
  token comes from ``get_token_async()``: the event loop is never blocked.
- A unary-unary call, and a stream-unary call whose requests are a list or
  tuple, is retried ONCE with a fresh token after UNAUTHENTICATED, within the
  caller's deadline (the decision is
  :class:`~ambient_grpc_auth.client._retry.UnaryRetry`, shared with the sync
  side and both direct unary paths). Streaming responses are not retried (see
  :mod:`ambient_grpc_auth.client.aio.sessions`), but every call that ends
  UNAUTHENTICATED drops its token from a refreshable source before the caller
  sees the error.
- When no token can be obtained the call is not sent; the caller gets a
  :class:`TokenUnavailableRpcError` (a ``grpc.aio.AioRpcError``):
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
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from typing import Any, TypeAlias

import grpc
import grpc.aio

from ambient_grpc_auth.client._core import (
    AuthInterceptorBase,
    InterceptorState,
    is_replayable,
    token_error_code,
    token_unavailable_details,
    with_authorization,
)
from ambient_grpc_auth.client._retry import UnaryRetry
from ambient_grpc_auth.client.tokens import Token, TokenSource
from ambient_grpc_auth.errors import TokenUnavailableError

__all__ = [
    "AuthInterceptor",
    "TokenUnavailableRpcError",
]

_log = logging.getLogger(__name__)

_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
_Options: TypeAlias = Sequence[tuple[str, Any]]
_Continuation: TypeAlias = Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]]


class TokenUnavailableRpcError(grpc.aio.AioRpcError):
    """Raised for a call that was not sent because no token was obtained.

    ``code()`` is UNAVAILABLE when ``token_error.retryable`` else
    UNAUTHENTICATED; ``details()`` is ``could not obtain an access token:
    <cause>`` (never token material); the
    :class:`~ambient_grpc_auth.errors.TokenUnavailableError` is ``token_error``
    and ``__cause__``.
    """

    def __init__(self, token_error: TokenUnavailableError) -> None:
        super().__init__(
            token_error_code(token_error),
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details=token_unavailable_details(token_error),
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

    def __init__(self, call: Any, state: InterceptorState, token: Token) -> None:
        self._call = call
        self._state = state
        self._token = token
        self._reported = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._call!r})"

    def _report(self, code: grpc.StatusCode) -> None:
        if code is _UNAUTHENTICATED and not self._reported:
            self._reported = True
            self._state.token_rejected(self._token)

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


async def token_for_call(state: InterceptorState) -> Token:
    """``state``'s token for a grpc.aio call; raises
    :class:`TokenUnavailableRpcError` (the call is then not sent)."""
    try:
        return await state.get_token_async()
    except TokenUnavailableError as exc:
        _log.debug("no token for a call: %s", exc)
        raise TokenUnavailableRpcError(exc) from exc


async def final_status(call: Any) -> grpc.StatusCode:
    """The status a grpc.aio call ended with, once it has ended.

    Awaits the call, not ``call.code()``: when the server answers before all
    requests of a client stream were sent, grpc.aio's ``code()`` can report a
    locally made-up INTERNAL while the call raises the server's real status.
    Cancelling the waiting task cancels the call.
    """
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    except asyncio.CancelledError:
        # The caller gave up on the call while we waited for its status.
        call.cancel()
        raise
    return grpc.StatusCode.OK


class AuthInterceptor(AuthInterceptorBase):
    """Adds the bearer token to grpc.aio calls of all four RPC shapes.

    See :class:`ambient_grpc_auth.client.interceptor.AuthInterceptor` for the contract.
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

    def interceptors(self, *, unary_unary: bool = True) -> list[grpc.aio.ClientInterceptor]:
        """One single-shape grpc.aio interceptor per RPC shape, all backed by
        this instance (for ``grpc.aio.*_channel(..., interceptors=...)``).
        ``unary_unary=False`` leaves that shape out, for a channel that serves
        unary-unary calls itself."""
        shapes: list[grpc.aio.ClientInterceptor] = [_UnaryUnary(self)] if unary_unary else []
        return [*shapes, _UnaryStream(self), _StreamUnary(self), _StreamStream(self)]

    async def _unary(
        self,
        continuation: _Continuation,
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Drives :class:`~ambient_grpc_auth.client._retry.UnaryRetry`; the mirror
        of the sync ``AuthInterceptor._unary`` and of the aio direct path's
        ``_DirectCall._settle``."""
        state = self._state
        clock = asyncio.get_running_loop().time
        started = clock()
        token = await token_for_call(state)
        flow = UnaryRetry(
            token, timeout=details.timeout, retry=state.retry_enabled, clock=clock, started=started
        )
        call = await continuation(_rebuild(details, token.value, details.timeout), request)
        while True:
            step = flow.after(await final_status(call))
            if step.drop is not None:
                state.token_rejected(step.drop)
            if not step.retry or not flow.use(await state.fresh_token_async()):
                return call
            state.count_retry()
            call = await continuation(_rebuild(details, flow.token.value, step.timeout), request)

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
        token = await token_for_call(self._state)
        call = await continuation(
            _rebuild(client_call_details, token.value, client_call_details.timeout),
            request_iterator,
        )
        return _AuthStreamUnaryCall(call, self._state, token)

    async def intercept_unary_stream(
        self,
        continuation: _Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        token = await token_for_call(self._state)
        call = await continuation(
            _rebuild(client_call_details, token.value, client_call_details.timeout), request
        )
        return _AuthUnaryStreamCall(call, self._state, token)

    async def intercept_stream_stream(
        self,
        continuation: _Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        token = await token_for_call(self._state)
        call = await continuation(
            _rebuild(client_call_details, token.value, client_call_details.timeout),
            request_iterator,
        )
        return _AuthStreamStreamCall(call, self._state, token)


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
