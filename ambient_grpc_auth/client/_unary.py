"""The direct path of blocking unary-unary calls on an
:class:`~ambient_grpc_auth.client.channel.AuthenticatedChannel`.

``grpc.intercept_channel`` costs a few percent of a loopback call even for
an interceptor that does nothing: every call builds call-details objects, an
outcome wrapper and several closures. An :class:`AuthenticatedChannel` with
no interceptors of the caller's own therefore serves ``stub.Method(request)``
and ``stub.Method.with_call(request)`` here: the bearer metadata is added and
the call goes straight to the underlying channel, with the same semantics as
:class:`~ambient_grpc_auth.client.interceptor.AuthInterceptor`, because it drives the
same :class:`~ambient_grpc_auth.client._retry.UnaryRetry` flow over the same
interceptor state (the token is fetched from the interceptor's source; an
UNAUTHENTICATED answer drops the token and, once, retries with a fresh one
within the caller's deadline; no token means a
:class:`~ambient_grpc_auth.client.interceptor.TokenUnavailableRpcError` and nothing is
sent). ``.future()`` goes through the interceptor. Not part of the API.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from ambient_grpc_auth.client._core import interceptor_state, status_code_of
from ambient_grpc_auth.client._retry import UnaryRetry
from ambient_grpc_auth.client.interceptor import AuthInterceptor, TokenUnavailableRpcError
from ambient_grpc_auth.errors import TokenUnavailableError

__all__ = ["DirectUnaryUnary"]


class DirectUnaryUnary(grpc.UnaryUnaryMultiCallable):  # type: ignore[type-arg]
    """A unary-unary multicallable that adds the bearer itself; ``future``
    is served by ``fallback`` (the same method through the interceptor)."""

    __slots__ = ("_auth", "_fallback", "_raw", "_state")

    def __init__(self, raw: Any, fallback: Any, interceptor: AuthInterceptor) -> None:
        self._raw = raw
        self._fallback = fallback
        self._auth = interceptor
        self._state = interceptor_state(interceptor)

    def __repr__(self) -> str:
        return f"DirectUnaryUnary(interceptor={self._auth!r})"

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._invoke(
            self._raw, request, timeout, metadata, credentials, wait_for_ready, compression
        )

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._invoke(
            self._raw.with_call,
            request,
            timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
        )

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._fallback.future(
            request,
            timeout=timeout,
            metadata=metadata,
            credentials=credentials,
            wait_for_ready=wait_for_ready,
            compression=compression,
        )

    def _invoke(
        self,
        send: Any,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any:
        """The mirror of :meth:`ambient_grpc_auth.client.interceptor.AuthInterceptor._unary`,
        with failures raised instead of returned."""
        state = self._state
        started = time.monotonic()
        try:
            token = state.get_token()
        except TokenUnavailableError as exc:
            raise TokenUnavailableRpcError(exc) from exc
        flow = UnaryRetry(
            token, timeout=timeout, retry=state.retry_enabled, clock=time.monotonic, started=started
        )
        call_timeout = timeout
        while True:
            try:
                return send(
                    request,
                    timeout=call_timeout,
                    metadata=state.bearer_metadata(flow.token, metadata),
                    credentials=credentials,
                    wait_for_ready=wait_for_ready,
                    compression=compression,
                )
            except grpc.RpcError as err:
                step = flow.after(status_code_of(err))
                if step.drop is not None:
                    state.token_rejected(step.drop)
                if not step.retry or not flow.use(state.fresh_token()):
                    raise
                state.count_retry()
                call_timeout = step.timeout
