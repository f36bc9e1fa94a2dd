"""Where a secret may travel without TLS: the one locality policy.

Every component that sends a secret classifies its destination here and asks
:func:`check_plaintext` (or :func:`check_url_plaintext`) before connecting:
bearer tokens to the API server (gRPC targets), the session proof to the
control plane, the pod's service-account token to the backend and to a JWKS
endpoint, and the client secret to an OIDC provider.

Localities, decided from the name alone (no DNS lookups, no I/O):

- ``LOOPBACK``: ``localhost``, 127.0.0.0/8, ``::1``, IPv4-mapped loopback
  (``::ffff:127.0.0.1``) and Unix sockets. The traffic never leaves the host.
- ``CLUSTER``: names the cluster's DNS resolves to a Service: ``*.svc``,
  ``*.cluster.local`` (at least one label in front) and short names (one DNS
  label starting with a letter, e.g. ``ambient-api-server``, resolved through
  the pod's search list). Every label must be a valid RFC 1123 label. The
  traffic stays on the cluster network, which the platform treats as private.
  Caveat: a resolver search list that includes a non-cluster domain could send
  a short name elsewhere; use TLS or a ``*.svc.cluster.local`` name where that
  matters.
- ``REMOTE``: everything else, including private IP addresses (a 10.x address
  may be a peered network or a VPN), numeric names such as ``2130706433``
  (resolvers read them as addresses) and malformed names.

Plaintext is allowed to ``LOOPBACK`` and ``CLUSTER`` only. A ``REMOTE``
destination needs TLS, unless the caller passes its component's explicit
allow flag (e.g. ``allow_insecure_remote=True``). Errors are
:class:`~ambient_grpc_auth.errors.ConfigurationError` naming the destination
(configuration, never a secret), the secret's kind, and both ways out.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import urllib.parse
from collections.abc import Iterable

from ambient_grpc_auth.errors import ConfigurationError

__all__ = [
    "LOCAL_DESTINATIONS",
    "Locality",
    "check_in_cluster",
    "check_plaintext",
    "check_url_plaintext",
    "host_locality",
    "least_local",
]

#: What counts as local, for error messages.
LOCAL_DESTINATIONS = (
    "loopback (localhost, 127.0.0.0/8, ::1, unix sockets) and cluster-local hosts "
    "(short names, *.svc, *.cluster.local)"
)

_MAX_NAME_CHARS = 253
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# A short name must start with a letter: numeric forms such as "167772161"
# or "0x7f000001" are IP addresses to the system resolver.
_SHORT_NAME = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
_CLUSTER_SUFFIXES = (".svc", ".cluster.local")


class Locality(enum.Enum):
    """Where a destination is, as far as the plaintext policy is concerned."""

    LOOPBACK = "loopback"
    CLUSTER = "cluster"
    REMOTE = "remote"

    @property
    def plaintext_allowed(self) -> bool:
        """True for ``LOOPBACK`` and ``CLUSTER``."""
        return self is not Locality.REMOTE


def host_locality(host: str) -> Locality:
    """Classify one host: an IP address (IPv6 without brackets, optionally
    with a ``%zone``) or a DNS name (case-insensitive, optional trailing dot).
    Never raises: anything unrecognised is ``REMOTE``."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return Locality.LOOPBACK if ip.is_loopback else Locality.REMOTE
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    if name == "localhost":
        return Locality.LOOPBACK
    if not name or len(name) > _MAX_NAME_CHARS:
        return Locality.REMOTE
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return Locality.REMOTE
    if len(labels) == 1:
        return Locality.CLUSTER if _SHORT_NAME.fullmatch(name) else Locality.REMOTE
    # endswith(".svc") with valid labels implies a label in front of the suffix.
    if name.endswith(_CLUSTER_SUFFIXES):
        return Locality.CLUSTER
    return Locality.REMOTE


def least_local(localities: Iterable[Locality]) -> Locality:
    """The most remote of ``localities`` (``REMOTE`` when there are none): a
    destination with several addresses is as exposed as its most exposed one."""
    seen = set(localities)
    for locality in (Locality.REMOTE, Locality.CLUSTER, Locality.LOOPBACK):
        if locality in seen:
            return locality
    return Locality.REMOTE


def check_plaintext(
    locality: Locality,
    *,
    tls: bool,
    allow_remote: bool,
    sending: str,
    destination: str,
    enable_tls: str,
    allow_flag: str,
) -> None:
    """Refuse to send ``sending`` (what is sent, e.g. ``"bearer tokens"``) in
    plaintext to a ``REMOTE`` destination.

    Returns when ``tls`` is set, ``allow_remote`` is set, or ``locality`` is
    local. Otherwise raises :class:`ConfigurationError` whose message names
    ``destination``, how to enable TLS (``enable_tls``) and the allow flag.
    """
    if tls or allow_remote or locality.plaintext_allowed:
        return
    raise ConfigurationError(
        f"refusing to send {sending} in plaintext to {destination}: {enable_tls} or pass "
        f"{allow_flag}. Plaintext is allowed only to {LOCAL_DESTINATIONS}"
    )


def check_url_plaintext(
    parts: urllib.parse.SplitResult,
    *,
    allow_remote: bool,
    sending: str,
    what: str,
    allow_flag: str,
) -> Locality:
    """:func:`check_plaintext` for an http(s) URL (already validated): ``http``
    to a ``REMOTE`` host is refused unless ``allow_remote``. Returns the
    host's locality. Raises :class:`ConfigurationError`."""
    host = parts.hostname or ""
    locality = host_locality(host)
    check_plaintext(
        locality,
        tls=parts.scheme.lower() == "https",
        allow_remote=allow_remote,
        sending=sending,
        destination=f"{what} host {host!r}",
        enable_tls="use an https URL",
        allow_flag=allow_flag,
    )
    return locality


def check_in_cluster(locality: Locality, *, sending: str, destination: str) -> None:
    """Refuse a ``REMOTE`` destination whatever the transport: for secrets
    that must not leave the cluster even over TLS (the pod's service-account
    token). Raises :class:`ConfigurationError`."""
    if locality.plaintext_allowed:
        return
    raise ConfigurationError(
        f"{destination} is not allowed: {sending} must not leave the cluster; "
        f"use {LOCAL_DESTINATIONS}"
    )
