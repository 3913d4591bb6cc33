"""The live conversation store: one SQLite database in WAL mode.

A conversation is a root response and every response chained to it through
``previous_response_id``; each response row names its conversation, so a branch (two
responses with the same parent) stays in the same conversation and keeps its own context,
which is rebuilt by walking the parent links.

Durability: ``journal_mode=WAL`` with ``synchronous=NORMAL``. A committed transaction
survives a crash of the process (SIGKILL included); only a power loss or OS crash can roll
back the last transactions. That is safe for the archiver too: if the delete of an archived
conversation is rolled back, its rows come back and the next sweep rewrites the same archive
file (same name), so nothing is lost or duplicated.

All methods are synchronous and serialised by one lock around one connection
(``check_same_thread=False``); the API calls them through ``asyncio.to_thread`` so the event
loop never waits on the disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PreviousResponseNotFound, StorageFailed
from ..logs import get_logger

log = get_logger("mlxd.conversations")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_activity REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    previous_response_id TEXT,
    created_at REAL NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    input_json TEXT NOT NULL,
    body_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_conversation ON responses(conversation_id, seq);
CREATE INDEX IF NOT EXISTS conversations_by_activity ON conversations(last_activity);
CREATE TABLE IF NOT EXISTS archived (
    response_id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    archive_file TEXT NOT NULL,
    archived_at REAL NOT NULL
);
"""


class StoreDamaged(Exception):
    """The database file exists but is not a usable SQLite database; the message says what to do."""


@dataclass
class StoredResponse:
    """One stored turn: its normalized input items and the full Response object sent."""

    id: str
    conversation_id: str
    previous_response_id: str | None
    created_at: float
    input_items: list[dict[str, Any]]
    body: dict[str, Any]
    deleted: bool = False


@dataclass
class Chain:
    """The ancestors of a new turn (root first) and the conversation it continues."""

    conversation_id: str | None
    history: list[StoredResponse] = field(default_factory=list)
    pin: int | None = None


@dataclass
class ConversationDump:
    """Everything the archiver writes, plus the activity stamp that guards the delete."""

    id: str
    model: str
    created_at: float
    last_activity: float
    turns: list[StoredResponse]


class Store:
    """The SQLite-backed store. Open with :meth:`open`; every method is thread-safe."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        # Which file the connection has open: a write checks that the path still names it.
        self._identity = _identity(path)
        self._replaced_logged = False
        self._lock = threading.Lock()
        # Conversations with a generation in flight: pin number -> (conversation, deadline).
        # The deadline only matters if a pin leaked (a stream that never started).
        self._pins: dict[int, tuple[str, float]] = {}
        self._next_pin = 0

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path) -> Store:
        """Open (or create) the database. A damaged file raises StoreDamaged and is left as is."""
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
        try:
            # Check before anything writes: never "repair" a damaged file by starting over it.
            rows = conn.execute("PRAGMA quick_check").fetchall()
            if [tuple(r) for r in rows] != [("ok",)]:
                raise sqlite3.DatabaseError("; ".join(str(r[0]) for r in rows[:3]))
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreDamaged(
                    f"conversation database {path} was written by a newer mlxd (schema "
                    f"{version}, this one knows {SCHEMA_VERSION}). Hint: upgrade mlxd, or set "
                    "[conversations] database to another file."
                )
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreDamaged(
                f"conversation database {path} is damaged ({exc}); mlxd will not start over it, "
                f"so nothing stored in it is lost. Hint: move it aside (mv '{path}' "
                f"'{path}.damaged') to start with an empty store, or restore it from a backup "
                f"(`sqlite3 '{path}' .recover` may rescue its rows)."
            ) from None
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        """Checkpoint and close; live conversations stay in the file for the next start."""
        with self._lock:
            # Best effort: the WAL is replayed at the next open anyway.
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. Any SQLite failure (disk full, I/O error) becomes a
        StorageFailed naming the file and the cause; so does a database file that was
        deleted or replaced under the running daemon: writing on into the unlinked file would
        answer 200 and lose the data at the next start."""
        with self._lock:
            self._check_file()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back
                        self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageFailed(
                    f"the conversation store could not write to {self.path}: {exc}"
                ) from exc

    def _check_file(self) -> None:
        if _identity(self.path) == self._identity:
            return
        if not self._replaced_logged:
            self._replaced_logged = True
            log.error("store.file_replaced", path=str(self.path))
        raise StorageFailed(
            f"the conversation database {self.path} was deleted or replaced while mlxd was "
            "running; writes are refused so that nothing is silently lost. Hint: restore the "
            "file, or restart mlxd to start a new database there."
        )

    # -- responses --------------------------------------------------------------------------
    def begin_turn(
        self,
        previous_response_id: str | None,
        now: float | None = None,
        pin_seconds: float = 3600.0,
    ) -> Chain:
        """The chain a new turn continues, root first; pins its conversation against expiry
        until :meth:`end_turn`. Unknown, unstored, deleted or archived ids raise
        PreviousResponseNotFound (an archived one says so)."""
        if previous_response_id is None:
            return Chain(None)
        now = time.time() if now is None else now
        with self._tx() as conn:
            row = conn.execute(
                "SELECT conversation_id, deleted FROM responses WHERE id = ?",
                (previous_response_id,),
            ).fetchone()
            if row is None or row[1]:
                raise self._not_found(conn, previous_response_id)
            conv_id = str(row[0])
            history = self._ancestors(conn, previous_response_id)
            conn.execute(
                "UPDATE conversations SET last_activity = max(last_activity, ?) WHERE id = ?",
                (now, conv_id),
            )
            self._next_pin += 1
            self._pins[self._next_pin] = (conv_id, now + pin_seconds)
        return Chain(conv_id, history, self._next_pin)

    def end_turn(self, chain: Chain) -> None:
        """Release the pin taken by :meth:`begin_turn`."""
        if chain.pin is None:
            return
        with self._lock:
            self._pins.pop(chain.pin, None)

    def _pinned(self, now: float) -> set[str]:
        return {conv for conv, deadline in self._pins.values() if deadline > now}

    def _not_found(self, conn: sqlite3.Connection, rid: str) -> PreviousResponseNotFound:
        tomb = conn.execute(
            "SELECT archive_file, archived_at FROM archived WHERE response_id = ?", (rid,)
        ).fetchone()
        if tomb is not None:
            name = Path(str(tomb[0])).name
            return PreviousResponseNotFound(
                f"Previous response with id '{rid}' has expired: its conversation was archived "
                f"to {name} after [conversations] ttl_seconds without activity. Start a new "
                "conversation (send the history as input items instead).",
                param="previous_response_id",
            )
        return PreviousResponseNotFound(
            f"Previous response with id '{rid}' not found.", param="previous_response_id"
        )

    def _ancestors(self, conn: sqlite3.Connection, rid: str) -> list[StoredResponse]:
        chain: list[StoredResponse] = []
        seen: set[str] = set()
        current: str | None = rid
        while current is not None and current not in seen:
            seen.add(current)
            row = conn.execute(_SELECT + " WHERE id = ?", (current,)).fetchone()
            if row is None:
                break
            item = _row(row)
            chain.append(item)
            current = item.previous_response_id
        chain.reverse()
        return chain

    def save(self, resp: StoredResponse, model: str, now: float | None = None) -> None:
        """Store a finished turn; a root turn starts its conversation."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO conversations (id, model, created_at, last_activity) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "last_activity = max(last_activity, excluded.last_activity)",
                (resp.conversation_id, model, resp.created_at, now),
            )
            conn.execute(
                "INSERT INTO responses (id, conversation_id, previous_response_id, created_at, "
                "input_json, body_json) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    resp.id,
                    resp.conversation_id,
                    resp.previous_response_id,
                    resp.created_at,
                    json.dumps(resp.input_items),
                    json.dumps(resp.body),
                ),
            )

    def get(self, rid: str) -> StoredResponse | None:
        """A stored, not deleted response, or None."""
        with self._lock:
            row = self._conn.execute(_SELECT + " WHERE id = ? AND deleted = 0", (rid,)).fetchone()
        return _row(row) if row is not None else None

    def delete(self, rid: str) -> bool:
        """Hide a response: GET gives 404 and it cannot be continued. Responses already chained
        to it keep their context, so the row stays until its conversation is archived."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE responses SET deleted = 1 WHERE id = ? AND deleted = 0", (rid,)
            )
            return cur.rowcount > 0

    # -- expiry -----------------------------------------------------------------------------
    def expired(self, older_than: float, now: float | None = None) -> list[str]:
        """Conversations idle since before ``older_than`` with no generation in flight."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._conn.execute(
                "SELECT id FROM conversations WHERE last_activity < ? ORDER BY last_activity",
                (older_than,),
            ).fetchall()
            pinned = self._pinned(now)
            return [str(r[0]) for r in rows if str(r[0]) not in pinned]

    def dump(self, conv_id: str) -> ConversationDump | None:
        """The whole conversation, turns in creation order, or None if it is gone."""
        with self._lock:
            conv = self._conn.execute(
                "SELECT model, created_at, last_activity FROM conversations WHERE id = ?",
                (conv_id,),
            ).fetchone()
            if conv is None:
                return None
            rows = self._conn.execute(
                _SELECT + " WHERE conversation_id = ? ORDER BY seq", (conv_id,)
            ).fetchall()
        return ConversationDump(conv_id, str(conv[0]), conv[1], conv[2], [_row(r) for r in rows])

    def remove_archived(
        self, dump: ConversationDump, archive_file: Path, now: float | None = None
    ) -> bool:
        """After the archive file is durable: tombstone the ids and delete the rows, in one
        transaction. Returns False (and changes nothing) when the conversation saw activity
        since ``dump`` was taken; the next sweep rewrites the same file then."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            row = conn.execute(
                "SELECT last_activity FROM conversations WHERE id = ?", (dump.id,)
            ).fetchone()
            if row is None:
                return True
            if row[0] != dump.last_activity or dump.id in self._pinned(now):
                return False
            conn.executemany(
                "INSERT OR REPLACE INTO archived (response_id, conversation_id, archive_file, "
                "archived_at) VALUES (?, ?, ?, ?)",
                [(t.id, dump.id, str(archive_file), now) for t in dump.turns],
            )
            conn.execute("DELETE FROM responses WHERE conversation_id = ?", (dump.id,))
            conn.execute("DELETE FROM conversations WHERE id = ?", (dump.id,))
        return True

    def counts(self) -> dict[str, int]:
        """Rows per table (for /health, tests and logs)."""
        with self._lock:
            return {
                t: int(self._conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
                for t in ("conversations", "responses", "archived")
            }


_SELECT = (
    "SELECT id, conversation_id, previous_response_id, created_at, input_json, body_json, "
    "deleted FROM responses"
)


def _row(row: tuple[Any, ...]) -> StoredResponse:
    return StoredResponse(
        id=row[0],
        conversation_id=row[1],
        previous_response_id=row[2],
        created_at=row[3],
        input_items=json.loads(row[4]),
        body=json.loads(row[5]),
        deleted=bool(row[6]),
    )


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, or None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
