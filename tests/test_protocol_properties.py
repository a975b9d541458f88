"""Property-based tests of daemon/protocol.py (hypothesis): whatever arrives — any bytes, any JSON
value — becomes a valid Request or a structured EdgeError, never another exception and never a hang;
and every event survives to_dict -> to_json_line -> json.loads unchanged, as one line."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import GenerationConfig
from daemon.protocol import (
    _REQUEST_FIELDS,
    MAX_ID_CHARS,
    PRIORITIES,
    Code,
    DoneEvent,
    EdgeError,
    ErrorEvent,
    Limits,
    QueuedEvent,
    Request,
    TokenEvent,
    parse_json_object,
    parse_request,
    peek_id,
    to_json_line,
)

DEFAULTS = GenerationConfig()
# A hang shows as a deadline miss; generous, the machine is shared.
FAST = settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
# Messages quote offending values short: nothing a client sends comes back at length.
MAX_MESSAGE_CHARS = 600

# Every kind of JSON scalar, with the edges: huge integers, NaN/Infinity (Python's json accepts
# them), -0.0, lone surrogates and other odd code points.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),
    st.sampled_from(["", "high", "user", "system", "assistant", "\x00", "#", "+", "a/b"]),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(sorted(_REQUEST_FIELDS)) | st.text(max_size=12)
request_like = st.dictionaries(field_names, json_values, max_size=8)
limits = st.builds(
    Limits,
    max_tokens=st.integers(1, 300),
    max_prompt_bytes=st.integers(1, 200),
    max_stop=st.integers(0, 4),
    max_stop_chars=st.integers(1, 10),
    max_messages=st.integers(1, 4),
    max_json_depth=st.integers(3, 6),
)


def outcome(data: bytes, lim: Limits | None = None, allow_reply_to: bool = False) -> Request | EdgeError:
    """The socket's path for one line: bytes -> object -> request, stopping at the first EdgeError."""
    try:
        obj = parse_json_object(data)
        return parse_request(obj, DEFAULTS, allow_reply_to=allow_reply_to, limits=lim or Limits())
    except EdgeError as exc:
        return exc


def check_error(err: EdgeError) -> None:
    assert err.code in (Code.INVALID_JSON, Code.INVALID_REQUEST)
    assert isinstance(err.message, str) and 0 < len(err.message) <= MAX_MESSAGE_CHARS, err.message
    event = err.to_event(None).to_dict()
    assert json.loads(to_json_line(event)) == event


def check_request(request: Request) -> None:
    assert isinstance(request.id, str) and 0 < len(request.id) <= MAX_ID_CHARS
    assert (request.prompt is None) != (request.messages is None)
    assert request.priority in PRIORITIES and request.max_tokens >= 1
    for value in (request.temperature, request.top_p, request.min_p, request.repeat_penalty):
        assert isinstance(value, float) and math.isfinite(value)


@FAST
@given(st.binary(max_size=512))
def test_any_bytes(data: bytes) -> None:
    result = outcome(data)
    check_error(result) if isinstance(result, EdgeError) else check_request(result)


@FAST
@given(json_values)
def test_any_json_value_as_the_whole_line(value: Any) -> None:
    try:
        line = json.dumps(value).encode("utf-8", errors="surrogatepass")
    except ValueError:  # an integer too long for str(): not something a client can send either
        return
    result = outcome(line)
    check_error(result) if isinstance(result, EdgeError) else check_request(result)


@FAST
@given(request_like, limits, st.booleans())
def test_any_request_shaped_object(obj: dict[str, Any], lim: Limits, allow_reply_to: bool) -> None:
    try:
        result: Request | EdgeError = parse_request(obj, DEFAULTS, allow_reply_to=allow_reply_to, limits=lim)
    except EdgeError as exc:
        result = exc
        assert exc.code == Code.INVALID_REQUEST
        assert len(exc.message) <= MAX_MESSAGE_CHARS
        # The id of the request still comes back when it is usable, whatever else is wrong.
        request_id = peek_id(obj)
        assert exc.to_event(request_id).id == request_id
    else:
        check_request(result)
        assert result.max_tokens <= max(lim.max_tokens, DEFAULTS.max_tokens)
        assert len(result.stop) <= lim.max_stop and all(len(s) <= lim.max_stop_chars for s in result.stop)


@FAST
@given(st.sampled_from(sorted(_REQUEST_FIELDS - {"id"})), json_values)
def test_any_value_in_any_field_names_the_field(name: str, value: Any) -> None:
    obj = {"id": "p1", "prompt": "hi", name: value}
    if name == "messages":
        obj.pop("prompt")
    try:
        parse_request(obj, DEFAULTS, allow_reply_to=True)
    except EdgeError as exc:
        assert exc.code == Code.INVALID_REQUEST
        assert exc.message.startswith((f"{name}", "request:", "exactly one of", "raw:")), exc.message
        assert len(exc.message) <= MAX_MESSAGE_CHARS


valid_requests = st.fixed_dictionaries(
    {"prompt": st.text(max_size=50)},
    optional={
        "id": st.text(min_size=1, max_size=MAX_ID_CHARS),
        "max_tokens": st.integers(1, 4096),
        "temperature": st.floats(0.0, 5.0) | st.integers(0, 5),
        "top_p": st.floats(0.0, 1.0),
        "top_k": st.integers(0, 1000),
        "seed": st.integers(-1, 2**32 - 1),
        "stop": st.lists(st.text(min_size=1, max_size=16), max_size=16),
        "stream": st.booleans(),
        "priority": st.sampled_from(PRIORITIES),
        "deadline_ms": st.integers(1, 86_400_000),
    },
)


@FAST
@given(valid_requests)
def test_valid_requests_parse_to_what_was_sent(obj: dict[str, Any]) -> None:
    request = parse_request(json.loads(to_json_line(obj)), DEFAULTS)
    assert request.prompt == obj["prompt"]
    assert request.id == obj.get("id", request.id)
    assert request.max_tokens == obj.get("max_tokens", DEFAULTS.max_tokens)
    assert request.temperature == float(obj.get("temperature", DEFAULTS.temperature))
    assert request.stop == tuple(obj.get("stop", ()))
    assert request.priority == obj.get("priority", "normal")


# --- events round-trip --------------------------------------------------------------------------------

ids = st.text(max_size=MAX_ID_CHARS)
# Event text is decoded model output (valid Unicode); one lone surrogate still must not cost the
# client its line (to_json_line falls back to ASCII escapes). Two would pair up in JSON, by design.
texts = st.text() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
finite = st.floats(allow_nan=False, allow_infinity=False)
events = st.one_of(
    st.builds(QueuedEvent, ids, st.integers(0, 10_000)),
    st.builds(TokenEvent, ids, texts),
    st.builds(
        DoneEvent, ids, texts, st.sampled_from(["stop", "length", "cancelled"]),
        st.dictionaries(st.text(max_size=10), st.integers(0, 10**6), max_size=4),
        st.dictionaries(st.text(max_size=10), finite | st.integers() | st.none(), max_size=4),
    ),
    st.builds(ErrorEvent, ids | st.none(), st.sampled_from(sorted(vars(Code)[k] for k in vars(Code)
                                                                  if k.isupper())), texts,
              st.integers(0, 10**7) | st.none()),
)


@FAST
@given(events)
def test_every_event_round_trips_as_one_line(event: QueuedEvent | TokenEvent | DoneEvent | ErrorEvent) -> None:
    data = event.to_dict()
    line = to_json_line(data)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == data
    assert data["event"] in ("queued", "token", "done", "error") and data["id"] == event.id
    assert event.final == (data["event"] in ("done", "error"))
