"""The HTTP door's pure parts: error mapping, model names, Ollama and OpenAI request mapping and
reply shapes. No daemon, no sockets: milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from daemon.config import GenerationConfig
from daemon.protocol import Code, DoneEvent, EdgeError, Message
from daemon.transports.http import common, ollama, openai
from daemon.transports.http import tools as T

DEFAULTS = GenerationConfig(max_tokens=32, temperature=0.5)
SERVED = common.ServedModel(
    catalog_name="gemma-3-270m", path="/m/gemma-3-270m-q4_k_m.gguf", size_bytes=253_113_024, arch="gemma3",
    quant="Q4_K_M", n_ctx=2048, loaded=True, modified_at=1_700_000_000.0, digest="ab" * 32,
)
DONE = DoneEvent("r1", "Hello there", "stop", {"prompt_tokens": 12, "completion_tokens": 3},
                 {"queued_ms": 1.0, "prompt_ms": 40.5, "generation_ms": 120.25, "ttft_ms": 42.0})
LIGHT = {"type": "function", "function": {
    "name": "HassTurnOn", "description": "Turn on a device",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}


def edge_error(fn: Any, *args: Any) -> EdgeError:
    with pytest.raises(EdgeError) as caught:
        fn(*args)
    return caught.value


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "status", "retry"), [
    (Code.INVALID_REQUEST, 400, False), (Code.INVALID_JSON, 400, False), (Code.PROMPT_TOO_LONG, 400, False),
    (common.MODEL_NOT_FOUND, 404, False), (common.UNAUTHORIZED, 401, False),
    (Code.QUEUE_FULL, 503, True), (Code.THROTTLED, 503, True), (Code.MEMORY_LOW, 503, True),
    (Code.MODEL_UNAVAILABLE, 503, True), (Code.SHUTTING_DOWN, 503, True), (Code.INTERNAL_ERROR, 500, False),
])
def test_each_protocol_code_has_one_status(code: str, status: int, retry: bool) -> None:
    assert common.http_status(code) == status
    assert ("Retry-After" in common.error_headers(code, 2500)) is retry


def test_retry_after_rounds_up_to_whole_seconds_and_has_a_default() -> None:
    assert common.error_headers(Code.THROTTLED, 2100) == {"Retry-After": "3"}
    assert common.error_headers(Code.QUEUE_FULL, 10) == {"Retry-After": "1"}
    assert common.error_headers(Code.SHUTTING_DOWN, None) == {"Retry-After": str(common.DEFAULT_RETRY_AFTER_S)}


def test_prompt_too_long_details_are_the_engines_counts() -> None:
    message = "prompt is 1500 tokens and max_tokens is 256, together more than the context of 1024 tokens"
    assert common.error_details(Code.PROMPT_TOO_LONG, message) == {"prompt_tokens": 1500, "max_tokens": 256,
                                                                    "n_ctx": 1024}
    assert common.error_details(Code.QUEUE_FULL, message) == {}


# --- model names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma-3-270m", "gemma-3-270m:latest", "gemma-3-270m-q4_k_m", "edgellm",
                                  "edgellm:latest"])
def test_the_model_answers_to_catalog_name_stem_and_alias(name: str) -> None:
    assert SERVED.resolve(name) == name


@pytest.mark.parametrize("name", ["llama3.2:latest", "gemma-3-270m:q8", "EDGELLM", ""])
def test_any_other_name_is_404_naming_ours(name: str) -> None:
    error = edge_error(SERVED.resolve, name)
    assert error.code == (common.MODEL_NOT_FOUND if name else Code.INVALID_REQUEST)
    assert "gemma-3-270m" in error.message


def test_served_model_from_status_and_without_a_loaded_model() -> None:
    status = {"state": "ready", "model": {"path": "/m/x.gguf", "size_bytes": 5, "arch": "olmo2", "quant": "Q4_0",
                                          "n_ctx": 512}}
    loaded = common.served_model(status, common.Path("/cfg/y.gguf"), None, None, (5, 10.0))
    assert loaded.names == ("x", "edgellm") and loaded.loaded and loaded.n_ctx == 512
    idle = common.served_model({"state": "unavailable", "model": None}, common.Path("/cfg/y.gguf"), "olmo-2-1b",
                               "f" * 64, None)
    assert idle.names == ("olmo-2-1b", "y", "edgellm") and not idle.loaded and idle.digest == "f" * 64


# --- Ollama ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), (-1, -1.0), ("-1", -1.0), ("-1m", -1.0), (0, 0.0), ("0", 0.0), ("300s", 300.0), ("5m", 300.0),
    ("1h30m", 5400.0), ("1.5h", 5400.0), ("250ms", 0.25), (42, 42.0), ("42", 42.0),
])
def test_keep_alive_parses_go_durations_and_seconds(value: Any, seconds: float | None) -> None:
    assert ollama.parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 m", "5x", "m", True, [1]])
def test_keep_alive_refuses_what_is_not_a_duration(value: Any) -> None:
    assert edge_error(ollama.parse_keep_alive, value).message.startswith("keep_alive:")


def test_chat_maps_options_onto_the_protocol() -> None:
    body = {"model": "edgellm", "messages": [{"role": "user", "content": "hi"}], "stream": False,
            "keep_alive": "5m", "think": False,
            "options": {"num_ctx": 131072, "temperature": 0.2, "top_p": 0.9, "top_k": 7, "min_p": 0.01,
                        "repeat_penalty": 1.1, "seed": 9, "num_predict": 12, "stop": ["\n"], "num_gpu": 99}}
    plan = ollama.chat_plan(body, DEFAULTS, SERVED)
    request = plan.request
    assert request is not None and not plan.stream and plan.keep_alive_s == 300.0
    assert (request.temperature, request.top_p, request.top_k, request.min_p) == (0.2, 0.9, 7, 0.01)
    assert (request.repeat_penalty, request.seed, request.max_tokens, request.stop) == (1.1, 9, 12, ("\n",))
    assert request.messages == (Message("user", "hi"),)


def test_chat_defaults_stream_to_true_and_num_predict_minus_one_to_the_daemon_default() -> None:
    plan = ollama.chat_plan({"model": "edgellm", "messages": [{"role": "user", "content": "hi"}],
                             "options": {"num_predict": -1}}, DEFAULTS, SERVED)
    assert plan.stream and plan.request is not None and plan.request.max_tokens == 32
    assert plan.request.temperature == 0.5


def test_chat_errors_name_the_ollama_field() -> None:
    def plan(options: dict[str, Any]) -> EdgeError:
        return edge_error(ollama.chat_plan, {"model": "edgellm", "messages": [{"role": "user", "content": "x"}],
                                             "options": options}, DEFAULTS, SERVED)

    assert plan({"temperature": 9.0}).message.startswith("options.temperature:")
    assert plan({"num_predict": 0}).message.startswith("options.num_predict:")
    assert plan({"num_ctx": "big"}).message.startswith("options.num_ctx:")
    images = edge_error(ollama.chat_plan, {"model": "edgellm", "messages": [
        {"role": "user", "content": "x", "images": ["aGk="]}]}, DEFAULTS, SERVED)
    assert "images" in images.message


def test_chat_tool_history_is_folded_into_three_roles() -> None:
    body = {"model": "edgellm", "tools": [LIGHT], "messages": [
        {"role": "system", "content": "You control a home."},
        {"role": "user", "content": "Kitchen light on"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "HassTurnOn",
                                                                           "arguments": {"name": "kitchen"}}}]},
        {"role": "tool", "content": '{"success": true}', "tool_name": "HassTurnOn"},
    ]}
    plan = ollama.chat_plan(body, DEFAULTS, SERVED)
    assert plan.request is not None and plan.choice == T.AUTO and [t.name for t in plan.tools] == ["HassTurnOn"]
    roles = [m.role for m in plan.request.messages or ()]
    assert roles == ["system", "user", "assistant", "user"]
    system, _, call, result = plan.request.messages or ()
    assert system.content.startswith("You control a home.") and '"HassTurnOn"' in system.content
    assert call.content == '{"name": "HassTurnOn", "arguments": {"name": "kitchen"}}'
    assert result.content == 'Result of the tool HassTurnOn:\n{"success": true}'


def test_format_needs_the_grammar_sampler() -> None:
    body = {"model": "edgellm", "messages": [{"role": "user", "content": "x"}], "format": "json"}
    assert edge_error(ollama.chat_plan, body, DEFAULTS, SERVED).code == common.NOT_IMPLEMENTED
    assert edge_error(ollama.chat_plan, {**body, "format": 7}, DEFAULTS, SERVED).code == Code.INVALID_REQUEST
    openai_body = {"model": "edgellm", "messages": [{"role": "user", "content": "x"}],
                   "response_format": {"type": "json_object"}}
    assert edge_error(openai.chat_plan, openai_body, DEFAULTS, SERVED).code == common.NOT_IMPLEMENTED


def test_with_a_constraint_compiler_tools_carry_their_grammar_and_format_its_field() -> None:
    compiler = object()  # stands in for daemon.constraints.ConstraintCompiler: passed on, never called here
    turns = [T.Turn("user", "lamp on")]
    tools = T.parse_tools([LIGHT])
    obj = common.chat_request(turns, tools, T.AUTO, {"stream": False}, {}, "format", compiler)
    assert obj["grammar"] == T.call_grammar(tools, T.AUTO) and obj["stream"] is False
    assert "grammar" not in common.chat_request(turns, tools, T.AUTO, {}, {}, "format", None)
    assert "grammar" not in common.chat_request(turns, tools, T.NONE, {}, {}, "format", compiler)
    schema = common.chat_request(turns, (), T.NONE, {}, {"json_schema": {"type": "object"}}, "format", compiler)
    assert schema["json_schema"] == {"type": "object"} and "grammar" not in schema
    with pytest.raises(EdgeError) as both:
        common.chat_request(turns, tools, T.AUTO, {}, {"format": "json"}, "response_format", compiler)
    assert both.value.message == "response_format: cannot be combined with tools"


def test_generate_system_and_raw() -> None:
    plan = ollama.generate_plan({"model": "edgellm", "prompt": "hi", "system": "be brief"}, DEFAULTS, SERVED)
    assert plan.request is not None and plan.request.messages == (Message("system", "be brief"), Message("user", "hi"))
    raw = ollama.generate_plan({"model": "edgellm", "prompt": "Once", "raw": True}, DEFAULTS, SERVED)
    assert raw.request is not None and raw.request.raw and raw.request.prompt == "Once"
    assert ollama.generate_plan({"model": "edgellm"}, DEFAULTS, SERVED).request is None  # a load request
    assert "suffix" in edge_error(ollama.generate_plan, {"model": "edgellm", "prompt": "a", "suffix": "b"},
                                  DEFAULTS, SERVED).message


def test_final_line_durations_are_nanoseconds_from_the_engine() -> None:
    line = ollama.chat_final("edgellm", "t", DONE, 170_000_000, "Hello there")
    assert line["done"] is True and line["done_reason"] == "stop" and line["total_duration"] == 170_000_000
    assert line["prompt_eval_duration"] == 40_500_000 and line["eval_duration"] == 120_250_000
    assert (line["prompt_eval_count"], line["eval_count"], line["load_duration"]) == (12, 3, 0)
    assert line["message"] == {"role": "assistant", "content": "Hello there"}
    call = ollama.chat_final("edgellm", "t", DONE, 1, "", [T.ToolCall("HassTurnOn", {"name": "x"})])
    assert call["message"]["tool_calls"] == [{"function": {"name": "HassTurnOn", "arguments": {"name": "x"}}}]


def test_tags_ps_show_shapes() -> None:
    tags = ollama.tags_reply(SERVED)["models"]
    assert [m["name"] for m in tags] == ["gemma-3-270m:latest", "gemma-3-270m-q4_k_m:latest", "edgellm:latest"]
    assert tags[0]["details"]["quantization_level"] == "Q4_K_M" and tags[0]["modified_at"].endswith("Z")
    when = datetime(2030, 1, 1, tzinfo=UTC)
    (ps,) = ollama.ps_reply(SERVED, ollama.expires_at(when, 300))["models"]
    assert ps["expires_at"] == "2030-01-01T00:05:00Z" and ps["size_vram"] == 0 and ps["context_length"] == 2048
    assert ollama.expires_at(when, -1).year > 2300
    idle = common.ServedModel(**{**SERVED.__dict__, "loaded": False})
    assert ollama.ps_reply(idle, when) == {"models": []}
    show = ollama.show_reply(SERVED)
    assert show["model_info"]["general.architecture"] == "gemma3" and "tools" in show["capabilities"]


def test_pull_downloads_nothing() -> None:
    assert ollama.pull_reply({"model": "edgellm:latest"}, SERVED, []) == {"status": "success"}
    assert ollama.pull_reply({"model": "olmo-2-1b"}, SERVED, ["olmo-2-1b"]) == {"status": "success"}
    error = edge_error(ollama.pull_reply, {"model": "llama3.2"}, SERVED, [])
    assert error.code == common.MODEL_NOT_FOUND and "edgellm models fetch" in error.message


# --- OpenAI ----------------------------------------------------------------------------------


def test_openai_chat_maps_fields_and_text_parts() -> None:
    body = {"model": "edgellm", "max_completion_tokens": 9, "max_tokens": 99, "temperature": 1.5, "top_p": 0.5,
            "seed": 4, "stop": "END", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "developer", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "y"}]}]}
    plan = openai.chat_plan(body, DEFAULTS, SERVED)
    request = plan.request
    assert plan.stream and plan.include_usage and request.max_tokens == 9 and request.stop == ("END",)
    assert (request.temperature, request.top_p, request.seed) == (1.5, 0.5, 4)
    assert request.messages == (Message("system", "be brief"), Message("user", "hey"))


def test_openai_tool_results_name_their_tool_by_call_id() -> None:
    body = {"model": "edgellm", "tools": [LIGHT], "tool_choice": "required", "messages": [
        {"role": "user", "content": "light on"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "HassTurnOn", "arguments": '{"name": "a"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
    ]}
    plan = openai.chat_plan(body, DEFAULTS, SERVED)
    assert plan.choice == T.ToolChoice("required")
    messages = plan.request.messages or ()
    assert messages[2].content == '{"name": "HassTurnOn", "arguments": {"name": "a"}}'
    assert messages[3] == Message("user", "Result of the tool HassTurnOn:\ndone")


def test_openai_refusals() -> None:
    base = {"model": "edgellm", "messages": [{"role": "user", "content": "x"}]}
    assert edge_error(openai.chat_plan, {**base, "n": 3}, DEFAULTS, SERVED).message == "n: only 1 is supported"
    image = {"model": "edgellm", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    assert "only text parts" in edge_error(openai.chat_plan, image, DEFAULTS, SERVED).message
    assert edge_error(openai.chat_plan, {**base, "model": "gpt-4"}, DEFAULTS, SERVED).code == common.MODEL_NOT_FOUND
    named = {**base, "tools": [LIGHT], "tool_choice": {"type": "function", "function": {"name": "Nope"}}}
    assert "Nope" in edge_error(openai.chat_plan, named, DEFAULTS, SERVED).message
    assert edge_error(openai.completion_plan, {"model": "edgellm", "prompt": ["a", "b"]}, DEFAULTS, SERVED)


def test_openai_reply_shapes() -> None:
    reply = openai.chat_completion("c1", "edgellm", DONE, [])
    assert reply["choices"][0]["message"]["content"] == "Hello there"
    assert reply["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    called = openai.chat_completion("c1", "edgellm", DONE, [T.ToolCall("HassTurnOn", {"name": "x"})])
    choice = called["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "HassTurnOn", "arguments": '{"name": "x"}'}
    error = openai.error_body(Code.QUEUE_FULL, "full", {})
    assert error["error"]["code"] == "queue_full" and error["error"]["type"] == "server_error"
