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
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import NoReturn

import grpc

from ambient_grpc_auth import demo
from ambient_grpc_auth.claims import SESSION_ID_CLAIM
from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.channel import AuthenticatedChannel, create_channel_from_env
from ambient_grpc_auth.client.env import resume_after_seq_from_env, token_source_from_env
from ambient_grpc_auth.client.sessions import push, watch
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.keys import (
    DEFAULT_SIGNING_ALGORITHM,
    SIGNING_ALGORITHMS,
    KeyPaths,
    ensure_keys,
    k8s_secret_manifest,
)
from ambient_grpc_auth.controlplane.oidc_issuer import OidcSettings
from ambient_grpc_auth.controlplane.server import RunningTokenServer, run_token_server
from ambient_grpc_auth.errors import AmbientAuthError
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.reference.serve import run_session_server
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.config import API_TOKEN_ENV, SERVICE_ACCOUNT_ENV, ServerAuthConfig
from ambient_grpc_auth.server.jwks import JwksCache, KeySource, StaticKeySet

__all__ = ["main"]

PROG = "ambient-grpc-auth"
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


def _trust_spec(text: str) -> tuple[str, str]:
    issuer, sep, source = text.partition("=")
    if not sep or not issuer or not source:
        raise argparse.ArgumentTypeError(f"expected ISSUER=SOURCE, got {text!r}")
    return issuer, source


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
        require_fresh_proof=args.require_fresh_proof,
        session_id_pattern=args.session_pattern,
        oidc=oidc,
        signing_algorithm=args.signing_alg,
        replay_redis_url=args.replay_redis_url,
        replay_redis_timeout=args.replay_redis_timeout,
    )

    def ready(server: RunningTokenServer) -> None:
        print(f"token server listening on {server.url}", flush=True)

    run_token_server(config, host, port, ready=ready)
    return 0


# --------------------------------------------------------------------------- session server


def _key_source(source: str) -> KeySource:

    if source.startswith(("http://", "https://")):
        return JwksCache(source)
    try:
        with open(source, "rb") as fh:
            head = fh.read(64).lstrip()
    except OSError as exc:
        _fail(f"cannot read key source {source}: {exc.strerror}")
    if head.startswith(b"{"):
        return StaticKeySet.from_jwks_file(source)
    return StaticKeySet.from_pem_files([source])


def _server_auth_config(
    args: argparse.Namespace, owner_lookup: Callable[[str], str | None]
) -> ServerAuthConfig:

    environ = dict(os.environ)
    if args.service_token_file:
        try:
            with open(args.service_token_file, encoding="utf-8") as fh:
                environ[API_TOKEN_ENV] = fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"cannot read --service-token-file: {getattr(exc, 'strerror', None) or exc}")
    if args.service_account:
        environ[SERVICE_ACCOUNT_ENV] = args.service_account
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
            keys=_key_source(source),
            # Without an explicit choice, every trusted issuer may mint
            # session-scoped runner tokens (the claim decides, see policy).
            control_plane=not control_planes or issuer in control_planes,
        )
        for issuer, source in args.trust or ()
    ]
    return ServerAuthConfig.from_env(
        environ=environ,
        issuers=issuers,
        service_account_patterns=args.service_account_pattern or (),
        owner_lookup=owner_lookup,
    )


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


def _cmd_session_server(args: argparse.Namespace) -> int:

    store = SessionStore(args.db)
    try:
        config = _server_auth_config(args, store.owner_of)
        host, port = args.listen
        shown = f"[{host}]" if ":" in host else host
        run_session_server(
            store,
            config,
            f"{shown}:{port}",
            use_aio=args.aio,
            server_credentials=_server_credentials(args),
            ready=lambda bound: print(f"session server listening on {shown}:{bound}", flush=True),
        )
    finally:
        store.close()
    return 0


# --------------------------------------------------------------------------- runner tools


def _runner_channel() -> tuple[AuthenticatedChannel, CachingTokenSource]:

    source = token_source_from_env()
    return create_channel_from_env(source), source


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

    channel, _ = _runner_channel()
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

    channel, _ = _runner_channel()
    with channel:
        message = push(channel, args.session, args.event_type, args.payload, timeout=args.timeout)
    print(_message_json(message))
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:

    after = args.after_seq if args.after_seq is not None else resume_after_seq_from_env()
    channel, _ = _runner_channel()
    received = 0
    with channel:
        stream = watch(channel, args.session, after_seq=after)
        try:
            for message in stream:
                if args.json:
                    print(_message_json(message), flush=True)
                else:
                    print(f"{message.seq}\t{message.event_type}\t{message.payload}", flush=True)
                received += 1
                if args.count is not None and received >= args.count:
                    break
        finally:
            stream.close()
    return 0


def _rfc3339(moment: float | None) -> str | None:
    if moment is None:
        return None

    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


def _cmd_fetch_token(args: argparse.Namespace) -> int:
    import jwt

    token = token_source_from_env().get_token()
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


# --------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Authentication for ambient session-message gRPC streams.",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        help="logging level for stderr (default: INFO for servers, ERROR for one-shot commands)",
    )
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
    p.add_argument("--require-fresh-proof", action="store_true", help="refuse v1 proofs")
    p.add_argument("--session-pattern", help="regex a session id must fully match")
    p.add_argument("--no-generate", action="store_true", help="never generate missing keys")
    p.add_argument("--oidc-token-url")
    p.add_argument("--oidc-client-id")
    p.add_argument("--oidc-client-secret-file")
    p.add_argument(
        "--signing-alg",
        choices=SIGNING_ALGORITHMS,
        default=DEFAULT_SIGNING_ALGORITHM,
        help="algorithm of issued tokens; a signing key of another type is rotated",
    )
    p.add_argument("--replay-redis-url", help="share v2 replay protection via Redis (replicas)")
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
        help="issuer whose runner tokens are session-scoped (default: every --trust issuer)",
    )
    p.add_argument("--audience", action="append", help="accepted `aud` (repeatable)")
    p.add_argument("--service-token-file", help="file holding the static service token")
    p.add_argument("--service-account", help="username treated as a service caller")
    p.add_argument("--service-account-pattern", action="append", metavar="GLOB")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--aio", action="store_true", help="serve with grpc.aio")
    p.set_defaults(func=_cmd_session_server)

    p = sub.add_parser("create-session", help="create a session (runner environment)")
    p.add_argument("--name", required=True)
    p.add_argument("--project")
    p.add_argument("--timeout", type=_positive_float, default=10.0)
    p.set_defaults(func=_cmd_create_session)

    p = sub.add_parser("push", help="push one session message (runner environment)")
    p.add_argument("--session", required=True)
    p.add_argument("--event-type", required=True)
    p.add_argument("--payload", required=True)
    p.add_argument("--timeout", type=_positive_float, default=10.0)
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("watch", help="watch session messages (runner environment)")
    p.add_argument("--session", required=True)
    p.add_argument("--after-seq", type=_non_negative_int)
    p.add_argument("--count", type=_non_negative_int, help="exit 0 after N messages")
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.set_defaults(func=_cmd_watch)

    p = sub.add_parser("fetch-token", help="fetch a token as a runner does; print its claims")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_fetch_token)

    # The demo parses its own arguments (``demo --help`` shows them).
    p = sub.add_parser("demo", help="the end-to-end demo on loopback", add_help=False)
    p.set_defaults(func=_cmd_demo, delegated=True)
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
        print(f"{PROG} {args.command}: error: {name}: {details or 'call failed'}", file=sys.stderr)
        return 1
    except (AmbientAuthError, OSError, ValueError) as exc:
        # Our exceptions never carry token material (errors.py).
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
