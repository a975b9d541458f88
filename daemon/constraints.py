"""Constrained output: `format: "json"`, `json_schema` and `grammar` turned into one GBNF grammar.

Pure except for the one question only llama.cpp can answer (does it parse this grammar?), which is
injected (`daemon.grammar_check.gbnf_refusal` in the daemon). A JSON schema is converted by the
converter llama-cpp-python ships (`llama_cpp.llama_grammar.SchemaConverter`), never by our own.
That converter silently ignores what it does not implement, so every schema is first walked
against an allow-list of what it does honour (read from its source), and anything else is
refused with `invalid_request` naming the keyword and where it is. One addition: integer
`minimum`/`maximum` (the converter has none) become an `enum` of the allowed integers when the
range is small enough, which the converter then honours exactly.

Compiled constraints are cached by content hash (bounded LRU); `status()` counts hits.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon.protocol import Code, EdgeError, json_type

KINDS = ("format", "json_schema", "grammar")
# llama.cpp's grammar parser recurses per nested group: a grammar nested far deeper than this
# overflows the C stack (measured: 20000 levels crash the process, 1000 parse fine).
MAX_GBNF_NESTING = 256
# A schema's grammar may be this many times larger than the schema itself.
GBNF_SIZE_FACTOR = 8
# Widest integer range (maximum - minimum + 1) written out as an enum.
MAX_INTEGER_RANGE = 1024

GbnfCheck = Callable[[str], "str | None"]

# Keywords that describe but never constrain: allowed anywhere, ignored by the converter.
_ANNOTATIONS = frozenset(
    {"title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated", "readOnly",
     "writeOnly"}
)
_DEFINITIONS = ("$defs", "definitions")
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
# String formats the converter has rules for (anything else would be ignored).
_FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")


@dataclass(frozen=True)
class ConstraintLimits:
    max_schema_bytes: int = 16384
    max_schema_depth: int = 16
    cache_entries: int = 64


@dataclass(frozen=True)
class Constraint:
    """A validated constraint: `gbnf` is what the engine's grammar sampler gets."""

    kind: str  # format | json_schema | grammar
    gbnf: str
    key: str  # sha256 of kind and canonical source


class SchemaRefused(ValueError):
    """A schema uses something the converter cannot honour; the message names it and where."""


# --- the schema walk ---------------------------------------------------------------------------


def check_schema(schema: Any, max_depth: int) -> None:
    """Raise `SchemaRefused` unless the converter honours every keyword in `schema`."""
    if not isinstance(schema, dict):
        raise SchemaRefused(f"json_schema: must be a JSON object, got {json_type(schema)}")
    depth = _nesting(schema)
    if depth > max_depth:
        raise SchemaRefused(f"json_schema: nested {depth} levels deep, more than constraints.max_schema_depth "
                            f"({max_depth})")
    _Walker(schema).visit(schema, "json_schema")


class _Walker:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def visit(self, node: Any, where: str) -> None:
        if not isinstance(node, dict):
            raise SchemaRefused(f"{where}: a schema must be a JSON object, got {json_type(node)}")
        for key in _DEFINITIONS:
            if key in node:
                defs = node[key]
                if not isinstance(defs, dict):
                    raise SchemaRefused(f"{where}.{key}: must be an object of schemas")
                for name, sub in defs.items():
                    self.visit(sub, f"{where}.{key}.{name}")
        keys = set(node) - _ANNOTATIONS - set(_DEFINITIONS)
        kind = node.get("type")
        if "$ref" in node:
            self._only(node, where, {"$ref"}, "$ref")
            self._ref(node["$ref"], where)
        elif "oneOf" in node:
            raise SchemaRefused(f"{where}.oneOf: not supported (the grammar cannot enforce exactly one match); "
                                "use anyOf")
        elif "anyOf" in node:
            self._only(node, where, {"anyOf"}, "anyOf")
            self._schema_list(node["anyOf"], f"{where}.anyOf")
        elif isinstance(kind, list):
            self._only(node, where, {"type"}, "a list of types")
            if not kind or not all(t in _TYPES for t in kind):
                raise SchemaRefused(f"{where}.type: must list types among {', '.join(_TYPES)}")
        elif "const" in node or "enum" in node:
            word = "const" if "const" in node else "enum"
            self._only(node, where, {word, "type"}, word)
            values = [node["const"]] if word == "const" else node["enum"]
            if word == "enum" and (not isinstance(values, list) or not values):
                raise SchemaRefused(f"{where}.enum: must be a non-empty list")
            if kind is not None and not all(_is_type(v, kind) for v in values):
                raise SchemaRefused(f"{where}.{word}: every value must be of type {kind!r}")
        elif kind not in (None, *_TYPES):
            raise SchemaRefused(f"{where}.type: unknown type {kind!r}; known: {', '.join(_TYPES)}")
        elif kind in (None, "object") and keys & {"properties", "additionalProperties", "required"}:
            self._only(node, where, {"type", "properties", "required", "additionalProperties"}, "an object")
            self._object(node, where)
        elif kind in (None, "array") and keys & {"items", "prefixItems", "minItems", "maxItems"}:
            self._only(node, where, {"type", "items", "prefixItems", "minItems", "maxItems"}, "an array")
            self._array(node, where)
        elif kind in (None, "string") and "pattern" in node:
            self._only(node, where, {"type", "pattern"}, "a pattern")
            pattern = node["pattern"]
            if not isinstance(pattern, str) or not pattern.startswith("^") or not pattern.endswith("$"):
                raise SchemaRefused(f"{where}.pattern: must be a string that starts with ^ and ends with $")
        elif kind in (None, "string") and "format" in node:
            self._only(node, where, {"type", "format"}, "a format")
            if node["format"] not in _FORMATS:
                raise SchemaRefused(f"{where}.format: {node['format']!r} is not supported; supported: "
                                    f"{', '.join(_FORMATS)}")
        elif keys & {"minLength", "maxLength"}:
            if kind != "string":
                raise SchemaRefused(f"{where}: minLength/maxLength need \"type\": \"string\"")
            self._only(node, where, {"type", "minLength", "maxLength"}, "a string")
            self._bounds(node, where, "minLength", "maxLength")
        elif kind == "integer" and keys & _RANGE_KEYS:
            self._only(node, where, {"type", *_RANGE_KEYS}, "an integer range")
            integer_range(node, where)
        else:
            allowed = {"type"}
            self._only(node, where, allowed, f"type {kind!r}" if kind else "an empty schema")

    def _only(self, node: dict[str, Any], where: str, allowed: set[str], what: str) -> None:
        extra = sorted(set(node) - allowed - _ANNOTATIONS - set(_DEFINITIONS))
        if not extra:
            return
        if extra[0] in _HONOURED:
            raise SchemaRefused(f"{where}.{extra[0]}: not supported with {what} (the converter would ignore it)")
        raise SchemaRefused(f"{where}.{extra[0]}: not supported (the grammar converter cannot honour it)")

    def _ref(self, ref: Any, where: str) -> None:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise SchemaRefused(f"{where}.$ref: only local references (\"#/...\") are supported")
        target: Any = self.root
        for part in ref[2:].split("/"):
            if not isinstance(target, dict) or part not in target:
                raise SchemaRefused(f"{where}.$ref: {ref!r} does not resolve")
            target = target[part]
        if not isinstance(target, dict):
            raise SchemaRefused(f"{where}.$ref: {ref!r} is not a schema")

    def _schema_list(self, value: Any, where: str) -> None:
        if not isinstance(value, list) or not value:
            raise SchemaRefused(f"{where}: must be a non-empty list of schemas")
        for index, sub in enumerate(value):
            self.visit(sub, f"{where}[{index}]")

    def _object(self, node: dict[str, Any], where: str) -> None:
        properties = node.get("properties", {})
        if not isinstance(properties, dict):
            raise SchemaRefused(f"{where}.properties: must be an object of schemas")
        for name, sub in properties.items():
            self.visit(sub, f"{where}.properties.{name}")
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaRefused(f"{where}.required: must be a list of property names")
        missing = [r for r in required if r not in properties]
        if missing:
            raise SchemaRefused(f"{where}.required: {missing[0]!r} is not in properties (the grammar only writes "
                                "listed properties)")
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            self.visit(extra, f"{where}.additionalProperties")
        elif extra is not None and not isinstance(extra, bool):
            raise SchemaRefused(f"{where}.additionalProperties: must be true, false or a schema")

    def _array(self, node: dict[str, Any], where: str) -> None:
        if "prefixItems" in node or isinstance(node.get("items"), list):
            word = "prefixItems" if "prefixItems" in node else "items"
            if word == "prefixItems" and "items" in node:
                raise SchemaRefused(f"{where}.items: not supported together with prefixItems")
            if "minItems" in node or "maxItems" in node:
                raise SchemaRefused(f"{where}.minItems: not supported with a tuple ({word} as a list)")
            self._schema_list(node[word], f"{where}.{word}")
            return
        if not node.get("items"):
            raise SchemaRefused(f"{where}.items: needs a non-empty schema (the converter ignores minItems/maxItems "
                                "otherwise)")
        self.visit(node["items"], f"{where}.items")
        self._bounds(node, where, "minItems", "maxItems")

    def _bounds(self, node: dict[str, Any], where: str, low: str, high: str) -> None:
        lo, hi = node.get(low, 0), node.get(high)
        for name, value in ((low, lo), (high, hi)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise SchemaRefused(f"{where}.{name}: must be a non-negative integer")
        if hi is not None and hi < lo:
            raise SchemaRefused(f"{where}.{high}: must be >= {low}")
        # The converter nests one group per optional repetition.
        if (hi if hi is not None else lo) > MAX_GBNF_NESTING - 16:
            raise SchemaRefused(f"{where}.{high if hi is not None else low}: at most {MAX_GBNF_NESTING - 16} "
                                "(the grammar would nest too deeply)")


_RANGE_KEYS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
# Every keyword the walk accepts somewhere (with the right neighbours).
_HONOURED = frozenset({"type", "$ref", "anyOf", "const", "enum", "properties", "required", "additionalProperties",
                       "items", "prefixItems", "minItems", "maxItems", "pattern", "format", "minLength",
                       "maxLength"}) | _RANGE_KEYS


def integer_range(node: dict[str, Any], where: str) -> tuple[int, int]:
    """The inclusive bounds of an integer schema's range, or `SchemaRefused`."""
    def number(key: str) -> float | None:
        value = node.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SchemaRefused(f"{where}.{key}: must be a number")
        return float(value)

    lows = [v for v in (number("minimum"),) if v is not None]
    lows += [math.floor(v) + 1 for v in (number("exclusiveMinimum"),) if v is not None]
    highs = [v for v in (number("maximum"),) if v is not None]
    highs += [math.ceil(v) - 1 for v in (number("exclusiveMaximum"),) if v is not None]
    if not lows or not highs:
        given = sorted(_RANGE_KEYS & set(node))[0]
        raise SchemaRefused(f"{where}.{given}: an integer range needs both a lower and an upper bound (the grammar "
                            "writes the allowed integers out)")
    lo, hi = math.ceil(max(lows)), math.floor(min(highs))
    if hi < lo:
        raise SchemaRefused(f"{where}: the integer range is empty ({lo} > {hi})")
    if hi - lo + 1 > MAX_INTEGER_RANGE:
        raise SchemaRefused(f"{where}: integer ranges are limited to {MAX_INTEGER_RANGE} values "
                            f"(got {hi - lo + 1})")
    return lo, hi


def expand_integer_ranges(node: Any) -> Any:
    """A copy of a checked schema with each integer range rewritten as an enum of its integers.

    Walks only schema positions, so a property that happens to be named "enum" is still a schema."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if node.get("type") == "integer" and set(node) & _RANGE_KEYS and "enum" not in node and "const" not in node:
        lo, hi = integer_range(node, "")
        out = {k: v for k, v in node.items() if k not in _RANGE_KEYS and k != "type"}
        out["enum"] = list(range(lo, hi + 1))
        return out
    for key in ("properties", *_DEFINITIONS):
        if isinstance(node.get(key), dict):
            out[key] = {name: expand_integer_ranges(sub) for name, sub in node[key].items()}
    for key in ("items", "prefixItems", "anyOf", "additionalProperties"):
        value = node.get(key)
        if isinstance(value, list):
            out[key] = [expand_integer_ranges(sub) for sub in value]
        elif isinstance(value, dict):
            out[key] = expand_integer_ranges(value)
    return out


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """GBNF for a checked schema, by llama-cpp-python's own converter."""
    from llama_cpp import llama_grammar

    converter: Any = llama_grammar.SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    try:
        resolved = converter.resolve_refs(expand_integer_ranges(schema), "input")
        converter.visit(resolved, "")
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SchemaRefused(f"json_schema: the converter refused it: {exc or type(exc).__name__}") from None
    lines = str(converter.format_grammar()).split("\n")
    # The Python converter's string character admits raw control characters, which JSON forbids;
    # llama.cpp's own (C++) converter of the same release excludes them. Use its rule.
    return "\n".join(_CHAR_RULE if line.startswith("char ::= ") else line for line in lines)


_CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\bfnrt] | "u" [0-9a-fA-F]{4})'


# --- GBNF text ---------------------------------------------------------------------------------


def gbnf_nesting(text: str) -> int:
    """How deeply parentheses nest in GBNF text (outside string literals, classes and comments)."""
    depth = best = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "(":
            depth += 1
            best = max(best, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return best


# --- the compiler and its cache ----------------------------------------------------------------


class ConstraintCompiler:
    """Validates and compiles constraints, caching each result by content hash. Thread-safe."""

    def __init__(self, limits: ConstraintLimits, check: GbnfCheck) -> None:
        self._limits = limits
        self._check = check
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Constraint] = OrderedDict()
        self._hits = self._misses = self._refused = 0

    @property
    def limits(self) -> ConstraintLimits:
        return self._limits

    def reconfigure(self, limits: ConstraintLimits) -> None:
        """New limits (SIGHUP): what was cached under the old ones is forgotten."""
        with self._lock:
            if limits != self._limits:
                self._limits = limits
                self._cache.clear()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "cache_entries": len(self._cache),
                "cache_max_entries": self._limits.cache_entries,
                "cache_hits": self._hits,
                "cache_misses": self._misses,
                "refused": self._refused,
            }

    def from_fields(self, obj: dict[str, Any]) -> Constraint | None:
        """The constraint a request object asks for (`format`, `json_schema`, `grammar`; at most one)."""
        given = [k for k in KINDS if obj.get(k) is not None]
        if not given:
            return None
        if len(given) > 1:
            raise EdgeError(Code.INVALID_REQUEST, f"{' and '.join(given)}: at most one of format, json_schema and "
                                                  "grammar")
        return self.compile(given[0], obj[given[0]])

    def compile(self, kind: str, value: Any) -> Constraint:
        """Raise `EdgeError(invalid_request)` naming the problem, or return the (cached) constraint."""
        try:
            source = _canonical(kind, value, self._limits)
        except EdgeError:
            with self._lock:
                self._refused += 1
            raise
        key = hashlib.sha256(f"{kind}\0{source}".encode()).hexdigest()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self._hits += 1
                return cached
            self._misses += 1
            limits = self._limits
        try:
            constraint = Constraint(kind, self._compile(kind, value, source, limits), key)
        except EdgeError:
            with self._lock:
                self._refused += 1
            raise
        with self._lock:
            self._cache[key] = constraint
            while len(self._cache) > max(0, limits.cache_entries):
                self._cache.popitem(last=False)
        return constraint

    def _compile(self, kind: str, value: Any, source: str, limits: ConstraintLimits) -> str:
        if kind == "format":
            # An object (the converter's generic one): no trailing whitespace run for a model to
            # wander into, unlike llama_grammar.JSON_GBNF, so the answer ends when the object does.
            return schema_to_gbnf({"type": "object"})
        if kind == "json_schema":
            try:
                check_schema(value, limits.max_schema_depth)
                gbnf = schema_to_gbnf(value)
            except SchemaRefused as exc:
                raise EdgeError(Code.INVALID_REQUEST, str(exc)) from None
            self._check_gbnf(gbnf, "json_schema", limits.max_schema_bytes * GBNF_SIZE_FACTOR)
            return gbnf
        self._check_gbnf(source, "grammar", limits.max_schema_bytes)
        return source

    def _check_gbnf(self, gbnf: str, where: str, max_bytes: int) -> None:
        size = len(gbnf.encode("utf-8"))
        if size > max_bytes:
            raise EdgeError(Code.INVALID_REQUEST, f"{where}: the grammar is {size} bytes, more than {max_bytes}")
        nesting = gbnf_nesting(gbnf)
        if nesting > MAX_GBNF_NESTING:
            raise EdgeError(Code.INVALID_REQUEST, f"{where}: the grammar nests {nesting} groups deep, more than "
                                                  f"{MAX_GBNF_NESTING}")
        reason = self._check(gbnf)
        if reason is not None:
            raise EdgeError(Code.INVALID_REQUEST, f"{where}: llama.cpp cannot parse it: {reason}")


def _canonical(kind: str, value: Any, limits: ConstraintLimits) -> str:
    """The cache key's text, after the checks that need no compiling (type, size)."""
    if kind == "format":
        if value != "json":
            raise EdgeError(Code.INVALID_REQUEST, f"format: must be \"json\", got {json.dumps(value)[:40]}")
        return "json"
    if kind == "json_schema":
        if not isinstance(value, dict):
            raise EdgeError(Code.INVALID_REQUEST, f"json_schema: must be a JSON object, got {json_type(value)}")
        try:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # key order shapes the grammar
        except (RecursionError, ValueError):
            raise EdgeError(Code.INVALID_REQUEST, "json_schema: nested too deeply") from None
    else:
        if not isinstance(value, str) or not value.strip():
            raise EdgeError(Code.INVALID_REQUEST, "grammar: must be a non-empty string of GBNF rules")
        text = value
    size = len(text.encode("utf-8"))
    if size > limits.max_schema_bytes:
        raise EdgeError(Code.INVALID_REQUEST, f"{kind}: {size} bytes, more than constraints.max_schema_bytes "
                                              f"({limits.max_schema_bytes})")
    return text


# --- answers -----------------------------------------------------------------------------------


def parse_answer(text: str, finish_reason: str) -> Any:
    """`done.json`: the answer's JSON value, or None when cut off (`length`) or not JSON."""
    if finish_reason != "stop":
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _nesting(value: Any) -> int:
    depth, level = 0, [(value, 1)]
    while level:
        node, d = level.pop()
        if isinstance(node, (dict, list)):
            depth = max(depth, d)
            children = node.values() if isinstance(node, dict) else node
            level.extend((child, d + 1) for child in children)
    return depth


def _is_type(value: Any, kind: str) -> bool:
    checks: dict[str, Callable[[Any], bool]] = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    check = checks.get(kind)
    return check is not None and check(value)
