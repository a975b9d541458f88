"""The MQTT door end to end: a real `edgellm serve` with the real Gemma 3 270M model, driven over
a private Mosquitto (its own port, config and persistence) by paho clients and `mosquitto_rr`.

These tests share one daemon and one broker; the ones that kill, restart or reconfigure
something are in `test_mqtt_recovery.py`.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProcess, merge, write_config
from tests.mqtt_broker import MosquittoBroker, Probe, Received

ONCE = "Once upon a time, there was a little"
NODE = "e2e"
PREFIX = f"edgellm/{NODE}"
MAX_PAYLOAD = 2048


def mqtt_overrides(broker: MosquittoBroker, node_id: str, **mqtt: Any) -> dict[str, Any]:
    """Config overrides for a test daemon that talks to `broker` (fast reconnects for tests)."""
    base = {
        "enabled": True,
        "host": broker.host,
        "port": broker.port,
        "node_id": node_id,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
        "status_interval_s": 5.0,
    }
    return {"mqtt": merge(base, mqtt)}


def wait_online(broker: MosquittoBroker, prefix: str, timeout: float = 30.0) -> None:
    """`online` on the availability topic: the daemon is connected and subscribed."""
    with Probe(broker, [f"{prefix}/availability"]) as probe:
        probe.wait_for(lambda m: m.payload == b"online", timeout=timeout)


def start_daemon(
    tmp: Path, model: Path, broker: MosquittoBroker, node_id: str, overrides: dict[str, Any] | None = None
) -> DaemonProcess:
    config = write_config(tmp, model, merge(mqtt_overrides(broker, node_id), overrides or {}))
    daemon = DaemonProcess(config)
    try:
        daemon.wait_ready()
        wait_online(broker, f"edgellm/{node_id}")
    except BaseException:
        daemon.stop()
        raise
    return daemon


def finished(daemon: DaemonProcess, request_id: str) -> list[dict[str, Any]]:
    """The daemon's one-per-request summary log lines for this id that generated text."""
    return [
        e
        for e in daemon.log_events()
        if e.get("event") == "request.finished"
        and e.get("id") == request_id
        and e.get("finish_reason") in ("stop", "length", "cancelled")
    ]


def new_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, gemma_path: Path, broker: MosquittoBroker
) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("mqtt-daemon")
    d = start_daemon(
        tmp, gemma_path, broker, NODE, {"mqtt": {"max_payload_bytes": MAX_PAYLOAD}, "queue": {"max_depth": 16}}
    )
    yield d
    d.stop()


def test_mqtt5_response_topic_and_correlation_data(daemon: DaemonProcess, broker: MosquittoBroker) -> None:
    rid = new_id("rt")
    with Probe(broker, ["client/a/inbox"]) as probe:
        probe.publish(
            f"{PREFIX}/request",
            {"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 8},
            response_topic="client/a/inbox",
            correlation=b"\x00corr-1",
        )
        done = probe.wait_final(rid)
        message = probe.wait_for(lambda m: m.topic == "client/a/inbox")[0]
    assert done["event"] == "done", done
    assert done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 8
    assert done["seq"] == 1
    assert message.correlation == b"\x00corr-1"
    # Same protocol, same model, temperature 0: the socket gives the same text.
    with daemon.client() as c:
        over_socket = c.call({"prompt": ONCE, "raw": True, "max_tokens": 8})
    assert over_socket["text"] == done["text"]


def test_stock_mosquitto_rr_gets_the_answer(daemon: DaemonProcess, broker: MosquittoBroker) -> None:
    rid = new_id("rr")
    result = subprocess.run(
        [
            "mosquitto_rr", "-h", broker.host, "-p", str(broker.port), "-q", "1", "-W", "60",
            "-t", f"{PREFIX}/request", "-e", f"rr/{rid}",
            "-m", json.dumps({"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 8}),
        ],
        capture_output=True, text=True, timeout=90, check=False,
    )
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["id"] == rid
    assert done["event"] == "done"
    assert done["text"]


def test_mqtt311_client_routes_with_reply_to(daemon: DaemonProcess, broker: MosquittoBroker) -> None:
    rid = new_id("v311")
    with Probe(broker, ["dev/311/answer"], protocol="3.1.1") as probe:
        probe.publish(
            f"{PREFIX}/request", {"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 8, "reply_to": "dev/311/answer"}
        )
        done = probe.wait_final(rid)
        assert [m.topic for m in probe.messages] == ["dev/311/answer"]
    assert done["event"] == "done"
    assert done["text"]


def test_default_response_topic_is_prefix_response_id(daemon: DaemonProcess, broker: MosquittoBroker) -> None:
    rid = new_id("def")
    with Probe(broker, [f"{PREFIX}/response/#"], protocol="3.1.1") as probe:
        probe.publish(f"{PREFIX}/request", {"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 4})
        done = probe.wait_final(rid)
        assert {m.topic for m in probe.messages} == {f"{PREFIX}/response/{rid}"}
    assert done["event"] == "done"


def test_streaming_tokens_in_order_with_seq_then_done(daemon: DaemonProcess, broker: MosquittoBroker) -> None:
    rid = new_id("stream")
    with Probe(broker, ["client/stream"]) as probe:
        probe.publish(
            f"{PREFIX}/request",
            {"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 12, "stream": True},
            response_topic="client/stream",
        )
        probe.wait_final(rid)
        events = probe.events(rid)
        qos = {m.json["event"]: m.qos for m in probe.messages if m.json.get("id") == rid}
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "done"
    assert set(kinds[:-1]) <= {"queued", "token"}
    assert kinds.count("token") >= 8
    # Subscribed at QoS 1: the stream comes at QoS 0 (best effort, `seq` shows gaps), the answer at 1.
    assert qos["token"] == 0 and qos["done"] == 1, qos
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    tokens = "".join(e["text"] for e in events if e["event"] == "token")
    assert tokens == events[-1]["text"]


def test_token_interval_merges_the_stream_into_fewer_events_in_order(
    tmp_path: Path, gemma_path: Path, broker: MosquittoBroker
) -> None:
    """`mqtt.token_interval_ms`: at most one `token` event per interval, each with the text since the
    last; the first at once, the held text before `done`, `seq` without gaps, nothing lost."""
    overrides = {"mqtt": {"token_interval_ms": 150, "homeassistant": {"enabled": False}}}  # no retained discovery
    daemon = start_daemon(tmp_path / "paced", gemma_path, broker, "paced", overrides)
    rid = new_id("paced")
    try:
        with Probe(broker, ["client/paced"]) as probe:
            probe.publish(
                "edgellm/paced/request",
                {"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 40, "stream": True, "temperature": 0},
                response_topic="client/paced",
            )
            done = probe.wait_final(rid)
            events = probe.events(rid)
            arrived = [m.at for m in probe.messages if m.json.get("id") == rid and m.json.get("event") == "token"]
        with daemon.client() as c:
            solo = list(c.request({"prompt": ONCE, "raw": True, "max_tokens": 40, "stream": True, "temperature": 0}))
    finally:
        daemon.stop()
    tokens = [e for e in events if e["event"] == "token"]
    assert done["event"] == "done" and done["usage"]["completion_tokens"] == 40, done
    assert 2 <= len(tokens) < 40, [t["text"] for t in tokens]
    # One per interval: only the last (the held text, sent before `done`) may follow sooner.
    gaps = [b - a for a, b in zip(arrived, arrived[1:])][:-1]
    assert gaps and min(gaps) > 0.1, gaps
    assert "".join(t["text"] for t in tokens) == done["text"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    # The first event is the first token alone (sent at once); the socket streams every token.
    socket_tokens = [e["text"] for e in solo if e["event"] == "token"]
    assert tokens[0]["text"] == socket_tokens[0] and len(socket_tokens) == 40


def test_four_parallel_streams_over_mqtt_each_arrive_exactly_once_in_order(
    tmp_path: Path, gemma_path: Path, broker: MosquittoBroker
) -> None:
    """The shipped default, `engine.parallel = 4`, behind the MQTT door: four streams decode at once;
    each one's `seq` has no gaps, its tokens concatenate to its own answer, one final each, and at
    temperature 0 they agree on what is guaranteed in a batch (the first 16 tokens)."""
    overrides = {"engine": {"parallel": 4}, "mqtt": {"homeassistant": {"enabled": False}}}
    daemon = start_daemon(tmp_path / "par", gemma_path, broker, "par", overrides)
    ids = [new_id(f"par{i}") for i in range(4)]
    request = {"prompt": ONCE, "raw": True, "max_tokens": 24, "stream": True, "temperature": 0}
    most_running = 0
    try:
        with Probe(broker, ["client/par"]) as probe, daemon.client() as c:
            for rid in ids:
                probe.publish("edgellm/par/request", {"id": rid, **request}, response_topic="client/par")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                status = c.status()
                most_running = max(most_running, len(status["engine"]["running"]))
                if most_running and not status["engine"]["running"] and not status["queue"]["depth"]:
                    break
                time.sleep(0.02)
            finals = [probe.wait_final(rid) for rid in ids]
            streams = [probe.events(rid) for rid in ids]
    finally:
        daemon.stop()
    assert most_running >= 2, "the four requests never decoded together"
    token_lists = []
    for rid, final, events in zip(ids, finals, streams):
        assert final["event"] == "done" and final["usage"]["completion_tokens"] == 24, final
        assert [e["event"] for e in events].count("done") == 1 and events[-1]["event"] == "done", rid
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), rid
        tokens = [e["text"] for e in events if e["event"] == "token"]
        assert "".join(tokens) == final["text"], rid
        token_lists.append(tokens)
    assert all(t[:16] == token_lists[0][:16] for t in token_lists), token_lists


def test_bad_payloads_get_structured_errors_and_the_daemon_keeps_serving(
    daemon: DaemonProcess, broker: MosquittoBroker
) -> None:
    bad: list[tuple[bytes, str]] = [
        (b"this is not json", "invalid_json"),
        (b'{"prompt": "caf\xe9"}', "invalid_json"),  # Latin-1, not UTF-8
        (b"\x00\xff\xfe\x01", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2, 3]", "invalid_request"),
        (b'{"id": "w1", "prompt": 5}', "invalid_request"),
        (b'{"id": "w2", "prompt": "x", "max_token": 3}', "invalid_request"),
        (b'{"id": "w3", "prompt": "x", "temperature": "hot"}', "invalid_request"),
        (b'{"id": "w4"}', "invalid_request"),
        (json.dumps({"id": "w5", "prompt": "x" * (MAX_PAYLOAD + 10)}).encode(), "payload_too_large"),
    ]
    too_large = len(bad[-1][0])
    with Probe(broker, ["client/bad", f"{PREFIX}/error"]) as probe:
        for index, (payload, _code) in enumerate(bad):
            probe.publish(f"{PREFIX}/request", payload, response_topic="client/bad", correlation=str(index).encode())
        errors = probe.wait_for(lambda m: m.topic == "client/bad", count=len(bad), timeout=30)
        by_correlation = {m.correlation: m.json for m in errors}
        for index, (_payload, code) in enumerate(bad):
            event = by_correlation[str(index).encode()]
            assert event["event"] == "error", event
            assert event["code"] == code, (index, event)
            assert event["message"]
        assert by_correlation[b"5"]["id"] == "w1" and "prompt" in by_correlation[b"5"]["message"]
        assert "max_token" in by_correlation[b"6"]["message"]
        # The payload was dropped as it arrived; the answer still says how large it was.
        assert f"payload is {too_large} bytes" in by_correlation[str(len(bad) - 1).encode()]["message"]

        # A cancel over the limit: refused the same way, on its Response Topic.
        probe.publish(f"{PREFIX}/cancel", b"x" * (MAX_PAYLOAD + 1), response_topic="client/bad", correlation=b"big")
        big = probe.wait_for(lambda m: m.topic == "client/bad" and m.correlation == b"big", timeout=30)[0].json
        assert big["event"] == "error" and big["code"] == "payload_too_large", big

        # Without any route (3.1.1, not JSON): the error topic.
        with Probe(broker, protocol="3.1.1") as old:
            old.publish(f"{PREFIX}/request", b"\xff garbage")
        on_error_topic = probe.wait_for(lambda m: m.topic == f"{PREFIX}/error")[0].json
        assert on_error_topic["code"] == "invalid_json"

        # Still connected, still answering.
        rid = new_id("after")
        probe.publish(
            f"{PREFIX}/request", {"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 4}, response_topic="client/bad"
        )
        assert probe.wait_final(rid)["event"] == "done"
    assert daemon.proc.poll() is None
    with daemon.client() as c:
        mqtt = c.status()["mqtt"]
    assert mqtt["connected"] is True
    assert mqtt["connects"] == 1  # never dropped the connection over a payload
    assert mqtt["rejected"] >= len(bad) + 1


def test_duplicate_id_gets_the_same_answer_from_one_generation(daemon: DaemonProcess, broker: MosquittoBroker) -> None:
    rid = new_id("dup")
    request = {"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 48}
    with Probe(broker, ["client/dup/#"]) as probe:
        # The same id twice while it is generating (a retry, or a broker redelivery) ...
        probe.publish(f"{PREFIX}/request", request, response_topic="client/dup/a")
        probe.publish(f"{PREFIX}/request", request, response_topic="client/dup/b")
        first = probe.wait_for(lambda m: m.topic == "client/dup/a")[0].json
        second = probe.wait_for(lambda m: m.topic == "client/dup/b")[0].json
        # ... and once more after it was answered: from the journal.
        probe.publish(f"{PREFIX}/request", request, response_topic="client/dup/c")
        third = probe.wait_for(lambda m: m.topic == "client/dup/c")[0].json
        time.sleep(0.5)
        assert len([m for m in probe.messages if m.topic == "client/dup/a"]) == 1
    assert first["event"] == "done"
    assert first == second == third
    assert len(finished(daemon, rid)) == 1, "generated more than once"
    with daemon.client() as c:
        mqtt = c.status()["mqtt"]
    assert mqtt["duplicates"] >= 1 and mqtt["replayed"] >= 1


def test_expired_message_is_dropped_with_deadline_exceeded_and_cancel_stops_a_generation(
    daemon: DaemonProcess, broker: MosquittoBroker
) -> None:
    long_id, expiring_id = new_id("long"), new_id("exp")
    with Probe(broker, ["client/exp"]) as probe:
        probe.publish(
            f"{PREFIX}/request",
            {"id": long_id, "prompt": ONCE, "raw": True, "max_tokens": 1000, "stream": True},
            response_topic="client/exp",
        )
        probe.wait_for(lambda m: m.json.get("event") == "token")
        # Waits behind the long one; its MQTT message expiry (1 s) passes before it can start.
        probe.publish(
            f"{PREFIX}/request",
            {"id": expiring_id, "prompt": ONCE, "raw": True, "max_tokens": 4},
            response_topic="client/exp",
            expiry_s=1,
        )
        time.sleep(1.5)
        probe.publish(f"{PREFIX}/cancel", {"id": long_id})
        long_final = probe.wait_final(long_id, timeout=30)
        expired = probe.wait_final(expiring_id, timeout=30)
    assert long_final["event"] == "done" and long_final["finish_reason"] == "cancelled", long_final
    assert long_final["usage"]["completion_tokens"] < 1000
    assert expired["event"] == "error"
    assert expired["code"] == "deadline_exceeded"
    assert not finished(daemon, expiring_id)


def test_status_is_retained_json(daemon: DaemonProcess, broker: MosquittoBroker) -> None:
    with Probe(broker, [f"{PREFIX}/status", f"{PREFIX}/availability"]) as probe:
        status_msg = probe.wait_for(lambda m: m.topic == f"{PREFIX}/status")[0]
        availability = probe.wait_for(lambda m: m.topic == f"{PREFIX}/availability")[0]
    assert status_msg.retain and availability.retain
    assert availability.payload == b"online"
    status = status_msg.json
    assert status["state"] == "ready"
    assert status["model"]["name"]
    assert status["version"]
    assert {"depth", "max_depth"} <= set(status["queue"])
    assert "uptime_s" in status and "last_tokens_per_second" in status
    assert status["mqtt"]["connected"] is True


def test_home_assistant_discovery_resent_on_ha_online_and_text_prompt_answers(
    daemon: DaemonProcess, broker: MosquittoBroker
) -> None:
    def is_config(m: Received) -> bool:
        return m.topic.startswith("homeassistant/") and m.topic.endswith("/config")

    with Probe(broker, ["homeassistant/+/+/+/config"]) as probe:
        retained = probe.wait_for(lambda m: is_config(m) and m.retain, count=5)
        configs = {m.topic: m.json for m in retained}
        assert len(configs) == 5
        for topic, config in configs.items():
            assert config["unique_id"] and config["name"]
            assert config["availability_topic"] == f"{PREFIX}/availability"
            assert config["device"]["identifiers"] == [f"edgellm_{NODE}"]
            assert config["device"]["model"]  # the loaded model's name
            key = "command_topic" if "/text/" in topic else "state_topic"
            assert config[key].startswith(PREFIX + "/")
        # Home Assistant restarted: it says `online`, we announce ourselves again.
        probe.publish("homeassistant/status", b"online", qos=0)
        again = probe.wait_for(lambda m: is_config(m) and not m.retain, count=5, timeout=10)
        assert {m.topic for m in again} == set(configs)

    with Probe(broker, [f"{PREFIX}/ha/answer"]) as probe:
        probe.publish(f"{PREFIX}/ha/prompt", b"Say hello to the kitchen.")
        answer = probe.wait_for(lambda m: m.json.get("event") == "done", timeout=60)[0].json
    assert answer["text"]
    # Retained, so the last-answer sensor has it after a Home Assistant restart too.
    with Probe(broker, [f"{PREFIX}/ha/answer"]) as later:
        assert later.wait_for(lambda m: m.retain, timeout=10)[0].json["id"] == answer["id"]
