"""Parsing the ``authorization`` metadata: repeated identical values."""

from __future__ import annotations

import pytest

from ambient_grpc_auth._bearer import MAX_AUTHORIZATION_VALUES, extract_bearer
from ambient_grpc_auth.errors import TokenRejectedError

BEARER = ("authorization", "Bearer abc.def.ghi")


def _reason(metadata: list[tuple[str, str | bytes]]) -> str:
    with pytest.raises(TokenRejectedError) as info:
        extract_bearer(metadata)
    return info.value.reason


@pytest.mark.parametrize("copies", range(1, MAX_AUTHORIZATION_VALUES + 1))
def test_identical_values_are_one_bearer(copies: int) -> None:
    assert extract_bearer([("x-other", "1"), *[BEARER] * copies]) == "abc.def.ghi"


def test_too_many_identical_values_are_refused() -> None:
    assert _reason([BEARER] * (MAX_AUTHORIZATION_VALUES + 1)) == "duplicate"


@pytest.mark.parametrize(
    "second",
    [
        "Bearer abc.def.ghX",  # another token
        "bearer abc.def.ghi",  # same token, other spelling: still two values
        "Bearer abc.def.ghi ",
        b"Bearer abc.def.ghi",  # binary
    ],
)
def test_values_that_differ_are_refused_in_either_order(second: str | bytes) -> None:
    assert _reason([BEARER, ("authorization", second)]) == "duplicate"
    assert _reason([("authorization", second), BEARER]) == "duplicate"


def test_identical_binary_values_stay_malformed() -> None:
    value = ("authorization", b"Bearer abc")
    assert _reason([value, value]) == "malformed"
