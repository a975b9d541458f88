"""Constrained output (daemon/constraints.py, daemon/engine/grammar_check.py): fast, no model.

The schema walk is checked against the converter llama-cpp-python ships, and grammars against
llama.cpp's own parser (no vocabulary needed). The model-level tests are in test_constraints_daemon.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from daemon.constraints import MAX_GBNF_NESTING, ConstraintCompiler, ConstraintLimits, gbnf_nesting, parse_answer
from daemon.engine.grammar_check import gbnf_refusal
from daemon.protocol import Code, EdgeError
from daemon.schema_grammar import MAX_INTEGER_RANGE, expand_integer_ranges, schema_to_gbnf

DEVICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "entity": {"type": "string", "enum": ["light.kitchen", "light.hall", "switch.fan"]},
        "action": {"enum": ["on", "off", "toggle"]},
        "value": {"type": "integer", "minimum": 0, "maximum": 100},
        "where": {"type": "object", "properties": {"room": {"type": "string", "maxLength": 16}},
                  "required": ["room"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
    },
    "required": ["entity", "action", "value", "where", "tags"],
}


def compiler(**limits: int) -> ConstraintCompiler:
    return ConstraintCompiler(ConstraintLimits(**limits), gbnf_refusal)


def refusal(kind: str, value: Any, **limits: int) -> str:
    with pytest.raises(EdgeError) as info:
        compiler(**limits).compile(kind, value)
    assert info.value.code == Code.INVALID_REQUEST
    return info.value.message


# --- what the converter honours is accepted, and llama.cpp parses the result --------------------


@pytest.mark.parametrize(
    "schema",
    [
        DEVICE_SCHEMA,
        {"type": "string"},
        {"type": "boolean"},
        {"type": ["string", "null"]},
        {"const": "yes"},
        {"enum": [1, "two", None, True]},
        {"type": "string", "pattern": "^[a-z]+-[0-9]{2}$"},
        {"type": "string", "format": "date"},
        {"type": "string", "minLength": 2, "maxLength": 5},
        {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
        {"type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}]},
        {"anyOf": [{"type": "integer"}, {"type": "object", "properties": {"a": {"type": "boolean"}}}]},
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/thing"}}, "$defs": {"thing": {"enum": ["x"]}}},
        {"title": "annotations are ignored", "description": "and fine", "type": "integer", "default": 3},
        {"type": "integer", "exclusiveMinimum": -1, "exclusiveMaximum": 3},
    ],
)
def test_honoured_schemas_compile_to_grammars_llama_cpp_parses(schema: dict[str, Any]) -> None:
    constraint = compiler().compile("json_schema", schema)
    assert constraint.kind == "json_schema" and "root ::=" in constraint.gbnf
    assert gbnf_refusal(constraint.gbnf) is None


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "number", "minimum": 0}, "json_schema.minimum"),  # the converter has no number ranges
        ({"type": "integer", "minimum": 0}, "json_schema.minimum"),  # one-sided: cannot be written out
        ({"type": "integer", "minimum": 0, "maximum": MAX_INTEGER_RANGE}, "limited to"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "json_schema.maxLength"),  # pattern wins
        ({"type": "string", "pattern": "a+"}, "json_schema.pattern"),  # must be anchored
        ({"type": "string", "format": "email"}, "json_schema.format"),
        ({"type": "integer", "format": "int32"}, "json_schema.format"),
        ({"maxLength": 3}, "json_schema"),  # needs type string
        ({"oneOf": [{"type": "string"}]}, "json_schema.oneOf"),
        ({"allOf": [{"type": "string"}]}, "json_schema.allOf"),
        ({"not": {"type": "string"}}, "json_schema.not"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "json_schema.uniqueItems"),
        ({"type": "array", "minItems": 2}, "json_schema.items"),  # ignored without items
        ({"type": "object", "required": ["a"]}, "json_schema.required"),  # never written
        ({"type": "object", "properties": {"a": {"type": "string"}}, "minProperties": 1}, "json_schema.minProperties"),
        ({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 2}}},
         "json_schema.properties.a.multipleOf"),
        ({"$ref": "https://example.com/schema.json"}, "json_schema.$ref"),
        ({"$ref": "#/$defs/missing"}, "json_schema.$ref"),
        ({"$ref": "#/$defs/a", "type": "string", "$defs": {"a": {}}}, "json_schema.type"),
        ({"enum": ["a", 1], "type": "string"}, "json_schema.enum"),
        ({"type": "what"}, "json_schema.type"),
        ({"type": "string", "pattern": "^\\d+$"}, "llama.cpp cannot parse it: unknown escape"),
    ],
)
def test_what_the_converter_cannot_honour_is_refused_by_name(schema: dict[str, Any], named: str) -> None:
    assert named in refusal("json_schema", schema)


def test_a_refused_keyword_deep_inside_is_named_with_its_path() -> None:
    schema = {"type": "object", "properties": {"list": {"type": "array", "items": {"anyOf": [
        {"type": "string"}, {"type": "string", "contentEncoding": "base64"}]}}}}
    assert refusal("json_schema", schema).startswith("json_schema.properties.list.items.anyOf[1].contentEncoding:")


def test_integer_ranges_become_enums_the_converter_honours() -> None:
    expanded = expand_integer_ranges(DEVICE_SCHEMA)
    assert expanded["properties"]["value"] == {"enum": list(range(0, 101))}
    assert expanded["properties"]["action"] == DEVICE_SCHEMA["properties"]["action"]
    # A property that happens to be called "enum" is still a schema position.
    odd = {"type": "object", "properties": {"enum": {"type": "integer", "minimum": 1, "maximum": 2}}}
    assert expand_integer_ranges(odd)["properties"]["enum"] == {"enum": [1, 2]}
    grammar = schema_to_gbnf({"type": "integer", "minimum": 8, "maximum": 10})
    assert 'root ::= "8" | "9" | "10"' in grammar


def test_strings_exclude_raw_control_characters() -> None:
    # llama-cpp-python's converter lets a raw newline into a string (invalid JSON); llama.cpp's own
    # converter of the same release does not, and that is the rule used.
    grammar = schema_to_gbnf({"type": "object"})
    char = next(line for line in grammar.splitlines() if line.startswith("char ::= "))
    assert "\\x00-\\x1F" in char


# --- grammars ------------------------------------------------------------------------------------


def test_a_good_grammar_passes_unchanged() -> None:
    assert compiler().compile("grammar", 'root ::= "yes" | "no"').gbnf == 'root ::= "yes" | "no"'


@pytest.mark.parametrize(
    ("grammar", "reason"),
    [
        ("root ::= foo", "Undefined rule identifier 'foo'"),
        ('root ::= "a\\q"', "unknown escape"),
        ('rot ::= "a"', "grammar does not contain a 'root' symbol"),
        ('root ::= root "a"', "left recursion"),
        ('root ::= "a" <think>', "no vocab"),
    ],
)
def test_a_malformed_grammar_carries_llama_cpps_reason(grammar: str, reason: str) -> None:
    message = refusal("grammar", grammar)
    assert message.startswith("grammar: llama.cpp cannot parse it: ") and reason in message


def test_the_check_does_not_leak_llama_cpps_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    assert gbnf_refusal("root ::= nothing") is not None
    assert gbnf_refusal('root ::= "ok"') is None
    captured = capfd.readouterr()
    assert "error parsing grammar" not in captured.err and "nothing" not in captured.err


def test_grammars_nested_deeper_than_llama_cpps_stack_are_refused_before_parsing() -> None:
    # 20000 nested groups crash llama.cpp's recursive parser (measured); never hand it those.
    deep = "root ::= " + "(" * (MAX_GBNF_NESTING + 1) + '"a"' + ")" * (MAX_GBNF_NESTING + 1)
    assert "nests" in refusal("grammar", deep, max_schema_bytes=1048576)
    assert gbnf_nesting('root ::= ("(" [(] "\\"(" ) # ((((') == 1


@pytest.mark.parametrize("value", ["", "   ", 7, None])
def test_a_grammar_must_be_non_empty_text(value: Any) -> None:
    # An empty string would give llama.cpp a sampler with no grammar: an unconstrained answer.
    if value is None:
        assert compiler().from_fields({"grammar": None}) is None
    else:
        assert "grammar:" in refusal("grammar", value)


# --- request fields, limits, cache ---------------------------------------------------------------


def test_at_most_one_constraint_per_request() -> None:
    with pytest.raises(EdgeError) as info:
        compiler().from_fields({"format": "json", "grammar": 'root ::= "a"'})
    assert info.value.message.startswith("format and grammar: at most one")


def test_format_accepts_only_json() -> None:
    assert "format" in refusal("format", "yaml")
    assert compiler().from_fields({"format": "json"}) is not None


def test_oversize_and_too_deep_schemas_are_refused() -> None:
    big = {"enum": ["x" * 100] * 20}
    assert "constraints.max_schema_bytes" in refusal("json_schema", big, max_schema_bytes=1024)
    assert "constraints.max_schema_bytes" in refusal("grammar", 'root ::= "' + "a" * 2000 + '"',
                                                     max_schema_bytes=1024)
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(5):
        deep = {"type": "object", "properties": {"a": deep}}
    assert "constraints.max_schema_depth" in refusal("json_schema", deep, max_schema_depth=4)


def test_compiled_constraints_are_cached_by_content_and_hits_counted() -> None:
    c = compiler(cache_entries=2)
    first = c.compile("json_schema", DEVICE_SCHEMA)
    again = c.compile("json_schema", json.loads(json.dumps(DEVICE_SCHEMA)))  # equal content, new object
    assert again is first
    assert c.status() == {"cache_entries": 1, "cache_max_entries": 2, "cache_hits": 1, "cache_misses": 1,
                          "refused": 0}
    c.compile("grammar", 'root ::= "a"')
    c.compile("grammar", 'root ::= "b"')  # evicts the schema (least recently used)
    assert c.compile("json_schema", DEVICE_SCHEMA) is not first
    assert c.status()["cache_misses"] == 4 and c.status()["cache_entries"] == 2


def test_refusals_are_counted_and_never_cached() -> None:
    c = compiler()
    for _ in range(2):
        with pytest.raises(EdgeError):
            c.compile("grammar", "root ::= nope")
    assert c.status()["refused"] == 2 and c.status()["cache_entries"] == 0


def test_property_order_is_kept_in_the_grammar_and_the_cache_key() -> None:
    c = compiler()
    ab = c.compile("json_schema", {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "string"}},
                                   "required": ["b", "a"]})
    ba = c.compile("json_schema", {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                                   "required": ["b", "a"]})
    assert ab.key != ba.key
    assert 'root ::= "{" space b-kv "," space a-kv' in ab.gbnf


def test_new_limits_forget_the_cache() -> None:
    c = compiler()
    c.compile("format", "json")
    c.reconfigure(ConstraintLimits(max_schema_bytes=1024))
    assert c.status()["cache_entries"] == 0 and c.limits.max_schema_bytes == 1024


# --- answers -------------------------------------------------------------------------------------


def test_the_answer_is_parsed_only_when_complete() -> None:
    assert parse_answer('{"a": 1}', "stop") == {"a": 1}
    assert parse_answer('{"a": 1}', "length") is None  # cut off: never a half answer
    assert parse_answer("yes", "stop") is None  # a grammar's answer need not be JSON
    assert parse_answer('"yes"', "stop") == "yes"
    assert parse_answer('{"a": 1}', "cancelled") is None
