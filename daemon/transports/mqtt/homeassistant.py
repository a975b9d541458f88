"""Home Assistant MQTT discovery payloads: pure, no I/O.

One device per daemon (`edgellm <node_id>`) with four sensors (state, queue depth, tokens/s,
last answer) and a `text` entity whose input becomes a prompt. All entities share the daemon's
availability topic. The transport publishes these retained under `<ha_prefix>/…/config` once per
connection (with the configured model's name, known before it loads), again only when the device
really changed, and whenever Home Assistant announces `online` on `<ha_prefix>/status`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from daemon.protocol import to_json_line
from daemon.transports.mqtt.topics import Topics

# A Home Assistant state is at most 255 characters.
MAX_STATE_CHARS = 255
# Home Assistant's recorder drops state attributes above 16,384 bytes (JSON) and adds its own
# (friendly_name, icon); the last answer's attributes are kept to a quarter of that (about 4,000
# characters of text, some 700 words). The full answer is always the payload of `<prefix>/ha/answer`.
MAX_ATTRIBUTES_BYTES = 4096
# Every state the daemon reports (docs/protocol.md); the state sensor is an `enum` of these.
WORKER_STATES = ("loading", "ready", "idle", "unavailable", "draining", "stopped")


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
            device_class="enum",
            options=list(WORKER_STATES),
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
            # The answer event bounded to MAX_ATTRIBUTES_BYTES (`answer_attributes`): a long answer
            # never exceeds the recorder's limit; the full text stays on `ha/answer`.
            json_attributes_topic=topics.ha_answer_attributes,
            icon="mdi:message-text",
        ),
        ("text", "prompt"): entity(
            "Prompt",
            "prompt",
            command_topic=topics.ha_prompt,
            mode="text",
            # An empty value would be an empty prompt: Home Assistant does not send one (and the
            # daemon ignores one that arrives, leaving the last answer alone).
            min=1,
            max=MAX_STATE_CHARS,
            icon="mdi:message-question",
        ),
    }


def answer_attributes(event: dict[str, Any], answer_topic: str, limit: int = MAX_ATTRIBUTES_BYTES) -> bytes:
    """The Last answer sensor's attributes: the answer event with `text` cut so the JSON is at most
    `limit` bytes. `text_truncated` says whether it was cut, `text_chars` how long it was,
    `full_answer_topic` where the whole text is."""
    attributes = {k: v for k, v in event.items() if k != "seq"}
    text = event.get("text")
    if not isinstance(text, str):
        return to_json_line(attributes)[:-1]
    attributes.update(text_chars=len(text), full_answer_topic=answer_topic)
    cut = min(len(text), limit)
    while True:
        attributes.update(text=text[:cut], text_truncated=cut < len(text))
        payload = to_json_line(attributes)[:-1]
        over = len(payload) - limit
        if over <= 0 or cut == 0:
            return payload
        # A character is 1 to 6 bytes of JSON (UTF-8, escapes): drop at least enough for `over`.
        cut = max(0, cut - max(1, over // 6))


def payload_attributes(payload: bytes, answer_topic: str) -> bytes:
    """`answer_attributes` of a published answer event (an unreadable one has none but the topic)."""
    try:
        event = json.loads(payload)
    except ValueError:
        event = None
    return answer_attributes(event if isinstance(event, dict) else {}, answer_topic)


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
