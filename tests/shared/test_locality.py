"""The one locality policy: host classification, the plaintext check, and that
every component sending a secret applies it the same way."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest
from support import keys

from ambient_grpc_auth._locality import (
    Locality,
    check_in_cluster,
    check_plaintext,
    check_url_plaintext,
    host_locality,
    least_local,
)
from ambient_grpc_auth.client.control_plane import ControlPlaneTokenSource
from ambient_grpc_auth.client.credentials import CredentialClient
from ambient_grpc_auth.client.target import Locality as TargetLocality
from ambient_grpc_auth.client.target import check_target
from ambient_grpc_auth.controlplane.oidc_issuer import OidcClientCredentialsIssuer, OidcSettings
from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.server.jwks import JwksCache

L = Locality
SESSION = "session-0123456789"

HOSTS = [
    # loopback
    ("localhost", L.LOOPBACK),
    ("LocalHost.", L.LOOPBACK),
    ("127.0.0.1", L.LOOPBACK),
    ("127.255.255.254", L.LOOPBACK),
    ("::1", L.LOOPBACK),
    ("::1%lo", L.LOOPBACK),
    ("::ffff:127.0.0.1", L.LOOPBACK),
    ("::ffff:7f00:1", L.LOOPBACK),
    # cluster-local
    ("ambient-api-server", L.CLUSTER),
    ("svc", L.CLUSTER),
    ("api.ns.svc", L.CLUSTER),
    ("API.NS.SVC.", L.CLUSTER),
    ("api.ns.svc.cluster.local", L.CLUSTER),
    ("api.ns.svc.cluster.local.", L.CLUSTER),
    ("10-0-0-1.ns.pod.cluster.local", L.CLUSTER),
    ("x.cluster.local", L.CLUSTER),
    # remote
    ("api.example.com", L.REMOTE),
    ("my.svc.example.com", L.REMOTE),
    ("svc.cluster.local.evil.com", L.REMOTE),
    ("cluster.local", L.REMOTE),
    (".svc", L.REMOTE),
    ("foo.localhost", L.REMOTE),
    ("127.0.0.1.nip.io", L.REMOTE),
    ("10.0.0.1", L.REMOTE),
    ("172.16.0.1", L.REMOTE),
    ("192.168.1.1", L.REMOTE),
    ("169.254.169.254", L.REMOTE),
    ("0.0.0.0", L.REMOTE),  # noqa: S104
    ("::", L.REMOTE),
    ("fd00::1", L.REMOTE),
    ("fe80::1%eth0", L.REMOTE),
    ("::ffff:10.0.0.1", L.REMOTE),
    ("2130706433", L.REMOTE),  # numeric names are addresses to resolvers
    ("0x7f000001", L.REMOTE),
    ("127.1", L.REMOTE),
    ("127.0.0.1%eth0", L.REMOTE),
    ("under_score", L.REMOTE),
    ("under_score.ns.svc", L.REMOTE),
    ("-api.ns.svc", L.REMOTE),
    ("api-.ns.svc", L.REMOTE),
    ("a..svc", L.REMOTE),
    ("evil.com%2f.svc", L.REMOTE),
    ("x" * 64, L.REMOTE),
    (("a" * 60 + ".") * 5 + "svc", L.REMOTE),  # longer than 253 characters
    ("", L.REMOTE),
]


@pytest.mark.parametrize(("host", "locality"), HOSTS)
def test_host_locality(host: str, locality: Locality) -> None:
    assert host_locality(host) is locality
    assert locality.plaintext_allowed is (locality is not L.REMOTE)


def test_the_target_module_reexports_the_one_locality() -> None:
    assert TargetLocality is Locality


def test_least_local() -> None:
    assert least_local([L.LOOPBACK, L.CLUSTER]) is L.CLUSTER
    assert least_local([L.LOOPBACK, L.REMOTE, L.CLUSTER]) is L.REMOTE
    assert least_local([L.LOOPBACK]) is L.LOOPBACK
    assert least_local([]) is L.REMOTE


def test_check_plaintext() -> None:
    kw = {
        "sending": "bearer tokens",
        "destination": "'api.example.com'",
        "enable_tls": "enable TLS",
        "allow_flag": "allow_insecure_remote=True",
    }
    check_plaintext(L.LOOPBACK, tls=False, allow_remote=False, **kw)
    check_plaintext(L.CLUSTER, tls=False, allow_remote=False, **kw)
    check_plaintext(L.REMOTE, tls=True, allow_remote=False, **kw)
    check_plaintext(L.REMOTE, tls=False, allow_remote=True, **kw)
    with pytest.raises(ConfigurationError) as err:
        check_plaintext(L.REMOTE, tls=False, allow_remote=False, **kw)
    message = str(err.value)
    for part in ("bearer tokens", "'api.example.com'", "enable TLS", "allow_insecure_remote=True"):
        assert part in message
    assert "loopback" in message
    assert "*.svc" in message


def test_check_url_plaintext() -> None:
    def check(url: str, allow: bool = False) -> Locality:
        return check_url_plaintext(
            urllib.parse.urlsplit(url),
            allow_remote=allow,
            sending="the proof",
            what="token URL",
            allow_flag="allow_x=True",
        )

    assert check("http://[::1]:80/t") is L.LOOPBACK
    assert check("http://cp.ns.svc/t") is L.CLUSTER
    assert check("https://cp.example.com/t") is L.REMOTE
    assert check("HTTPS://cp.example.com/t") is L.REMOTE
    assert check("http://cp.example.com/t", allow=True) is L.REMOTE
    with pytest.raises(ConfigurationError, match="https URL or pass allow_x=True") as err:
        check("http://cp.example.com/t?secret=1")
    assert "token URL host 'cp.example.com'" in str(err.value)
    assert "secret" not in str(err.value)


def test_check_in_cluster() -> None:
    check_in_cluster(L.LOOPBACK, sending="x", destination="y")
    check_in_cluster(L.CLUSTER, sending="x", destination="y")
    with pytest.raises(ConfigurationError, match="host 'a.example' is not allowed"):
        check_in_cluster(L.REMOTE, sending="the token", destination="host 'a.example'")


# --- every component agrees ---------------------------------------------------------------


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


AGREEMENT_HOSTS = [
    (host, locality)
    for host, locality in HOSTS
    # Hosts that are not valid in a URL or a target at all are covered above.
    if host
    and "%" not in host
    and "_" not in host
    and ".." not in host
    and not host.startswith((".", "-"))
    and len(host) < 64
]


def _accepts(build: object) -> bool:
    try:
        build()  # type: ignore[operator]
    except ConfigurationError:
        return False
    return True


@pytest.mark.parametrize(("host", "locality"), AGREEMENT_HOSTS)
def test_every_component_applies_the_same_policy(
    host: str, locality: Locality, tmp_path: Path
) -> None:
    """Plaintext is allowed exactly to local hosts, for each sender of a
    secret; TLS (https) is allowed to any host, except for the backend
    credential fetch, which never leaves the cluster."""
    local = locality is not L.REMOTE
    pem = keys.public_pem(keys.signing_key()).decode("ascii")
    secret_file = tmp_path / "secret"

    def target(tls: bool) -> object:
        return lambda: check_target(f"{_bracketed(host)}:443", tls=tls)

    def cp(scheme: str) -> object:
        return lambda: ControlPlaneTokenSource(f"{scheme}://{_bracketed(host)}/token", pem, SESSION)

    def oidc(scheme: str) -> object:
        return lambda: OidcClientCredentialsIssuer(
            OidcSettings(
                token_url=f"{scheme}://{_bracketed(host)}/token",
                client_id="c",
                client_secret_file=secret_file,
            )
        )

    def jwks(scheme: str) -> object:
        return lambda: JwksCache(f"{scheme}://{_bracketed(host)}/jwks")

    def backend(scheme: str) -> object:
        return lambda: CredentialClient(f"{scheme}://{_bracketed(host)}")

    plaintext = {
        "gRPC target": _accepts(target(False)),
        "control-plane URL": _accepts(cp("http")),
        "OIDC token URL": _accepts(oidc("http")),
        "JWKS URL": _accepts(jwks("http")),
        "backend URL": _accepts(backend("http")),
    }
    assert plaintext == dict.fromkeys(plaintext, local)
    tls = {
        "gRPC target": _accepts(target(True)),
        "control-plane URL": _accepts(cp("https")),
        "OIDC token URL": _accepts(oidc("https")),
        "JWKS URL": _accepts(jwks("https")),
    }
    assert tls == dict.fromkeys(tls, True)
    assert _accepts(backend("https")) is local


def test_explicit_flags_allow_plaintext_to_remote_hosts(tmp_path: Path) -> None:
    check_target("api.example.com:80", tls=False, allow_insecure_remote=True)
    ControlPlaneTokenSource(
        "http://cp.example.com/token",
        keys.public_pem(keys.signing_key()).decode("ascii"),
        SESSION,
        allow_insecure_remote=True,
    )
    OidcClientCredentialsIssuer(
        OidcSettings(
            token_url="http://idp.example.com/token",
            client_id="c",
            client_secret_file=tmp_path / "secret",
            allow_insecure_http=True,
        )
    )
    JwksCache("http://keys.example.com/jwks", allow_insecure_remote=True)
