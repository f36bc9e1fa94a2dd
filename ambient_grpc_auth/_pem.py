"""PEM parsing and serialisation of the control plane's keys (shared by the key modules).

Encryption keys are RSA only; token-signing keys are RSA, EC P-256 or Ed25519.

Errors are :class:`~ambient_grpc_auth.errors.KeyFileError` naming the source,
never containing key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ambient_grpc_auth._keyfiles import read_key_file
from ambient_grpc_auth.errors import KeyFileError

__all__ = [
    "MIN_KEY_BITS",
    "SigningPrivateKey",
    "generate_rsa_key",
    "load_private_file",
    "load_private_key",
    "load_public_file",
    "load_public_key",
    "load_signing_file",
    "private_key_pem",
    "public_key_pem",
    "signing_key_pem",
]

#: The private key types a token-signing key may have.
SigningPrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

#: Smallest RSA modulus accepted when loading any key.
MIN_KEY_BITS = 2048


def _pem_text(pem: str | bytes) -> bytes:
    data = pem.encode("utf-8") if isinstance(pem, str) else pem
    stripped = data.strip()
    if stripped and not stripped.startswith(b"-----"):
        # PEM carried through a single-line channel (an environment variable)
        # is base64-encoded once more by the platform; accept that form too.
        try:
            data = base64.b64decode(b"".join(stripped.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("neither PEM nor base64-encoded PEM") from None
    return data


def load_public_key(pem: str | bytes, *, source: str = "public key") -> rsa.RSAPublicKey:
    """Parse an RSA public key from PEM text.

    Accepts "PUBLIC KEY" (SubjectPublicKeyInfo) and "RSA PUBLIC KEY" (PKCS#1)
    PEM, and the same text base64-encoded once more (as the platform passes
    ``AMBIENT_CP_TOKEN_PUBLIC_KEY`` through single-line channels).

    Raises :class:`KeyFileError` naming ``source`` if the text is not an RSA
    public key of at least 2048 bits.
    """
    try:
        key = serialization.load_pem_public_key(_pem_text(pem))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{source}: not a valid PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyFileError(f"{source}: not an RSA public key")
    if key.key_size < MIN_KEY_BITS:
        raise KeyFileError(f"{source}: RSA key is smaller than {MIN_KEY_BITS} bits")
    return key


# Digests of private-key texts that passed the full RSA consistency check.
_validated: set[bytes] = set()
_validated_lock = threading.Lock()
_MAX_VALIDATED = 256


def load_private_key(pem: str | bytes, *, source: str = "private key") -> rsa.RSAPrivateKey:
    """Parse an unencrypted RSA private key from PEM text (PKCS#1 or PKCS#8).

    Raises :class:`KeyFileError` naming ``source`` if the text is not an
    unencrypted RSA private key of at least 2048 bits.
    """
    key = _load_private(pem, source)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyFileError(f"{source}: not an RSA private key")
    return key


def load_signing_key(pem: str | bytes, *, source: str = "signing key") -> SigningPrivateKey:
    """Parse an unencrypted token-signing private key: RSA (at least 2048
    bits), EC on P-256, or Ed25519 (PKCS#1, SEC 1 or PKCS#8 PEM).

    Raises :class:`KeyFileError` naming ``source`` for anything else.
    """
    key = _load_private(pem, source)
    if isinstance(key, ec.EllipticCurvePrivateKey) and not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"{source}: EC signing keys must be on P-256")
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise KeyFileError(f"{source}: not an RSA, EC P-256 or Ed25519 private key")
    return key


def _load_private(pem: str | bytes, source: str) -> object:
    """An unencrypted private key of any type; RSA ones of at least 2048 bits.

    Raises :class:`KeyFileError` naming ``source`` if the text is not an
    unencrypted private key or is an RSA key under 2048 bits. The message
    never contains key material.

    The full consistency check of an RSA key costs ~0.6 s for RSA-4096, so it
    runs once per distinct key text per process (remembered by SHA-256 digest);
    later loads of the same bytes skip it. Thread-safe.
    """
    try:
        data = _pem_text(pem)
    except ValueError:
        raise KeyFileError(f"{source}: not a valid PEM private key") from None
    digest = hashlib.sha256(data).digest()
    with _validated_lock:
        known = digest in _validated
    try:
        key = serialization.load_pem_private_key(
            data, password=None, unsafe_skip_rsa_key_validation=known
        )
    except TypeError:
        raise KeyFileError(
            f"{source}: private key is encrypted; an unencrypted key is required"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{source}: not a valid PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_KEY_BITS:
        raise KeyFileError(f"{source}: RSA key is smaller than {MIN_KEY_BITS} bits")
    with _validated_lock:
        if len(_validated) >= _MAX_VALIDATED:
            _validated.clear()
        _validated.add(digest)
    return key


def private_key_pem(key: rsa.RSAPrivateKey) -> bytes:
    """PKCS#1 "RSA PRIVATE KEY" PEM, unencrypted (the platform's format)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def signing_key_pem(key: SigningPrivateKey) -> bytes:
    """Unencrypted PEM of a signing key: PKCS#1 for RSA (as before), PKCS#8
    for EC and Ed25519 (Ed25519 has no traditional format)."""
    if isinstance(key, rsa.RSAPrivateKey):
        return private_key_pem(key)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: rsa.RSAPublicKey) -> bytes:
    """SubjectPublicKeyInfo "PUBLIC KEY" PEM (the platform's format)."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_file(path: Path) -> rsa.RSAPrivateKey:
    return load_private_key(read_key_file(path), source=str(path))


def load_public_file(path: Path) -> rsa.RSAPublicKey:
    return load_public_key(read_key_file(path, secret=False), source=str(path))


def load_signing_file(path: Path) -> SigningPrivateKey:
    return load_signing_key(read_key_file(path), source=str(path))


def generate_rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)
