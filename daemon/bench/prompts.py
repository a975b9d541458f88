"""The benchmark's prompts: deterministic texts, each opened by a tag so no two share a prefix.

Every contender gets the very same strings (raw completions, no chat template), so every contender
evaluates the very same tokens. Pure, no I/O: the token counter is passed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

TokenCounter = Callable[[str], int]

_TOPICS = (
    "the sea", "a lighthouse", "a small robot", "the winter", "a garden", "a train", "an old clock",
    "a fox", "the moon", "a bakery", "a river", "a kite", "a violin", "the mountains", "a library",
    "a lost key",
)
_FILLER = (
    "The wind moved over the hills and the town was quiet.",
    "Somewhere a door opened and closed again.",
    "The baker had been awake since four, as always.",
    "Children walked to school along the old stone wall.",
    "Nobody in the village remembered a winter as long as this one.",
    "The river was high after the rain of the last week.",
)
_ROOMS = ("kitchen", "living room", "hallway", "bedroom", "bathroom", "office", "garage", "garden", "attic", "cellar")
_THINGS = (
    ("light", "ceiling light", "on, brightness 80 %"),
    ("light", "reading lamp", "off"),
    ("sensor", "temperature", "21.5 °C"),
    ("sensor", "humidity", "48 %"),
    ("switch", "socket", "on, drawing 12 W"),
    ("cover", "blinds", "open 60 %"),
    ("binary_sensor", "window", "closed"),
    ("climate", "thermostat", "heating to 21 °C"),
)
_QUESTIONS = (
    "Is the kitchen light on?",
    "What is the temperature in the office?",
    "Turn off the reading lamp in the bedroom.",
    "Are all the windows closed?",
    "How warm is it in the attic?",
    "Open the blinds in the living room.",
    "What is the humidity in the bathroom?",
    "Is the garage socket drawing power?",
)


def _mark(tag: str) -> str:
    """The opening word of a prompt: derived from its tag, so two prompts part at their first token
    (a shared opening would be a prefix-cache hit)."""
    return hashlib.sha256(tag.encode()).hexdigest()[:10]


# Words that are one token each after a space: they pad a story to an exact length.
_PAD_WORDS = ("and", "then", "the", "old", "man", "walked", "on", "home", "again", "slowly")


def opening(tag: str) -> str:
    """The shortest story opening of its own (about 15 tokens): for the decode figure, which
    llama-bench's tg measures from an empty context (and issue 8's table with a 10-token prompt)."""
    return f"{_mark(tag)}. Once upon a time, there was a little"


def story(tag: str, target_tokens: int, count: TokenCounter) -> str:
    """A story opening of exactly `target_tokens` tokens (BOS included; at least that many if no
    padding reaches it), ending mid-sentence so the model goes on writing for a long time.

    Exactly, because llama.cpp's prompt kernels are fastest at multiples of their tile: measured
    here, 128 tokens in one step take 210 ms and 130 tokens 228 ms, so a prompt of "about 128"
    would not compare like for like with llama-bench's pp128."""
    head = f"{_mark(tag)}. A story about {_TOPICS[sum(map(ord, tag)) % len(_TOPICS)]}."
    tail = " Once upon a time, there was a little"
    body: list[str] = []

    def text() -> str:
        return " ".join([head, *body]) + tail

    def fill() -> None:
        i = 0
        while count(text()) < target_tokens and i < 10_000:
            body.append(_FILLER[i % len(_FILLER)])
            i += 1

    fill()
    if count(text()) > target_tokens and body:
        body.pop()
        for word in _PAD_WORDS * target_tokens:  # bounded: a word that overshoots is taken back
            if count(text()) >= target_tokens:
                break
            body.append(word)
            if count(text()) > target_tokens:
                body.pop()
        fill()  # only if no padding reached it
    return text()


def system_prompt(tag: str, target_tokens: int, count: TokenCounter) -> str:
    """A Home Assistant–like system prompt (a device list) of about `target_tokens` tokens."""
    head = (
        f"{_mark(tag)}. You are the voice assistant of this house. Answer briefly and only about it. "
        "These are the devices and their current states:"
    )
    lines: list[str] = []
    i = 0
    while count("\n".join([head, *lines])) < target_tokens and i < 10_000:
        room = _ROOMS[i % len(_ROOMS)]
        domain, name, state = _THINGS[(i // len(_ROOMS)) % len(_THINGS)]
        entity = f"{domain}.{room.replace(' ', '_')}_{name.replace(' ', '_')}"
        lines.append(f"- {entity} ({room} {name}): {state}")
        i += 1
    return "\n".join([head, *lines])


def with_question(system: str, i: int) -> str:
    """The full raw prompt: the system prompt, then question number `i`."""
    return f"{system}\n\nQuestion: {_QUESTIONS[i % len(_QUESTIONS)]}\nAnswer:"


# The constrained-output figures: a command an automation turns into JSON, with a free-text field
# long enough that the answer runs for the whole token budget.
COMMAND_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "entity": {"type": "string", "enum": ["light.kitchen", "light.hall", "switch.fan", "cover.garage"]},
        "action": {"type": "string", "enum": ["turn_on", "turn_off", "toggle", "set"]},
        "value": {"type": "integer", "minimum": 0, "maximum": 100},
        "reason": {"type": "string", "maxLength": 240},
    },
    "required": ["entity", "action", "value", "reason"],
}
_COMMANDS = ("dim the kitchen light to 40 percent because we are watching a film",
             "close the garage, it is getting dark and cold outside",
             "switch the hall light on for the guests arriving at eight")


def json_request(i: int) -> str:
    command = _COMMANDS[i % len(_COMMANDS)]
    return (f"Turn the command into JSON with entity, action, value and a long reason.\nCommand: {command}\n"
            "JSON: ")
