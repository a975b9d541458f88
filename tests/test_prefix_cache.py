"""The prefix cache's bookkeeping and its disk store, without a model: states are plain bytes."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.engine.prefix_cache import MAGIC, MIN_TOKENS, SUFFIX, DiskStore, PrefixCache, model_sha256
from tests.helpers import rewrite_prefix_header

FINGERPRINT = {"format": 1, "model_sha256": "abc", "n_ctx": 2048, "kv_type": "f16"}
SYSTEM = list(range(100, 100 + 2 * MIN_TOKENS))


def test_longest_common_prefix_wins_and_hits_are_counted() -> None:
    cache = PrefixCache(10_000_000)
    cache.add([*SYSTEM, 1, 2], b"A" * 100)
    cache.add([*SYSTEM[:40], 9, 9], b"B" * 100)
    entry, n = cache.best([*SYSTEM, 5])
    assert entry is not None and n == len(SYSTEM) and entry.state[:1] == b"A"
    cache.record(entry)
    cache.record(None)
    assert cache.status()["hits"] == 1 and cache.status()["misses"] == 1


def test_lru_eviction_by_bytes_and_superseded_prefixes() -> None:
    cache = PrefixCache(max_bytes=3000)
    cache.add([*SYSTEM, 1], b"x" * 1000)
    cache.add([*SYSTEM, 2], b"y" * 1000)
    cache.best([*SYSTEM, 1])
    cache.record(cache.best([*SYSTEM, 1])[0])  # 1 is now the most recent
    cache.add([*SYSTEM, 3], b"z" * 1000)
    keys = [e.tokens[-1] for e in cache._entries.values()]
    assert keys == [1, 3] and cache.bytes <= 3000
    cache.add([*SYSTEM, 3, 4, 5], b"w" * 10)  # supersedes [..., 3]
    assert [e.tokens[-1] for e in cache._entries.values()] == [1, 5]


def test_wants_only_long_uncovered_prompts() -> None:
    cache = PrefixCache(10_000_000)
    assert not cache.wants(SYSTEM[: MIN_TOKENS - 1])
    assert cache.wants(SYSTEM)
    cache.add(SYSTEM, b"s")
    assert not cache.wants(SYSTEM[:-1])  # covered by the entry


def store(tmp: Path, fingerprint: dict[str, object] = FINGERPRINT, max_bytes: int = 10_000_000) -> DiskStore:
    s = DiskStore(tmp / "prefix-cache", dict(fingerprint), max_bytes)
    s.start()
    return s


def test_disk_round_trip_and_a_restart_reads_newest_first(tmp_path: Path) -> None:
    s = store(tmp_path)
    cache = PrefixCache(10_000_000, s)
    cache.add([*SYSTEM, 1], b"one" * 100)
    cache.add([*SYSTEM, 2], b"two" * 100)
    s.stop()
    again = PrefixCache(10_000_000, store(tmp_path))
    assert again.load_from_disk() == 2
    entry, n = again.best([*SYSTEM, 2])
    assert entry is not None and entry.state == b"two" * 100 and n == len(SYSTEM) + 1


def test_corrupt_truncated_and_foreign_files_are_ignored_with_a_log_line(tmp_path: Path) -> None:
    s = store(tmp_path)
    cache = PrefixCache(10_000_000, s)
    for last in (1, 2, 3, 4):
        cache.add([*SYSTEM, last], bytes([last]) * 500)
    s.stop()
    files = sorted(s.dir.glob("*.kv"))
    assert len(files) == 4
    files[0].write_bytes(files[0].read_bytes()[:-10])  # truncated
    data = bytearray(files[1].read_bytes())
    data[-1] ^= 0xFF  # flipped bit in the state
    files[1].write_bytes(bytes(data))
    files[2].write_bytes(b"garbage")
    with capture_logs() as logs:
        loaded = PrefixCache(10_000_000, store(tmp_path)).load_from_disk()
    assert loaded == 1
    ignored = [e for e in logs if e["event"] == "prefix_cache.file_ignored"]
    assert len(ignored) == 3 and len(list(s.dir.glob("*.kv"))) == 1
    # Another model (or n_ctx, or KV type) looks in another folder and never sees these files.
    other = PrefixCache(10_000_000, store(tmp_path, {**FINGERPRINT, "model_sha256": "def"}))
    assert other.load_from_disk() == 0


def test_foreign_file_copied_into_the_folder_is_refused(tmp_path: Path) -> None:
    mine, theirs = store(tmp_path), store(tmp_path / "x", {**FINGERPRINT, "kv_type": "q8_0"})
    PrefixCache(10_000_000, theirs).add([*SYSTEM, 1], b"q" * 50)
    theirs.stop()
    mine.dir.mkdir(parents=True, exist_ok=True)
    for f in theirs.dir.glob("*.kv"):
        (mine.dir / f.name).write_bytes(f.read_bytes())
    with capture_logs() as logs:
        assert PrefixCache(10_000_000, mine).load_from_disk() == 0
    assert any("another kv_type" in str(e.get("reason")) for e in logs)
    mine.stop()


def test_disk_bound_drops_the_oldest(tmp_path: Path) -> None:
    s = store(tmp_path, max_bytes=2500)
    cache = PrefixCache(10_000_000, s)
    for last in range(5):
        cache.add([*SYSTEM, last], b"s" * 1000)
    s.stop()
    assert sum(p.stat().st_size for p in s.dir.glob("*.kv")) <= 2500


def test_model_hash_is_remembered(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights")
    ids = tmp_path / "ids.json"
    first = model_sha256(model, ids)
    assert ids.exists() and model_sha256(model, ids) == first
    model.write_bytes(b"other weights")
    assert model_sha256(model, ids) != first


def test_spill_lets_go_of_persisted_states_and_reads_them_back(tmp_path: Path) -> None:
    s = store(tmp_path)
    cache = PrefixCache(10_000_000, s)
    cache.add([*SYSTEM, 1], b"one" * 1000)
    assert cache.spill() == 0  # not written yet: its only copy stays in RAM
    s.stop()  # the writer has finished
    cache.add([*SYSTEM, 2], b"two" * 1000)  # never written (the writer is stopped)
    assert cache.spill() == 3000
    assert cache.bytes == 3000 + 2 * 4 * (len(SYSTEM) + 1)
    entry, n = cache.best([*SYSTEM, 1, 7])
    assert entry is not None and entry.state is None and n == len(SYSTEM) + 1
    assert cache.state_of(entry) == b"one" * 1000  # read back from its file, and in RAM again
    assert entry.state is not None and cache.status()["in_ram"] == 2


def test_a_spilled_entry_whose_file_went_bad_is_forgotten(tmp_path: Path) -> None:
    s = store(tmp_path)
    cache = PrefixCache(10_000_000, s)
    cache.add([*SYSTEM, 1], b"one" * 1000)
    cache.add([*SYSTEM, 2], b"two" * 1000)
    s.stop()
    cache.spill()
    first, _ = cache.best([*SYSTEM, 1])
    second, _ = cache.best([*SYSTEM, 2])
    assert first is not None and second is not None
    path = s.dir / f"{first.key}.kv"
    path.write_bytes(path.read_bytes()[:-10])
    (s.dir / f"{second.key}.kv").unlink()  # the disk bound dropped it
    with capture_logs() as logs:
        assert cache.state_of(first) is None
        assert cache.state_of(second) is None
    assert len(cache) == 0
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["prefix_cache.file_ignored"]


def test_a_write_cut_short_leaves_the_other_files_whole_and_its_leftover_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files are written to a temporary name, synced, then renamed: a power cut before the rename
    leaves the files written before as they were plus a `.tmp<pid>` leftover, which the next start
    deletes; the cut entry is simply not there."""
    import daemon.engine.prefix_cache as prefix_cache

    s = store(tmp_path)
    cache = PrefixCache(10_000_000, s)
    cache.add([*SYSTEM, 1], b"one" * 100)
    s.stop()
    (written,) = s.dir.glob(f"*{SUFFIX}")
    assert not list(s.dir.glob("*.tmp*"))  # nothing left beside the file

    def power_cut(src: object, dst: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(prefix_cache.os, "replace", power_cut)
    s.start()
    cache.add([*SYSTEM, 2, 2], b"two" * 100)
    s.stop()
    monkeypatch.undo()
    (leftover,) = s.dir.glob("*.tmp*")
    assert s.errors == 1 and list(s.dir.glob(f"*{SUFFIX}")) == [written]
    again = PrefixCache(10_000_000, store(tmp_path))
    assert again.load_from_disk() == 1
    entry, _ = again.best([*SYSTEM, 1])
    assert entry is not None and entry.state == b"one" * 100
    assert again.best([*SYSTEM, 2, 2])[1] < len(SYSTEM) + 2  # the cut entry is not there
    assert not leftover.exists()


def _entry_file(head: bytes, body: bytes = b"") -> bytes:
    return MAGIC + struct.pack("<I", len(head)) + head + body


@pytest.mark.parametrize(
    ("damage", "drop", "reason"),
    [
        ({"n_tokens": None}, None, "bad header"),
        ({"n_tokens": "65"}, None, "bad header"),
        ({"n_tokens": -1}, None, "bad header"),
        ({"n_tokens": 0}, None, "bad header"),
        ({"n_tokens": True}, None, "bad header"),
        ({"state_bytes": None}, None, "bad header"),
        ({"n_tokens": 2049}, None, "bad header"),  # more than n_ctx: never a prompt of this context
        ({"n_tokens": 2000}, None, "truncated"),  # possible, but the file does not hold them
        ({"state_bytes": 1 << 40}, None, "truncated"),  # would have asked for 1 TB
        ({"state_bytes": 10}, None, "longer than its header says"),
        ({}, "n_tokens", "bad header"),
        ({}, "state_bytes", "bad header"),
        ({"state_sha256": "0" * 64}, None, "state checksum mismatch"),
    ],
)
def test_a_damaged_header_is_ignored_with_a_log_line_and_the_rest_still_load(
    tmp_path: Path, damage: dict[str, object], drop: str | None, reason: str
) -> None:
    s = store(tmp_path)
    cache = PrefixCache(10_000_000, s)
    cache.add([*SYSTEM, 1], b"a" * 500)
    cache.add([*SYSTEM, 2], b"b" * 500)
    s.stop()
    victim = sorted(s.dir.glob("*.kv"))[0]
    rewrite_prefix_header(victim, damage, drop)
    with capture_logs() as logs:
        assert PrefixCache(10_000_000, store(tmp_path)).load_from_disk() == 1
    ignored = [e for e in logs if e["event"] == "prefix_cache.file_ignored"]
    assert len(ignored) == 1 and ignored[0]["reason"].startswith(reason), ignored
    assert not victim.exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (MAGIC, "truncated: no header"),
        (MAGIC + b"\xff\xff\xff\xff", "bad header length"),  # 4 GiB of header in a 12-byte file
        (_entry_file(b"[" * 30_000 + b"]" * 30_000), "bad header"),  # nested deeper than json can go
        (_entry_file(b'{"format": "\xff"}'), "'utf-8' codec can't decode"),
        (_entry_file(b'"a string"'), "bad header"),
        (_entry_file(b"{" * 10), "Expecting property name"),
    ],
)
def test_a_file_with_a_broken_header_never_stops_the_load(tmp_path: Path, content: bytes, reason: str) -> None:
    s = store(tmp_path)
    PrefixCache(10_000_000, s).add([*SYSTEM, 1], b"a" * 500)
    s.stop()
    (s.dir / f"{'0' * 32}{SUFFIX}").write_bytes(content)
    with capture_logs() as logs:
        assert PrefixCache(10_000_000, store(tmp_path)).load_from_disk() == 1
    ignored = [e for e in logs if e["event"] == "prefix_cache.file_ignored"]
    assert len(ignored) == 1 and ignored[0]["reason"].startswith(reason), ignored


def test_odd_things_in_the_folder_are_skipped(tmp_path: Path) -> None:
    """A directory named like an entry, a dangling link: logged and skipped, the rest load."""
    s = store(tmp_path)
    PrefixCache(10_000_000, s).add([*SYSTEM, 1], b"a" * 500)
    s.stop()
    (s.dir / f"{'1' * 32}{SUFFIX}").mkdir()
    (s.dir / f"{'2' * 32}{SUFFIX}").symlink_to(tmp_path / "nowhere")
    with capture_logs() as logs:
        assert PrefixCache(10_000_000, store(tmp_path)).load_from_disk() == 1
    assert [e["event"] for e in logs].count("prefix_cache.file_ignored") == 2
