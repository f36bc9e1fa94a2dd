"""Runner-side gRPC authentication (sync ``grpc``): interceptor and call credentials.

:class:`AuthInterceptor` adds ``authorization: Bearer <token>`` to every call
of every RPC shape, keeping all other call details (method, timeout, metadata,
credentials, wait_for_ready, compression). It also

- retries a unary call (unary-unary, and stream-unary when the requests are a
  list or tuple) ONCE with a freshly fetched token when the server answers
  UNAUTHENTICATED, within the caller's original deadline;
- drops the rejected token from a refreshable source whenever any call ends
  UNAUTHENTICATED, including streams (which are not retried: they may already
  have delivered messages; :mod:`ambient_grpc_auth.client.sessions` resumes them);
- drops the token in use when its channel reconnects (see
  :meth:`AuthInterceptor.on_connectivity`), so the next call after a
  reconnect carries a freshly fetched token.

When no token can be obtained the call is not sent: the caller gets a
``grpc.RpcError`` with code UNAVAILABLE (retryable failure) or UNAUTHENTICATED
(non-retryable), fixed details, and the
:class:`~ambient_grpc_auth.errors.TokenUnavailableError` as ``__cause__`` and
as ``token_error``.

``stub.Method.future(request)`` works and carries the bearer; a future that
ends UNAUTHENTICATED drops its token but is not retried (retrying would need a
thread per failed call); the caller's next call uses a fresh token.

:func:`bearer_call_credentials` is the alternative for TLS channels; see its
caveats. Channels are built by :mod:`ambient_grpc_auth.client.channel`.
"""

from __future__ import annotations

import logging
import threading
import time
import types
from collections import namedtuple
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from ambient_grpc_auth._bearer import authorization_metadata
from ambient_grpc_auth.client._core import (
    TOKEN_UNAVAILABLE_DETAILS,
    InterceptorState,
    as_token_error,
    is_replayable,
    remaining_timeout,
    token_error_code,
)
from ambient_grpc_auth.client.tokens import Token, TokenSource
from ambient_grpc_auth.errors import TokenUnavailableError

__all__ = [
    "AuthInterceptor",
    "TokenUnavailableRpcError",
    "bearer_call_credentials",
]

_log = logging.getLogger(__name__)

_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

# grpc.Future is generic only in the type stubs.
if TYPE_CHECKING:
    _Future = grpc.Future[Any]
else:
    _Future = grpc.Future


class _CallDetails(
    # A plain namedtuple: typing.NamedTuple cannot also subclass the grpc ABC.
    namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """Immutable ClientCallDetails holding every field of the sync API.
    Its repr shows metadata keys only: the values include the bearer."""

    __slots__ = ()

    def __repr__(self) -> str:
        keys = [key for key, _ in self.metadata or ()]
        return (
            f"_CallDetails(method={self.method!r}, timeout={self.timeout!r}, "
            f"metadata_keys={keys!r}, wait_for_ready={self.wait_for_ready!r}, "
            f"compression={self.compression!r})"
        )


def _rebuild(
    details: grpc.ClientCallDetails, metadata: Any, timeout: float | None
) -> grpc.ClientCallDetails:
    # getattr: details built by other interceptors may lack newer fields.
    return _CallDetails(
        details.method,
        timeout,
        metadata,
        getattr(details, "credentials", None),
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )


class TokenUnavailableRpcError(grpc.RpcError, grpc.Call, _Future):
    """The outcome of a call that was not sent because no token was obtained.

    Behaves like a finished, failed call of any shape: ``code()`` is
    UNAVAILABLE when ``token_error.retryable`` else UNAUTHENTICATED;
    ``details()`` is fixed; ``result()`` and iteration raise it.
    """

    def __init__(self, token_error: TokenUnavailableError) -> None:
        super().__init__(TOKEN_UNAVAILABLE_DETAILS)
        self.token_error = token_error
        self.__cause__ = token_error
        self._code = token_error_code(token_error)

    def __repr__(self) -> str:
        return (
            f"TokenUnavailableRpcError(code={self._code.name}, "
            f"retryable={self.token_error.retryable})"
        )

    # grpc.Call
    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return TOKEN_UNAVAILABLE_DETAILS

    def initial_metadata(self) -> Any:
        return ()

    def trailing_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    # grpc.Future
    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> Exception | None:
        return self

    def traceback(self, timeout: float | None = None) -> types.TracebackType | None:
        return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    # Response iterator (unary-stream / stream-stream)
    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        raise self


class _AuthStreamCall(grpc.Call, _Future):
    """A response-streaming call that reports UNAUTHENTICATED to the interceptor
    before the caller sees the error, so a caller that retries at once already
    gets a fresh token. Everything else is delegated to the wrapped call."""

    __slots__ = ("_call", "_interceptor", "_reported", "_token")

    def __init__(self, call: Any, interceptor: AuthInterceptor, token: Token) -> None:
        self._call = call
        self._interceptor = interceptor
        self._token = token
        self._reported = False
        add = getattr(call, "add_done_callback", None)
        if add is not None:
            add(self._on_done)

    def __repr__(self) -> str:
        return f"_AuthStreamCall({self._call!r})"

    def _report(self, code: grpc.StatusCode | None) -> None:
        if code is _UNAUTHENTICATED and not self._reported:
            self._reported = True
            self._interceptor._token_rejected(self._token)

    def _on_done(self, call: Any) -> None:
        try:
            self._report(call.code())
        except Exception:  # a callback must never raise into gRPC
            _log.debug("could not read the status of a finished stream", exc_info=True)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            self._report(code)
            raise

    # grpc.Call
    def code(self) -> grpc.StatusCode:
        return self._call.code()  # type: ignore[no-any-return]

    def details(self) -> str:
        return self._call.details()  # type: ignore[no-any-return]

    def initial_metadata(self) -> Any:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    def is_active(self) -> bool:
        return self._call.is_active()  # type: ignore[no-any-return]

    def time_remaining(self) -> Any:
        return self._call.time_remaining()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return self._call.add_callback(callback)  # type: ignore[no-any-return]

    # grpc.Future
    def cancel(self) -> bool:
        return self._call.cancel()  # type: ignore[no-any-return]

    def cancelled(self) -> bool:
        return self._call.cancelled()  # type: ignore[no-any-return]

    def running(self) -> bool:
        return self._call.running()  # type: ignore[no-any-return]

    def done(self) -> bool:
        return self._call.done()  # type: ignore[no-any-return]

    def result(self, timeout: float | None = None) -> Any:
        return self._call.result(timeout)

    def exception(self, timeout: float | None = None) -> Any:
        return self._call.exception(timeout)

    def traceback(self, timeout: float | None = None) -> Any:
        return self._call.traceback(timeout)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._call.add_done_callback(lambda _call: fn(self))


def _finished(outcome: Any) -> bool:
    # The blocking paths (stub.Method(req), .with_call) hand the interceptor a
    # finished outcome; .future() hands it a running future. Duck-typed: ABC
    # isinstance checks would cost more than the rest of the interceptor.
    done = getattr(outcome, "done", None)
    return done is not None and bool(done())


def _code_of(outcome: Any) -> grpc.StatusCode | None:
    code = getattr(outcome, "code", None)
    if code is None:
        return None
    try:
        value = code()
    except Exception:  # an outcome without a readable status is not ours to judge
        return None
    return value if isinstance(value, grpc.StatusCode) else None


class AuthInterceptor(
    InterceptorState,
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to calls of all four RPC shapes (sync ``grpc``).

    ``token_source`` should be a caching source (e.g. the one
    :func:`~ambient_grpc_auth.client.tokens.token_source_from_env` returns): the
    interceptor calls ``get_token()`` on every call and, if the source has
    ``invalidate(token)``, reports tokens the server rejected and tokens in
    use when the channel reconnected. With ``retry_unauthenticated=False``
    unary calls are not retried (rejected tokens are still reported).

    Thread-safe: one instance serves any number of concurrent calls. The
    per-call cost is one ``get_token()`` (a cache hit is microseconds) and a
    metadata tuple; no thread is started.
    """

    def __init__(self, token_source: TokenSource, *, retry_unauthenticated: bool = True) -> None:
        super().__init__(
            token_source, retry_unauthenticated=retry_unauthenticated, lock=threading.Lock()
        )

    # --- token plumbing ------------------------------------------------------

    def _get_token(self) -> Token:
        try:
            token = self._source.get_token()
        except TokenUnavailableError:
            raise
        except Exception as exc:
            raise as_token_error(exc) from exc
        self._last_token = token
        return token

    def _retry_after(
        self, rejected: Token, timeout: float | None, elapsed: float
    ) -> tuple[Token, float | None] | None:
        """After ``rejected`` got UNAUTHENTICATED on a replayable call: the
        fresh token and the timeout left for the one retry, or ``None`` when
        not retrying (retries off, deadline spent, no token, or the source
        gave the same token again, as a static source does)."""
        if not self._retry:
            return None
        remaining = remaining_timeout(timeout, elapsed)
        if remaining is not None and remaining <= 0:
            return None
        try:
            fresh = self._get_token()
        except TokenUnavailableError:
            return None  # the server's answer is more useful than ours
        if fresh.value == rejected.value:
            return None
        self._count_retry()
        return fresh, remaining

    def _after_future(self, token: Token, future: Any) -> None:
        try:
            code = future.code()
        except Exception:  # a callback must never raise into gRPC
            return
        if code is _UNAUTHENTICATED:
            self._token_rejected(token)

    # --- the four shapes -----------------------------------------------------

    def _unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        details: grpc.ClientCallDetails,
        request: Callable[[], Any],
        *,
        replayable: bool,
    ) -> Any:
        """``request()`` gives the request (or a fresh request iterator) for
        each attempt."""
        started = time.monotonic()
        try:
            token = self._get_token()
        except TokenUnavailableError as exc:
            _log.debug("no token for %s: %s", details.method, exc)
            return TokenUnavailableRpcError(exc)
        outcome = continuation(
            _rebuild(details, self._bearer_metadata(token, details.metadata), details.timeout),
            request(),
        )
        if not _finished(outcome):
            add_done_callback = getattr(outcome, "add_done_callback", None)
            if add_done_callback is not None:
                add_done_callback(lambda fut: self._after_future(token, fut))
            return outcome
        if _code_of(outcome) is not _UNAUTHENTICATED:
            return outcome
        self._token_rejected(token)
        if not replayable:
            return outcome
        retry = self._retry_after(token, details.timeout, time.monotonic() - started)
        if retry is None:
            return outcome
        fresh, timeout = retry
        second = continuation(
            _rebuild(details, self._bearer_metadata(fresh, details.metadata), timeout), request()
        )
        if _finished(second) and _code_of(second) is _UNAUTHENTICATED:
            self._token_rejected(fresh)
        return second

    def _streaming(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        try:
            token = self._get_token()
        except TokenUnavailableError as exc:
            _log.debug("no token for %s: %s", details.method, exc)
            return TokenUnavailableRpcError(exc)
        call = continuation(
            _rebuild(details, self._bearer_metadata(token, details.metadata), details.timeout),
            request,
        )
        return _AuthStreamCall(call, self, token)

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        return self._unary(continuation, client_call_details, lambda: request, replayable=True)

    def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        if is_replayable(request_iterator):
            # A list or tuple: a fresh iterator per attempt (sync gRPC itself
            # needs an iterator), so the retry sends every request again.
            return self._unary(
                continuation,
                client_call_details,
                lambda: iter(request_iterator),
                replayable=True,
            )
        return self._unary(
            continuation, client_call_details, lambda: request_iterator, replayable=False
        )

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        return self._streaming(continuation, client_call_details, request)

    def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        if is_replayable(request_iterator):
            request_iterator = iter(request_iterator)
        return self._streaming(continuation, client_call_details, request_iterator)


# --- call credentials -----------------------------------------------------------


class _CallCredentialsError(Exception):
    """Handed to gRPC when no token could be obtained; its text is all the
    caller sees in the status details."""


class _BearerAuthPlugin(grpc.AuthMetadataPlugin):
    __slots__ = ("_source",)

    def __init__(self, source: TokenSource) -> None:
        self._source = source

    def __repr__(self) -> str:
        return f"_BearerAuthPlugin(source={type(self._source).__name__})"

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        try:
            token = self._source.get_token()
        except Exception as exc:
            _log.warning("call credentials: %s", as_token_error(exc))
            callback((), _CallCredentialsError(TOKEN_UNAVAILABLE_DETAILS))
            return
        callback((authorization_metadata(token.value),), None)


def bearer_call_credentials(token_source: TokenSource) -> grpc.CallCredentials:
    """Call credentials that add ``authorization: Bearer <token>`` to each call.

    An alternative to :class:`AuthInterceptor` for TLS channels, e.g.
    ``grpc.composite_channel_credentials(grpc.ssl_channel_credentials(ca),
    bearer_call_credentials(source))``. Caveats:

    - they need a secure channel: TLS, or ``grpc.local_channel_credentials()``
      on loopback. gRPC cannot combine them with an insecure channel, and
      passed per call on one (``credentials=``) the call fails
      UNAUTHENTICATED without being sent (older gRPC versions silently sent
      it without the token);
    - sync gRPC runs the plugin on a newly started thread for every call
      (measurably more client CPU than the interceptor);
    - the plugin uses ``get_token()`` (also on grpc.aio channels);
    - no UNAUTHENTICATED retry and no reconnect detection.

    When no token can be obtained the call fails with UNAVAILABLE and fixed
    details ("... could not obtain an access token"); the reason is logged,
    the token never.
    """
    return grpc.metadata_call_credentials(_BearerAuthPlugin(token_source), name="ambient-bearer")
