"""Shared pieces of the benchmark: tokens, servicers, the peers it compares against.

Used by :mod:`bench.benchmark` (the client side, in the bench process)
and :mod:`bench.child` (the servers, in child processes).
Nothing here is part of the library's API.

The peers are written the way a competent engineer would write them without
this library:

- :class:`NaiveJwtInterceptor`: a sync server interceptor that verifies the
  bearer with ``jwt.decode`` (key, algorithms, audience, issuer, required
  claims) on every call, then applies the same ownership rule as ours;
- :class:`PeerBearerPlugin`: a ``grpc.AuthMetadataPlugin`` adding the bearer
  through call credentials (the google-auth approach).

The floor: :class:`NoopClientInterceptor` / :class:`NoopServerInterceptor`
(and their grpc.aio twins) do nothing but pass the call on, so that the cost
gRPC itself charges for having interceptors at all is measured in the same
run as ours.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import jwt
from cryptography.hazmat.primitives import serialization

from ambient_grpc_auth.client.tokens import Token
from ambient_grpc_auth.controlplane.issuers import JwtIssuer
from ambient_grpc_auth.controlplane.signing import (
    DEFAULT_SIGNING_ALGORITHM,
    SigningKey,
    SigningKeySet,
    SigningPrivateKey,
    generate_signing_key,
    signing_algorithm_of,
)
from ambient_grpc_auth.jwk import PublicKey, VerificationKey
from ambient_grpc_auth.principal import current_principal
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc
from ambient_grpc_auth.server.authn import JwtAuthenticator, TrustedIssuer
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.jwks import StaticKeySet
from ambient_grpc_auth.server.policy import MethodRule, OwnershipPolicy
from ambient_grpc_auth.testing import Clock

__all__ = [
    "AUDIENCE",
    "ECHO",
    "ISSUER",
    "KID",
    "MAX_STREAM_COUNT",
    "OWNER",
    "SESSION_ID",
    "AioNoopClientInterceptor",
    "AioNoopServerInterceptor",
    "AsyncEchoServicer",
    "BenchIdentity",
    "CountingTokenSource",
    "EchoServicer",
    "NaiveJwtInterceptor",
    "NoopClientInterceptor",
    "NoopServerInterceptor",
    "PeerBearerPlugin",
    "mint_runner_token",
    "mint_user_token",
    "new_identity",
    "ours_config",
]

ISSUER = "https://idp.bench.example"
AUDIENCE = "ambient-api-server"
KID = "bench-signing-1"
OWNER = "alice"
SESSION_ID = "session-bench-0001"
ECHO = "/ambient.testing.v1.EchoService/"
#: The servicers refuse larger StreamEcho counts (the full bench sends 5,000 per stream).
MAX_STREAM_COUNT = 200_000
_TOKEN_TTL = 3600


@dataclass(frozen=True)
class BenchIdentity:
    """The signing key (held by the bench process only) and its public PEM
    (sent to the server processes)."""

    private_key: SigningPrivateKey
    public_pem: str

    @property
    def algorithm(self) -> str:
        return signing_algorithm_of(self.private_key)

    def __repr__(self) -> str:
        return f"BenchIdentity(<{self.algorithm}>)"


def new_identity(algorithm: str = DEFAULT_SIGNING_ALGORITHM) -> BenchIdentity:
    """A fresh signing key for ``algorithm`` (ES256 by default, as the
    control plane signs; RS256 as identity providers usually do)."""
    key = generate_signing_key(algorithm)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return BenchIdentity(private_key=key, public_pem=pem.decode("ascii"))


def mint_runner_token(identity: BenchIdentity, *, now: float, subject: str = OWNER) -> str:
    """A runner token exactly as the control plane's :class:`JwtIssuer`
    issues it (its claims, header and algorithm), for ``subject``: the bearer
    a runner sends on every call."""
    issuer = JwtIssuer(
        signing_keys=SigningKeySet(SigningKey(identity.private_key, KID)),
        issuer=ISSUER,
        audience=AUDIENCE,
        ttl=_TOKEN_TTL,
        subject=subject,
        clock=_FixedClock(now),
    )
    return issuer.issue_now(SESSION_ID).token


class _FixedClock:
    def __init__(self, now: float) -> None:
        self._now = now

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return time.monotonic()


def mint_user_token(
    identity: BenchIdentity, *, now: float, subject: str = OWNER, jti: str | None = None
) -> str:
    """A user token shaped like an OIDC identity provider's (~850 chars with RS256)."""
    claims = {
        "iss": ISSUER,
        "aud": [AUDIENCE],
        "sub": subject,
        "azp": "ambient-console",
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + _TOKEN_TTL,
        "jti": jti or uuid.uuid4().hex,
        "sid": str(uuid.uuid4()),
        "preferred_username": subject,
        "email": f"{subject}@example.com",
        "email_verified": True,
        "name": subject.title(),
        "groups": ["ambient-users", "team-platform"],
    }
    return jwt.encode(
        claims, identity.private_key, algorithm=identity.algorithm, headers={"kid": KID}
    )


def _public_key(public_pem: str) -> PublicKey:
    key = serialization.load_pem_public_key(public_pem.encode("ascii"))
    signing_algorithm_of(key)  # type: ignore[arg-type]  # raises for other key types
    return key  # type: ignore[return-value]


def ours_config(
    public_pem: str, owners: Mapping[str, str], *, inline_lookup: bool
) -> ServerAuthConfig:
    """Our server configuration: verification (the key's one algorithm) with the shipped
    verified-token cache, and an ownership rule on every EchoService method
    that carries a session id (users must own the session; the lookup is an
    in-memory map, hence ``inline_lookup`` for grpc.aio)."""
    key = _public_key(public_pem)
    issuer = TrustedIssuer(
        issuer=ISSUER,
        audiences=(AUDIENCE,),
        keys=StaticKeySet(keys=[VerificationKey(kid=KID, key=key)]),
        algorithms=(signing_algorithm_of(key),),
    )
    rule = MethodRule.session("session_id")
    rules = {ECHO + name: rule for name in ("Echo", "StreamEcho", "CollectEcho", "ChatEcho")}
    return ServerAuthConfig(
        authenticator=JwtAuthenticator(issuers=[issuer]),
        ownership=OwnershipPolicy().with_rules(rules),
        owner_lookup=dict(owners).get,
        default_owner_issuer=ISSUER,
        owner_lookup_inline=inline_lookup,
    )


# --- servicers --------------------------------------------------------------


def _caller() -> str:
    principal = current_principal()
    return "" if principal is None else principal.username


class EchoServicer(echo_pb2_grpc.EchoServiceServicer):
    """Sync EchoService: the same minimal handlers behind every variant."""

    def Echo(self, request: echo_pb2.EchoRequest, context: grpc.ServicerContext) -> Any:
        return echo_pb2.EchoResponse(text=request.text, caller=_caller())

    def StreamEcho(
        self, request: echo_pb2.EchoRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        if not 0 <= request.count <= MAX_STREAM_COUNT:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "count out of range")
        text = request.text
        for index in range(request.count):
            yield echo_pb2.EchoResponse(text=text, index=index)


class AsyncEchoServicer(echo_pb2_grpc.EchoServiceServicer):
    """grpc.aio EchoService with coroutine handlers."""

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        return echo_pb2.EchoResponse(text=request.text, caller=_caller())

    async def StreamEcho(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        if not 0 <= request.count <= MAX_STREAM_COUNT:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "count out of range")
        text = request.text
        for index in range(request.count):
            yield echo_pb2.EchoResponse(text=text, index=index)


# --- the naive server peer ----------------------------------------------------


def _aborting(code: grpc.StatusCode, details: str, streaming: bool) -> Any:
    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, details)

    if streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class NaiveJwtInterceptor(grpc.ServerInterceptor):
    """Verifies every call's bearer with PyJWT (no cache), then checks that a
    user owns the request's session. Handles the unary-request shapes only
    (all the bench sends). Thread-safe."""

    def __init__(self, *, public_pem: str, owners: Mapping[str, str]) -> None:
        self._key = _public_key(public_pem)
        self._algorithms = [signing_algorithm_of(self._key)]
        self._owners = dict(owners)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        streaming = handler.response_streaming
        metadata = dict(handler_call_details.invocation_metadata or ())
        auth = metadata.get("authorization", "")
        if not isinstance(auth, str) or not auth.lower().startswith("bearer "):
            return _aborting(grpc.StatusCode.UNAUTHENTICATED, "authentication required", streaming)
        try:
            claims = jwt.decode(
                auth[7:],
                self._key,
                algorithms=self._algorithms,
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.InvalidTokenError:
            return _aborting(grpc.StatusCode.UNAUTHENTICATED, "invalid credentials", streaming)
        subject = claims["sub"]
        owners = self._owners

        def allowed(request: Any) -> bool:
            return bool(owners.get(request.session_id) == subject)

        if streaming:
            inner_stream = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Any:
                if not allowed(request):
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, "permission denied")
                return inner_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        inner = handler.unary_unary

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            if not allowed(request):
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "permission denied")
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )


# --- the floor: interceptors that do nothing -----------------------------------


class NoopServerInterceptor(grpc.ServerInterceptor):
    """Passes every call on untouched: what gRPC charges for a server interceptor."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        return continuation(handler_call_details)


class AioNoopServerInterceptor(grpc.aio.ServerInterceptor):
    """The grpc.aio twin of :class:`NoopServerInterceptor`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        return await continuation(handler_call_details)


class NoopClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Passes every call on untouched: what gRPC charges for a client interceptor."""

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(client_call_details, request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(client_call_details, request)


class AioNoopClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """The grpc.aio twin of :class:`NoopClientInterceptor` (unary calls)."""

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(client_call_details, request)


# --- the call-credentials client peer -------------------------------------------


class PeerBearerPlugin(grpc.AuthMetadataPlugin):
    """Adds ``authorization: Bearer <token>`` from ``source`` to each call,
    as google-auth's ``AuthMetadataPlugin`` does. gRPC runs it per call (in
    sync gRPC on a new thread)."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        try:
            token = self._source.get_token()
        except Exception as exc:
            callback((), exc)
            return
        callback((("authorization", "Bearer " + token.value),), None)


# --- a counting token source for the stampede ---------------------------------


class CountingTokenSource:
    """Returns ``value`` after a simulated control-plane round trip of
    ``delay`` seconds, counting fetches. Its tokens expire ``ttl`` seconds
    after ``clock.time()``. Thread-safe."""

    def __init__(self, value: str, *, clock: Clock, delay: float, ttl: float = 900.0) -> None:
        self._value = value
        self._clock = clock
        self._delay = delay
        self._ttl = ttl
        self._lock = threading.Lock()
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def _next(self) -> Token:
        with self._lock:
            self._count += 1
        return Token(self._value, self._clock.time() + self._ttl)

    def get_token(self) -> Token:
        time.sleep(self._delay)
        return self._next()

    async def get_token_async(self) -> Token:
        await asyncio.sleep(self._delay)
        return self._next()

    def __repr__(self) -> str:
        return f"CountingTokenSource(count={self._count})"
