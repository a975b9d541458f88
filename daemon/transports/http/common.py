"""What the Ollama and OpenAI adapters share. Pure: no I/O, no aiohttp.

- `HttpError`: an `EdgeError` with the HTTP status it maps to, the one place codes become statuses;
- `ServedModel`: the one model this daemon serves and the names it answers to;
- `to_protocol`: a request object for `daemon.protocol.parse_request`, so every door validates the
  same way; field names in its errors are translated back to the client's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.protocol import DEFAULT_LIMITS, Code, EdgeError, Limits, Request, new_request_id, parse_request
from daemon.transports.http import tools as T

if TYPE_CHECKING:
    from daemon.config import GenerationConfig

MODEL_NOT_FOUND = "model_not_found"
UNAUTHORIZED = "unauthorized"
NOT_IMPLEMENTED = "not_implemented"
ALIAS = "edgellm"
# aiohttp's own refusals (no such route, wrong method) as codes of their own.
ROUTE_ERRORS = {404: "not_found", 405: "method_not_allowed"}

_STATUS = {
    Code.INVALID_JSON: 400,
    Code.INVALID_REQUEST: 400,
    Code.PROMPT_TOO_LONG: 400,
    Code.PAYLOAD_TOO_LARGE: 413,
    MODEL_NOT_FOUND: 404,
    "not_found": 404,
    "method_not_allowed": 405,
    UNAUTHORIZED: 401,
    NOT_IMPLEMENTED: 501,
    Code.DUPLICATE_ID: 409,
    Code.QUEUE_FULL: 503,
    Code.THROTTLED: 503,
    Code.MEMORY_LOW: 503,
    Code.MODEL_UNAVAILABLE: 503,
    Code.SHUTTING_DOWN: 503,
    Code.DEADLINE_EXCEEDED: 504,
    Code.CANCELLED: 499,
    Code.INTERNAL_ERROR: 500,
}
# Codes that mean "come back later": they carry Retry-After.
_RETRY = {Code.QUEUE_FULL, Code.THROTTLED, Code.MEMORY_LOW, Code.MODEL_UNAVAILABLE, Code.SHUTTING_DOWN}
DEFAULT_RETRY_AFTER_S = 5

_PROMPT_COUNTS = re.compile(r"prompt is (\d+) tokens and max_tokens is (\d+), together more than the context of (\d+)")


def http_status(code: str) -> int:
    return _STATUS.get(code, 500)


def retry_after_s(code: str, retry_after_ms: int | None) -> int | None:
    """Whole seconds for the Retry-After header (at least 1), or None when retrying won't help."""
    if code not in _RETRY:
        return None
    if retry_after_ms is None:
        return DEFAULT_RETRY_AFTER_S
    return max(1, math.ceil(retry_after_ms / 1000))


def error_details(code: str, message: str) -> dict[str, int]:
    """Structured numbers a client can act on; for `prompt_too_long` the token counts."""
    if code == Code.PROMPT_TOO_LONG:
        found = _PROMPT_COUNTS.search(message)
        if found:
            prompt, max_tokens, n_ctx = (int(g) for g in found.groups())
            return {"prompt_tokens": prompt, "max_tokens": max_tokens, "n_ctx": n_ctx}
    return {}


def error_headers(code: str, retry_after_ms: int | None) -> dict[str, str]:
    seconds = retry_after_s(code, retry_after_ms)
    return {} if seconds is None else {"Retry-After": str(seconds)}


# --- the served model ------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedModel:
    """The loaded (or configured) model as the HTTP APIs describe it."""

    catalog_name: str | None  # daemon/models.py's name, when the file is a catalog model
    path: str
    size_bytes: int
    arch: str
    quant: str
    n_ctx: int
    loaded: bool
    modified_at: float  # the file's mtime, seconds since the epoch
    digest: str  # sha256 hex (recorded at download) or a stand-in derived from path, size and mtime

    @property
    def stem(self) -> str:
        return Path(self.path).stem

    @property
    def names(self) -> tuple[str, ...]:
        """What a client may call it: the catalog name, the GGUF file stem, and `edgellm`."""
        out: list[str] = []
        for name in (self.catalog_name, self.stem, ALIAS):
            if name and name not in out:
                out.append(name)
        return tuple(out)

    @property
    def primary(self) -> str:
        return self.names[0]

    def resolve(self, requested: Any, where: str = "model") -> str:
        """The name as the client spelled it, if it names this model; 404 naming ours otherwise.
        Ollama's `:latest` tag is accepted on every name."""
        if not isinstance(requested, str) or not requested:
            raise EdgeError(Code.INVALID_REQUEST, f"{where}: is required (this server has {self.primary!r})")
        bare = requested[: -len(":latest")] if requested.endswith(":latest") else requested
        if bare not in self.names:
            raise EdgeError(
                MODEL_NOT_FOUND,
                f"model {requested!r} not found; this server serves {self.primary!r} "
                f"(also answering to {', '.join(repr(n) for n in self.names[1:])})",
            )
        return requested


def served_model(status: Mapping[str, Any], configured_path: Path, catalog_name: str | None,
                 recorded_sha256: str | None, file_stat: tuple[int, float] | None) -> ServedModel:
    """From `Backend.status()`'s `model` section when loaded, else from the configured file."""
    model = status.get("model") or {}
    path = str(model.get("path") or configured_path)
    size, mtime = file_stat if file_stat is not None else (int(model.get("size_bytes") or 0), 0.0)
    digest = recorded_sha256 or _stand_in_digest(path, size, mtime)
    return ServedModel(
        catalog_name=catalog_name,
        path=path,
        size_bytes=int(model.get("size_bytes") or size),
        arch=str(model.get("arch") or "unknown"),
        quant=str(model.get("quant") or "unknown"),
        n_ctx=int(model.get("n_ctx") or 0),
        loaded=bool(model) and status.get("state") in ("ready", "draining"),
        modified_at=mtime,
        digest=digest,
    )


def _stand_in_digest(path: str, size: int, mtime: float) -> str:
    import hashlib

    # Hashing a model file takes seconds on a Pi; a client only needs a stable identifier.
    return hashlib.sha256(f"{path}\0{size}\0{mtime}".encode()).hexdigest()


# --- building protocol requests --------------------------------------------------------------


# `constraints` below is the daemon's constraint compiler (issue 9's `daemon.constraints`), passed on
# to `parse_request`; None in a build or a daemon without grammar-constrained sampling: then tool
# calls are prompted and parsed but not enforced, and `format`/`response_format` are refused (501).
Constraints = Any


def to_protocol(obj: dict[str, Any], defaults: GenerationConfig, client_names: Mapping[str, str],
                constraints: Constraints = None, limits: Limits = DEFAULT_LIMITS) -> Request:
    """`parse_request` on an object the adapter built; an error naming a protocol field is reworded
    with the client's own name for it (`max_tokens` -> `options.num_predict`)."""
    extra: dict[str, Any] = {"limits": limits}
    if constraints is not None:
        extra["constraints"] = constraints
    try:
        return parse_request(obj, defaults, **extra)
    except EdgeError as exc:
        message = exc.message
        for ours, theirs in client_names.items():
            if message.startswith(f"{ours}:") or message.startswith(f"{ours}["):
                message = theirs + message[len(ours):]
                break
        raise EdgeError(exc.code, message, retry_after_ms=exc.retry_after_ms) from None


def chat_request(turns: list[T.Turn], tools: tuple[T.Tool, ...], choice: T.ToolChoice, fields: dict[str, Any],
                 constraint: dict[str, Any], constraint_field: str, constraints: Constraints) -> dict[str, Any]:
    """The protocol request object for a chat: the turns with the tool prompt folded in, the
    sampling `fields`, and either a constrained-output `constraint` or the tool-call grammar."""
    if constraint and tools and choice.mode != "none":
        raise EdgeError(Code.INVALID_REQUEST, f"{constraint_field}: cannot be combined with tools")
    obj: dict[str, Any] = {"id": new_request_id(), "messages": T.chat_turns(turns, tools, choice), **fields,
                           **constraint}
    grammar = T.call_grammar(tools, choice) if constraints is not None else None
    if grammar is not None:
        obj["grammar"] = grammar
    return obj


def number(obj: Mapping[str, Any], key: str, where: str) -> float | None:
    """An optional number, named by the client's own key in the error."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EdgeError(Code.INVALID_REQUEST, f"{where}: must be a number")
    return float(value)


def integer(obj: Mapping[str, Any], key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise EdgeError(Code.INVALID_REQUEST, f"{where}: must be an integer")
    return value


def boolean(obj: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise EdgeError(Code.INVALID_REQUEST, f"{where}: must be true or false")
    return value


def require_constraints(constraints: Constraints, field: str) -> None:
    if constraints is None:
        raise EdgeError(NOT_IMPLEMENTED, f"{field}: constrained output needs grammar sampling, not in this build")
