"""The direct path of blocking unary-unary calls on an
:class:`~ambient_grpc_auth.client.channel.AuthenticatedChannel`.

``grpc.intercept_channel`` costs a few percent of a loopback call even for
an interceptor that does nothing: every call builds call-details objects, an
outcome wrapper and several closures. An :class:`AuthenticatedChannel` with
no interceptors of the caller's own therefore serves ``stub.Method(request)``
and ``stub.Method.with_call(request)`` here: the bearer metadata is added and
the call goes straight to the underlying channel, with the same semantics as
:class:`~ambient_grpc_auth.client.interceptor.AuthInterceptor` (the token is fetched from
the interceptor's source; an UNAUTHENTICATED answer drops the token and, once,
retries with a fresh one within the caller's deadline; no token means a
:class:`~ambient_grpc_auth.client.interceptor.TokenUnavailableRpcError` and nothing is
sent). ``.future()`` goes through the interceptor. Not part of the API.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from ambient_grpc_auth.client.interceptor import AuthInterceptor, TokenUnavailableRpcError, _code_of
from ambient_grpc_auth.errors import TokenUnavailableError

__all__ = ["DirectUnaryUnary"]

_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


class DirectUnaryUnary(grpc.UnaryUnaryMultiCallable):  # type: ignore[type-arg]
    """A unary-unary multicallable that adds the bearer itself; ``future``
    is served by ``fallback`` (the same method through the interceptor)."""

    __slots__ = ("_auth", "_fallback", "_raw")

    def __init__(self, raw: Any, fallback: Any, interceptor: AuthInterceptor) -> None:
        self._raw = raw
        self._fallback = fallback
        self._auth = interceptor

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
        auth = self._auth
        started = time.monotonic()
        try:
            token = auth._get_token()
        except TokenUnavailableError as exc:
            raise TokenUnavailableRpcError(exc) from exc
        try:
            return send(
                request,
                timeout=timeout,
                metadata=auth._bearer_metadata(token, metadata),
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )
        except grpc.RpcError as rejected:
            if _code_of(rejected) is not _UNAUTHENTICATED:
                raise
            auth._token_rejected(token)
            retry = auth._retry_after(token, timeout, time.monotonic() - started)
            if retry is None:
                raise
            fresh, remaining = retry
        try:
            return send(
                request,
                timeout=remaining,
                metadata=auth._bearer_metadata(fresh, metadata),
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )
        except grpc.RpcError as again:
            if _code_of(again) is _UNAUTHENTICATED:
                auth._token_rejected(fresh)
            raise
