"""JSON Web Keys: conversion between JWKs and public keys (pure, no I/O).

Only asymmetric public keys are handled: RSA (at least 2048 bits), EC on
P-256/P-384/P-521, and Ed25519/Ed448. Symmetric (``oct``) keys and private
members are never loaded, so a verification key can never double as an HMAC
secret. Errors are :class:`ValueError` with fixed messages (no key bytes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeAlias

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

__all__ = [
    "MIN_RSA_BITS",
    "PublicKey",
    "VerificationKey",
    "jwk_public_members",
    "jwk_thumbprint",
    "key_from_jwk",
    "parse_jwks",
    "safe_kid",
]

_log = logging.getLogger(__name__)

#: Shortest RSA modulus accepted (PyJWT's own minimum for RS*/PS*).
MIN_RSA_BITS = 2048
_MAX_KEYS = 100

PublicKey: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

_EC_CURVES: Mapping[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
_EC_NAMES = {curve.name: crv for crv, curve in _EC_CURVES.items()}
_EC_ALGS = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key with its ``kid`` and, when the JWK named one, its ``alg``."""

    kid: str
    key: PublicKey
    alg: str | None = None

    def allows(self, alg: str) -> bool:
        """True when a token signed with ``alg`` may be verified with this key:
        the key type fits the algorithm family (and curve), and a JWK ``alg``
        member, if present, names exactly ``alg``. HMAC never fits."""
        if self.alg is not None and self.alg != alg:
            return False
        if alg in _RSA_ALGS:
            return isinstance(self.key, rsa.RSAPublicKey)
        if alg in _EC_ALGS:
            return (
                isinstance(self.key, ec.EllipticCurvePublicKey)
                and self.key.curve.name == _EC_ALGS[alg]
            )
        if alg == "EdDSA":
            return isinstance(self.key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
        return False

    def __repr__(self) -> str:
        return (
            f"VerificationKey(kid={self.kid!r}, type={type(self.key).__name__}, alg={self.alg!r})"
        )


_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def _b64url_decode(value: object) -> bytes:
    if not isinstance(value, str) or len(value) > 4096 or not _B64URL_RE.fullmatch(value):
        raise ValueError("bad base64url member")
    stripped = value.rstrip("=")
    return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_public_members(key: PublicKey) -> dict[str, str]:
    """The required public members of ``key``'s JWK (``kty`` and the key
    numbers; ``crv`` for EC and OKP), as RFC 7638 lists them."""
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return {
            "kty": "RSA",
            "n": _b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
            "e": _b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
        }
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = _EC_NAMES.get(key.curve.name)
        if crv is None:
            raise ValueError("unsupported curve")
        size = (key.curve.key_size + 7) // 8
        point = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return {
            "kty": "EC",
            "crv": crv,
            "x": _b64url(point[1 : 1 + size]),
            "y": _b64url(point[1 + size :]),
        }
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    crv = "Ed25519" if isinstance(key, ed25519.Ed25519PublicKey) else "Ed448"
    return {"kty": "OKP", "crv": crv, "x": _b64url(raw)}


def jwk_thumbprint(key: PublicKey) -> str:
    """The RFC 7638 SHA-256 thumbprint of ``key`` (base64url, no padding)."""
    canonical = json.dumps(jwk_public_members(key), sort_keys=True, separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def key_from_jwk(jwk: Mapping[str, Any]) -> VerificationKey:
    """Build a verification key from one JWK's public members.

    Raises :class:`ValueError` for symmetric or unsupported keys, bad members,
    RSA keys under 2048 bits, or a JWK not meant for signatures.
    """
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise ValueError("key is not for signatures")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise ValueError("key is not for verification")
    alg = jwk.get("alg")
    if alg is not None and not isinstance(alg, str):
        raise ValueError("bad alg member")
    kty = jwk.get("kty")
    key: PublicKey
    if kty == "RSA":
        n = int.from_bytes(_b64url_decode(jwk.get("n")), "big")
        e = int.from_bytes(_b64url_decode(jwk.get("e")), "big")
        key = rsa.RSAPublicNumbers(e, n).public_key()
        if key.key_size < MIN_RSA_BITS:
            raise ValueError("RSA key too short")
    elif kty == "EC":
        curve = _EC_CURVES.get(str(jwk.get("crv")))
        if curve is None:
            raise ValueError("unsupported curve")
        size = (curve.key_size + 7) // 8
        x, y = _b64url_decode(jwk.get("x")), _b64url_decode(jwk.get("y"))
        if len(x) != size or len(y) != size:
            raise ValueError("bad EC point")
        key = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + x + y)
    elif kty == "OKP":
        x = _b64url_decode(jwk.get("x"))
        if jwk.get("crv") == "Ed25519":
            key = ed25519.Ed25519PublicKey.from_public_bytes(x)
        elif jwk.get("crv") == "Ed448":
            key = ed448.Ed448PublicKey.from_public_bytes(x)
        else:
            raise ValueError("unsupported curve")
    else:
        raise ValueError("unsupported key type")
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > 256):
        raise ValueError("bad kid member")
    return VerificationKey(kid=kid or jwk_thumbprint(key), key=key, alg=alg)


def parse_jwks(document: bytes | str | Mapping[str, Any]) -> Mapping[str, VerificationKey]:
    """Parse a JWKS (``{"keys": [...]}``) into ``{kid: key}``.

    Unusable keys are skipped (logged by kid only); a duplicate kid keeps the
    first. Raises :class:`ValueError` if the document is not a JWKS or holds
    no usable key.
    """
    if isinstance(document, bytes | str):
        try:
            document = json.loads(document)
        except (ValueError, RecursionError):
            raise ValueError("JWKS is not valid JSON") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("JWKS has no 'keys' list")
    keys: dict[str, VerificationKey] = {}
    for entry in document["keys"][:_MAX_KEYS]:
        if not isinstance(entry, Mapping):
            continue
        try:
            key = key_from_jwk(entry)
        except (ValueError, TypeError) as exc:
            _log.info("skipping JWK %r: %s", safe_kid(entry.get("kid")), exc)
            continue
        keys.setdefault(key.kid, key)
    if not keys:
        raise ValueError("JWKS holds no usable key")
    return MappingProxyType(keys)


def safe_kid(kid: object) -> str:
    """A log-safe rendering of a ``kid`` value."""
    return kid[:64] if isinstance(kid, str) else "<none>"
