"""The answer journal as the MQTT door uses it: every failure mapped here, once, to a result.

`put` says whether the answer is durably recorded (the ledger holds it unpublished when not);
`get` and the subscription memory fail soft (a journal that cannot be read costs at most a
regeneration). A journal that could not be opened (state_dir read-only, full, corrupt beyond
repair) is opened again on the next write, so the door recovers when the disk does. `error` is
why it cannot be written now (None when it can), for the status.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import structlog

from daemon.journal import Journal

log = structlog.get_logger(__name__)

JOURNAL_FILE = "mqtt-journal.sqlite3"
_FAILURES = (sqlite3.Error, OSError, ValueError)


class AnswerStore:
    def __init__(self, state_dir: Path, *, max_entries: int, max_age_s: float) -> None:
        self.path = state_dir / JOURNAL_FILE
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self.error: str | None = None
        self.entries = 0
        self._journal: Journal | None = None

    def open(self) -> bool:
        if self._journal is not None:
            return True
        try:
            self._journal = Journal(self.path, max_entries=self.max_entries, max_age_s=self.max_age_s)
            self.entries = self._journal.count()
        except _FAILURES as exc:
            self._failed("mqtt.journal_unavailable", exc)
            return False
        return True

    def _failed(self, event: str, exc: BaseException, **fields: Any) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if error != self.error:  # once per distinct problem, not once per answer
            log.error(
                event, path=str(self.path), error=error, **fields,
                action="QoS 1 answers are held unacknowledged until the journal can be written",
                hint="free space in or fix the permissions of state_dir",
            )
        self.error = error

    def put(self, request_id: str, event: dict[str, Any], *, held: int = 0) -> bool:
        """Record a `done` answer (committed and synced when this returns True)."""
        if not self.open():
            return False
        assert self._journal is not None
        try:
            self._journal.put(request_id, event)
            self.entries = self._journal.count()
        except _FAILURES as exc:
            self._failed("mqtt.journal_write_failed", exc, id=request_id)
            return False
        if self.error is not None:
            log.info("mqtt.journal_recovered", held=held)
            self.error = None
        return True

    def get(self, request_id: str) -> dict[str, Any] | None:
        if self._journal is None:
            return None
        try:
            return self._journal.get(request_id)
        except _FAILURES:
            log.exception("mqtt.journal_read_failed", id=request_id)
            return None

    def subscriptions(self) -> set[str]:
        """The filters our persistent session was last subscribed to (the broker remembers them)."""
        if self._journal is None:
            return set()
        try:
            return set(self._journal.get_meta("subscriptions") or [])
        except _FAILURES:
            return set()

    def remember_subscriptions(self, filters: set[str]) -> None:
        if self._journal is None:
            return
        try:
            self._journal.set_meta("subscriptions", sorted(filters))
        except _FAILURES as exc:
            log.warning("mqtt.journal_meta_failed", error=str(exc))

    def set_limits(self, max_entries: int, max_age_s: float) -> None:
        self.max_entries, self.max_age_s = max_entries, max_age_s
        if self._journal is not None:
            try:
                self._journal.set_limits(max_entries, max_age_s)
            except _FAILURES as exc:
                log.warning("mqtt.journal_prune_failed", error=str(exc))

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
