"""Request validation: every field, every way to get it wrong."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from daemon.config import GenerationConfig
from daemon.protocol import (
    DEFAULT_LIMITS,
    MAX_QUOTED_CHARS,
    Code,
    EdgeError,
    Limits,
    Message,
    parse_json_object,
    parse_request,
    peek_id,
    quote,
)

DEFAULTS = GenerationConfig()


def parse(obj: dict[str, object], **kw: bool):  # type: ignore[no-untyped-def]
    return parse_request(obj, DEFAULTS, **kw)


def error_of(obj: dict[str, object]) -> EdgeError:
    with pytest.raises(EdgeError) as err:
        parse(obj)
    return err.value


def test_minimal_prompt_gets_defaults_and_an_id() -> None:
    r = parse({"prompt": "hi"})
    assert r.prompt == "hi" and r.messages is None and not r.raw
    assert len(r.id) == 32
    assert r.max_tokens == DEFAULTS.max_tokens and r.temperature == DEFAULTS.temperature
    assert r.priority == "normal" and r.stop == () and r.seed is None


def test_full_request() -> None:
    r = parse(
        {
            "id": "abc", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            "max_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": 3, "min_p": 0.1, "repeat_penalty": 1.2,
            "seed": 7, "stop": "\n", "stream": True, "priority": "high", "deadline_ms": 1000,
        }
    )
    assert r.messages == (Message("system", "s"), Message("user", "u"))
    assert (r.max_tokens, r.temperature, r.top_k, r.seed, r.stop, r.priority) == (5, 0.0, 3, 7, ("\n",), "high")


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"prompt": "x", "max_token": 5}, "max_token"),
        ({}, "exactly one of"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one of"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "id": ""}, "id"),
        ({"prompt": "x", "id": "a" * 129}, "id"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 2}, "top_p"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "priority": "urgent"}, "priority"),
        ({"prompt": "x", "deadline_ms": -5}, "deadline_ms"),
        ({"prompt": "x", "stop": [1]}, "stop"),
        ({"prompt": "x", "stop": ""}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "last message"),
        ({"messages": [{"role": "user", "content": "x"}], "raw": True}, "raw"),
        ({"prompt": "x", "reply_to": "a/b"}, "reply_to"),
    ],
)
def test_invalid_requests_name_the_field(obj: dict[str, object], needle: str) -> None:
    err = error_of(obj)
    assert err.code == Code.INVALID_REQUEST
    assert needle in err.message


def test_reply_to_only_where_allowed() -> None:
    assert parse({"prompt": "x", "reply_to": "dev/1/answer"}, allow_reply_to=True).reply_to == "dev/1/answer"
    with pytest.raises(EdgeError):
        parse({"prompt": "x", "reply_to": "dev/#"}, allow_reply_to=True)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xff\xfe garbage", Code.INVALID_JSON),
        (b"{not json", Code.INVALID_JSON),
        (b"[1, 2]", Code.INVALID_REQUEST),
        (b"42", Code.INVALID_REQUEST),
    ],
)
def test_bytes_that_are_not_a_json_object(data: bytes, code: str) -> None:
    with pytest.raises(EdgeError) as err:
        parse_json_object(data)
    assert err.value.code == code


def test_json_object_round_trip() -> None:
    assert parse_json_object(json.dumps({"prompt": "é"}).encode()) == {"prompt": "é"}


# --- huge numbers, quoting, limits ------------------------------------------------------------------

HUGE = int("1" + "0" * 400)


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repeat_penalty"])
@pytest.mark.parametrize("value", [HUGE, -HUGE])
def test_a_huge_integer_in_a_float_field_is_invalid_request(name: str, value: int) -> None:
    err = error_of({"prompt": "x", name: value})
    assert err.code == Code.INVALID_REQUEST and err.message.startswith(f"{name}: must be between")
    assert "an integer of about 401 digits" in err.message and len(err.message) < 120


@pytest.mark.parametrize("name", ["max_tokens", "top_k", "seed", "deadline_ms"])
def test_a_huge_integer_in_an_int_field_is_quoted_short(name: str) -> None:
    err = error_of({"prompt": "x", name: HUGE})
    assert err.code == Code.INVALID_REQUEST and err.message.startswith(f"{name}:") and len(err.message) < 120


def test_huge_request_integer_from_the_wire_keeps_the_id() -> None:
    line = b'{"id": "big-1", "prompt": "x", "temperature": 1' + b"0" * 400 + b"}"
    obj = parse_json_object(line)
    with pytest.raises(EdgeError) as err:
        parse(obj)
    assert err.value.code == Code.INVALID_REQUEST
    assert err.value.to_event(peek_id(obj)).to_dict()["id"] == "big-1"


def test_offending_values_are_quoted_short() -> None:
    assert quote("x" * 10_000) == '"' + "x" * MAX_QUOTED_CHARS + '…" (10000 characters)'
    assert quote(12) == "12" and quote(2.5) == "2.5" and quote(None) == "null" and quote([1]) == "array"
    long_key = "k" * 5000
    err = error_of({"prompt": "x", long_key: 1})
    assert err.message.startswith("unknown field(s): ") and len(err.message) < 400


def limited(**overrides: int) -> Limits:
    return replace(DEFAULT_LIMITS, **overrides)


@pytest.mark.parametrize(
    ("obj", "limits", "needle"),
    [
        ({"prompt": "x", "max_tokens": 101}, limited(max_tokens=100),
         "max_tokens: 101 is more than limits.max_tokens (100)"),
        ({"prompt": "é" * 6}, limited(max_prompt_bytes=11),
         "prompt: 12 bytes of text, more than limits.max_prompt_bytes (11)"),
        ({"messages": [{"role": "system", "content": "abc"}, {"role": "user", "content": "def"}]},
         limited(max_prompt_bytes=5), "messages: 6 bytes of text, more than limits.max_prompt_bytes (5)"),
        ({"prompt": "x", "stop": ["a", "b", "c"]}, limited(max_stop=2),
         "stop: 3 strings, more than limits.max_stop (2)"),
        ({"prompt": "x", "stop": ["ok", "toolong"]}, limited(max_stop_chars=4),
         "stop[1]: 7 characters, more than limits.max_stop_chars (4)"),
        ({"messages": [{"role": "user", "content": "u"}] * 3}, limited(max_messages=2),
         "messages: 3 messages, more than limits.max_messages (2)"),
        ({"prompt": "x", "stop": [[["a"]]]}, limited(max_json_depth=3),
         "request: nested more than 3 levels deep (limits.max_json_depth)"),
    ],
)
def test_limits_refuse_naming_the_field_and_the_limit(obj: dict[str, object], limits: Limits, needle: str) -> None:
    with pytest.raises(EdgeError) as err:
        parse_request(obj, DEFAULTS, limits=limits)
    assert err.value.code == Code.INVALID_REQUEST
    assert err.value.message == needle


def test_limits_let_through_what_is_within_them() -> None:
    limits = limited(
        max_tokens=100, max_prompt_bytes=12, max_stop=2, max_stop_chars=7, max_messages=2, max_json_depth=3
    )
    r = parse_request(
        {"messages": [{"role": "system", "content": "é" * 3}, {"role": "user", "content": "abcdef"}],
         "max_tokens": 100, "stop": ["ok", "toolong"]},
        DEFAULTS, limits=limits,
    )
    assert r.max_tokens == 100 and r.stop == ("ok", "toolong")


def test_deep_nesting_is_refused_without_recursion() -> None:
    deep: object = "x"
    for _ in range(900):  # json.loads can produce this; a recursive check would blow the stack
        deep = [deep]
    err = error_of({"prompt": "x", "stop": deep})  # type: ignore[dict-item]
    assert "limits.max_json_depth" in err.message
