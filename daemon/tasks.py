"""Tasks: named, server-side prompts a device calls with just an input.

Pure. A `[tasks.<name>]` table (daemon.config.TaskConfig) is compiled once into a `Task`: its prompt
template parsed, its constraint compiled. `Task.request(...)` turns an input (any JSON value) into
a validated `Request`; the transports only parse `{"task", "input", ...}` and submit it.

Templates are a tiny language of our own, never `str.format` and never evaluation of user data:
`{input}` is the whole input (a string as is, anything else as compact JSON), `{input.a.b}` a
field of a JSON object input (digits index arrays), `{topic}` the MQTT topic a trigger fired on,
`{{` and `}}` literal braces. A placeholder that names nothing known is refused at load.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemon.constraints import Constraint, ConstraintCompiler, ConstraintLimits
from daemon.protocol import (
    MAX_ID_CHARS,
    PRIORITIES,
    Code,
    EdgeError,
    Request,
    json_type,
    new_request_id,
    parse_request,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from daemon.config import ConstraintsConfig, GenerationConfig, TaskConfig

# Fields of a socket/MQTT task call besides `task` and `input`.
CALL_FIELDS = frozenset({"task", "input", "id", "stream", "priority", "deadline_ms"})
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_PATH_PART = re.compile(r"[A-Za-z0-9_-]+")


class TemplateError(ValueError):
    """A template that cannot be compiled; the message says which placeholder and why."""


# --- templates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One placeholder: `root` is "input" or "topic"; `path` the field names under the input."""

    root: str
    path: tuple[str, ...] = ()


Piece = str | Field


@dataclass(frozen=True)
class Template:
    pieces: tuple[Piece, ...]

    @property
    def fields(self) -> tuple[Field, ...]:
        return tuple(p for p in self.pieces if isinstance(p, Field))

    def render(self, values: Mapping[str, Any]) -> str:
        """`values` maps "input" and "topic" to their values; a missing field is `invalid_request`."""
        out: list[str] = []
        for piece in self.pieces:
            out.append(piece if isinstance(piece, str) else _as_text(_lookup(values, piece)))
        return "".join(out)


def compile_template(text: str, roots: Iterable[str] = ("input",)) -> Template:
    """Parse `text` into pieces; `roots` are the placeholder names this template may use."""
    allowed = tuple(roots)
    pieces: list[Piece] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if text.startswith("{{", i) or text.startswith("}}", i):
            literal.append(c)
            i += 2
            continue
        if c == "}":
            raise TemplateError(f"a lone '}}' at character {i} (write '}}}}' for a literal brace)")
        if c != "{":
            literal.append(c)
            i += 1
            continue
        found = _PLACEHOLDER.match(text, i)
        if found is None:
            raise TemplateError(f"an unclosed '{{' at character {i} (write '{{{{' for a literal brace)")
        if literal:
            pieces.append("".join(literal))
            literal = []
        pieces.append(_field(found.group(1), allowed))
        i = found.end()
    if literal:
        pieces.append("".join(literal))
    return Template(tuple(pieces))


def _field(name: str, allowed: tuple[str, ...]) -> Field:
    parts = name.split(".")
    root, path = parts[0], tuple(parts[1:])
    if root not in allowed:
        known = ", ".join("{" + r + "}" for r in allowed) + (", {input.field}" if "input" in allowed else "")
        raise TemplateError(f"unknown placeholder {{{name}}}; known: {known}")
    if root == "topic" and path:
        raise TemplateError(f"unknown placeholder {{{name}}}: {{topic}} has no fields")
    if any(not _PATH_PART.fullmatch(p) for p in path):
        raise TemplateError(f"placeholder {{{name}}}: field names are letters, digits, '_' and '-'")
    return Field(root, path)


def _lookup(values: Mapping[str, Any], f: Field) -> Any:
    value = values.get(f.root)
    walked = f.root
    for part in f.path:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            why = "missing" if isinstance(value, (dict, list)) else f"{walked} is {json_type(value)}, not an object"
            raise EdgeError(Code.INVALID_REQUEST, f"input: the task's prompt uses {{{walked}.{part}}}: {why}")
        walked = f"{walked}.{part}"
    return value


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# --- tasks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    spec: TaskConfig
    prompt: Template
    constraint: Constraint | None
    publish: Template | None

    def request(
        self,
        input_value: Any,
        defaults: GenerationConfig,
        *,
        request_id: str | None = None,
        topic: str = "",
        stream: bool = False,
        priority: str | None = None,
        deadline_ms: int | None = None,
        triggered: bool = False,
    ) -> Request:
        """The request this task makes of `input_value`. Raises `EdgeError(invalid_request)`."""
        spec = self.spec
        text = self.prompt.render({"input": input_value, "topic": topic})
        obj: dict[str, Any] = {"id": request_id or new_request_id(), "stream": stream}
        if spec.raw:
            obj.update(prompt=text, raw=True)
        elif spec.system:
            obj["messages"] = [{"role": "system", "content": spec.system}, {"role": "user", "content": text}]
        else:
            obj["prompt"] = text
        for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed"):
            value = getattr(spec, name)
            if value is not None:
                obj[name] = value
        if spec.stop:
            obj["stop"] = list(spec.stop)
        obj["priority"] = priority or spec.priority or ("low" if triggered else "normal")
        deadline = deadline_ms if deadline_ms is not None else spec.deadline_ms
        if deadline is not None:
            obj["deadline_ms"] = deadline
        request = parse_request(obj, defaults)
        if self.constraint is None:
            return request
        from dataclasses import replace

        return replace(request, grammar=self.constraint.gbnf)

    def describe(self) -> dict[str, Any]:
        """What `{"op": "tasks"}` and `edgellm tasks` show of this task."""
        spec = self.spec
        out: dict[str, Any] = {"name": self.name, "description": spec.description, "prompt": spec.prompt}
        if spec.system:
            out["system"] = spec.system
        if spec.json_schema:
            out["json_schema"] = json.loads(spec.json_schema)
        elif spec.grammar:
            out["grammar"] = spec.grammar
        elif spec.format:
            out["format"] = spec.format
        inputs = sorted({".".join((f.root, *f.path)) for f in self.prompt.fields if f.root == "input"})
        out["input_fields"] = inputs
        if spec.subscribe:
            out["trigger"] = {"subscribe": list(spec.subscribe), "publish": spec.publish, "retain": spec.retain,
                              "min_interval_s": spec.min_interval_s, "coalesce": spec.coalesce,
                              "max_queue": spec.max_queue}
        return out


def compile_task(name: str, spec: TaskConfig, compiler: ConstraintCompiler) -> Task:
    """Compile one task; raises `TaskConfigError` naming the key at fault."""
    roots = ("input", "topic") if spec.subscribe else ("input",)
    try:
        prompt = compile_template(spec.prompt, roots)
    except TemplateError as exc:
        raise TaskConfigError(f"tasks.{name}.prompt", str(exc)) from None
    given = [k for k in ("format", "json_schema", "grammar") if getattr(spec, k)]
    if len(given) > 1:
        raise TaskConfigError(f"tasks.{name}.{given[1]}", f"at most one of format, json_schema and grammar "
                                                          f"(also set: {given[0]})")
    constraint = None
    if given:
        key = given[0]
        value: Any = json.loads(spec.json_schema) if key == "json_schema" else getattr(spec, key)
        try:
            constraint = compiler.compile(key, value)
        except EdgeError as exc:
            message = exc.message.removeprefix(f"{key}: ")  # the key is named already
            raise TaskConfigError(f"tasks.{name}.{key}", message) from None
    publish = _check_trigger(name, spec, roots)
    return Task(name, spec, prompt, constraint, publish)


def _check_trigger(name: str, spec: TaskConfig, roots: tuple[str, ...]) -> Template | None:
    from daemon.triggers import filters_overlap, is_topic_filter, publish_pattern

    if not spec.subscribe:
        for key in ("publish", "retain"):
            if getattr(spec, key):
                raise TaskConfigError(f"tasks.{name}.{key}", "only for a trigger (a task with subscribe)")
        return None
    for index, topic_filter in enumerate(spec.subscribe):
        if not is_topic_filter(topic_filter):
            raise TaskConfigError(f"tasks.{name}.subscribe[{index}]", f"not a valid MQTT topic filter: "
                                                                     f"{topic_filter!r}")
    if not spec.publish:
        raise TaskConfigError(f"tasks.{name}.publish", "a trigger needs a topic to publish its answers to")
    try:
        publish = compile_template(spec.publish, roots)
    except TemplateError as exc:
        raise TaskConfigError(f"tasks.{name}.publish", str(exc)) from None
    if any(c in p for p in publish.pieces if isinstance(p, str) for c in "#+\x00"):
        raise TaskConfigError(f"tasks.{name}.publish", "must not contain MQTT wildcards or NUL")
    pattern = publish_pattern(publish)
    for topic_filter in spec.subscribe:
        if filters_overlap(pattern, topic_filter):
            raise TaskConfigError(f"tasks.{name}.publish", f"{spec.publish!r} can match its own subscription "
                                                          f"{topic_filter!r}: the task would trigger itself")
    return publish


class TaskConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def limits_of(cfg: ConstraintsConfig) -> ConstraintLimits:
    return ConstraintLimits(cfg.max_schema_bytes, cfg.max_schema_depth, cfg.cache_entries)


def validate_tasks(tasks: Mapping[str, TaskConfig], constraints: ConstraintsConfig) -> list[tuple[str, str]]:
    """(key, message) for every task that does not compile (the config loader reports them)."""
    from daemon.engine.grammar_check import gbnf_refusal

    compiler = ConstraintCompiler(limits_of(constraints), gbnf_refusal)
    problems = []
    for name, spec in tasks.items():
        try:
            compile_task(name, spec, compiler)
        except TaskConfigError as exc:
            problems.append((exc.key, exc.message))
    return problems


# --- the registry the doors read ---------------------------------------------------------------


class TaskRegistry:
    """The current tasks; swapped whole on reload. Thread-safe reads from every door."""

    def __init__(self, tasks: Mapping[str, Task] | None = None) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = dict(tasks or {})

    @classmethod
    def compile(cls, specs: Mapping[str, TaskConfig], compiler: ConstraintCompiler) -> TaskRegistry:
        return cls({name: compile_task(name, spec, compiler) for name, spec in specs.items()})

    def replace(self, other: TaskRegistry) -> None:
        with self._lock, other._lock:
            self._tasks = dict(other._tasks)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._tasks)

    def get(self, name: str) -> Task | None:
        with self._lock:
            return self._tasks.get(name)

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            tasks = [self._tasks[n] for n in sorted(self._tasks)]
        return [t.describe() for t in tasks]

    def parse_call(self, obj: dict[str, Any], defaults: GenerationConfig) -> Request:
        """A `{"task": name, "input": ..., ...}` object from a door → the task's request."""
        unknown = sorted(set(obj) - CALL_FIELDS)
        if unknown:
            raise EdgeError(Code.INVALID_REQUEST, f"unknown field(s) for a task call: {', '.join(unknown)}; allowed: "
                                                  f"{', '.join(sorted(CALL_FIELDS))}")
        name = obj.get("task")
        task = self.get(name) if isinstance(name, str) else None
        if task is None:
            known = ", ".join(self.names()) or "none are configured"
            raise EdgeError(Code.INVALID_REQUEST, f"task: unknown task {json.dumps(name)[:80]}; known: {known}")
        request_id = obj.get("id")
        if request_id is not None and (not isinstance(request_id, str) or not request_id
                                       or len(request_id) > MAX_ID_CHARS):
            raise EdgeError(Code.INVALID_REQUEST, f"id: must be a non-empty string of at most {MAX_ID_CHARS} "
                                                  "characters")
        priority = obj.get("priority")
        if priority is not None and priority not in PRIORITIES:
            raise EdgeError(Code.INVALID_REQUEST, f"priority: must be one of {', '.join(PRIORITIES)}")
        stream = obj.get("stream", False)
        if not isinstance(stream, bool):
            raise EdgeError(Code.INVALID_REQUEST, "stream: must be true or false")
        deadline = obj.get("deadline_ms")
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, int)
                                     or not 1 <= deadline <= 86_400_000):
            raise EdgeError(Code.INVALID_REQUEST, "deadline_ms: must be an integer between 1 and 86400000")
        return task.request(obj.get("input"), defaults, request_id=request_id, stream=stream, priority=priority,
                            deadline_ms=deadline)

