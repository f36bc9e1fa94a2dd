"""Key generation, persistence, concurrency, malformed files, JWKS, rotation, Secret YAML."""

from __future__ import annotations

import base64
import logging
import multiprocessing
import os
import re
import stat
import threading
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from support.cp import copy_keys, ensure_keys_worker, master_keys_dir
from support.keys import other_key

from ambient_grpc_auth._keyfiles import create_exclusive
from ambient_grpc_auth.controlplane.keys import (
    SIGNING_ALGORITHMS,
    SigningKey,
    SigningKeySet,
    SigningKeyStore,
    ensure_keys,
    ensure_signing_algorithm,
    generate_signing_key,
    jwks,
    k8s_secret_manifest,
    load_keys,
    load_private_key,
    load_public_key,
    load_signing_keys,
    private_key_pem,
    prune_retired_signing_keys,
    public_jwk,
    public_key_pem,
    rotate_signing_key,
)
from ambient_grpc_auth.errors import ConfigurationError, KeyFileError
from ambient_grpc_auth.jwk import jwk_thumbprint, key_from_jwk
from ambient_grpc_auth.testing import FakeClock

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _no_key_bytes(message: str, directory: Path) -> None:
    assert "BEGIN" not in message
    for name in ("private.pem", "signing.pem"):
        p = directory / name
        if p.exists() and p.is_file():
            body = p.read_text(errors="replace").splitlines()[1:3]
            for line in body:
                assert line[:20] not in message


def test_generated_layout_formats_and_modes(tmp_path: Path) -> None:
    d = master_keys_dir()
    assert _mode(d) == 0o700
    for name in ("private.pem", "public.pem", "signing.pem"):
        assert _mode(d / name) == 0o600, name
    priv_text = (d / "private.pem").read_text()
    pub_text = (d / "public.pem").read_text()
    assert priv_text.startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert pub_text.startswith("-----BEGIN PUBLIC KEY-----")
    # ES256 by default: an EC P-256 key in PKCS#8.
    assert (d / "signing.pem").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    priv = serialization.load_pem_private_key(priv_text.encode(), password=None)
    pub = serialization.load_pem_public_key(pub_text.encode())
    assert isinstance(priv, rsa.RSAPrivateKey)
    assert isinstance(pub, rsa.RSAPublicKey)
    assert priv.key_size == 4096
    assert priv.public_key().public_numbers() == pub.public_numbers()
    keys = load_keys(d)
    assert keys.signing is not None
    signing = keys.signing.current.private_key
    # New signing keys are EC P-256 (ES256), distinct from the encryption key.
    assert isinstance(signing, ec.EllipticCurvePrivateKey)
    assert isinstance(signing.curve, ec.SECP256R1)
    assert keys.signing.current.algorithm == "ES256"
    # No temporary files left behind.
    assert sorted(os.listdir(d)) == ["private.pem", "public.pem", "signing.pem"]
    # Nothing secret in the reprs.
    assert "BEGIN" not in repr(keys)
    assert str(signing.private_numbers().private_value) not in repr(keys)
    assert str(keys.private_key.private_numbers().d) not in repr(keys)


def test_keys_persist_across_restarts(tmp_path: Path) -> None:
    d = copy_keys(tmp_path / "k")
    before = {n: (d / n).stat().st_ino for n in os.listdir(d)}
    first = ensure_keys(d)
    second = ensure_keys(d)
    assert {n: (d / n).stat().st_ino for n in os.listdir(d)} == before
    assert first.signing is not None
    assert second.signing is not None
    assert first.signing.current.kid == second.signing.current.kid
    assert first.public_key.public_numbers() == second.public_key.public_numbers()
    assert first.public_pem == (d / "public.pem").read_text()


def test_missing_signing_key_is_added_without_touching_the_pair(tmp_path: Path) -> None:
    d = copy_keys(tmp_path / "k")
    (d / "signing.pem").unlink()
    priv_before = (d / "private.pem").read_bytes()
    keys = ensure_keys(d)
    assert (d / "private.pem").read_bytes() == priv_before
    assert keys.signing is not None
    assert _mode(d / "signing.pem") == 0o600
    assert load_keys(d, require_signing=False).signing is not None


def test_concurrent_first_start_threads_agree(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ambient_grpc_auth.controlplane.keys")
    d = tmp_path / "fresh"
    n = 4
    barrier = threading.Barrier(n)
    results: list[tuple[int, str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait(timeout=30)
            # 2048-bit encryption key: this test is about the race, not the key size.
            keys = ensure_keys(d, encryption_key_bits=2048)
            assert keys.signing is not None
            results.append((keys.public_key.public_numbers().n, keys.signing.current.kid))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert len(results) == n
    assert len(set(results)) == 1
    on_disk = load_keys(d)
    assert on_disk.signing is not None
    assert results[0] == (on_disk.public_key.public_numbers().n, on_disk.signing.current.kid)
    assert sorted(os.listdir(d)) == ["private.pem", "public.pem", "signing.pem"]
    assert _mode(d) == 0o700
    # However many generated a key, exactly one of each was written.
    assert caplog.text.count("encryption key pair") == 1
    assert caplog.text.count("signing key in") == 1


def test_concurrent_first_start_processes_agree(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    d = tmp_path / "fresh"
    n = 2
    barrier = ctx.Barrier(n)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=ensure_keys_worker, args=(str(d), barrier, queue)) for _ in range(n)
    ]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=60) for _ in range(n)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    assert len(set(results)) == 1
    on_disk = load_keys(d)
    assert on_disk.signing is not None
    assert results[0] == (on_disk.public_key.public_numbers().n, on_disk.signing.current.kid)
    assert sorted(os.listdir(d)) == ["private.pem", "public.pem", "signing.pem"]


def test_create_exclusive_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "f.pem"
    assert create_exclusive(target, b"first") is True
    assert create_exclusive(target, b"second") is False
    assert target.read_bytes() == b"first"
    assert _mode(target) == 0o600
    assert os.listdir(tmp_path) == ["f.pem"]


def test_public_without_private_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "k"
    d.mkdir()
    (d / "public.pem").write_bytes((master_keys_dir() / "public.pem").read_bytes())
    with pytest.raises(KeyFileError, match="without private.pem"):
        ensure_keys(d)
    assert not (d / "private.pem").exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("private.pem", b"not a key at all", "not a valid PEM private key"),
        ("private.pem", b"", "not a valid PEM private key"),
        ("public.pem", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "public"),
        ("signing.pem", b"\x00\xff garbage", "not a valid PEM private key"),
    ],
)
def test_malformed_files_raise_clear_errors(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    d = copy_keys(tmp_path / "k")
    (d / name).write_bytes(content)
    with pytest.raises(KeyFileError) as info:
        ensure_keys(d)
    text = str(info.value)
    assert str(d / name) in text
    assert message in text
    _no_key_bytes(text, d)


def test_mismatched_pair(tmp_path: Path) -> None:
    d = copy_keys(tmp_path / "k")
    (d / "public.pem").write_bytes(public_key_pem(other_key().public_key()))
    with pytest.raises(KeyFileError, match="does not match"):
        load_keys(d)


def test_unreadable_and_odd_files(tmp_path: Path) -> None:
    d = copy_keys(tmp_path / "k")
    (d / "signing.pem").unlink()
    (d / "signing.pem").mkdir()
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_keys(d)
    (d / "signing.pem").rmdir()
    (d / "signing.pem").write_bytes(b"x" * (70 * 1024))
    with pytest.raises(KeyFileError, match="too large"):
        load_keys(d)
    with pytest.raises(KeyFileError, match="missing"):
        load_keys(tmp_path / "nowhere")
    if os.geteuid() != 0:  # root reads anything; the check is meaningful only otherwise
        (d / "private.pem").chmod(0)
        with pytest.raises(KeyFileError, match="permission denied"):
            load_keys(d)


def test_key_parsers_reject_wrong_kinds() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = ec_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(KeyFileError, match="not an RSA private key"):
        load_private_key(ec_pem)
    with pytest.raises(KeyFileError, match="not an RSA public key"):
        load_public_key(
            ec_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(KeyFileError, match="smaller than 2048"):
        load_private_key(private_key_pem(small))
    encrypted = small.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(KeyFileError, match="encrypted"):
        load_private_key(encrypted, source="x.pem")
    with pytest.raises(KeyFileError, match="^env: "):
        load_public_key("garbage!", source="env")


def test_public_key_forms_accepted() -> None:
    pem = (master_keys_dir() / "public.pem").read_bytes()
    key = load_public_key(pem.decode())
    # Base64-wrapped PEM, as the platform passes it through single-line channels.
    assert load_public_key(base64.b64encode(pem)).public_numbers() == key.public_numbers()
    pkcs1 = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    assert pkcs1.startswith(b"-----BEGIN RSA PUBLIC KEY-----")
    assert load_public_key(pkcs1).public_numbers() == key.public_numbers()


def test_jwk_thumbprint_rfc7638_vector() -> None:
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
        "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
        "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    raw = base64.urlsafe_b64decode(n + "=" * (-len(n) % 4))
    key = rsa.RSAPublicNumbers(65537, int.from_bytes(raw, "big")).public_key()
    assert jwk_thumbprint(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_public_jwk_and_jwks_hold_only_public_members() -> None:
    keys = load_keys(master_keys_dir())
    assert keys.signing is not None
    sk = keys.signing.current
    jwk = public_jwk(sk.private_key)
    assert jwk["kid"] == sk.kid == jwk_thumbprint(sk.private_key.public_key())
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("EC", "P-256", "ES256")
    assert jwk["use"] == "sig"
    assert not PRIVATE_MEMBERS & set(jwk)
    doc = jwks([sk])
    assert not PRIVATE_MEMBERS & set(doc["keys"][0])
    # A standard consumer turns it back into the same public key.
    parsed = jwt.PyJWKSet.from_dict(doc)[sk.kid].key
    assert parsed.public_numbers() == sk.private_key.public_key().public_numbers()


@pytest.mark.parametrize(
    ("algorithm", "kty", "crv"),
    [("ES256", "EC", "P-256"), ("RS256", "RSA", None), ("EdDSA", "OKP", "Ed25519")],
)
def test_each_signing_algorithm_publishes_its_key_type(
    algorithm: str, kty: str, crv: str | None
) -> None:
    sk = SigningKey.from_private_key(generate_signing_key(algorithm))
    assert sk.algorithm == algorithm
    jwk = sk.public_jwk()
    assert (jwk["kty"], jwk.get("crv"), jwk["alg"], jwk["use"]) == (kty, crv, algorithm, "sig")
    assert not PRIVATE_MEMBERS & set(jwk)
    # The published JWK round-trips through the verifier's own parser.
    vk = key_from_jwk(jwk)
    assert vk.kid == sk.kid
    assert vk.allows(algorithm)
    assert not any(vk.allows(other) for other in SIGNING_ALGORITHMS if other != algorithm)


def test_unknown_signing_algorithm_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="HS256"):
        generate_signing_key("HS256")


def test_k8s_secret_manifest(tmp_path: Path) -> None:
    d = copy_keys(tmp_path / "k")
    text = k8s_secret_manifest(d, namespace="ambient-code")
    assert text.startswith("apiVersion: v1\nkind: Secret\n")
    assert "  name: ambient-cp-token-keypair\n" in text
    assert "  namespace: ambient-code\n" in text
    assert "\ntype: Opaque\ndata:\n" in text
    data: dict[str, str] = {
        m[1]: m[2] for m in re.finditer(r"^  ([a-z0-9._-]+\.pem): (\S+)$", text, re.MULTILINE)
    }
    assert set(data) == {"private.pem", "public.pem", "signing.pem"}
    for name, encoded in data.items():
        assert base64.b64decode(encoded) == (d / name).read_bytes()
    assert "namespace" not in k8s_secret_manifest(d)
    # A mounted copy of the Secret loads like the directory it came from.
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    for name, encoded in data.items():
        (mounted / name).write_bytes(base64.b64decode(encoded))
    assert (
        load_keys(mounted).public_key.public_numbers() == load_keys(d).public_key.public_numbers()
    )
    (d / "public.pem").write_bytes(b"junk")
    with pytest.raises(KeyFileError):
        k8s_secret_manifest(d)


def test_rotation_retires_publishes_and_prunes(tmp_path: Path) -> None:
    d = copy_keys(tmp_path / "k")
    clock = FakeClock(start=1_800_000_000.0)
    old = load_signing_keys(d)
    assert old.retired == ()
    new = rotate_signing_key(d, clock=clock)
    assert new.current.kid != old.current.kid
    assert [k.kid for k in new.retired] == [old.current.kid]
    assert new.retired[0].retired_at == 1_800_000_000.0
    retired_files = [n for n in os.listdir(d) if n.startswith("signing.retired.")]
    assert len(retired_files) == 1
    assert _mode(d / retired_files[0]) == 0o600
    assert _mode(d / "signing.pem") == 0o600
    # Published while tokens signed with it may live (ttl 900 s, grace 60 s).

    def kids(keys: list[SigningKey]) -> list[str]:
        return [k.kid for k in keys]

    now = clock.time()
    assert kids(new.published(now=now + 959, max_token_ttl=900, grace=60)) == kids(
        [new.current, new.retired[0]]
    )
    assert kids(new.published(now=now + 961, max_token_ttl=900, grace=60)) == [new.current.kid]
    # The secret manifest carries the retired key too.
    assert retired_files[0] in k8s_secret_manifest(d)
    assert prune_retired_signing_keys(d, max_token_ttl=900, clock=clock) == []
    clock.advance(901)
    assert prune_retired_signing_keys(d, max_token_ttl=900, clock=clock) == retired_files
    assert load_signing_keys(d).retired == ()


def test_rsa_signing_key_directory_keeps_working_and_moves_to_es256(tmp_path: Path) -> None:
    # A directory made when RS256 was the default: signing.pem is RSA (PKCS#1).
    d = copy_keys(tmp_path / "k")
    (d / "signing.pem").write_bytes(private_key_pem(other_key()))
    old = load_signing_keys(d)
    assert old.current.algorithm == "RS256"  # the algorithm follows the key
    # A plain rotation keeps the algorithm.
    clock = FakeClock(start=1_800_000_000.0)
    same = rotate_signing_key(d, clock=clock)
    assert same.current.algorithm == "RS256"
    clock.advance(1)
    # Asking for ES256 retires the RSA key (still published) and adds an EC one.
    moved = ensure_signing_algorithm(d, "ES256", clock=clock)
    assert moved.current.algorithm == "ES256"
    assert [k.kid for k in moved.retired][0] == same.current.kid
    published = {
        k["kid"]: k for k in jwks(moved.published(now=clock.time(), max_token_ttl=900))["keys"]
    }
    assert published[moved.current.kid]["kty"] == "EC"
    assert published[same.current.kid]["kty"] == "RSA"
    # Already there: no second rotation.
    assert ensure_signing_algorithm(d, "ES256", clock=clock) == load_signing_keys(d)
    assert len(load_signing_keys(d).retired) == 2
    # And back, or to EdDSA, the same way.
    assert ensure_signing_algorithm(d, "EdDSA", clock=clock).current.algorithm == "EdDSA"
    with pytest.raises(ConfigurationError):
        ensure_signing_algorithm(d, "HS256")


def test_interrupted_rotation_is_resolved(tmp_path: Path) -> None:
    d = copy_keys(tmp_path / "k")
    current = load_signing_keys(d).current
    # The first half of a rotation: the key linked under a retired name only.
    os.link(d / "signing.pem", d / f"signing.retired.1800000000.{current.kid[:16]}.pem")
    keys = load_signing_keys(d)
    assert keys.current.kid == current.kid
    assert keys.retired == ()


def test_signing_key_store_follows_rotation(tmp_path: Path) -> None:
    d = copy_keys(tmp_path / "k")
    clock = FakeClock()
    store = SigningKeyStore(d, clock=clock, check_interval=10)
    first = store()
    assert isinstance(first, SigningKeySet)
    rotate_signing_key(d, clock=clock)
    assert store().current.kid == first.current.kid  # not checked yet
    clock.advance(10)
    rotated = store()
    assert rotated.current.kid != first.current.kid
    assert [k.kid for k in rotated.retired] == [first.current.kid]
    # A broken file keeps the last good set.
    (d / "signing.pem").write_bytes(b"broken")
    clock.advance(10)
    assert store().current.kid == rotated.current.kid
