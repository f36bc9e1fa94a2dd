"""Where a runner connects: target parsing, the plaintext check, ChannelConfig.

The plaintext policy itself (which hosts are loopback or cluster-local) lives
in :mod:`ambient_grpc_auth._locality`, shared with every other component that
sends a secret; :class:`Locality` is re-exported here because
:attr:`ParsedTarget.locality` is one.

A ``dns://AUTHORITY/name`` target is always ``REMOTE``: the DNS server named
in the authority, not the cluster, decides where the name points. With an
empty authority (``dns:///name``) the system resolver is used and the name is
classified like a bare ``host:port``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ambient_grpc_auth._locality import Locality, check_plaintext, host_locality, least_local
from ambient_grpc_auth.errors import ConfigurationError

__all__ = [
    "CA_CERT_FILE_ENV",
    "DEFAULT_PORT",
    "DEFAULT_SERVICE_CA_FILE",
    "DEFAULT_TARGET",
    "GRPC_URL_ENV",
    "USE_TLS_ENV",
    "ChannelConfig",
    "Locality",
    "ParsedTarget",
    "check_target",
    "parse_target",
]

GRPC_URL_ENV = "AMBIENT_GRPC_URL"
USE_TLS_ENV = "AMBIENT_GRPC_USE_TLS"
CA_CERT_FILE_ENV = "AMBIENT_GRPC_CA_CERT_FILE"
DEFAULT_PORT = 9000
DEFAULT_TARGET = f"ambient-api-server:{DEFAULT_PORT}"
DEFAULT_SERVICE_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/service-ca.crt"

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})
_MAX_TARGET_CHARS = 1024
# A CA bundle larger than this is a mistake (wrong file), not a bundle.
_MAX_CA_FILE_BYTES = 1024 * 1024
_HOSTNAME = re.compile(
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?"
)


@dataclass(frozen=True, slots=True)
class ParsedTarget:
    """A gRPC target split for the policy: its host(s), port and locality.

    ``hosts`` is empty for Unix sockets and for resolver schemes whose hosts
    cannot be known here (those count as REMOTE).
    """

    target: str
    hosts: tuple[str, ...]
    port: int | None
    locality: Locality


def _bad(target: str, why: str) -> ConfigurationError:
    # Targets are configuration, not secrets: quoting them helps the operator.
    return ConfigurationError(f"invalid gRPC target {target!r}: {why}")


def _parse_port(target: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 0 < int(text) < 65536:
        raise _bad(target, "port must be a number from 1 to 65535")
    return int(text)


def _split_host_port(target: str, text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _bad(target, "unclosed '[' in IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _bad(target, "unexpected text after ']'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(target, "bracketed host is not an IPv6 address") from None
        return host, _parse_port(target, rest[1:]) if rest else None
    if text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise _bad(target, "IPv6 addresses with a port must be written [addr]:port") from None
        return text, None
    host, sep, port_text = text.partition(":")
    if not host:
        raise _bad(target, "missing host")
    if not _HOSTNAME.fullmatch(host) or len(host) > 253:
        raise _bad(target, "host is not a valid DNS name or IP address")
    return host, _parse_port(target, port_text) if sep else None


def parse_target(target: str) -> ParsedTarget:
    """Parse a gRPC target: ``host[:port]``, ``[v6]:port``, ``dns:[//authority/]host[:port]``,
    ``ipv4:addr[:port][,...]``, ``ipv6:[addr]:port[,...]``, ``unix:path``,
    ``unix-abstract:name``. Other ``scheme://`` targets are accepted with unknown
    hosts (REMOTE). Raises :class:`ConfigurationError` for malformed targets and
    for http(s) URLs.
    """
    if not isinstance(target, str):
        raise ConfigurationError("gRPC target must be a string")
    text = target.strip()
    if not text:
        raise ConfigurationError("gRPC target is empty")
    if len(text) > _MAX_TARGET_CHARS or not text.isascii() or not text.isprintable():
        raise ConfigurationError("gRPC target is too long or contains invalid characters")
    if " " in text:
        raise _bad(text, "contains spaces")
    lower = text.lower()
    if lower.startswith(("unix:", "unix-abstract:")):
        return ParsedTarget(text, (), None, Locality.LOOPBACK)
    if lower.startswith(("http://", "https://")):
        raise _bad(text, "use host:port (TLS is chosen separately), not an http(s) URL")
    if lower.startswith("dns:"):
        rest = text[4:]
        if rest.startswith("//"):
            authority, slash, rest = rest[2:].partition("/")
            if not slash:
                raise _bad(text, "dns:// target needs '/host' after the authority")
        else:
            authority = ""
        host, port = _split_host_port(text, rest)
        # A named DNS server decides where the name points, not the cluster.
        locality = Locality.REMOTE if authority else host_locality(host)
        return ParsedTarget(text, (host,), port, locality)
    if lower.startswith(("ipv4:", "ipv6:")):
        family = ipaddress.IPv4Address if lower.startswith("ipv4:") else ipaddress.IPv6Address
        hosts: list[str] = []
        ports: set[int | None] = set()
        for part in text[5:].split(","):
            host, port = _split_host_port(text, part)
            try:
                family(host)
            except ValueError:
                raise _bad(text, f"{host!r} is not an address of the scheme's family") from None
            hosts.append(host)
            ports.add(port)
        port = ports.pop() if len(ports) == 1 else None
        return ParsedTarget(text, tuple(hosts), port, least_local(host_locality(h) for h in hosts))
    if "://" in text:
        return ParsedTarget(text, (), None, Locality.REMOTE)
    host, port = _split_host_port(text, text)
    return ParsedTarget(text, (host,), port, host_locality(host))


def _with_default_port(parsed: ParsedTarget) -> ParsedTarget:
    # gRPC's own default port is 443 whatever the transport: a plaintext
    # channel to "host" would knock on the TLS port. The API server's port is
    # the platform's default instead.
    if parsed.port is not None or len(parsed.hosts) != 1:
        return parsed
    text = parsed.target
    lower = text.lower()
    if lower.startswith(("ipv4:", "ipv6:")) or ("://" in text and not lower.startswith("dns:")):
        return parsed
    host = parsed.hosts[0]
    if lower.startswith("dns:"):
        prefix = text[: len(text) - len(text.rsplit("/", 1)[-1])] if "//" in text else text[:4]
        rest = text[len(prefix) :]
        shown = f"[{host}]" if ":" in host and not rest.startswith("[") else rest
        return ParsedTarget(
            f"{prefix}{shown}:{DEFAULT_PORT}", parsed.hosts, DEFAULT_PORT, parsed.locality
        )
    shown = f"[{host}]" if ":" in host else host
    return ParsedTarget(f"{shown}:{DEFAULT_PORT}", parsed.hosts, DEFAULT_PORT, parsed.locality)


def check_target(target: str, *, tls: bool, allow_insecure_remote: bool = False) -> ParsedTarget:
    """Parse ``target`` and apply the plaintext policy (see the module docs).

    A host (or ``dns:`` name) without a port gets :data:`DEFAULT_PORT`
    (9000, the API server's port) in the returned ``target``, with or
    without TLS; gRPC's own default would be 443.

    Raises :class:`ConfigurationError` when the target is malformed, or when
    ``tls`` is False, the target is not loopback or cluster-local and
    ``allow_insecure_remote`` is False.
    """
    parsed = parse_target(target)
    check_plaintext(
        parsed.locality,
        tls=tls,
        allow_remote=allow_insecure_remote,
        sending="bearer tokens",
        destination=", ".join(repr(h) for h in parsed.hosts) or repr(parsed.target),
        enable_tls=f"enable TLS ({USE_TLS_ENV}=true / tls=True)",
        allow_flag="allow_insecure_remote=True",
    )
    return _with_default_port(parsed)


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(f"{name} must be one of true/false/1/0/yes/no/on/off")


def _read_ca_file(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_CA_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read CA certificate file {path!r}: {exc.strerror or type(exc).__name__}"
        ) from None
    if len(data) > _MAX_CA_FILE_BYTES:
        raise ConfigurationError(f"CA certificate file {path!r} is larger than 1 MiB")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigurationError(f"CA certificate file {path!r} contains no PEM certificate")
    return data


@dataclass(frozen=True, kw_only=True)
class ChannelConfig:
    """Where and how a runner connects. Validated at construction: a
    malformed target or a plaintext target outside the policy raises
    :class:`ConfigurationError`, as does ``ca_cert_file`` without ``tls``."""

    #: gRPC target: ``host:port``, ``[v6]:port``, ``dns:///name:port`` or ``unix:path``.
    target: str = DEFAULT_TARGET
    #: Use TLS. Without it the target must pass the plaintext policy.
    tls: bool = False
    #: PEM file of roots to trust with TLS (None: the system roots).
    ca_cert_file: str | None = None
    #: Permit plaintext to a host that is neither loopback nor cluster-local.
    allow_insecure_remote: bool = False

    def __post_init__(self) -> None:
        check_target(self.target, tls=self.tls, allow_insecure_remote=self.allow_insecure_remote)
        if self.ca_cert_file is not None and not self.tls:
            raise ConfigurationError("ca_cert_file is only used with tls=True")

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        allow_insecure_remote: bool = False,
        service_ca_file: str = DEFAULT_SERVICE_CA_FILE,
    ) -> ChannelConfig:
        """Read ``AMBIENT_GRPC_URL``, ``AMBIENT_GRPC_USE_TLS`` and
        ``AMBIENT_GRPC_CA_CERT_FILE`` from ``environ`` (default ``os.environ``).

        With TLS and no CA file set, ``service_ca_file`` is used if it exists,
        else the system roots. The CA file is read by :meth:`create_channel`.
        """
        env = os.environ if environ is None else environ
        target = env.get(GRPC_URL_ENV, "").strip() or DEFAULT_TARGET
        tls = _parse_bool(USE_TLS_ENV, env.get(USE_TLS_ENV, ""))
        ca_file: str | None = None
        if tls:
            ca_file = env.get(CA_CERT_FILE_ENV, "").strip() or None
            if ca_file is None and os.path.isfile(service_ca_file):
                ca_file = service_ca_file
        return cls(
            target=target,
            tls=tls,
            ca_cert_file=ca_file,
            allow_insecure_remote=allow_insecure_remote,
        )

    def root_certificates(self) -> bytes | None:
        """The PEM roots to trust (None: system roots). Raises
        :class:`ConfigurationError` if the CA file cannot be read or holds no
        certificate."""
        if not self.tls or self.ca_cert_file is None:
            return None
        return _read_ca_file(self.ca_cert_file)
