"""Request handling of the token endpoint (see :mod:`ambient_grpc_auth.controlplane.server`)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from ambient_grpc_auth._bearer import extract_bearer
from ambient_grpc_auth.controlplane._listener import (
    RateLimitedLog,
    describe_exception,
    http_handler_args,
)
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.issuers import JwtIssuer, TokenIssueError, TokenIssuer
from ambient_grpc_auth.controlplane.keys import (
    SigningKeySet,
    SigningKeyStore,
    ensure_keys,
    load_keys,
)
from ambient_grpc_auth.controlplane.oidc_issuer import OidcClientCredentialsIssuer
from ambient_grpc_auth.controlplane.replay import ReplayGuard
from ambient_grpc_auth.errors import ConfigurationError, ProofError, TokenRejectedError
from ambient_grpc_auth.proof import DecodedProof, SessionIdRule, decode_proof

__all__ = [
    "DISCOVERY_PATH",
    "HEALTHZ_PATH",
    "JWKS_PATH",
    "STATE",
    "TOKEN_PATH",
    "State",
    "TokenServerCounters",
    "make_app",
]

# Logged under the public module's name: that is what operators configure.
_log = logging.getLogger("ambient_grpc_auth.controlplane.server")

TOKEN_PATH = "/token"  # noqa: S105 (a URL path)
HEALTHZ_PATH = "/healthz"
JWKS_PATH = "/.well-known/jwks.json"
DISCOVERY_PATH = "/.well-known/openid-configuration"
# A proof for an RSA-8192 key is 1368 base64 characters; anything far longer is junk.
_MAX_BEARER_CHARS = 4096


class TokenServerCounters:
    """Requests by outcome and refusals by reason (thread-safe, for metrics and tests).

    Outcomes: ``issued``, ``unauthorized`` (401), ``forbidden`` (403),
    ``method_not_allowed``, ``busy`` (503), ``upstream_error``, ``timeout``,
    ``internal_error``; also ``decrypts`` (proofs handed to the thread pool).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcomes: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()

    def add(self, outcome: str, reason: str | None = None) -> None:
        with self._lock:
            self._outcomes[outcome] += 1
            if reason is not None:
                self._reasons[reason] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._outcomes)

    def reasons(self) -> dict[str, int]:
        with self._lock:
            return dict(self._reasons)


class _Busy(Exception):
    pass


class State:
    """Everything a request needs; built once, off the event loop (it may
    generate keys). ``pending`` is touched only on the event loop."""

    def __init__(self, config: TokenServerConfig, base_url: str | None) -> None:
        keys = config.keys
        if keys is None:
            if config.keys_dir is None:
                raise ConfigurationError("token server: keys_dir or keys is required")
            need_signing = config.oidc is None and config.token_issuer is None
            keys = (
                ensure_keys(config.keys_dir)
                if config.generate_keys
                else load_keys(config.keys_dir, require_signing=need_signing)
            )
        self.private_key: rsa.RSAPrivateKey = keys.private_key
        workers = config.max_concurrent_decrypts or os.cpu_count() or 1
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ambient-token")
        self.semaphore = asyncio.Semaphore(workers)
        self.pending = 0
        self.max_pending = config.max_pending_requests
        self.request_timeout = config.request_timeout
        self.rule = config.session_id_rule or SessionIdRule(pattern=config.session_id_pattern)
        self.guard = ReplayGuard(
            window_seconds=config.proof_window,
            require_fresh_proof=config.require_fresh_proof,
            clock=config.clock,
            store=config.replay_store,
            max_entries=None if config.replay_store is not None else config.replay_max_entries,
        )
        # The in-process store answers under a short lock; any other store may
        # do network I/O and is kept off the event loop.
        self._guard_off_loop = config.replay_store is not None
        self.session_check = config.session_check
        self.counters = TokenServerCounters()
        # Overload and failure lines come in bursts: one per kind per interval.
        self.error_log = RateLimitedLog(_log, clock=config.clock)
        self.jwt_issuer: JwtIssuer | None = None
        self.issuer: TokenIssuer
        if config.token_issuer is not None:
            self.issuer = config.token_issuer
            if isinstance(config.token_issuer, JwtIssuer):
                self.jwt_issuer = config.token_issuer  # its keys are ours to publish
        elif config.oidc is not None:
            self.issuer = OidcClientCredentialsIssuer(config.oidc, clock=config.clock)
        else:
            if keys.signing is None:
                raise ConfigurationError("token server: no signing key for JWT issuing")
            iss = config.issuer or config.public_url or base_url
            if not iss:
                raise ConfigurationError("token server: issuer is required")
            source: SigningKeySet | SigningKeyStore = keys.signing
            if config.keys_dir is not None:
                source = SigningKeyStore(
                    config.keys_dir,
                    clock=config.clock,
                    check_interval=config.signing_key_check_interval,
                    initial=keys.signing,
                )
            self.jwt_issuer = JwtIssuer(
                signing_keys=source,
                issuer=iss,
                audience=config.audience,
                ttl=config.ttl,
                subject=config.subject,
                clock=config.clock,
                executor=self.executor,
            )
            self.issuer = self.jwt_issuer
        self.base_url = (config.public_url or _url_base(self.jwt_issuer) or base_url or "").rstrip(
            "/"
        )
        self.jwks_max_age = config.jwks_max_age

    async def decode(self, bearer: str) -> DecodedProof:
        if self.pending >= self.max_pending:
            raise _Busy
        self.pending += 1
        try:
            async with self.semaphore:
                self.counters.add("decrypts")
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(
                    self.executor, decode_proof, self.private_key, bearer
                )
        finally:
            self.pending -= 1

    async def check_replay(self, proof: DecodedProof) -> None:
        if self._guard_off_loop:
            await asyncio.to_thread(self.guard.check, proof)
        else:
            self.guard.check(proof)


def _url_base(issuer: JwtIssuer | None) -> str | None:
    if issuer is not None and issuer.issuer.startswith(("https://", "http://")):
        return issuer.issuer
    return None


STATE = web.AppKey("ambient_token_state", State)


def _text(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    h = {"Cache-Control": "no-store"}
    if headers:
        h.update(headers)
    return web.Response(status=status, text=body, headers=h)


def _bearer_of(request: web.Request) -> str:
    values = request.headers.getall("Authorization", [])
    # HTTP allows one Authorization field (RFC 9110 5.3: it is not a list);
    # gRPC metadata may repeat an identical value, HTTP/1.1 requests may not.
    if len(values) > 1:
        raise ProofError("header_duplicate", 401)
    try:
        return extract_bearer(
            [("authorization", v) for v in values], max_token_bytes=_MAX_BEARER_CHARS
        )
    except TokenRejectedError as exc:
        raise ProofError(f"header_{exc.reason}", 401) from None


async def _handle_token(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    counters = state.counters
    if request.method != "GET":
        counters.add("method_not_allowed")
        return _text(405, "method not allowed", {"Allow": "GET"})
    # Set only once the session id has passed the rule, so that what gets
    # logged is known to be printable and bounded.
    sid: str | None = None
    version = 0
    try:
        async with asyncio.timeout(state.request_timeout):
            proof = await state.decode(_bearer_of(request))
            version = proof.version
            sid = state.rule.validate(proof.session_id)
            await state.check_replay(proof)
            if state.session_check is not None and not await state.session_check(sid):
                raise ProofError("unknown_session", 403)
            issued = await state.issuer.issue(sid)
    except ProofError as exc:
        counters.add("unauthorized" if exc.status == 401 else "forbidden", exc.reason)
        _log.warning(
            "token request refused: status=%d reason=%s session=%r", exc.status, exc.reason, sid
        )
        if exc.status == 401:
            body = (
                "missing bearer proof"
                if exc.reason == "header_missing"
                else "invalid session proof"
            )
            return _text(401, body, {"WWW-Authenticate": "Bearer"})
        return _text(403, "session not allowed")
    except _Busy:
        counters.add("busy")
        state.error_log.log(
            logging.WARNING, "busy", "token request refused: too many pending requests"
        )
        return _text(503, "busy", {"Retry-After": "1"})
    except TokenIssueError as exc:
        counters.add("upstream_error")
        state.error_log.log(
            logging.ERROR, "upstream", "token provider failed for session %r: %s", sid, exc
        )
        return _text(500, "token provider unavailable")
    except TimeoutError:
        counters.add("timeout")
        state.error_log.log(
            logging.ERROR,
            "timeout",
            "token request timed out after %.1fs",
            state.request_timeout,
        )
        return _text(500, "request timed out")
    except Exception as exc:
        counters.add("internal_error")
        # Locations only: an exception message (or a source line) from a hook
        # could hold anything, so neither is logged.
        state.error_log.log(
            logging.ERROR,
            f"internal:{type(exc).__name__}",
            "token request failed: %s",
            describe_exception(exc),
        )
        return _text(500, "internal error")
    counters.add("issued")
    _log.info(
        "issued token for session %r (proof v%d, expires %s)",
        sid,
        version,
        issued.to_json()["expires_at"],
    )
    return web.json_response(issued.to_json(), headers={"Cache-Control": "no-store"})


async def _handle_healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


async def _handle_jwks(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.jwt_issuer is None:
        return _text(404, "not found")
    return web.json_response(
        state.jwt_issuer.jwks(),
        headers={"Cache-Control": f"public, max-age={state.jwks_max_age}"},
    )


async def _handle_discovery(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.jwt_issuer is None or not state.base_url:
        return _text(404, "not found")
    doc = {
        "issuer": state.jwt_issuer.issuer,
        "jwks_uri": state.base_url + JWKS_PATH,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": state.jwt_issuer.algorithms,
    }
    return web.json_response(
        doc, headers={"Cache-Control": f"public, max-age={state.jwks_max_age}"}
    )


async def _cleanup(app: web.Application) -> None:
    state = app[STATE]
    await asyncio.to_thread(state.executor.shutdown, wait=True, cancel_futures=True)


def make_app(state: State, config: TokenServerConfig) -> web.Application:
    app = web.Application(handler_args=http_handler_args(config), client_max_size=64 * 1024)
    app[STATE] = state
    app.router.add_route("*", TOKEN_PATH, _handle_token)
    app.router.add_get(HEALTHZ_PATH, _handle_healthz)
    app.router.add_get(JWKS_PATH, _handle_jwks)
    app.router.add_get(DISCOVERY_PATH, _handle_discovery)
    app.on_cleanup.append(_cleanup)
    return app
