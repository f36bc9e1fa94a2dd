"""Unit tests of the pure client-side core (no gRPC servers)."""

from __future__ import annotations

import grpc
import grpc._interceptor
import grpc.aio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ambient_grpc_auth.client import _core as core
from ambient_grpc_auth.client.aio.interceptor import _rebuild as aio_rebuild
from ambient_grpc_auth.client.env import resume_after_seq_from_env
from ambient_grpc_auth.client.interceptor import _CallDetails, _rebuild
from ambient_grpc_auth.errors import ConfigurationError, TokenUnavailableError

C = grpc.ChannelConnectivity


# --- metadata ---------------------------------------------------------------------


def test_with_authorization_appends_bearer_and_keeps_order() -> None:
    md = (("x-a", "1"), ("x-b", b"bin"), ("x-a", "2"))
    assert core.with_authorization(md, "tok") == (
        ("x-a", "1"),
        ("x-b", b"bin"),
        ("x-a", "2"),
        ("authorization", "Bearer tok"),
    )


def test_with_authorization_replaces_every_existing_entry_any_case() -> None:
    md = (("authorization", "Bearer old"), ("x", "y"), ("Authorization", "Basic zzz"))
    out = core.with_authorization(md, "new")
    assert out == (("x", "y"), ("authorization", "Bearer new"))


def test_with_authorization_none_metadata() -> None:
    assert core.with_authorization(None, "t") == (("authorization", "Bearer t"),)


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "authorization", "b", "AUTHORIZATION"]), st.text()),
        max_size=8,
    )
)
def test_with_authorization_exactly_one_bearer(md: list[tuple[str, str]]) -> None:
    out = core.with_authorization(md, "tok")
    auth = [v for k, v in out if k.lower() == "authorization"]
    assert auth == ["Bearer tok"]
    assert [p for p in out if p[0].lower() != "authorization"] == [
        p for p in md if p[0].lower() != "authorization"
    ]


# --- call details -------------------------------------------------------------------


def test_call_details_fields_match_grpc() -> None:
    # The sync API's own ClientCallDetails carries exactly these fields.
    assert _CallDetails._fields == core.CALL_DETAIL_FIELDS
    assert grpc._interceptor._ClientCallDetails._fields == core.CALL_DETAIL_FIELDS
    assert issubclass(_CallDetails, grpc.ClientCallDetails)


def test_rebuild_keeps_every_field() -> None:
    creds = grpc.access_token_call_credentials("unused")
    original = _CallDetails("/svc/M", 7.5, (("x-a", "1"),), creds, True, grpc.Compression.Gzip)
    rebuilt = _rebuild(
        original, core.with_authorization(original.metadata, "tok"), original.timeout
    )
    assert rebuilt.method == "/svc/M"
    assert rebuilt.timeout == 7.5
    assert rebuilt.metadata == (("x-a", "1"), ("authorization", "Bearer tok"))
    assert rebuilt.credentials is creds
    assert rebuilt.wait_for_ready is True
    assert rebuilt.compression is grpc.Compression.Gzip


def test_rebuilt_details_never_show_the_bearer() -> None:
    original = _CallDetails("/m", None, (("x", "1"),), None, None, None)
    details = _rebuild(original, core.with_authorization(original.metadata, "sekret"), None)
    assert "sekret" not in repr(details)
    assert "sekret" not in str(details)
    assert "authorization" in repr(details)


def test_aio_rebuild_keeps_every_field_and_hides_the_bearer() -> None:
    creds = grpc.access_token_call_credentials("unused")
    original = grpc.aio.ClientCallDetails(
        "/svc/M", 4.0, grpc.aio.Metadata(("x-a", "1"), ("authorization", "Bearer old")), creds, True
    )
    rebuilt = aio_rebuild(original, "sekret", 3.0)
    assert isinstance(rebuilt, grpc.aio.ClientCallDetails)
    assert rebuilt.method == "/svc/M"
    assert rebuilt.timeout == 3.0
    assert isinstance(rebuilt.metadata, grpc.aio.Metadata)
    assert list(rebuilt.metadata) == [("x-a", "1"), ("authorization", "Bearer sekret")]
    assert rebuilt.credentials is creds
    assert rebuilt.wait_for_ready is True
    assert "sekret" not in repr(rebuilt)


def test_rebuild_tolerates_details_without_newer_fields() -> None:
    class Minimal(grpc.ClientCallDetails):
        method = "/svc/M"
        timeout = None
        metadata = None

    rebuilt = _rebuild(Minimal(), "t", None)
    assert rebuilt.credentials is None
    assert rebuilt.wait_for_ready is None
    assert rebuilt.compression is None


# --- small decisions -------------------------------------------------------------------


def test_remaining_timeout() -> None:
    assert core.remaining_timeout(None, 3.0) is None
    assert core.remaining_timeout(5.0, 1.5) == pytest.approx(3.5)
    assert core.remaining_timeout(5.0, -1.0) == 5.0  # clock oddities never extend it
    assert core.remaining_timeout(1.0, 2.0) <= 0  # type: ignore[operator]


def test_is_replayable() -> None:
    assert core.is_replayable([1, 2])
    assert core.is_replayable((1,))
    assert not core.is_replayable(iter([1]))
    assert not core.is_replayable(x for x in [1])
    assert not core.is_replayable("abc")
    assert not core.is_replayable(b"abc")
    assert not core.is_replayable(None)


def test_token_error_code_and_mapping() -> None:
    assert (
        core.token_error_code(TokenUnavailableError("x", retryable=True))
        is grpc.StatusCode.UNAVAILABLE
    )
    assert (
        core.token_error_code(TokenUnavailableError("x", retryable=False))
        is grpc.StatusCode.UNAUTHENTICATED
    )
    original = TokenUnavailableError("x", retryable=True)
    assert core.as_token_error(original) is original
    mapped = core.as_token_error(RuntimeError("secret-in-message"))
    assert not mapped.retryable
    assert "secret-in-message" not in str(mapped)
    assert "RuntimeError" in str(mapped)


# --- connectivity ------------------------------------------------------------------------


def test_tracker_first_ready_is_not_a_reconnect() -> None:
    t = core.ConnectivityTracker()
    assert t.last_state is None
    assert t.observe(C.IDLE) is core.Transition.NONE
    assert t.last_state is C.IDLE
    assert t.observe(C.CONNECTING) is core.Transition.NONE
    assert t.observe(C.READY) is core.Transition.CONNECTED
    assert t.observe(C.READY) is core.Transition.NONE
    assert t.reconnects == 0


def test_tracker_counts_each_reconnect_once() -> None:
    t = core.ConnectivityTracker()
    seq = [C.IDLE, C.READY, C.IDLE, C.CONNECTING, C.TRANSIENT_FAILURE, C.CONNECTING, C.READY]
    out = [t.observe(s) for s in seq]
    assert out.count(core.Transition.RECONNECTED) == 1
    assert out.count(core.Transition.DISCONNECTED) == 1
    assert t.reconnects == 1
    assert t.observe(C.TRANSIENT_FAILURE) is core.Transition.DISCONNECTED
    assert t.observe(C.READY) is core.Transition.RECONNECTED
    assert t.reconnects == 2


def test_tracker_failures_before_first_connect_are_not_disconnects() -> None:
    t = core.ConnectivityTracker()
    for s in (C.CONNECTING, C.TRANSIENT_FAILURE, C.CONNECTING, C.TRANSIENT_FAILURE):
        assert t.observe(s) is core.Transition.NONE
    assert t.observe(C.READY) is core.Transition.CONNECTED


# --- backoff -----------------------------------------------------------------------------


def test_full_jitter_bounds() -> None:
    assert core.full_jitter_delay(0, base=0.1, cap=5, random=lambda: 0.99) == 0.0
    assert core.full_jitter_delay(1, base=0.1, cap=5, random=lambda: 0.5) == pytest.approx(0.05)
    assert core.full_jitter_delay(4, base=0.1, cap=5, random=lambda: 0.5) == pytest.approx(0.4)
    assert core.full_jitter_delay(30, base=0.1, cap=5, random=lambda: 0.999) < 5.0
    assert core.full_jitter_delay(10**9, base=0.1, cap=5, random=lambda: 0.5) == 2.5
    assert core.full_jitter_delay(3, base=0.1, cap=5, random=lambda: 0.0) == 0.0


@given(st.integers(min_value=1, max_value=10**6), st.floats(min_value=0, max_value=0.9999))
def test_full_jitter_never_exceeds_cap(n: int, r: float) -> None:
    d = core.full_jitter_delay(n, base=0.1, cap=5.0, random=lambda: r)
    assert 0.0 <= d <= 5.0


# --- watch state ------------------------------------------------------------------------


def _state(**policy: object) -> core.WatchState:
    return core.WatchState(core.WatchRetryPolicy(**policy), after_seq=0)  # type: ignore[arg-type]


def test_watch_delivers_in_order_and_drops_duplicates() -> None:
    s = _state()
    V = core.MessageVerdict
    assert [s.on_message(n) for n in (1, 2, 2, 1, 3)] == [
        V.DELIVER,
        V.DELIVER,
        V.DUPLICATE,
        V.DUPLICATE,
        V.DELIVER,
    ]
    assert s.last_seq == 3


def test_watch_gap_resumes_once_then_accepts_the_same_gap() -> None:
    s = _state()
    V = core.MessageVerdict
    assert s.on_message(1) is V.DELIVER
    assert s.on_message(4) is V.GAP  # resume from 1
    assert s.last_seq == 1
    assert s.on_message(4) is V.DELIVER  # the server has no 2..3 any more
    assert s.on_message(6) is V.GAP  # a new gap is checked again
    assert s.on_message(5) is V.DELIVER  # the resumed stream filled it


def test_watch_gap_fixed_by_resume() -> None:
    s = _state()
    assert s.on_message(1) is core.MessageVerdict.DELIVER
    assert s.on_message(3) is core.MessageVerdict.GAP
    assert s.on_message(2) is core.MessageVerdict.DELIVER
    assert s.on_message(3) is core.MessageVerdict.DELIVER


def test_watch_first_message_after_a_nonzero_after_seq() -> None:
    s = core.WatchState(core.WatchRetryPolicy(), after_seq=41)
    assert s.on_message(41) is core.MessageVerdict.DUPLICATE
    assert s.on_message(42) is core.MessageVerdict.DELIVER


def test_watch_unauthenticated_retries_immediately_once_then_backs_off() -> None:
    s = _state()
    U = grpc.StatusCode.UNAUTHENTICATED
    d1 = s.on_stream_end(U, now=0, random=lambda: 0.5)
    d2 = s.on_stream_end(U, now=0, random=lambda: 0.5)
    assert (d1.retry, d1.delay) == (True, 0.0)
    assert d2.retry
    assert d2.delay == pytest.approx(0.1)  # 2nd failure: 0.5 * 0.2
    s.on_message(1)  # progress re-arms the immediate retry
    assert s.on_stream_end(U, now=0, random=lambda: 0.5).delay == 0.0


def test_watch_backoff_resets_after_progress() -> None:
    s = _state()
    for _ in range(6):
        s.on_stream_end(grpc.StatusCode.UNAVAILABLE, now=0, random=lambda: 0.999)
    assert s.failures == 6
    s.on_message(1)
    assert s.failures == 0
    d = s.on_stream_end(grpc.StatusCode.UNAVAILABLE, now=0, random=lambda: 0.5)
    assert d.delay == pytest.approx(0.05)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    ],
)
def test_watch_non_retryable_codes_give_up(code: grpc.StatusCode) -> None:
    assert not _state().on_stream_end(code, now=0, random=lambda: 0.5).retry


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        None,
    ],
)
def test_watch_retryable_outcomes(code: grpc.StatusCode | None) -> None:
    assert _state().on_stream_end(code, now=0, random=lambda: 0.5).retry


def test_watch_token_errors() -> None:
    s = _state()
    fatal = TokenUnavailableError("no", retryable=False)
    transient = TokenUnavailableError("later", retryable=True)
    U = grpc.StatusCode.UNAUTHENTICATED
    assert not s.on_stream_end(U, now=0, random=lambda: 0.5, token_error=fatal).retry
    d = s.on_stream_end(
        grpc.StatusCode.UNAVAILABLE, now=0, random=lambda: 0.5, token_error=transient
    )
    assert d.retry
    assert d.delay > 0


def test_watch_max_consecutive_failures() -> None:
    s = _state(max_consecutive_failures=3)
    results = [
        s.on_stream_end(grpc.StatusCode.UNAVAILABLE, now=0, random=lambda: 0.5).retry
        for _ in range(4)
    ]
    assert results == [True, True, True, False]


def test_watch_max_failure_duration_uses_the_streak_start() -> None:
    s = _state(max_failure_duration=10.0)
    U = grpc.StatusCode.UNAVAILABLE
    assert s.on_stream_end(U, now=100.0, random=lambda: 0.5).retry
    assert s.on_stream_end(U, now=109.0, random=lambda: 0.5).retry
    assert not s.on_stream_end(U, now=110.0, random=lambda: 0.5).retry
    s2 = _state(max_failure_duration=10.0)
    s2.on_stream_end(U, now=100.0, random=lambda: 0.5)
    s2.on_message(1)  # progress restarts the window
    assert s2.on_stream_end(U, now=200.0, random=lambda: 0.5).retry
    assert s2.on_stream_end(U, now=205.0, random=lambda: 0.5).retry


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_delay": -1},
        {"base_delay": float("nan")},
        {"max_delay": 0.01, "base_delay": 0.1},
        {"max_delay": float("inf")},
        {"max_consecutive_failures": 0},
        {"max_failure_duration": 0},
        {"max_failure_duration": float("inf")},
    ],
)
def test_policy_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        core.WatchRetryPolicy(**kwargs)  # type: ignore[arg-type]


# --- RESUME_AFTER_SEQ ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, 0), ("", 0), ("  ", 0), ("0", 0), ("42", 42), (" 7 ", 7)]
)
def test_resume_after_seq_from_env(raw: str | None, expected: int) -> None:
    env = {} if raw is None else {"RESUME_AFTER_SEQ": raw}
    assert resume_after_seq_from_env(env) == expected


@pytest.mark.parametrize("raw", ["-1", "abc", "1.5", "²", "99999999999999999999", "1e3"])
def test_resume_after_seq_rejects_garbage(raw: str) -> None:
    with pytest.raises(ConfigurationError, match="RESUME_AFTER_SEQ"):
        resume_after_seq_from_env({"RESUME_AFTER_SEQ": raw})


def test_plaintext_channels_turn_the_http_proxy_off() -> None:
    from ambient_grpc_auth.client._core import plaintext_channel_options

    assert plaintext_channel_options(()) == [("grpc.enable_http_proxy", 0)]
    assert plaintext_channel_options((("grpc.lb_policy_name", "round_robin"),)) == [
        ("grpc.enable_http_proxy", 0),
        ("grpc.lb_policy_name", "round_robin"),
    ]
    # An explicit choice by the caller is kept.
    assert plaintext_channel_options((("grpc.enable_http_proxy", 1),)) == [
        ("grpc.enable_http_proxy", 1)
    ]
