"""Issue 11 for the MQTT door, against a real daemon and a real Mosquitto: a reload that turns MQTT
off leaves nothing registered; a bad request whose route is known is answered on that route;
clients cannot make the daemon publish into `$SYS`, another node's topics or Home Assistant's
(unless `mqtt.allow_reply_to` says so); credentials never reach the log."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProcess, merge, wait_status, write_config
from tests.mqtt_broker import MosquittoBroker, Probe
from tests.test_mqtt_daemon import mqtt_overrides, start_daemon, wait_online

NODE = "hard"
PREFIX = f"edgellm/{NODE}"
HUGE = int("1" + "0" * 399)  # a 400-digit integer


def wait_log(daemon: DaemonProcess, event: str, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in daemon.log_events() if e.get("event") == event]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"no {event} in the log"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, tiny_olmo_path: Path, broker: MosquittoBroker
) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("hard"), tiny_olmo_path, broker, NODE)
    yield d
    d.stop()


def test_a_huge_integer_in_a_float_field_is_answered_on_the_clients_route(
    daemon: DaemonProcess, broker: MosquittoBroker
) -> None:
    """Issue 11 §1: `temperature` with 400 digits: `invalid_request` with the request's id on the
    Response Topic, on `reply_to`, or on `<prefix>/response/<id>`, never on `<prefix>/error`."""
    payload = '{{"id":"{rid}","prompt":"hi","temperature":{huge}{extra}}}'
    rids = [f"huge-{kind}-{uuid.uuid4().hex[:6]}" for kind in ("rt", "reply", "default")]
    with Probe(broker, ["client/huge/#", f"{PREFIX}/response/#", f"{PREFIX}/error"]) as probe:
        probe.publish(f"{PREFIX}/request", payload.format(rid=rids[0], huge=HUGE, extra=""),
                      response_topic="client/huge/rt", correlation=b"c1")
        probe.publish(f"{PREFIX}/request",
                      payload.format(rid=rids[1], huge=HUGE, extra=',"reply_to":"client/huge/reply"'))
        probe.publish(f"{PREFIX}/request", payload.format(rid=rids[2], huge=HUGE, extra=""))
        errors = [probe.wait_final(rid, timeout=30) for rid in rids]
        time.sleep(0.3)
        by_topic = {m.topic: m for m in probe.messages}
    for error, rid in zip(errors, rids):
        assert error["event"] == "error" and error["id"] == rid, error
        assert error["code"] == "invalid_request", error
        assert len(error["message"]) < 300, error  # quotes at most a short prefix of the value
    assert json.loads(by_topic["client/huge/rt"].payload)["id"] == rids[0]
    assert by_topic["client/huge/rt"].correlation == b"c1"
    assert json.loads(by_topic["client/huge/reply"].payload)["id"] == rids[1]
    assert json.loads(by_topic[f"{PREFIX}/response/{rids[2]}"].payload)["id"] == rids[2]
    assert f"{PREFIX}/error" not in by_topic
    assert daemon.proc.poll() is None


@pytest.mark.parametrize(
    ("destination", "how"),
    [
        ("$SYS/broker/edgellm", "response_topic"),
        ("$SYS/broker/edgellm", "reply_to"),
        ("edgellm/other/response/x", "reply_to"),
        ("edgellm/other/request", "response_topic"),
        (f"{PREFIX}/request", "reply_to"),
        (f"{PREFIX}/ha/answer", "response_topic"),
        ("edgellm/fleet/request", "reply_to"),
        ("homeassistant/switch/evil/config", "reply_to"),
        ("client/+/wild", "reply_to"),
    ],
)
def test_a_client_cannot_route_answers_into_protected_topics(
    daemon: DaemonProcess, broker: MosquittoBroker, destination: str, how: str
) -> None:
    """Refused with `invalid_request` naming the field, answered on `<prefix>/response/<id>`; the
    protected topic gets nothing."""
    rid = f"dest-{uuid.uuid4().hex[:8]}"
    request: dict[str, Any] = {"id": rid, "prompt": "hi", "max_tokens": 2}
    watch = [f"{PREFIX}/response/{rid}"]
    if "+" not in destination:
        watch.append(destination)
    with Probe(broker, watch) as probe:
        if how == "reply_to":
            request["reply_to"] = destination
            probe.publish(f"{PREFIX}/request", request)
        else:
            probe.publish(f"{PREFIX}/request", request, response_topic=destination)
        error = probe.wait_final(rid, timeout=30)
        time.sleep(0.3)
        # What the daemon published (not the request itself, when we watch the request topic).
        topics = {m.topic for m in probe.messages if b'"event"' in m.payload}
    assert error["code"] == "invalid_request", error
    assert error["message"].startswith("reply_to:" if how == "reply_to" else "Response Topic:"), error
    assert topics == {f"{PREFIX}/response/{rid}"}, topics


def test_allow_reply_to_opens_a_protected_destination_on_reload(
    tmp_path: Path, tiny_olmo_path: Path, broker: MosquittoBroker
) -> None:
    node = "hub"
    overrides = mqtt_overrides(broker, node)
    config = write_config(tmp_path, tiny_olmo_path, overrides)
    with DaemonProcess(config) as daemon:
        daemon.wait_ready()
        wait_online(broker, f"edgellm/{node}")

        def ask(rid: str) -> dict[str, Any]:
            with Probe(broker, ["edgellm/hub2/inbox/#", f"edgellm/{node}/response/#"]) as probe:
                probe.publish(f"edgellm/{node}/request", {"id": rid, "prompt": "hi", "max_tokens": 2},
                              response_topic="edgellm/hub2/inbox/a")
                event = probe.wait_final(rid, timeout=30)
                return {"event": event, "topic": next(m.topic for m in probe.messages if m.json.get("id") == rid)}

        refused = ask("allow-1")
        assert refused["event"]["code"] == "invalid_request"
        assert refused["topic"] == f"edgellm/{node}/response/allow-1"
        write_config(tmp_path, tiny_olmo_path, merge(overrides, {"mqtt": {"allow_reply_to": ["edgellm/hub2/inbox/#"]}}))
        daemon.signal(signal.SIGHUP)
        wait_log(daemon, "mqtt.reconfigured")
        allowed = ask("allow-2")
        assert allowed["event"]["event"] == "done", allowed
        assert allowed["topic"] == "edgellm/hub2/inbox/a"


def test_a_reload_that_disables_mqtt_leaves_no_status_section_and_reenabling_brings_it_back(
    tmp_path: Path, tiny_olmo_path: Path, broker: MosquittoBroker
) -> None:
    """Issue 11 §1: SIGHUP with `mqtt.enabled = false` on a running daemon: `{"op":"status"}` has no
    `mqtt` section (the transport removed its section and its state listener), the broker holds
    `offline`; turning it on again registers a fresh one that connects."""
    node = "reload"
    overrides = mqtt_overrides(broker, node)
    config = write_config(tmp_path, tiny_olmo_path, overrides)
    with DaemonProcess(config) as daemon:
        daemon.wait_ready()
        wait_online(broker, f"edgellm/{node}")
        with daemon.client() as client:
            assert client.status()["mqtt"]["connected"] is True
            write_config(tmp_path, tiny_olmo_path, merge(overrides, {"mqtt": {"enabled": False}}))
            daemon.signal(signal.SIGHUP)
            wait_status(client, lambda s: "mqtt" not in s, timeout=30)
            # The worker's state changes must reach no stopped transport: a request still works.
            assert client.call({"prompt": "hi", "max_tokens": 2})["event"] == "done"
            assert "mqtt" not in client.status()
            with Probe(broker, [f"edgellm/{node}/availability"]) as probe:
                assert probe.wait_for(lambda m: m.retain, timeout=10)[0].payload == b"offline"
            write_config(tmp_path, tiny_olmo_path, overrides)
            daemon.signal(signal.SIGHUP)
            wait_status(client, lambda s: (s.get("mqtt") or {}).get("connected") is True, timeout=30)
    assert len([e for e in daemon.log_events() if e.get("event") == "mqtt.stopped"]) >= 2


def test_credentials_never_reach_the_log(tmp_path: Path, tiny_olmo_path: Path) -> None:
    """Issue 11 §6: a daemon with `mqtt.username` and `mqtt.password_file` against a Mosquitto with
    a password file, through a connect, a request, a broker restart and a reload that reconnects,
    and a reload with a wrong password (refused by the broker), at debug level: the password appears
    nowhere in its output."""
    password, wrong = "s3cret-Pa55-" + uuid.uuid4().hex, "wrong-" + uuid.uuid4().hex
    broker = MosquittoBroker(tmp_path / "broker", users={"edgellm-cred": password},
                             client_auth=("edgellm-cred", password))
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    with broker:
        overrides = merge(mqtt_overrides(broker, "cred"),
                          {"mqtt": {"username": "edgellm-cred", "password_file": str(password_file)}})
        config = write_config(tmp_path / "d", tiny_olmo_path, overrides)
        with DaemonProcess(config) as daemon:
            daemon.wait_ready()
            wait_online(broker, "edgellm/cred")
            with Probe(broker, ["client/cred"]) as probe:
                probe.publish("edgellm/cred/request", {"id": "c1", "prompt": "hi", "max_tokens": 2},
                              response_topic="client/cred")
                assert probe.wait_final("c1", timeout=30)["event"] == "done"
            broker.restart()
            wait_log(daemon, "mqtt.connected", count=2, timeout=60)
            write_config(tmp_path / "d", tiny_olmo_path, merge(overrides, {"mqtt": {"keepalive_s": 20}}))
            daemon.signal(signal.SIGHUP)
            wait_log(daemon, "mqtt.connected", count=3, timeout=60)
            password_file.write_text(wrong + "\n")
            write_config(tmp_path / "d", tiny_olmo_path, merge(overrides, {"mqtt": {"keepalive_s": 25}}))
            daemon.signal(signal.SIGHUP)
            wait_log(daemon, "mqtt.connect_refused", timeout=60)
            with daemon.client() as client:
                status = json.dumps(client.status())
        output = daemon.log()
    assert "edgellm-cred" in output  # the user name is logged (it says which account is used) ...
    for secret in (password, wrong):
        assert secret not in output and secret not in status  # ... the password never is
