"""Backend credential fetch for runners.

A runner asks the backend for the credential a session uses with a provider
(GitHub, GitLab, ...): ``GET {base}/api/ambient/v1/credentials/{id}/token``,
where ``id`` comes from ``CREDENTIAL_IDS`` (JSON ``{provider: id}``) and
``base`` from ``BACKEND_API_URL``, else ``AMBIENT_API_SERVER_URL``, else
``http://localhost:8000``. The answer, a JSON object, is returned as is.

Which bearer authenticates the request:

1. the caller's token, when one is given; if the backend answers 401/403 to
   it, the request is retried once with the next credential;
2. otherwise (or as that fallback) the pod's service-account token;
3. otherwise the control-plane token (a :class:`~ambient_grpc_auth.client.tokens.TokenSource`).

Because the pod's service-account token may be sent, the backend must be
in-cluster or local whatever the scheme: only loopback and cluster-local hosts
as defined by :mod:`ambient_grpc_auth._locality` (the policy shared with gRPC
targets and the control-plane URL) are accepted, and redirects are never
followed. Plain http is allowed to those hosts, as everywhere else.
Errors name the provider, the backend host, the HTTP status and a scrubbed
excerpt of an error body; never a token or the credential.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ambient_grpc_auth._http import (
    HttpResponse,
    TransportError,
    excerpt,
    request_async,
    request_sync,
    validate_http_url,
)
from ambient_grpc_auth._locality import check_in_cluster, host_locality
from ambient_grpc_auth._version import __version__
from ambient_grpc_auth.client.tokens import (
    DEFAULT_SERVICE_ACCOUNT_TOKEN_PATH,
    FileTokenSource,
    Token,
    TokenSource,
)
from ambient_grpc_auth.errors import ConfigurationError, TokenUnavailableError

__all__ = [
    "AMBIENT_API_SERVER_URL_ENV",
    "BACKEND_API_URL_ENV",
    "CREDENTIAL_IDS_ENV",
    "DEFAULT_BACKEND_URL",
    "CredentialClient",
    "CredentialUnavailableError",
    "backend_url_from_env",
    "check_backend_url",
    "parse_credential_ids",
]

_log = logging.getLogger(__name__)

BACKEND_API_URL_ENV = "BACKEND_API_URL"
AMBIENT_API_SERVER_URL_ENV = "AMBIENT_API_SERVER_URL"
CREDENTIAL_IDS_ENV = "CREDENTIAL_IDS"
DEFAULT_BACKEND_URL = "http://localhost:8000"
_PATH = "/api/ambient/v1/credentials/{id}/token"
_MAX_IDS_TEXT = 64 * 1024
_MAX_PROVIDERS = 256
_MAX_NAME = 256


class CredentialUnavailableError(TokenUnavailableError):
    """A provider credential could not be fetched. ``provider`` names it."""

    def __init__(
        self, message: str, *, provider: str, retryable: bool, status: int | None = None
    ) -> None:
        super().__init__(message, retryable=retryable, status=status)
        self.provider = provider


# --- configuration (pure) -------------------------------------------------


def _check_name(value: object, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigurationError(f"{what} must be a string")
    text = str(value)
    if not text or len(text) > _MAX_NAME:
        raise ConfigurationError(f"{what} must have 1 to {_MAX_NAME} characters")
    if not text.isprintable() or any(c.isspace() for c in text):
        raise ConfigurationError(f"{what} contains whitespace or control characters")
    if "/" in text or "\\" in text or text in (".", ".."):
        raise ConfigurationError(f"{what} must not contain slashes or be a dot segment")
    return text


def parse_credential_ids(text: str | None) -> dict[str, str]:
    """Parse ``CREDENTIAL_IDS``: a JSON object mapping provider names to ids
    (strings, or integers taken as their decimal text). Empty/None -> {}.

    Raises :class:`ConfigurationError` for invalid JSON, a non-object, too
    many entries, or a name/id that is empty, too long, contains whitespace,
    slashes or control characters, or is ``.``/``..``.
    """
    if text is None or not text.strip():
        return {}
    if len(text) > _MAX_IDS_TEXT:
        raise ConfigurationError(f"{CREDENTIAL_IDS_ENV} is longer than {_MAX_IDS_TEXT} characters")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise ConfigurationError(f"{CREDENTIAL_IDS_ENV} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ConfigurationError(f"{CREDENTIAL_IDS_ENV} must be a JSON object {{provider: id}}")
    if len(doc) > _MAX_PROVIDERS:
        raise ConfigurationError(f"{CREDENTIAL_IDS_ENV} has more than {_MAX_PROVIDERS} entries")
    out: dict[str, str] = {}
    for provider, cid in doc.items():
        name = _check_name(provider, f"{CREDENTIAL_IDS_ENV}: provider name")
        out[name] = _check_name(cid, f"{CREDENTIAL_IDS_ENV}: id for {name!r}")
    return out


def backend_url_from_env(environ: Mapping[str, str] | None = None) -> str:
    """``BACKEND_API_URL``, else ``AMBIENT_API_SERVER_URL``, else the default."""
    env = os.environ if environ is None else environ
    for name in (BACKEND_API_URL_ENV, AMBIENT_API_SERVER_URL_ENV):
        value = env.get(name, "").strip()
        if value:
            return value
    return DEFAULT_BACKEND_URL


def check_backend_url(url: str) -> str:
    """Validate a backend base URL and return it without a trailing slash.

    Raises :class:`ConfigurationError` unless it is an http(s) URL without
    userinfo, query or fragment whose host is loopback or cluster-local
    (:mod:`ambient_grpc_auth._locality`): the request carries a bearer that
    must not leave the cluster.
    """
    parts = validate_http_url(url, what="backend URL")
    if parts.query or url.endswith("?"):
        raise ConfigurationError("backend URL must not contain a query")
    host = parts.hostname or ""
    check_in_cluster(
        host_locality(host),
        sending="the service-account token",
        destination=f"backend URL host {host!r}",
    )
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


# --- the client -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Bearer:
    label: str  # "caller token", "service-account token", "control-plane token"
    value: str


class CredentialClient:
    """Fetches provider credentials from the backend.

    ``service_account`` and ``control_plane`` are the sources of the
    runner's own bearer (either may be None). Each fetch is one HTTP request
    (two when a caller token is refused and a fallback exists), bounded by
    ``timeout`` seconds and ``max_response_bytes``; no retries. Thread-safe.

    Raises :class:`ConfigurationError` at construction for a disallowed URL,
    and from ``fetch`` for an unknown provider or an invalid caller token;
    :class:`CredentialUnavailableError` when the fetch fails (``retryable``
    for transport errors, 408/429 and 5xx).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BACKEND_URL,
        *,
        credential_ids: Mapping[str, str] | None = None,
        service_account: TokenSource | None = None,
        control_plane: TokenSource | None = None,
        timeout: float = 10.0,
        max_response_bytes: int = 1024 * 1024,
    ) -> None:
        self.base_url = check_backend_url(base_url)
        self.credential_ids = {
            _check_name(p, "provider name"): _check_name(i, "credential id")
            for p, i in (credential_ids or {}).items()
        }
        if not timeout > 0 or max_response_bytes < 1:
            raise ConfigurationError("timeout and max_response_bytes must be positive")
        self._service_sources = tuple(
            (label, src)
            for label, src in (
                ("service-account token", service_account),
                ("control-plane token", control_plane),
            )
            if src is not None
        )
        self.timeout = timeout
        self._max_bytes = max_response_bytes

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        control_plane: TokenSource | None = None,
        service_account_token_path: str = DEFAULT_SERVICE_ACCOUNT_TOKEN_PATH,
        timeout: float = 10.0,
    ) -> CredentialClient:
        """Base URL and ids from the environment; the service-account token
        file is used when it exists."""
        env = os.environ if environ is None else environ
        sa = (
            FileTokenSource(service_account_token_path)
            if os.path.isfile(service_account_token_path)
            else None
        )
        return cls(
            backend_url_from_env(env),
            credential_ids=parse_credential_ids(env.get(CREDENTIAL_IDS_ENV)),
            service_account=sa,
            control_plane=control_plane,
            timeout=timeout,
        )

    def __repr__(self) -> str:
        return (
            f"CredentialClient(base_url={self.base_url!r}, providers={sorted(self.credential_ids)})"
        )

    # --- pure parts ---------------------------------------------------------

    def _url(self, provider: str) -> str:
        _check_name(provider, "provider name")
        cid = self.credential_ids.get(provider)
        if cid is None:
            raise ConfigurationError(f"no credential id configured for provider {provider!r}")
        return self.base_url + _PATH.format(id=urllib.parse.quote(cid, safe=""))

    def _fail(
        self, provider: str, what: str, *, retryable: bool, status: int | None = None
    ) -> CredentialUnavailableError:
        host = urllib.parse.urlsplit(self.base_url).netloc
        return CredentialUnavailableError(
            f"credential fetch for provider {provider!r} from {host} failed: {what}",
            provider=provider,
            retryable=retryable,
            status=status,
        )

    def _interpret(
        self, provider: str, bearer: _Bearer, response: HttpResponse
    ) -> dict[str, Any] | CredentialUnavailableError:
        status = response.status
        if status == 200:
            # The body holds the credential: never quote it.
            try:
                doc = json.loads(response.body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                doc = None
            if not isinstance(doc, dict):
                return self._fail(
                    provider,
                    "HTTP 200 with a body that is not a JSON object",
                    retryable=False,
                    status=200,
                )
            return doc
        detail = excerpt(response.body, secrets=(bearer.value,))
        retryable = status >= 500 or status in (408, 429)
        return self._fail(
            provider,
            f"HTTP {status} with the {bearer.label}: {detail}",
            retryable=retryable,
            status=status,
        )

    def _check_caller(self, caller_token: str | Token | None) -> _Bearer | None:
        if caller_token is None:
            return None
        value = caller_token.value if isinstance(caller_token, Token) else caller_token
        if (
            not isinstance(value, str)
            or not value
            or not value.isascii()
            or not value.isprintable()
            or " " in value
        ):
            raise ConfigurationError("caller token is empty or not printable ASCII")
        return _Bearer("caller token", value)

    def _no_service_bearer(self, provider: str, problems: list[str]) -> CredentialUnavailableError:
        if not self._service_sources:
            return self._fail(
                provider,
                "no caller token given and no service-account or control-plane token configured",
                retryable=False,
            )
        return self._fail(provider, "; ".join(problems), retryable=True)

    # --- sync ---------------------------------------------------------------

    def _service_bearer(self, provider: str) -> _Bearer:
        problems: list[str] = []
        for label, source in self._service_sources:
            try:
                return _Bearer(label, source.get_token().value)
            except TokenUnavailableError as exc:
                problems.append(f"{label}: {exc}")
        raise self._no_service_bearer(provider, problems)

    def _get(self, url: str, bearer: _Bearer, provider: str) -> HttpResponse:
        try:
            return request_sync(
                url, _headers(bearer), time_limit=self.timeout, max_bytes=self._max_bytes
            )
        except TransportError as exc:
            raise self._fail(provider, exc.description, retryable=exc.retryable) from None

    def fetch(self, provider: str, *, caller_token: str | Token | None = None) -> dict[str, Any]:
        """The credential for ``provider`` as the backend's JSON object (blocking)."""
        url = self._url(provider)
        bearer = self._check_caller(caller_token) or self._service_bearer(provider)
        outcome = self._interpret(provider, bearer, self._get(url, bearer, provider))
        if (
            isinstance(outcome, CredentialUnavailableError)
            and outcome.status in (401, 403)
            and bearer.label == "caller token"
            and self._service_sources
        ):
            _log.info("backend refused the caller token for %r; retrying once", provider)
            bearer = self._service_bearer(provider)
            outcome = self._interpret(provider, bearer, self._get(url, bearer, provider))
        if isinstance(outcome, CredentialUnavailableError):
            raise outcome
        return outcome

    # --- async --------------------------------------------------------------

    async def _service_bearer_async(self, provider: str) -> _Bearer:
        problems: list[str] = []
        for label, source in self._service_sources:
            try:
                return _Bearer(label, (await source.get_token_async()).value)
            except TokenUnavailableError as exc:
                problems.append(f"{label}: {exc}")
        raise self._no_service_bearer(provider, problems)

    async def _get_async(self, url: str, bearer: _Bearer, provider: str) -> HttpResponse:
        try:
            return await request_async(
                url, _headers(bearer), time_limit=self.timeout, max_bytes=self._max_bytes
            )
        except TransportError as exc:
            raise self._fail(provider, exc.description, retryable=exc.retryable) from None

    async def fetch_async(
        self, provider: str, *, caller_token: str | Token | None = None
    ) -> dict[str, Any]:
        """As :meth:`fetch`; never blocks the event loop."""
        url = self._url(provider)
        bearer = self._check_caller(caller_token) or await self._service_bearer_async(provider)
        outcome = self._interpret(provider, bearer, await self._get_async(url, bearer, provider))
        if (
            isinstance(outcome, CredentialUnavailableError)
            and outcome.status in (401, 403)
            and bearer.label == "caller token"
            and self._service_sources
        ):
            _log.info("backend refused the caller token for %r; retrying once", provider)
            bearer = await self._service_bearer_async(provider)
            outcome = self._interpret(
                provider, bearer, await self._get_async(url, bearer, provider)
            )
        if isinstance(outcome, CredentialUnavailableError):
            raise outcome
        return outcome


def _headers(bearer: _Bearer) -> dict[str, str]:
    return {
        "Authorization": "Bearer " + bearer.value,
        "Accept": "application/json",
        "User-Agent": f"ambient-grpc-auth/{__version__}",
    }
