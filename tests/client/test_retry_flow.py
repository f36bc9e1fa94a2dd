"""Unit tests of the one retry-after-UNAUTHENTICATED flow (no gRPC servers)."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from ambient_grpc_auth.client._core import status_code_of
from ambient_grpc_auth.client._retry import RetryStep, UnaryRetry
from ambient_grpc_auth.client.tokens import Token

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
OLD = Token("old", None)
NEW = Token("new", None)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _flow(*, timeout: float | None = 5.0, retry: bool = True) -> tuple[UnaryRetry, Clock]:
    clock = Clock()
    return UnaryRetry(OLD, timeout=timeout, retry=retry, clock=clock), clock


@pytest.mark.parametrize(
    "code",
    [
        None,
        grpc.StatusCode.OK,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ],
)
def test_anything_but_unauthenticated_is_final(code: grpc.StatusCode | None) -> None:
    flow, _ = _flow()
    assert flow.after(code) == RetryStep()
    assert flow.token is OLD


def test_unauthenticated_drops_the_token_and_retries_once_in_the_time_left() -> None:
    flow, clock = _flow(timeout=5.0)
    clock.now += 1.5
    step = flow.after(UNAUTH)
    assert step.drop is OLD
    assert step.retry
    assert step.timeout == pytest.approx(3.5)
    assert flow.use(NEW)
    assert flow.token is NEW
    # The retry is rejected too: its token is dropped, and that is the end.
    assert flow.after(UNAUTH) == RetryStep(drop=NEW)
    assert flow.after(UNAUTH) == RetryStep(drop=NEW)


def test_the_retry_may_succeed() -> None:
    flow, _ = _flow()
    assert flow.after(UNAUTH).retry
    assert flow.use(NEW)
    assert flow.after(grpc.StatusCode.OK) == RetryStep()


def test_no_deadline_stays_no_deadline() -> None:
    flow, clock = _flow(timeout=None)
    clock.now += 1e6
    assert flow.after(UNAUTH) == RetryStep(drop=OLD, retry=True, timeout=None)


@pytest.mark.parametrize("elapsed", [5.0, 7.0])
def test_no_retry_once_the_deadline_is_spent(elapsed: float) -> None:
    flow, clock = _flow(timeout=5.0)
    clock.now += elapsed
    assert flow.after(UNAUTH) == RetryStep(drop=OLD)


def test_started_is_taken_from_the_caller() -> None:
    clock = Clock()
    flow = UnaryRetry(OLD, timeout=5.0, retry=True, clock=clock, started=clock.now - 4.0)
    assert flow.after(UNAUTH).timeout == pytest.approx(1.0)


def test_retry_off_still_drops_the_token() -> None:
    flow, _ = _flow(retry=False)
    assert flow.after(UNAUTH) == RetryStep(drop=OLD)


@pytest.mark.parametrize("fresh", [None, Token("old", None)])
def test_no_retry_without_a_different_token(fresh: Token | None) -> None:
    flow, _ = _flow()
    assert flow.after(UNAUTH).retry
    assert not flow.use(fresh)
    assert flow.token is OLD


def test_repr_holds_no_token() -> None:
    flow, _ = _flow()
    assert "old" not in repr(flow)


# --- status_code_of --------------------------------------------------------------------


class _Outcome:
    def __init__(self, code: object) -> None:
        self._code = code

    def code(self) -> object:
        if isinstance(self._code, Exception):
            raise self._code
        return self._code


def test_status_code_of_reads_sync_and_aio_outcomes() -> None:
    assert status_code_of(_Outcome(UNAUTH)) is UNAUTH
    aio_error = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata()
    )
    assert status_code_of(aio_error) is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "outcome", [object(), grpc.RpcError(), _Outcome(RuntimeError("x")), _Outcome("UNAUTHENTICATED")]
)
def test_status_code_of_without_a_readable_status(outcome: object) -> None:
    assert status_code_of(outcome) is None
