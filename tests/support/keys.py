"""Key material shared by the tests of every party.

Key generation is slow on a shared machine, so each key is made once per test
process (``functools.cache``). ``signing_key`` is the one trusted key (JWT
signing, proof encryption); ``other_key`` is a second, untrusted one of the
same kind (forgeries, wrong-key checks); ``ec_key`` is a P-256 key.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


@functools.cache
def signing_key() -> rsa.RSAPrivateKey:
    # 2048 bits keeps the suite fast; no format under test depends on the size.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk_of(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str | None) -> dict[str, Any]:
    """The public JWK of ``key``, with ``kid`` when given."""
    family: Any = (
        jwt.algorithms.RSAAlgorithm
        if isinstance(key, rsa.RSAPrivateKey)
        else jwt.algorithms.ECAlgorithm
    )
    doc = json.loads(family.to_jwk(key.public_key()))
    if kid is not None:
        doc["kid"] = kid
    return dict(doc)
