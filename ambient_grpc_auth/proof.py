"""Session proofs: what a runner sends to ``GET /token`` to show which session it runs.

Two versions share one envelope: standard base64 (with padding) of
RSA-OAEP (MGF1-SHA256, SHA-256, no label) under the control plane's public key.

- v1 (the platform's wire contract): the plaintext is the UTF-8 session id.
- v2 (replay resistant): the plaintext is compact JSON
  ``{"v":2,"sid":<session id>,"ts":<unix seconds>,"nonce":<base64url of 16 random bytes>}``.
  The control plane accepts it once, and only close to ``ts``
  (:class:`~ambient_grpc_auth.controlplane.replay.ReplayGuard`).

Security caveat: the public key is public, so anyone who knows a valid session
id can build a v1 proof for it; v1 is only as strong as session ids are hard to
guess. v2 additionally stops a captured proof from being replayed later.

A third form binds the runner to its pod: ``pod`` is a v2 proof in
``Authorization`` plus the runner's projected Kubernetes service-account token
(audience: the control plane) in the :data:`POD_TOKEN_HEADER` header. The
service-account token is a JWT of 1-2 KB, far beyond one OAEP block (446
bytes for RSA-4096), so it travels beside the proof, not inside it. The
control plane verifies it against the cluster issuer's keys and issues a
token only for the session that service account is bound to
(:mod:`ambient_grpc_auth.controlplane.podproof`).

Negotiation: a control plane that understands more than v1 advertises the
versions it accepts (:data:`PROOF_VERSIONS_HEADER` on every response, and
:data:`PROOF_VERSIONS_FIELD` in its discovery document); a runner sends v2 or
``pod`` only to a control plane that advertises it, v1 otherwise (the
platform's control plane has no v2 parser and would take the whole JSON
document for the session id).

Runner side: :func:`encrypt_v1`, :func:`encrypt_v2`. Control-plane side:
:func:`decode_proof`, :class:`SessionIdRule` (replay protection is the
control plane's own: :mod:`ambient_grpc_auth.controlplane.replay`). All
refusals are :class:`~ambient_grpc_auth.errors.ProofError` with a fixed reason
and the HTTP status to answer (401 or 403); nothing in them echoes the proof.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ambient_grpc_auth.errors import ConfigurationError, ProofError

__all__ = [
    "DEFAULT_SESSION_ID_RULE",
    "NONCE_BYTES",
    "POD_TOKEN_HEADER",
    "PROOF_VERSIONS",
    "PROOF_VERSIONS_FIELD",
    "PROOF_VERSIONS_HEADER",
    "DecodedProof",
    "SessionIdRule",
    "decode_proof",
    "encrypt_v1",
    "encrypt_v2",
    "format_proof_versions",
    "max_plaintext_bytes",
    "parse_proof_versions",
]

#: The request header carrying the runner's service-account token (``pod`` proofs).
POD_TOKEN_HEADER = "X-Ambient-Pod-Token"  # noqa: S105 (a header name)
#: The response header listing the proof versions a control plane accepts.
PROOF_VERSIONS_HEADER = "X-Ambient-Proof-Versions"
#: The discovery-document member listing them.
PROOF_VERSIONS_FIELD = "ambient_proof_versions_supported"
#: Every proof version, weakest first.
PROOF_VERSIONS: tuple[str, ...] = ("v1", "v2", "pod")

NONCE_BYTES = 16
_NONCE_B64_LEN = 22  # base64url of 16 bytes, unpadded
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{22}")
_V2_KEYS = frozenset({"v", "sid", "ts", "nonce"})
# Anything beyond this is not a plausible unix time in seconds (year ~36800).
_MAX_TS = 2**40
# SHA-256 digest size: OAEP overhead is 2 * hLen + 2 bytes.
_HASH_LEN = 32


def format_proof_versions(versions: frozenset[str] | set[str] | tuple[str, ...]) -> str:
    """``"v1,v2,pod"``: the known versions of ``versions``, weakest first."""
    return ",".join(v for v in PROOF_VERSIONS if v in versions)


def parse_proof_versions(advertised: object) -> frozenset[str]:
    """The known proof versions in an advertisement: a comma-separated header
    value or a JSON list of strings. Unknown entries and anything malformed
    are ignored (an empty set means "nothing advertised": use v1)."""
    if isinstance(advertised, str):
        items: list[object] = list(advertised.split(",")[:16])
    elif isinstance(advertised, list):
        items = advertised[:16]
    else:
        return frozenset()
    return frozenset(
        i.strip().lower()
        for i in items
        if isinstance(i, str) and i.strip().lower() in PROOF_VERSIONS
    )


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


_PROBLEMS = {
    "session_id_too_short": "is too short",
    "session_id_too_long": "is too long",
    "session_id_charset": "contains whitespace or control characters",
    "session_id_pattern": "does not match the pattern",
}


@dataclass(frozen=True)
class SessionIdRule:
    """What counts as a valid session id; violations are ProofError(..., 403).

    The default is the platform's rule (at least 8 characters, no
    whitespace) with an upper bound. Control characters and other
    non-printable characters are refused as well, so that an id is always safe
    to log.
    """

    #: Fewest characters an id may have (the platform's rule: 8).
    min_length: int = 8
    #: Most characters an id may have.
    max_length: int = 256
    #: A regular expression the whole id must also match (``fullmatch``), if set.
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

    def describe(self) -> str:
        """The rule in words, for help texts and error messages."""
        text = f"{self.min_length} to {self.max_length} printable characters, no whitespace"
        return text + (f", matching {self.pattern}" if self.pattern is not None else "")

    def check(self, session_id: object, *, what: str = "session id") -> str:
        """Client-side :meth:`validate`: the same rule, but a violation is a
        :class:`ConfigurationError` naming ``what`` (e.g. ``"SESSION_ID"``),
        the problem and the rule, so it is caught before any network call.
        The id itself is never quoted (with it, anyone holding the public key
        can build a v1 proof)."""
        if not isinstance(session_id, str):
            raise ConfigurationError(f"{what} must be a string")
        try:
            return self.validate(session_id)
        except ProofError as exc:
            problem = _PROBLEMS.get(exc.reason, "is not valid")
            raise ConfigurationError(
                f"{what} {problem} ({len(session_id)} characters); "
                f"a session id has {self.describe()}"
            ) from None

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


#: The platform's rule, as the control plane applies it by default; runners
#: check their session id against it before sending a proof.
DEFAULT_SESSION_ID_RULE = SessionIdRule()
