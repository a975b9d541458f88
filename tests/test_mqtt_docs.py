"""docs/mqtt.md's examples work as written: each `sh` block between the example markers runs
against a real daemon (node id `pi`, fleet on) on a private broker, and its output has the events
the document shows after it. Only the broker's address is added to each mosquitto_* command."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, DaemonProcess
from tests.mqtt_broker import MosquittoBroker
from tests.test_mqtt_daemon import start_daemon

DOC = REPO / "docs" / "mqtt.md"
# The fields an example's shown output promises (the generated text itself varies by model).
CHECKED_FIELDS = ("event", "code", "id", "state", "cancelled")


def examples() -> list[tuple[str, str]]:
    text = DOC.read_text()
    body = text[text.index("<!-- examples:start -->") : text.index("<!-- examples:end -->")]
    blocks = re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S)
    pairs = []
    for (lang, code), (out_lang, out) in zip(blocks, blocks[1:]):
        if lang == "sh" and out_lang in ("json", "text"):
            pairs.append((code, out))
    return pairs


EXAMPLES = examples()


def test_the_document_has_an_example_for_every_topic() -> None:
    commands = "\n".join(code for code, _ in EXAMPLES)
    for topic in ("request", "cancel", "error", "availability", "status", "ha/prompt", "ha/answer", "response/#"):
        assert f"edgellm/pi/{topic}" in commands, topic
    assert "edgellm/fleet/request" in commands
    assert "response-topic" in commands and "correlation-data" in commands and "reply_to" in commands
    assert "message-expiry-interval" in commands
    assert len(EXAMPLES) >= 12


@pytest.fixture(scope="module")
def daemon_pi(
    tmp_path_factory: pytest.TempPathFactory, gemma_path: Path
) -> Iterator[tuple[DaemonProcess, MosquittoBroker]]:
    with MosquittoBroker(tmp_path_factory.mktemp("broker")) as broker:
        daemon = start_daemon(
            tmp_path_factory.mktemp("pi"), gemma_path, broker, "pi", {"mqtt": {"fleet": {"enabled": True}}}
        )
        try:
            yield daemon, broker
        finally:
            daemon.stop()


def expected_fields(line: str) -> dict[str, object]:
    """`"key":value` pairs of the checked fields in a shown output line (which may elide with …)."""
    out: dict[str, object] = {}
    for key in CHECKED_FIELDS:
        match = re.search(rf'"{key}":("[^"]*"|null|true|false)', line)
        if match:
            out[key] = json.loads(match.group(1))
    return out


def matches(expected: object, actual: object) -> bool:
    if isinstance(expected, str) and expected.endswith("…"):
        return isinstance(actual, str) and actual.startswith(expected[:-1])
    return expected == actual


@pytest.mark.parametrize(("code", "shown"), EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_example_works_as_written(daemon_pi: tuple[DaemonProcess, MosquittoBroker], code: str, shown: str) -> None:
    daemon, broker = daemon_pi
    script = re.sub(r"\b(mosquitto_(?:rr|pub|sub))\b", rf"\1 -h {broker.host} -p {broker.port}", code)
    result = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    actual_lines = [line for line in result.stdout.splitlines() if line.strip()]
    shown_lines = [line for line in shown.splitlines() if line.strip()]
    assert len(actual_lines) == len(shown_lines), (actual_lines, shown_lines)
    for shown_line, actual_line in zip(shown_lines, actual_lines):
        if not shown_line.startswith("{"):
            assert actual_line == shown_line
            continue
        actual = json.loads(actual_line)
        for key, value in expected_fields(shown_line).items():
            assert matches(value, actual.get(key)), (key, value, actual)
    assert daemon.proc.poll() is None
