"""Small, bounded HTTP GET helpers shared by the runner-side fetchers.

Used by the control-plane token source and the backend credential fetch.
Both send a bearer value, so both drivers here:

- never follow redirects (a redirect would forward ``Authorization`` to
  whatever host the response names) and ignore proxy environment variables
  (the bearer goes only to the configured URL);
- bound the response body (``max_bytes``) and the whole exchange (``timeout``);
- report transport failures with fixed descriptions built from exception
  types and OS error names, never from headers or bodies.

The sync driver uses :mod:`urllib.request`; the async driver uses
:mod:`aiohttp` and never blocks the event loop. Everything else here is pure.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import IO, Any

import aiohttp

from ambient_grpc_auth.errors import ConfigurationError

__all__ = [
    "HttpResponse",
    "TransportError",
    "excerpt",
    "get_async",
    "get_sync",
    "parse_rfc3339",
    "safe_url",
    "validate_http_url",
]

_CHUNK = 64 * 1024
_EXCERPT_SCAN = 4096
_MAX_URL_CHARS = 2048


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete, size-bounded response."""

    status: int
    body: bytes


class TransportError(Exception):
    """The exchange failed below HTTP (connect, TLS, timeout, oversized body).

    ``description`` is safe to show: fixed words and OS error names only.
    ``retryable`` is False only for failures that repeat deterministically
    (an oversized response).
    """

    def __init__(self, description: str, *, retryable: bool = True) -> None:
        super().__init__(description)
        self.description = description
        self.retryable = retryable


# --- URL validation -------------------------------------------------------


def validate_http_url(url: object, *, what: str) -> urllib.parse.SplitResult:
    """Parse ``url`` as an absolute http(s) URL with a host.

    Raises :class:`ConfigurationError` for another scheme, a missing host,
    userinfo (``user:pass@``), a fragment, whitespace or control characters,
    or an invalid port. The message names ``what`` and the problem, not the URL
    (it may carry something sensitive in its query).
    """
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"{what}: URL is empty or not a string")
    if len(url) > _MAX_URL_CHARS:
        raise ConfigurationError(f"{what}: URL is longer than {_MAX_URL_CHARS} characters")
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise ConfigurationError(
            f"{what}: URL contains whitespace, control or non-ASCII characters"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigurationError(f"{what}: URL cannot be parsed") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ConfigurationError(f"{what}: URL scheme must be http or https")
    if "@" in parts.netloc:
        raise ConfigurationError(f"{what}: URL must not contain user information")
    if not parts.hostname:
        raise ConfigurationError(f"{what}: URL has no host")
    if parts.fragment or url.endswith("#"):
        raise ConfigurationError(f"{what}: URL must not contain a fragment")
    if port == 0:
        raise ConfigurationError(f"{what}: URL port must be between 1 and 65535")
    return parts


def safe_url(parts: urllib.parse.SplitResult) -> str:
    """``scheme://host[:port]/path`` for messages: no query (it may hold secrets)."""
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


# --- body excerpts ----------------------------------------------------------

# "Bearer <value>" in prose, and "token": "<value>" / token=<value> pairs.
_BEARER_RE = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s\"',;]{8,}")
_PAIR_RE = re.compile(
    r"(?i)\b(token|access_token|id_token|password|secret|proof)(\"?\s*[:=]\s*\"?)[^\s\"',;}]+"
)
# A JWT (or any of its segments: base64url JSON starts "eyJ"), or three long
# dotted base64url runs; host names have shorter labels and survive.
_JWT_RE = re.compile(
    r"eyJ[A-Za-z0-9_=-]*(?:\.[A-Za-z0-9_=-]*){0,2}"
    r"|[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*"
)
_LONG_RUN_RE = re.compile(r"[A-Za-z0-9+/=_-]{32,}")
_REDACTED = "[redacted]"


def excerpt(body: bytes, *, limit: int = 200, secrets: Iterable[str] = ()) -> str:
    """A short, printable, scrubbed excerpt of an error body for messages.

    Known ``secrets`` (the bearer we sent) are removed, then anything that
    looks like a bearer value, a JWT or a long base64 run. Only then is the
    text cut to ``limit`` characters, so a cut never exposes a prefix of a
    secret that the patterns would have matched whole.
    """
    text = body[:_EXCERPT_SCAN].decode("utf-8", errors="replace")
    for secret in secrets:
        if secret:
            text = text.replace(secret, _REDACTED)
    text = "".join(c if c.isprintable() else " " for c in text)
    text = _BEARER_RE.sub(lambda m: m.group(1) + m.group(2) + _REDACTED, text)
    text = _PAIR_RE.sub(lambda m: m.group(1) + m.group(2) + _REDACTED, text)
    text = _JWT_RE.sub(_REDACTED, text)
    text = _LONG_RUN_RE.sub(_REDACTED, text)
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return text or "<empty body>"


# --- RFC 3339 -------------------------------------------------------------

_RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


def parse_rfc3339(text: str) -> float:
    """Parse an RFC 3339 timestamp (``Z`` or ``±hh:mm``, optional fraction)
    into Unix seconds. Raises :class:`ValueError` for anything else."""
    if len(text) > 64:
        raise ValueError("timestamp too long")
    m = _RFC3339_RE.fullmatch(text)
    if m is None:
        raise ValueError("not an RFC 3339 timestamp")
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    fraction = int((m.group(7) or "0").ljust(9, "0")) / 1e9
    if m.group(8):
        tz: timezone = UTC
    else:
        sign = -1 if m.group(9) == "-" else 1
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            raise ValueError("bad offset")
        tz = timezone(sign * timedelta(hours=oh, minutes=om))
    leap = 0
    if second == 60:  # a leap second: the instant just after :59
        second, leap = 59, 1
    dt = datetime(year, month, day, hour, minute, second, tzinfo=tz)
    return dt.timestamp() + leap + fraction


# --- sync driver ----------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # surfaces the 3xx as an HTTPError with its status


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def _os_error_name(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return "cannot resolve the host name"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS certificate verification failed"
    if isinstance(exc, ssl.SSLError):
        return "TLS error"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return type(exc).__name__


def _read_bounded(stream: IO[bytes], max_bytes: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise TransportError("timed out reading the response")
        chunk = stream.read(min(_CHUNK, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise TransportError(f"response larger than {max_bytes} bytes", retryable=False)
        chunks.append(chunk)


def get_sync(
    url: str, headers: Mapping[str, str], *, timeout: float, max_bytes: int
) -> HttpResponse:
    """GET ``url`` (blocking). Returns any HTTP status as a response;
    raises :class:`TransportError` when no complete response was received
    within ``timeout`` seconds or the body exceeds ``max_bytes``."""
    deadline = time.monotonic() + timeout
    # The scheme was checked by validate_http_url: only http and https reach here.
    request = urllib.request.Request(  # noqa: S310
        url, headers={**headers, "Accept-Encoding": "identity"}
    )
    try:
        try:
            response = _OPENER.open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                return HttpResponse(exc.code, _read_bounded(exc, max_bytes, deadline))
        with response:
            return HttpResponse(response.status, _read_bounded(response, max_bytes, deadline))
    except TransportError:
        raise
    except urllib.error.URLError as exc:
        reason = exc.reason if isinstance(exc.reason, BaseException) else None
        detail = _os_error_name(reason) if reason is not None else "connection failed"
        raise TransportError(detail) from None
    except (OSError, http.client.HTTPException) as exc:
        raise TransportError(_os_error_name(exc)) from None


# --- async driver ---------------------------------------------------------


async def get_async(
    url: str, headers: Mapping[str, str], *, time_limit: float, max_bytes: int
) -> HttpResponse:
    """The :func:`get_sync` contract on :mod:`aiohttp` (``time_limit`` is the
    total timeout in seconds); never blocks the loop."""
    client_timeout = aiohttp.ClientTimeout(total=time_limit)
    try:
        async with (
            asyncio.timeout(time_limit),
            aiohttp.ClientSession(
                timeout=client_timeout, trust_env=False, auto_decompress=False
            ) as session,
            session.get(
                url, headers={**headers, "Accept-Encoding": "identity"}, allow_redirects=False
            ) as response,
        ):
            declared = response.content_length
            if declared is not None and declared > max_bytes:
                raise TransportError(f"response larger than {max_bytes} bytes", retryable=False)
            chunks: list[bytes] = []
            total = 0
            while True:
                chunk = await response.content.read(min(_CHUNK, max_bytes + 1 - total))
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise TransportError(f"response larger than {max_bytes} bytes", retryable=False)
                chunks.append(chunk)
            return HttpResponse(response.status, b"".join(chunks))
    except TransportError:
        raise
    except TimeoutError:
        raise TransportError("timed out") from None
    except aiohttp.ClientConnectorError as exc:
        raise TransportError(_os_error_name(exc.os_error)) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise TransportError(type(exc).__name__) from None
