"""The bounded inbox, in-process against a real Mosquitto with a fake `Backend` that answers at once.

The dispatcher is held busy while a client floods the request topic with QoS 0 junk and then
publishes QoS 1 requests (the inbox bound is lowered to 40 for the test; the broker keeps at most
20 unacknowledged QoS 1 messages in flight to one client, Mosquitto's default). What does not fit is
refused — counted, logged, not acknowledged — and once the inbox has drained the transport drops
its connection so the broker sends the refused QoS 1 requests again: every one is answered, each
generated once (a copy the client gets twice, as QoS 1 allows, is the same answer)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.config import GenerationConfig, MqttConfig
from daemon.protocol import DoneEvent, Origin, Request
from daemon.transports.mqtt import transport as transport_module
from daemon.transports.mqtt.transport import MqttTransport
from tests.mqtt_broker import MosquittoBroker, Probe

COUNT = 30
INBOX = 40
JUNK = 60


class InstantBackend:
    """The `Backend` interface, answering every request at once with its prompt."""

    defaults = GenerationConfig()

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.sections: dict[str, Any] = {}
        self.listeners: list[Any] = []

    def submit(self, request: Request, sink: Any, origin: Origin) -> None:
        self.submitted.append(request.id)
        sink.emit(DoneEvent(request.id, f"echo {request.prompt}", "stop"))

    def cancel(self, request_id: str) -> bool:
        return False

    def status(self) -> dict[str, Any]:
        return {"state": "ready", "model": {"name": "fake"}}

    def add_status_section(self, name: str, provider: Any) -> None:
        self.sections[name] = provider

    def remove_status_section(self, name: str) -> None:
        self.sections.pop(name, None)

    def add_state_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def remove_state_listener(self, listener: Any) -> None:
        self.listeners.remove(listener)

    def can_accept(self) -> bool:
        return True


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path / "broker") as b:
        yield b


def wait_subscribed(mqtt: MqttTransport, probe: Probe, node: str) -> None:
    """Connected, and the broker has applied the door's subscriptions: `connected` comes with the
    CONNACK, before the SUBACK, and a request published in between has no subscriber (it is gone).
    A cancel's answer proves it: cancel and request are one SUBSCRIBE."""
    deadline = time.monotonic() + 10
    while not mqtt.status_section()["connected"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while True:
        probe.publish(f"edgellm/{node}/cancel", {"id": "probe"}, response_topic=f"client/{node}")
        try:
            probe.wait_for(lambda m: m.topic == f"client/{node}" and b'"cancel"' in m.payload, timeout=0.5)
            return
        except TimeoutError:
            assert time.monotonic() < deadline


@contextlib.contextmanager
def dispatcher_held(mqtt: MqttTransport) -> Iterator[None]:
    """The dispatcher busy on a call until the block ends: the inbox fills meanwhile."""
    gate = threading.Event()
    blocked = threading.Thread(target=mqtt._call, args=(lambda: gate.wait(30),), kwargs={"timeout": 30})
    blocked.start()
    try:
        yield
    finally:
        gate.set()
        blocked.join()


def test_what_the_full_inbox_refuses_is_redelivered_and_answered_once(
    tmp_path: Path, broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport_module, "INBOX_MAX", INBOX)
    cfg = MqttConfig(host=broker.host, port=broker.port, node_id="ovl", reconnect_min_s=0.1, reconnect_max_s=0.2)
    backend = InstantBackend()
    mqtt = MqttTransport(cfg, backend, state_dir=tmp_path / "state", version="test")
    with capture_logs() as logs:
        mqtt.start()
        try:
            with Probe(broker, ["client/ovl"]) as probe:
                wait_subscribed(mqtt, probe, "ovl")
                with dispatcher_held(mqtt):
                    for _ in range(JUNK):
                        probe.publish("edgellm/ovl/request", b"junk", qos=0)
                    for i in range(COUNT):
                        probe.publish("edgellm/ovl/request", {"id": f"o{i}", "prompt": str(i)},
                                      response_topic="client/ovl")
                    deadline = time.monotonic() + 10
                    while mqtt.status_section()["inbox_refused"] == 0:
                        assert time.monotonic() < deadline, mqtt.status_section()
                        time.sleep(0.05)
                for i in range(COUNT):
                    probe.wait_final(f"o{i}", timeout=30)
                time.sleep(0.5)
                answers = {i: {json.dumps(e, sort_keys=True) for e in probe.events(f"o{i}")} for i in range(COUNT)}
            section = mqtt.status_section()
        finally:
            mqtt.stop()
    assert all(len(distinct) == 1 for distinct in answers.values()), answers
    assert sorted(backend.submitted) == sorted(f"o{i}" for i in range(COUNT))  # each generated once
    assert section["inbox_refused"] > 0 and section["redelivery_reconnects"] >= 1, section
    assert section["inbox"]["max"] == INBOX
    assert any(e["event"] == "mqtt.inbox_full" for e in logs)
    assert "mqtt" not in backend.sections and backend.listeners == []  # stop() unregistered both
    print(f"refused {section['inbox_refused']}, redelivery reconnects {section['redelivery_reconnects']}")


def test_an_inbox_full_of_bytes_makes_paho_wait_and_nothing_is_refused(
    tmp_path: Path, broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 60 KB requests against a 150 KB byte bound: while the dispatcher is held busy, at most two
    # wait in the inbox and paho reads no further (the broker keeps the rest); once it drains,
    # every request is answered, none refused, on the one connection.
    bound, size, count = 150_000, 60_000, 8
    monkeypatch.setattr(transport_module, "INBOX_MAX_BYTES", bound)
    cfg = MqttConfig(host=broker.host, port=broker.port, node_id="ovb", reconnect_min_s=0.1, reconnect_max_s=0.2)
    backend = InstantBackend()
    mqtt = MqttTransport(cfg, backend, state_dir=tmp_path / "state", version="test")
    mqtt.start()
    try:
        with Probe(broker, ["client/ovb"]) as probe:
            wait_subscribed(mqtt, probe, "ovb")
            seen: list[dict[str, Any]] = []
            with dispatcher_held(mqtt):
                for i in range(count):
                    probe.publish("edgellm/ovb/request", {"id": f"b{i}", "prompt": "x" * size},
                                  response_topic="client/ovb")
                deadline = time.monotonic() + 1.0  # well inside INBOX_WAIT_S: nothing may be refused
                while time.monotonic() < deadline:
                    seen.append(mqtt.status_section()["inbox"])
                    time.sleep(0.05)
            for i in range(count):
                assert probe.wait_final(f"b{i}", timeout=30)["event"] == "done"
        section = mqtt.status_section()
    finally:
        mqtt.stop()
    assert max(s["messages"] for s in seen) == 2, seen  # two fit in 150 KB, the third waits at paho
    assert all(s["bytes"] <= bound for s in seen), seen
    assert section["inbox_refused"] == 0 and section["connects"] == 1, section
    assert sorted(backend.submitted) == sorted(f"b{i}" for i in range(count))
