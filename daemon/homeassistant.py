"""Home Assistant MQTT discovery payloads: pure, no I/O.

One device per daemon (`edgellm <node_id>`) with four sensors (state, queue depth, tokens/s,
last answer) and a `text` entity whose input becomes a prompt. All entities share the daemon's
availability topic. The transport publishes these retained under `<ha_prefix>/…/config` and again
whenever Home Assistant announces `online` on `<ha_prefix>/status`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from daemon.mqtt_topics import Topics

# A Home Assistant state is at most 255 characters; the full answer goes into the attributes.
MAX_STATE_CHARS = 255


@dataclass(frozen=True)
class DiscoveryMessage:
    topic: str
    payload: bytes  # retained; an empty payload removes the entity


def _unique(topics: Topics, name: str) -> str:
    return f"edgellm_{topics.node_id}_{name}"


def device_info(topics: Topics, model_name: str | None, version: str) -> dict[str, Any]:
    return {
        "identifiers": [f"edgellm_{topics.node_id}"],
        "name": f"edgellm {topics.node_id}",
        "manufacturer": "edgellm",
        "model": model_name or "edgellm (no model loaded)",
        "sw_version": version,
    }


def entity_configs(topics: Topics, model_name: str | None, version: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(component, object id) → discovery config for every entity of the device."""
    common: dict[str, Any] = {
        "availability_topic": topics.availability,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device_info(topics, model_name, version),
        "origin": {"name": "edgellm", "sw_version": version},
    }

    def entity(name: str, object_id: str, **fields: Any) -> dict[str, Any]:
        return {"name": name, "unique_id": _unique(topics, object_id), **common, **fields}

    answer_template = (
        "{{ ((value_json.text if value_json.event == 'done' else 'error: ' ~ value_json.message) or '')"
        f"[:{MAX_STATE_CHARS}] }}}}"
    )
    return {
        ("sensor", "state"): entity(
            "State",
            "state",
            state_topic=topics.status,
            value_template="{{ value_json.state }}",
            icon="mdi:brain",
        ),
        ("sensor", "queue_depth"): entity(
            "Queue depth",
            "queue_depth",
            state_topic=topics.status,
            value_template="{{ value_json.queue.depth }}",
            state_class="measurement",
            icon="mdi:tray-full",
        ),
        ("sensor", "tokens_per_second"): entity(
            "Tokens per second",
            "tokens_per_second",
            state_topic=topics.status,
            # None (no answer yet) renders as "None", which Home Assistant shows as unknown.
            value_template="{{ value_json.last_tokens_per_second }}",
            unit_of_measurement="tok/s",
            state_class="measurement",
            icon="mdi:speedometer",
        ),
        ("sensor", "last_answer"): entity(
            "Last answer",
            "last_answer",
            state_topic=topics.ha_answer,
            value_template=answer_template,
            # Every key of the answer event (the full `text`, `usage`, `timings`) becomes an attribute.
            json_attributes_topic=topics.ha_answer,
            icon="mdi:message-text",
        ),
        ("text", "prompt"): entity(
            "Prompt",
            "prompt",
            command_topic=topics.ha_prompt,
            mode="text",
            min=0,
            max=MAX_STATE_CHARS,
            icon="mdi:message-question",
        ),
    }


def discovery_topic(ha_prefix: str, topics: Topics, component: str, object_id: str) -> str:
    return f"{ha_prefix}/{component}/edgellm_{topics.node_id}/{object_id}/config"


def discovery_messages(
    ha_prefix: str, topics: Topics, model_name: str | None, version: str
) -> list[DiscoveryMessage]:
    """The retained config messages that announce the device and its entities."""
    return [
        DiscoveryMessage(
            discovery_topic(ha_prefix, topics, component, object_id),
            json.dumps(config, separators=(",", ":")).encode("utf-8"),
        )
        for (component, object_id), config in entity_configs(topics, model_name, version).items()
    ]


def removal_messages(ha_prefix: str, topics: Topics) -> list[DiscoveryMessage]:
    """Empty retained payloads: Home Assistant removes the entities (discovery turned off)."""
    return [
        DiscoveryMessage(discovery_topic(ha_prefix, topics, component, object_id), b"")
        for component, object_id in entity_configs(topics, None, "")
    ]
