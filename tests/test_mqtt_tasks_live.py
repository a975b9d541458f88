"""Tasks over MQTT end to end (issue 9 §2–§4): a real `edgellm serve` with the bundled Gemma 3 270M,
a private Mosquitto, `mosquitto_pub`/`mosquitto_rr` and paho clients.

Task calls on `edgellm/<node>/task/<name>` (plain text at QoS 0 from a 3.1.1 client, JSON with
`{input.field}`, MQTT 5 response topic and correlation data, `reply_to`, QoS 1 surviving a kill -9),
triggers on wildcard topics publishing schema-valid JSON, a coalescing trigger under a flood whose
counts add up (status and the retained status topic), and a SIGHUP that adds and removes tasks,
their subscriptions and their Home Assistant entities. The model is a base model: what is asserted
is structure (the grammar's work), never words. The module's tests share one daemon; the SIGHUP
test rewrites its config and runs last.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.helpers import DaemonProcess, merge, toml_dumps, wait_status, write_config
from tests.mqtt_broker import MosquittoBroker, Probe, Received
from tests.test_mqtt_daemon import mqtt_overrides, start_daemon, wait_online

NODE = "tk"
PREFIX = f"edgellm/{NODE}"
ROOM_SCHEMA = {
    "type": "object",
    "properties": {"room": {"enum": ["kitchen", "hall", "garage"]}, "alarm": {"type": "boolean"}},
    "required": ["room", "alarm"],
}
TASKS: dict[str, Any] = {
    "echo": {"description": "Says something", "prompt": "Say: {input}", "raw": True, "max_tokens": 4},
    "cam": {"prompt": "A {input.after.label} at the {input.after.camera}. It", "raw": True, "max_tokens": 4},
    "yes_no": {"prompt": "Is it day? Answer:", "raw": True, "grammar": 'root ::= "yes" | "no"', "max_tokens": 4},
    "room": {
        "prompt": "Event on {topic}: {input}. As JSON:", "raw": True, "max_tokens": 24,
        "json_schema": json.dumps(ROOM_SCHEMA),
        "subscribe": ["house/+/event"], "publish": "alerts/{topic}", "retain": True,
    },
    "flood": {
        "prompt": "Reading {input}:", "raw": True, "max_tokens": 2,
        "subscribe": ["meters/#"], "publish": "meters_out/last", "min_interval_s": 1.0, "coalesce": "latest",
        "max_queue": 2,
    },
}


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, gemma_path: Path, broker: MosquittoBroker
) -> Iterator[DaemonProcess]:
    extra = {"tasks": TASKS, "queue": {"max_depth": 16}, "mqtt": {"homeassistant": {"enabled": True}}}
    d = start_daemon(tmp_path_factory.mktemp("tasks-mqtt"), gemma_path, broker, NODE, extra)
    yield d
    d.stop()


def result(m: Received) -> dict[str, Any]:
    return dict(m.json)


def mosquitto(broker: MosquittoBroker, tool: str, *args: str, timeout: float = 120) -> str:
    done = subprocess.run([tool, "-h", broker.host, "-p", str(broker.port), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_plain_text_qos0_publish_from_a_311_client_is_answered_on_the_retained_result_topic(
    daemon: DaemonProcess, broker: MosquittoBroker
) -> None:
    topic = f"{PREFIX}/task/echo/result"
    with Probe(broker, [topic], protocol="3.1.1") as probe:
        # An ESP32 with PubSubClient: MQTT 3.1.1, QoS 0, no response topic, not JSON.
        mosquitto(broker, "mosquitto_pub", "-V", "mqttv311", "-q", "0", "-t", f"{PREFIX}/task/echo", "-m",
                  "hello from the porch")
        answer = result(probe.wait_for(lambda m: m.topic == topic and not m.retain)[0])
    assert set(answer) == {"task", "source_topic", "text", "json", "timings"}, answer
    assert answer["task"] == "echo" and answer["source_topic"] == f"{PREFIX}/task/echo"
    assert answer["text"] and answer["json"] is None
    # Retained: a sensor that subscribes later reads the last result.
    with Probe(broker, [topic]) as late:
        assert result(late.wait_for(lambda m: m.retain, timeout=10)[0]) == answer
    # Same task over the socket, same prompt, temperature 0: same text.
    with daemon.client() as c:
        assert c.call({"task": "echo", "input": "hello from the porch"})["text"] == answer["text"]


def test_a_json_payload_fills_input_fields_and_reply_to_routes_the_done_event(
    daemon: DaemonProcess, broker: MosquittoBroker
) -> None:
    event = {"type": "new", "after": {"camera": "garden", "label": "cat"}, "reply_to": "dev/cam/answer"}
    with Probe(broker, ["dev/cam/answer"], protocol="3.1.1") as probe:
        probe.publish(f"{PREFIX}/task/cam", json.dumps(event), qos=1)
        done = probe.wait_for(lambda m: True)[0].json
    assert done["event"] == "done" and done["text"], done
    with daemon.client() as c:
        same = c.call({"task": "cam", "input": {"after": {"camera": "garden", "label": "cat"}}})
    assert same["text"] == done["text"]  # reply_to is a route, not part of the input


def test_mosquitto_rr_and_the_response_topic_with_correlation_data(
    daemon: DaemonProcess, broker: MosquittoBroker
) -> None:
    out = mosquitto(broker, "mosquitto_rr", "-q", "1", "-W", "60", "-t", f"{PREFIX}/task/yes_no",
                    "-e", "rr/yes_no", "-m", "now")
    done = json.loads(out)
    assert done["event"] == "done" and done["text"] in ("yes", "no"), done
    with Probe(broker, ["client/t/inbox"]) as probe:
        probe.publish(f"{PREFIX}/task/yes_no", "now", response_topic="client/t/inbox", correlation=b"\x00c-9")
        message = probe.wait_for(lambda m: m.topic == "client/t/inbox")[0]
    assert message.correlation == b"\x00c-9" and not message.retain
    assert message.json["text"] in ("yes", "no")


def test_unknown_task_and_bad_input_are_structured_errors_and_the_daemon_keeps_serving(
    daemon: DaemonProcess, broker: MosquittoBroker
) -> None:
    with Probe(broker, ["client/e/inbox", f"{PREFIX}/task/cam/result"]) as probe:
        probe.publish(f"{PREFIX}/task/nope", "x", response_topic="client/e/inbox", correlation=b"k")
        error = probe.wait_for(lambda m: m.topic == "client/e/inbox")[0]
        assert error.correlation == b"k"
        assert error.json["code"] == "invalid_request"
        assert "known: cam, echo, flood, room, yes_no" in error.json["message"]
        probe.publish(f"{PREFIX}/task/cam", "not an object")  # the prompt needs {input.after.label}
        bad = probe.wait_for(lambda m: m.topic.endswith("/cam/result") and not m.retain)[0].json
    assert bad["task"] == "cam" and bad["error"]["code"] == "invalid_request"
    assert "{input.after" in bad["error"]["message"]
    with daemon.client() as c:
        assert c.call({"task": "yes_no", "input": ""})["text"] in ("yes", "no")


def test_a_trigger_on_a_wildcard_topic_publishes_schema_valid_json(
    daemon: DaemonProcess, broker: MosquittoBroker
) -> None:
    with Probe(broker, ["alerts/#"]) as probe:
        for room in ("kitchen", "garage"):
            probe.publish(f"house/{room}/event", {"smoke": room == "kitchen", "temperature": 21})
        found = probe.wait_for(lambda m: m.topic.startswith("alerts/"), count=2, timeout=120)
    assert {m.topic for m in found} == {"alerts/house/kitchen/event", "alerts/house/garage/event"}
    for m in found:
        answer = m.json
        assert set(answer) == {"task", "source_topic", "text", "json", "timings"}, answer
        assert answer["task"] == "room" and m.topic == f"alerts/{answer['source_topic']}"
        jsonschema.validate(answer["json"], ROOM_SCHEMA)
        assert json.loads(answer["text"]) == answer["json"]
    # retain = true: the last alert per topic stays for a late subscriber.
    with Probe(broker, ["alerts/house/garage/event"]) as late:
        assert late.wait_for(lambda m: m.retain, timeout=10)[0].json["source_topic"] == "house/garage/event"
    with daemon.client() as c:
        room = c.status()["tasks"]["triggers"]["room"]
    assert room["received"] == room["run"] == 2 and room["failed"] == 0


def test_a_flood_on_a_coalescing_trigger_runs_far_fewer_tasks_and_every_count_adds_up(
    daemon: DaemonProcess, broker: MosquittoBroker
) -> None:
    sent = 50
    with Probe(broker, ["meters_out/last", f"{PREFIX}/task/flood/status"]) as probe:
        start = time.monotonic()
        for i in range(sent):
            probe.client.publish(f"meters/{'ab'[i % 2]}", str(i), qos=1)
            time.sleep(max(0.0, start + (i + 1) / sent - time.monotonic()))  # 50 in one second
        burst_s = time.monotonic() - start
        with daemon.client() as c:
            s = wait_status(c, lambda s: (t := s["tasks"]["triggers"]["flood"])["received"] == sent
                            and t["pending"] == 0 and t["running"] == 0, timeout=120)
        counts = s["tasks"]["triggers"]["flood"]
        on_topic = probe.wait_for(lambda m: m.topic.endswith("/flood/status") and m.json["received"] == sent
                                  and m.json["running"] == 0 and m.json["pending"] == 0, timeout=10)[-1]
        outputs = probe.wait_for(lambda m: m.topic == "meters_out/last", count=counts["run"], timeout=30)
    print(f"\nflood: {sent} messages in {burst_s:.2f} s → {counts}")
    assert counts["run"] + counts["coalesced"] + counts["dropped"] + counts["pending"] == counts["received"] == sent
    assert 2 <= counts["run"] <= 12, counts  # far fewer than 50: one per source topic per second, plus the last
    assert counts["coalesced"] > 0 and counts["failed"] == 0
    assert on_topic.json == {"task": "flood", **counts}
    assert len(outputs) == counts["run"]
    assert {m.json["source_topic"] for m in outputs} == {"meters/a", "meters/b"}


def test_home_assistant_sees_each_task_as_a_text_and_a_sensor(daemon: DaemonProcess, broker: MosquittoBroker) -> None:
    text_topic = f"homeassistant/text/edgellm_{NODE}/task_echo/config"
    sensor_topic = f"homeassistant/sensor/edgellm_{NODE}/task_echo_result/config"
    with Probe(broker, [text_topic, sensor_topic]) as probe:
        found = {m.topic: m for m in probe.wait_for(lambda m: m.retain, count=2, timeout=10)}
    text, sensor = found[text_topic].json, found[sensor_topic].json
    assert text["command_topic"] == f"{PREFIX}/task/echo"
    assert sensor["state_topic"] == sensor["json_attributes_topic"] == f"{PREFIX}/task/echo/result"
    assert text["device"]["identifiers"] == [f"edgellm_{NODE}"] == sensor["device"]["identifiers"]
    # What Home Assistant's text entity sends is what it gets back on the sensor.
    with Probe(broker, [f"{PREFIX}/task/echo/result"]) as probe:
        probe.publish(f"{PREFIX}/task/echo", "from home assistant", qos=0)
        answer = probe.wait_for(lambda m: not m.retain)[0].json
    assert answer["text"]


def test_qos1_task_call_survives_a_kill_9_mid_answer_and_is_answered_once(
    tmp_path: Path, gemma_path: Path, broker: MosquittoBroker
) -> None:
    node = "tkill"
    slow = {"long": {"prompt": "Once upon a time, {input}", "raw": True, "max_tokens": 200},
            "short": {"prompt": "{input}", "raw": True, "max_tokens": 2}}
    config = write_config(tmp_path / "d", gemma_path, merge(mqtt_overrides(broker, node), {"tasks": slow}))
    first = DaemonProcess(config)
    first.wait_ready()
    wait_online(broker, f"edgellm/{node}")
    inbox = "client/kill/inbox"
    with Probe(broker, [inbox]) as probe:
        probe.publish(f"edgellm/{node}/task/long", {"hero": "a fox", "reply_to": inbox}, qos=1)
        probe.publish(f"edgellm/{node}/task/short", {"x": "b", "reply_to": inbox}, qos=1)
        with first.client() as c:
            wait_status(c, lambda s: s["mqtt"]["inflight"] >= 2, timeout=30)  # both submitted, `long` generating
        time.sleep(0.5)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        assert [m for m in probe.messages if m.topic == inbox] == []  # nothing was answered yet
        second = DaemonProcess(config)
        try:
            second.wait_ready()
            answers = probe.wait_for(lambda m: m.topic == inbox, count=2, timeout=300)
            time.sleep(1.0)  # room for a duplicate to show up, if there were one
            answers = [m for m in probe.messages if m.topic == inbox]
        finally:
            second.stop()
    first.stop()
    assert len(answers) == 2, answers
    assert all(m.json["event"] == "done" for m in answers)
    assert {m.json["usage"]["completion_tokens"] <= 2 for m in answers} == {True, False}


def test_sighup_adding_and_removing_tasks_moves_topics_and_home_assistant_entities(
    daemon: DaemonProcess, broker: MosquittoBroker
) -> None:
    config = daemon.config_path.read_text()
    tasks = {k: v for k, v in TASKS.items() if k != "echo"}
    tasks["fresh"] = {"description": "New", "prompt": "New: {input}", "raw": True, "max_tokens": 3}
    tasks["room"] = {**TASKS["room"], "subscribe": ["yard/+/event"]}
    gone_text = f"homeassistant/text/edgellm_{NODE}/task_echo/config"
    new_text = f"homeassistant/text/edgellm_{NODE}/task_fresh/config"
    head = config[: config.index("\n[tasks")]
    with Probe(broker, ["homeassistant/#", f"{PREFIX}/task/echo/result", f"{PREFIX}/error", "alerts/#"]) as probe:
        time.sleep(0.5)  # the retained messages arrive first
        since = len(probe.messages)
        daemon.config_path.write_text(head + "\n" + toml_dumps({"tasks": tasks}))
        daemon.signal(signal.SIGHUP)
        with daemon.client() as c:
            wait_status(c, lambda s: "fresh" in s["tasks"]["names"], timeout=30)

        def after(m: Received) -> bool:
            return probe.messages.index(m) >= since

        removed = probe.wait_for(lambda m: after(m) and m.topic == gone_text and m.payload == b"", timeout=10)
        added = probe.wait_for(lambda m: after(m) and m.topic == new_text and m.payload != b"", timeout=10)
        probe.wait_for(lambda m: after(m) and m.topic == f"{PREFIX}/task/echo/result" and m.payload == b"",
                       timeout=10)
        assert added[0].json["command_topic"] == f"{PREFIX}/task/fresh" and removed
        # The removed task is unknown now; the new one answers; the trigger listens where it now says.
        probe.publish(f"{PREFIX}/task/echo", "x")
        assert "unknown task \"echo\"" in probe.wait_for(lambda m: m.topic == f"{PREFIX}/error")[0].json["message"]
        out = json.loads(mosquitto(broker, "mosquitto_rr", "-W", "60", "-t", f"{PREFIX}/task/fresh", "-e", "rr/f",
                                   "-m", "hi"))
        assert out["event"] == "done"
        probe.publish("house/kitchen/event", {"smoke": True})
        probe.publish("yard/shed/event", {"smoke": False})
        moved = probe.wait_for(lambda m: after(m) and m.topic.startswith("alerts/") and not m.retain, timeout=120)
        time.sleep(1.0)
        alerts = [m.topic for m in probe.messages if after(m) and m.topic.startswith("alerts/") and not m.retain]
    assert moved and alerts == ["alerts/yard/shed/event"]
    with Probe(broker, [gone_text]) as late:
        time.sleep(0.5)
        assert not [m for m in late.messages if m.payload]  # no retained config left for the removed task
