"""Request handling of the token endpoint (see :mod:`ambient_grpc_auth.controlplane.server`)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.exposition import choose_encoder

from ambient_grpc_auth._bearer import extract_bearer
from ambient_grpc_auth.controlplane._listener import (
    RateLimitedLog,
    describe_exception,
    http_handler_args,
)
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.issuers import JwtIssuer, TokenIssueError, TokenIssuer
from ambient_grpc_auth.controlplane.keys import (
    CPKeys,
    SigningKeySet,
    SigningKeyStore,
    ensure_keys,
    ensure_signing_algorithm,
    load_keys,
)
from ambient_grpc_auth.controlplane.metrics import TokenServerMetrics
from ambient_grpc_auth.controlplane.oidc_issuer import OidcClientCredentialsIssuer
from ambient_grpc_auth.controlplane.podproof import PodIdentity, PodProofVerifier
from ambient_grpc_auth.controlplane.replay import (
    RedisReplayStore,
    ReplayGuard,
    ReplayStore,
    ReplayStoreUnavailableError,
)
from ambient_grpc_auth.errors import (
    ConfigurationError,
    KeyFileError,
    ProofError,
    TokenRejectedError,
)
from ambient_grpc_auth.proof import (
    POD_TOKEN_HEADER,
    PROOF_VERSIONS_FIELD,
    PROOF_VERSIONS_HEADER,
    DecodedProof,
    SessionIdRule,
    decode_proof,
    format_proof_versions,
)

__all__ = [
    "DISCOVERY_PATH",
    "HEALTHZ_PATH",
    "JWKS_PATH",
    "METRICS_PATH",
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
METRICS_PATH = "/metrics"
# A proof for an RSA-8192 key is 1368 base64 characters; anything far longer is junk.
_MAX_BEARER_CHARS = 4096


class TokenServerCounters:
    """Requests by outcome and refusals by reason (thread-safe, for metrics and tests).

    Outcomes: ``issued``, ``unauthorized`` (401), ``forbidden`` (403),
    ``method_not_allowed``, ``busy`` (503), ``replay_store_unavailable``
    (503), ``upstream_error``, ``timeout``,
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
                ensure_keys(config.keys_dir, signing_algorithm=config.signing_algorithm)
                if config.generate_keys
                else load_keys(config.keys_dir, require_signing=need_signing)
            )
            if need_signing:
                keys = _with_signing_algorithm(keys, config.keys_dir, config)
        self.private_key: rsa.RSAPrivateKey = keys.private_key
        workers = config.max_concurrent_decrypts or os.cpu_count() or 1
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ambient-token")
        # The pool runs ``workers`` decryptions at once; one more per worker
        # waits in its queue, so that a worker finishing a proof starts the
        # next at once instead of idling until the event loop hands one over.
        # Requests beyond that wait here, where a timeout still withdraws them.
        self.semaphore = asyncio.Semaphore(2 * workers)
        self.pending = 0
        self.max_pending = config.max_pending_requests
        self.request_timeout = config.request_timeout
        self.rule = config.session_id_rule or SessionIdRule(pattern=config.session_id_pattern)
        store: ReplayStore | None = config.replay_store
        self.redis_store: RedisReplayStore | None = None
        if config.replay_redis_url is not None:
            store = self.redis_store = RedisReplayStore(
                config.replay_redis_url,
                key_prefix=config.replay_redis_prefix,
                timeout=config.replay_redis_timeout,
                clock=config.clock,
            )
        self.guard = ReplayGuard(
            window_seconds=config.proof_window,
            require_fresh_proof=config.require_fresh_proof,
            clock=config.clock,
            store=store,
            max_entries=None if store is not None else config.replay_max_entries,
        )
        # The in-process store answers under a short lock; any other store may
        # do network I/O and is kept off the event loop.
        self._guard_off_loop = store is not None
        self.session_check = config.session_check
        self.counters = TokenServerCounters()
        self.metrics = TokenServerMetrics(self.counters.snapshot, self.counters.reasons)
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
                username=config.username,
                clock=config.clock,
                executor=self.executor,
            )
            self.issuer = self.jwt_issuer
        self.base_url = (config.public_url or _url_base(self.jwt_issuer) or base_url or "").rstrip(
            "/"
        )
        self.jwks_max_age = config.jwks_max_age
        self.pod: PodProofVerifier | None = None
        if config.pod_proof is not None:
            self.pod = PodProofVerifier(config.pod_proof, clock=config.clock)
            if config.pod_proof.namespaces is None:
                _log.warning("pod-bound proofs: service accounts of any namespace are accepted")
        self.require_pod_proof = config.require_pod_proof
        self.proof_versions = _proof_versions(config)

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


def _proof_versions(config: TokenServerConfig) -> str:
    """What this server advertises (see :mod:`ambient_grpc_auth.proof`)."""
    if config.require_pod_proof:
        return format_proof_versions({"pod"})
    versions = {"v2"} if config.require_fresh_proof else {"v1", "v2"}
    if config.pod_proof is not None:
        versions.add("pod")
    return format_proof_versions(versions)


def _pod_token_of(request: web.Request) -> str | None:
    values = request.headers.getall(POD_TOKEN_HEADER, [])
    if len(values) > 1:
        raise ProofError("pod_header_duplicate", 401)
    value = values[0].strip() if values else ""
    if not value:
        return None
    if not value.isascii() or not value.isprintable() or " " in value:
        raise ProofError("pod_header_malformed", 401)
    return value


async def _pod_identity(state: State, request: web.Request) -> PodIdentity | None:
    """The verified service account of a pod-bound proof; None without one
    (then refused when pod proofs are required). A pod token sent to a
    server not configured for them is ignored, as any unknown header."""
    if state.pod is None:
        return None
    token = _pod_token_of(request)
    if token is None:
        if state.require_pod_proof:
            raise ProofError("pod_proof_required", 401)
        return None
    return await state.pod.authenticate(token)


def _with_signing_algorithm(
    keys: CPKeys, keys_dir: str | os.PathLike[str], config: TokenServerConfig
) -> CPKeys:
    """Move a key directory to the configured signing algorithm (a rotation)
    when allowed to write there; otherwise keep the key and say so."""
    current = keys.signing.current if keys.signing is not None else None
    if current is None or current.algorithm == config.signing_algorithm:
        return keys
    if config.generate_keys:
        try:
            signing = ensure_signing_algorithm(
                keys_dir, config.signing_algorithm, clock=config.clock
            )
        except KeyFileError as exc:
            _log.warning("cannot rotate the signing key to %s: %s", config.signing_algorithm, exc)
        else:
            return dataclasses.replace(keys, signing=signing)
    _log.warning(
        "signing.pem signs %s but %s is configured: signing with %s "
        "(rotate the key in the key directory to switch)",
        current.algorithm,
        config.signing_algorithm,
        current.algorithm,
    )
    return keys


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
    # A field value excludes surrounding whitespace (RFC 9110 5.5); newer
    # aiohttp strips it, older versions hand it over.
    try:
        return extract_bearer(
            [("authorization", v.strip(" \t")) for v in values], max_token_bytes=_MAX_BEARER_CHARS
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
    version = "?"
    try:
        async with asyncio.timeout(state.request_timeout):
            bearer = _bearer_of(request)
            # Before the decryption: a signature check costs far less.
            pod = await _pod_identity(state, request)
            proof = await state.decode(bearer)
            version = f"v{proof.version}"
            sid = state.rule.validate(proof.session_id)
            if pod is not None and state.pod is not None:
                state.pod.check_binding(pod, sid)
                version = "pod"
            await state.check_replay(proof)
            if state.session_check is not None and not await state.session_check(sid):
                raise ProofError("unknown_session", 403)
            issued = await state.issuer.issue(sid)
    except ProofError as exc:
        if exc.status == 503:
            counters.add("busy", exc.reason)
            _log.warning("token request refused: %s", exc.reason)
            return _text(503, "pod token keys unavailable", {"Retry-After": "5"})
        counters.add("unauthorized" if exc.status == 401 else "forbidden", exc.reason)
        _log.warning(
            "token request refused: status=%d reason=%s session=%r", exc.status, exc.reason, sid
        )
        if exc.status == 401:
            body = {
                "header_missing": "missing bearer proof",
                "pod_proof_required": "pod-bound proof required",
            }.get(exc.reason, "invalid session proof")
            return _text(401, body, {"WWW-Authenticate": "Bearer"})
        return _text(403, "session not allowed")
    except _Busy:
        counters.add("busy")
        state.error_log.log(
            logging.WARNING, "busy", "token request refused: too many pending requests"
        )
        return _text(503, "busy", {"Retry-After": "1"})
    except ReplayStoreUnavailableError as exc:
        counters.add("replay_store_unavailable")
        _log.error("token request refused (503): %s; session=%r", exc, sid)
        return _text(503, "replay store unavailable", {"Retry-After": "1"})
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
    answer = issued.to_json()
    _log.info(
        "issued token for session %r (proof %s, expires %s)", sid, version, answer["expires_at"]
    )
    return web.Response(
        body=json.dumps(answer, separators=(",", ":")).encode("ascii"),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def _handle_token_timed(request: web.Request) -> web.StreamResponse:
    start = time.perf_counter()
    try:
        return await _handle_token(request)
    finally:
        request.app[STATE].metrics.observe_request(time.perf_counter() - start)


async def _handle_metrics(request: web.Request) -> web.StreamResponse:
    # Counts only (see controlplane.metrics): nothing secret, cheap to render.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encode(request.app[STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


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
        PROOF_VERSIONS_FIELD: state.proof_versions.split(","),
    }
    return web.json_response(
        doc, headers={"Cache-Control": f"public, max-age={state.jwks_max_age}"}
    )


async def _advertise(request: web.Request, response: web.StreamResponse) -> None:
    # On every response, so that a runner learns it from /token (and
    # /healthz) even when no discovery document is served (OIDC upstream).
    response.headers[PROOF_VERSIONS_HEADER] = request.app[STATE].proof_versions


async def _cleanup(app: web.Application) -> None:
    state = app[STATE]
    await asyncio.to_thread(state.executor.shutdown, wait=True, cancel_futures=True)
    if state.redis_store is not None:
        state.redis_store.close()


def make_app(state: State, config: TokenServerConfig) -> web.Application:
    app = web.Application(handler_args=http_handler_args(config), client_max_size=64 * 1024)
    app[STATE] = state
    app.router.add_route("*", TOKEN_PATH, _handle_token_timed)
    app.router.add_get(HEALTHZ_PATH, _handle_healthz)
    app.router.add_get(JWKS_PATH, _handle_jwks)
    app.router.add_get(DISCOVERY_PATH, _handle_discovery)
    app.on_response_prepare.append(_advertise)
    app.router.add_get(METRICS_PATH, _handle_metrics)
    app.on_cleanup.append(_cleanup)
    return app
