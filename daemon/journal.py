"""A small durable record of recent answers, keyed by request id (sqlite, in `state_dir`).

It gives MQTT its exactly-once *effect*: a request redelivered after a crash, or published twice
with the same id, is answered from here instead of being generated again. Only `done` answers
are kept (an error costs nothing to recompute, and a transient one such as `queue_full` should be
retried, not replayed). For a streamed request only the final `done` event is kept: it carries the
full text, so a replay loses nothing but the token-by-token timing.

Bounded by age and by count; pruned on every write. Writes are committed (and fsynced) before the
transport acknowledges the request, so a crash right after the answer leaves a record behind.

Lookups of ids that were never answered (nearly all of them, and every one of a flood) are
answered from memory: the journal keeps the set of ids it may hold (`_ids`, a superset: ids are
added on every write, and the set is re-read from the file once it holds twice `max_entries`),
so a miss costs no query and no release of the GIL for one. This assumes one writer, this
object: the daemon owns its `state_dir`.

The second table, `meta`, holds the transport's own small durable facts (which topics the
persistent session is subscribed to), so a restart with a changed config can unsubscribe what the
broker still remembers.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

import structlog

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    id TEXT PRIMARY KEY,
    answered_at REAL NOT NULL,
    event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_by_time ON answers (answered_at);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class Journal:
    """Thread-safe; one connection guarded by a lock. `clock` is wall time (it must survive restarts)."""

    def __init__(
        self,
        path: Path,
        *,
        max_entries: int,
        max_age_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._open()
        self._ids: set[str] = set()
        self.prune()
        self._reload_ids()

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            # A journal is a cache of recent answers: losing it costs at most a regeneration.
            # Never let a corrupt file keep the daemon from serving.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(self._clock())}")
            log.warning("journal.corrupt_replaced", path=str(self.path), moved_to=str(aside), error=str(exc))
            with contextlib.suppress(OSError):
                self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(OSError):
                    Path(f"{self.path}{suffix}").unlink()
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=5.0, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: the commit is on disk before we ack the request (one fsync per answer).
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            db.execute("SELECT count(*) FROM answers").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def get(self, request_id: str) -> dict[str, Any] | None:
        """The stored final event for this id, unless it is older than `max_age_s`."""
        oldest = self._clock() - self.max_age_s
        with self._lock:
            if request_id not in self._ids:
                return None
            row = self._db.execute(
                "SELECT event FROM answers WHERE id = ? AND answered_at >= ?", (request_id, oldest)
            ).fetchone()
        if row is None:
            return None
        event: dict[str, Any] = json.loads(row[0])
        return event

    def put(self, request_id: str, event: dict[str, Any]) -> None:
        """Record the final event (committed when this returns), then prune."""
        data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers (id, answered_at, event) VALUES (?, ?, ?)",
                (request_id, self._clock(), data),
            )
            self._ids.add(request_id)
            self._prune_locked()

    def prune(self) -> None:
        with self._lock:
            self._prune_locked()

    def _prune_locked(self) -> None:
        self._db.execute("DELETE FROM answers WHERE answered_at < ?", (self._clock() - self.max_age_s,))
        # Keep the newest `max_entries`: delete everything older than the max_entries-th newest.
        self._db.execute(
            """DELETE FROM answers WHERE rowid IN (
                   SELECT rowid FROM answers ORDER BY answered_at DESC, rowid DESC LIMIT -1 OFFSET ?)""",
            (self.max_entries,),
        )
        if len(self._ids) > 2 * self.max_entries + 64:
            self._reload_ids_locked()

    def _reload_ids(self) -> None:
        with self._lock:
            self._reload_ids_locked()

    def _reload_ids_locked(self) -> None:
        self._ids = {row[0] for row in self._db.execute("SELECT id FROM answers")}

    def count(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM answers").fetchone()
        return int(row[0])

    def set_limits(self, max_entries: int, max_age_s: float) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self.prune()

    def get_meta(self, key: str) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        with self._lock:
            data = json.dumps(value, separators=(",", ":"))
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, data))

    def close(self) -> None:
        with self._lock:
            self._db.close()
