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
- ``GET /metrics``: Prometheus metrics (see
  :mod:`ambient_grpc_auth.controlplane.metrics`).

Before any handler runs (see :mod:`ambient_grpc_auth.controlplane._listener`):
a malformed request gets a fixed 400 (431 for an over-long header line) and a
fixed log line, never its own bytes back; at most ``max_connections``
connections are served at once (503 beyond, the cap kept below
RLIMIT_NOFILE); a connection that sends no complete request head within
``header_timeout`` seconds is closed; repeated errors are logged once per
kind and interval with a count. These protections come with
:func:`start_token_server` and :func:`run_token_server`, not with an app
from :func:`create_app` run some other way.

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
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from ambient_grpc_auth._shutdown import wait_for_stop_signal
from ambient_grpc_auth.controlplane._listener import (
    Listener,
    RateLimitedLog,
    connection_limits,
    http_handler_args,
    listening_socket,
    loop_exception_handler,
)
from ambient_grpc_auth.controlplane.app import (
    JWKS_PATH,
    METRICS_PATH,
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
    cleanup. Raises KeyFileError for bad keys. Served some other way than by
    :func:`start_token_server`, the app lacks the connection-level protections
    described in this module's docstring.
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
    _server: asyncio.Server = dataclasses.field(repr=False)
    _listener: Listener = dataclasses.field(repr=False)

    @property
    def token_url(self) -> str:
        return self.url + TOKEN_PATH

    @property
    def jwks_url(self) -> str:
        return self.url + JWKS_PATH

    @property
    def metrics_url(self) -> str:
        return self.url + METRICS_PATH

    @property
    def counters(self) -> TokenServerCounters:
        return self.app[STATE].counters

    @property
    def issuer(self) -> TokenIssuer:
        return self.app[STATE].issuer

    @property
    def max_connections(self) -> int:
        """The connection cap in force (``config.max_connections`` or lower)."""
        return self._listener.max_connections

    @property
    def open_connections(self) -> int:
        """Client connections open right now (those refused at the cap excluded)."""
        return self._listener.open_connections

    async def close(self) -> None:
        # Stops listening at once; not followed by ``wait_closed``, which on
        # newer Pythons would wait for every client to drain its socket.
        self._server.close()
        await self._runner.cleanup()


async def start_token_server(
    config: TokenServerConfig, host: str = "127.0.0.1", port: int = 0
) -> RunningTokenServer:
    """Bind ``host:port`` (0 = any free port) and serve the token endpoint.

    Key loading/generation runs in a thread. When ``config.issuer`` is unset
    the issuer is the server's URL (``http://host:port``).
    """
    max_connections, backlog = connection_limits(config.max_connections)
    if max_connections < config.max_connections:
        _log.info(
            "serving at most %d connections (max_connections %d does not fit RLIMIT_NOFILE)",
            max_connections,
            config.max_connections,
        )
    sock = listening_socket(host, port, backlog)
    try:
        bound_port = sock.getsockname()[1]
        url_host = f"[{host}]" if ":" in host else host
        url = f"http://{url_host}:{bound_port}"
        state = await asyncio.to_thread(State, config, url)
        app = make_app(state, config)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=config.shutdown_timeout)
        await runner.setup()
        try:
            assert runner.server is not None  # set by setup()
            listener = Listener(
                runner.server,
                max_connections=max_connections,
                header_timeout=config.header_timeout,
                handler_args=http_handler_args(config),
                log=RateLimitedLog(_log, clock=config.clock),
            )
            listener.attach()
            server = await asyncio.get_running_loop().create_server(
                listener, sock=sock, backlog=backlog
            )
        except BaseException:
            await runner.cleanup()
            raise
    except BaseException:
        sock.close()
        raise
    _log.info("token server listening on %s", url)
    return RunningTokenServer(
        url=url,
        host=host,
        port=bound_port,
        app=app,
        _runner=runner,
        _server=server,
        _listener=listener,
    )


def run_token_server(
    config: TokenServerConfig,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    ready: Callable[[RunningTokenServer], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then close gracefully (blocking).

    ``ready`` is called once the server is listening (e.g. to print its URL).
    Signal handlers are installed only when called from the main thread. The
    event loop's errors (such as a failing ``accept``) are logged one line per
    kind and interval, without tracebacks.
    """

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            loop_exception_handler(RateLimitedLog(_log, clock=config.clock))
        )
        server = await start_token_server(config, host, port)
        # The signal handlers go in before ``ready`` announces the server, so
        # that a stop request right after the announcement is not lost.
        stop = asyncio.ensure_future(wait_for_stop_signal())
        try:
            await asyncio.sleep(0)
            if ready is not None:
                ready(server)
            await stop
            _log.info("token server shutting down")
        finally:
            stop.cancel()
            await server.close()

    asyncio.run(main())
