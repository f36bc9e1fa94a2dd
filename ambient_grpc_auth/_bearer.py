"""Building and parsing the ``authorization`` metadata (pure, no I/O).

The wire form is ``authorization: Bearer <token>``; the scheme is matched
case-insensitively. Errors carry fixed reasons only, never the value.
"""

from __future__ import annotations

from collections.abc import Iterable

from ambient_grpc_auth.errors import TokenRejectedError

__all__ = [
    "AUTHORIZATION_KEY",
    "DEFAULT_MAX_TOKEN_BYTES",
    "MAX_AUTHORIZATION_VALUES",
    "authorization_metadata",
    "authorization_value",
    "extract_bearer",
    "mask",
    "parse_bearer",
]

AUTHORIZATION_KEY = "authorization"
DEFAULT_MAX_TOKEN_BYTES = 16 * 1024
#: How many identical ``authorization`` values one call may carry.
MAX_AUTHORIZATION_VALUES = 4
_SCHEME = "bearer"


def authorization_metadata(token: str) -> tuple[str, str]:
    """The metadata pair that carries ``token``."""
    return (AUTHORIZATION_KEY, "Bearer " + token)


def mask(value: str | bytes | None) -> str:
    """A log-safe stand-in for a secret: its length only."""
    if value is None:
        return "<none>"
    return f"<redacted {len(value)} chars>"


def _is_printable_ascii(token: str) -> bool:
    # Visible ASCII only (0x21-0x7e): no spaces, controls or non-ASCII.
    return token.isascii() and token.isprintable() and " " not in token


def authorization_value(
    metadata: Iterable[tuple[str, str | bytes]] | None,
    *,
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
) -> str:
    """The ``authorization`` value, bounded in size but not yet parsed.

    Several values are accepted when they are byte-identical (at most
    :data:`MAX_AUTHORIZATION_VALUES`): a client that sets both call
    credentials and explicit metadata with the same token sends the header
    twice, and the platform's own servers accept that. Values that differ are
    refused, whichever would be read first.

    Raises :class:`TokenRejectedError` (UNAUTHENTICATED): ``missing``,
    ``duplicate`` (values differ, or too many), ``malformed`` (binary value),
    ``oversized``.
    """
    found: str | bytes | None = None
    count = 0
    for key, value in metadata or ():
        if key != AUTHORIZATION_KEY:
            continue
        count += 1
        if count == 1:
            found = value
        # Both values come from the same caller: no secret is compared here.
        elif count > MAX_AUTHORIZATION_VALUES or value != found:
            raise TokenRejectedError("duplicate")
    if found is None:
        raise TokenRejectedError("missing")
    if isinstance(found, bytes):
        raise TokenRejectedError("malformed")
    # Scheme (6) + space + token; checked before any slicing of a huge value.
    if len(found) > max_token_bytes + 7:
        raise TokenRejectedError("oversized")
    return found


def parse_bearer(value: str) -> str:
    """The token of ``Bearer <token>`` (scheme case-insensitive, one space,
    a non-empty token of visible ASCII); TokenRejectedError ``malformed``."""
    scheme, sep, token = value.partition(" ")
    if not sep or scheme.lower() != _SCHEME or not token:
        raise TokenRejectedError("malformed")
    if not _is_printable_ascii(token):
        raise TokenRejectedError("malformed")
    return token


def extract_bearer(
    metadata: Iterable[tuple[str, str | bytes]] | None,
    *,
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
) -> str:
    """Return the bearer token from invocation metadata.

    One ``authorization`` value (or several identical ones) is accepted; it must be
    ``Bearer <token>`` (scheme case-insensitive, one space) with a non-empty
    token of at most ``max_token_bytes`` visible ASCII characters.

    Raises :class:`TokenRejectedError` (UNAUTHENTICATED) with a fixed reason:
    ``missing``, ``duplicate``, ``malformed``, ``oversized``.
    """
    return parse_bearer(authorization_value(metadata, max_token_bytes=max_token_bytes))
