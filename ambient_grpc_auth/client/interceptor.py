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

``stub.Method.future(request)`` works and carries the bearer. A future is
never retried: it reports the server's UNAUTHENTICATED, whether the answer
arrived before the interceptor looked at the future or later (retrying
transparently would need a thread per failed call, since gRPC runs done
callbacks on its own threads and a fresh token may take a fetch). Its token
is still dropped, before the caller sees the outcome (``result()``,
``exception()``, ``code()`` or a done callback), so the caller's next call
carries a fresh token.

The retry decision itself is :class:`~ambient_grpc_auth.client._retry.UnaryRetry`,
shared with the direct path (:mod:`ambient_grpc_auth.client._unary`) and the
grpc.aio mirrors.

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
    AuthInterceptorBase,
    InterceptorState,
    as_token_error,
    is_replayable,
    status_code_of,
    token_error_code,
    token_unavailable_details,
)
from ambient_grpc_auth.client._retry import UnaryRetry
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
    ``details()`` is ``could not obtain an access token: <cause>`` (the
    token error's message, never token material); ``result()`` and iteration
    raise it.
    """

    def __init__(self, token_error: TokenUnavailableError) -> None:
        self._details = token_unavailable_details(token_error)
        super().__init__(self._details)
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
        return self._details

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


class _AuthCall(grpc.Call, _Future):
    """A call that is still running when the interceptor hands it to the
    caller (a response stream, or a ``.future()``): it reports
    UNAUTHENTICATED to the interceptor state before the caller sees it, so a
    caller that calls again at once already gets a fresh token. Everything
    else is delegated to the wrapped call.

    The report is made once, by whichever comes first: gRPC's done callback
    (registered before any of the caller's, so it runs before theirs; at
    once if the call already finished) or the caller reading the outcome
    (``result()``, ``exception()``, ``code()``, iteration).
    """

    __slots__ = ("_call", "_lock", "_state", "_token")

    def __init__(self, call: Any, state: InterceptorState, token: Token) -> None:
        self._call = call
        self._state = state
        self._token: Token | None = token
        self._lock = threading.Lock()
        add = getattr(call, "add_done_callback", None)
        if add is not None:
            add(self._on_done)

    def __repr__(self) -> str:
        return f"_AuthCall({self._call!r})"

    def _report(self, code: grpc.StatusCode | None) -> None:
        if code is not _UNAUTHENTICATED:
            return
        # gRPC's callback thread and the caller's thread may both get here.
        with self._lock:
            token, self._token = self._token, None
        if token is not None:
            self._state.token_rejected(token)

    def _on_done(self, call: Any) -> None:
        # status_code_of never raises: a callback must never raise into gRPC.
        self._report(status_code_of(call))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as err:
            self._report(status_code_of(err))
            raise

    # grpc.Call
    def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = self._call.code()
        self._report(code)
        return code

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
        try:
            return self._call.result(timeout)
        except grpc.RpcError as err:
            self._report(status_code_of(err))
            raise

    def exception(self, timeout: float | None = None) -> Any:
        err = self._call.exception(timeout)
        if err is not None:
            self._report(status_code_of(err))
        return err

    def traceback(self, timeout: float | None = None) -> Any:
        return self._call.traceback(timeout)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._call.add_done_callback(lambda _call: fn(self))


def _is_running_call(outcome: Any) -> bool:
    """True for gRPC's call object itself, which is what a unary continuation
    returns for ``.future()``; False for the settled outcome it returns for a
    blocking call (``stub.Method(req)``, ``.with_call``).

    Whether the call has already finished says nothing here: a future can
    finish before the interceptor looks at it. gRPC's call objects are also
    response iterators, its settled outcomes are not; duck-typed because ABC
    isinstance checks would cost more than the rest of the interceptor.
    """
    return hasattr(outcome, "__next__")


class AuthInterceptor(
    AuthInterceptorBase,
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to calls of all four RPC shapes (sync ``grpc``).

    ``token_source`` should be a caching source (e.g. the one
    :func:`~ambient_grpc_auth.client.env.token_source_from_env` returns): the
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
        each attempt. Drives :class:`~ambient_grpc_auth.client._retry.UnaryRetry`;
        the mirror of :meth:`ambient_grpc_auth.client._unary.DirectUnaryUnary._invoke`."""
        state = self._state
        started = time.monotonic()
        try:
            token = state.get_token()
        except TokenUnavailableError as exc:
            _log.debug("no token for %s: %s", details.method, exc)
            return TokenUnavailableRpcError(exc)
        flow = UnaryRetry(
            token,
            timeout=details.timeout,
            retry=replayable and state.retry_enabled,
            clock=time.monotonic,
            started=started,
        )
        outcome = continuation(
            _rebuild(details, state.bearer_metadata(token, details.metadata), details.timeout),
            request(),
        )
        if _is_running_call(outcome):
            # A .future(): not retried, whether or not it has finished already
            # (module docs); its rejected token is still dropped.
            return _AuthCall(outcome, state, token)
        while True:
            step = flow.after(status_code_of(outcome))
            if step.drop is not None:
                state.token_rejected(step.drop)
            if not step.retry or not flow.use(state.fresh_token()):
                return outcome
            state.count_retry()
            metadata = state.bearer_metadata(flow.token, details.metadata)
            outcome = continuation(_rebuild(details, metadata, step.timeout), request())

    def _streaming(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        state = self._state
        try:
            token = state.get_token()
        except TokenUnavailableError as exc:
            _log.debug("no token for %s: %s", details.method, exc)
            return TokenUnavailableRpcError(exc)
        call = continuation(
            _rebuild(details, state.bearer_metadata(token, details.metadata), details.timeout),
            request,
        )
        return _AuthCall(call, state, token)

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
            error = as_token_error(exc)
            _log.warning("call credentials: %s", error)
            callback((), _CallCredentialsError(token_unavailable_details(error)))
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

    When no token can be obtained the call fails with UNAVAILABLE and details
    "... could not obtain an access token: <cause>"; the token never appears.
    """
    return grpc.metadata_call_credentials(_BearerAuthPlugin(token_source), name="ambient-bearer")
