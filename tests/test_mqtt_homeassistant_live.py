"""Issue 12 against a real Mosquitto, reading the payloads as Home Assistant's MQTT integration does:
retained discovery configs, the availability topic, the state sensor's template and options, the
text entity's limits, and the last-answer sensor's state and attributes topics.

The model is the tiny random-weight OLMo-2 (fast: what is checked is the door, not the text).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest

from daemon.transports.mqtt.homeassistant import MAX_ATTRIBUTES_BYTES, MAX_STATE_CHARS
from tests.mqtt_broker import MosquittoBroker, Probe, Received
from tests.test_mqtt_daemon import start_daemon

NODE = "hass"
PREFIX = f"edgellm/{NODE}"
STATE_CONFIG = f"homeassistant/sensor/edgellm_{NODE}/state/config"
ANSWER_CONFIG = f"homeassistant/sensor/edgellm_{NODE}/last_answer/config"
PROMPT_CONFIG = f"homeassistant/text/edgellm_{NODE}/prompt/config"
# Home Assistant's recorder refuses state attributes above this many bytes of JSON.
RECORDER_ATTRIBUTES_LIMIT = 16384


@pytest.fixture()
def mqtt_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path / "broker") as broker:
        yield broker


def render(template: str, payload: Any) -> str:
    # Home Assistant renders MQTT value templates with Jinja2, `value_json` bound to the payload.
    return jinja2.Environment().from_string(template).render(value_json=payload)


def is_config(m: Received) -> bool:
    return m.topic.startswith("homeassistant/") and m.topic.endswith("/config")


def retained(broker: MosquittoBroker, topic: str) -> Received:
    with Probe(broker, [topic]) as probe:
        return probe.wait_for(lambda m: m.retain and m.topic == topic, timeout=10)[0]


def status_after(probe: Probe, since: int, state: str) -> dict[str, Any]:
    """The first status with `state` among the messages after the first `since`."""
    def match(m: Received) -> bool:
        return m.topic == f"{PREFIX}/status" and m.json.get("state") == state and probe.messages.index(m) >= since

    return probe.wait_for(match, timeout=60)[0].json


def test_states_never_contradict_availability_and_the_device_is_announced_once_per_start(
    tmp_path: Path, tiny_olmo_path: Path, mqtt_broker: MosquittoBroker
) -> None:
    """Points 1 and 2. A subscriber that plays Home Assistant from before the first start: after a
    clean stop the retained pair is (`offline`, `stopped`); on the next start no moment shows
    `online` with `stopped`; every state published is one of the state sensor's enum options; and
    each start sends each discovery config once, already with the model's name."""
    watched = ["homeassistant/#", f"{PREFIX}/availability", f"{PREFIX}/status"]
    with Probe(mqtt_broker, watched) as ha:
        daemon = start_daemon(tmp_path / "d", tiny_olmo_path, mqtt_broker, NODE)
        try:
            first = status_after(ha, 0, "ready")
        finally:
            assert daemon.stop() == 0
        status_after(ha, 0, "stopped")
        first_run = list(ha.messages)
        assert retained(mqtt_broker, f"{PREFIX}/availability").payload == b"offline"
        assert retained(mqtt_broker, f"{PREFIX}/status").json["state"] == "stopped"

        daemon = start_daemon(tmp_path / "d", tiny_olmo_path, mqtt_broker, NODE)
        try:
            second = status_after(ha, len(first_run), "ready")
            time.sleep(1.5)  # anything a second discovery round would send
            second_run = ha.messages[len(first_run):]
        finally:
            daemon.stop()

    for run in (first_run, second_run):
        availability, state = "offline", "stopped"  # what the broker retains before each start
        for m in run:
            if m.topic == f"{PREFIX}/availability":
                availability = m.payload.decode()
            elif m.topic == f"{PREFIX}/status":
                state = m.json["state"]
            assert not (availability == "online" and state == "stopped"), run
        configs = [m for m in run if is_config(m)]
        # Point 2: one config per entity per start, with the model's name from the start.
        assert sorted(m.topic for m in configs) == sorted({m.topic for m in configs}), [m.topic for m in configs]
        assert len(configs) == 5
        models = {m.json["device"]["model"] for m in configs}
        assert models == {first["model"]["name"]} == {second["model"]["name"]}, models
        state_config = next(m.json for m in configs if m.topic == STATE_CONFIG)
        assert state_config["device_class"] == "enum"
        for m in run:
            if m.topic == f"{PREFIX}/status":
                assert render(state_config["value_template"], m.json) in state_config["options"], m.json
    assert {"loading", "ready", "idle", "unavailable", "draining", "stopped"} <= set(state_config["options"])


def test_empty_prompt_is_ignored_and_a_long_answer_keeps_its_attributes_bounded(
    tmp_path: Path, tiny_olmo_path: Path, mqtt_broker: MosquittoBroker
) -> None:
    """Points 3 and 4. The text entity needs at least one character; an empty value that arrives
    anyway is logged and leaves `ha/answer` alone. The last-answer sensor reads its attributes from
    a topic whose payload stays under the recorder's limit however long the answer; the full text
    stays on `ha/answer`."""
    overrides = {"model": {"n_ctx": 2048}, "generation": {"max_tokens": 1900, "temperature": 0.0}}
    daemon = start_daemon(tmp_path / "d", tiny_olmo_path, mqtt_broker, NODE, overrides)
    try:
        with Probe(mqtt_broker, ["homeassistant/#"]) as ha:
            ha.wait_for(lambda m: m.topic == ANSWER_CONFIG and m.retain)
            ha.wait_for(lambda m: m.topic == PROMPT_CONFIG and m.retain)
            answer_config = next(m.json for m in ha.messages if m.topic == ANSWER_CONFIG)
            prompt_config = next(m.json for m in ha.messages if m.topic == PROMPT_CONFIG)
        assert prompt_config["min"] == 1 and prompt_config["max"] == MAX_STATE_CHARS
        attributes_topic = answer_config["json_attributes_topic"]
        assert attributes_topic == f"{PREFIX}/ha/answer/attributes" != answer_config["state_topic"]

        with Probe(mqtt_broker, [f"{PREFIX}/ha/answer", attributes_topic]) as ha:
            ha.publish(f"{PREFIX}/ha/prompt", b"Write a very long story about the sea.")
            answer = ha.wait_for(lambda m: m.topic == f"{PREFIX}/ha/answer" and m.json["event"] == "done",
                                 timeout=120)[0]
            attributes = ha.wait_for(lambda m: m.topic == attributes_topic)[0]
        event = answer.json
        assert event["usage"]["completion_tokens"] > 0
        # The state Home Assistant shows: the first 255 characters of the full answer.
        assert render(answer_config["value_template"], event) == event["text"][:MAX_STATE_CHARS]
        shown = attributes.json
        assert len(attributes.payload) <= MAX_ATTRIBUTES_BYTES < RECORDER_ATTRIBUTES_LIMIT
        assert shown["id"] == event["id"] and shown["text_chars"] == len(event["text"])
        assert event["text"].startswith(shown["text"])
        # This answer (greedy, 1900 tokens of the tiny model) is longer than the bound: it was cut.
        assert shown["text_truncated"] and 0 < len(shown["text"]) < len(event["text"])
        assert shown["full_answer_topic"] == f"{PREFIX}/ha/answer"
        print(f"answer: {len(answer.payload)} bytes on ha/answer, attributes {len(attributes.payload)} bytes, "
              f"truncated={shown['text_truncated']}")

        for empty in (b"", b"   \n"):
            with Probe(mqtt_broker) as ha:
                ha.publish(f"{PREFIX}/ha/prompt", empty)
        deadline = time.monotonic() + 10
        while sum(e.get("event") == "mqtt.ha_prompt_empty" for e in daemon.log_events()) < 2:
            assert time.monotonic() < deadline, "the empty prompts were not seen"
            time.sleep(0.05)
        assert retained(mqtt_broker, f"{PREFIX}/ha/answer").json["id"] == event["id"]
        assert retained(mqtt_broker, attributes_topic).json["id"] == event["id"]
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
