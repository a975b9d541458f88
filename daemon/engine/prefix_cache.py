"""Saved KV states of prompt prefixes: an LRU in RAM, optionally mirrored to disk.

An entry is the token list of a prompt and llama.cpp's sequence state after evaluating it. A new
prompt reuses the entry with the longest common prefix (the engine restores it, trims it to the
common part and evaluates only the rest). RAM is bounded by bytes, least recently used dropped
first. With a `DiskStore`, entries are also written (atomically, by a writer thread) under
`<state_dir>/prefix-cache/<fingerprint>/` and read back at start; the fingerprint covers the
model file's sha256, n_ctx, the KV type and the file format, so a file made for another model or
setting is never offered. A file that is corrupt or truncated is dropped with one log line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import structlog

log = structlog.get_logger(__name__)

MAGIC = b"EDGEPFX1"
FORMAT_VERSION = 1
SUFFIX = ".kv"
# A header is a few hundred bytes of JSON (the fingerprint, two counts, a checksum).
_MAX_HEADER_BYTES = 64 * 1024
# Prompts shorter than this are cheap to evaluate again: not worth an entry.
MIN_TOKENS = 32
_WRITE_QUEUE = 8


def common_prefix(a: Sequence[object], b: Sequence[object]) -> int:
    """How many leading items (tokens, characters) two sequences share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Entry:
    tokens: tuple[int, ...]
    state: bytes | None  # None: spilled, only in its file
    persisted: bool = False  # its file is written (set by the writer thread)

    @property
    def key(self) -> str:
        return tokens_key(self.tokens)

    @property
    def size(self) -> int:
        """Bytes it holds in RAM."""
        return (len(self.state) if self.state is not None else 0) + 4 * len(self.tokens)


def tokens_key(tokens: Sequence[int]) -> str:
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()[:32]


class PrefixCache:
    """The RAM side (used on the inference thread only)."""

    def __init__(self, max_bytes: int, store: DiskStore | None = None) -> None:
        self.max_bytes = max_bytes
        self.store = store
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # oldest first
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.saved = 0
        self.spilled = 0

    def __len__(self) -> int:
        return len(self._entries)

    def load_from_disk(self) -> int:
        if self.store is None:
            return 0
        loaded = 0
        for entry in self.store.load(self.max_bytes):
            self._put(entry)
            loaded += 1
        return loaded

    def state_of(self, entry: Entry) -> bytes | None:
        """The entry's saved state: from RAM, or read back from its file (None, and the entry
        forgotten, when the file is gone or bad)."""
        if entry.state is not None:
            return entry.state
        if self.store is None:
            return None
        try:
            read = self.store.read(entry.key)
            if read.tokens != entry.tokens:
                raise ValueError("the file holds other tokens")
        except (OSError, ValueError, struct.error) as exc:
            if isinstance(exc, FileNotFoundError):  # the disk bound dropped it
                log.debug("prefix_cache.file_gone", key=entry.key)
            else:
                log.warning("prefix_cache.file_ignored", key=entry.key, reason=str(exc))
            read = None
        self._remove(entry.key)
        if read is None:
            return None
        entry.state = read.state
        self._put(entry)
        return entry.state

    def spill(self) -> int:
        """Let go of the RAM copy of every entry that is safely in its file (when the daemon is
        idle: the file is in the page cache, which the kernel can reclaim); the bytes freed."""
        freed = 0
        for entry in self._entries.values():
            if entry.persisted and entry.state is not None:
                freed += len(entry.state)
                self.bytes -= len(entry.state)
                entry.state = None
        if freed:
            self.spilled += freed
            log.debug("prefix_cache.spilled", bytes=freed, entries=len(self._entries))
        return freed

    def best(self, tokens: Sequence[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `tokens`, and that length."""
        best: Entry | None = None
        best_len = 0
        for entry in self._entries.values():
            n = common_prefix(entry.tokens, tokens)
            if n > best_len:
                best, best_len = entry, n
        return best, best_len

    def record(self, used: Entry | None) -> None:
        if used is None:
            self.misses += 1
            return
        self.hits += 1
        self._entries.move_to_end(used.key)

    def wants(self, tokens: Sequence[int]) -> bool:
        """Worth saving: long enough, and not already covered by an entry."""
        if self.max_bytes <= 0 or len(tokens) < MIN_TOKENS:
            return False
        entry, n = self.best(tokens)
        if entry is not None and n == len(tokens):
            self._entries.move_to_end(entry.key)
            return False
        return True

    def add(self, tokens: Sequence[int], state: bytes) -> None:
        entry = Entry(tuple(tokens), state)
        if entry.size > self.max_bytes:
            return
        # An entry that is a prefix of the new one is superseded by it.
        for old in [e for e in self._entries.values() if common_prefix(e.tokens, entry.tokens) == len(e.tokens)]:
            self._remove(old.key)
        self._put(entry)
        self.saved += 1
        if self.store is not None:
            self.store.write(entry)

    def drop(self, entry: Entry) -> None:
        """An entry llama.cpp would not restore: forget it here and on disk."""
        self._remove(entry.key)
        if self.store is not None:
            self.store.delete(entry.key)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def status(self) -> dict[str, Any]:
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "saved": self.saved,
            "spilled_bytes": self.spilled,
            "in_ram": sum(1 for e in self._entries.values() if e.state is not None),
            "persist": self.store is not None,
        }

    def _put(self, entry: Entry) -> None:
        if entry.key in self._entries:
            self._remove(entry.key)
        self._entries[entry.key] = entry
        self.bytes += entry.size
        while self.bytes > self.max_bytes and self._entries:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size


class DiskStore:
    """Entries as files: written by a writer thread (the inference thread never waits on the
    disk), read at start. Each file: MAGIC, a JSON header, the tokens, the state."""

    def __init__(self, root: Path, fingerprint: dict[str, Any], max_bytes: int) -> None:
        self.root = root
        self.fingerprint = fingerprint
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = root / digest
        self.max_bytes = max_bytes
        self.errors = 0
        self.last_error = ""
        self._queue: queue.Queue[tuple[str, Entry | str] | None] = queue.Queue(_WRITE_QUEUE)
        self._thread: threading.Thread | None = None

    # --- lifecycle (writer thread) ---------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prefix-cache-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish pending writes, then end the writer."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def write(self, entry: Entry) -> None:
        try:
            self._queue.put_nowait(("write", entry))
        except queue.Full:  # the disk is slow: this prefix stays in RAM only
            log.debug("prefix_cache.write_skipped", reason="writer busy")

    def delete(self, key: str) -> None:
        try:
            self._queue.put_nowait(("delete", key))
        except queue.Full:
            pass

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            action, payload = item
            try:
                if action == "write" and isinstance(payload, Entry):
                    self._write(payload)
                    self._enforce_bound()
                elif isinstance(payload, str):
                    (self.dir / f"{payload}{SUFFIX}").unlink(missing_ok=True)
            except OSError as exc:
                self.errors += 1
                if str(exc) != self.last_error:  # one line per kind of failure, not per write
                    log.warning("prefix_cache.disk_error", error=str(exc), dir=str(self.dir))
                self.last_error = str(exc)

    def _write(self, entry: Entry) -> None:
        state = entry.state
        if state is None:
            return  # already spilled: it was written before
        self.dir.mkdir(parents=True, exist_ok=True)
        header = dict(self.fingerprint)
        header.update(
            n_tokens=len(entry.tokens),
            state_bytes=len(state),
            state_sha256=hashlib.sha256(state).hexdigest(),
        )
        head = json.dumps(header, sort_keys=True).encode()
        final = self.dir / f"{entry.key}{SUFFIX}"
        tmp = final.with_suffix(f".tmp{os.getpid()}")
        with tmp.open("wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<I", len(head)))
            f.write(head)
            f.write(struct.pack(f"<{len(entry.tokens)}i", *entry.tokens))
            f.write(state)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        entry.persisted = True

    def _enforce_bound(self) -> None:
        """Oldest files first, across every model's folder, until the total fits."""
        files = sorted(self.root.glob(f"*/*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= self.max_bytes:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)

    # --- reading (at start, on the inference thread) ---------------------------------------

    def load(self, max_bytes: int) -> list[Entry]:
        """Valid entries, newest first, up to `max_bytes`; bad files are removed with a log line."""
        if not self.dir.is_dir():
            return []
        for stale in self.dir.glob("*.tmp*"):
            with contextlib.suppress(OSError):
                stale.unlink(missing_ok=True)
        out: list[Entry] = []
        total = 0
        for path in self._newest_first():
            try:
                entry = self._read(path)
            except (OSError, ValueError, struct.error) as exc:
                log.warning("prefix_cache.file_ignored", file=str(path), reason=str(exc))
                with contextlib.suppress(OSError):  # a directory of that name, a read-only folder
                    path.unlink(missing_ok=True)
                continue
            if total + entry.size > max_bytes:
                break
            total += entry.size
            out.append(entry)
        out.reverse()  # oldest first, so the newest ends up most recently used
        if out:
            log.info("prefix_cache.loaded", entries=len(out), bytes=total, dir=str(self.dir))
        return out

    def _newest_first(self) -> list[Path]:
        dated: list[tuple[float, Path]] = []
        for path in self.dir.glob(f"*{SUFFIX}"):
            try:
                dated.append((path.stat().st_mtime, path))
            except OSError:  # gone meanwhile, or a dangling link: _read says why
                dated.append((0.0, path))
        return [path for _, path in sorted(dated, key=lambda item: item[0], reverse=True)]

    def read(self, key: str) -> Entry:
        """One entry's file, checked as at start (on the inference thread)."""
        return self._read(self.dir / f"{key}{SUFFIX}")

    def _read(self, path: Path) -> Entry:
        """Raises OSError or ValueError (with what is wrong) for a file that is not a whole entry
        of this model. The header's counts are checked against n_ctx and the file's size before
        anything else is read, so a damaged header cannot make it allocate more than the file."""
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError("not a prefix-cache file")
            raw_len = f.read(4)
            if len(raw_len) < 4:
                raise ValueError("truncated: no header")
            (head_len,) = struct.unpack("<I", raw_len)
            if head_len > min(_MAX_HEADER_BYTES, size - f.tell()):
                raise ValueError(f"bad header length {head_len}")
            header = _json_object(f.read(head_len))
            for key, value in self.fingerprint.items():
                if header.get(key) != value:
                    raise ValueError(f"made for another {key}")
            n_tokens, state_bytes = header.get("n_tokens"), header.get("state_bytes")
            n_ctx = self.fingerprint.get("n_ctx")
            if not _count(n_tokens) or not _count(state_bytes) or n_tokens == 0 or (
                    isinstance(n_ctx, int) and n_tokens > n_ctx):
                raise ValueError(f"bad header: n_tokens {n_tokens!r}, state_bytes {state_bytes!r}")
            body, expected = size - f.tell(), 4 * n_tokens + state_bytes
            if body < expected:
                raise ValueError(f"truncated: {body} of {expected} bytes after the header")
            if body > expected:
                raise ValueError("longer than its header says")
            raw_tokens, state = f.read(4 * n_tokens), f.read(state_bytes)
        if len(raw_tokens) + len(state) < expected:  # cut short since fstat
            raise ValueError(f"truncated: {len(raw_tokens) + len(state)} of {expected} bytes after the header")
        entry = Entry(struct.unpack(f"<{n_tokens}i", raw_tokens), state, persisted=True)
        if entry.key != path.name[: -len(SUFFIX)]:
            raise ValueError("file name does not match its tokens")
        if hashlib.sha256(state).hexdigest() != header.get("state_sha256"):
            raise ValueError("state checksum mismatch")
        return entry


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except RecursionError:  # deeply nested brackets: not a header this module wrote
        raise ValueError("bad header") from None
    if not isinstance(header, dict):
        raise ValueError("bad header")
    return header


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def model_sha256(path: Path, cache_file: Path) -> str:
    """The model file's sha256, remembered by (path, size, mtime) so a restart does not hash
    hundreds of megabytes again."""
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    known: dict[str, str] = {}
    try:
        loaded = json.loads(cache_file.read_text())
        if isinstance(loaded, dict):
            known = {str(k): str(v) for k, v in loaded.items()}
    except (OSError, ValueError):
        pass
    if ident in known:
        return known[ident]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    known = {ident: value}  # only the current file: old ones are of no use
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return value
