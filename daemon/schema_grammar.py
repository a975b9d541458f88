"""A JSON schema as GBNF, by the converter llama-cpp-python ships, behind an allow-list.

Pure. `llama_cpp.llama_grammar.SchemaConverter` silently ignores what it does not implement, so
every schema is first walked against what it does honour (read from its source, 0.3.36), and
anything else is refused with `SchemaRefused` naming the keyword and where it is. One addition:
integer `minimum`/`maximum` (the converter has none) become an `enum` of the allowed integers when
the range is small enough, which the converter then honours exactly. And one repair: the string
character rule of llama.cpp's own (C++) converter of the same release, which excludes the raw
control characters JSON forbids.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from daemon.protocol import json_type

# The converter nests one group per optional repetition; llama.cpp's parser recurses per group.
MAX_REPEAT = 240
# Widest integer range (maximum - minimum + 1) written out as an enum.
MAX_INTEGER_RANGE = 1024

# Keywords that describe but never constrain: allowed anywhere, ignored by the converter.
_ANNOTATIONS = frozenset(
    {"title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated", "readOnly",
     "writeOnly"}
)
_DEFINITIONS = ("$defs", "definitions")
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
# String formats the converter has rules for (anything else would be ignored).
_FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")


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
        if (hi if hi is not None else lo) > MAX_REPEAT:
            raise SchemaRefused(f"{where}.{high if hi is not None else low}: at most {MAX_REPEAT} "
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
