"""The retry-after-UNAUTHENTICATED decision of one unary call (pure, no I/O).

Written once and driven by four adapters that hold only the I/O: the sync
interceptor (:mod:`ambient_grpc_auth.client.interceptor`), the sync direct path
(:mod:`ambient_grpc_auth.client._unary`), and their grpc.aio mirrors. Each drives
:class:`UnaryRetry` the same way::

    flow = UnaryRetry(token, timeout=timeout, retry=enabled, clock=clock)
    outcome = send(flow.token, timeout)
    while True:
        step = flow.after(<status code of outcome>)
        if step.drop is not None:
            <invalidate step.drop at the token source>
        if not step.retry or not flow.use(<a fresh token, or None>):
            return outcome
        outcome = send(flow.token, step.timeout)

The contract this encodes: every attempt answered UNAUTHENTICATED drops the
token it carried; a call is retried at most once, only with a token other
than the rejected one (a static source gives the same token again: no
retry), and only within what is left of the caller's timeout. A retry whose
token cannot be obtained is not made (the server's answer is more useful to
the caller than ours).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc

from ambient_grpc_auth.client._core import remaining_timeout
from ambient_grpc_auth.client.tokens import Token

__all__ = [
    "RetryStep",
    "UnaryRetry",
]

_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True, slots=True)
class RetryStep:
    """What a unary call does after one attempt.

    ``drop``: the token the server rejected (invalidate it), or None.
    ``retry``: fetch a fresh token, hand it to :meth:`UnaryRetry.use` and, if
    accepted, send once more with ``timeout`` (what is left of the caller's;
    None for no deadline).
    """

    drop: Token | None = None
    retry: bool = False
    timeout: float | None = None


_FINAL = RetryStep()


class UnaryRetry:
    """One logical unary call: its first attempt and at most one retry.

    ``token`` is the token the current attempt carries. ``timeout`` is the
    caller's (None: no deadline), measured from ``started`` (default: now) on
    ``clock``, a monotonic clock in seconds. ``retry`` False never retries
    (retries turned off, or requests that cannot be sent twice); rejected
    tokens are still dropped.

    Not thread-safe: one call, one driver.
    """

    __slots__ = ("_clock", "_may_retry", "_started", "_timeout", "token")

    def __init__(
        self,
        token: Token,
        *,
        timeout: float | None,
        retry: bool,
        clock: Callable[[], float],
        started: float | None = None,
    ) -> None:
        self.token = token
        self._timeout = timeout
        self._may_retry = retry
        self._clock = clock
        self._started = clock() if started is None else started

    def __repr__(self) -> str:
        return f"UnaryRetry(timeout={self._timeout!r}, may_retry={self._may_retry})"

    def after(self, code: grpc.StatusCode | None) -> RetryStep:
        """The step after the current attempt ended with ``code`` (None: no
        readable status, which is never judged)."""
        if code is not _UNAUTHENTICATED:
            return _FINAL
        rejected = self.token
        if not self._may_retry:
            return RetryStep(drop=rejected)
        self._may_retry = False
        remaining = remaining_timeout(self._timeout, self._clock() - self._started)
        if remaining is not None and remaining <= 0:
            return RetryStep(drop=rejected)
        return RetryStep(drop=rejected, retry=True, timeout=remaining)

    def use(self, fresh: Token | None) -> bool:
        """After a retry step: True when ``fresh`` carries the retry (it
        becomes :attr:`token`); False when there is no token or it is the
        rejected one again, and the call ends with the rejection."""
        if fresh is None or fresh.value == self.token.value:
            return False
        self.token = fresh
        return True
