"""The control plane's token endpoint (aiohttp).

Routes:

- ``GET /token`` with ``Authorization: Bearer <session proof>`` (see
  :mod:`ambient_grpc_auth.proof`) -> 200 ``{"token": ..., "expires_at": ...}``;
  401 missing/malformed header or undecryptable/stale/replayed proof; 403 the
  session id is not acceptable; 405 any other method (``Allow: GET``); 500 the
  token provider failed or something unexpected happened; 503 too many
  requests waiting for decryption, or the shared replay store (Redis) cannot
  answer for a v2 proof. Bodies are short fixed text and never echo
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
import socket
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from ambient_grpc_auth._shutdown import wait_for_stop_signal
from ambient_grpc_auth.controlplane.app import (
    JWKS_PATH,
    STATE,
    TOKEN_PATH,
    State,
    TokenServerCounters,
    make_app,
)
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.issuers import TokenIssuer

__all__ = [
    "RunningTokenServer",
    "create_app",
    "run_token_server",
    "start_token_server",
]

_log = logging.getLogger(__name__)


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
