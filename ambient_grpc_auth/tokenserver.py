"""The control plane's token endpoint (aiohttp).

Routes:

- ``GET /token`` with ``Authorization: Bearer <session proof>`` (see
  :mod:`ambient_grpc_auth.proof`) -> 200 ``{"token": ..., "expires_at": ...}``;
  401 missing/malformed header or undecryptable/stale/replayed proof; 403 the
  session id is not acceptable; 405 any other method (``Allow: GET``); 500 the
  token provider failed or something unexpected happened; 503 too many
  requests waiting for decryption. Bodies are short fixed text and never echo
  the bearer; responses carry ``Cache-Control: no-store``.
- ``GET /healthz`` -> 200 ``ok``.
- ``GET /.well-known/jwks.json`` and ``GET /.well-known/openid-configuration``:
  the signing keys and an OIDC discovery document, so that standard JWT
  verifiers find the keys (404 when tokens come from an upstream issuer).

RSA decryption (~6-10 ms per RSA-4096 proof) runs in a thread pool of
``max_concurrent_decrypts`` workers behind a semaphore, so the event loop keeps
serving; at most ``max_pending_requests`` requests wait for it. Logs go to
``logging.getLogger(__name__)`` with the session id and the outcome, never the
bearer or an issued token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from ._clock import SYSTEM_CLOCK, Clock
from ._shutdown import wait_for_stop_signal
from ._tokenapp import JWKS_PATH, STATE, TOKEN_PATH, State, TokenServerCounters, make_app
from .errors import ConfigurationError
from .issuers import DEFAULT_AUDIENCE, DEFAULT_SUBJECT, DEFAULT_TTL_SECONDS, TokenIssuer
from .keys import CPKeys
from .oidc_issuer import OidcSettings
from .proof import SessionIdRule

__all__ = [
    "RunningTokenServer",
    "SessionCheck",
    "TokenServerConfig",
    "TokenServerCounters",
    "create_app",
    "run_token_server",
    "start_token_server",
]

_log = logging.getLogger(__name__)

SessionCheck = Callable[[str], Awaitable[bool]]


@dataclass(frozen=True, kw_only=True)
class TokenServerConfig:
    """Configuration of the token endpoint (keyword-only, immutable).

    Keys: ``keys_dir`` (generated on first start when ``generate_keys``,
    otherwise loaded, e.g. from a mounted Secret) and/or already loaded
    ``keys``. With ``keys_dir`` a running server follows signing-key rotations
    (checked every ``signing_key_check_interval`` seconds).

    Tokens: by default a :class:`~ambient_grpc_auth.issuers.JwtIssuer` with
    ``issuer`` (default: the server's own URL), ``audience``, ``ttl`` and
    ``subject``. ``oidc`` switches to an upstream client-credentials provider;
    ``token_issuer`` plugs in any other :class:`~ambient_grpc_auth.issuers.TokenIssuer`.
    ``public_url`` is the externally visible base URL for the discovery
    document's ``jwks_uri`` (default: the issuer when it is a URL, else the
    server's own URL).

    Proofs: ``session_id_rule`` (or just a ``session_id_pattern``),
    ``require_fresh_proof`` (refuse v1), ``proof_window`` seconds for v2,
    ``replay_max_entries``; ``session_check(session_id)`` may refuse a session
    (False -> 403; an exception -> 500).

    Limits: ``max_concurrent_decrypts`` (default ``os.cpu_count()``),
    ``max_pending_requests`` waiting for a decrypt slot (then 503),
    ``request_timeout`` for the whole /token handling, ``max_header_size``
    (request line and each header), ``shutdown_timeout`` for graceful close.
    """

    keys_dir: str | os.PathLike[str] | None = None
    keys: CPKeys | None = None
    generate_keys: bool = True
    issuer: str | None = None
    public_url: str | None = None
    audience: str | tuple[str, ...] = DEFAULT_AUDIENCE
    ttl: float = DEFAULT_TTL_SECONDS
    subject: str = DEFAULT_SUBJECT
    require_fresh_proof: bool = False
    proof_window: float = 60.0
    replay_max_entries: int = 100_000
    session_id_rule: SessionIdRule | None = None
    session_id_pattern: str | None = None
    session_check: SessionCheck | None = None
    oidc: OidcSettings | None = None
    token_issuer: TokenIssuer | None = None
    max_concurrent_decrypts: int | None = None
    max_pending_requests: int = 256
    request_timeout: float = 10.0
    max_header_size: int = 8190
    shutdown_timeout: float = 10.0
    signing_key_check_interval: float = 10.0
    jwks_max_age: int = 60
    clock: Clock = SYSTEM_CLOCK

    def __post_init__(self) -> None:
        if self.keys_dir is None and self.keys is None:
            raise ConfigurationError("token server: keys_dir or keys is required")
        if self.oidc is not None and self.token_issuer is not None:
            raise ConfigurationError("token server: set oidc or token_issuer, not both")
        if self.session_id_rule is not None and self.session_id_pattern is not None:
            raise ConfigurationError("token server: set session_id_rule or session_id_pattern")
        if self.max_concurrent_decrypts is not None and self.max_concurrent_decrypts < 1:
            raise ConfigurationError("token server: max_concurrent_decrypts must be >= 1")
        for name in ("request_timeout", "proof_window", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"token server: {name} must be positive")
        if self.max_pending_requests < 1 or self.max_header_size < 1024:
            raise ConfigurationError("token server: limits too small")


def create_app(config: TokenServerConfig) -> web.Application:
    """Build the aiohttp application (blocking: loads, maybe generates, keys).

    Without ``config.issuer`` or ``config.public_url`` the JWT issuer has no
    name to use, so ConfigurationError is raised; :func:`start_token_server`
    fills in its own URL instead. The app's thread pool is shut down in its
    cleanup. Raises KeyFileError for bad keys.
    """
    return make_app(State(config, None), config)


@dataclass
class RunningTokenServer:
    """A started token server. ``close()`` stops accepting, lets in-flight
    requests finish (up to ``shutdown_timeout``) and releases the thread pool."""

    url: str
    host: str
    port: int
    app: web.Application
    _runner: web.AppRunner = dataclasses.field(repr=False)

    @property
    def token_url(self) -> str:
        return self.url + TOKEN_PATH

    @property
    def jwks_url(self) -> str:
        return self.url + JWKS_PATH

    @property
    def counters(self) -> TokenServerCounters:
        return self.app[STATE].counters

    @property
    def issuer(self) -> TokenIssuer:
        return self.app[STATE].issuer

    async def close(self) -> None:
        await self._runner.cleanup()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=128)
    sock.setblocking(False)
    return sock


async def start_token_server(
    config: TokenServerConfig, host: str = "127.0.0.1", port: int = 0
) -> RunningTokenServer:
    """Bind ``host:port`` (0 = any free port) and serve the token endpoint.

    Key loading/generation runs in a thread. When ``config.issuer`` is unset
    the issuer is the server's URL (``http://host:port``).
    """
    sock = _bind(host, port)
    try:
        bound_port = sock.getsockname()[1]
        url_host = f"[{host}]" if ":" in host else host
        url = f"http://{url_host}:{bound_port}"
        state = await asyncio.to_thread(State, config, url)
        app = make_app(state, config)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=config.shutdown_timeout)
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            raise
    except BaseException:
        sock.close()
        raise
    _log.info("token server listening on %s", url)
    return RunningTokenServer(url=url, host=host, port=bound_port, app=app, _runner=runner)


def run_token_server(
    config: TokenServerConfig,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    ready: Callable[[RunningTokenServer], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then close gracefully (blocking).

    ``ready`` is called once the server is listening (e.g. to print its URL).
    Signal handlers are installed only when called from the main thread.
    """

    async def main() -> None:
        server = await start_token_server(config, host, port)
        try:
            if ready is not None:
                ready(server)
            await wait_for_stop_signal()
            _log.info("token server shutting down")
        finally:
            await server.close()

    asyncio.run(main())
