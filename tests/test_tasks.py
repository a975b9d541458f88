"""Tasks (daemon/tasks.py) and their `[tasks.<name>]` config: fast, no model, real config files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daemon.config import GenerationConfig, TaskConfig, load_config
from daemon.constraints import ConstraintCompiler, ConstraintLimits
from daemon.engine.grammar_check import gbnf_refusal
from daemon.protocol import Code, EdgeError, Message
from daemon.tasks import TaskRegistry, TemplateError, compile_task, compile_template
from tests.test_config import errors_of, write

DEFAULTS = GenerationConfig()


def compiler() -> ConstraintCompiler:
    return ConstraintCompiler(ConstraintLimits(), gbnf_refusal)


def registry(**specs: TaskConfig) -> TaskRegistry:
    return TaskRegistry.compile(specs, compiler())


# --- templates -----------------------------------------------------------------------------------


def test_placeholders_render_the_input_its_fields_and_literal_braces() -> None:
    template = compile_template("Event {input.after.label} on {input.after.camera} ({input.n}): {{raw}} {input}")
    value = {"after": {"label": "person", "camera": "door"}, "n": 2}
    assert template.render({"input": value}) == (
        'Event person on door (2): {raw} {"after":{"label":"person","camera":"door"},"n":2}'
    )


def test_a_string_input_renders_as_itself_and_arrays_index_by_digits() -> None:
    assert compile_template("Say: {input}").render({"input": 'a "quoted" text'}) == 'Say: a "quoted" text'
    assert compile_template("{input.items.1}").render({"input": {"items": ["a", "b"]}}) == "b"


def test_user_data_is_never_evaluated_as_a_template() -> None:
    # A value that looks like a placeholder or a format spec stays text.
    value = {"x": "{input.y} {0.__class__} {topic}", "y": "secret"}
    assert compile_template("{input.x}").render({"input": value}) == "{input.y} {0.__class__} {topic}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{inputs}", "unknown placeholder {inputs}"),
        ("{topic}", "unknown placeholder {topic}"),  # only in a trigger
        ("{input.a b}", "field names"),
        ("{0}", "unknown placeholder {0}"),
        ("{input.__class__.x}", ""),  # accepted as a field name, looked up as data only
        ("open {", "unclosed"),
        ("close }", "lone"),
    ],
)
def test_bad_templates_are_refused(text: str, message: str) -> None:
    if not message:
        compile_template(text)
        return
    with pytest.raises(TemplateError) as info:
        compile_template(text)
    assert message in str(info.value)


def test_a_missing_field_is_an_invalid_request_naming_it() -> None:
    with pytest.raises(EdgeError) as info:
        compile_template("{input.after.label}").render({"input": {"after": {}}})
    assert info.value.code == Code.INVALID_REQUEST and "{input.after.label}" in info.value.message
    with pytest.raises(EdgeError) as info:
        compile_template("{input.a}").render({"input": "plain text"})
    assert "input is string, not an object" in info.value.message


# --- tasks into requests -------------------------------------------------------------------------


def test_a_task_call_becomes_the_tasks_request() -> None:
    tasks = registry(command=TaskConfig(
        system="Turn the sentence into a command.", prompt="Command: {input.text}", max_tokens=48,
        temperature=0.0, format="json", priority="high", deadline_ms=5000, stop=("\n\n",)))
    request = tasks.parse_call({"task": "command", "input": {"text": "lights off"}, "id": "r1", "stream": True},
                               DEFAULTS)
    assert request.id == "r1" and request.stream
    assert request.messages == (Message("system", "Turn the sentence into a command."),
                                Message("user", "Command: lights off"))
    assert request.max_tokens == 48 and request.temperature == 0.0 and request.top_k == DEFAULTS.top_k
    assert request.priority == "high" and request.deadline_ms == 5000 and request.stop == ("\n\n",)
    assert request.grammar is not None and "root ::= object" in request.grammar


def test_the_caller_may_set_priority_and_deadline_and_triggers_default_to_low() -> None:
    tasks = registry(t=TaskConfig(prompt="{input}"))
    request = tasks.parse_call({"task": "t", "input": "hi", "priority": "low", "deadline_ms": 10}, DEFAULTS)
    assert request.priority == "low" and request.deadline_ms == 10 and request.prompt == "hi"
    task = tasks.get("t")
    assert task is not None
    assert task.request("hi", DEFAULTS).priority == "normal"
    assert task.request("hi", DEFAULTS, triggered=True).priority == "low"


def test_raw_tasks_send_the_prompt_untemplated() -> None:
    request = registry(t=TaskConfig(prompt="Q: {input}\nA:", raw=True)).parse_call({"task": "t", "input": "x"},
                                                                                   DEFAULTS)
    assert request.raw and request.prompt == "Q: x\nA:" and request.messages is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"task": "nope"}, "task: unknown task \"nope\"; known: a, b"),
        ({"task": 3}, "task: unknown task 3; known: a, b"),
        ({"task": "a", "input": 1, "prompt": "x"}, "unknown field(s) for a task call: prompt"),
        ({"task": "a", "priority": "urgent"}, "priority"),
        ({"task": "a", "deadline_ms": 0}, "deadline_ms"),
        ({"task": "a", "stream": "yes"}, "stream"),
        ({"task": "a", "id": ""}, "id"),
    ],
)
def test_bad_task_calls_are_invalid_requests(call: dict[str, Any], message: str) -> None:
    tasks = registry(a=TaskConfig(), b=TaskConfig())
    with pytest.raises(EdgeError) as info:
        tasks.parse_call(call, DEFAULTS)
    assert info.value.code == Code.INVALID_REQUEST and message in info.value.message


def test_describe_lists_schema_and_input_fields() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    described = registry(check=TaskConfig(description="d", prompt="{input.a} {input.b.c}",
                                          json_schema=json.dumps(schema))).describe()
    assert described == [{"name": "check", "description": "d", "prompt": "{input.a} {input.b.c}",
                          "json_schema": schema, "input_fields": ["input.a", "input.b.c"]}]


def test_replace_swaps_the_whole_set() -> None:
    tasks = registry(a=TaskConfig())
    tasks.replace(registry(b=TaskConfig()))
    assert tasks.names() == ["b"] and tasks.get("a") is None


# --- the config ------------------------------------------------------------------------------------


def test_tasks_load_from_toml_with_a_schema_as_a_table_or_a_json_string(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[tasks.table]
prompt = "{input}"
max_tokens = 20
[tasks.table.json_schema]
type = "object"
required = ["b", "a"]
[tasks.table.json_schema.properties.b]
type = "string"
[tasks.table.json_schema.properties.a]
enum = ["x", "y"]

[tasks.text]
json_schema = '''{"type": "object", "properties": {"b": {"type": "string"}, "a": {"enum": ["x", "y"]}},
                 "required": ["b", "a"]}'''
"""))
    assert set(cfg.tasks) == {"table", "text"}
    assert cfg.tasks["table"].max_tokens == 20 and cfg.tasks["text"].max_tokens is None
    # Both spellings give the same schema, property order kept (it is the order the answer is written in).
    assert json.loads(cfg.tasks["table"].json_schema) == json.loads(cfg.tasks["text"].json_schema)
    assert list(json.loads(cfg.tasks["table"].json_schema)["properties"]) == ["b", "a"]


@pytest.mark.parametrize(
    ("toml", "error"),
    [
        ('[tasks.Bad]\nprompt = "x"', "tasks.Bad: the name must match [a-z0-9_-]{1,64}"),
        ('[tasks.a]\npromt = "x"', "tasks.a.promt: unknown key (did you mean 'prompt'?)"),
        ('[tasks.a]\nprompt = "{inpt}"', "tasks.a.prompt: unknown placeholder {inpt}"),
        ('[tasks.a]\ntemperature = 9.0', "tasks.a.temperature: must be <= 5"),
        ('[tasks.a]\npriority = "urgent"', "tasks.a.priority: must be one of"),
        ('[tasks.a]\nformat = "json"\ngrammar = "root ::= \\"a\\""', "tasks.a.grammar: at most one of"),
        ('[tasks.a]\ngrammar = "root ::= missing"', "tasks.a.grammar: llama.cpp cannot parse it: Undefined rule"),
        ("[tasks.a]\njson_schema = '{\"type\": \"number\", \"minimum\": 1}'",
         "tasks.a.json_schema: json_schema.minimum"),
        ("[tasks.a]\njson_schema = '{not json'", "tasks.a.json_schema: is not valid JSON"),
        ("[tasks.a]\njson_schema = 3", "tasks.a.json_schema: must be a table or a string holding a JSON object"),
        ('[tasks.a]\npublish = "out"', "tasks.a.publish: only for a trigger"),
        ('[tasks.a]\nsubscribe = ["in/#"]', "tasks.a.publish: a trigger needs a topic"),
        ('[tasks.a]\nsubscribe = ["in/#"]\npublish = "in/summary"', "can match its own subscription 'in/#'"),
        ('[tasks.a]\nsubscribe = ["cam/+/event"]\npublish = "cam/{topic}"', "the task would trigger itself"),
        ('[tasks.a]\nsubscribe = ["in/a#"]\npublish = "out"', "tasks.a.subscribe[0]: not a valid MQTT topic filter"),
        ('[tasks.a]\nsubscribe = ["in"]\npublish = "out/+"', "tasks.a.publish: must not contain MQTT wildcards"),
        ('[tasks.a]\ncoalesce = "all"', "tasks.a.coalesce: must be one of"),
        ("tasks = 3", "tasks: must be a table of named tables"),
    ],
)
def test_bad_tasks_are_config_errors_naming_the_key(tmp_path: Path, toml: str, error: str) -> None:
    errors = errors_of(write(tmp_path, toml))
    assert any(error in e for e in errors), errors


def test_a_trigger_may_use_topic_and_publish_elsewhere(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '''
[tasks.summary]
prompt = "{topic}: {input.after.label}"
subscribe = ["frigate/events", "zigbee2mqtt/+/action"]
publish = "edgellm/summary/{topic}"
min_interval_s = 5
'''))
    task = compile_task("summary", cfg.tasks["summary"], compiler())
    request = task.request({"after": {"label": "cat"}}, DEFAULTS, topic="frigate/events", triggered=True)
    assert request.prompt == "frigate/events: cat" and request.priority == "low"
