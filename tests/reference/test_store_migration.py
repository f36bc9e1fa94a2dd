"""A session database created before owners carried their issuer keeps working.

The database is built here with the old ``CREATE TABLE`` statements and rows,
then opened by the current store: the column is added, old sessions keep
their messages and seqs, and their owners (bare names) are matched against
the server's default owner issuer only.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from ambient_grpc_auth.principal import Identity
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.engine import Admission, AuthEngine, Verification
from ambient_grpc_auth.testing import FakeClock, FakeIssuer

# The schema of the previous release, verbatim.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    project_id TEXT,
    created_by TEXT,
    created_at_us INTEGER NOT NULL,
    updated_at_us INTEGER NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    session_id TEXT NOT NULL REFERENCES sessions(id),
    seq INTEGER NOT NULL,
    id TEXT NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at_us INTEGER NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
"""
PUSH = "/ambient.v1.SessionService/PushSessionMessage"


def _old_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(OLD_SCHEMA)
        conn.executemany(
            "INSERT INTO sessions (id, name, project_id, created_by, created_at_us,"
            " updated_at_us, last_seq) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                ("legacy-alice", "old", None, "alice", 1_000_000, 1_000_000, 2),
                ("legacy-none", "ownerless", "p1", None, 1_000_000, 1_000_000, 0),
            ],
        )
        conn.executemany(
            "INSERT INTO messages (session_id, seq, id, event_type, payload, created_at_us)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                ("legacy-alice", 1, "m1", "user", "hello", 1_000_001),
                ("legacy-alice", 2, "m2", "assistant", "hi", 1_000_002),
            ],
        )
        conn.commit()
    finally:
        conn.close()


def _columns(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
    finally:
        conn.close()


def test_old_database_is_migrated_in_place(tmp_path: Path) -> None:
    db = tmp_path / "sessions.db"
    _old_database(db)
    assert "created_by_issuer" not in _columns(db)
    with SessionStore(db) as store:
        assert "created_by_issuer" in _columns(db)
        # Old owners come back as bare names: the server decides their issuer.
        assert store.owner_of("legacy-alice") == "alice"
        assert store.owner_of("legacy-none") is None
        assert store.session_exists("legacy-none")
        assert store.get_session("legacy-alice").created_by_user_id == "alice"
        old = store.read_messages("legacy-alice", 0).messages
        assert [(m.seq, m.event_type, m.payload) for m in old] == [
            (1, "user", "hello"),
            (2, "assistant", "hi"),
        ]
        assert store.append("legacy-alice", "assistant", "again").seq == 3
        fresh = store.create_session(
            "new", created_by="alice", created_by_issuer="https://idp.test"
        ).metadata.id
        assert store.owner_of(fresh) == Identity("https://idp.test", "alice")
    # Opening again (or from a second process) migrates nothing twice.
    with SessionStore(db) as store:
        assert store.owner_of("legacy-alice") == "alice"
        assert store.owner_of(fresh) == ("https://idp.test", "alice")
        assert store.read_messages("legacy-alice", 2).messages[0].payload == "again"


@pytest.fixture
def migrated(tmp_path: Path) -> Path:
    db = tmp_path / "sessions.db"
    _old_database(db)
    return db


def _code(engine: AuthEngine, token: str, session_id: str) -> grpc.StatusCode:
    decision = engine.admit(PUSH, (("authorization", "Bearer " + token),), object())
    if isinstance(decision, Verification):
        decision = decision.verify()
    assert isinstance(decision, Admission), decision
    request = SimpleNamespace(session_id=session_id)
    assert decision.check is not None
    outcomes = {
        decision.check(request),
        decision.decide(request),
        asyncio.run(decision.check_async(request)),
    }
    assert len(outcomes) == 1
    (outcome,) = outcomes
    return grpc.StatusCode.OK if outcome is None else outcome.code


@pytest.mark.parametrize("explicit", [False, True])
def test_legacy_owner_matches_the_default_owner_issuer_only(migrated: Path, explicit: bool) -> None:
    clock = FakeClock()
    cp = FakeIssuer("https://cp.test", clock=clock)
    idp1 = FakeIssuer("https://idp-one.test", clock=clock)
    idp2 = FakeIssuer("https://idp-two.test", clock=clock)
    # Default: the first issuer not marked control plane; or chosen explicitly.
    owner_issuer, other = (idp2, idp1) if explicit else (idp1, idp2)
    with SessionStore(migrated) as store:
        config = ServerAuthConfig.from_env(
            environ={},
            issuers=[
                cp.trusted_issuer(control_plane=True),
                idp1.trusted_issuer(),
                idp2.trusted_issuer(),
            ],
            owner_lookup=store.owner_of,
            default_owner_issuer=idp2.issuer if explicit else None,
            clock=clock,
        )
        assert config.default_owner_issuer == owner_issuer.issuer
        engine = AuthEngine(config)
        ok, denied = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
        assert _code(engine, owner_issuer.mint("alice"), "legacy-alice") == ok
        assert _code(engine, other.mint("alice"), "legacy-alice") == denied
        assert _code(engine, cp.mint("alice"), "legacy-alice") == denied
        assert _code(engine, owner_issuer.mint("alice"), "legacy-none") == denied


def test_a_lookup_returning_bare_names_means_the_default_owner_issuer() -> None:
    clock = FakeClock()
    idp1 = FakeIssuer("https://idp-one.test", clock=clock)
    idp2 = FakeIssuer("https://idp-two.test", clock=clock)
    owners: dict[str, Identity | str] = {
        "s-bare": "alice",
        "s-full": Identity(idp2.issuer, "alice"),
    }
    engine = AuthEngine(
        ServerAuthConfig.from_env(
            environ={},
            issuers=[idp1.trusted_issuer(), idp2.trusted_issuer()],
            owner_lookup=owners.get,
            clock=clock,
        )
    )
    ok, denied = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
    assert _code(engine, idp1.mint("alice"), "s-bare") == ok
    assert _code(engine, idp2.mint("alice"), "s-bare") == denied
    assert _code(engine, idp2.mint("alice"), "s-full") == ok
    assert _code(engine, idp1.mint("alice"), "s-full") == denied
