"""Session proofs: v1 wire compatibility, v2 parsing, session-id rule, replay guard."""

from __future__ import annotations

import base64
import json
import threading

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.cp import master_keys_dir, other_rsa4096, runner_style_bearer

from ambient_grpc_auth.controlplane.keys import load_keys
from ambient_grpc_auth.errors import ConfigurationError, ProofError
from ambient_grpc_auth.proof import (
    DecodedProof,
    ReplayGuard,
    SessionIdRule,
    decode_proof,
    encrypt_v1,
    encrypt_v2,
    max_plaintext_bytes,
)
from ambient_grpc_auth.testing import FakeClock

OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)
SID = "session-0123456789abcdef"
NONCE = bytes(range(16))


@pytest.fixture(scope="module")
def priv() -> rsa.RSAPrivateKey:
    return load_keys(master_keys_dir()).private_key


@pytest.fixture(scope="module")
def pub(priv: rsa.RSAPrivateKey) -> rsa.RSAPublicKey:
    return priv.public_key()


def _seal_raw(pub: rsa.RSAPublicKey, plaintext: bytes) -> str:
    return base64.b64encode(pub.encrypt(plaintext, OAEP)).decode()


def _reason(priv: rsa.RSAPrivateKey, bearer: str) -> tuple[str, int]:
    with pytest.raises(ProofError) as info:
        decode_proof(priv, bearer)
    return info.value.reason, info.value.status


# ---------------------------------------------------------------- v1 compatibility


def test_v1_from_runner_decodes(priv: rsa.RSAPrivateKey) -> None:
    bearer = runner_style_bearer((master_keys_dir() / "public.pem").read_bytes(), SID)
    assert len(bearer) == 684  # one RSA-4096 block, std base64 with padding
    assert decode_proof(priv, bearer) == DecodedProof(session_id=SID, version=1)


def test_encrypt_v1_is_what_an_existing_control_plane_decrypts(
    priv: rsa.RSAPrivateKey, pub: rsa.RSAPublicKey
) -> None:
    bearer = encrypt_v1(pub, SID)
    # Standard base64 alphabet with padding, decrypted with plain cryptography calls.
    assert base64.b64encode(base64.b64decode(bearer, validate=True)).decode() == bearer
    assert priv.decrypt(base64.b64decode(bearer), OAEP) == SID.encode()
    assert encrypt_v1(pub, SID) != bearer  # OAEP is randomised


def test_encrypt_refuses_what_does_not_fit(pub: rsa.RSAPublicKey) -> None:
    assert max_plaintext_bytes(pub) == 446
    encrypt_v1(pub, "a" * 446)
    with pytest.raises(ConfigurationError, match="too long"):
        encrypt_v1(pub, "a" * 447)
    with pytest.raises(ConfigurationError):
        encrypt_v1(pub, "")


# ---------------------------------------------------------------- v2


def test_v2_roundtrip(priv: rsa.RSAPrivateKey, pub: rsa.RSAPublicKey) -> None:
    bearer = encrypt_v2(pub, SID, now=1_800_000_000.7, nonce=NONCE)
    proof = decode_proof(priv, bearer)
    nonce_text = base64.urlsafe_b64encode(NONCE).rstrip(b"=").decode()
    assert proof == DecodedProof(SID, 2, 1_800_000_000, nonce_text)
    assert nonce_text not in repr(proof)
    assert SID in repr(proof)
    doc = json.loads(priv.decrypt(base64.b64decode(bearer), OAEP))
    assert doc == {"v": 2, "sid": SID, "ts": 1_800_000_000, "nonce": nonce_text}
    # Random nonces differ.
    a = decode_proof(priv, encrypt_v2(pub, SID, now=1.0))
    b = decode_proof(priv, encrypt_v2(pub, SID, now=1.0))
    assert a.nonce != b.nonce


def test_v2_session_id_bound(pub: rsa.RSAPublicKey) -> None:
    encrypt_v2(pub, "s" * 256, now=1_800_000_000)
    # JSON overhead is 65 bytes with a 10-digit ts: 381 ASCII characters fit.
    encrypt_v2(pub, "s" * 381, now=1_800_000_000)
    with pytest.raises(ConfigurationError, match="too long"):
        encrypt_v2(pub, "s" * 382, now=1_800_000_000)
    with pytest.raises(ConfigurationError, match="nonce"):
        encrypt_v2(pub, SID, now=1, nonce=b"short")


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({"v": 2, "sid": SID, "ts": 1, "nonce": "AAECAwQFBgcICQoLDA0ODw", "x": 1}, "malformed_v2"),
        ({"v": 2, "sid": SID, "ts": "1", "nonce": "AAECAwQFBgcICQoLDA0ODw"}, "malformed_v2"),
        ({"v": 2, "sid": SID, "ts": True, "nonce": "AAECAwQFBgcICQoLDA0ODw"}, "malformed_v2"),
        ({"v": 2, "sid": SID, "ts": 1.5, "nonce": "AAECAwQFBgcICQoLDA0ODw"}, "malformed_v2"),
        ({"v": 2, "sid": SID, "ts": -1, "nonce": "AAECAwQFBgcICQoLDA0ODw"}, "malformed_v2"),
        ({"v": 2, "sid": 12345678, "ts": 1, "nonce": "AAECAwQFBgcICQoLDA0ODw"}, "malformed_v2"),
        ({"v": 2, "sid": "", "ts": 1, "nonce": "AAECAwQFBgcICQoLDA0ODw"}, "malformed_v2"),
        ({"v": 2, "sid": SID, "ts": 1, "nonce": "AAECAwQFBgcICQoLDA0OD"}, "malformed_v2"),
        ({"v": 2, "sid": SID, "ts": 1, "nonce": "AAECAwQFBgcICQoLDA0ODw=="}, "malformed_v2"),
        ({"v": 2, "sid": SID, "ts": 1, "nonce": "AAECAwQFBgcICQoLDA0OD+"}, "malformed_v2"),
        # Same 16 bytes, non-canonical spelling (low bits of the last character set).
        ({"v": 2, "sid": SID, "ts": 1, "nonce": "AAECAwQFBgcICQoLDA0ODx"}, "malformed_v2"),
        ({"v": 2, "sid": SID, "ts": 1}, "malformed_v2"),
        ({"v": 3, "sid": SID, "ts": 1, "nonce": "AAECAwQFBgcICQoLDA0ODw"}, "unsupported_version"),
        ({"v": "2", "sid": SID}, "unsupported_version"),
    ],
)
def test_v2_strict_fields(
    priv: rsa.RSAPrivateKey, pub: rsa.RSAPublicKey, doc: dict[str, object], reason: str
) -> None:
    bearer = _seal_raw(pub, json.dumps(doc).encode())
    assert _reason(priv, bearer) == (reason, 401)


def test_v2_duplicate_keys_refused(priv: rsa.RSAPrivateKey, pub: rsa.RSAPublicKey) -> None:
    text = f'{{"v":2,"sid":"{SID}","sid":"other-session","ts":1,"nonce":"AAECAwQFBgcICQoLDA0ODw"}}'
    assert _reason(priv, _seal_raw(pub, text.encode())) == ("malformed_v2", 401)


@pytest.mark.parametrize("plaintext", ["12345678", '"quoted-session"', '{"sid":"x"}', "{not json"])
def test_non_versioned_plaintext_is_v1(
    priv: rsa.RSAPrivateKey, pub: rsa.RSAPublicKey, plaintext: str
) -> None:
    assert decode_proof(priv, _seal_raw(pub, plaintext.encode())) == DecodedProof(plaintext, 1)


# ---------------------------------------------------------------- envelope errors


def test_envelope_errors(priv: rsa.RSAPrivateKey, pub: rsa.RSAPublicKey) -> None:
    good = encrypt_v1(pub, SID)
    assert _reason(priv, "") == ("bad_length", 401)
    assert _reason(priv, good[:-4]) == ("bad_length", 401)
    assert _reason(priv, good + "AAAA") == ("bad_length", 401)
    assert _reason(priv, "*" + good[1:]) == ("bad_base64", 401)
    # URL-safe alphabet is not standard base64.
    assert _reason(priv, "-" + good[1:]) == ("bad_base64", 401)
    # 512 bytes -> 684 characters ending in "=": the padding is required.
    assert good.endswith("=")
    assert _reason(priv, good[:-1]) == ("bad_length", 401)
    assert _reason(priv, good[:-1] + "A") == ("bad_length", 401)  # decodes to 513 bytes
    # Right size, not a valid OAEP block under our key.
    assert _reason(priv, "A" * 683 + "=") == ("decrypt_failed", 401)
    wrong_key = base64.b64encode(other_rsa4096().encrypt(SID.encode(), OAEP))
    assert _reason(priv, wrong_key.decode()) == ("decrypt_failed", 401)
    # Right key, wrong OAEP hash (SHA-1): refused like any other decryption failure.
    sha1 = padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None
    )
    assert _reason(priv, base64.b64encode(pub.encrypt(SID.encode(), sha1)).decode()) == (
        "decrypt_failed",
        401,
    )
    assert _reason(priv, _seal_raw(pub, b"\xff\xfe-not-utf8")) == ("not_utf8", 401)


def test_errors_never_echo_the_proof(priv: rsa.RSAPrivateKey, pub: rsa.RSAPublicKey) -> None:
    bearer = base64.b64encode(other_rsa4096().encrypt(SID.encode(), OAEP)).decode()
    with pytest.raises(ProofError) as info:
        decode_proof(priv, bearer)
    assert bearer[:16] not in str(info.value)
    assert SID not in str(info.value)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.text(min_size=0, max_size=700)
    | st.text("ABCDEFGHabcdefgh0123+/=", min_size=684, max_size=684)
)
def test_arbitrary_input_only_raises_proof_error(priv: rsa.RSAPrivateKey, value: str) -> None:
    with pytest.raises(ProofError) as info:
        decode_proof(priv, value)
    assert info.value.status == 401


# ---------------------------------------------------------------- session id rule


@pytest.mark.parametrize(
    ("sid", "reason"),
    [
        ("short", "session_id_too_short"),
        ("1234567", "session_id_too_short"),
        ("x" * 257, "session_id_too_long"),
        ("session with-space", "session_id_charset"),
        ("session\twith-tab", "session_id_charset"),
        ("session-newline\n", "session_id_charset"),
        ("session\u00a0nbsp", "session_id_charset"),
        ("session\x1b[31mred", "session_id_charset"),
        ("session\u2028sep", "session_id_charset"),
    ],
)
def test_default_rule_refuses(sid: str, reason: str) -> None:
    with pytest.raises(ProofError) as info:
        SessionIdRule().validate(sid)
    assert (info.value.reason, info.value.status) == (reason, 403)


def test_default_rule_accepts() -> None:
    rule = SessionIdRule()
    for sid in ("12345678", "session-abc_DEF.123", "x" * 256, "sessión-ünïcode"):
        assert rule.validate(sid) == sid


def test_pattern_rule_fullmatch() -> None:
    rule = SessionIdRule(pattern=r"[a-z0-9-]+")
    assert rule.validate("session-abc123") == "session-abc123"
    with pytest.raises(ProofError, match="session_id_pattern"):
        rule.validate("session-abc123!")  # a prefix match is not enough
    with pytest.raises(ConfigurationError):
        SessionIdRule(pattern="([")
    with pytest.raises(ConfigurationError):
        SessionIdRule(min_length=10, max_length=5)


# ---------------------------------------------------------------- replay guard


def _v2(sid: str = SID, ts: int = 1_800_000_000, nonce: str = "n" * 21 + "A") -> DecodedProof:
    return DecodedProof(sid, 2, ts, nonce)


def test_guard_accepts_once_and_refuses_replay() -> None:
    clock = FakeClock(1_800_000_000)
    guard = ReplayGuard(window_seconds=60, clock=clock)
    guard.check(_v2())
    with pytest.raises(ProofError, match="replayed") as info:
        guard.check(_v2())
    assert info.value.status == 401
    guard.check(_v2(nonce="m" * 21 + "A"))  # another nonce
    guard.check(_v2(sid="session-other-1"))  # same nonce, another session
    assert len(guard) == 3


def test_guard_window_edges() -> None:
    clock = FakeClock(1_800_000_000)
    guard = ReplayGuard(window_seconds=60, clock=clock)
    guard.check(_v2(ts=1_800_000_000 - 60, nonce="a" * 21 + "A"))
    guard.check(_v2(ts=1_800_000_000 + 60, nonce="b" * 21 + "A"))
    with pytest.raises(ProofError, match="stale"):
        guard.check(_v2(ts=1_800_000_000 - 61, nonce="c" * 21 + "A"))
    with pytest.raises(ProofError, match="future"):
        guard.check(_v2(ts=1_800_000_000 + 61, nonce="d" * 21 + "A"))


def test_guard_replay_after_expiry_is_stale_and_memory_is_released() -> None:
    clock = FakeClock(1_800_000_000)
    guard = ReplayGuard(window_seconds=60, clock=clock)
    guard.check(_v2())
    clock.advance(61)
    with pytest.raises(ProofError, match="stale"):
        guard.check(_v2())
    clock.advance(60)  # 2 * window after acceptance
    guard.check(_v2(ts=int(clock.time()), nonce="z" * 21 + "A"))
    assert len(guard) == 1  # the first entry expired


def test_guard_v1_policy() -> None:
    ReplayGuard().check(DecodedProof(SID, 1))
    with pytest.raises(ProofError, match="fresh_proof_required") as info:
        ReplayGuard(require_fresh_proof=True).check(DecodedProof(SID, 1))
    assert info.value.status == 401


def test_guard_bounded_with_safe_eviction() -> None:
    clock = FakeClock(1_800_000_000)
    guard = ReplayGuard(window_seconds=60, max_entries=3, clock=clock)
    t0 = 1_800_000_000
    for i in range(3):
        guard.check(_v2(ts=t0 - 10 + i, nonce=f"{i}" * 21 + "A"))
    guard.check(_v2(ts=t0, nonce="x" * 21 + "A"))  # evicts the oldest (ts t0-10)
    assert len(guard) == 3
    # The evicted proof cannot come back, although its nonce was forgotten.
    with pytest.raises(ProofError, match="stale"):
        guard.check(_v2(ts=t0 - 10, nonce="0" * 21 + "A"))
    # Remembered ones are still refused as replays; newer proofs pass.
    with pytest.raises(ProofError, match="replayed"):
        guard.check(_v2(ts=t0, nonce="x" * 21 + "A"))
    guard.check(_v2(ts=t0 + 1, nonce="y" * 21 + "A"))
    for i in range(50):
        guard.check(_v2(ts=t0 + 2 + i % 50, nonce=f"{i:021d}A"))
    assert len(guard) == 3


def test_guard_thread_safety_one_winner() -> None:
    guard = ReplayGuard(clock=FakeClock(1_800_000_000))
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def attempt() -> None:
        barrier.wait(timeout=10)
        try:
            guard.check(_v2())
            outcomes.append("ok")
        except ProofError as exc:
            outcomes.append(exc.reason)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(outcomes) == ["ok"] + ["replayed"] * 7
