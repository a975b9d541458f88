"""docs/tasks.md works as written: its config block is the daemon's [tasks], and each `sh` block
between the example markers runs against that daemon (node id `pi`, on a private Mosquitto; only
the socket path is pointed at the test daemon's and the broker's address added to each mosquitto_*
command). Shown JSON lines promise their keys and `event`/`code`/`id`/`finish_reason`; shown text
lines promise a line each (the generated words vary by model); answers (events and MQTT result
objects) are checked against the tasks' grammar and schema."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.helpers import REPO, DaemonProcess
from tests.mqtt_broker import MosquittoBroker
from tests.test_mqtt_daemon import start_daemon

DOC = REPO / "docs" / "tasks.md"
CHECKED_FIELDS = ("event", "code", "id", "finish_reason")
DOC_SOCKET = "/run/edgellm/edgellm.sock"


def doc_tasks() -> dict[str, Any]:
    text = DOC.read_text()
    body = text[text.index("<!-- tasks-config:start -->") : text.index("<!-- tasks-config:end -->")]
    [toml] = re.findall(r"```toml\n(.*?)```", body, flags=re.S)
    tasks: dict[str, Any] = tomllib.loads(toml)["tasks"]
    return tasks


def examples() -> list[tuple[str, str, str]]:
    text = DOC.read_text()
    body = text[text.index("<!-- examples:start -->") : text.index("<!-- examples:end -->")]
    blocks = re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S)
    return [(code, out_lang, out) for (lang, code), (out_lang, out) in zip(blocks, blocks[1:])
            if lang == "sh" and out_lang in ("json", "text")]


EXAMPLES = examples()
TASKS = doc_tasks()


def test_the_document_covers_both_examples_and_every_door_it_names() -> None:
    commands = "\n".join(code for code, _, _ in EXAMPLES)
    assert set(TASKS) == {"camera_summary", "command"}
    for needle in ("edgellm tasks", "edgellm ask --task camera_summary", "edgellm ask --task command", "socat",
                   '"task": "command"', '"task": "camera_summary"', "mosquitto_pub -t frigate/events",
                   "mosquitto_pub -V mqttv311 -q 0 -t edgellm/pi/task/command", "edgellm/pi/task/command/result",
                   "mosquitto_rr -t edgellm/pi/task/command", "edgellm/pi/task/camera_summary/status"):
        assert needle in commands, needle


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[DaemonProcess]:
    with MosquittoBroker(tmp_path_factory.mktemp("broker")) as broker:
        process = start_daemon(tmp_path_factory.mktemp("tasks-doc"), gemma_path, broker, "pi",
                               {"tasks": _toml_ready(TASKS)})
        process.broker = broker  # type: ignore[attr-defined]
        try:
            yield process
        finally:
            process.stop()


def _toml_ready(tasks: dict[str, Any]) -> dict[str, Any]:
    # tests.helpers.toml_dumps writes scalars, lists and tables; the doc's values are exactly those.
    return {name: dict(spec) for name, spec in tasks.items()}


def check_answer(actual: dict[str, Any]) -> None:
    """A done event or MQTT result object of one of the doc's tasks has the shape the task promises."""
    if actual.get("event") != "done" and "text" not in actual:
        return
    schema = json.loads(TASKS["command"]["json_schema"])
    if actual.get("json") is not None:
        jsonschema.validate(actual["json"], schema)
    else:
        check_sentence(actual["text"])


def check_sentence(text: str) -> None:
    assert re.fullmatch(r"[A-Z][a-zA-Z0-9 ,()-]{10,120}\.", text), text


def expected_fields(line: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in CHECKED_FIELDS:
        match = re.search(rf'"{key}":("[^"…]*"|null|true|false)', line)
        if match:
            out[key] = json.loads(match.group(1))
    return out


def shown_keys(line: str) -> set[str]:
    """Top-level keys of a shown JSON line (nested objects may be elided with …)."""
    depth, keys = 0, set()
    for match in re.finditer(r'[{}]|"([^"\\]*)":', line):
        if match.group(0) == "{":
            depth += 1
        elif match.group(0) == "}":
            depth -= 1
        elif depth == 1:
            keys.add(match.group(1))
    return keys


@pytest.mark.parametrize(("code", "lang", "shown"), EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_example_works_as_written(daemon: DaemonProcess, code: str, lang: str, shown: str) -> None:
    env = dict(os.environ, EDGELLM_SOCKET=str(daemon.socket_path),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    broker: MosquittoBroker = daemon.broker  # type: ignore[attr-defined]
    script = code.replace(DOC_SOCKET, str(daemon.socket_path))
    script = re.sub(r"\b(mosquitto_(?:rr|pub|sub))\b", rf"\1 -h {broker.host} -p {broker.port}", script)
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], capture_output=True, text=True,
                            timeout=600, env=env, check=False)
    assert result.returncode == 0, f"{code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    actual_lines = [line for line in result.stdout.splitlines() if line.strip()]
    shown_lines = [line for line in shown.splitlines() if line.strip()]
    assert len(actual_lines) == len(shown_lines), (actual_lines, shown_lines)
    for shown_line, actual_line in zip(shown_lines, actual_lines):
        if lang == "text":
            if code.strip() == "edgellm tasks":
                assert actual_line == shown_line  # the listing is the config, exactly
            else:
                check_sentence(actual_line)
            continue
        actual = json.loads(actual_line)
        assert shown_keys(shown_line) == set(actual), (shown_line, actual)
        for key, value in expected_fields(shown_line).items():
            assert actual.get(key) == value, (key, value, actual)
        check_answer(actual)
    assert daemon.proc.poll() is None


def test_the_shown_task_listing_is_what_edgellm_tasks_prints_for_the_shown_config() -> None:
    # Without a daemon: the listing is a pure function of the config.
    from daemon.cli import format_tasks
    from daemon.config import parse_config
    from daemon.constraints import ConstraintCompiler
    from daemon.engine.grammar_check import gbnf_refusal
    from daemon.tasks import TaskRegistry, limits_of

    cfg = parse_config({"tasks": TASKS}, "<doc>", REPO)
    registry = TaskRegistry.compile(cfg.tasks, ConstraintCompiler(limits_of(cfg.constraints), gbnf_refusal))
    [(_, _, shown)] = [e for e in EXAMPLES if e[0].strip() == "edgellm tasks"]
    assert format_tasks(registry.describe()) == shown.strip()
