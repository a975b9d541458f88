"""Home Assistant discovery payloads: the keys HA requires, and templates that render as HA would."""

from __future__ import annotations

import json
from typing import Any

import jinja2
import pytest

from daemon.transports.mqtt.homeassistant import (
    MAX_ATTRIBUTES_BYTES,
    MAX_STATE_CHARS,
    answer_attributes,
    discovery_messages,
    removal_messages,
)
from daemon.transports.mqtt.presence import Presence
from daemon.transports.mqtt.topics import make_topics

TOPICS = make_topics("attic", "", "ignored")


def configs() -> dict[str, dict[str, Any]]:
    messages = discovery_messages("homeassistant", TOPICS, "gemma-3-270m", "0.1.0")
    return {m.topic: json.loads(m.payload) for m in messages}


def render(template: str, payload: dict[str, Any]) -> str:
    # Home Assistant renders MQTT value templates with Jinja2 and `value_json` bound to the payload.
    env = jinja2.Environment(undefined=jinja2.Undefined)
    return env.from_string(template).render(value_json=payload, value=json.dumps(payload))


def test_discovery_topics_follow_the_ha_scheme() -> None:
    assert sorted(configs()) == [
        "homeassistant/sensor/edgellm_attic/last_answer/config",
        "homeassistant/sensor/edgellm_attic/queue_depth/config",
        "homeassistant/sensor/edgellm_attic/state/config",
        "homeassistant/sensor/edgellm_attic/tokens_per_second/config",
        "homeassistant/text/edgellm_attic/prompt/config",
    ]
    assert all(m.topic.startswith("ha2/") for m in discovery_messages("ha2", TOPICS, None, "v"))


def test_every_entity_has_the_keys_home_assistant_requires() -> None:
    found = configs()
    unique_ids = set()
    for topic, config in found.items():
        component = topic.split("/")[1]
        if component == "sensor":
            assert config["state_topic"].startswith("edgellm/attic/")
        else:
            assert config["command_topic"] == "edgellm/attic/ha/prompt"
            assert config["max"] <= 255
        assert config["name"]
        unique_ids.add(config["unique_id"])
        assert config["availability_topic"] == "edgellm/attic/availability"
        assert (config["payload_available"], config["payload_not_available"]) == ("online", "offline")
        device = config["device"]
        assert device["identifiers"] == ["edgellm_attic"]
        assert device["name"] == "edgellm attic"
        assert device["model"] == "gemma-3-270m"
        assert device["sw_version"] == "0.1.0"
    assert len(unique_ids) == len(found)


def test_status_sensor_templates_render_from_the_status_payload() -> None:
    found = configs()
    status = {"state": "ready", "queue": {"depth": 3, "max_depth": 16}, "last_tokens_per_second": 41.5}
    state = found["homeassistant/sensor/edgellm_attic/state/config"]
    depth = found["homeassistant/sensor/edgellm_attic/queue_depth/config"]
    tps = found["homeassistant/sensor/edgellm_attic/tokens_per_second/config"]
    assert state["state_topic"] == depth["state_topic"] == tps["state_topic"] == "edgellm/attic/status"
    assert render(state["value_template"], status) == "ready"
    assert render(depth["value_template"], status) == "3"
    assert render(tps["value_template"], status) == "41.5"
    # Before the first answer: "None", which Home Assistant turns into `unknown`.
    assert render(tps["value_template"], {**status, "last_tokens_per_second": None}) == "None"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"id": "ha-1", "event": "done", "text": "Hello there."}, "Hello there."),
        ({"id": "ha-1", "event": "done", "text": "x" * 1000}, "x" * MAX_STATE_CHARS),
        ({"id": "ha-1", "event": "error", "code": "queue_full", "message": "queue is full"}, "error: queue is full"),
    ],
)
def test_last_answer_state_is_the_answer_cut_to_255_characters(answer: dict[str, Any], expected: str) -> None:
    config = configs()["homeassistant/sensor/edgellm_attic/last_answer/config"]
    assert config["state_topic"] == "edgellm/attic/ha/answer"
    # Issue 12.4: the attributes come bounded from their own topic (the full answer stays on ha/answer).
    assert config["json_attributes_topic"] == "edgellm/attic/ha/answer/attributes"
    assert render(config["value_template"], answer) == expected


def test_removal_messages_are_empty_payloads_on_the_same_topics() -> None:
    removal = removal_messages("homeassistant", TOPICS)
    assert {m.topic for m in removal} == set(configs())
    assert all(m.payload == b"" for m in removal)


@pytest.mark.parametrize("text", ["a" * 100_000, "é😀\x01\"\\" * 20_000, ""])
def test_answer_attributes_stay_under_the_bound_and_keep_a_prefix_of_the_text(text: str) -> None:
    event = {"id": "ha-1", "event": "done", "text": text, "usage": {"completion_tokens": 9}, "seq": 1}
    payload = answer_attributes(event, "edgellm/attic/ha/answer")
    shown = json.loads(payload)
    assert len(payload) <= MAX_ATTRIBUTES_BYTES
    assert text.startswith(shown["text"]) and shown["text_chars"] == len(text)
    assert shown["text_truncated"] == (shown["text"] != text)
    assert shown["usage"] == {"completion_tokens": 9} and "seq" not in shown
    if len(text) > MAX_ATTRIBUTES_BYTES:
        assert len(payload) > MAX_ATTRIBUTES_BYTES * 0.8  # cut close to the bound, not to nothing


def test_presence_says_the_fresh_state_before_online_and_stopped_only_after_offline() -> None:
    presence = Presence(TOPICS, version="v", model_name="gemma", status_interval_s=60, ha_enabled=True,
                        ha_prefix="homeassistant")
    first = presence.on_connected({"state": "loading", "model": None}, now=0.0)
    topics = [m.topic for m in first]
    assert topics[:2] == ["edgellm/attic/status", "edgellm/attic/availability"]
    assert {json.loads(m.payload)["device"]["model"] for m in first[2:]} == {"gemma"}
    # Loaded under the name it was announced with: no second device update.
    assert presence.on_state({"state": "ready", "model": {"name": "gemma"}}) == []
    assert presence.due({"state": "stopped"}, now=5.0) == []
    last = presence.stopping({"state": "stopped"}, now=6.0)
    assert [(m.topic, m.payload[:20]) for m in last] == [
        ("edgellm/attic/availability", b"offline"), ("edgellm/attic/status", b'{"state":"stopped"}')
    ]
    # Another model after a reload: the device really changed, announce it again.
    assert len(presence.on_state({"state": "ready", "model": {"name": "qwen"}})) == 5
