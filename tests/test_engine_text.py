"""The incremental detokenizer: UTF-8 split across tokens and stop strings split across tokens."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.engine.text import TextStream


def test_multibyte_character_split_across_tokens_is_released_whole() -> None:
    t = TextStream()
    snowman = "☃".encode()
    assert t.feed(b"a" + snowman[:1]) == "a"
    assert t.feed(snowman[1:2]) == ""
    assert t.feed(snowman[2:] + b"b") == "☃b"
    assert t.finish() == ""


def test_stop_string_split_across_tokens_is_held_back_and_cut() -> None:
    t = TextStream(stops=("<end>",))
    assert t.feed(b"hello <e") == "hello "
    assert t.feed(b"n") == ""
    assert t.feed(b"d> more") == ""
    assert t.stopped and t.text == "hello "


def test_held_back_tail_is_released_when_it_is_not_a_stop() -> None:
    t = TextStream(stops=("<end>",))
    assert t.feed(b"a <e") == "a "
    assert t.feed(b"x") == "<ex"
    assert not t.stopped


def test_finish_flushes_a_held_tail_and_released_is_what_went_out() -> None:
    t = TextStream(stops=("STOP",))
    assert t.feed(b"go ST") == "go "
    assert t.released() == "go "
    assert t.finish() == "ST"


@given(st.text(), st.lists(st.integers(min_value=1, max_value=7), max_size=40))
def test_any_split_of_utf8_gives_back_the_text(text: str, cuts: list[int]) -> None:
    data = text.encode("utf-8", errors="surrogatepass")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return
    t = TextStream()
    out, i = "", 0
    for n in cuts:
        out += t.feed(data[i : i + n])
        i += n
    out += t.feed(data[i:]) + t.finish()
    assert out == text
