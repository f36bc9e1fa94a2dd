"""Helpers for the reference SessionService tests.

The principal interceptors below are test scaffolding only: they trust a
plain ``x-test-principal: user:<name>`` / ``service:<name>`` header so that
tests can set :func:`current_principal` without the real auth interceptor.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from ambient_grpc_auth.principal import CallerKind, Principal, principal_scope

PRINCIPAL_HEADER = "x-test-principal"


def as_user(name: str) -> tuple[tuple[str, str]]:
    return ((PRINCIPAL_HEADER, f"user:{name}"),)


def as_service(name: str) -> tuple[tuple[str, str]]:
    return ((PRINCIPAL_HEADER, f"service:{name}"),)


def _principal(details: grpc.HandlerCallDetails) -> Principal | None:
    for key, value in details.invocation_metadata or ():
        if key == PRINCIPAL_HEADER and isinstance(value, str):
            kind, _, name = value.partition(":")
            return Principal(name, CallerKind.SERVICE if kind == "service" else CallerKind.USER)
    return None


class PrincipalInterceptor(grpc.ServerInterceptor):
    """Sets the principal around unary-unary handlers (all the servicer needs)."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        principal = _principal(handler_call_details)
        if handler is None or principal is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            with principal_scope(principal):
                return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class AsyncPrincipalInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        principal = _principal(handler_call_details)
        if handler is None or principal is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def behavior(request: Any, context: Any) -> Any:
            with principal_scope(principal):
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def extra_threads(baseline: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in baseline]
