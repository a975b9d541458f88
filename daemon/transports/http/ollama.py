"""The Ollama API, as Home Assistant's `ollama` integration and Open WebUI call it. Pure: request
bodies in, protocol `Request`s and response bodies out; the aiohttp wiring is in `server.py`.

Every endpoint and field, and what is not served: docs/http.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from daemon import __version__
from daemon.protocol import DEFAULT_LIMITS, Code, DoneEvent, EdgeError, Limits, Request, new_request_id
from daemon.transports.http import tools as T
from daemon.transports.http.common import (
    MODEL_NOT_FOUND,
    Constraints,
    ServedModel,
    boolean,
    chat_request,
    integer,
    number,
    require_constraints,
    to_protocol,
)

if TYPE_CHECKING:
    from daemon.config import GenerationConfig

# The Ollama API level these endpoints follow (/api/version answers it; clients compare it).
OLLAMA_API_VERSION = "0.6.0"
FOREVER = timedelta(days=365 * 292)  # Ollama's "never expires" is the largest Go duration
_ROLES = ("system", "user", "assistant", "tool")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# Protocol field -> how the Ollama client spells it, for error messages.
_CLIENT_NAMES = {
    "max_tokens": "options.num_predict", "temperature": "options.temperature", "top_p": "options.top_p",
    "top_k": "options.top_k", "min_p": "options.min_p", "repeat_penalty": "options.repeat_penalty",
    "seed": "options.seed", "stop": "options.stop", "prompt": "prompt", "messages": "messages",
}


@dataclass(frozen=True)
class Plan:
    """What one /api/chat or /api/generate call asks for."""

    model: str  # as the client named it: echoed in every reply line
    stream: bool
    request: Request | None  # None: no prompt, only "load the model" (answered done_reason "load")
    tools: tuple[T.Tool, ...] = ()
    choice: T.ToolChoice = T.NONE
    keep_alive_s: float | None = None  # the client's keep_alive: how long the model stays loaded when idle


def iso(when: datetime) -> str:
    """RFC 3339 with a Z, as Ollama writes times."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_keep_alive(value: Any) -> float | None:
    """Seconds (`-1`: forever) from a number of seconds or a Go duration ("5m", "1h30m", "-1")."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise EdgeError(Code.INVALID_REQUEST, "keep_alive: must be a number of seconds or a duration like \"5m\"")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION_PART.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise EdgeError(
                    Code.INVALID_REQUEST, f'keep_alive: {value!r} is not a duration (examples: "30s", "5m", "1h", -1)'
                ) from None
            seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    else:
        raise EdgeError(Code.INVALID_REQUEST, "keep_alive: must be a number of seconds or a duration like \"5m\"")
    return -1.0 if seconds < 0 else seconds


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    options = body.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise EdgeError(Code.INVALID_REQUEST, "options: must be an object")
    return options


def _sampling(options: Mapping[str, Any]) -> dict[str, Any]:
    """Ollama options -> protocol fields. num_ctx is validated and answered with the daemon's context
    (never a reload); options this engine has no use for (num_gpu, mirostat...) are ignored."""
    integer(options, "num_ctx", "options.num_ctx")
    out: dict[str, Any] = {}
    for ours in ("temperature", "top_p", "min_p", "repeat_penalty"):
        value = number(options, ours, f"options.{ours}")
        if value is not None:
            out[ours] = value
    for ours in ("top_k", "seed"):
        value = integer(options, ours, f"options.{ours}")
        if value is not None:
            out[ours] = value
    predict = integer(options, "num_predict", "options.num_predict")
    if predict is not None and predict >= 0:  # -1 (no limit) and -2 (fill the context): the daemon's default
        out["max_tokens"] = predict
    if options.get("stop") is not None:
        out["stop"] = options["stop"]
    return out


def _constraint(body: Mapping[str, Any], constraints: Constraints) -> dict[str, Any]:
    """`format`: "json" or a JSON schema -> the protocol's constrained output (issue 9)."""
    fmt = body.get("format")
    if fmt in (None, ""):
        return {}
    if fmt == "json":
        constraint: dict[str, Any] = {"format": "json"}
    elif isinstance(fmt, dict):
        constraint = {"json_schema": fmt}
    else:
        raise EdgeError(Code.INVALID_REQUEST, 'format: must be "json" or a JSON schema object')
    require_constraints(constraints, "format")
    return constraint


def _turns(value: Any) -> list[T.Turn]:
    if not isinstance(value, list):
        raise EdgeError(Code.INVALID_REQUEST, "messages: must be a list of {role, content} objects")
    turns: list[T.Turn] = []
    for index, item in enumerate(value):
        at = f"messages[{index}]"
        if not isinstance(item, dict):
            raise EdgeError(Code.INVALID_REQUEST, f"{at}: must be an object with role and content")
        role = item.get("role")
        if role not in _ROLES:
            raise EdgeError(Code.INVALID_REQUEST, f"{at}.role: must be one of {', '.join(_ROLES)}")
        content = item.get("content") or ""
        if not isinstance(content, str):
            raise EdgeError(Code.INVALID_REQUEST, f"{at}.content: must be a string")
        if item.get("images"):
            raise EdgeError(Code.INVALID_REQUEST, f"{at}.images: this model reads text only")
        calls = _tool_calls(item.get("tool_calls"), at) if role == "assistant" else ()
        tool_name = item.get("tool_name") if isinstance(item.get("tool_name"), str) else None
        turns.append(T.Turn(str(role), content, calls, tool_name))
    return turns


def _tool_calls(value: Any, at: str) -> tuple[T.ToolCall, ...]:
    if not value:
        return ()
    if not isinstance(value, list):
        raise EdgeError(Code.INVALID_REQUEST, f"{at}.tool_calls: must be a list")
    calls = []
    for index, item in enumerate(value):
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise EdgeError(Code.INVALID_REQUEST, f"{at}.tool_calls[{index}].function: must have a name")
        arguments = function.get("arguments") or {}
        if not isinstance(arguments, dict):
            raise EdgeError(Code.INVALID_REQUEST, f"{at}.tool_calls[{index}].function.arguments: must be an object")
        calls.append(T.ToolCall(function["name"], arguments))
    return tuple(calls)


def chat_plan(body: Mapping[str, Any], defaults: GenerationConfig, served: ServedModel,
              constraints: Constraints = None, limits: Limits = DEFAULT_LIMITS) -> Plan:
    """POST /api/chat."""
    model = served.resolve(body.get("model"))
    stream = boolean(body, "stream", True, "stream")  # Ollama streams unless told not to
    keep_alive = parse_keep_alive(body.get("keep_alive"))
    _think(body)
    options = _options(body)
    tools = T.parse_tools(body.get("tools"))
    # Ollama has no tool_choice; edgellm reads one from options (docs/http.md).
    choice = T.parse_tool_choice(options.get("tool_choice"), tools, "options.tool_choice")
    turns = _turns(body.get("messages") or [])
    if not turns:
        return Plan(model, stream, None, keep_alive_s=keep_alive)
    fields = {"stream": stream, **_sampling(options)}
    obj = chat_request(turns, tools, choice, fields, _constraint(body, constraints), "format", constraints)
    request = to_protocol(obj, defaults, _CLIENT_NAMES, constraints, limits)
    return Plan(model, stream, request, tools, choice, keep_alive)


def generate_plan(body: Mapping[str, Any], defaults: GenerationConfig, served: ServedModel,
                  constraints: Constraints = None, limits: Limits = DEFAULT_LIMITS) -> Plan:
    """POST /api/generate."""
    model = served.resolve(body.get("model"))
    stream = boolean(body, "stream", True, "stream")
    keep_alive = parse_keep_alive(body.get("keep_alive"))
    _think(body)
    for unsupported in ("suffix", "images", "template", "context"):
        if body.get(unsupported):
            raise EdgeError(Code.INVALID_REQUEST, f"{unsupported}: not supported by this server (docs/http.md)")
    prompt = body.get("prompt") or ""
    system = body.get("system") or ""
    if not isinstance(prompt, str) or not isinstance(system, str):
        raise EdgeError(Code.INVALID_REQUEST, "prompt and system: must be strings")
    if not prompt:
        return Plan(model, stream, None, keep_alive_s=keep_alive)
    raw = boolean(body, "raw", False, "raw")
    obj: dict[str, Any] = {"id": new_request_id(), "stream": stream, **_sampling(_options(body)),
                           **_constraint(body, constraints)}
    if raw:
        obj.update(prompt=prompt, raw=True)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        obj["messages"] = messages
    return Plan(model, stream, to_protocol(obj, defaults, _CLIENT_NAMES, constraints, limits), keep_alive_s=keep_alive)


def _think(body: Mapping[str, Any]) -> None:
    # Accepted so clients that always send it work; these models produce no separate thinking.
    think = body.get("think")
    if think is not None and not isinstance(think, bool) and think not in ("low", "medium", "high"):
        raise EdgeError(Code.INVALID_REQUEST, 'think: must be true, false, "low", "medium" or "high"')


# --- replies ---------------------------------------------------------------------------------


def chat_line(model: str, created_at: str, text: str) -> dict[str, Any]:
    return {"model": model, "created_at": created_at, "message": {"role": "assistant", "content": text}, "done": False}


def generate_line(model: str, created_at: str, text: str) -> dict[str, Any]:
    return {"model": model, "created_at": created_at, "response": text, "done": False}


def load_reply(model: str, created_at: str, chat: bool) -> dict[str, Any]:
    """A request with no prompt: Ollama's way of asking for the model to be loaded."""
    out: dict[str, Any] = {"model": model, "created_at": created_at}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out.update(done=True, done_reason="load")
    return out


def final_stats(done: DoneEvent, total_ns: int) -> dict[str, Any]:
    """The last line's figures, in nanoseconds, from the engine's own timings."""
    timings, usage = done.timings, done.usage

    def ns(key: str) -> int:
        value = timings.get(key)
        return int(float(value) * 1_000_000) if value is not None else 0

    return {
        "done": True,
        "done_reason": done.finish_reason if done.finish_reason in ("stop", "length") else "stop",
        "total_duration": total_ns,
        "load_duration": 0,
        "prompt_eval_count": int(usage.get("prompt_tokens", 0)),
        "prompt_eval_duration": ns("prompt_ms"),
        "eval_count": int(usage.get("completion_tokens", 0)),
        "eval_duration": ns("generation_ms"),
    }


def chat_final(model: str, created_at: str, done: DoneEvent, total_ns: int, content: str,
               calls: Sequence[T.ToolCall] = ()) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = T.ollama_tool_calls(calls)
    return {"model": model, "created_at": created_at, "message": message, **final_stats(done, total_ns)}


def generate_final(model: str, created_at: str, done: DoneEvent, total_ns: int, content: str) -> dict[str, Any]:
    return {"model": model, "created_at": created_at, "response": content, **final_stats(done, total_ns)}


def _details(served: ServedModel) -> dict[str, Any]:
    return {
        "parent_model": "", "format": "gguf", "family": served.arch, "families": [served.arch],
        "parameter_size": "", "quantization_level": served.quant,
    }


def _modified(served: ServedModel) -> str:
    return iso(datetime.fromtimestamp(served.modified_at, UTC))


def tags_reply(served: ServedModel) -> dict[str, Any]:
    """GET /api/tags: the one model, under each name it answers to (as Ollama lists aliases)."""
    return {
        "models": [
            {"name": f"{name}:latest", "model": f"{name}:latest", "modified_at": _modified(served),
             "size": served.size_bytes, "digest": served.digest, "details": _details(served)}
            for name in served.names
        ]
    }


def expires_at(last_used: datetime, keep_alive_s: float) -> datetime:
    return last_used + (FOREVER if keep_alive_s < 0 else timedelta(seconds=keep_alive_s))


def ps_reply(served: ServedModel, expires: datetime) -> dict[str, Any]:
    """GET /api/ps: the model while it is loaded; nothing while it is not."""
    if not served.loaded:
        return {"models": []}
    name = f"{served.primary}:latest"
    return {
        "models": [
            {"name": name, "model": name, "size": served.size_bytes, "digest": served.digest,
             "details": _details(served), "expires_at": iso(expires), "size_vram": 0,
             "context_length": served.n_ctx}
        ]
    }


def show_reply(served: ServedModel) -> dict[str, Any]:
    """POST /api/show. `model_info` must be present: the ollama client's show() fails without it."""
    return {
        "license": "",
        "modelfile": f"# served by edgellm {__version__}\nFROM {served.path}\n",
        "parameters": "",
        "template": "",
        "details": _details(served),
        "model_info": {
            "general.architecture": served.arch,
            "general.basename": served.primary,
            "general.file_type": served.quant,
            f"{served.arch}.context_length": served.n_ctx,
        },
        "capabilities": ["completion", "tools"],
        "modified_at": _modified(served),
    }


def version_reply() -> dict[str, Any]:
    return {"version": OLLAMA_API_VERSION, "edgellm_version": __version__}


def pull_reply(body: Mapping[str, Any], served: ServedModel, present: Sequence[str]) -> dict[str, Any]:
    """POST /api/pull downloads nothing: success when the model is the served one or on the device."""
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise EdgeError(Code.INVALID_REQUEST, "model: is required")
    bare = name.removesuffix(":latest")
    if bare in served.names or bare in present:
        return {"status": "success"}
    raise EdgeError(
        MODEL_NOT_FOUND,
        f"model {name!r} is not on this device and edgellm does not download over the API: on the device run "
        f"`edgellm models fetch <name>` (catalog: `edgellm models list`), set model.name, and reload; "
        f"this server serves {served.primary!r}",
    )
