"""The Wyoming door's pure parts: what a transcript becomes, and what is spoken back."""

from __future__ import annotations

import pytest
from wyoming.info import Info

from daemon.config import GenerationConfig
from daemon.protocol import Code, DoneEvent, ErrorEvent
from daemon.transports import wyoming as W


def test_a_transcript_is_one_short_spoken_answer_request() -> None:
    request = W.request_for("What time is sunset?", "de", GenerationConfig(max_tokens=40, seed=7))
    system, user = request.messages or ()
    assert system.role == "system" and "spoken aloud" in system.content and "language de" in system.content
    assert (user.role, user.content) == ("user", "What time is sunset?")
    assert request.max_tokens == 40 and request.seed == 7 and not request.stream
    assert W.request_for("hi", None, GenerationConfig()).seed is None  # seed -1: random


def test_answers_are_handled_and_empty_ones_are_not() -> None:
    assert W.answer_for(DoneEvent("r", "  Paris.  ", "stop")) == (True, "Paris.")
    assert W.answer_for(DoneEvent("r", "   ", "stop")) == (False, W.NO_ANSWER)


@pytest.mark.parametrize("code", [Code.THROTTLED, Code.QUEUE_FULL, Code.MEMORY_LOW, Code.MODEL_UNAVAILABLE,
                                  Code.SHUTTING_DOWN, Code.DEADLINE_EXCEEDED, Code.PROMPT_TOO_LONG])
def test_every_refusal_has_its_own_sentence_to_speak(code: str) -> None:
    handled, text = W.answer_for(ErrorEvent("r", code, "internal wording", 5000))
    assert not handled and text == W.SPOKEN[code]
    assert "_" not in text and text.endswith(".")  # no codes read out, a whole sentence
    assert len(set(W.SPOKEN.values())) == len(W.SPOKEN)


def test_an_unknown_error_still_gets_a_sentence() -> None:
    assert W.answer_for(ErrorEvent("r", Code.INTERNAL_ERROR, "boom")) == (False, W.GENERIC_FAILURE)


def test_info_has_one_installed_handle_program() -> None:
    event = W.info("gemma-3-270m", []).event()
    info = Info.from_event(event)
    (program,) = info.handle
    assert program.installed and not program.supports_handled_streaming and program.models[0].name == "gemma-3-270m"
    assert event.type == "info" and not info.asr and not info.tts
