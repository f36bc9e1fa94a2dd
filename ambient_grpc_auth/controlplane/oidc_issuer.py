"""An issuer that fetches a service token from an upstream OAuth2/OIDC provider.

The control plane authenticates itself with the client-credentials grant
(RFC 6749 §4.4) and hands the resulting access token to runners whose proof it
accepted. The token is the control plane's service token, not scoped to one
session: use this issuer only where the API server expects such tokens.

The client secret travels to ``token_url``: ``https`` to any host, plain
``http`` only to loopback and cluster-local hosts (the policy of
:mod:`ambient_grpc_auth._locality`), unless ``allow_insecure_http=True``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, urlencode

import jwt

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth._http import TransportError, request_async, validate_http_url
from ambient_grpc_auth._locality import check_url_plaintext
from ambient_grpc_auth.controlplane.issuers import IssuedToken, TokenIssueError
from ambient_grpc_auth.errors import ConfigurationError

__all__ = ["OidcClientCredentialsIssuer", "OidcSettings"]

_log = logging.getLogger(__name__)

_MAX_TOKEN_CHARS = 16 * 1024
_MAX_SECRET_BYTES = 4096


@dataclass(frozen=True, kw_only=True)
class OidcSettings:
    """Configuration of :class:`OidcClientCredentialsIssuer` (see there)."""

    #: The provider's token endpoint (https, or http to loopback/cluster-local).
    token_url: str
    #: The client id sent with HTTP Basic authentication.
    client_id: str
    #: File holding the client secret; read on every fetch (rotation-friendly).
    client_secret_file: str | os.PathLike[str]
    #: ``scope`` form parameter, sent when set.
    scope: str | None = None
    #: ``audience`` form parameter (a common extension), sent when set.
    audience: str | None = None
    #: Total time for one upstream request, seconds.
    timeout: float = 10.0
    #: Lifetime assumed when the response has no ``expires_in`` and no JWT ``exp``.
    default_ttl: float = 300.0
    #: Refresh this many seconds before expiry (capped at half the lifetime).
    refresh_margin: float = 30.0
    #: After a failed fetch, fail fast for this long without calling upstream.
    failure_cooldown: float = 1.0
    #: Largest response body read from the provider.
    max_response_bytes: int = 64 * 1024
    #: Permit plain http to a host that is neither loopback nor cluster-local.
    allow_insecure_http: bool = False


class OidcClientCredentialsIssuer:
    """Client-credentials token source with caching and single flight.

    - Authenticates with HTTP Basic (``client_secret_basic``, the method every
      provider must support per RFC 6749 §2.3.1); id and secret are
      form-urlencoded before base64 as that section requires.
    - Sends ``grant_type=client_credentials`` plus ``scope`` and ``audience``
      when configured (``audience`` is the common non-standard extension).
    - The secret is read from ``client_secret_file`` on every fetch (trailing
      newline stripped), so a rotated Secret is picked up without a restart.
    - The token is cached until ``expires_in - refresh_margin`` (the margin is
      capped at half the lifetime). Without ``expires_in`` the JWT ``exp`` is
      used if the token is a JWT, else ``default_ttl``.
    - Single flight: an :class:`asyncio.Lock` is held across the fetch, so
      concurrent callers share one upstream request.
    - A failed refresh serves the cached token while it is still valid, and
      for ``failure_cooldown`` seconds fails fast without calling upstream.
    - The request goes through the package's one bounded HTTP client: the
      response is bounded (``max_response_bytes``), the request has a total
      ``timeout``, redirects are not followed and proxy environment variables
      are ignored.

    Failures raise :class:`~ambient_grpc_auth.controlplane.issuers.TokenIssueError` with a
    message that names the failure but never the secret or the token. Use an
    instance from one event loop.
    """

    def __init__(self, settings: OidcSettings, *, clock: Clock = SYSTEM_CLOCK) -> None:
        parts = validate_http_url(settings.token_url, what="OIDC token_url")
        check_url_plaintext(
            parts,
            allow_remote=settings.allow_insecure_http,
            sending="the client secret",
            what="OIDC token_url",
            allow_flag="allow_insecure_http=True",
        )
        if not settings.client_id:
            raise ConfigurationError("OIDC client_id is required")
        if settings.timeout <= 0 or settings.default_ttl <= 0 or settings.refresh_margin < 0:
            raise ConfigurationError("OIDC timeout, default_ttl must be positive")
        self._s = settings
        self._clock = clock
        self._lock = asyncio.Lock()
        self._cached: IssuedToken | None = None
        self._refresh_at = 0.0
        self._failed_until = -1.0
        self._last_error: TokenIssueError | None = None
        #: Upstream requests made so far (for metrics and tests).
        self.fetch_count = 0

    def __repr__(self) -> str:
        s = self._s
        return f"OidcClientCredentialsIssuer(token_url={s.token_url!r}, client_id={s.client_id!r})"

    async def issue(self, session_id: str) -> IssuedToken:
        """Return the cached service token, fetching a new one when due.

        ``session_id`` is not sent upstream; it only appears in logs.
        """
        cached = self._fresh()
        if cached is not None:
            return cached
        async with self._lock:
            cached = self._fresh()
            if cached is not None:
                return cached
            if self._clock.monotonic() < self._failed_until and self._last_error is not None:
                return self._fallback(self._last_error)
            try:
                token = await self._fetch()
            except TokenIssueError as exc:
                _log.warning("upstream token fetch failed: %s", exc)
                self._last_error = exc
                self._failed_until = self._clock.monotonic() + self._s.failure_cooldown
                return self._fallback(exc)
            self._cached = token
            lifetime = token.expires_at.timestamp() - self._clock.time()
            margin = min(self._s.refresh_margin, max(lifetime, 0.0) / 2)
            self._refresh_at = token.expires_at.timestamp() - margin
            self._last_error = None
            return token

    def _fresh(self) -> IssuedToken | None:
        if self._cached is not None and self._clock.time() < self._refresh_at:
            return self._cached
        return None

    def _fallback(self, exc: TokenIssueError) -> IssuedToken:
        # Keep the last good token while it has not expired.
        if self._cached is not None and self._clock.time() < self._cached.expires_at.timestamp():
            return self._cached
        raise exc

    def _secret(self) -> str:
        path = Path(self._s.client_secret_file)
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_SECRET_BYTES + 1)
        except OSError as exc:
            raise TokenIssueError(
                f"client secret file {path} unreadable ({exc.strerror})"
            ) from None
        if len(raw) > _MAX_SECRET_BYTES:
            raise TokenIssueError(f"client secret file {path} is too large")
        try:
            secret = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise TokenIssueError(f"client secret file {path} is not UTF-8") from None
        if not secret:
            raise TokenIssueError(f"client secret file {path} is empty")
        return secret

    async def _fetch(self) -> IssuedToken:
        secret = self._secret()
        basic = base64.b64encode(
            f"{quote_plus(self._s.client_id)}:{quote_plus(secret)}".encode()
        ).decode("ascii")
        form = {"grant_type": "client_credentials"}
        if self._s.scope:
            form["scope"] = self._s.scope
        if self._s.audience:
            form["audience"] = self._s.audience
        headers = {
            "Authorization": f"Basic {basic}",
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        self.fetch_count += 1
        try:
            response = await request_async(
                self._s.token_url,
                headers,
                time_limit=self._s.timeout,
                max_bytes=self._s.max_response_bytes,
                method="POST",
                body=urlencode(form).encode("ascii"),
            )
        except TransportError as exc:
            raise TokenIssueError(f"upstream token request failed: {exc.description}") from None
        if response.status != 200:
            raise TokenIssueError(f"upstream token endpoint answered HTTP {response.status}")
        return self._parse(response.body)

    def _parse(self, body: bytes) -> IssuedToken:
        try:
            doc: Any = json.loads(body)
        except ValueError:
            raise TokenIssueError("upstream token response is not JSON") from None
        if not isinstance(doc, dict):
            raise TokenIssueError("upstream token response is not a JSON object")
        token = doc.get("access_token")
        if (
            not isinstance(token, str)
            or not token
            or len(token) > _MAX_TOKEN_CHARS
            or not token.isascii()
            or not token.isprintable()
            or " " in token
        ):
            raise TokenIssueError("upstream token response has no usable access_token")
        token_type = doc.get("token_type")
        if token_type is not None and (
            not isinstance(token_type, str) or token_type.lower() != "bearer"
        ):
            raise TokenIssueError("upstream token response has an unsupported token_type")
        now = self._clock.time()
        expires_at = now + self._lifetime(doc.get("expires_in"), token)
        return IssuedToken(token=token, expires_at=datetime.fromtimestamp(int(expires_at), UTC))

    def _lifetime(self, expires_in: Any, token: str) -> float:
        if isinstance(expires_in, str) and expires_in.isdigit():
            expires_in = int(expires_in)
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            if expires_in <= 0:
                raise TokenIssueError("upstream token response has a non-positive expires_in")
            return float(min(expires_in, 7 * 24 * 3600))
        if expires_in is not None:
            raise TokenIssueError("upstream token response has an invalid expires_in")
        try:
            # Only to read exp for caching: this token is not trusted by us.
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return self._s.default_ttl
        exp = claims.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            return max(float(exp) - self._clock.time(), 0.0)
        return self._s.default_ttl
