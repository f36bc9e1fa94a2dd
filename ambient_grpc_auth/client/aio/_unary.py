"""The direct path of unary-unary calls on a grpc.aio
:class:`~ambient_grpc_auth.client.aio.channel.AuthenticatedChannel`.

grpc.aio runs every intercepted call through an extra task and several
wrapper objects. A channel made by :func:`~ambient_grpc_auth.client.aio.channel.create_channel`
without interceptors of the caller's own therefore serves unary-unary calls
here instead: when the token source has a usable token at hand (a
:class:`~ambient_grpc_auth.client.caching.CachingTokenSource` hit) the call is sent at
once with the bearer, exactly like a plain grpc.aio call; otherwise a task
fetches the token first. The contract of the interceptor holds, because this
path drives the same :class:`~ambient_grpc_auth.client._retry.UnaryRetry` flow over
the same interceptor state: an UNAUTHENTICATED answer drops the token and,
once, retries with a fresh one within the caller's deadline; without a token
nothing is sent and the call fails with
:class:`~ambient_grpc_auth.client.aio.interceptor.TokenUnavailableRpcError`.

The retry happens when the outcome is asked for (``await call``,
``code()``, ``details()``, ``initial_metadata()``, ``trailing_metadata()``);
``cancel()``, ``done()``, ``time_remaining()`` and ``add_done_callback()``
act on the attempt in flight. Not part of the API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import Any

import grpc
import grpc.aio

from ambient_grpc_auth.client._core import InterceptorState, interceptor_state
from ambient_grpc_auth.client._retry import UnaryRetry
from ambient_grpc_auth.client.aio.interceptor import AuthInterceptor, final_status, token_for_call
from ambient_grpc_auth.client.tokens import Token

__all__ = ["DirectAioUnaryUnary"]


class DirectAioUnaryUnary(grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[type-arg]
    """A unary-unary multicallable adding the bearer itself."""

    __slots__ = ("_auth", "_raw", "_state")

    def __init__(self, raw: Any, interceptor: AuthInterceptor) -> None:
        self._raw = raw
        self._auth = interceptor
        self._state = interceptor_state(interceptor)

    def __repr__(self) -> str:
        return f"DirectAioUnaryUnary(interceptor={self._auth!r})"

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> _DirectCall:
        def send(token: Token, call_timeout: float | None) -> Any:
            return self._raw(
                request,
                timeout=call_timeout,
                metadata=self._state.bearer_metadata(token, metadata),
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )

        return _DirectCall(self._state, send, timeout)


def _retrieve(task: asyncio.Task[None]) -> None:
    # A token failure nobody awaited must not be logged as "never retrieved":
    # it is reported to whoever awaits the call.
    if not task.cancelled():
        task.exception()


class _DirectCall(grpc.aio.UnaryUnaryCall):  # type: ignore[type-arg]
    """One logical call: the first attempt and, after UNAUTHENTICATED, the retry."""

    def __init__(
        self,
        state: InterceptorState,
        send: Callable[[Token, float | None], Any],
        timeout: float | None,
    ) -> None:
        self._state = state
        self._send = send
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._final: asyncio.Future[Any] | None = None
        token = state.peek_token()
        self._token = token
        self._call: Any = None
        self._starting: asyncio.Task[None] | None = None
        if token is not None:
            self._call = send(token, timeout)
        else:
            self._starting = self._loop.create_task(self._start())
            self._starting.add_done_callback(_retrieve)

    def __repr__(self) -> str:
        return f"_DirectCall(call={self._call!r})"

    async def _start(self) -> None:
        token = await token_for_call(self._state)  # raises TokenUnavailableRpcError
        self._token = token
        self._call = self._send(token, self._timeout)

    async def _current(self) -> Any:
        if self._starting is not None:
            await self._starting
        return self._call

    async def _settle(self) -> Any:
        """The attempt whose outcome is the call's (the retry, if any). The
        mirror of :meth:`ambient_grpc_auth.client.aio.interceptor.AuthInterceptor._unary`."""
        call = await self._current()
        token = self._token
        assert token is not None
        state = self._state
        flow = UnaryRetry(
            token,
            timeout=self._timeout,
            retry=state.retry_enabled,
            clock=self._loop.time,
            started=self._started,
        )
        while True:
            step = flow.after(await final_status(call))
            if step.drop is not None:
                state.token_rejected(step.drop)
            if not step.retry or not flow.use(await state.fresh_token_async()):
                return call
            state.count_retry()
            call = self._call = self._send(flow.token, step.timeout)
            self._token = flow.token

    async def _settled(self) -> Any:
        # The first caller settles the call; concurrent ones share its result.
        final = self._final
        if final is not None:
            return await asyncio.shield(final)
        final = self._final = self._loop.create_future()
        try:
            call = await self._settle()
        except asyncio.CancelledError:
            final.cancel()
            raise
        except BaseException as exc:
            final.set_exception(exc)
            final.exception()  # marks it retrieved: the caller gets it below
            raise
        final.set_result(call)
        return call

    # --- awaiting the response -------------------------------------------------

    def __await__(self) -> Generator[Any, None, Any]:
        if self._final is None and self._starting is None:
            return self._first_response().__await__()
        return self._response().__await__()

    async def _first_response(self) -> Any:
        # The common case, kept short: the first attempt went out with a token
        # at hand and nothing has asked for the outcome yet. Only an
        # UNAUTHENTICATED answer needs the retry flow, which then starts from
        # that finished attempt exactly as :meth:`_settle` would.
        call = self._call
        try:
            return await call
        except grpc.aio.AioRpcError as err:
            if err.code() is not grpc.StatusCode.UNAUTHENTICATED:
                raise
        except asyncio.CancelledError:
            call.cancel()
            raise
        return await self._response()

    async def _response(self) -> Any:
        call = await self._settled()
        return await call

    # --- grpc.aio.Call ------------------------------------------------------------

    async def code(self) -> grpc.StatusCode:
        try:
            call = await self._settled()
        except grpc.aio.AioRpcError as err:  # no token: the call was not sent
            return err.code()
        return await call.code()  # type: ignore[no-any-return]

    async def details(self) -> str:
        try:
            call = await self._settled()
        except grpc.aio.AioRpcError as err:
            return err.details() or ""
        return await call.details()  # type: ignore[no-any-return]

    async def initial_metadata(self) -> grpc.aio.Metadata:
        try:
            call = await self._settled()
        except grpc.aio.AioRpcError as err:
            return err.initial_metadata()
        return await call.initial_metadata()  # type: ignore[no-any-return]

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        try:
            call = await self._settled()
        except grpc.aio.AioRpcError as err:
            return err.trailing_metadata()
        return await call.trailing_metadata()  # type: ignore[no-any-return]

    async def wait_for_connection(self) -> None:
        await (await self._current()).wait_for_connection()

    def cancel(self) -> bool:
        if self._call is not None:
            return bool(self._call.cancel())
        assert self._starting is not None
        return self._starting.cancel()

    def cancelled(self) -> bool:
        if self._call is not None:
            return bool(self._call.cancelled())
        assert self._starting is not None
        return self._starting.cancelled()

    def done(self) -> bool:
        if self._call is not None:
            return bool(self._call.done())
        assert self._starting is not None
        return self._starting.done()

    def time_remaining(self) -> float | None:
        if self._call is not None:
            return self._call.time_remaining()  # type: ignore[no-any-return]
        if self._timeout is None:
            return None
        return max(0.0, self._timeout - (self._loop.time() - self._started))

    def add_done_callback(self, callback: Any) -> None:
        if self._call is not None:
            self._call.add_done_callback(lambda _call: callback(self))
            return
        assert self._starting is not None

        def started(_task: asyncio.Task[None]) -> None:
            if self._call is not None:
                self._call.add_done_callback(lambda _call: callback(self))
            else:
                callback(self)

        self._starting.add_done_callback(started)
