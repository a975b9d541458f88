"""The MQTT face of tasks without I/O (daemon/transports/mqtt/task_calls.py, presence's task
entities): task calls and their routes, the result topic's one shape, the trigger book across
reloads. Fast: no broker, no model."""

from __future__ import annotations

import json
from typing import Any

import pytest

from daemon.config import GenerationConfig, TaskConfig
from daemon.constraints import ConstraintCompiler, ConstraintLimits
from daemon.engine.grammar_check import gbnf_refusal
from daemon.protocol import Code
from daemon.tasks import TaskRegistry
from daemon.transports.mqtt.presence import Presence
from daemon.transports.mqtt.task_calls import (
    TaskCall,
    TriggerBook,
    interpret_task_call,
    result_shape,
    result_task_of,
)
from daemon.transports.mqtt.topics import Rejected, make_destinations, make_topics

TOPICS = make_topics("pi", "", "ignored")
DESTINATIONS = make_destinations(TOPICS, ha_prefix="homeassistant")
DEFAULTS = GenerationConfig()


def registry(**specs: TaskConfig) -> TaskRegistry:
    return TaskRegistry.compile(specs, ConstraintCompiler(ConstraintLimits(), gbnf_refusal))


TASKS = registry(
    say=TaskConfig(prompt="Say: {input}"),
    cam=TaskConfig(prompt="{input.after.label} at {input.after.camera}", max_tokens=8),
)


def call(name: str, payload: bytes, **kw: Any) -> TaskCall | Rejected:
    return interpret_task_call(
        f"edgellm/pi/task/{name}", payload, TASKS, TOPICS, DEFAULTS, request_id="task-1", max_payload_bytes=1024,
        destinations=DESTINATIONS, **kw,
    )


def prompt_of(decision: TaskCall | Rejected) -> str:
    assert isinstance(decision, TaskCall), decision
    request = decision.request
    return request.prompt if request.prompt is not None else request.messages[-1].content  # type: ignore[index]


def test_plain_text_is_the_input_and_the_answer_goes_to_the_retained_result_topic() -> None:
    decision = call("say", b"hello there")
    assert isinstance(decision, TaskCall)
    assert decision.route.topic == "edgellm/pi/task/say/result" and decision.retain
    assert decision.request.id == "task-1" and not decision.request.stream
    assert prompt_of(decision) == "Say: hello there"


def test_a_json_payload_fills_input_fields_and_its_reply_to_is_a_route_not_input() -> None:
    payload = {"after": {"label": "person", "camera": "door"}, "reply_to": "dev/esp32/answer"}
    decision = call("cam", json.dumps(payload).encode())
    assert isinstance(decision, TaskCall)
    assert prompt_of(decision) == "person at door"
    assert decision.route.topic == "dev/esp32/answer" and not decision.retain
    whole = call("say", json.dumps({"a": 1, "reply_to": "dev/x"}).encode())
    assert prompt_of(whole) == 'Say: {"a":1}'


def test_a_response_topic_wins_and_its_correlation_data_is_echoed() -> None:
    decision = call("say", b'{"reply_to": "dev/x"}', response_topic="rr/1", correlation=b"\x00c")
    assert isinstance(decision, TaskCall)
    assert (decision.route.topic, decision.route.correlation, decision.retain) == ("rr/1", b"\x00c", False)


def test_an_unknown_task_is_an_invalid_request_naming_the_known_ones_on_the_reply_route() -> None:
    decision = call("nope", b"x", response_topic="rr/2", correlation=b"c")
    assert isinstance(decision, Rejected)
    assert decision.error.code == Code.INVALID_REQUEST
    assert "unknown task \"nope\"; known: cam, say" in decision.error.message
    assert (decision.route.topic, decision.route.correlation) == ("rr/2", b"c")
    # No reply route: the node's error topic (a result topic is only ever a real task's).
    assert call("nope", b"x").route.topic == "edgellm/pi/error"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("name", "payload", "kw", "code", "needle"),
    [
        ("cam", b"just text", {}, Code.INVALID_REQUEST, "{input.after}"),
        ("say", b"\xff\xfe", {}, Code.INVALID_JSON, "neither JSON nor UTF-8"),
        ("say", b"x" * 2000, {}, Code.PAYLOAD_TOO_LARGE, "mqtt.max_payload_bytes is 1024"),
        ("say", b'{"reply_to": "edgellm/pi/request"}', {}, Code.INVALID_REQUEST, "reply_to: 'edgellm/pi/request'"),
        ("say", b'{"reply_to": "a/#"}', {}, Code.INVALID_REQUEST, "reply_to: must be an MQTT topic name"),
        ("say", b"x", {"response_topic": "$SYS/x"}, Code.INVALID_REQUEST, "Response Topic: '$SYS/x'"),
        ("say", b"x", {"expiry_s": 0}, Code.DEADLINE_EXCEEDED, "expired"),
    ],
)
def test_bad_calls_are_structured_errors_on_the_task_result_topic(
    name: str, payload: bytes, kw: dict[str, Any], code: str, needle: str
) -> None:
    decision = call(name, payload, **kw)
    assert isinstance(decision, Rejected), decision
    assert decision.error.code == code and needle in decision.error.message, decision.error
    assert decision.error.id == "task-1"
    assert decision.route.topic == f"edgellm/pi/task/{name}/result"  # a refused destination is never used


def test_a_call_whose_payload_was_dropped_on_arrival_is_too_large_not_empty() -> None:
    # The client drops a payload over mqtt.max_payload_bytes as it arrives (only the size is
    # kept): the call is refused as too large, on the result topic, never taken for an empty value.
    decision = call("say", b"", dropped_size=5_000_000)
    assert isinstance(decision, Rejected), decision
    assert decision.error.code == Code.PAYLOAD_TOO_LARGE and "5000000 bytes" in decision.error.message
    assert decision.route.topic == "edgellm/pi/task/say/result"


def test_message_expiry_becomes_the_deadline() -> None:
    decision = call("say", b"x", expiry_s=5)
    assert isinstance(decision, TaskCall) and decision.request.deadline_ms == 5000


def test_the_result_topic_carries_the_result_object_and_nothing_else_is_touched() -> None:
    done = {"id": "t", "event": "done", "text": "hi", "finish_reason": "stop", "usage": {}, "timings": {"a": 1},
            "json": {"x": 1}}
    shaped = json.loads(result_shape(TOPICS, "edgellm/pi/task/say/result", json.dumps(done).encode()))
    assert shaped == {"task": "say", "source_topic": "edgellm/pi/task/say", "text": "hi", "json": {"x": 1},
                      "timings": {"a": 1}}
    error = {"id": "t", "event": "error", "code": "invalid_request", "message": "m"}
    shaped = json.loads(result_shape(TOPICS, "edgellm/pi/task/say/result", json.dumps(error).encode()))
    assert shaped["error"] == {"code": "invalid_request", "message": "m"} and "text" not in shaped
    for topic in ("rr/1", "edgellm/pi/response/x", "edgellm/pi/task/say"):
        assert result_shape(TOPICS, topic, json.dumps(done).encode()) == json.dumps(done).encode()
    assert result_task_of(TOPICS, "edgellm/pi/task/a/b/result") is None


def trigger_tasks(**overrides: Any) -> TaskRegistry:
    spec = {"prompt": "{topic}: {input}", "subscribe": ["sensors/+/event", "sensors/+/event"],
            "publish": "out/{topic}", "min_interval_s": 10.0, "coalesce": "latest", "max_queue": 2, **overrides}
    return registry(trig=TaskConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}),
                    plain=TaskConfig())


def tasks_of(reg: TaskRegistry) -> list[Any]:
    return [reg.get(n) for n in reg.names()]


def test_the_trigger_book_keeps_a_gate_across_a_reload_and_counts_what_a_removal_drops() -> None:
    book = TriggerBook()
    changes = book.reconcile(tasks_of(trigger_tasks()))
    assert changes.added == ("plain", "trig") and set(book.gates) == {"trig"}
    assert book.subscriptions() == {"sensors/+/event"}
    assert book.matching("sensors/door/event") == ["trig"] and book.matching("sensors/door") == []
    gate = book.gates["trig"]
    gate.offer("sensors/a/event", 1, now=0.0)
    gate.offer("sensors/a/event", 2, now=0.1)  # waits: one at a time per source topic
    changes = book.reconcile(tasks_of(trigger_tasks(coalesce="drop", min_interval_s=1.0)))
    assert changes.added == () and changes.removed == ()
    assert book.gates["trig"] is gate and (gate.coalesce, gate.min_interval_s) == ("drop", 1.0)
    assert gate.status()["pending"] == 1
    changes = book.reconcile(tasks_of(registry(plain=TaskConfig())))
    assert changes.removed == ("trig",) and changes.triggers_removed == ("trig",)
    counters = gate.counters
    assert counters.dropped == 1  # the waiting message, counted before the gate went
    assert counters.received == counters.run + counters.coalesced + counters.dropped
    assert book.subscriptions() == set()


def test_trigger_status_topics_go_out_on_change_at_most_once_a_second() -> None:
    book = TriggerBook()
    book.reconcile(tasks_of(trigger_tasks()))
    [(topic, payload)] = book.status_due(TOPICS, now=100.0)
    assert topic == "edgellm/pi/task/trig/status"
    assert json.loads(payload) == {"task": "trig", "received": 0, "run": 0, "coalesced": 0, "dropped": 0,
                                   "failed": 0, "pending": 0, "running": 0}
    book.gates["trig"].offer("sensors/a/event", 1, now=100.2)
    book.mark("trig")
    assert book.status_due(TOPICS, now=100.5) == []
    assert book.next_due() == pytest.approx(101.0)
    [(_, payload)] = book.status_due(TOPICS, now=101.0)
    assert json.loads(payload)["run"] == 1 and json.loads(payload)["running"] == 1
    book.mark("trig")
    assert book.status_due(TOPICS, now=103.0) == []  # nothing changed: nothing sent
    assert len(book.status_due(TOPICS, now=103.1, force=True)) == 1  # a new connection hears it all


def presence() -> Presence:
    p = Presence(TOPICS, version="0.1", model_name="gemma", status_interval_s=60, ha_enabled=True,
                 ha_prefix="homeassistant")
    p.on_connected({"state": "ready"}, now=0.0)
    return p


def test_task_entities_come_with_the_device_and_a_reload_adds_and_removes_them() -> None:
    p = presence()
    p.tasks = (("a", "first"),)
    topics = {m.topic for m in p.discovery({"state": "ready"})}
    assert {"homeassistant/text/edgellm_pi/task_a/config",
            "homeassistant/sensor/edgellm_pi/task_a_result/config"} <= topics
    assert "homeassistant/sensor/edgellm_pi/state/config" in topics
    messages = p.set_tasks((("b", ""),), {"state": "ready"})
    by_topic = {m.topic: m.payload for m in messages}
    assert by_topic["homeassistant/text/edgellm_pi/task_a/config"] == b""
    assert by_topic["homeassistant/sensor/edgellm_pi/task_a_result/config"] == b""
    b_text = json.loads(by_topic["homeassistant/text/edgellm_pi/task_b/config"])
    assert b_text["command_topic"] == "edgellm/pi/task/b"
    assert all(m.retain for m in messages) and len(messages) == 4
    assert p.set_tasks((("b", ""),), {"state": "ready"}) == []  # nothing changed
    removed = p.reconfigure_ha(False, "homeassistant", {"state": "ready"})
    assert "homeassistant/text/edgellm_pi/task_b/config" in {m.topic for m in removed if m.payload == b""}


def test_a_full_gate_waits_for_a_run_to_end_not_for_the_clock() -> None:
    book = TriggerBook()
    book.reconcile(tasks_of(trigger_tasks(min_interval_s=1.0, max_queue=1)))
    gate = book.gates["trig"]
    book.status_due(TOPICS, now=0.0)
    gate.offer("sensors/a/event", 1, now=0.0)  # runs
    gate.offer("sensors/b/event", 2, now=0.0)  # waits: one run in flight is the bound
    assert book.next_due(status=False) is None  # nothing the clock can start: no busy wake-ups
    book.mark("trig")
    assert book.next_due(status=True) == pytest.approx(1.0)  # the status topic, though
    assert [r.topic for r in gate.finished("sensors/a/event", ok=True, now=0.5)] == ["sensors/b/event"]
