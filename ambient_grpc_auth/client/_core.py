"""Client-side pieces shared by the sync and grpc.aio adapters.

Everything here but :class:`InterceptorState` is pure (no I/O) and
deterministic given its inputs (time and randomness are passed in), so it is
unit-tested without gRPC servers and read by both
:mod:`ambient_grpc_auth.client.interceptor` and :mod:`ambient_grpc_auth.client.aio.interceptor`
(interceptors), their direct unary paths and the session helpers.
:class:`InterceptorState` is the state the interceptors share; it calls the
token source. The retry-after-UNAUTHENTICATED flow is
:mod:`ambient_grpc_auth.client._retry`.

Nothing in this module is thread-safe on its own: the adapters hold the locks.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import grpc

from ambient_grpc_auth._bearer import AUTHORIZATION_KEY, authorization_metadata
from ambient_grpc_auth.client.tokens import RefreshableTokenSource, Token, TokenSource
from ambient_grpc_auth.errors import ConfigurationError, TokenUnavailableError

__all__ = [
    "CALL_DETAIL_FIELDS",
    "DEFAULT_NON_RETRYABLE_CODES",
    "TOKEN_UNAVAILABLE_DETAILS",
    "AuthInterceptorBase",
    "ConnectivityTracker",
    "InterceptorState",
    "MessageVerdict",
    "Transition",
    "WatchDecision",
    "WatchRetryPolicy",
    "WatchState",
    "as_token_error",
    "check_after_seq",
    "check_session_id",
    "check_token_source",
    "full_jitter_delay",
    "interceptor_state",
    "is_replayable",
    "plaintext_channel_options",
    "remaining_timeout",
    "session_stub",
    "status_code_of",
    "token_error_code",
    "token_unavailable_details",
    "with_authorization",
]

# Every field of grpc.ClientCallDetails in the sync API. Rebuilding the details
# with fewer fields silently drops e.g. the deadline or compression.
CALL_DETAIL_FIELDS = (
    "method",
    "timeout",
    "metadata",
    "credentials",
    "wait_for_ready",
    "compression",
)

# Local status details for a call that never left the process because no token
# could be obtained (followed by the cause, see token_unavailable_details). The
# TokenUnavailableError is chained as __cause__.
TOKEN_UNAVAILABLE_DETAILS = "could not obtain an access token"  # noqa: S105 (a message)

_MetadataPair = tuple[str, str | bytes]


def with_authorization(
    metadata: Iterable[_MetadataPair] | None, token: str
) -> tuple[_MetadataPair, ...]:
    """``metadata`` with every ``authorization`` entry replaced by one bearer.

    Order of the other entries is kept. Keys are compared case-insensitively:
    gRPC itself requires lowercase keys, but a stray ``Authorization`` must
    never travel next to ours.
    """
    kept = tuple((key, value) for key, value in metadata or () if key.lower() != AUTHORIZATION_KEY)
    return (*kept, authorization_metadata(token))


def remaining_timeout(timeout: float | None, elapsed: float) -> float | None:
    """The timeout for a retry so the caller's overall deadline is kept.

    ``None`` stays ``None`` (no deadline). Returns 0.0 or less when the
    deadline has already passed (the caller then does not retry).
    """
    if timeout is None:
        return None
    return timeout - max(0.0, elapsed)


def is_replayable(request_iterator: object) -> bool:
    """True when a client-streaming request can be sent again on a retry.

    Only materialised sequences (list, tuple...) can; generators and other
    iterators were (partly) consumed by the first attempt.
    """
    return isinstance(request_iterator, Sequence) and not isinstance(
        request_iterator, str | bytes | bytearray
    )


def as_token_error(exc: BaseException) -> TokenUnavailableError:
    """Map anything a token source raised to a :class:`TokenUnavailableError`.

    Sources must raise TokenUnavailableError only; anything else is a
    contract violation, reported as non-retryable with the exception type
    (never its message, which could hold secret material).
    """
    if isinstance(exc, TokenUnavailableError):
        return exc
    err = TokenUnavailableError(
        f"token source failed unexpectedly ({type(exc).__name__})", retryable=False
    )
    err.__cause__ = exc
    return err


def check_token_source(token_source: object) -> TokenSource:
    """``token_source`` if it is a :class:`TokenSource`; TypeError otherwise.

    A bare string is the likely mistake (a token where its source belongs):
    it would otherwise fail only at the first call. The message never quotes
    the value (it may be a token).
    """
    if isinstance(token_source, TokenSource):
        return token_source
    hint = (
        ": wrap a fixed token in StaticTokenSource(token)"
        if isinstance(token_source, str | bytes)
        else ""
    )
    raise TypeError(
        f"token_source must be a TokenSource (get_token/get_token_async), "
        f"not {type(token_source).__name__}{hint}"
    )


def token_unavailable_details(exc: TokenUnavailableError) -> str:
    """Status details for a call not sent for lack of a token:
    ``could not obtain an access token: <cause>``.

    The cause is the error's message, which by the hierarchy's contract holds
    no token, proof or key material (endpoint, HTTP status, scrubbed body
    excerpt). These details stay in the process: they are never sent to a
    peer. Without the cause, a wrong URL and an unreachable control plane
    would read the same.
    """
    cause = str(exc).strip()
    return f"{TOKEN_UNAVAILABLE_DETAILS}: {cause}" if cause else TOKEN_UNAVAILABLE_DETAILS


def token_error_code(exc: TokenUnavailableError) -> grpc.StatusCode:
    """The status a caller sees when no token could be obtained for its call:
    UNAVAILABLE when trying again later may help, else UNAUTHENTICATED."""
    return grpc.StatusCode.UNAVAILABLE if exc.retryable else grpc.StatusCode.UNAUTHENTICATED


# --- Connectivity -------------------------------------------------------------


class Transition(enum.Enum):
    """What a connectivity state change means for the cached token."""

    NONE = "none"
    CONNECTED = "connected"  # first READY of the channel's life
    DISCONNECTED = "disconnected"  # left READY
    RECONNECTED = "reconnected"  # READY again after having left READY


class ConnectivityTracker:
    """Turns a sequence of channel states into connect/disconnect/reconnect.

    A reconnect is READY observed after READY was left; the first READY is
    not one. Repeated states (READY, READY) are no transition.
    """

    __slots__ = ("_ever_ready", "_ready", "last_state", "reconnects")

    def __init__(self) -> None:
        self._ever_ready = False
        self._ready = False
        self.last_state: grpc.ChannelConnectivity | None = None
        self.reconnects = 0

    def observe(self, state: grpc.ChannelConnectivity) -> Transition:
        self.last_state = state
        if state is grpc.ChannelConnectivity.READY:
            if self._ready:
                return Transition.NONE
            self._ready = True
            if self._ever_ready:
                self.reconnects += 1
                return Transition.RECONNECTED
            self._ever_ready = True
            return Transition.CONNECTED
        if self._ready:
            self._ready = False
            return Transition.DISCONNECTED
        return Transition.NONE


# --- Backoff ------------------------------------------------------------------


def full_jitter_delay(
    failures: int, *, base: float, cap: float, random: Callable[[], float]
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**(n-1))).

    ``failures`` counts consecutive failures (1 for the first). ``random``
    returns a float in [0, 1).
    """
    if failures <= 0:
        return 0.0
    # The exponent is clamped so that huge failure counts cannot overflow.
    ceiling = min(cap, base * math.ldexp(1.0, min(failures - 1, 60)))
    return max(0.0, min(ceiling, ceiling * random()))


# --- Session watch ------------------------------------------------------------

DEFAULT_NON_RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        # The server does not implement the method: retrying cannot help.
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


@dataclass(frozen=True, kw_only=True)
class WatchRetryPolicy:
    """How a session watch retries after its stream ends or fails.

    - ``base_delay`` / ``max_delay``: full-jitter exponential backoff between
      attempts (seconds), reset by every delivered message.
    - ``max_consecutive_failures``: give up after this many failed attempts in
      a row without a delivered message; ``None`` (default) never gives up.
    - ``max_failure_duration``: give up when failures have lasted this long
      (seconds, monotonic) without a delivered message; ``None`` (default)
      never gives up.
    - ``non_retryable_codes``: status codes raised at once.

    The defaults suit a long-lived runner: it outlives API-server restarts and
    rollouts of any length, and waits at most ``max_delay`` between attempts.
    Callers that must not wait forever set one of the limits or close the
    watch.
    """

    base_delay: float = 0.1
    max_delay: float = 5.0
    max_consecutive_failures: int | None = None
    max_failure_duration: float | None = None
    non_retryable_codes: frozenset[grpc.StatusCode] = field(default=DEFAULT_NON_RETRYABLE_CODES)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base_delay) and self.base_delay >= 0):
            raise ConfigurationError("base_delay must be a finite number >= 0")
        if not (math.isfinite(self.max_delay) and self.max_delay >= self.base_delay):
            raise ConfigurationError("max_delay must be finite and >= base_delay")
        if self.max_consecutive_failures is not None and self.max_consecutive_failures < 1:
            raise ConfigurationError("max_consecutive_failures must be >= 1 or None")
        if self.max_failure_duration is not None and not (
            math.isfinite(self.max_failure_duration) and self.max_failure_duration > 0
        ):
            raise ConfigurationError("max_failure_duration must be a finite number > 0 or None")


class MessageVerdict(enum.Enum):
    """What to do with a message received on a watch stream."""

    DELIVER = "deliver"
    DUPLICATE = "duplicate"  # seq <= last delivered: drop it
    GAP = "gap"  # seq skips ahead: resume from the last delivered seq


@dataclass(frozen=True, slots=True)
class WatchDecision:
    """After a stream ended: retry after ``delay`` seconds, or give up."""

    retry: bool
    delay: float = 0.0


class WatchState:
    """The resumable watch's bookkeeping: last delivered seq, failure streak.

    Guarantees built on it: no seq is delivered twice (anything <= last is
    dropped) and none is skipped silently. The server assigns gap-free seqs
    and replays ``seq > after_seq`` in order, so a gap means a broken stream:
    the watch resumes from the last delivered seq once. If the resumed stream
    shows the very same gap, the server no longer has those messages (e.g.
    retention) and the message is delivered, so a gap can never cause a loop.
    """

    def __init__(self, policy: WatchRetryPolicy, after_seq: int) -> None:
        self.policy = policy
        self.last_seq = after_seq
        self.failures = 0
        self._streak_started: float | None = None
        self._unauthenticated_retried = False
        self._gap_resumed_from: int | None = None

    def on_message(self, seq: int) -> MessageVerdict:
        if seq <= self.last_seq:
            return MessageVerdict.DUPLICATE
        if seq != self.last_seq + 1 and self._gap_resumed_from != self.last_seq:
            self._gap_resumed_from = self.last_seq
            return MessageVerdict.GAP
        self.last_seq = seq
        self.failures = 0
        self._streak_started = None
        self._unauthenticated_retried = False
        self._gap_resumed_from = None
        return MessageVerdict.DELIVER

    def on_stream_end(
        self,
        code: grpc.StatusCode | None,
        *,
        now: float,
        random: Callable[[], float],
        token_error: TokenUnavailableError | None = None,
    ) -> WatchDecision:
        """Decide after a stream ended: ``code`` None means the server closed
        it with OK; ``token_error`` is set when no token could be obtained."""
        if code is not None and code in self.policy.non_retryable_codes:
            return WatchDecision(retry=False)
        if token_error is not None and not token_error.retryable:
            return WatchDecision(retry=False)
        self.failures += 1
        if self._streak_started is None:
            self._streak_started = now
        limit = self.policy.max_consecutive_failures
        if limit is not None and self.failures > limit:
            return WatchDecision(retry=False)
        window = self.policy.max_failure_duration
        if window is not None and now - self._streak_started >= window:
            return WatchDecision(retry=False)
        if (
            code is grpc.StatusCode.UNAUTHENTICATED
            and token_error is None
            and not self._unauthenticated_retried
        ):
            # The interceptor already dropped the rejected token: one
            # immediate retry with a fresh one, then the usual backoff.
            self._unauthenticated_retried = True
            return WatchDecision(retry=True, delay=0.0)
        delay = full_jitter_delay(
            self.failures,
            base=self.policy.base_delay,
            cap=self.policy.max_delay,
            random=random,
        )
        return WatchDecision(retry=True, delay=delay)


def session_stub(stub_or_channel: Any, channel_type: type, factory: Callable[[Any], Any]) -> Any:
    """A SessionService stub: built with ``factory`` on a ``channel_type``
    channel, or ``stub_or_channel`` itself when it already is a stub.
    Raises TypeError otherwise."""
    if isinstance(stub_or_channel, channel_type):
        return factory(stub_or_channel)
    if hasattr(stub_or_channel, "WatchSessionMessages") and hasattr(
        stub_or_channel, "PushSessionMessage"
    ):
        return stub_or_channel
    raise TypeError(f"expected a {channel_type.__module__}.{channel_type.__name__} or a stub")


def check_session_id(session_id: object) -> str:
    """``session_id`` if it is a non-empty string; ValueError otherwise."""
    if not isinstance(session_id, str) or not session_id:
        raise ValueError("session_id must be a non-empty string")
    return session_id


def check_after_seq(after_seq: object) -> int:
    """``after_seq`` if it is a non-negative int; ValueError otherwise."""
    if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0:
        raise ValueError("after_seq must be a non-negative int")
    return after_seq


_PROXY_OPTION = "grpc.enable_http_proxy"


def plaintext_channel_options(
    options: Sequence[tuple[str, Any]],
) -> list[tuple[str, Any]]:
    """Channel options for a plaintext channel: gRPC's HTTP-proxy support off.

    gRPC honours ``http_proxy``/``grpc_proxy`` from the environment by
    default; a plaintext channel would then send every bearer token through
    that proxy in clear. TLS channels only tunnel through a proxy, so they
    keep the default. An explicit ``grpc.enable_http_proxy`` from the caller
    wins.
    """
    if any(key == _PROXY_OPTION for key, _ in options):
        return list(options)
    return [(_PROXY_OPTION, 0), *options]


def status_code_of(outcome: object) -> grpc.StatusCode | None:
    """The status of a finished sync call, outcome or ``grpc.RpcError``
    (grpc.aio errors too); None when it has no readable status. Never raises.

    Only for outcomes that are finished: a running call's ``code()`` blocks.
    """
    code = getattr(outcome, "code", None)
    if not callable(code):
        return None
    try:
        value = code()
    except Exception:  # an outcome without a readable status is not ours to judge
        return None
    return value if isinstance(value, grpc.StatusCode) else None


# --- Interceptor state ------------------------------------------------------------

_log = logging.getLogger("ambient_grpc_auth.client.interceptor")


class InterceptorState:
    """What the sync and aio client interceptors and their direct unary paths
    share: the token source, the reconnect decision, invalidation, the bearer
    metadata and the counters. The one part of this module that calls out:
    into the token source (which may fetch, see its own contract).

    ``lock`` guards the connectivity state and counters: a real lock in sync
    gRPC (callbacks arrive on gRPC's threads), a no-op in grpc.aio (one loop).
    """

    def __init__(
        self,
        token_source: TokenSource,
        *,
        retry_unauthenticated: bool,
        lock: AbstractContextManager[Any],
    ) -> None:
        self._source = check_token_source(token_source)
        self._invalidate: Callable[[Token], None] | None = (
            token_source.invalidate if isinstance(token_source, RefreshableTokenSource) else None
        )
        self.retry_enabled = retry_unauthenticated
        self._lock = lock
        self._tracker = ConnectivityTracker()
        self._last_token: Token | None = None
        self._token_at_disconnect: Token | None = None
        self._retries = 0
        # (token, metadata) of the last call without caller metadata.
        self._plain_metadata: tuple[Token, tuple[_MetadataPair, ...]] | None = None
        peek = getattr(token_source, "peek", None)
        self._peek: Callable[[], Token | None] | None = peek if callable(peek) else None

    def __repr__(self) -> str:
        return f"InterceptorState(source={type(self._source).__name__})"

    @property
    def token_source(self) -> TokenSource:
        return self._source

    @property
    def reconnects(self) -> int:
        return self._tracker.reconnects

    @property
    def last_state(self) -> grpc.ChannelConnectivity | None:
        return self._tracker.last_state

    @property
    def unauthenticated_retries(self) -> int:
        return self._retries

    def on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        """See :meth:`AuthInterceptorBase.on_connectivity`."""
        with self._lock:
            transition = self._tracker.observe(state)
            if transition is Transition.DISCONNECTED:
                self._token_at_disconnect = self._last_token
                return
            if transition is not Transition.RECONNECTED:
                return
            stale, self._token_at_disconnect = self._token_at_disconnect, None
        _log.info("gRPC channel reconnected; the next call uses a freshly fetched token")
        if stale is not None:
            self.token_rejected(stale)

    # --- tokens -------------------------------------------------------------------

    def get_token(self) -> Token:
        """The token for a call (blocking). Raises TokenUnavailableError only
        (anything else the source raised is mapped by :func:`as_token_error`)."""
        try:
            token = self._source.get_token()
        except TokenUnavailableError:
            raise
        except Exception as exc:
            raise as_token_error(exc) from exc
        self._last_token = token
        return token

    async def get_token_async(self) -> Token:
        """:meth:`get_token` for grpc.aio: the event loop is never blocked."""
        try:
            token = await self._source.get_token_async()
        except TokenUnavailableError:
            raise
        except Exception as exc:
            raise as_token_error(exc) from exc
        self._last_token = token
        return token

    def fresh_token(self) -> Token | None:
        """The token for a retry, or None when none can be obtained."""
        try:
            return self.get_token()
        except TokenUnavailableError:
            return None

    async def fresh_token_async(self) -> Token | None:
        """:meth:`fresh_token` for grpc.aio."""
        try:
            return await self.get_token_async()
        except TokenUnavailableError:
            return None

    def peek_token(self) -> Token | None:
        """The source's token when it is usable at once (a caching source's
        hit), without waiting; ``None`` when a fetch would be needed or the
        source cannot tell."""
        if self._peek is None:
            return None
        try:
            token = self._peek()
        except Exception:  # the regular path will report the source's trouble
            return None
        if token is not None:
            self._last_token = token
        return token

    def bearer_metadata(self, token: Token, metadata: Any) -> tuple[_MetadataPair, ...]:
        """The metadata of a call: ``metadata`` with ``token`` as its only
        bearer. Without caller metadata the tuple is built once per token."""
        if metadata:
            return with_authorization(metadata, token.value)
        cached = self._plain_metadata
        if cached is not None and cached[0] is token:
            return cached[1]
        built: tuple[_MetadataPair, ...] = (authorization_metadata(token.value),)
        self._plain_metadata = (token, built)
        return built

    def count_retry(self) -> None:
        with self._lock:
            self._retries += 1

    def token_rejected(self, token: Token) -> None:
        """Drop ``token`` from a refreshable source. Never raises: this runs
        on the caller's error path and in gRPC callbacks."""
        if self._invalidate is None:
            return
        try:
            self._invalidate(token)
        except Exception as exc:  # must not break the caller's error path
            _log.warning("token source failed to invalidate a token (%s)", type(exc).__name__)


class AuthInterceptorBase:
    """The face both ``AuthInterceptor`` classes (sync and grpc.aio) show their
    callers, backed by one :class:`InterceptorState` (see
    :func:`interceptor_state`)."""

    def __init__(
        self,
        token_source: TokenSource,
        *,
        retry_unauthenticated: bool,
        lock: AbstractContextManager[Any],
    ) -> None:
        self._state = InterceptorState(
            token_source, retry_unauthenticated=retry_unauthenticated, lock=lock
        )

    def __repr__(self) -> str:
        return f"AuthInterceptor(source={type(self._state.token_source).__name__})"

    @property
    def token_source(self) -> TokenSource:
        return self._state.token_source

    @property
    def reconnects(self) -> int:
        """How many times the subscribed channel came back to READY after
        having left it (the first connect is not counted)."""
        return self._state.reconnects

    @property
    def last_state(self) -> grpc.ChannelConnectivity | None:
        """The channel state last reported to :meth:`on_connectivity`."""
        return self._state.last_state

    @property
    def unauthenticated_retries(self) -> int:
        """How many unary calls were retried after UNAUTHENTICATED."""
        return self._state.unauthenticated_retries

    def on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        """Channel connectivity callback: ``channel.subscribe(interceptor.on_connectivity)``.

        On a reconnect (READY again after READY was left) the token that was
        in use when the connection dropped is invalidated, so the first call
        made after the reconnect fetches a fresh one. Calls in flight are not
        touched; calls that race the reconnect may still carry the previous
        token (the server answers UNAUTHENTICATED if it was revoked, and the
        retry then uses a fresh one). Sync gRPC reports states by polling, so
        a drop and reconnect that both happen between two polls can go
        unnoticed; the UNAUTHENTICATED retry covers that case too.
        """
        self._state.on_connectivity(state)


def interceptor_state(interceptor: AuthInterceptorBase) -> InterceptorState:
    """The state behind ``interceptor``, for the package's direct unary paths
    (they serve calls in the interceptor's name without going through it)."""
    return interceptor._state
