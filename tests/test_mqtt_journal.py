"""The answer journal: durable, bounded by age and count, survives a corrupt file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from structlog.testing import capture_logs

from daemon.journal import Journal


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def done(i: int | str) -> dict[str, object]:
    return {"id": str(i), "event": "done", "text": f"answer {i}", "seq": 1}


def test_put_get_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "j.sqlite3"
    journal = Journal(path, max_entries=10, max_age_s=60)
    assert journal.get("a") is None
    journal.put("a", done("a"))
    assert journal.get("a") == done("a")
    journal.close()
    # A new process (same file) sees the committed answer.
    reopened = Journal(path, max_entries=10, max_age_s=60)
    assert reopened.get("a") == done("a")
    assert reopened.count() == 1
    reopened.close()


def test_committed_before_put_returns(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = Journal(path, max_entries=10, max_age_s=60)
    journal.put("x", done("x"))
    # Another connection (as a restarted daemon would open) reads it while the first is still open.
    other = sqlite3.connect(str(path))
    assert other.execute("SELECT count(*) FROM answers WHERE id = 'x'").fetchone() == (1,)
    other.close()
    journal.close()


def test_entries_older_than_max_age_are_gone(tmp_path: Path) -> None:
    clock = Clock()
    journal = Journal(tmp_path / "j.sqlite3", max_entries=100, max_age_s=60, clock=clock)
    journal.put("old", done("old"))
    clock.t += 30
    journal.put("new", done("new"))
    clock.t += 31
    assert journal.get("old") is None  # 61 s old
    assert journal.get("new") == done("new")
    journal.put("newer", done("newer"))  # a write prunes
    assert journal.count() == 2
    journal.close()


def test_only_the_newest_max_entries_are_kept(tmp_path: Path) -> None:
    clock = Clock()
    journal = Journal(tmp_path / "j.sqlite3", max_entries=5, max_age_s=3600, clock=clock)
    for i in range(12):
        clock.t += 1
        journal.put(str(i), done(i))
    assert journal.count() == 5
    assert [journal.get(str(i)) is not None for i in range(12)] == [False] * 7 + [True] * 5
    journal.set_limits(2, 3600)
    assert journal.count() == 2
    assert journal.get("11") is not None and journal.get("10") is not None
    journal.close()


def test_same_id_twice_keeps_one_entry(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3", max_entries=5, max_age_s=3600)
    journal.put("a", done("a"))
    journal.put("a", {**done("a"), "text": "second"})
    assert journal.count() == 1
    assert journal.get("a") == {**done("a"), "text": "second"}
    journal.close()


def test_meta_values_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = Journal(path, max_entries=5, max_age_s=3600)
    assert journal.get_meta("subscriptions") is None
    journal.set_meta("subscriptions", ["a/request", "$share/g/t"])
    journal.close()
    assert Journal(path, max_entries=5, max_age_s=3600).get_meta("subscriptions") == ["a/request", "$share/g/t"]


def test_a_corrupt_journal_is_moved_aside_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    path.write_bytes(b"this is not a database" * 200)
    with capture_logs() as logs:
        journal = Journal(path, max_entries=5, max_age_s=3600)
    assert any(e["event"] == "journal.corrupt_replaced" for e in logs)
    journal.put("a", done("a"))
    assert journal.get("a") == done("a")
    assert list(tmp_path.glob("j.sqlite3.corrupt-*"))
    journal.close()


def test_ids_never_answered_are_misses_and_the_id_index_stays_bounded(tmp_path: Path) -> None:
    # Misses are answered from the in-memory index of ids (a superset of the table's); pruning
    # keeps the table at max_entries and the index at most about twice that.
    clock = Clock()
    journal = Journal(tmp_path / "j.sqlite3", max_entries=5, max_age_s=3600, clock=clock)
    for i in range(500):
        clock.t += 1
        journal.put(str(i), done(i))
        assert journal.get(f"never-{i}") is None
    assert journal.count() == 5
    assert len(journal._ids) <= 2 * 5 + 64
    assert [journal.get(str(i)) for i in range(495, 500)] == [done(i) for i in range(495, 500)]
    assert journal.get("0") is None
    journal.close()
    # A restarted daemon knows what the file holds.
    reopened = Journal(tmp_path / "j.sqlite3", max_entries=5, max_age_s=3600, clock=clock)
    assert reopened.get("499") == done(499)
    reopened.close()
