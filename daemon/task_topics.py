"""The MQTT face of tasks, ready for the MQTT door to wire: topics and Home Assistant discovery.

Pure. `edgellm/<node_id>/task/<name>` takes a task's input (a JSON value or plain UTF-8 text, see
`daemon.triggers.payload_input`); answers go to the MQTT 5 response topic, a JSON payload's
`reply_to`, or `.../task/<name>/result`; counters go to `.../task/<name>/status`. Each task shows
up in Home Assistant as a `text` entity (send it input) and a `sensor` with its last result (state:
the first 255 characters of the text; attributes: the result object: `json`, `text`, `timings`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from daemon.transports.mqtt.homeassistant import MAX_STATE_CHARS, DiscoveryMessage, discovery_topic, entity_configs
from daemon.transports.mqtt.topics import Topics

_SHARED_KEYS = ("availability_topic", "payload_available", "payload_not_available", "device", "origin")


def task_topic(topics: Topics, name: str) -> str:
    return f"{topics.prefix}/task/{name}"


def result_topic(topics: Topics, name: str) -> str:
    """Retained: the task's last result (the HA sensor reads it)."""
    return f"{topics.prefix}/task/{name}/result"


def status_topic(topics: Topics, name: str) -> str:
    return f"{topics.prefix}/task/{name}/status"


def task_subscription(topics: Topics) -> str:
    """One filter for every task's input topic (results and status are one level deeper)."""
    return f"{topics.prefix}/task/+"


def task_name_of(topics: Topics, topic: str) -> str | None:
    """The task a message on the task filter is for, or None (not a task input topic)."""
    head = f"{topics.prefix}/task/"
    if not topic.startswith(head):
        return None
    name = topic[len(head):]
    return name if name and "/" not in name else None


def task_entities(
    topics: Topics, tasks: Iterable[tuple[str, str]], model_name: str | None, version: str
) -> dict[tuple[str, str], dict[str, Any]]:
    """(component, object id) → discovery config for each (name, description) task."""
    # The device's own entities carry what every entity of the device shares.
    device_entity = entity_configs(topics, model_name, version)[("sensor", "state")]
    common = {key: device_entity[key] for key in _SHARED_KEYS}
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for name, description in tasks:
        title = name.replace("_", " ").replace("-", " ").capitalize()
        out[("text", f"task_{name}")] = {
            "name": f"Task {title}", "unique_id": f"edgellm_{topics.node_id}_task_{name}", **common,
            "command_topic": task_topic(topics, name), "mode": "text", "min": 0, "max": MAX_STATE_CHARS,
            "icon": "mdi:play-box-outline",
        }
        out[("sensor", f"task_{name}_result")] = {
            "name": f"Task {title} result", "unique_id": f"edgellm_{topics.node_id}_task_{name}_result", **common,
            "state_topic": result_topic(topics, name),
            "value_template": (
                "{{ ((value_json.text if value_json.error is not defined else 'error: ' ~ value_json.error.message)"
                f" or '')[:{MAX_STATE_CHARS}] }}}}"
            ),
            "json_attributes_topic": result_topic(topics, name),
            "icon": "mdi:text-box-check-outline",
            **({"description": description} if description else {}),
        }
    return out


def task_discovery_messages(
    ha_prefix: str, topics: Topics, tasks: Iterable[tuple[str, str]], model_name: str | None, version: str
) -> list[DiscoveryMessage]:
    return [
        DiscoveryMessage(discovery_topic(ha_prefix, topics, component, object_id),
                         json.dumps(config, separators=(",", ":")).encode("utf-8"))
        for (component, object_id), config in task_entities(topics, tasks, model_name, version).items()
    ]


def task_removal_messages(ha_prefix: str, topics: Topics, removed: Iterable[str]) -> list[DiscoveryMessage]:
    """Empty retained payloads for tasks a reload removed: Home Assistant drops their entities."""
    return [
        DiscoveryMessage(discovery_topic(ha_prefix, topics, component, object_id), b"")
        for component, object_id in task_entities(topics, ((n, "") for n in removed), None, "")
    ]
