"""Finding the tokens a grammar allows without asking it about the whole vocabulary.

A grammar that refuses the text "ab" refuses every token whose text starts with "ab": it would have
to accept those characters first. So every token belongs to the class of its first character — or,
for the many tokens that start with a space (137,542 of Gemma 3's 262,144), of its first two
characters when the vocabulary holds a token of exactly those two — and the token of exactly that
text stands for the class. Asking the grammar about the representatives tells which classes can
hold an allowed token at all; only their members need checking one by one.

Gemma's vocabulary has 19,245 different first characters, 19,117 of them outside ASCII. Asking
about all of those would cost as much as the search it saves, so they are asked about only when the
grammar allows one of a sample: the most common ones, plus every non-ASCII character the grammar's
own text names (its literals and the ends of its ranges). A grammar that allows a character must
allow it where its literal or range says, so the sample misses only characters it names nowhere
— those a negated class (`[^"]`) allows, and those the sample's common characters already show.

Pure: built from the tokens' texts (as the grammar sees them, special tokens included).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Tokens outside every class: asked about one by one (end of generation, a byte of a character,
# no token of their prefix's exact text), or allowed by no grammar (an empty text).
_CHECK_ALWAYS, _NEVER = -1, -2
_SAMPLE_SIZE = 64
_LOOP_MAX = 512  # more classes than this: one pass over the vocabulary beats gathering each


@dataclass(frozen=True)
class VocabClasses:
    representative: Any  # int32[classes]: the token whose text is exactly the class's prefix
    class_of: Any  # int32[n_vocab]: the token's class; len(classes) + 0 = NEVER, + 1 = _CHECK_ALWAYS
    ascii: Any  # int32: classes of one ASCII character (always asked about)
    space_ascii: Any  # int32: classes of a space and an ASCII character (asked when a space is allowed)
    space: int  # the class of " "
    other: Any  # int32: the rest (a character outside ASCII, alone or after a space)
    common_other: Any  # int32: the most common of `other` (the default sample)
    by_char: dict[str, int]  # prefix (one character, or a space and one) → its class
    order: Any  # int32[n_vocab]: token ids grouped by class (class_of ascending)
    starts: Any  # int64[classes + 3]: where each group of `order` starts (and the end)

    def sample_for(self, grammar: str) -> Any:
        """The non-ASCII classes to ask about first for this grammar: the common ones and every
        non-ASCII character its text names."""
        named = {self.by_char[p] for ch in set(grammar) if ord(ch) > 127 for p in (ch, " " + ch) if p in self.by_char}
        if not named:
            return self.common_other
        return np.union1d(self.common_other, np.fromiter(named, dtype=np.int32))

    def members(self, classes: Any) -> Any:
        """Token ids of these classes and of the tokens always asked about (in no set order)."""
        if len(classes) > _LOOP_MAX:
            allowed = np.zeros(len(self.representative) + 2, dtype=bool)
            allowed[classes] = True
            allowed[-1] = True  # the tokens asked about one by one
            return np.flatnonzero(allowed[self.class_of])
        starts, order = self.starts, self.order
        parts = [order[starts[c]:starts[c + 1]] for c in classes]
        parts.append(order[starts[-2]:starts[-1]])  # the tokens asked about one by one
        return np.concatenate(parts)


def _text(raw: bytes) -> str | None:
    """A token's text, or None for a byte token (part of a character, which the grammar checks itself)."""
    try:
        return raw.decode("utf-8") if raw else ""
    except UnicodeDecodeError:
        return None


def build(texts: Sequence[bytes], eog: Iterable[int]) -> VocabClasses:
    """Classes for a vocabulary: `texts[i]` is token i's text as the grammar sees it.

    Two passes over `texts` (the engine's holds every token's bytes in one buffer): no list of
    262,144 decoded texts is kept. Such a list, freed after the build, left ~30 MiB in
    RSS for good (Python's small-object arenas stay pinned by the few strings that survive)."""
    n = len(texts)
    exact: dict[str, int] = {}
    for token in range(n):
        text = _text(texts[token])
        if text and len(text) <= 2 and text not in exact:
            exact[text] = token
    prefixes: list[str] = []
    index: dict[str, int] = {}
    class_of = np.full(n, _CHECK_ALWAYS, dtype=np.int32)
    counts: Counter[int] = Counter()
    for token in range(n):
        text = _text(texts[token])
        if text is None:
            continue
        if not text:
            class_of[token] = _NEVER
            continue
        prefix = text[:2] if text[0] == " " and len(text) >= 2 and text[:2] in exact else text[0]
        if prefix not in exact:
            continue  # no token of exactly this text to stand for it: checked one by one
        found = index.get(prefix)
        if found is None:
            found = index[prefix] = len(prefixes)
            prefixes.append(prefix)
        class_of[token] = found
        counts[found] += 1
    for token in eog:
        if 0 <= token < n:
            class_of[token] = _CHECK_ALWAYS
    representative = np.array([exact[p] for p in prefixes], dtype=np.int32)
    ascii_only = np.array([all(ord(c) < 128 for c in p) for p in prefixes], dtype=bool)
    single = np.array([len(p) == 1 for p in prefixes], dtype=bool)
    other = np.flatnonzero(~ascii_only).astype(np.int32)
    common = sorted(other.tolist(), key=lambda c: -counts[c])[:_SAMPLE_SIZE]
    slot = np.select([class_of >= 0, class_of == _NEVER], [class_of, len(prefixes)], len(prefixes) + 1)
    order = np.argsort(slot, kind="stable").astype(np.int32)
    starts = np.searchsorted(slot[order], np.arange(len(prefixes) + 3))
    return VocabClasses(
        representative=representative,
        class_of=slot.astype(np.int32),
        order=order,
        starts=starts,
        ascii=np.flatnonzero(ascii_only & single).astype(np.int32),
        space_ascii=np.flatnonzero(ascii_only & ~single).astype(np.int32),
        space=index.get(" ", -1),
        other=other,
        common_other=np.array(sorted(common), dtype=np.int32),
        by_char=dict(index),
    )


# --- searching a logits row ------------------------------------------------------------------

# Candidates asked about per round: best first, in growing chunks (most searches end in the first).
CHUNKS = (32, 256, 2048, 16384, 1 << 30)


def ranked(row: Any, start: int, stop: int, among: Any = None) -> Any:
    """Token ids of ranks [start, stop) of `row` (over the ids `among`, default all), best first,
    ties by token id — the order llama.cpp's top-k leaves them in. Only the first `stop` are ever
    ordered: the ids within a margin of the best that holds at least `stop` of them are
    partitioned, and those sorted."""
    values = row if among is None else row[among]
    stop = min(stop, len(values))
    if not stop:
        return np.zeros(0, dtype=np.int64)
    best = float(values.max())
    for margin in (8.0, 16.0, 32.0):
        picked = np.flatnonzero(values >= best - margin)
        if len(picked) >= stop:
            break
    else:
        picked = np.arange(len(values))
    pool = picked if among is None else among[picked]
    logits = row[pool]
    if stop < len(pool):
        # The top `stop` by logit; at the boundary value only the lowest ids, as a full sort would.
        edge = float(logits[np.argpartition(-logits, stop - 1)[stop - 1]])
        above = pool[logits > edge]
        pool = np.concatenate((above, np.sort(pool[logits == edge])[: stop - len(above)]))
    return pool[np.lexsort((pool, -row[pool]))][start:stop]


def best_first(row: Any, ids: Any) -> Any:
    return ids[np.lexsort((ids, -row[ids]))]


def search(row: Any, allows: Any, needed: int, min_p_nats: float | None, among: Any = None,
           best: float | None = None) -> Any:
    """Allowed token ids, best first: the best `needed` of them, or — when min-p is on — every
    allowed one within `min_p_nats` of the best allowed (`best`, if one is already known), which
    are all min-p could keep. `allows(ids)` returns the ids (in their order) the grammar allows."""
    found: list[Any] = []
    checked: list[Any] = []
    n_found = done = 0
    total = len(row) if among is None else len(among)
    for chunk in CHUNKS:
        ids = ranked(row, done, done + chunk, among)
        if not len(ids):
            break
        done += len(ids)
        checked.append(ids)
        found.append(allows(ids))
        n_found += len(found[-1])
        if best is None and n_found:
            best = float(row[next(f[0] for f in found if len(f))])
        if n_found >= needed or done >= total:
            break
        if min_p_nats is not None and best is not None:
            floor = best - min_p_nats
            if float(row[ids[-1]]) >= floor:
                # Every allowed token min-p keeps is at or above the floor: ask about all of them.
                rest = row >= floor
                if among is not None:
                    inside = np.zeros(len(row), dtype=bool)
                    inside[among] = True
                    rest &= inside
                rest[np.concatenate(checked)] = False
                found.append(best_first(row, allows(np.flatnonzero(rest))))
            break
    return np.concatenate(found)[:needed] if found else np.zeros(0, dtype=np.int64)


def incomplete_tail(data: bytes) -> bytes:
    """The bytes at the end of `data` that start a UTF-8 character without finishing it."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: its lead is further back
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return data[-back:] if back < need else b""
    return b""
