"""The grammar search's pure parts: token classes, ranking a logits row, the search and its stops."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.engine import grammar_search
from daemon.engine.grammar_search import build, incomplete_tail, ranked, search

TEXTS = [b"a", b"ab", b"abc", b"b", b" ", b" a", b" ab", b" b", b"\xc3\xa9", b"\xc3\xa9t", b"", b"\xc3", b"<eos>",
         b" \xc3\xa9x"]


def test_every_token_gets_the_class_of_its_longest_represented_prefix() -> None:
    v = build(TEXTS, eog=[12])
    rep_text = {i: TEXTS[int(t)] for i, t in enumerate(v.representative)}
    for token, text in enumerate(TEXTS):
        slot = int(v.class_of[token])
        if token == 12 or text == b"\xc3":  # end of generation, a lone byte: asked about one by one
            assert slot == len(v.representative) + 1
        elif not text:
            assert slot == len(v.representative)  # no grammar allows an empty text
        else:
            assert text.startswith(rep_text[slot])
    # A space and an ASCII letter is a class of its own; a space and é has no token of its own.
    assert rep_text[int(v.class_of[6])] == b" a"
    assert rep_text[int(v.class_of[13])] == b" "
    assert {rep_text[int(c)] for c in v.ascii} == {b"a", b"b", b" "}
    assert {rep_text[int(c)] for c in v.space_ascii} == {b" a", b" b"}
    assert {rep_text[int(c)] for c in v.other} == {"é".encode()}


def test_members_are_the_tokens_of_the_classes_and_those_always_asked() -> None:
    v = build(TEXTS, eog=[12])
    a = v.by_char["a"]
    assert sorted(v.members(np.array([a])).tolist()) == [0, 1, 2, 11, 12]
    # The one-pass form for many classes gives the same tokens.
    every = np.arange(len(v.representative))
    assert sorted(v.members(every).tolist()) == sorted(t for t in range(len(TEXTS)) if TEXTS[t] != b"")


def test_the_sample_holds_the_non_ascii_characters_a_grammar_names() -> None:
    v = build(TEXTS, eog=[])
    assert v.by_char["é"] in v.sample_for('root ::= "été"').tolist()


def full_order(row: np.ndarray) -> list[int]:
    ids = np.arange(len(row))
    return ids[np.lexsort((ids, -row))].tolist()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-40, 10), min_size=1, max_size=300), st.integers(0, 300), st.integers(1, 300))
def test_ranked_is_a_slice_of_the_full_sort(values: list[int], start: int, length: int) -> None:
    row = np.array(values, dtype=np.float32)  # integers: many ties, and margins that must widen
    assert ranked(row, start, start + length).tolist() == full_order(row)[start : start + length]
    among = np.arange(0, len(row), 2)
    sub = [i for i in full_order(row) if i % 2 == 0]
    assert ranked(row, start, start + length, among).tolist() == sub[start : start + length]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-30, 5, width=32), min_size=1, max_size=400), st.integers(1, 50),
       st.sets(st.integers(0, 399), max_size=60), st.sampled_from([None, 3.0]))
def test_search_finds_what_checking_every_token_finds(values: list[float], needed: int, allowed: set[int],
                                                      nats: float | None) -> None:
    row = np.array(values, dtype=np.float32)
    asked: list[int] = []

    def allows(ids: np.ndarray) -> np.ndarray:
        asked.extend(ids.tolist())
        return ids[np.isin(ids, list(allowed))]

    got = search(row, allows, needed, nats).tolist()
    everything = [i for i in full_order(row) if i in allowed]
    if nats is None:
        assert got == everything[:needed]
    else:
        kept = [i for i in everything if row[i] >= row[everything[0]] - nats] if everything else []
        # Every token min-p keeps, in order; beyond them only tokens min-p drops anyway.
        assert [i for i in got if row[i] >= row[everything[0]] - nats] == kept[:needed]
    assert len(asked) == len(set(asked)), "no token is asked about twice"


def test_search_stops_early_when_the_best_are_allowed() -> None:
    row = np.linspace(0, -50, 10_000).astype(np.float32)
    asked: list[int] = []

    def allows(ids: np.ndarray) -> np.ndarray:
        asked.extend(ids.tolist())
        return ids

    assert search(row, allows, 1, None).tolist() == [0]
    assert len(asked) == grammar_search.CHUNKS[0]


def test_incomplete_tail() -> None:
    assert incomplete_tail(b"abc") == b""
    assert incomplete_tail("é".encode()) == b""
    assert incomplete_tail(b"a\xc3") == b"\xc3"
    assert incomplete_tail(b"a\xe2\x82") == b"\xe2\x82"
    assert incomplete_tail("€".encode()) == b""
    assert incomplete_tail(b"\xf0\x9f\x98") == b"\xf0\x9f\x98"
    assert incomplete_tail(b"") == b""
