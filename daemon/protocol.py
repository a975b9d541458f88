"""The request/response protocol shared by every transport.

Pure: parses bytes and JSON objects into validated, frozen `Request`s and turns events into JSON
objects. No I/O. Every problem is an `EdgeError` with a stable `code`; transports map it to an
`error` event once, at their boundary.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from daemon.config import GenerationConfig
    from daemon.constraints import ConstraintCompiler


class Code:
    """Stable error codes: clients switch on these, so they never change meaning."""

    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    PROMPT_TOO_LONG = "prompt_too_long"
    QUEUE_FULL = "queue_full"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    MODEL_UNAVAILABLE = "model_unavailable"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL_ERROR = "internal_error"
    THROTTLED = "throttled"
    MEMORY_LOW = "memory_low"
    DUPLICATE_ID = "duplicate_id"
    FORBIDDEN = "forbidden"


class EdgeError(Exception):
    """The one error family of the daemon: a code clients can switch on and a human message."""

    def __init__(self, code: str, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    def to_event(self, request_id: str | None) -> ErrorEvent:
        return ErrorEvent(request_id, self.code, self.message, self.retry_after_ms)

    def __repr__(self) -> str:
        return f"EdgeError({self.code!r}, {self.message!r})"


MAX_ID_CHARS = 128
PRIORITIES = ("high", "normal", "low")
ROLES = ("system", "user", "assistant")
# An offending value is quoted in an error message up to this many characters, never whole: a
# 10 MB string or a 4,000-digit number must not come back (or go to the log) in full.
MAX_QUOTED_CHARS = 40


@dataclass(frozen=True)
class Limits:
    """Per-request resource limits: the `[limits]` table of the config (daemon.config reads it into
    this class; the metadata are its bounds there). Enforced by `parse_request`, each refusal an
    `invalid_request` naming the field and the limit."""

    # Ceiling on a request's `max_tokens` (generation.max_tokens, the default, must not exceed it).
    max_tokens: int = field(default=4096, metadata={"min": 1, "max": 131072})
    # UTF-8 bytes of `prompt`, or of all `messages` contents together.
    max_prompt_bytes: int = field(default=65536, metadata={"min": 1, "max": 64 * 1024 * 1024})
    max_stop: int = field(default=16, metadata={"min": 0, "max": 1024})  # how many `stop` strings
    max_stop_chars: int = field(default=128, metadata={"min": 1, "max": 65536})  # each one's length
    max_messages: int = field(default=64, metadata={"min": 1, "max": 100000})
    # Nesting of arrays/objects in a request ({"messages": [{...}]} is 3 deep).
    max_json_depth: int = field(default=8, metadata={"min": 3, "max": 512})


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Request:
    id: str
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    raw: bool = False
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    priority: str = "normal"
    deadline_ms: int | None = None
    reply_to: str | None = None
    # Constrained output: GBNF text (root symbol "root"), already validated by daemon.constraints.
    grammar: str | None = None


@dataclass(frozen=True)
class Origin:
    """Which door a request came in by; logged, never used for routing inside the core."""

    transport: str
    peer: str = ""


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueuedEvent:
    id: str
    position: int
    final = False

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "event": "queued", "position": self.position}


@dataclass(frozen=True)
class TokenEvent:
    id: str
    text: str
    final = False

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "event": "token", "text": self.text}


@dataclass(frozen=True)
class DoneEvent:
    id: str
    text: str
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float | int | None] = field(default_factory=dict)
    # With a constraint the event also carries `json`: the parsed answer, or null (cut off, not JSON).
    constrained: bool = False
    json_value: Any = None
    final = True

    def to_dict(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "event": "done",
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": dict(self.usage),
            "timings": dict(self.timings),
        }
        if self.constrained:
            out["json"] = self.json_value
        return out


@dataclass(frozen=True)
class ErrorEvent:
    id: str | None
    code: str
    message: str
    retry_after_ms: int | None = None
    final = True

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "event": "error",
            "code": self.code,
            "message": self.message,
        }
        if self.retry_after_ms is not None:
            out["retry_after_ms"] = self.retry_after_ms
        return out


Event = Union[QueuedEvent, TokenEvent, DoneEvent, ErrorEvent]


def to_json_line(obj: dict[str, Any]) -> bytes:
    """One compact JSON object and a newline: the framing of the socket protocol."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # never let one odd string cost a client its final event
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


# --- parsing --------------------------------------------------------------------------------


def new_request_id() -> str:
    return uuid.uuid4().hex


def parse_json_object(data: bytes) -> dict[str, Any]:
    """UTF-8 JSON object or `invalid_json`; anything else (array, number) is `invalid_request`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgeError(Code.INVALID_JSON, f"payload is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EdgeError(
            Code.INVALID_JSON, f"payload is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise EdgeError(Code.INVALID_JSON, "payload is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal of thousands of digits
        raise EdgeError(Code.INVALID_JSON, f"payload is not acceptable JSON: {exc}") from None
    try:
        # "\ud800" escapes decode to lone surrogates, which no UTF-8 answer could echo back.
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise EdgeError(Code.INVALID_JSON, "payload contains an unpaired UTF-16 surrogate escape") from None
    except RecursionError:
        raise EdgeError(Code.INVALID_JSON, "payload is nested too deeply") from None
    if not isinstance(obj, dict):
        raise EdgeError(Code.INVALID_REQUEST, f"payload must be a JSON object, got {_json_type(obj)}")
    return obj


def peek_id(obj: dict[str, Any]) -> str | None:
    """The request id if it is usable, so an error about other fields can still be correlated."""
    value = obj.get("id")
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS:
        return value
    return None


def quote(value: Any) -> str:
    """An offending value for an error message: JSON, cut to MAX_QUOTED_CHARS with the full size said."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        if value.bit_length() <= 128:  # at most 39 digits
            return str(value)
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        # Not ASCII-escaped: an emoji would take 12 characters of the message instead of one. (A lone
        # surrogate is made safe by the line encoder, to_json_line, like any other odd string.)
        if len(value) <= MAX_QUOTED_CHARS:
            return json.dumps(value, ensure_ascii=False)
        return json.dumps(value[:MAX_QUOTED_CHARS], ensure_ascii=False)[:-1] + f'…" ({len(value)} characters)'
    return _json_type(value)


_REQUEST_FIELDS = frozenset(
    {
        "id", "prompt", "messages", "raw", "max_tokens", "temperature", "top_p", "top_k", "min_p",
        "repeat_penalty", "seed", "stop", "stream", "priority", "deadline_ms", "reply_to",
    }
)
CONSTRAINT_FIELDS = frozenset({"format", "json_schema", "grammar"})


def parse_request(
    obj: dict[str, Any],
    defaults: GenerationConfig,
    *,
    allow_reply_to: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    constraints: ConstraintCompiler | None = None,
) -> Request:
    """Validate a request object; raises `EdgeError(invalid_request)` naming the field at fault
    (and, for a resource limit, the limit: `limits.<key>`).

    `constraints` compiles `format`/`json_schema`/`grammar`; a door that passes none refuses them."""
    _check_depth(obj, limits.max_json_depth)
    allowed = _REQUEST_FIELDS if allow_reply_to else _REQUEST_FIELDS - {"reply_to"}
    if constraints is not None:
        allowed = allowed | CONSTRAINT_FIELDS
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise EdgeError(
            Code.INVALID_REQUEST,
            f"unknown field(s): {_names(unknown)}; allowed: {', '.join(sorted(allowed))}",
        )

    request_id = obj.get("id")
    if request_id is None:
        request_id = new_request_id()
    elif not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_CHARS:
        raise EdgeError(Code.INVALID_REQUEST, f"id: must be a non-empty string of at most {MAX_ID_CHARS} characters")

    prompt = obj.get("prompt")
    raw_messages = obj.get("messages")
    if (prompt is None) == (raw_messages is None):
        raise EdgeError(Code.INVALID_REQUEST, "exactly one of 'prompt' or 'messages' is required")
    messages: tuple[Message, ...] | None = None
    if prompt is not None:
        if not isinstance(prompt, str):
            raise EdgeError(Code.INVALID_REQUEST, f"prompt: must be a string, got {_json_type(prompt)}")
        _check_prompt_bytes("prompt", len(prompt.encode("utf-8")), limits)
    if raw_messages is not None:
        messages = _parse_messages(raw_messages, limits)

    raw = _opt_bool(obj, "raw", False)
    if raw and messages is not None:
        raise EdgeError(Code.INVALID_REQUEST, "raw: only allowed with 'prompt', not with 'messages'")

    seed = _opt_int(obj, "seed", None, -1, 2**32 - 1)
    if seed is None and defaults.seed >= 0:
        seed = defaults.seed
    if seed == -1:
        seed = None
    constraint = constraints.from_fields(obj) if constraints is not None else None

    return Request(
        id=request_id,
        prompt=prompt,
        messages=messages,
        raw=raw,
        max_tokens=_parse_max_tokens(obj, defaults.max_tokens, limits.max_tokens),
        temperature=_opt_float(obj, "temperature", defaults.temperature, 0.0, 5.0),
        top_p=_opt_float(obj, "top_p", defaults.top_p, 0.0, 1.0),
        top_k=_req_int(obj, "top_k", defaults.top_k, 0, 1000),
        min_p=_opt_float(obj, "min_p", defaults.min_p, 0.0, 1.0),
        repeat_penalty=_opt_float(obj, "repeat_penalty", defaults.repeat_penalty, 0.5, 3.0),
        seed=seed,
        stop=_parse_stop(obj.get("stop"), limits),
        stream=_opt_bool(obj, "stream", False),
        priority=_parse_priority(obj.get("priority")),
        deadline_ms=_opt_int(obj, "deadline_ms", None, 1, 86_400_000),
        reply_to=_parse_reply_to(obj.get("reply_to")),
        grammar=None if constraint is None else constraint.gbnf,
    )


def _names(names: list[str], most: int = 8) -> str:
    shown = ", ".join(quote(n) if len(n) > MAX_QUOTED_CHARS or not n.isprintable() else n for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _check_depth(obj: Any, limit: int) -> None:
    """Iterative (a deep value must not cost a RecursionError): the request object is depth 1."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            raise EdgeError(
                Code.INVALID_REQUEST, f"request: nested more than {limit} levels deep (limits.max_json_depth)"
            )
        stack.extend((child, depth + 1) for child in children)


def _check_prompt_bytes(name: str, size: int, limits: Limits) -> None:
    if size > limits.max_prompt_bytes:
        raise EdgeError(
            Code.INVALID_REQUEST,
            f"{name}: {size} bytes of text, more than limits.max_prompt_bytes ({limits.max_prompt_bytes})",
        )


def _parse_max_tokens(obj: dict[str, Any], default: int, ceiling: int) -> int:
    value = _req_int(obj, "max_tokens", default, 1, 1_000_000)
    if "max_tokens" in obj and value > ceiling:
        raise EdgeError(
            Code.INVALID_REQUEST, f"max_tokens: {value} is more than limits.max_tokens ({ceiling})"
        )
    return value


def _parse_messages(value: Any, limits: Limits) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise EdgeError(Code.INVALID_REQUEST, "messages: must be a non-empty list of {role, content} objects")
    if len(value) > limits.max_messages:
        raise EdgeError(
            Code.INVALID_REQUEST,
            f"messages: {len(value)} messages, more than limits.max_messages ({limits.max_messages})",
        )
    out: list[Message] = []
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise EdgeError(Code.INVALID_REQUEST, f"{where}: must be an object with 'role' and 'content'")
        extra = sorted(set(item) - {"role", "content"})
        if extra:
            raise EdgeError(Code.INVALID_REQUEST, f"{where}: unknown field(s): {_names(extra)}")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise EdgeError(Code.INVALID_REQUEST, f"{where}.role: must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise EdgeError(Code.INVALID_REQUEST, f"{where}.content: must be a string")
        out.append(Message(str(role), content))
    _check_prompt_bytes("messages", sum(len(m.content.encode("utf-8")) for m in out), limits)
    if out[-1].role == "assistant":
        raise EdgeError(Code.INVALID_REQUEST, "messages: the last message must not be from the assistant")
    return tuple(out)


def _parse_stop(value: Any, limits: Limits) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise EdgeError(Code.INVALID_REQUEST, "stop: must be a non-empty string or a list of them")
    if len(value) > limits.max_stop:
        raise EdgeError(
            Code.INVALID_REQUEST, f"stop: {len(value)} strings, more than limits.max_stop ({limits.max_stop})"
        )
    for index, item in enumerate(value):
        if len(item) > limits.max_stop_chars:
            raise EdgeError(
                Code.INVALID_REQUEST,
                f"stop[{index}]: {len(item)} characters, more than limits.max_stop_chars ({limits.max_stop_chars})",
            )
    return tuple(value)


def _parse_priority(value: Any) -> str:
    if value is None:
        return "normal"
    if value not in PRIORITIES:
        raise EdgeError(Code.INVALID_REQUEST, f"priority: must be one of {', '.join(PRIORITIES)}")
    return str(value)


def _parse_reply_to(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or any(c in value for c in "#+\x00"):
        raise EdgeError(Code.INVALID_REQUEST, "reply_to: must be an MQTT topic name without wildcards")
    return value


def _opt_bool(obj: dict[str, Any], name: str, default: bool) -> bool:
    value = obj.get(name, default)
    if not isinstance(value, bool):
        raise EdgeError(Code.INVALID_REQUEST, f"{name}: must be true or false, got {_json_type(value)}")
    return value


def _opt_int(obj: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = obj.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise EdgeError(Code.INVALID_REQUEST, f"{name}: must be an integer, got {_json_type(value)}")
    if not lo <= value <= hi:
        raise EdgeError(Code.INVALID_REQUEST, f"{name}: must be between {lo} and {hi}, got {quote(value)}")
    return value


def _req_int(obj: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = _opt_int(obj, name, default, lo, hi)
    assert value is not None
    return value


def _opt_float(obj: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = obj.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EdgeError(Code.INVALID_REQUEST, f"{name}: must be a number, got {_json_type(value)}")
    # Compared before any float conversion: an integer of 400 digits has no float (OverflowError).
    if isinstance(value, float) and not math.isfinite(value):
        raise EdgeError(Code.INVALID_REQUEST, f"{name}: must be a finite number, got {quote(value)}")
    if not lo <= value <= hi:
        raise EdgeError(Code.INVALID_REQUEST, f"{name}: must be between {lo} and {hi}, got {quote(value)}")
    return float(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


json_type = _json_type  # the JSON name of a value's type, for messages (also used by daemon.constraints)
