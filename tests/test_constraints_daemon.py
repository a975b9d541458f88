"""Constrained output and tasks end to end: a real daemon process, its socket, the bundled Gemma 3
270M (a base model: the grammar does the work), `jsonschema` to check the answers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.helpers import REPO, DaemonProcess, base_config, merge, toml_dumps, wait_status, write_config

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "action": {"enum": ["on", "off", "toggle"]},
        "level": {"type": "integer", "minimum": 0, "maximum": 100},
        "target": {
            "type": "object",
            "properties": {"room": {"enum": ["kitchen", "hall", "bedroom"]}, "device": {"type": "string",
                                                                                        "maxLength": 12}},
            "required": ["room", "device"],
        },
        "tags": {"type": "array", "items": {"enum": ["urgent", "later", "quiet"]}, "minItems": 1, "maxItems": 2},
    },
    "required": ["action", "level", "target", "tags"],
}

PROMPTS = [
    "Turn on the kitchen light", "Dim the hall lamp to 20 percent", "Switch off the bedroom fan",
    "Toggle the heater", "Make the kitchen brighter", "Lights out everywhere", "Start the coffee machine",
    "Set the bedroom lamp to half", "Stop the music in the hall", "It is too dark in here",
    "Open the blinds", "Turn the radio down", "Close the garage", "I am going to sleep",
    "Warm up the bathroom", "Guests are coming", "Movie time", "Water the plants", "Vacuum the hall",
    "Everything off, I am leaving",
]

COMMAND_TASK = {
    "description": "A free-text command as {action, level, target, tags}",
    "system": "Turn the user's sentence into a smart-home command.",
    "prompt": "Sentence: {input.text}",
    "json_schema": json.dumps(SCHEMA),
    "max_tokens": 200,
    "temperature": 0.0,
}


def config_with_tasks(tmp: Path, model: Path, tasks: dict[str, Any]) -> dict[str, Any]:
    return merge(base_config(tmp, model), {"tasks": tasks, "generation": {"max_tokens": 200}})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("constraints")
    path = write_config(tmp, gemma_path, {"tasks": {"command": COMMAND_TASK}, "generation": {"max_tokens": 200}})
    with DaemonProcess(path) as process:
        process.wait_ready()
        yield process


def ask(daemon: DaemonProcess, request: dict[str, Any]) -> dict[str, Any]:
    with daemon.client(timeout=900) as client:
        return client.call(request)


# --- constrained answers from the real model ----------------------------------------------------


def test_a_schema_with_enum_nested_object_array_and_integer_range_is_met_for_20_prompts(
    daemon: DaemonProcess,
) -> None:
    for seed, prompt in enumerate(PROMPTS):
        done = ask(daemon, {"prompt": prompt, "json_schema": SCHEMA, "temperature": 0.9, "seed": seed,
                            "max_tokens": 200})
        assert done["event"] == "done" and done["finish_reason"] == "stop", done
        assert done["json"] == json.loads(done["text"])
        jsonschema.validate(done["json"], SCHEMA)


def test_format_json_always_parses(daemon: DaemonProcess) -> None:
    # An object of any keys has no bound on its length: an answer either ends (and parses) or is cut
    # off by max_tokens (and says so: `length`, `json` null; one prompt here writes an endless URL).
    finished = 0
    for seed, prompt in enumerate(["Describe a cat", "A person at the front door", "Weather today", "List fruit",
                                   "The kitchen light is on", "Who are you?"]):
        done = ask(daemon, {"prompt": prompt, "format": "json", "temperature": 0.8, "seed": seed, "max_tokens": 256})
        if done["finish_reason"] == "length":
            assert done["json"] is None
            continue
        assert done["finish_reason"] == "stop", done
        assert isinstance(done["json"], dict) and json.loads(done["text"]) == done["json"]
        finished += 1
    assert finished >= 4


def test_a_yes_no_grammar_answers_only_yes_or_no(daemon: DaemonProcess) -> None:
    answers = set()
    for seed, prompt in enumerate(["Is the sky blue?", "Is fire cold?", "Are cats animals?", "Is 2 > 3?",
                                   "Is the door open?", "Do fish fly?", "Is it night?", "Is water wet?"]):
        done = ask(daemon, {"prompt": prompt, "grammar": 'root ::= "yes" | "no"', "temperature": 1.0, "seed": seed})
        assert done["finish_reason"] == "stop" and done["text"] in ("yes", "no"), done
        assert done["json"] is None  # not JSON, and the event says so
        answers.add(done["text"])
    assert answers <= {"yes", "no"}


def test_streamed_tokens_of_a_constrained_answer_add_up_to_it(daemon: DaemonProcess) -> None:
    with daemon.client(timeout=300) as client:
        events = list(client.request({"id": "s1", "prompt": "Kitchen light on", "json_schema": SCHEMA,
                                      "stream": True, "seed": 1}))
    done = events[-1]
    assert "".join(e["text"] for e in events if e["event"] == "token") == done["text"]
    jsonschema.validate(done["json"], SCHEMA)


def test_an_answer_cut_off_by_max_tokens_has_json_null(daemon: DaemonProcess) -> None:
    done = ask(daemon, {"prompt": "Turn on the light", "json_schema": SCHEMA, "max_tokens": 5})
    assert done["finish_reason"] == "length" and done["json"] is None and done["text"]


def test_an_unconstrained_done_has_no_json_field(daemon: DaemonProcess) -> None:
    done = ask(daemon, {"prompt": "Hello", "max_tokens": 4})
    assert done["event"] == "done" and "json" not in done


# --- refusals: invalid_request, and the daemon keeps serving --------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"json_schema": {"type": "string", "format": "email"}}, "json_schema.format: 'email' is not supported"),
        ({"json_schema": {"type": "number", "minimum": 0, "maximum": 1}}, "json_schema.maximum: not supported"),
        ({"grammar": "root ::= answer"}, "grammar: llama.cpp cannot parse it: Undefined rule identifier 'answer'"),
        ({"grammar": 'root ::= "a" |'}, ""),  # llama.cpp accepts an empty alternative: not an error
        ({"format": "json", "grammar": 'root ::= "a"'}, "format and grammar: at most one"),
        ({"json_schema": {"enum": ["x" * 200] * 100}}, "more than constraints.max_schema_bytes"),
        ({"json_schema": "not an object"}, "json_schema: must be a JSON object"),
    ],
)
def test_bad_constraints_are_invalid_requests_and_the_daemon_keeps_serving(
    daemon: DaemonProcess, fields: dict[str, Any], message: str
) -> None:
    reply = ask(daemon, {"id": "bad", "prompt": "Hi", "max_tokens": 2, **fields})
    if not message:
        assert reply["event"] == "done"
        return
    assert reply["event"] == "error" and reply["code"] == "invalid_request" and reply["id"] == "bad"
    assert message in reply["message"], reply
    assert ask(daemon, {"prompt": "Hi", "max_tokens": 2})["event"] == "done"


def test_the_same_schema_is_compiled_once_and_status_counts_the_hits(daemon: DaemonProcess) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    with daemon.client(timeout=300) as client:
        before = client.status()["constraints"]
        for _ in range(3):
            done = client.call({"prompt": "Is it fine?", "json_schema": schema})
            assert isinstance(done["json"]["ok"], bool)
        after = client.status()["constraints"]
    assert after["cache_misses"] == before["cache_misses"] + 1
    assert after["cache_hits"] == before["cache_hits"] + 2


# --- tasks ---------------------------------------------------------------------------------------


def test_a_task_over_the_socket_fills_its_prompt_from_a_json_payload(daemon: DaemonProcess) -> None:
    done = ask(daemon, {"id": "t1", "task": "command", "input": {"text": "turn on the kitchen light"}})
    assert done["id"] == "t1" and done["event"] == "done" and done["finish_reason"] == "stop", done
    jsonschema.validate(done["json"], SCHEMA)
    events = [e for e in daemon.log_events() if e.get("event") == "request.finished" and e.get("id") == "t1"]
    assert events and events[0]["prompt_tokens"] > 10  # system + "Sentence: ..." were sent


def test_a_missing_input_field_and_an_unknown_task_are_invalid_requests(daemon: DaemonProcess) -> None:
    reply = ask(daemon, {"id": "t2", "task": "command", "input": {"txt": "hi"}})
    assert reply["code"] == "invalid_request" and "{input.text}" in reply["message"] and reply["id"] == "t2"
    reply = ask(daemon, {"id": "t3", "task": "summarise", "input": "x"})
    assert reply["code"] == "invalid_request" and reply["message"].endswith("known: command")


def test_the_tasks_op_lists_tasks_with_their_schemas(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        reply = client.call({"op": "tasks"})
    assert reply["event"] == "tasks"
    [task] = reply["tasks"]
    assert task["name"] == "command" and task["json_schema"] == SCHEMA and task["input_fields"] == ["input.text"]


def cli(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args, "--socket", str(daemon.socket_path)],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))


def test_cli_ask_task_and_tasks(daemon: DaemonProcess) -> None:
    result = cli(daemon, "ask", "--task", "command", '{"text": "hall light off"}', "--json")
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout)["json"], SCHEMA)
    result = cli(daemon, "ask", "--task", "command", "plain text has no .text field")
    assert result.returncode == 1 and "invalid_request" in result.stderr and "{input.text}" in result.stderr
    listing = cli(daemon, "tasks")
    assert listing.returncode == 0 and listing.stdout.startswith("command — A free-text command")
    assert '"level": {"type": "integer", "minimum": 0, "maximum": 100}' in listing.stdout
    assert json.loads(cli(daemon, "tasks", "--json").stdout)[0]["json_schema"] == SCHEMA


def test_sighup_adds_and_removes_tasks_and_a_bad_reload_keeps_them(tmp_path: Path, gemma_path: Path) -> None:
    config = write_config(tmp_path, gemma_path, {"tasks": {"command": COMMAND_TASK}})
    yes_no = {"prompt": "Question: {input}", "grammar": 'root ::= "yes" | "no"', "temperature": 0.0}

    def rewrite(tasks: dict[str, Any]) -> None:
        config.write_text(toml_dumps(config_with_tasks(tmp_path, gemma_path, tasks)))

    def names(client: Any) -> list[str]:
        return [t["name"] for t in client.call({"op": "tasks"})["tasks"]]

    with DaemonProcess(config) as daemon:
        daemon.wait_ready()
        with daemon.client(timeout=300) as client:
            rewrite({"yes_no": yes_no})
            daemon.signal(signal.SIGHUP)
            wait_status(client, lambda s: s["tasks"]["names"] == ["yes_no"], timeout=30)
            assert names(client) == ["yes_no"]
            assert client.call({"task": "yes_no", "input": "Is ice cold?"})["text"] in ("yes", "no")
            reply = client.call({"task": "command", "input": {"text": "x"}})
            assert reply["code"] == "invalid_request" and "known: yes_no" in reply["message"]

            rewrite({"yes_no": yes_no, "broken": {"prompt": "{nope}"}})
            daemon.signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while not any(e.get("event") == "config.reload_rejected" for e in daemon.log_events()):
                assert time.monotonic() < deadline, daemon.log()
                time.sleep(0.1)
            rejected = next(e for e in daemon.log_events() if e.get("event") == "config.reload_rejected")
            assert any("tasks.broken.prompt: unknown placeholder {nope}" in e for e in rejected["errors"])
            assert names(client) == ["yes_no"]
