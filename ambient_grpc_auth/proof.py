"""Session proofs: what a runner sends to ``GET /token`` to show which session it runs.

Two versions share one envelope: standard base64 (with padding) of
RSA-OAEP (MGF1-SHA256, SHA-256, no label) under the control plane's public key.

- v1 (the platform's wire contract): the plaintext is the UTF-8 session id.
- v2 (replay resistant): the plaintext is compact JSON
  ``{"v":2,"sid":<session id>,"ts":<unix seconds>,"nonce":<base64url of 16 random bytes>}``.
  The control plane accepts it once, and only close to ``ts``
  (:class:`ReplayGuard`).

Security caveat: the public key is public, so anyone who knows a valid session
id can build a v1 proof for it; v1 is only as strong as session ids are hard to
guess. v2 additionally stops a captured proof from being replayed later.

Runner side: :func:`encrypt_v1`, :func:`encrypt_v2`. Control-plane side:
:func:`decode_proof`, :class:`SessionIdRule`, :class:`ReplayGuard`. All
refusals are :class:`~ambient_grpc_auth.errors.ProofError` with a fixed reason
and the HTTP status to answer (401 or 403); nothing in them echoes the proof.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.errors import ConfigurationError, ProofError

__all__ = [
    "NONCE_BYTES",
    "DecodedProof",
    "ReplayGuard",
    "SessionIdRule",
    "decode_proof",
    "encrypt_v1",
    "encrypt_v2",
    "max_plaintext_bytes",
]

NONCE_BYTES = 16
_NONCE_B64_LEN = 22  # base64url of 16 bytes, unpadded
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{22}")
_V2_KEYS = frozenset({"v", "sid", "ts", "nonce"})
# Anything beyond this is not a plausible unix time in seconds (year ~36800).
_MAX_TS = 2**40
# SHA-256 digest size: OAEP overhead is 2 * hLen + 2 bytes.
_HASH_LEN = 32


def _oaep() -> padding.OAEP:
    return padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
    )


def max_plaintext_bytes(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> int:
    """Largest OAEP-SHA256 plaintext for ``key`` (446 bytes for RSA-4096)."""
    return key.key_size // 8 - 2 * _HASH_LEN - 2


def _seal(public_key: rsa.RSAPublicKey, plaintext: bytes) -> str:
    if len(plaintext) > max_plaintext_bytes(public_key):
        raise ConfigurationError(
            f"session proof of {len(plaintext)} bytes does not fit an "
            f"RSA-{public_key.key_size} OAEP-SHA256 block "
            f"(max {max_plaintext_bytes(public_key)}); the session id is too long"
        )
    return base64.b64encode(public_key.encrypt(plaintext, _oaep())).decode("ascii")


def encrypt_v1(public_key: rsa.RSAPublicKey, session_id: str) -> str:
    """A v1 proof: std base64 of RSA-OAEP-SHA256(session id) under ``public_key``.

    Byte-compatible with the platform's runners. Raises ConfigurationError if
    the session id is empty or too long for the key (446 UTF-8 bytes for RSA-4096).
    """
    if not session_id:
        raise ConfigurationError("session id is empty")
    return _seal(public_key, session_id.encode("utf-8"))


def encrypt_v2(
    public_key: rsa.RSAPublicKey, session_id: str, *, now: float, nonce: bytes | None = None
) -> str:
    """A v2 (replay-resistant) proof for ``session_id`` issued at ``now``.

    ``nonce`` defaults to 16 fresh random bytes; pass one only in tests.
    The JSON document must fit one OAEP block: with RSA-4096 that leaves room
    for session ids of up to 381 ASCII characters (10-digit ``ts``); a longer id raises
    ConfigurationError.
    """
    if not session_id:
        raise ConfigurationError("session id is empty")
    raw = secrets.token_bytes(NONCE_BYTES) if nonce is None else nonce
    if len(raw) != NONCE_BYTES:
        raise ConfigurationError(f"nonce must be {NONCE_BYTES} bytes")
    doc = {
        "v": 2,
        "sid": session_id,
        "ts": int(now),
        "nonce": base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii"),
    }
    return _seal(public_key, json.dumps(doc, separators=(",", ":")).encode("utf-8"))


@dataclass(frozen=True)
class DecodedProof:
    """A decrypted, well-formed proof (not yet checked against any policy).

    ``issued_at`` and ``nonce`` are set for v2 only. The repr omits the nonce.
    """

    session_id: str
    version: int
    issued_at: int | None = None
    nonce: str | None = field(default=None, repr=False)


def _b64_len(nbytes: int) -> int:
    return 4 * ((nbytes + 2) // 3)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate members could be read differently by another parser; a JSON
    # object that ambiguous is no session id either, so refuse it outright.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ProofError("malformed_v2", 401)
        out[k] = v
    return out


def decode_proof(private_key: rsa.RSAPrivateKey, bearer_b64: str) -> DecodedProof:
    """Decrypt and parse a proof (v1 or v2).

    Raises ProofError(reason, 401) for: wrong length (``bad_length``), bad
    base64 (``bad_base64``), decryption failure (``decrypt_failed``),
    non-UTF-8 plaintext (``not_utf8``), a malformed v2 document
    (``malformed_v2``) or a JSON object proof of an unknown version
    (``unsupported_version``). Every decryption failure has the same reason
    and status, so the answer reveals nothing about the padding.

    A plaintext that is a JSON object with a ``"v"`` member is a versioned
    proof; anything else (including ``"12345678"``, which is valid JSON but
    not an object) is a v1 session id, returned as is for :class:`SessionIdRule`.
    A JSON object with duplicate members is refused (``malformed_v2``): it
    could be read differently by another parser.

    CPU cost is one RSA private-key operation (~6-10 ms for RSA-4096): call it
    off the event loop. Thread-safe.
    """
    expected_len = _b64_len(private_key.key_size // 8)
    # Cheap checks before any decoding: the ciphertext is exactly one RSA block.
    if not isinstance(bearer_b64, str) or len(bearer_b64) != expected_len:
        raise ProofError("bad_length", 401)
    try:
        ciphertext = base64.b64decode(bearer_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ProofError("bad_base64", 401) from None
    if len(ciphertext) != private_key.key_size // 8:
        raise ProofError("bad_length", 401)
    try:
        plaintext = private_key.decrypt(ciphertext, _oaep())
    except ValueError:
        raise ProofError("decrypt_failed", 401) from None
    try:
        text = plaintext.decode("utf-8")
    except UnicodeDecodeError:
        raise ProofError("not_utf8", 401) from None
    if text.startswith("{"):
        try:
            doc = json.loads(text, object_pairs_hook=_reject_duplicates)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and "v" in doc:
            return _parse_versioned(doc)
    return DecodedProof(session_id=text, version=1)


def _parse_versioned(doc: dict[str, Any]) -> DecodedProof:
    version = doc["v"]
    if type(version) is not int or version != 2:
        raise ProofError("unsupported_version", 401)
    if frozenset(doc) != _V2_KEYS:
        raise ProofError("malformed_v2", 401)
    sid, ts, nonce = doc["sid"], doc["ts"], doc["nonce"]
    if type(sid) is not str or not sid:
        raise ProofError("malformed_v2", 401)
    if type(ts) is not int or not 0 <= ts < _MAX_TS:
        raise ProofError("malformed_v2", 401)
    if type(nonce) is not str or len(nonce) != _NONCE_B64_LEN or not _NONCE_RE.fullmatch(nonce):
        raise ProofError("malformed_v2", 401)
    # 22 base64url characters carry 132 bits; the last 4 must be zero for a
    # canonical 16-byte value, so that one nonce has one spelling.
    if nonce[-1] not in "AQgw":
        raise ProofError("malformed_v2", 401)
    return DecodedProof(session_id=sid, version=2, issued_at=ts, nonce=nonce)


@dataclass(frozen=True)
class SessionIdRule:
    """What counts as a valid session id; violations are ProofError(..., 403).

    Default (the platform's rule): at least ``min_length`` (8) characters, at
    most ``max_length`` (256), no whitespace. Control characters and other
    non-printable characters are refused as well, so that an id is always safe
    to log. ``pattern``, when set, must also match the whole id (``fullmatch``).
    """

    min_length: int = 8
    max_length: int = 256
    pattern: str | None = None
    _compiled: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.max_length:
            raise ConfigurationError("session id rule: need 1 <= min_length <= max_length")
        if self.pattern is not None:
            try:
                compiled = re.compile(self.pattern)
            except re.error as exc:
                raise ConfigurationError(
                    f"session id pattern is not a valid regex: {exc}"
                ) from None
            object.__setattr__(self, "_compiled", compiled)

    def validate(self, session_id: str) -> str:
        """Return ``session_id`` if valid; raise ProofError(reason, 403) if not.

        Reasons: ``session_id_too_short``, ``session_id_too_long``,
        ``session_id_charset``, ``session_id_pattern``.
        """
        if len(session_id) < self.min_length:
            raise ProofError("session_id_too_short", 403)
        if len(session_id) > self.max_length:
            raise ProofError("session_id_too_long", 403)
        # isprintable() is False for every whitespace except " ", and for controls.
        if " " in session_id or not session_id.isprintable():
            raise ProofError("session_id_charset", 403)
        if self._compiled is not None and not self._compiled.fullmatch(session_id):
            raise ProofError("session_id_pattern", 403)
        return session_id


# Kept past the last instant a proof could still be fresh, so the inclusive
# freshness bound and the expiry never meet at the same instant (and small
# drift between the wall and monotonic clocks cannot open a gap).
_RETENTION_MARGIN = 1.0


class ReplayGuard:
    """Freshness and single use for v2 proofs.

    A v2 proof is accepted only if ``|now - ts| <= window_seconds`` and its
    (session id, nonce) pair has not been accepted before. Accepted pairs are
    remembered for ``2 * window_seconds`` plus a margin (monotonic clock),
    which covers every moment at which their ``ts`` could still pass the
    (inclusive) freshness check, boundary instant included.

    Memory is bounded by ``max_entries``. When the table is full of unexpired
    entries the oldest entry is evicted *safely*: the guard raises a floor and
    from then on refuses every proof whose ``ts`` is not above the ``ts`` of
    any evicted entry (reason ``stale``), so an evicted nonce can never be
    replayed. The cost falls on freshness, not on safety: under a flood that
    fills the table within one window, proofs issued in the same second as an
    evicted one are refused and the runner retries with a new proof. The
    default 100 000 entries holds ~800 accepted v2 proofs per second sustained
    over the 2-window retention (RSA-4096 decryption manages ~100-200 per core
    per second); each entry costs roughly 200 bytes.

    v1 proofs pass unless ``require_fresh_proof`` is set (reason
    ``fresh_proof_required``). Refusals are ProofError(reason, 401): ``stale``,
    ``future``, ``replayed``.

    Thread-safe (one lock; each check is O(1) amortised). Replay protection
    assumes the wall clock does not step backwards by more than the window.
    """

    def __init__(
        self,
        *,
        window_seconds: float = 60.0,
        max_entries: int = 100_000,
        require_fresh_proof: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if window_seconds <= 0 or max_entries < 1:
            raise ConfigurationError("replay guard: window and max_entries must be positive")
        self.window_seconds = window_seconds
        self.max_entries = max_entries
        self.require_fresh_proof = require_fresh_proof
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (expiry on the monotonic clock, ts); insertion order = expiry order.
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._floor = -1

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def check(self, proof: DecodedProof) -> None:
        """Accept ``proof`` (recording its nonce) or raise ProofError(reason, 401)."""
        if proof.version == 1:
            if self.require_fresh_proof:
                raise ProofError("fresh_proof_required", 401)
            return
        if proof.issued_at is None or proof.nonce is None:
            raise ProofError("malformed_v2", 401)
        ts = proof.issued_at
        now = self._clock.time()
        if ts < now - self.window_seconds:
            raise ProofError("stale", 401)
        if ts > now + self.window_seconds:
            raise ProofError("future", 401)
        # The NUL separator cannot occur in a valid session id or nonce.
        key = f"{proof.session_id}\x00{proof.nonce}"
        mono = self._clock.monotonic()
        with self._lock:
            self._expire(mono)
            if ts <= self._floor:
                raise ProofError("stale", 401)
            if key in self._seen:
                raise ProofError("replayed", 401)
            while len(self._seen) >= self.max_entries:
                _, (_, evicted_ts) = self._seen.popitem(last=False)
                self._floor = max(self._floor, evicted_ts)
            if ts <= self._floor:
                raise ProofError("stale", 401)
            self._seen[key] = (mono + 2 * self.window_seconds + _RETENTION_MARGIN, ts)

    def _expire(self, mono: float) -> None:
        seen = self._seen
        while seen:
            first = next(iter(seen.values()))
            if first[0] > mono:
                break
            seen.popitem(last=False)
