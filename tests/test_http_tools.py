"""Tool calls: (a) the prompt, (b) the GBNF built from the tools' schemas, (c) parsing replies back.

(a) and (c) are pure. (b) is checked twice: its structure, and by sampling the bundled model through
llama.cpp with it (llama-cpp-python's own grammar sampler), every reply validated with `jsonschema`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from daemon.protocol import Message
from daemon.templates import render_gemma3
from daemon.transports.http import tools as T

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "the device", "maxLength": 24},
        "domain": {"type": "string", "enum": ["light", "switch", "fan"]},
        "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
        "area": {"type": "object", "properties": {"floor": {"type": "integer"}}, "required": ["floor"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2},
    },
    "required": ["name", "domain"],
}
TOOLS = T.parse_tools([
    {"type": "function", "function": {"name": "HassTurnOn", "description": "Turn on a device", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "GetLiveContext", "description": "Read the states of devices"}},
])
REQUIRED = T.ToolChoice("required")


# --- parsing what clients send ---------------------------------------------------------------


def test_parse_tools_reads_the_openai_and_ollama_shape() -> None:
    light, context = TOOLS
    assert (light.name, light.description, light.parameters) == ("HassTurnOn", "Turn on a device", SCHEMA)
    assert context.parameters == {"type": "object", "properties": {}}


@pytest.mark.parametrize("bad", [
    "nope", [{"type": "retrieval"}], [{"function": {"name": "has space"}}], [{"function": {}}],
    [{"function": {"name": "a"}}, {"function": {"name": "a"}}], [{"function": {"name": "a", "parameters": []}}],
])
def test_parse_tools_refuses_malformed_tools(bad: Any) -> None:
    with pytest.raises(T.EdgeError) as caught:
        T.parse_tools(bad)
    assert caught.value.message.startswith("tools")


def test_tool_choice() -> None:
    assert T.parse_tool_choice(None, TOOLS) == T.AUTO and T.parse_tool_choice(None, ()) == T.NONE
    assert T.parse_tool_choice("required", TOOLS) == REQUIRED
    named = T.parse_tool_choice({"type": "function", "function": {"name": "GetLiveContext"}}, TOOLS)
    assert named == T.ToolChoice("named", "GetLiveContext")
    with pytest.raises(T.EdgeError):
        T.parse_tool_choice("required", ())


# --- (a) the prompt --------------------------------------------------------------------------


def test_system_prompt_lists_the_tools_as_json_and_the_call_form() -> None:
    auto = T.system_prompt(TOOLS, T.AUTO)
    listed = json.loads(auto.split("\n")[1])
    assert [t["name"] for t in listed] == ["HassTurnOn", "GetLiveContext"] and listed[0]["parameters"] == SCHEMA
    assert '{"name": "<tool name>", "arguments": {<the arguments>}}' in auto and "plain text" in auto
    forced = T.system_prompt(TOOLS, REQUIRED)
    assert "plain text" not in forced
    named = T.system_prompt(TOOLS, T.ToolChoice("named", "GetLiveContext"))
    assert [t["name"] for t in json.loads(named.split("\n")[1])] == ["GetLiveContext"]


def test_chat_turns_joins_an_existing_system_prompt_or_adds_one() -> None:
    with_system = T.chat_turns([T.Turn("system", "Be brief."), T.Turn("user", "hi")], TOOLS, T.AUTO)
    assert [m["role"] for m in with_system] == ["system", "user"]
    assert with_system[0]["content"].startswith("Be brief.\n\nYou can use these tools:")
    without = T.chat_turns([T.Turn("user", "hi")], TOOLS, T.AUTO)
    assert [m["role"] for m in without] == ["system", "user"]
    assert T.chat_turns([T.Turn("user", "hi")], TOOLS, T.NONE) == [{"role": "user", "content": "hi"}]


def test_chat_turns_folds_calls_and_results_into_protocol_roles() -> None:
    call = T.ToolCall("HassTurnOn", {"name": "lamp", "domain": "light"})
    turns = [T.Turn("user", "lamp on"), T.Turn("assistant", "", (call,)), T.Turn("tool", "ok", tool_name="HassTurnOn"),
             T.Turn("tool", "also ok")]
    out = T.chat_turns(turns, (), T.NONE)
    assert out == [
        {"role": "user", "content": "lamp on"},
        {"role": "assistant", "content": '{"name": "HassTurnOn", "arguments": {"name": "lamp", "domain": "light"}}'},
        {"role": "user", "content": "Result of the tool HassTurnOn:\nok"},
        {"role": "user", "content": "Tool result:\nalso ok"},
    ]
    assert {m["role"] for m in out} <= {"system", "user", "assistant"}


# --- (b) the grammar -------------------------------------------------------------------------


def test_grammar_is_none_without_tools_or_with_choice_none() -> None:
    assert T.call_grammar((), T.AUTO) is None and T.call_grammar(TOOLS, T.NONE) is None


def test_auto_grammar_allows_plain_text_forced_ones_only_calls() -> None:
    auto = T.call_grammar(TOOLS, T.AUTO)
    forced = T.call_grammar(TOOLS, REQUIRED)
    named = T.call_grammar(TOOLS, T.ToolChoice("named", "GetLiveContext"))
    assert auto is not None and forced is not None and named is not None
    assert auto.startswith("root ::= tool-call | plain-text\n") and "plain-text ::=" in auto
    assert forced.startswith("root ::= tool-call\n") and "plain-text" not in forced
    assert '"\\"HassTurnOn\\""' in forced and '"\\"GetLiveContext\\""' in forced
    assert '"\\"GetLiveContext\\""' in named and "HassTurnOn" not in named


def test_argument_strings_are_bounded_and_json_clean() -> None:
    grammar = T.call_grammar(T.parse_tools([{"function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string"}, "y": {"type": "string", "maxLength": 5}}}}}]),
        REQUIRED) or ""
    assert f'string ::= "\\"" char{{0,{T.MAX_ARGUMENT_CHARS}}} "\\"" space' in grammar.split("\n")
    assert "\\x00-\\x1F" in next(line for line in grammar.split("\n") if line.startswith("char ::= "))
    assert grammar.count("(char") == 5  # a schema's own maxLength stays the converter's


def test_call_schema_pins_the_name_and_requires_the_arguments() -> None:
    schema = T.call_schema(TOOLS, REQUIRED)
    good = {"name": "HassTurnOn", "arguments": {"name": "lamp", "domain": "light"}}
    jsonschema.validate(good, schema)
    for bad in ({"name": "HassTurnOn", "arguments": {"name": "lamp"}}, {"name": "Other", "arguments": {}},
                {"name": "GetLiveContext", "arguments": {"x": 1}}, {"name": "HassTurnOn"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@pytest.fixture(scope="module")
def llm(gemma_path: Path) -> Any:
    import llama_cpp

    model = llama_cpp.Llama(model_path=str(gemma_path), n_ctx=1024, n_threads=2, verbose=False)
    yield model
    model.close()


@pytest.mark.parametrize("choice", [T.AUTO, REQUIRED, T.ToolChoice("named", "HassTurnOn")])
def test_llama_cpp_parses_every_grammar(llm: Any, choice: T.ToolChoice) -> None:
    import llama_cpp

    unbounded = T.parse_tools([{"function": {"name": "Say", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}, "words": {"type": "array",
                                                                              "items": {"type": "string"}}}}}}])
    for tools in (TOOLS, unbounded + TOOLS):
        grammar = T.call_grammar(tools, choice)
        assert grammar is not None
        sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode(), b"root")
        assert sampler, grammar  # NULL when llama.cpp cannot parse it
        llama_cpp.llama_sampler_free(sampler)


def sample(llm: Any, choice: T.ToolChoice, user: str, seed: int, max_tokens: int) -> str:
    import llama_cpp

    grammar_text = T.call_grammar(TOOLS, choice)
    assert grammar_text is not None
    grammar = llama_cpp.LlamaGrammar.from_string(grammar_text, verbose=False)
    messages = [Message(m["role"], m["content"]) for m in T.chat_turns([T.Turn("user", user)], TOOLS, choice)]
    out = llm.create_completion(render_gemma3(messages).text, max_tokens=max_tokens, temperature=0.9, seed=seed,
                                grammar=grammar)
    return str(out["choices"][0]["text"])


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "user"), [(1, "Turn on the kitchen light"), (2, "What is on in the house?")])
def test_forced_grammar_makes_the_bundled_model_emit_a_valid_call(llm: Any, seed: int, user: str) -> None:
    text = sample(llm, REQUIRED, user, seed, max_tokens=128)
    call = T.parse_call(text, TOOLS)
    assert call is not None, text
    schema = next(t.parameters for t in TOOLS if t.name == call.name)
    jsonschema.validate(call.arguments, T._arguments_schema(schema))


@pytest.mark.slow
def test_auto_grammar_gives_text_or_a_valid_call_never_a_broken_one(llm: Any) -> None:
    text = sample(llm, T.AUTO, "Turn on the kitchen light", 4, max_tokens=12)
    call = T.parse_call(text, TOOLS)
    assert call is not None or not text.startswith(("{", " ", "\n", "\t")), text


# --- (c) parsing replies ---------------------------------------------------------------------


def test_parse_call() -> None:
    assert T.parse_call(' {"name": "GetLiveContext", "arguments": {}} \n', TOOLS) == T.ToolCall("GetLiveContext", {})
    quoted = T.parse_call('{"name": "HassTurnOn", "arguments": "{\\"name\\": \\"x\\"}"}', TOOLS)
    assert quoted == T.ToolCall("HassTurnOn", {"name": "x"})
    for not_a_call in ("Sure, the light is on.", '{"name": "Invented", "arguments": {}}',
                       '{"name": "HassTurnOn", "arguments": {}} and more', '{"name": "HassTurnOn", "arguments": [1]}',
                       '{"name": "HassTurnOn", "arguments": {', "[]"):
        assert T.parse_call(not_a_call, TOOLS) is None, not_a_call


def test_reply_splitter_streams_text_and_holds_a_call_back() -> None:
    text = T.ReplySplitter(TOOLS)
    assert [text.feed(p) for p in ("\n", "The ", "light")] == ["", "\nThe ", "light"]
    assert text.finish() == ("", None)
    call = T.ReplySplitter(TOOLS)
    assert [call.feed(p) for p in (" {", '"name": "GetLiveContext", ', '"arguments": {}}')] == ["", "", ""]
    assert call.finish() == ("", T.ToolCall("GetLiveContext", {}))
    broken = T.ReplySplitter(TOOLS)
    assert broken.feed("{not json") == ""
    assert broken.finish() == ("{not json", None)  # never lost: it was text after all
    assert T.ReplySplitter(()).feed("{") == "{"  # without tools nothing is held


def test_client_shapes() -> None:
    call = T.ToolCall("HassTurnOn", {"name": "lamp"})
    assert T.ollama_tool_calls([call]) == [{"function": {"name": "HassTurnOn", "arguments": {"name": "lamp"}}}]
    (shaped,) = T.openai_tool_calls([call], ["call_x"])
    assert shaped == {"id": "call_x", "type": "function",
                      "function": {"name": "HassTurnOn", "arguments": '{"name": "lamp"}'}}
