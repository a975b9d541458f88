"""TokenPacing: MQTT token events at most one per interval per request, merged, in order (pure)."""

from __future__ import annotations

from daemon.protocol import TokenEvent
from daemon.transports.mqtt.token_pacing import TokenPacing


def _t(text: str) -> TokenEvent:
    return TokenEvent("r", text)


def test_the_first_token_goes_at_once_and_the_next_are_merged_per_interval() -> None:
    pacing = TokenPacing(0.05)
    sent = []
    for i, now in enumerate([0.0, 0.02, 0.04, 0.06, 0.07, 0.2]):
        out = pacing.token("a", _t(f"{i} "), now)
        sent.append(None if out is None else out.text)
    assert sent == ["0 ", None, None, "1 2 3 ", None, "4 5 "]


def test_a_held_text_goes_out_on_the_tick_when_the_stream_stalls_and_before_the_final() -> None:
    pacing = TokenPacing(0.05)
    assert pacing.token("a", _t("Once"), 0.0) is not None
    assert pacing.token("a", _t(" upon"), 0.01) is None
    assert pacing.next_due() == 0.05
    assert pacing.due(0.04) == []
    assert [(k, e.text) for k, e in pacing.due(0.05)] == [("a", " upon")]
    assert pacing.next_due() is None and pacing.due(1.0) == []
    assert pacing.token("a", _t(" a"), 0.06) is None
    held = pacing.take("a", 0.07, final=True)  # the done event comes: the held text first
    assert held is not None and held.text == " a"
    assert len(pacing) == 0 and pacing.take("a", 0.08, final=True) is None


def test_streams_are_paced_apart_and_the_concatenation_is_kept() -> None:
    pacing = TokenPacing(0.05)
    out: dict[str, list[str]] = {"a": [], "b": []}
    words = [f"w{i} " for i in range(40)]
    for i, word in enumerate(words):
        for key in out:
            event = pacing.token(key, TokenEvent(key, word), i * 0.011)
            if event is not None:
                out[key].append(event.text)
    for key in out:
        tail = pacing.take(key, 1.0, final=True)
        out[key] += [tail.text] if tail is not None else []
        assert "".join(out[key]) == "".join(words)
        assert len(out[key]) <= 1 + 40 * 0.011 / 0.05 + 1  # about one per interval, not one per token


def test_an_interval_of_0_sends_every_token_and_keeps_nothing() -> None:
    pacing = TokenPacing(0.0)
    assert [pacing.token("a", _t(str(i)), 0.0) for i in range(3)] == [_t("0"), _t("1"), _t("2")]
    assert len(pacing) == 0 and pacing.next_due() is None


def test_forget_drops_a_request_that_left_without_a_final() -> None:
    pacing = TokenPacing(0.05)
    pacing.token("a", _t("x"), 0.0)
    pacing.token("a", _t("y"), 0.01)
    pacing.forget("a")
    assert len(pacing) == 0 and pacing.due(1.0) == []
