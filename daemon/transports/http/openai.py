"""The OpenAI API subset: /v1/models, /v1/chat/completions, /v1/completions. Pure: request bodies
in, protocol `Request`s and response bodies out; the aiohttp wiring is in `server.py`.

Every field served and what is not: docs/http.md.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemon.protocol import DEFAULT_LIMITS, Code, DoneEvent, EdgeError, Limits, Request, new_request_id
from daemon.transports.http import tools as T
from daemon.transports.http.common import (
    Constraints,
    ServedModel,
    boolean,
    chat_request,
    http_status,
    integer,
    number,
    require_constraints,
    to_protocol,
)

if TYPE_CHECKING:
    from daemon.config import GenerationConfig

_CLIENT_NAMES = {
    "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
    "stop": "stop", "messages": "messages", "prompt": "prompt",
}
@dataclass(frozen=True)
class Plan:
    model: str
    stream: bool
    include_usage: bool
    request: Request
    tools: tuple[T.Tool, ...] = ()
    choice: T.ToolChoice = T.NONE


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _common(body: Mapping[str, Any]) -> dict[str, Any]:
    n = integer(body, "n", "n")
    if n not in (None, 1):
        raise EdgeError(Code.INVALID_REQUEST, "n: only 1 is supported")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise EdgeError(Code.INVALID_REQUEST, "logprobs: not supported by this server")
    out: dict[str, Any] = {}
    max_tokens = integer(body, "max_completion_tokens", "max_completion_tokens")
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens", "max_tokens")
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    for key in ("temperature", "top_p"):
        value = number(body, key, key)
        if value is not None:
            out[key] = value
    seed = integer(body, "seed", "seed")
    if seed is not None:
        out["seed"] = seed
    if body.get("stop") is not None:
        out["stop"] = body["stop"]
    return out


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = boolean(body, "stream", False, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise EdgeError(Code.INVALID_REQUEST, "stream_options: must be an object")
    return stream, bool(options.get("include_usage"))


def _text(content: Any, at: str) -> str:
    """A message's content: a string, or a list of text parts (images are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise EdgeError(Code.INVALID_REQUEST, f"{at}.content[{index}]: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise EdgeError(Code.INVALID_REQUEST, f"{at}.content: must be a string or a list of text parts")


def _turns(value: Any) -> list[T.Turn]:
    if not isinstance(value, list) or not value:
        raise EdgeError(Code.INVALID_REQUEST, "messages: must be a non-empty list")
    names: dict[str, str] = {}  # tool call id -> tool name, so results can name their tool
    turns: list[T.Turn] = []
    for index, item in enumerate(value):
        at = f"messages[{index}]"
        if not isinstance(item, dict):
            raise EdgeError(Code.INVALID_REQUEST, f"{at}: must be an object")
        role = item.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise EdgeError(Code.INVALID_REQUEST, f"{at}.role: must be system, developer, user, assistant or tool")
        content = _text(item.get("content"), at)
        calls: list[T.ToolCall] = []
        if role == "assistant":
            for c_index, call in enumerate(item.get("tool_calls") or []):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise EdgeError(Code.INVALID_REQUEST, f"{at}.tool_calls[{c_index}].function: must have a name")
                parsed = _arguments(function.get("arguments"), f"{at}.tool_calls[{c_index}].function.arguments")
                calls.append(T.ToolCall(function["name"], parsed))
                if isinstance(call.get("id"), str):
                    names[call["id"]] = function["name"]
        tool_name = names.get(item.get("tool_call_id", "")) if role == "tool" else None
        turns.append(T.Turn(str(role), content, tuple(calls), tool_name or item.get("name")))
    return turns


def _arguments(value: Any, at: str) -> dict[str, Any]:
    if value in (None, ""):
        return {}
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise EdgeError(Code.INVALID_REQUEST, f"{at}: must be a JSON object encoded as a string")
    return parsed


def _response_format(body: Mapping[str, Any], constraints: Constraints) -> dict[str, Any]:
    fmt = body.get("response_format")
    if fmt is None:
        return {}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise EdgeError(Code.INVALID_REQUEST, 'response_format: type must be "text", "json_object" or "json_schema"')
    if fmt["type"] == "text":
        return {}
    if fmt["type"] == "json_object":
        constraint: dict[str, Any] = {"format": "json"}
    else:
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise EdgeError(Code.INVALID_REQUEST, "response_format.json_schema.schema: must be a JSON schema object")
        constraint = {"json_schema": spec["schema"]}
    require_constraints(constraints, "response_format")
    return constraint


def chat_plan(body: Mapping[str, Any], defaults: GenerationConfig, served: ServedModel,
              constraints: Constraints = None, limits: Limits = DEFAULT_LIMITS) -> Plan:
    """POST /v1/chat/completions."""
    model = served.resolve(body.get("model"))
    stream, include_usage = _stream(body)
    tools = T.parse_tools(body.get("tools"))
    choice = T.parse_tool_choice(body.get("tool_choice"), tools)
    turns = _turns(body.get("messages"))
    fields = {"stream": stream, **_common(body)}
    obj = chat_request(turns, tools, choice, fields, _response_format(body, constraints), "response_format",
                       constraints)
    request = to_protocol(obj, defaults, _CLIENT_NAMES, constraints, limits)
    return Plan(model, stream, include_usage, request, tools, choice)


def completion_plan(body: Mapping[str, Any], defaults: GenerationConfig, served: ServedModel,
                    limits: Limits = DEFAULT_LIMITS) -> Plan:
    """POST /v1/completions: the prompt is continued as is (raw, no chat template)."""
    model = served.resolve(body.get("model"))
    stream, include_usage = _stream(body)
    for unsupported in ("suffix", "echo", "best_of"):
        if body.get(unsupported) not in (None, False, 1):
            raise EdgeError(Code.INVALID_REQUEST, f"{unsupported}: not supported by this server")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise EdgeError(Code.INVALID_REQUEST, "prompt: must be a non-empty string (one prompt per request)")
    obj = {"id": new_request_id(), "prompt": prompt, "raw": True, "stream": stream, **_common(body)}
    return Plan(model, stream, include_usage, to_protocol(obj, defaults, _CLIENT_NAMES, limits=limits))


# --- replies ---------------------------------------------------------------------------------


def usage(done: DoneEvent) -> dict[str, int]:
    prompt = int(done.usage.get("prompt_tokens", 0))
    completion = int(done.usage.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(done: DoneEvent, calls: Sequence[T.ToolCall]) -> str:
    if calls:
        return "tool_calls"
    return "length" if done.finish_reason == "length" else "stop"


def chat_completion(cid: str, model: str, done: DoneEvent, calls: Sequence[T.ToolCall]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None if calls else done.text, "refusal": None}
    if calls:
        message["tool_calls"] = T.openai_tool_calls(calls)
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(done, calls), "logprobs": None}],
        "usage": usage(done),
    }


def chat_chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def usage_chunk(cid: str, model: str, done: DoneEvent, chat: bool) -> dict[str, Any]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": cid, "object": kind, "created": int(time.time()), "model": model, "choices": [], "usage": usage(done)}


def text_completion(cid: str, model: str, done: DoneEvent) -> dict[str, Any]:
    return {
        "id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": done.text, "finish_reason": finish_reason(done, ()), "logprobs": None}],
        "usage": usage(done),
    }


def text_chunk(cid: str, model: str, text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }


def models_reply(served: ServedModel) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": int(served.modified_at), "owned_by": "edgellm"}
            for name in served.names
        ],
    }


def error_body(code: str, message: str, details: Mapping[str, Any]) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "invalid_request_error", 400: "invalid_request_error"}
    return {
        "error": {"message": message, "type": kind.get(http_status(code), "server_error"), "code": code,
                  "param": None, **details}
    }
