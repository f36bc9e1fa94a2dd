"""SQLite storage for the reference SessionService.

Everything here is shared by the sync servicer (:mod:`ambient_grpc_auth.reference.servicer`)
and its ``grpc.aio`` twin (:mod:`ambient_grpc_auth.reference.aio.servicer`): the store,
argument validation, the push permission rule and the mapping of every
refusal to a gRPC status (:func:`status_of`).

Watch design: a watcher subscribes *before* it reads, then repeatedly takes
the messages with ``seq > last_sent`` in bounded batches and waits for a
notification that a higher seq was committed (the store announces each commit
on its :class:`~ambient_grpc_auth.reference.hub.Hub`). The database is the
source of truth; the hub's bounded tail of recently committed messages saves
live watchers a database read per message, and is used only when it holds
``last_sent + 1`` and the contiguous run after it. A slow watcher therefore
costs no memory (it falls back to the database), and the replay/live seam can
have neither a gap nor a duplicate: anything a read did not see was
committed, and therefore announced, after the subscription. Notifications
are process-local: two processes sharing a database file keep consistent
seqs (``BEGIN IMMEDIATE``), but watchers only wake for writes made through
their own store.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import unicodedata
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

import grpc

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.errors import AmbientAuthError, ConfigurationError
from ambient_grpc_auth.principal import Identity, Principal
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2
from ambient_grpc_auth.reference.hub import Hub, Subscription

__all__ = [
    "BEHIND_STATUS",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MAX_EVENT_TYPE_CHARS",
    "MAX_ID_CHARS",
    "MAX_NAME_CHARS",
    "PAGE_BYTES",
    "PAGE_SIZE",
    "WATCH_MAX_LAG_CHARS",
    "WATCH_MAX_LAG_MESSAGES",
    "WATCH_MAX_SEND_WAIT",
    "MessagePage",
    "SessionStore",
    "SessionStoreError",
    "check_push_allowed",
    "ended_status",
    "status_of",
    "validate_watch",
]

_log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD_BYTES: Final = 1 << 20
#: Longest session id accepted (same bound as the server's ownership policy).
MAX_ID_CHARS: Final = 256
MAX_EVENT_TYPE_CHARS: Final = 256
MAX_NAME_CHARS: Final = 1024
#: A watcher reads at most this many rows, or about PAGE_BYTES of payload, at once.
PAGE_SIZE: Final = 500
PAGE_BYTES: Final = 4 << 20
SESSION_KIND: Final = "Session"
SESSION_HREF_PREFIX: Final = "/api/ambient/v1/sessions/"
_OWNER_CACHE_SIZE: Final = 4096
_MAX_SEQ: Final = (1 << 63) - 1  # SQLite INTEGER and proto int64 limit

# ``created_by_issuer`` is NULL for sessions stored before owners carried
# their issuer (and for owners without one): :meth:`SessionStore.owner_of`
# returns their owner as a bare name, which the server matches against its
# default owner issuer. Older databases get the column on open (_migrate).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    project_id TEXT,
    created_by TEXT,
    created_at_us INTEGER NOT NULL,
    updated_at_us INTEGER NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    created_by_issuer TEXT
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


class SessionStoreError(AmbientAuthError):
    """A store operation was refused.

    ``code`` is the gRPC status the peer sees and ``message`` a short, fixed,
    generic text (it never echoes ids, payloads or credentials).
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_of(error: SessionStoreError) -> tuple[grpc.StatusCode, str]:
    """The status code and details sent to the peer for ``error``.

    The single place where refusals become statuses, for sync and aio alike.
    """
    return error.code, error.message


def ended_status(subscription: Subscription) -> tuple[grpc.StatusCode, str] | None:
    """How a watch whose subscription ended finishes: UNAVAILABLE when the
    store was closed (the client should resume elsewhere), else normally (None)."""
    return status_of(_closed()) if subscription.hub_closed else None


#: How a watch that fell behind ends: ABORTED, which the client helpers
#: (:func:`ambient_grpc_auth.client.sessions.watch` and its aio twin) resume
#: from their last delivered seq, reading the backlog at their own pace.
BEHIND_STATUS: Final = (grpc.StatusCode.ABORTED, "watch fell behind; resume from after_seq")
#: A watch more than this many messages, or payload characters, behind what
#: was published since it began, after a send that waited at least
#: :data:`WATCH_MAX_SEND_WAIT` seconds for its client, is ended with
#: :data:`BEHIND_STATUS`: its client is not reading, and the backlog is better
#: read from the database later, at the client's pace. (A client that reads
#: promptly is never cut, however far a burst of pushes puts it behind.)
WATCH_MAX_LAG_MESSAGES: Final = 1024
WATCH_MAX_LAG_CHARS: Final = 1 << 20
WATCH_MAX_SEND_WAIT: Final = 1.0


def _invalid(message: str) -> SessionStoreError:
    return SessionStoreError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _not_found() -> SessionStoreError:
    return SessionStoreError(grpc.StatusCode.NOT_FOUND, "session not found")


def _closed() -> SessionStoreError:
    return SessionStoreError(grpc.StatusCode.UNAVAILABLE, "session store is closed")


def _check_text(value: str, what: str, max_chars: int, *, required: bool) -> str:
    if not value:
        if required:
            raise _invalid(f"{what} is required")
        return value
    if len(value) > max_chars:
        raise _invalid(f"{what} is too long")
    _utf8_size(value, what)
    return value


def _utf8_size(value: str, what: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        # Only reachable from direct Python calls: protobuf strings are valid UTF-8.
        raise _invalid(f"{what} is not valid UTF-8") from None


def _plausible_id(value: str) -> bool:
    try:
        _check_text(value, "id", MAX_ID_CHARS, required=True)
    except SessionStoreError:
        return False
    return True


def validate_watch(session_id: str, after_seq: int) -> tuple[str, int]:
    """Check WatchSessionMessages arguments; raises :class:`SessionStoreError`."""
    _check_text(session_id, "session id", MAX_ID_CHARS, required=True)
    if after_seq < 0:
        raise _invalid("after_seq must not be negative")
    return session_id, after_seq


_INVISIBLE_CATEGORIES: Final = frozenset({"Cc", "Cf"})
_MARK_CATEGORIES: Final = frozenset({"Mn", "Me"})


def _event_type_key(event_type: str) -> str:
    """``event_type`` as compared with reserved types: compatibility-decomposed
    (NFKD) without combining marks, casefolded, recomposed (NFKC), without
    surrounding blanks; ``u\\u017fer`` (long s), fullwidth
    ``\\uff55\\uff53\\uff45\\uff52``, ``\\u1d58ser`` (modifier u), ``use\\u0301r``
    and ``user\\u034f`` all read ``user``. INVALID_ARGUMENT when it holds a
    control (Cc) or format (Cf) character: those render as nothing (or break
    logs and terminals), so ``user\\u200b`` or ``user\\x00`` would read as
    ``user``."""
    _check_text(event_type, "event type", MAX_EVENT_TYPE_CHARS, required=True)
    decomposed = unicodedata.normalize("NFKD", event_type)
    if any(unicodedata.category(c) in _INVISIBLE_CATEGORIES for c in event_type + decomposed):
        raise _invalid("event type has control or format characters")
    # Marks are dropped, not refused: they are legitimate in other event types.
    bare = "".join(c for c in decomposed if unicodedata.category(c) not in _MARK_CATEGORIES)
    return unicodedata.normalize("NFKC", bare.casefold()).strip()


def check_push_allowed(principal: Principal | None, event_type: str) -> None:
    """Refuse an event type with control or format characters
    (INVALID_ARGUMENT, for every caller), and a service caller pushing a
    ``user`` message (PERMISSION_DENIED).

    Messages of type ``user`` stand for what a person typed; a service caller
    (runner, platform service) must not forge them. The comparison is on the
    normalised, casefolded type without marks and surrounding blanks, so that
    ``" User"``, fullwidth ``\\uff55\\uff53\\uff45\\uff52`` or ``u\\u017fer``
    (long s) are not ways around it. Users may push any other event type;
    unauthenticated calls are only checked for the characters.
    """
    key = _event_type_key(event_type)
    if principal is not None and principal.is_service and key == "user":
        raise SessionStoreError(
            grpc.StatusCode.PERMISSION_DENIED, "service callers may not push user messages"
        )


@dataclass(frozen=True, slots=True)
class MessagePage:
    """One bounded read of a session's log."""

    #: The messages read, in seq order.
    messages: tuple[sessions_pb2.SessionMessage, ...]
    #: True when the page was cut short by its row or byte budget (read again right away).
    more: bool


# --- the store ----------------------------------------------------------------


def _micros(seconds: float) -> int:
    return round(seconds * 1_000_000)


class SessionStore:
    """Sessions and their ordered message logs in SQLite (WAL mode).

    ``path`` is a database file (created if missing) or ``":memory:"``. One
    connection serves every thread, guarded by a lock, so ``":memory:"``
    works from many threads and every method is thread-safe. ``seq`` is taken
    from a per-session counter inside a ``BEGIN IMMEDIATE`` transaction, so it
    starts at 1, is gap-free and survives restarts (``UNIQUE(session_id, seq)``
    as a backstop). ``synchronous=NORMAL``: a committed message survives a
    process crash; the last ones may be lost on power loss.

    Methods raise :class:`SessionStoreError` (INVALID_ARGUMENT, NOT_FOUND;
    UNAVAILABLE once closed or when SQLite fails). They block on SQLite: call
    them from a worker thread in asyncio code (``owner_of`` excepted, which is
    cheap and cached).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = ":memory:",
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if max_payload_bytes < 0:
            raise ConfigurationError("max_payload_bytes must not be negative")
        self._max_payload_bytes = max_payload_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._hub = Hub()
        self._owners: OrderedDict[str, Identity | str | None] = OrderedDict()
        self._owners_lock = threading.Lock()
        try:
            conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot open session database: {exc}") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(_SCHEMA)
            _migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise ConfigurationError(f"cannot initialise session database: {exc}") from None
        self._conn = conn

    @property
    def max_payload_bytes(self) -> int:
        """Largest accepted payload, in UTF-8 bytes."""
        return self._max_payload_bytes

    # -- plumbing

    @contextmanager
    def _db(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise _closed()
            try:
                if write:
                    self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    if write:
                        self._conn.execute("ROLLBACK")
                    raise
                if write:
                    self._conn.execute("COMMIT")
            except sqlite3.Error:
                _log.exception("session storage failure")
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise SessionStoreError(
                    grpc.StatusCode.UNAVAILABLE, "session storage unavailable"
                ) from None

    def _now_us(self) -> int:
        return _micros(self._clock.time())

    # -- sessions

    def create_session(
        self,
        name: str,
        project_id: str | None = None,
        created_by: str | None = None,
        *,
        created_by_issuer: str | None = None,
    ) -> sessions_pb2.Session:
        """Store a new session with a generated id and return it.

        ``created_by`` and ``created_by_issuer`` are the creator's
        :class:`~ambient_grpc_auth.principal.Identity`, returned by
        :meth:`owner_of`; without an issuer the owner is a bare name.
        """
        _check_text(name, "name", MAX_NAME_CHARS, required=False)
        if project_id is not None:
            _check_text(project_id, "project id", MAX_ID_CHARS, required=False)
        if created_by is not None:
            _check_text(created_by, "creator", MAX_NAME_CHARS, required=False)
        if created_by_issuer is not None:
            _check_text(created_by_issuer, "creator issuer", MAX_NAME_CHARS, required=False)
        session_id = uuid.uuid4().hex
        now = self._now_us()
        row = (session_id, name, project_id, created_by, now, now)
        with self._db(write=True) as db:
            db.execute(
                "INSERT INTO sessions (id, name, project_id, created_by, created_at_us,"
                " updated_at_us, created_by_issuer) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*row, created_by_issuer),
            )
        return _session_proto(row)

    def get_session(self, session_id: str) -> sessions_pb2.Session:
        """The session ``session_id``; NOT_FOUND when unknown."""
        _check_text(session_id, "session id", MAX_ID_CHARS, required=True)
        with self._db() as db:
            row = db.execute(
                "SELECT id, name, project_id, created_by, created_at_us, updated_at_us"
                " FROM sessions WHERE id = ?",
                (session_id,),
            ).fetchone()
        if row is None:
            raise _not_found()
        return _session_proto(row)

    def require_session(self, session_id: str) -> None:
        """Raise INVALID_ARGUMENT for an implausible id, NOT_FOUND for an
        unknown session; return quietly otherwise (cached like :meth:`owner_of`)."""
        _check_text(session_id, "session id", MAX_ID_CHARS, required=True)
        if not self._lookup_owner(session_id)[0]:
            raise _not_found()

    def session_exists(self, session_id: str) -> bool:
        """True when ``session_id`` names a stored session."""
        return _plausible_id(session_id) and self._lookup_owner(session_id)[0]

    def owner_of(self, session_id: str) -> Identity | str | None:
        """The creator of ``session_id`` as an
        :class:`~ambient_grpc_auth.principal.Identity`, or as a bare name when
        stored without an issuer (sessions created before owners carried
        their issuer: the server matches them against its
        ``default_owner_issuer``); None when unknown, ownerless or not a
        plausible id. An :data:`~ambient_grpc_auth.server.config.OwnerLookup`.
        Cheap: owners never change, so found sessions are cached
        (bounded LRU); unknown ids are not cached, as they may be created later.
        Raises :class:`SessionStoreError` (UNAVAILABLE) only when the database
        must be asked and cannot answer (store closed, SQLite failure)."""
        if not _plausible_id(session_id):
            return None
        return self._lookup_owner(session_id)[1]

    def _lookup_owner(self, session_id: str) -> tuple[bool, Identity | str | None]:
        with self._owners_lock:
            if session_id in self._owners:
                self._owners.move_to_end(session_id)
                return True, self._owners[session_id]
        with self._db() as db:
            row = db.execute(
                "SELECT created_by, created_by_issuer FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
        if row is None:
            return False, None
        name, issuer = row
        owner: Identity | str | None = (
            None if name is None else name if issuer is None else Identity(issuer, name)
        )
        with self._owners_lock:
            self._owners[session_id] = owner
            if len(self._owners) > _OWNER_CACHE_SIZE:
                self._owners.popitem(last=False)
        return True, owner

    # -- messages

    def append(self, session_id: str, event_type: str, payload: str) -> sessions_pb2.SessionMessage:
        """Append a message, assigning the session's next seq, and wake watchers.

        INVALID_ARGUMENT for an empty or too long id or event type, an event
        type with control or format characters, and for a payload above
        ``max_payload_bytes`` UTF-8 bytes; NOT_FOUND for an unknown session.
        """
        _check_text(session_id, "session id", MAX_ID_CHARS, required=True)
        _event_type_key(event_type)
        # A character is at least one byte: skip encoding obviously oversized text.
        if len(payload) > self._max_payload_bytes or (
            _utf8_size(payload, "payload") > self._max_payload_bytes
        ):
            raise _invalid("payload is too large")
        message_id = uuid.uuid4().hex
        now = self._now_us()
        with self._db(write=True) as db:
            rows = db.execute(
                "UPDATE sessions SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq",
                (session_id,),
            ).fetchall()
            if not rows:
                raise _not_found()
            seq: int = rows[0][0]
            db.execute(
                "INSERT INTO messages (session_id, seq, id, event_type, payload, created_at_us)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (session_id, seq, message_id, event_type, payload, now),
            )
        row = (message_id, session_id, seq, event_type, payload, now)
        # Announced only after COMMIT: a woken watcher's read must see the row.
        # Watchers get their own copy, so the caller may modify the result.
        self._hub.publish(session_id, _message_proto(row), len(payload))
        return _message_proto(row)

    def read_messages(
        self,
        session_id: str,
        after_seq: int,
        *,
        limit: int = PAGE_SIZE,
        max_bytes: int = PAGE_BYTES,
    ) -> MessagePage:
        """Messages with ``seq > after_seq`` in seq order: at most ``limit``
        rows and, beyond the first row, about ``max_bytes`` of payload.
        An unknown session reads as empty; an empty or too long id is
        INVALID_ARGUMENT."""
        _check_text(session_id, "session id", MAX_ID_CHARS, required=True)
        after_seq = min(after_seq, _MAX_SEQ)
        rows: list[tuple[str, str, int, str, str, int]] = []
        more = False
        with self._db() as db:
            cursor = db.execute(
                "SELECT id, session_id, seq, event_type, payload, created_at_us FROM messages"
                " WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (session_id, after_seq, max(1, limit)),
            )
            try:
                size = 0
                for row in cursor:
                    rows.append(row)
                    size += len(row[4])
                    if size >= max_bytes:
                        more = True
                        break
            finally:
                cursor.close()
        more = more or len(rows) >= limit
        return MessagePage(tuple(_message_proto(r) for r in rows), more)

    # -- watching and lifecycle

    def subscribe(self, session_id: str) -> Subscription:
        """Register for commit signals on ``session_id``; close the result when
        done. UNAVAILABLE once the store is closed."""
        subscription = self._hub.subscribe(session_id)
        if subscription is None:
            raise _closed()
        return subscription

    def subscriber_count(self, session_id: str | None = None) -> int:
        """Open subscriptions on ``session_id`` (all sessions when None)."""
        return self._hub.count(session_id)

    def end_watches(self) -> None:
        """End every subscription (waiters wake with ``hub_closed`` set, so
        watches finish with UNAVAILABLE and clients resume elsewhere) and
        refuse new ones; the database stays open for calls in flight. For a
        clean server shutdown: open watches end on their own instead of being
        cancelled. Idempotent, thread-safe."""
        self._hub.close()

    def close(self) -> None:
        """End every subscription (waiters wake with ``hub_closed`` set), then
        close the database. Idempotent; later calls raise UNAVAILABLE."""
        self._hub.close()
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database created by an older version up to :data:`_SCHEMA`.

    Adds ``sessions.created_by_issuer`` (NULL: the owner is a bare name, as
    before). Inside ``BEGIN IMMEDIATE`` so that two processes opening the same
    file do not both add the column."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
        if "created_by_issuer" not in columns:
            conn.execute("ALTER TABLE sessions ADD COLUMN created_by_issuer TEXT")
            _log.info("session database migrated: owners now carry their issuer")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _session_proto(
    row: tuple[str, str, str | None, str | None, int, int],
) -> sessions_pb2.Session:
    session_id, name, project_id, created_by, created_us, updated_us = row
    session = sessions_pb2.Session(name=name)
    meta = session.metadata
    meta.id = session_id
    meta.kind = SESSION_KIND
    meta.href = SESSION_HREF_PREFIX + session_id
    meta.created_at.FromMicroseconds(created_us)
    meta.updated_at.FromMicroseconds(updated_us)
    if project_id is not None:
        session.project_id = project_id
    if created_by is not None:
        session.created_by_user_id = created_by
    return session


def _message_proto(
    row: tuple[str, str, int, str, str, int],
) -> sessions_pb2.SessionMessage:
    message_id, session_id, seq, event_type, payload, created_us = row
    message = sessions_pb2.SessionMessage(
        id=message_id, session_id=session_id, seq=seq, event_type=event_type, payload=payload
    )
    message.created_at.FromMicroseconds(created_us)
    return message
