"""Helpers for the control-plane tests (keys, proofs, servers).

RSA-4096 generation takes seconds, so the keys are generated once per test
process and size (``functools.cache``) and copied into each test's own
directory.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from multidict import CIMultiDict

from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.keys import ensure_keys
from ambient_grpc_auth.controlplane.server import RunningTokenServer, start_token_server

KEY_FILES = ("private.pem", "public.pem", "signing.pem")


@functools.cache
def master_keys_dir(encryption_key_bits: int = 4096) -> Path:
    """A directory with control-plane keys: RSA-``encryption_key_bits``
    encryption (production size by default; tests about anything but the key
    size may take 2048) and an EC P-256 (ES256) signing key, the default."""
    root = Path(tempfile.mkdtemp(prefix="agauth-cp-"))
    atexit.register(shutil.rmtree, root, True)
    ensure_keys(root / "keys", encryption_key_bits=encryption_key_bits)
    return root / "keys"


@functools.cache
def other_rsa4096() -> rsa.RSAPublicKey:
    """An RSA-4096 public key that is not the control plane's.

    Proofs encrypted under it have the right size but the wrong key. Its
    modulus is a random odd 4096-bit number: encryption only needs the public
    half, and this costs nothing, where generating a real RSA-4096 key pair
    takes 2-8 s on a shared machine.
    """
    n = secrets.randbits(4096) | (1 << 4095) | 1
    return rsa.RSAPublicNumbers(65537, n).public_key()


def copy_keys(dest: Path, *, encryption_key_bits: int = 4096) -> Path:
    """Copy the master keys of that size into ``dest`` (created 0700) and return it."""
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in KEY_FILES:
        shutil.copy2(master_keys_dir(encryption_key_bits) / name, dest / name)
    return dest


def public_pem(directory: Path) -> bytes:
    return (directory / "public.pem").read_bytes()


def runner_style_bearer(public_key_pem: bytes, session_id: str) -> str:
    """Build the proof exactly as the platform's runners do today."""
    public_key = serialization.load_pem_public_key(public_key_pem)
    assert isinstance(public_key, rsa.RSAPublicKey)
    ciphertext = public_key.encrypt(
        session_id.encode("utf-8"),
        padding.OAEP(
            mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        ),
    )
    return base64.b64encode(ciphertext).decode("ascii")


@contextlib.asynccontextmanager
async def serving(config: TokenServerConfig) -> AsyncIterator[RunningTokenServer]:
    server = await start_token_server(config, "127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()


async def get(
    session: aiohttp.ClientSession, url: str, bearer: str | None = None, **kw: Any
) -> tuple[int, str, dict[str, str]]:
    # A multidict, so that a test can send a header twice.
    headers = CIMultiDict(kw.pop("headers", {}))
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    method = kw.pop("method", "GET")
    async with session.request(method, url, headers=headers, **kw) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


async def fetch_jwks(session: aiohttp.ClientSession, url: str) -> jwt.PyJWKSet:
    async with session.get(url) as resp:
        assert resp.status == 200
        return jwt.PyJWKSet.from_dict(await resp.json())


def verify_with(jwks: jwt.PyJWKSet, token: str, *, issuer: str, audience: str) -> dict[str, Any]:
    """Standard verification: kid lookup in the JWKS, only the algorithm the
    JWK names (ES256 by default), iss/aud/exp/iat/sub required."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwks[kid]
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=[key.algorithm_name],
        issuer=issuer,
        audience=audience,
        options={"require": ["exp", "iat", "iss", "aud", "sub"]},
    )
    return claims


def ensure_keys_worker(directory: str, barrier: Any, results: Any) -> None:
    """Process entry point for the concurrent first-start test."""
    barrier.wait(timeout=60)
    # 2048-bit encryption key: this test is about the race, not the key size.
    keys = ensure_keys(directory, encryption_key_bits=2048)
    assert keys.signing is not None
    results.put((keys.public_key.public_numbers().n, keys.signing.current.kid))
