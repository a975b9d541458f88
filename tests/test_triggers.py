"""Triggers (daemon/triggers.py): topic filters and the rate limiter / coalescer. Pure, clock injected."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.protocol import EdgeError
from daemon.tasks import compile_template
from daemon.triggers import (
    Outcome,
    Run,
    TriggerGate,
    filters_overlap,
    is_topic_filter,
    payload_input,
    publish_pattern,
    render_publish_topic,
    result_payload,
    topic_matches,
)

# --- topic filters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("frigate/events", "frigate/events", True),
        ("zigbee2mqtt/+/action", "zigbee2mqtt/button1/action", True),
        ("zigbee2mqtt/+/action", "zigbee2mqtt/a/b/action", False),
        ("home/#", "home", True),
        ("home/#", "home/a/b", True),
        ("#", "$SYS/broker", False),
        ("+/x", "$SYS/x", False),
        ("a/b", "a/b/c", False),
    ],
)
def test_topic_matching_follows_mqtt(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("a/+/c", "a/b/+", True),
        ("a/#", "a", True),
        ("edgellm/summary/#", "frigate/events", False),
        ("#", "anything/at/all", True),
        ("a/+", "a/b/c", False),
        ("x/y", "x/y", True),
    ],
)
def test_filters_overlap(a: str, b: str, overlap: bool) -> None:
    assert filters_overlap(a, b) is overlap
    assert filters_overlap(b, a) is overlap


@pytest.mark.parametrize("text", ["a/+/b", "#", "a/#", "+"])
def test_valid_filters(text: str) -> None:
    assert is_topic_filter(text)


@pytest.mark.parametrize("text", ["", "a/#/b", "a+/b", "a/b#", "a\x00"])
def test_invalid_filters(text: str) -> None:
    assert not is_topic_filter(text)


def test_a_placeholder_level_may_hold_anything_in_the_publish_pattern() -> None:
    assert publish_pattern(compile_template("edgellm/summary/{topic}", ("input", "topic"))) == "edgellm/summary/#"
    assert publish_pattern(compile_template("out/cam-{input.camera}/x")) == "out/#"
    assert publish_pattern(compile_template("fixed/topic")) == "fixed/topic"


def test_a_rendered_publish_topic_never_feeds_the_task_itself() -> None:
    template = compile_template("alerts/{input.where}")
    assert render_publish_topic(template, ("sensors/#",), {"input": {"where": "door"}}) == "alerts/door"
    with pytest.raises(EdgeError, match="own subscription"):
        render_publish_topic(template, ("alerts/+",), {"input": {"where": "door"}})
    with pytest.raises(EdgeError, match="not a topic name"):
        render_publish_topic(template, (), {"input": {"where": "#"}})


def test_payloads_become_json_values_or_text() -> None:
    assert payload_input(b'{"after": {"label": "person"}}') == {"after": {"label": "person"}}
    assert payload_input(b"single") == "single"
    assert payload_input(b"turn on the lamp") == "turn on the lamp"
    with pytest.raises(EdgeError):
        payload_input(b"\xff\xfe")


def test_result_payload_shape() -> None:
    done = {"event": "done", "text": '{"a":1}', "json": {"a": 1}, "timings": {"ttft_ms": 3}}
    assert result_payload("t", "in/x", done) == {"task": "t", "source_topic": "in/x", "text": '{"a":1}',
                                                 "json": {"a": 1}, "timings": {"ttft_ms": 3}}
    error = {"event": "error", "code": "queue_full", "message": "full"}
    assert result_payload("t", "in/x", error)["error"] == {"code": "queue_full", "message": "full"}


# --- the gate ------------------------------------------------------------------------------------


def adds_up(gate: TriggerGate) -> bool:
    c = gate.counters
    return c.received == c.run + c.coalesced + c.dropped + gate.pending


def test_first_message_runs_at_once_then_the_interval_holds_the_latest() -> None:
    gate = TriggerGate(min_interval_s=5.0, coalesce="latest", max_queue=4)
    outcome, runs = gate.offer("cam/door", 1, now=0.0)
    assert outcome is Outcome.RUN and runs == [Run("cam/door", 1)]
    assert gate.offer("cam/door", 2, now=0.5)[0] is Outcome.QUEUED
    assert gate.offer("cam/door", 3, now=0.6)[0] is Outcome.COALESCED  # 2 is replaced by 3
    assert gate.finished("cam/door", ok=True, now=1.0) == []  # finished, but the interval holds
    assert gate.next_due() == 5.0
    assert gate.due(4.9) == []
    assert gate.due(5.0) == [Run("cam/door", 3)]
    assert gate.status() == {"received": 3, "run": 2, "coalesced": 1, "dropped": 0, "failed": 0, "pending": 0,
                             "running": 1}
    assert adds_up(gate)


def test_source_topics_are_limited_separately() -> None:
    gate = TriggerGate(min_interval_s=10.0, coalesce="latest", max_queue=4)
    assert gate.offer("z/a/action", "x", 0.0)[0] is Outcome.RUN
    assert gate.offer("z/b/action", "y", 0.1)[0] is Outcome.RUN


def test_drop_mode_drops_what_cannot_run_now() -> None:
    gate = TriggerGate(min_interval_s=0.0, coalesce="drop", max_queue=4)
    assert gate.offer("t", 1, 0.0)[0] is Outcome.RUN
    assert gate.offer("t", 2, 0.1)[0] is Outcome.DROPPED  # one is running
    assert gate.finished("t", ok=False, now=0.2) == []
    assert gate.offer("t", 3, 0.3)[0] is Outcome.RUN
    assert gate.counters.failed == 1 and gate.counters.dropped == 1 and adds_up(gate)


def test_the_queue_bound_caps_runs_in_flight_and_waiting() -> None:
    gate = TriggerGate(min_interval_s=0.0, coalesce="latest", max_queue=2)
    outcomes = [gate.offer(f"dev/{i}", i, 0.0)[0] for i in range(6)]
    assert outcomes == [Outcome.RUN, Outcome.RUN, Outcome.QUEUED, Outcome.QUEUED, Outcome.DROPPED, Outcome.DROPPED]
    assert gate.in_flight == 2
    assert gate.finished("dev/0", ok=True, now=0.1) == [Run("dev/2", 2)]  # oldest waiting first
    assert adds_up(gate)


def test_fifty_messages_in_one_second_run_far_fewer_tasks_and_the_counts_add_up() -> None:
    gate = TriggerGate(min_interval_s=2.0, coalesce="latest", max_queue=4)
    runs: list[Run] = []
    now = 0.0
    for i in range(50):
        now = i * 0.02
        runs += gate.offer("zigbee2mqtt/button/action", {"n": i}, now)[1]
        for run in list(runs):
            if run.payload.get("done") is None:
                runs += gate.finished(run.topic, ok=True, now=now + 0.01)
                run.payload["done"] = True
    runs += gate.due(now + 2.0)
    assert len(runs) == 2  # the first, then the latest after the interval
    assert runs[-1].payload["n"] == 49  # coalescing keeps the newest
    assert gate.counters.received == 50 and gate.counters.coalesced == 48 and adds_up(gate)


def test_idle_topics_are_forgotten() -> None:
    gate = TriggerGate(min_interval_s=1.0, coalesce="latest", max_queue=4)
    for i in range(100):
        gate.offer(f"dev/{i}", i, 0.0)
        gate.finished(f"dev/{i}", ok=True, now=0.0)
    gate.due(5.0)
    assert gate._sources == {}


events = st.lists(
    st.tuples(st.sampled_from(["offer", "finish", "tick"]), st.sampled_from(["a", "b", "c"]),
              st.floats(min_value=0.0, max_value=3.0)),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(events, st.sampled_from(["latest", "drop"]), st.integers(1, 3), st.sampled_from([0.0, 0.5, 2.0]))
def test_counts_always_add_up_and_bounds_hold(ops: list[Any], coalesce: str, bound: int, interval: float) -> None:
    gate = TriggerGate(min_interval_s=interval, coalesce=coalesce, max_queue=bound)
    now = 0.0
    running: list[str] = []
    for op, topic, step in ops:
        now += step
        if op == "offer":
            _, started = gate.offer(topic, now, now)
        elif op == "finish" and running:
            started = gate.finished(running.pop(0), ok=step > 1.0, now=now)
        else:
            started = gate.due(now)
        running += [r.topic for r in started]
        assert adds_up(gate)
        assert gate.in_flight == len(running) <= bound and gate.pending <= bound
        assert gate.counters.failed <= gate.counters.run
        assert len(set(running)) == len(running)  # one run per source topic at a time


# --- the MQTT face of tasks (daemon/task_topics.py) -------------------------------------------------


def test_task_topics_and_their_home_assistant_entities() -> None:
    from daemon.task_topics import (
        result_topic,
        task_discovery_messages,
        task_name_of,
        task_removal_messages,
        task_subscription,
        task_topic,
    )
    from daemon.transports.mqtt.topics import make_topics

    topics = make_topics("pi", "", "host")
    assert task_topic(topics, "command") == "edgellm/pi/task/command"
    assert topic_matches(task_subscription(topics), task_topic(topics, "command"))
    assert not topic_matches(task_subscription(topics), result_topic(topics, "command"))
    assert task_name_of(topics, "edgellm/pi/task/command") == "command"
    assert task_name_of(topics, "edgellm/pi/task/command/result") is None
    messages = task_discovery_messages("homeassistant", topics, [("command", "A command")], "gemma", "0.1")
    by_topic = {m.topic: json.loads(m.payload) for m in messages}
    text = by_topic["homeassistant/text/edgellm_pi/task_command/config"]
    sensor = by_topic["homeassistant/sensor/edgellm_pi/task_command_result/config"]
    assert text["command_topic"] == "edgellm/pi/task/command" and text["device"]["identifiers"] == ["edgellm_pi"]
    assert sensor["state_topic"] == sensor["json_attributes_topic"] == "edgellm/pi/task/command/result"
    assert "[:255]" in sensor["value_template"]
    removed = task_removal_messages("homeassistant", topics, ["command"])
    assert {m.topic for m in removed} == set(by_topic) and all(m.payload == b"" for m in removed)
