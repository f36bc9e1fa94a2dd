"""The one bounded HTTP client of the package, and its pure helpers.

Used by every outbound request the package makes: the control-plane token
source, the backend credential client, the JWKS cache and the OIDC issuer.
Each of them sends a secret (a proof, a bearer, a client secret) or fetches
keys that must not be substituted, so both drivers here share one policy:

- redirects are never followed (a redirect would forward ``Authorization``
  to whatever host the response names): a 3xx is returned as a response;
- proxy environment variables are ignored (the request goes only to the
  configured host; a plaintext request through a proxy would also expose the
  secret to the proxy);
- the body is read by one bounded reader: at most ``max_bytes`` (a declared
  ``Content-Length`` above it fails before reading) and before the deadline
  ``time_limit`` seconds after the request started (per-read socket timeouts
  alone would let a slow trickle run on);
- transport failures are reported with fixed descriptions built from
  exception types and OS error names, never from headers or bodies.

Which hosts may be reached over plain http is decided by the callers with
:mod:`ambient_grpc_auth._locality`. The sync driver uses
:mod:`urllib.request`; the async driver uses :mod:`aiohttp` and never blocks
the event loop. Both are thread-safe; everything else here is pure.
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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp

from ambient_grpc_auth.errors import ConfigurationError

__all__ = [
    "HttpResponse",
    "TransportError",
    "excerpt",
    "parse_rfc3339",
    "request_async",
    "request_sync",
    "safe_url",
    "validate_http_url",
]

_CHUNK = 64 * 1024
_EXCERPT_SCAN = 4096
_MAX_URL_CHARS = 2048


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete, size-bounded response. ``headers`` has lower-case names
    (the last value of a repeated header wins)."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)


def _lower_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in items}


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


# --- the bounded reader ---------------------------------------------------


class _BoundedBody:
    """Collects one response body: at most ``max_bytes``, before ``deadline``
    (:func:`time.monotonic`). Both drivers feed it; it raises
    :class:`TransportError` when a bound is crossed."""

    __slots__ = ("_chunks", "_deadline", "_max_bytes", "_total")

    def __init__(self, max_bytes: int, deadline: float) -> None:
        self._chunks: list[bytes] = []
        self._total = 0
        self._max_bytes = max_bytes
        self._deadline = deadline

    def _too_large(self) -> TransportError:
        return TransportError(f"response larger than {self._max_bytes} bytes", retryable=False)

    def declared(self, length: int | None) -> None:
        """Fail early on a ``Content-Length`` over the cap."""
        if length is not None and length > self._max_bytes:
            raise self._too_large()

    def next_read_size(self) -> int:
        """How many bytes to ask for next (one more than the cap allows, so
        that an oversized body is detected); checks the deadline first."""
        if time.monotonic() > self._deadline:
            raise TransportError("timed out reading the response")
        return min(_CHUNK, self._max_bytes + 1 - self._total)

    def add(self, chunk: bytes) -> bool:
        """Take ``chunk``; returns False at the end of the body."""
        if not chunk:
            return False
        self._total += len(chunk)
        if self._total > self._max_bytes:
            raise self._too_large()
        self._chunks.append(chunk)
        return True

    def content(self) -> bytes:
        return b"".join(self._chunks)


def _declared_length(value: str | None) -> int | None:
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


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


def _request_headers(headers: Mapping[str, str]) -> dict[str, str]:
    # Compressed bodies would defeat the size cap (a small body inflating).
    return {**headers, "Accept-Encoding": "identity"}


# --- sync driver ----------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # surfaces the 3xx as an HTTPError with its status


def _opener(tls_context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({}), _NoRedirect()]
    if tls_context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=tls_context))
    return urllib.request.build_opener(*handlers)


_DEFAULT_OPENER = _opener(None)
# Always an explicit context for aiohttp: before 3.10 it read ``ssl=True`` as
# "do not verify" (the dependency floor allows 3.9). Created once, on first use.
_default_tls_context: ssl.SSLContext | None = None


def _verifying_context() -> ssl.SSLContext:
    global _default_tls_context
    if _default_tls_context is None:
        _default_tls_context = ssl.create_default_context()
    return _default_tls_context


def _read_sync(response: Any, limit: _BoundedBody) -> bytes:
    limit.declared(_declared_length(response.headers.get("Content-Length")))
    # read1 returns what one receive brings; read(n) would wait for all n
    # bytes, so a slow trickle would never reach the deadline check.
    while limit.add(response.read1(limit.next_read_size())):
        pass
    return limit.content()


def request_sync(
    url: str,
    headers: Mapping[str, str],
    *,
    time_limit: float,
    max_bytes: int,
    method: str = "GET",
    body: bytes | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> HttpResponse:
    """Send one request (blocking) and return any HTTP status as a response.

    ``url`` must have passed :func:`validate_http_url`. ``tls_context`` sets
    the https trust roots (default: the system's). Raises
    :class:`TransportError` when no complete response was received within
    ``time_limit`` seconds or the body exceeds ``max_bytes``.
    """
    limit = _BoundedBody(max_bytes, time.monotonic() + time_limit)
    opener = _DEFAULT_OPENER if tls_context is None else _opener(tls_context)
    # The scheme was checked by validate_http_url: only http and https reach here.
    request = urllib.request.Request(  # noqa: S310
        url, data=body, headers=_request_headers(headers), method=method
    )
    try:
        try:
            response = opener.open(request, timeout=time_limit)
        except urllib.error.HTTPError as exc:
            with exc:
                return HttpResponse(
                    exc.code, _read_sync(exc, limit), _lower_headers(exc.headers.items())
                )
        with response:
            return HttpResponse(
                response.status,
                _read_sync(response, limit),
                _lower_headers(response.headers.items()),
            )
    except TransportError:
        raise
    except urllib.error.URLError as exc:
        reason = exc.reason if isinstance(exc.reason, BaseException) else None
        detail = _os_error_name(reason) if reason is not None else "connection failed"
        raise TransportError(detail) from None
    except (OSError, http.client.HTTPException) as exc:
        raise TransportError(_os_error_name(exc)) from None


# --- async driver ---------------------------------------------------------


async def request_async(
    url: str,
    headers: Mapping[str, str],
    *,
    time_limit: float,
    max_bytes: int,
    method: str = "GET",
    body: bytes | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> HttpResponse:
    """The :func:`request_sync` contract on :mod:`aiohttp`; never blocks the
    loop, and ``time_limit`` bounds the whole exchange including connecting."""
    limit = _BoundedBody(max_bytes, time.monotonic() + time_limit)
    try:
        async with (
            asyncio.timeout(time_limit),
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=time_limit),
                trust_env=False,
                auto_decompress=False,
            ) as session,
            session.request(
                method,
                url,
                data=body,
                headers=_request_headers(headers),
                allow_redirects=False,
                ssl=tls_context if tls_context is not None else _verifying_context(),
            ) as response,
        ):
            limit.declared(response.content_length)
            while limit.add(await response.content.read(limit.next_read_size())):
                pass
            return HttpResponse(
                response.status, limit.content(), _lower_headers(response.headers.items())
            )
    except TransportError:
        raise
    except TimeoutError:
        raise TransportError("timed out") from None
    except aiohttp.ClientConnectorCertificateError as exc:
        # Its os_error is unset before aiohttp 3.10 (the floor allows 3.9).
        raise TransportError(_os_error_name(exc.certificate_error)) from None
    except aiohttp.ClientConnectorError as exc:
        raise TransportError(_os_error_name(exc.os_error)) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise TransportError(type(exc).__name__) from None
