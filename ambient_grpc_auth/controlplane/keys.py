"""Control-plane key material: generation, PEM load/save, signing keys, JWKS, Secret YAML.

Directory layout (the same names as the keys of the Kubernetes Secret
``ambient-cp-token-keypair``, so a mounted Secret and a local directory look
alike)::

    DIR/private.pem    encryption private key, RSA-4096, PEM "RSA PRIVATE KEY" (PKCS#1)
    DIR/public.pem     encryption public key, PEM "PUBLIC KEY" (SubjectPublicKeyInfo)
    DIR/signing.pem    current token-signing key: EC P-256 (ES256, the default for new
                       keys, PKCS#8 PEM), RSA-2048 (RS256, PKCS#1 PEM) or Ed25519
                       (EdDSA, PKCS#8 PEM); the algorithm follows the key's type
    DIR/signing.retired.<unix seconds>.<kid prefix>.pem
                       signing keys taken out of service by :func:`rotate_signing_key`;
                       the retirement time is part of the name so that the move is a
                       single atomic link and needs no separate index.

The signing key is separate from the encryption key: runners hold the
encryption *public* key, and tokens signed with that same key pair would let a
compromise of one use leak into the other. New signing keys are EC P-256 used
with ES256: the signature is 86 characters instead of RS256's 342 on every
call's bearer, and signing takes tens of microseconds instead of ~1.7 ms on the
control plane. ES256 verification is slower than RS256's, but API servers
cache verified tokens, so they pay it once per token. RS256 (what the
Kubernetes service-account issuer uses) and EdDSA stay selectable.

Files are created atomically and never overwritten: a key is written to a
temporary file in the same directory, flushed and fsynced, then hard-linked to
its final name with :func:`os.link`, which fails if the name exists. Two
processes starting on an empty directory at once therefore end with one key
pair, which both load. The private key is the source of truth: ``public.pem``
is derived from it and checked against it on every load.

Errors are :class:`~ambient_grpc_auth.errors.KeyFileError` with a message that
names the file and never contains key bytes. Functions here are thread-safe.

Signing-key functions (kid, JWKS, rotation, reload) live in
:mod:`ambient_grpc_auth.controlplane.signing` and are re-exported here.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from ambient_grpc_auth._keyfiles import create_exclusive, make_key_dir, read_key_file
from ambient_grpc_auth._pem import (
    generate_rsa_key,
    load_private_file,
    load_private_key,
    load_public_file,
    load_public_key,
    private_key_pem,
    public_key_pem,
    signing_key_pem,
)
from ambient_grpc_auth.controlplane.signing import (
    DEFAULT_SIGNING_ALGORITHM,
    SIGNING_ALGORITHMS,
    SIGNING_KEY_BITS,
    SIGNING_KEY_FILE,
    SigningKey,
    SigningKeySet,
    SigningKeyStore,
    ensure_signing_algorithm,
    generate_signing_key,
    jwks,
    load_signing_keys,
    prune_retired_signing_keys,
    public_jwk,
    retired_signing_files,
    rotate_signing_key,
)
from ambient_grpc_auth.errors import KeyFileError

__all__ = [
    "DEFAULT_SIGNING_ALGORITHM",
    "ENCRYPTION_KEY_BITS",
    "K8S_SECRET_NAME",
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "SIGNING_ALGORITHMS",
    "SIGNING_KEY_BITS",
    "SIGNING_KEY_FILE",
    "CPKeys",
    "KeyPaths",
    "SigningKey",
    "SigningKeySet",
    "SigningKeyStore",
    "ensure_keys",
    "ensure_signing_algorithm",
    "jwks",
    "k8s_secret_manifest",
    "load_keys",
    "load_private_key",
    "load_public_key",
    "load_signing_keys",
    "private_key_pem",
    "prune_retired_signing_keys",
    "public_jwk",
    "public_key_pem",
    "rotate_signing_key",
]

_log = logging.getLogger(__name__)

ENCRYPTION_KEY_BITS = 4096
PRIVATE_KEY_FILE = "private.pem"
PUBLIC_KEY_FILE = "public.pem"
K8S_SECRET_NAME = "ambient-cp-token-keypair"  # noqa: S105 (a resource name)


@dataclass(frozen=True)
class KeyPaths:
    """Where the control-plane keys live (the Secret's layout)."""

    #: The key directory (a mounted Secret in Kubernetes).
    directory: Path
    #: The RSA encryption private key, PKCS#1 PEM (``private.pem``).
    private: Path
    #: The RSA encryption public key, SubjectPublicKeyInfo PEM (``public.pem``).
    public: Path
    #: The token-signing key (``signing.pem``).
    signing: Path

    @classmethod
    def of(cls, directory: str | os.PathLike[str]) -> KeyPaths:
        d = Path(directory)
        return cls(d, d / PRIVATE_KEY_FILE, d / PUBLIC_KEY_FILE, d / SIGNING_KEY_FILE)


@dataclass(frozen=True)
class CPKeys:
    """Loaded control-plane keys. ``signing`` is None only when loaded with
    ``require_signing=False`` from a directory without a signing key."""

    #: Where the keys were loaded from.
    paths: KeyPaths
    #: Decrypts runners' session proofs.
    private_key: rsa.RSAPrivateKey = field(repr=False, compare=False)
    #: What runners encrypt their proofs to.
    public_key: rsa.RSAPublicKey = field(repr=False, compare=False)
    #: The keys tokens are signed with (current plus retired, for the JWKS).
    signing: SigningKeySet | None

    @property
    def public_pem(self) -> str:
        """The encryption public key as PEM text (what runners are given)."""
        return public_key_pem(self.public_key).decode("ascii")


def _same_public(a: rsa.RSAPublicKey, b: rsa.RSAPublicKey) -> bool:
    return a.public_numbers() == b.public_numbers()


def ensure_keys(
    directory: str | os.PathLike[str],
    *,
    encryption_key_bits: int = ENCRYPTION_KEY_BITS,
    signing_key_bits: int = SIGNING_KEY_BITS,
    signing_algorithm: str = DEFAULT_SIGNING_ALGORITHM,
) -> CPKeys:
    """Load the control-plane keys from ``directory``, generating missing ones.

    On first start this creates the directory (mode 0700), the encryption key
    pair and the signing key (files mode 0600). Existing files are never
    overwritten. Safe to call from several threads or processes at once: all
    of them end up loading the same keys.

    A missing signing key is generated for ``signing_algorithm``; an existing
    one is kept whatever its type (see :func:`ensure_signing_algorithm`).

    Key generation is slow (RSA-4096 takes seconds): call this off any event
    loop. ``encryption_key_bits`` exists for tests; production uses 4096.

    Raises :class:`KeyFileError` if the directory is writable by group or
    others (it is refused, never changed: ``chmod 700`` it), if a file is not
    a regular file, unreadable or malformed, if ``public.pem`` does not match
    ``private.pem``, or if ``public.pem`` exists without ``private.pem`` (a
    new private key would not match it).
    """
    paths = KeyPaths.of(directory)
    make_key_dir(paths.directory)
    # The private key is written before the public one, so seeing public.pem
    # means private.pem existed too unless someone removed it; check again
    # after seeing public.pem to tell a concurrent writer from a lost file.
    if not paths.private.exists() and paths.public.exists() and not paths.private.exists():
        raise KeyFileError(
            f"{paths.public}: exists without {PRIVATE_KEY_FILE}; refusing to generate "
            "a private key that would not match it"
        )
    if not paths.private.exists():
        key = generate_rsa_key(encryption_key_bits)
        if create_exclusive(paths.private, private_key_pem(key)):
            _log.info(
                "generated RSA-%d encryption key pair in %s", encryption_key_bits, paths.directory
            )
    private = load_private_file(paths.private)
    if not paths.public.exists():
        create_exclusive(paths.public, public_key_pem(private.public_key()))
    if not paths.signing.exists():
        skey = generate_signing_key(signing_algorithm, rsa_bits=signing_key_bits)
        if create_exclusive(paths.signing, signing_key_pem(skey)):
            _log.info("generated %s signing key in %s", signing_algorithm, paths.directory)
    return load_keys(paths.directory)


def load_keys(directory: str | os.PathLike[str], *, require_signing: bool = True) -> CPKeys:
    """Load existing keys without generating anything (e.g. a mounted Secret).

    Raises :class:`KeyFileError` for a key directory writable by group or
    others, a missing, non-regular, unreadable or malformed file or a
    mismatched pair (symlinks are followed, as in a Secret mount). Without
    ``require_signing`` a missing ``signing.pem`` yields ``CPKeys.signing = None``.
    """
    paths = KeyPaths.of(directory)
    private = load_private_file(paths.private)
    public = load_public_file(paths.public)
    if not _same_public(private.public_key(), public):
        raise KeyFileError(f"{paths.public}: does not match {paths.private}")
    signing: SigningKeySet | None = None
    if require_signing or paths.signing.exists():
        signing = load_signing_keys(paths.directory)
    return CPKeys(paths, private, public, signing)


# --------------------------------------------------------------------------- k8s


def k8s_secret_manifest(
    directory: str | os.PathLike[str],
    namespace: str | None = None,
    *,
    name: str = K8S_SECRET_NAME,
) -> str:
    """YAML for the Kubernetes Secret holding the keys of ``directory``.

    A Secret of type Opaque with ``private.pem``, ``public.pem``,
    ``signing.pem`` and any retired signing keys under ``data`` (base64), so
    that mounting it gives the token server the same layout as a local
    directory. The keys are validated first (:func:`load_keys`).

    Security: the output contains the private keys. Pipe it to
    ``kubectl apply -f -``; do not store it or log it.
    """
    paths = KeyPaths.of(directory)
    load_keys(paths.directory, require_signing=False)
    files = [PRIVATE_KEY_FILE, PUBLIC_KEY_FILE]
    if paths.signing.exists():
        files.append(SIGNING_KEY_FILE)
    files.extend(sorted(n for n, _ in retired_signing_files(paths.directory)))
    lines = ["apiVersion: v1", "kind: Secret", "metadata:", f"  name: {_yaml_str(name)}"]
    if namespace:
        lines.append(f"  namespace: {_yaml_str(namespace)}")
    lines += ["type: Opaque", "data:"]
    for fname in files:
        data = read_key_file(paths.directory / fname, secret=False)
        lines.append(f"  {fname}: {base64.b64encode(data).decode('ascii')}")
    return "\n".join(lines) + "\n"


def _yaml_str(value: str) -> str:
    # Kubernetes names are DNS labels; quote anything else so the YAML stays valid.
    if re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", value):
        return value
    return json.dumps(value)
