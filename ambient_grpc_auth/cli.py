"""The ``ambient-grpc-auth`` command line.

Every subcommand exits 0 on success, 2 on usage errors (argparse) and 1 on
failures, printing one line ``ambient-grpc-auth <command>: error: <reason>``
to stderr. Logs go to stderr, results to stdout. Servers shut down gracefully
on SIGINT and SIGTERM. Nothing printed ever contains a token or a key.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import grpc
import jwt

from ambient_grpc_auth import demo
from ambient_grpc_auth._http import TransportError, request_sync, safe_url, validate_http_url
from ambient_grpc_auth._locality import check_url_plaintext
from ambient_grpc_auth._version import __version__
from ambient_grpc_auth.claims import SESSION_ID_CLAIM
from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.channel import AuthenticatedChannel, create_channel_from_env
from ambient_grpc_auth.client.env import resume_after_seq_from_env, token_source_from_env
from ambient_grpc_auth.client.sessions import SessionWatch, push, watch
from ambient_grpc_auth.client.target import DEFAULT_PORT, GRPC_URL_ENV, USE_TLS_ENV
from ambient_grpc_auth.controlplane.app import DISCOVERY_PATH
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.keys import (
    DEFAULT_SIGNING_ALGORITHM,
    SIGNING_ALGORITHMS,
    KeyPaths,
    ensure_keys,
    k8s_secret_manifest,
)
from ambient_grpc_auth.controlplane.oidc_issuer import OidcSettings
from ambient_grpc_auth.controlplane.podproof import (
    DEFAULT_POD_AUDIENCE,
    DEFAULT_SUBJECT_TEMPLATE,
    PodProofSettings,
)
from ambient_grpc_auth.controlplane.server import RunningTokenServer, run_token_server
from ambient_grpc_auth.errors import AmbientAuthError, ConfigurationError
from ambient_grpc_auth.proof import DEFAULT_SESSION_ID_RULE
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.reference.serve import run_session_server
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.authn import (
    K8S_CA_FILE,
    K8S_DEFAULT_JWKS_URL,
    K8S_TOKEN_FILE,
    TrustedIssuer,
)
from ambient_grpc_auth.server.config import (
    API_TOKEN_ENV,
    SERVICE_ACCOUNT_ENV,
    SERVICE_ACCOUNT_ISSUER_ENV,
    OwnerLookup,
    ServerAuthConfig,
)
from ambient_grpc_auth.server.jwks import JwksCache, KeySource, StaticKeySet
from ambient_grpc_auth.server.metrics import MetricsServer, PrometheusMetrics, start_metrics_server

__all__ = ["main"]

PROG = "ambient-grpc-auth"
#: Longest Redis URL read from --replay-redis-url-file.
_MAX_URL_FILE_CHARS = 4096
_log = logging.getLogger(__name__)


class CommandError(Exception):
    """A failure to report as one line with exit code 1."""


def _fail(message: str) -> NoReturn:
    raise CommandError(message)


def _host_port(text: str) -> tuple[str, int]:
    """Parse HOST:PORT (IPv6 as [::1]:PORT)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return host.strip("[]"), port


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


_KEY_FILE_SUFFIXES = (".pem", ".json", ".jwks", ".key", ".crt")


def _looks_like_key_source(text: str) -> bool:
    lower = text.lower()
    return (
        lower.endswith(_KEY_FILE_SUFFIXES)
        or "/jwks" in lower
        or ("://" not in lower and os.path.isfile(text))
    )


def _trust_spec(text: str) -> tuple[str, str | None]:
    """``ISSUER=SOURCE`` or an issuer URL alone (keys found by OIDC discovery).

    Caught here, before anything starts: swapped halves, a SOURCE that is
    neither an http(s) URL nor an existing file, an issuer that is neither a
    URL nor a plain name.
    """
    issuer, sep, source = text.partition("=")
    form = "the form is ISSUER=SOURCE (or an issuer URL alone)"
    if not issuer or (sep and not source):
        raise argparse.ArgumentTypeError(f"expected ISSUER=SOURCE, got {text!r}")
    if _looks_like_key_source(issuer):
        raise argparse.ArgumentTypeError(
            f"{issuer!r} looks like a key source, not an issuer: {form}, issuer first"
        )
    if "://" in issuer:
        try:
            validate_http_url(issuer, what=f"--trust issuer {issuer!r}")
        except ConfigurationError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    elif not issuer.isprintable() or any(c.isspace() or c == "/" for c in issuer):
        raise argparse.ArgumentTypeError(
            f"issuer {issuer!r} is neither an http(s) URL nor a plain name: {form}"
        )
    if not sep:
        if "://" not in issuer:
            raise argparse.ArgumentTypeError(
                f"expected ISSUER=SOURCE, got {text!r}: only an issuer URL may stand "
                "alone (its /.well-known/openid-configuration names the keys)"
            )
        return issuer, None
    if "://" in source:
        try:
            validate_http_url(source, what=f"--trust source {source!r}")
        except ConfigurationError as exc:
            raise argparse.ArgumentTypeError(
                f"{exc}; SOURCE is a JWKS URL, a JWKS JSON file or a PEM public key file"
            ) from None
    elif not os.path.isfile(source):
        raise argparse.ArgumentTypeError(
            f"--trust source {source!r}: no such file (SOURCE is a JWKS URL, "
            "a JWKS JSON file or a PEM public key file)"
        )
    return issuer, source


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in _LOG_LEVELS:
        choices = ", ".join(_LOG_LEVELS)
        raise argparse.ArgumentTypeError(f"expected one of {choices} (any case), got {text!r}")
    return level


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(
            "expected an integer >= 1 (leave --count out to watch until interrupted)"
        )
    return value


def _session_arg(text: str) -> str:
    try:
        return DEFAULT_SESSION_ID_RULE.check(text, what="--session")
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# --------------------------------------------------------------------------- keys


def _cmd_keygen(args: argparse.Namespace) -> int:

    keys = ensure_keys(args.dir)
    if args.k8s_secret:
        sys.stdout.write(k8s_secret_manifest(args.dir, args.namespace))
    else:
        paths = KeyPaths.of(args.dir)
        current = keys.signing.current if keys.signing is not None else None
        kid = f"kid {current.kid}, {current.algorithm}" if current is not None else "-"
        print(f"encryption private key: {paths.private}")
        print(f"encryption public key:  {paths.public}")
        print(f"signing key:            {paths.signing} ({kid})")
    return 0


# --------------------------------------------------------------------------- token server


def _cmd_token_server(args: argparse.Namespace) -> int:

    oidc = None
    oidc_flags = (args.oidc_token_url, args.oidc_client_id, args.oidc_client_secret_file)
    if any(oidc_flags):
        if not all(oidc_flags):
            _fail("--oidc-token-url, --oidc-client-id and --oidc-client-secret-file go together")
        oidc = OidcSettings(
            token_url=args.oidc_token_url,
            client_id=args.oidc_client_id,
            client_secret_file=args.oidc_client_secret_file,
        )
    host, port = args.listen
    public_url = args.public_url
    if public_url is None and port != 0:
        shown = f"[{host}]" if ":" in host else host
        public_url = f"http://{shown}:{port}"
    config = TokenServerConfig(
        keys_dir=args.keys,
        generate_keys=not args.no_generate,
        issuer=args.issuer,
        public_url=public_url,
        audience=tuple(args.audience) if args.audience else TokenServerConfig.audience,
        ttl=args.ttl,
        username=TokenServerConfig.username if args.username is None else args.username or None,
        require_fresh_proof=args.require_fresh_proof,
        session_id_pattern=args.session_pattern,
        oidc=oidc,
        pod_proof=_pod_proof_settings(args),
        require_pod_proof=args.require_pod_proof,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        signing_algorithm=args.signing_alg,
        replay_redis_url=_replay_redis_url(args),
        replay_redis_timeout=args.replay_redis_timeout,
    )

    def ready(server: RunningTokenServer) -> None:
        print(f"token server listening on {server.url}", flush=True)

    run_token_server(config, host, port, ready=ready)
    return 0


def _pod_proof_settings(args: argparse.Namespace) -> PodProofSettings | None:
    if not args.pod_proof_issuer:
        if args.require_pod_proof or args.pod_proof_jwks or args.pod_proof_namespace:
            _fail("the pod-bound proof options need --pod-proof-issuer")
        return None
    source = args.pod_proof_jwks or K8S_DEFAULT_JWKS_URL
    keys: KeySource
    if source.startswith("https://"):
        # In a pod: the API server's JWKS, trusted by the pod's CA, read with its token.
        keys = JwksCache(
            source,
            ca_file=K8S_CA_FILE if os.path.isfile(K8S_CA_FILE) else None,
            bearer_token_file=K8S_TOKEN_FILE if os.path.isfile(K8S_TOKEN_FILE) else None,
        )
    else:
        keys = _key_source(source)
    return PodProofSettings(
        issuer=TrustedIssuer(
            issuer=args.pod_proof_issuer,
            audiences=(args.pod_proof_audience,),
            keys=keys,
            algorithms=("RS256",),
        ),
        subject_template=args.pod_proof_subject,
        namespaces=tuple(args.pod_proof_namespace) if args.pod_proof_namespace else None,
    )


# --------------------------------------------------------------------------- session server


_DISCOVERY_MAX_BYTES = 256 * 1024
_DISCOVERY_TIMEOUT = 10.0


def _discovered_jwks_uri(issuer: str) -> str:
    """The ``jwks_uri`` of ``issuer``'s OIDC discovery document
    (``<issuer>/.well-known/openid-configuration``), whose ``issuer`` must be
    exactly ``issuer`` (OpenID Connect Discovery 1.0, section 4.3)."""
    url = issuer.rstrip("/") + DISCOVERY_PATH
    parts = validate_http_url(url, what=f"discovery URL of issuer {issuer}")
    check_url_plaintext(
        parts,
        allow_remote=False,
        sending="key discovery requests",
        what="issuer",
        allow_flag="--trust ISSUER=SOURCE with a local key file",
    )
    shown = safe_url(parts)
    try:
        response = request_sync(
            url,
            {"Accept": "application/json"},
            time_limit=_DISCOVERY_TIMEOUT,
            max_bytes=_DISCOVERY_MAX_BYTES,
        )
    except TransportError as exc:
        _fail(f"cannot fetch the discovery document of {issuer} at {shown}: {exc.description}")
    if response.status != 200:
        _fail(f"the discovery document of {issuer} at {shown} answered HTTP {response.status}")
    try:
        doc = json.loads(response.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        _fail(f"{shown} is not an OIDC discovery document (not a JSON object)")
    if doc.get("issuer") != issuer:
        _fail(
            f"the discovery document at {shown} names issuer {doc.get('issuer')!r}, "
            f"not {issuer!r}: tokens from it would carry that issuer; trust it by that name"
        )
    jwks_uri = doc.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri:
        _fail(f"the discovery document at {shown} has no jwks_uri")
    return jwks_uri


def _key_source(source: str, metrics: PrometheusMetrics | None = None) -> KeySource:

    if source.startswith(("http://", "https://")):
        return JwksCache(source, metrics=metrics)
    try:
        with open(source, "rb") as fh:
            head = fh.read(64).lstrip()
    except OSError as exc:
        _fail(f"cannot read key source {source}: {exc.strerror}")
    if head.startswith(b"{"):
        return StaticKeySet.from_jwks_file(source)
    return StaticKeySet.from_pem_files([source])


def _replay_redis_url(args: argparse.Namespace) -> str | None:
    """The Redis URL from ``--replay-redis-url`` or ``--replay-redis-url-file``
    (a mounted Secret: the password stays out of the process list)."""
    if args.replay_redis_url_file is None:
        url: str | None = args.replay_redis_url
        if url is not None and urllib.parse.urlsplit(url).password:
            print(
                f"{PROG}: warning: the Redis password in --replay-redis-url is visible to "
                "anyone who can list processes; use --replay-redis-url-file",
                file=sys.stderr,
            )
        return url
    if args.replay_redis_url is not None:
        _fail("use --replay-redis-url or --replay-redis-url-file, not both")
    try:
        with open(args.replay_redis_url_file, encoding="utf-8") as fh:
            url = fh.read(_MAX_URL_FILE_CHARS + 1).strip()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read --replay-redis-url-file: {getattr(exc, 'strerror', None) or exc}")
    if not url or len(url) > _MAX_URL_FILE_CHARS or any(c.isspace() for c in url):
        _fail("--replay-redis-url-file must hold one Redis URL")
    return url


def _server_auth_config(
    args: argparse.Namespace,
    owner_lookup: OwnerLookup,
    metrics: PrometheusMetrics | None = None,
) -> ServerAuthConfig:

    environ = dict(os.environ)
    if args.service_token_file:
        try:
            with open(args.service_token_file, encoding="utf-8") as fh:
                environ[API_TOKEN_ENV] = fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"cannot read --service-token-file: {getattr(exc, 'strerror', None) or exc}")
    audiences = tuple(args.audience) if args.audience else ("ambient-api-server",)
    control_planes = set(args.control_plane_issuer or ())
    trusted = [issuer for issuer, _ in args.trust or ()]
    unknown = control_planes - set(trusted)
    if unknown:
        _fail(f"--control-plane-issuer {sorted(unknown)[0]!r} is not among the --trust issuers")
    issuers = [
        TrustedIssuer(
            issuer=issuer,
            audiences=audiences,
            keys=_key_source(
                source if source is not None else _discovered_jwks_uri(issuer), metrics
            ),
            # Only issuers named explicitly mint session-scoped runner tokens;
            # runner claims from any other issuer are ignored (see policy).
            control_plane=issuer in control_planes,
        )
        for issuer, source in args.trust or ()
    ]
    return ServerAuthConfig.from_env(
        environ=environ,
        issuers=issuers,
        service_accounts=args.service_account or (),
        service_account_issuer=args.service_account_issuer,
        service_account_patterns=args.service_account_pattern or (),
        owner_lookup=owner_lookup,
        default_owner_issuer=args.default_owner_issuer,
        metrics=metrics,
    )


def _binding(text: str) -> str | tuple[str, str]:
    """``ISSUER=NAME`` as a pair; a bare ``NAME`` as is (bound later to the
    default service-account issuer)."""
    issuer, sep, name = text.partition("=")
    if not sep:
        return text
    if not issuer or not name:
        raise argparse.ArgumentTypeError(f"expected ISSUER=NAME or NAME, got {text!r}")
    return issuer, name


def _server_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    if bool(args.tls_cert) != bool(args.tls_key):
        _fail("--tls-cert and --tls-key go together")
    if not args.tls_cert:
        return None
    try:
        with open(args.tls_cert, "rb") as c, open(args.tls_key, "rb") as k:
            return grpc.ssl_server_credentials([(k.read(), c.read())])
    except OSError as exc:
        _fail(f"cannot read TLS files: {exc.strerror}")


def _serve_metrics(metrics: PrometheusMetrics, listen: tuple[str, int]) -> MetricsServer:
    try:
        return start_metrics_server(metrics.registry, *listen)
    except OSError as exc:
        _fail(f"cannot serve metrics on {listen[0]}:{listen[1]}: {exc.strerror or exc}")


def _cmd_session_server(args: argparse.Namespace) -> int:

    store = SessionStore(args.db)
    metrics = PrometheusMetrics() if args.metrics_listen is not None else None
    endpoint: MetricsServer | None = None
    try:
        if metrics is not None:
            endpoint = _serve_metrics(metrics, args.metrics_listen)
        config = _server_auth_config(args, store.owner_of, metrics)
        host, port = args.listen
        shown = f"[{host}]" if ":" in host else host

        def ready(bound: int) -> None:
            print(f"session server listening on {shown}:{bound}", flush=True)
            if endpoint is not None:
                print(f"metrics on {endpoint.url}", flush=True)

        run_session_server(
            store,
            config,
            f"{shown}:{port}",
            use_aio=args.aio,
            server_credentials=_server_credentials(args),
            reflection=not args.no_reflection,
            ready=ready,
        )
    finally:
        if endpoint is not None:
            endpoint.close()
        store.close()
    return 0


# --------------------------------------------------------------------------- runner tools


def _runner_channel(args: argparse.Namespace) -> tuple[AuthenticatedChannel, CachingTokenSource]:

    allow = bool(getattr(args, "allow_insecure_remote", False))
    source = token_source_from_env(allow_insecure_remote=allow)
    # Kept for the hints of a failed call (see _hint).
    args.token_source = source
    return create_channel_from_env(source, allow_insecure_remote=allow), source


def _own_claims(source: object) -> dict[str, Any] | None:
    """The claims of the runner's own token, read without verifying it (only
    to explain a refusal; never printed whole, never the token). Uses the
    cached token, else fetches one; None when there is none or it is no JWT."""
    if not isinstance(source, CachingTokenSource):
        return None
    token = source.peek()
    if token is None:
        try:
            token = source.get_token()
        except AmbientAuthError:
            return None
    try:
        claims = jwt.decode(token.value, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    return claims if isinstance(claims, dict) else None


def _hint(args: argparse.Namespace, code: grpc.StatusCode | None) -> str:
    """What probably went wrong, from the caller's side. The server's details
    are fixed strings (saying why would help an attacker); the runner may
    compare its own token's claims with what it asked for."""
    session = getattr(args, "session", None)
    if code is grpc.StatusCode.NOT_FOUND and session:
        return (
            f"session {session!r} does not exist on this server "
            "(create-session prints the id of a new session)"
        )
    if code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return ""
    source = getattr(args, "token_source", None)
    claims = _own_claims(source)
    if code is grpc.StatusCode.UNAUTHENTICATED:
        if claims is None:
            return (
                "the server did not accept the token; a BOT_TOKEN must equal the "
                "server's static service token (--service-token-file / AMBIENT_API_TOKEN)"
            )
        return (
            f"the server did not accept a token of issuer {claims.get('iss')!r} for "
            f"audience {claims.get('aud')!r}: does the session server --trust that "
            "issuer (and accept that --audience)?"
        )
    scope = claims.get(SESSION_ID_CLAIM) if claims is not None else None
    if isinstance(scope, str) and session and scope != session:
        return (
            f"the token is scoped to session {scope!r}, not {session!r}: "
            "SESSION_ID must be the session you push to or watch"
        )
    if isinstance(scope, str) and not session:
        return f"the token is scoped to session {scope!r} and may only use that session"
    if isinstance(scope, str):
        return (
            "the token is scoped to this session, but the server refused it: is its "
            "issuer a --control-plane-issuer of the session server?"
        )
    if claims is not None and session:
        return f"{claims.get('sub')!r} does not own session {session!r}"
    return ""


def _message_json(message: object) -> str:

    assert isinstance(message, sessions_pb2.SessionMessage)
    created = message.created_at.ToJsonString() if message.HasField("created_at") else None
    return json.dumps(
        {
            "seq": message.seq,
            "event_type": message.event_type,
            "payload": message.payload,
            "created_at": created,
            "id": message.id,
            "session_id": message.session_id,
        }
    )


def _cmd_create_session(args: argparse.Namespace) -> int:

    channel, _ = _runner_channel(args)
    with channel:
        stub = sessions_pb2_grpc.SessionServiceStub(channel)  # type: ignore[no-untyped-call]
        request = sessions_pb2.CreateSessionRequest(name=args.name)
        if args.project:
            request.project_id = args.project
        session = stub.CreateSession(request, timeout=args.timeout)
    print(
        json.dumps(
            {
                "id": session.metadata.id,
                "name": session.name,
                "created_by_user_id": session.created_by_user_id
                if session.HasField("created_by_user_id")
                else None,
            }
        )
    )
    return 0


def _cmd_push(args: argparse.Namespace) -> int:

    channel, _ = _runner_channel(args)
    with channel:
        message = push(channel, args.session, args.event_type, args.payload, timeout=args.timeout)
    print(_message_json(message))
    return 0


#: Rejected credentials this many times in a row, each time with a freshly
#: fetched token: the server will not accept this runner's tokens.
WATCH_UNAUTHENTICATED_LIMIT = 3
#: After --timeout, how long the watch may take to wind down (a token fetch
#: in progress cannot be interrupted) before the process exits anyway.
_WATCH_STOP_GRACE = 2.0


def _failure_text(err: BaseException | None) -> str:
    if err is None:
        return "the server ended the stream"
    if isinstance(err, grpc.Call):
        code = err.code()
        return f"{code.name if code is not None else 'UNKNOWN'}: {err.details() or 'call failed'}"
    return type(err).__name__


class _WatchReport:
    """What ``watch`` tells the user while it retries: the first failure of
    a streak at once (and each change of failure), one line on stderr; gives
    up (CommandError) on credentials rejected again and again."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args
        self._shown: str | None = None
        self.unauthenticated = 0
        self.failing: str | None = None

    def delivered(self) -> None:
        self._shown = None
        self.failing = None
        self.unauthenticated = 0

    def on_retry(self, err: BaseException | None, delay: float) -> None:
        text = _failure_text(err)
        self.failing = text
        from_server = isinstance(err, grpc.Call) and getattr(err, "token_error", None) is None
        if from_server and isinstance(err, grpc.Call):
            if err.code() is grpc.StatusCode.UNAUTHENTICATED:
                self.unauthenticated += 1
            else:
                self.unauthenticated = 0
        if self.unauthenticated >= WATCH_UNAUTHENTICATED_LIMIT:
            hint = _hint(self._args, grpc.StatusCode.UNAUTHENTICATED)
            _fail(
                f"UNAUTHENTICATED {self.unauthenticated} times in a row with fresh tokens"
                + (f": {hint}" if hint else "")
            )
        if text != self._shown:
            self._shown = text
            print(f"{PROG} watch: {text} (retrying)", file=sys.stderr, flush=True)


def _cmd_watch(args: argparse.Namespace) -> int:

    after = args.after_seq if args.after_seq is not None else resume_after_seq_from_env()
    channel, _ = _runner_channel(args)
    received = 0
    report = _WatchReport(args)
    timed_out = threading.Event()
    with channel:
        stream = watch(channel, args.session, after_seq=after, on_retry=report.on_retry)
        timer = _watch_timer(args.timeout, stream, timed_out)
        try:
            for message in stream:
                report.delivered()
                if args.json:
                    print(_message_json(message), flush=True)
                else:
                    print(f"{message.seq}\t{message.event_type}\t{message.payload}", flush=True)
                received += 1
                if args.count is not None and received >= args.count:
                    break
        finally:
            stream.close()
            if timer is not None:
                timer.cancel()
    if timed_out.is_set():
        if args.count is not None and received < args.count:
            _fail(_timeout_text(args.timeout, f"{received} of {args.count} messages received"))
        if report.failing is not None:
            _fail(_timeout_text(args.timeout, f"last failure: {report.failing}"))
    return 0


def _timeout_text(timeout: float, what: str) -> str:
    return f"DEADLINE_EXCEEDED: --timeout {timeout:g}s reached; {what}"


def _watch_timer(
    timeout: float | None, stream: SessionWatch, timed_out: threading.Event
) -> threading.Timer | None:
    """Close ``stream`` after ``timeout`` seconds. A token fetch in progress
    cannot be interrupted: if the watch has not ended shortly after, the
    process exits (1) from here, so that --timeout bounds the whole run."""
    if timeout is None:
        return None

    def expire() -> None:
        timed_out.set()
        stream.close()
        time.sleep(_WATCH_STOP_GRACE)
        sys.stdout.flush()
        print(
            f"{PROG} watch: error: {_timeout_text(timeout, 'the watch did not stop in time')}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    return timer


def _rfc3339(moment: float | None) -> str | None:
    if moment is None:
        return None

    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


def _cmd_fetch_token(args: argparse.Namespace) -> int:
    allow = bool(getattr(args, "allow_insecure_remote", False))
    token = token_source_from_env(allow_insecure_remote=allow).get_token()
    try:
        claims = jwt.decode(token.value, options={"verify_signature": False})
    except jwt.PyJWTError:
        claims = {}

    info = {
        "issuer": claims.get("iss"),
        "subject": claims.get("sub"),
        "audience": claims.get("aud"),
        "session_scope": claims.get(SESSION_ID_CLAIM),
        "expires_at": _rfc3339(token.expires_at),
        "length": len(token.value),
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key}: {value if value is not None else '-'}")
    return 0


# --------------------------------------------------------------------------- delegated


def _cmd_demo(args: argparse.Namespace) -> int:
    return demo.main(list(args.rest))


# --------------------------------------------------------------------------- help texts


class _Parser(argparse.ArgumentParser):
    """Usage errors in two lines: the error, and where the full usage is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nusage: see `{self.prog} --help`\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and shows every real default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or not action.option_strings
            or default is None
            or default is False
            or default == argparse.SUPPRESS
        ):
            return text
        if isinstance(default, tuple) and len(default) == 2:  # HOST:PORT
            return f"{text} (default: {default[0]}:{default[1]})"
        return f"{text} (default: %(default)s)"


_SESSION_HELP = (
    f"session id: {DEFAULT_SESSION_ID_RULE.describe()} (checked before any network call)"
)
_RUNNER_ENV_ROWS = (
    (GRPC_URL_ENV, "API server HOST:PORT (default ambient-api-server:9000;"),
    ("", f"a host without a port gets port {DEFAULT_PORT})"),
    (USE_TLS_ENV, "true/false (default false); without TLS only loopback and"),
    ("", "cluster-local hosts, unless --allow-insecure-remote"),
    ("AMBIENT_GRPC_CA_CERT_FILE", "PEM roots for TLS"),
    ("AMBIENT_CP_TOKEN_URL", "control-plane /token URL; with it, tokens come from the"),
    ("", "control plane and need AMBIENT_CP_TOKEN_PUBLIC_KEY (PEM)"),
    ("", "and SESSION_ID (the session this runner runs)"),
    ("BOT_TOKEN", "static token, used when AMBIENT_CP_TOKEN_URL is unset"),
    ("", "(last fallback: the pod's service-account token file)"),
)


def _runner_env(*extra: tuple[str, str]) -> str:
    rows = (*extra, *_RUNNER_ENV_ROWS)
    return "environment (the runner contract):\n" + "\n".join(
        f"  {name:<27}{text}" for name, text in rows
    )


_RUNNER_ENV = _runner_env()

#: (group title, commands) for the top-level help, in order.
_GROUPS = (
    ("control plane", ("keygen", "token-server")),
    ("API server", ("session-server",)),
    ("runner (configured by the runner environment)", ("create-session", "push", "watch")),
    ("tools", ("fetch-token", "demo")),
)

#: command -> (description, epilog: examples and environment).
_DOCS: dict[str, tuple[str, str]] = {
    "keygen": (
        "Create the control-plane keys in DIR if missing (never overwritten, mode 0600): "
        "private.pem (RSA PKCS#1), public.pem (SPKI, what runners get) and signing.pem.",
        "examples:\n  ambient-grpc-auth keygen --dir ./cp-keys\n"
        "  ambient-grpc-auth keygen --dir ./cp-keys --k8s-secret --namespace ambient"
        " | kubectl apply -f -\n\nenvironment: none",
    ),
    "token-server": (
        "Run the control plane's GET /token endpoint (session proof in, short-lived JWT "
        "out), with /healthz, /.well-known/jwks.json and /.well-known/openid-configuration.",
        "examples:\n  ambient-grpc-auth token-server --keys ./cp-keys --listen 127.0.0.1:8080\n"
        "  ambient-grpc-auth token-server --keys /keys --listen 0.0.0.0:8080 "
        "--issuer https://cp.example\n\nenvironment: none (everything is a flag)",
    ),
    "session-server": (
        "Run the reference ambient.v1.SessionService (SQLite) behind the auth interceptor. "
        "A port already in use is refused.",
        "--trust forms:\n"
        "  ISSUER=SOURCE   SOURCE is a JWKS URL, a JWKS JSON file or a PEM public key file\n"
        "  ISSUER-URL      the keys are found through ISSUER-URL/.well-known/openid-configuration\n"
        "\nexamples:\n"
        "  ambient-grpc-auth session-server --db sessions.db --listen 127.0.0.1:9000 \\\n"
        "      --trust http://127.0.0.1:8080 --service-token-file service.token\n"
        "  ambient-grpc-auth session-server --db sessions.db \\\n"
        "      --trust https://cp.example=https://cp.example/.well-known/jwks.json --aio\n"
        "\nenvironment:\n"
        f"  {API_TOKEN_ENV}   static service token (--service-token-file wins)\n"
        f"  {SERVICE_ACCOUNT_ENV}   username treated as a service caller "
        "(--service-account wins)\n"
        f"  {SERVICE_ACCOUNT_ISSUER_ENV}   the issuer that may assert it "
        "(--service-account-issuer wins)",
    ),
    "create-session": (
        "Create a session on the API server and print it as JSON; its id is what a "
        "runner's SESSION_ID and --session name. Usually run with the service token "
        "(BOT_TOKEN): a runner token is scoped to one existing session.",
        "example:\n"
        "  BOT_TOKEN=$(cat service.token) ambient-grpc-auth create-session --name demo\n\n"
        + _RUNNER_ENV,
    ),
    "push": (
        "Push one message to a session and print it as stored (JSON, with its seq). "
        "Never retried on UNAVAILABLE: the server may have stored it.",
        'example:\n  ambient-grpc-auth push --session "$SESSION_ID" --event-type assistant '
        "--payload hello\n\n" + _RUNNER_ENV,
    ),
    "watch": (
        "Print a session's messages (seq, event type, payload), replaying those after "
        "--after-seq, then live ones, across token expiry, reconnects and server restarts. "
        "The first failure of a streak is printed at once on stderr; failures that can heal "
        "(UNAVAILABLE, an unreachable control plane) are retried until --timeout; "
        "PERMISSION_DENIED, NOT_FOUND, a refused session proof and "
        f"{WATCH_UNAUTHENTICATED_LIMIT} UNAUTHENTICATED in a row end it with exit 1.",
        'examples:\n  ambient-grpc-auth watch --session "$SESSION_ID" --json\n'
        '  ambient-grpc-auth watch --session "$SESSION_ID" --count 3 --timeout 30\n\n'
        "environment: RESUME_AFTER_SEQ (the default of --after-seq, else 0), and\n" + _RUNNER_ENV,
    ),
    "fetch-token": (
        "Fetch a token the way a runner does and print its issuer, subject, audience, "
        "session scope and expiry (never the token).",
        "example:\n  ambient-grpc-auth fetch-token --json\n\n" + _RUNNER_ENV,
    ),
}

_RUNNER_COMMANDS = ("create-session", "push", "watch", "fetch-token")

#: Help for options declared without one (so that their defaults show too).
_OPTION_HELP = {
    "timeout": "deadline of the call, seconds",
    "name": "session name",
    "project": "project id of the session",
    "event_type": "event type of the message (e.g. assistant, user)",
    "payload": "message text",
    "after_seq": "replay messages after this seq",
    "json": "print JSON",
    "oidc_token_url": "upstream SSO token URL (client-credentials grant)",
    "oidc_client_id": "client id at the upstream SSO",
    "oidc_client_secret_file": "file holding the client secret",
    "service_account_pattern": "service-account usernames treated as service callers",
    "tls_cert": "PEM certificate chain (with --tls-key: serve TLS)",
    "tls_key": "PEM private key of --tls-cert",
}


def _document(parser: argparse.ArgumentParser, sub: Any) -> None:
    """Group the commands in the top-level help; give each command its
    description, examples and environment, ``--log-level`` (also accepted
    after the command) and, for runner commands, ``--allow-insecure-remote``."""
    summaries = {action.dest: action.help or "" for action in sub._choices_actions}
    # The grouped list below replaces argparse's flat one.
    sub._choices_actions.clear()
    sub.help = "one of the commands below"
    lines = ["commands:"]
    for title, names in _GROUPS:
        lines.append(f"  {title}:")
        lines += [f"    {name:<16}{summaries.get(name, '')}" for name in names]
    lines.append(f"\nRun `{PROG} COMMAND --help` for its options, examples and environment.")
    lines.append("Exit codes: 0 success, 1 failure (one line on stderr), 2 usage error.")
    parser.epilog = "\n".join(lines)
    for name, command in sub.choices.items():
        if name not in _DOCS:
            continue
        description, command.epilog = _DOCS[name]
        command.description = textwrap.fill(description, width=79)
        command.formatter_class = _HelpFormatter
        for action in command._actions:
            if action.help is None and action.dest in _OPTION_HELP:
                action.help = _OPTION_HELP[action.dest]
        command.add_argument(
            "--log-level",
            type=_log_level,
            default=argparse.SUPPRESS,
            help="logging level for stderr (also accepted before the command)",
        )
        if name in _RUNNER_COMMANDS:
            command.add_argument(
                "--allow-insecure-remote",
                action="store_true",
                help="allow plaintext (no TLS) to an API server or control plane that is "
                "neither loopback nor cluster-local",
            )


# --------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Authentication for ambient session-message gRPC streams.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default=None,
        help="logging level for stderr (default: INFO for servers, ERROR for one-shot commands)",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("keygen", help="create the control-plane keys if missing")
    p.add_argument(
        "--dir", required=True, help="key directory (private.pem, public.pem, signing.pem)"
    )
    p.add_argument("--k8s-secret", action="store_true", help="print the Secret manifest")
    p.add_argument("--namespace", help="namespace for the Secret manifest")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("token-server", help="run the control-plane /token endpoint")
    p.add_argument("--keys", required=True, help="key directory (same layout as the Secret)")
    p.add_argument("--listen", type=_host_port, default=("127.0.0.1", 8080), help="HOST:PORT")
    p.add_argument("--issuer", help="the `iss` of issued tokens (default: the public URL)")
    p.add_argument("--public-url", help="URL the server is reached at (JWKS discovery)")
    p.add_argument("--audience", action="append", help="`aud` of issued tokens (repeatable)")
    p.add_argument("--ttl", type=_positive_float, default=900.0, help="token lifetime, seconds")
    p.add_argument(
        "--username",
        help="`preferred_username` of issued tokens, for the platform's API server"
        " (default: ambient-runner; '' leaves it out)",
    )
    p.add_argument("--require-fresh-proof", action="store_true", help="refuse v1 proofs")
    p.add_argument("--session-pattern", help="regex a session id must fully match")
    p.add_argument("--no-generate", action="store_true", help="never generate missing keys")
    p.add_argument("--oidc-token-url")
    p.add_argument("--oidc-client-id")
    p.add_argument("--oidc-client-secret-file")
    p.add_argument("--pod-proof-issuer", help="cluster service-account issuer: accept pod proofs")
    p.add_argument("--pod-proof-jwks", help="its keys: JWKS URL or file (default: the API server)")
    p.add_argument("--pod-proof-audience", default=DEFAULT_POD_AUDIENCE)
    p.add_argument("--pod-proof-subject", default=DEFAULT_SUBJECT_TEMPLATE, metavar="TEMPLATE")
    p.add_argument("--pod-proof-namespace", action="append", metavar="NS", help="(repeatable)")
    p.add_argument("--require-pod-proof", action="store_true", help="refuse v1/v2 alone")
    p.add_argument("--max-connections", type=int, default=1024, help="connections served at once")
    p.add_argument(
        "--header-timeout", type=_positive_float, default=10.0, help="seconds to send a request"
    )
    p.add_argument(
        "--signing-alg",
        choices=SIGNING_ALGORITHMS,
        default=DEFAULT_SIGNING_ALGORITHM,
        help="algorithm of issued tokens; a signing key of another type is rotated",
    )
    p.add_argument("--replay-redis-url", help="share v2 replay protection via Redis (replicas)")
    p.add_argument(
        "--replay-redis-url-file",
        metavar="FILE",
        help="read the Redis URL from FILE (keeps a password out of the process list)",
    )
    p.add_argument(
        "--replay-redis-timeout", type=_positive_float, default=0.5, help="Redis timeout, s"
    )
    p.set_defaults(func=_cmd_token_server)

    p = sub.add_parser("session-server", help="run the reference SessionService with auth")
    p.add_argument("--listen", type=_host_port, default=("127.0.0.1", 9000), help="HOST:PORT")
    p.add_argument("--db", required=True, help="SQLite file (or :memory:)")
    p.add_argument(
        "--trust",
        type=_trust_spec,
        action="append",
        metavar="ISSUER=SOURCE",
        help="trusted JWT issuer; SOURCE is a JWKS URL, JWKS JSON file or PEM file",
    )
    p.add_argument(
        "--control-plane-issuer",
        action="append",
        metavar="ISSUER",
        help="a --trust issuer that mints session-scoped runner tokens (repeatable); "
        "runner claims from any other issuer are ignored (default: none)",
    )
    p.add_argument("--audience", action="append", help="accepted `aud` (repeatable)")
    p.add_argument("--service-token-file", help="file holding the static service token")
    p.add_argument(
        "--service-account",
        type=_binding,
        action="append",
        metavar="[ISSUER=]NAME",
        help="a service caller: NAME from ISSUER (repeatable; adds to GRPC_SERVICE_ACCOUNT); "
        "a bare NAME is bound to --service-account-issuer",
    )
    p.add_argument(
        "--service-account-pattern",
        type=_binding,
        action="append",
        metavar="[ISSUER=]GLOB",
        help="service callers: usernames from ISSUER matching GLOB (repeatable); "
        "a bare GLOB is bound to --service-account-issuer",
    )
    p.add_argument(
        "--service-account-issuer",
        metavar="ISSUER",
        help="issuer of bare service-account names and globs (default: "
        "GRPC_SERVICE_ACCOUNT_ISSUER, else the Kubernetes issuer when trusted)",
    )
    p.add_argument(
        "--default-owner-issuer",
        metavar="ISSUER",
        help="issuer of session owners stored without one (sessions from older versions; "
        "default: the first --trust issuer not named by --control-plane-issuer)",
    )
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--aio", action="store_true", help="serve with grpc.aio")
    p.add_argument("--no-reflection", action="store_true", help="do not serve server reflection")
    p.add_argument(
        "--metrics-listen",
        type=_host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP on HOST:PORT (GET /metrics)",
    )
    p.set_defaults(func=_cmd_session_server)

    p = sub.add_parser("create-session", help="create a session (runner environment)")
    p.add_argument("--name", required=True)
    p.add_argument("--project")
    p.add_argument("--timeout", type=_positive_float, default=10.0)
    p.set_defaults(func=_cmd_create_session)

    p = sub.add_parser("push", help="push one session message (runner environment)")
    p.add_argument("--session", required=True, type=_session_arg, help=_SESSION_HELP)
    p.add_argument("--event-type", required=True)
    p.add_argument("--payload", required=True)
    p.add_argument("--timeout", type=_positive_float, default=10.0)
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("watch", help="watch session messages (runner environment)")
    p.add_argument("--session", required=True, type=_session_arg, help=_SESSION_HELP)
    p.add_argument("--after-seq", type=_non_negative_int)
    p.add_argument(
        "--count", type=_positive_int, help="exit 0 after N messages (N >= 1; default: no limit)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        help="stop after this many seconds; exit 1 if --count was not reached or the "
        "watch was failing then (default: none)",
    )
    p.set_defaults(func=_cmd_watch)

    p = sub.add_parser("fetch-token", help="fetch a token as a runner does; print its claims")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_fetch_token)

    # The demo parses its own arguments (``demo --help`` shows them).
    p = sub.add_parser("demo", help="the end-to-end demo on loopback", add_help=False)
    p.set_defaults(func=_cmd_demo, delegated=True)
    _document(parser, sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "delegated", False):
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    servers = {"token-server", "session-server"}
    _setup_logging(args.log_level or ("INFO" if args.command in servers else "ERROR"))
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except CommandError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        name = code.name if code is not None else "UNKNOWN"
        details = exc.details() if isinstance(exc, grpc.Call) else ""
        hint = _hint(args, code) if getattr(exc, "token_error", None) is None else ""
        line = f"{name}: {details or 'call failed'}" + (f" ({hint})" if hint else "")
        print(f"{PROG} {args.command}: error: {_cli_wording(line)}", file=sys.stderr)
        return 1
    except (AmbientAuthError, OSError, ValueError) as exc:
        # Our exceptions never carry token material (errors.py).
        print(f"{PROG} {args.command}: error: {_cli_wording(str(exc))}", file=sys.stderr)
        return 1


def _cli_wording(message: str) -> str:
    """Library messages name the library's switches; here the CLI's apply."""
    return message.replace("pass allow_insecure_remote=True", "pass --allow-insecure-remote")


if __name__ == "__main__":
    sys.exit(main())
