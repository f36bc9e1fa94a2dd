"""Token-signing keys: kid (RFC 7638 thumbprint), JWKS, rotation and reload.

A key's ``kid`` is its RFC 7638 thumbprint
(:func:`ambient_grpc_auth.jwk.jwk_thumbprint`, the same function verifiers
use), so a key keeps its id across restarts and copies without any stored
metadata.

The signing key is separate from the RSA-4096 encryption key pair (see
:mod:`ambient_grpc_auth.controlplane.keys` for the layout and the reasons). Its
algorithm follows its type: EC P-256 signs ES256 (the default for new keys),
RSA signs RS256, Ed25519 signs EdDSA; see :data:`SIGNING_ALGORITHMS`. A key
directory whose ``signing.pem`` is of another type than configured is moved
over by :func:`ensure_signing_algorithm` (an ordinary rotation). Retired keys
are kept as ``signing.retired.<unix seconds>.<kid prefix>.pem`` next to
``signing.pem``: the retirement time is part of the name, so retiring is one
atomic link and needs no separate index.

Functions here are thread-safe; rotations are serialised between processes by
a lock file. Errors are :class:`~ambient_grpc_auth.errors.KeyFileError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth._keyfiles import directory_lock, replace_atomically
from ambient_grpc_auth._pem import (
    SigningPrivateKey,
    generate_rsa_key,
    load_signing_file,
    signing_key_pem,
)
from ambient_grpc_auth.errors import ConfigurationError, KeyFileError
from ambient_grpc_auth.jwk import PublicKey, jwk_public_members, jwk_thumbprint

__all__ = [
    "DEFAULT_SIGNING_ALGORITHM",
    "SIGNING_ALGORITHMS",
    "SIGNING_KEY_BITS",
    "SIGNING_KEY_FILE",
    "SigningKey",
    "SigningKeySet",
    "SigningKeyStore",
    "SigningPrivateKey",
    "ensure_signing_algorithm",
    "generate_signing_key",
    "jwks",
    "load_signing_keys",
    "prune_retired_signing_keys",
    "public_jwk",
    "retired_signing_files",
    "rotate_signing_key",
    "signing_algorithm_of",
]

_log = logging.getLogger("ambient_grpc_auth.controlplane.keys")

#: Modulus size of generated RSA signing keys (RS256).
SIGNING_KEY_BITS = 2048
#: The algorithms a signing key may use, one per key type.
SIGNING_ALGORITHMS: tuple[str, ...] = ("ES256", "RS256", "EdDSA")
#: The algorithm of newly generated signing keys. ES256: an 86-character
#: signature instead of RS256's 342 on every call's bearer, and tens of
#: microseconds to sign instead of ~1.7 ms; verifiers cache verified tokens,
#: so ES256's slower verification is paid once per token, not per call.
DEFAULT_SIGNING_ALGORITHM = "ES256"
SIGNING_KEY_FILE = "signing.pem"
_RETIRED_RE = re.compile(r"^signing\.retired\.(\d{1,12})\.([A-Za-z0-9_-]{1,43})\.pem$")
_ROTATE_LOCK_FILE = ".rotate.lock"


def signing_algorithm_of(key: SigningPrivateKey | PublicKey) -> str:
    """The JWS algorithm a signing key of this type signs with (RS256, ES256
    or EdDSA). Raises :class:`KeyFileError` for any other key type."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
        key.curve, ec.SECP256R1
    ):
        return "ES256"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise KeyFileError(f"no signing algorithm for a {type(key).__name__}")


def generate_signing_key(
    algorithm: str = DEFAULT_SIGNING_ALGORITHM, *, rsa_bits: int = SIGNING_KEY_BITS
) -> SigningPrivateKey:
    """A fresh private key for ``algorithm`` (one of :data:`SIGNING_ALGORITHMS`;
    ConfigurationError otherwise)."""
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "RS256":
        return generate_rsa_key(rsa_bits)
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ConfigurationError(
        f"signing algorithm {algorithm!r} is not one of {', '.join(SIGNING_ALGORITHMS)}"
    )


def public_jwk(key: SigningPrivateKey | PublicKey, kid: str | None = None) -> dict[str, Any]:
    """The public JWK of a signing key: its public members (``kty`` ``RSA``,
    ``EC`` with ``crv`` ``P-256``, or ``OKP`` with ``crv`` ``Ed25519``),
    ``kid``, ``use=sig`` and the ``alg`` it signs with.

    Only public members are ever emitted, even when given a private key.
    """
    public: PublicKey = (
        key.public_key()
        if isinstance(
            key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        )
        else key
    )
    return {
        **jwk_public_members(public),
        "kid": kid if kid is not None else jwk_thumbprint(public),
        "use": "sig",
        "alg": signing_algorithm_of(public),
    }


@dataclass(frozen=True)
class SigningKey:
    """One token-signing key. ``retired_at`` (unix seconds) is None for the
    current key. The repr shows the kid only, never key material."""

    private_key: SigningPrivateKey = field(repr=False, compare=False)
    kid: str
    retired_at: float | None = None

    @classmethod
    def from_private_key(
        cls, key: SigningPrivateKey, *, retired_at: float | None = None
    ) -> SigningKey:
        return cls(key, jwk_thumbprint(key.public_key()), retired_at)

    @property
    def algorithm(self) -> str:
        """The JWS algorithm this key signs with (from its type)."""
        return signing_algorithm_of(self.private_key)

    @property
    def signs_slowly(self) -> bool:
        """True for an RSA key: a signature takes a millisecond or more, too
        long for an event loop. ES256 and EdDSA sign in tens of microseconds."""
        return isinstance(self.private_key, rsa.RSAPrivateKey)

    def public_jwk(self) -> dict[str, Any]:
        return public_jwk(self.private_key, self.kid)


@dataclass(frozen=True)
class SigningKeySet:
    """The current signing key and the retired ones (newest first).

    Tokens are signed only with ``current``; retired keys stay published in
    the JWKS until the tokens they signed have expired (see
    :meth:`published`).
    """

    current: SigningKey
    retired: tuple[SigningKey, ...] = ()

    def published(
        self, *, now: float, max_token_ttl: float, grace: float = 0.0
    ) -> list[SigningKey]:
        """Keys a verifier may still need at ``now``: the current one plus each
        retired key whose ``retired_at + max_token_ttl + grace`` is in the future."""
        keys = [self.current]
        for k in self.retired:
            if k.retired_at is not None and k.retired_at + max_token_ttl + grace > now:
                keys.append(k)
        return keys


def jwks(keys: Iterable[SigningKey]) -> dict[str, Any]:
    """A JWK Set document ``{"keys": [...]}`` with the public halves of ``keys``."""
    return {"keys": [k.public_jwk() for k in keys]}


def load_signing_keys(directory: str | os.PathLike[str]) -> SigningKeySet:
    """Load ``signing.pem`` and every retired signing key in ``directory``.

    Raises :class:`KeyFileError` if any of them is missing or malformed.
    """
    directory = Path(directory)
    current = SigningKey.from_private_key(load_signing_file(directory / SIGNING_KEY_FILE))
    retired: list[SigningKey] = []
    # Newest first, so that a key retired twice keeps its latest retirement.
    for name, retired_at in sorted(retired_signing_files(directory), key=lambda f: -f[1]):
        key = SigningKey.from_private_key(
            load_signing_file(directory / name), retired_at=float(retired_at)
        )
        # A rotation interrupted between its two steps leaves the current key
        # also under a retired name; it is current, not retired.
        if key.kid != current.kid and all(k.kid != key.kid for k in retired):
            retired.append(key)
    return SigningKeySet(current, tuple(retired))


def retired_signing_files(directory: Path) -> list[tuple[str, int]]:
    """(file name, retirement unix time) of each retired signing key in ``directory``."""
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise KeyFileError(f"{directory}: cannot list key directory ({exc.strerror})") from None
    found = []
    for name in names:
        m = _RETIRED_RE.match(name)
        if m:
            found.append((name, int(m.group(1))))
    return found


def rotate_signing_key(
    directory: str | os.PathLike[str],
    *,
    clock: Clock = SYSTEM_CLOCK,
    signing_key_bits: int = SIGNING_KEY_BITS,
    algorithm: str | None = None,
) -> SigningKeySet:
    """Retire the current signing key and make a freshly generated one current.

    The new key is for ``algorithm`` (one of :data:`SIGNING_ALGORITHMS`), by
    default the current key's: a rotation does not change the algorithm
    unless asked to.

    The old key is hard-linked to ``signing.retired.<now>.<kid>.pem`` first,
    then the new key atomically replaces ``signing.pem``; a crash in between
    leaves the old key current and also retired, which loaders resolve. A
    running token server picks the change up on its next key check (see
    :class:`SigningKeyStore`) and keeps publishing the retired key in its JWKS
    until tokens it signed have expired. Rotations are serialised by a lock
    file in ``directory``.

    Returns the new key set. Raises :class:`KeyFileError` on I/O errors.
    """
    directory = Path(directory)
    with directory_lock(directory, _ROTATE_LOCK_FILE):
        return _rotate_locked(directory, clock, signing_key_bits, algorithm)


def _rotate_locked(
    directory: Path, clock: Clock, signing_key_bits: int, algorithm: str | None
) -> SigningKeySet:
    current_file = directory / SIGNING_KEY_FILE
    old = load_signing_file(current_file)
    new = generate_signing_key(algorithm or signing_algorithm_of(old), rsa_bits=signing_key_bits)
    kid = jwk_thumbprint(old.public_key())
    retired_name = f"signing.retired.{int(clock.time())}.{kid[:16]}.pem"
    try:
        os.link(current_file, directory / retired_name)
    except FileExistsError:
        pass
    except OSError as exc:
        raise KeyFileError(f"{current_file}: cannot retire key ({exc.strerror})") from None
    replace_atomically(current_file, signing_key_pem(new))
    _log.info(
        "rotated signing key in %s (retired kid %s, now %s)",
        directory,
        kid,
        signing_algorithm_of(new),
    )
    return load_signing_keys(directory)


def ensure_signing_algorithm(
    directory: str | os.PathLike[str],
    algorithm: str,
    *,
    clock: Clock = SYSTEM_CLOCK,
    signing_key_bits: int = SIGNING_KEY_BITS,
) -> SigningKeySet:
    """Make ``signing.pem`` a key for ``algorithm``, rotating if it is not.

    This is how a key directory made before ES256 became the default (an RSA
    ``signing.pem``) moves over: the RSA key is retired like in any rotation,
    so it stays published, and tokens it signed stay valid, until they
    expire. Checked and rotated under the rotation lock, so replicas starting
    together on one directory rotate once. Returns the key set; raises
    :class:`KeyFileError` on I/O errors (e.g. a read-only mounted Secret) and
    ConfigurationError for an unknown algorithm.
    """
    if algorithm not in SIGNING_ALGORITHMS:
        generate_signing_key(algorithm)  # raises ConfigurationError
    directory = Path(directory)
    keys = load_signing_keys(directory)
    if keys.current.algorithm == algorithm:
        return keys
    with directory_lock(directory, _ROTATE_LOCK_FILE):
        keys = load_signing_keys(directory)
        if keys.current.algorithm == algorithm:
            return keys
        return _rotate_locked(directory, clock, signing_key_bits, algorithm)


def prune_retired_signing_keys(
    directory: str | os.PathLike[str], *, max_token_ttl: float, clock: Clock = SYSTEM_CLOCK
) -> list[str]:
    """Delete retired signing keys no token can still need: those retired
    longer than ``max_token_ttl`` ago (include any verifier leeway in it).
    Returns the removed file names."""
    directory = Path(directory)
    removed = []
    with directory_lock(directory, _ROTATE_LOCK_FILE):
        now = clock.time()
        for name, retired_at in retired_signing_files(directory):
            if retired_at + max_token_ttl < now:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / name)
                removed.append(name)
    return sorted(removed)


class SigningKeyStore:
    """The signing keys of a directory, reloaded when the files change.

    Calling the store returns the current :class:`SigningKeySet`. At most once
    per ``check_interval`` seconds (monotonic clock) it looks at the
    directory's signing files (names, inodes, sizes, mtimes; following
    symlinks, so an updated Kubernetes Secret mount is seen) and reloads them
    if anything changed. A reload that fails keeps the last good set and logs
    a warning. Thread-safe.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        clock: Clock = SYSTEM_CLOCK,
        check_interval: float = 10.0,
        initial: SigningKeySet | None = None,
    ) -> None:
        self._dir = Path(directory)
        self._clock = clock
        self._interval = check_interval
        self._lock = threading.Lock()
        self._fingerprint = self._scan()
        self._keys = initial if initial is not None else load_signing_keys(self._dir)
        self._next_check = clock.monotonic() + check_interval

    def _scan(self) -> tuple[tuple[str, int, int, int], ...]:
        entries = []
        try:
            names = os.listdir(self._dir)
        except OSError:
            return ()
        for name in names:
            if name == SIGNING_KEY_FILE or _RETIRED_RE.match(name):
                try:
                    st = os.stat(self._dir / name)
                except OSError:
                    continue
                entries.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(sorted(entries))

    def __call__(self) -> SigningKeySet:
        now = self._clock.monotonic()
        with self._lock:
            if now < self._next_check:
                return self._keys
            self._next_check = now + self._interval
            fingerprint = self._scan()
            if fingerprint != self._fingerprint:
                try:
                    keys = load_signing_keys(self._dir)
                except KeyFileError as exc:
                    _log.warning("keeping previous signing keys: %s", exc)
                else:
                    if keys.current.kid != self._keys.current.kid:
                        _log.info("signing key changed to kid %s", keys.current.kid)
                    self._keys = keys
                    self._fingerprint = fingerprint
            return self._keys
