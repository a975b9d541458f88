"""Request validation: every field, every way to get it wrong."""

from __future__ import annotations

import json

import pytest

from daemon.config import GenerationConfig
from daemon.protocol import Code, EdgeError, Message, parse_json_object, parse_request

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
