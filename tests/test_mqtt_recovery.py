"""No lost prompts: daemons killed with SIGKILL, brokers restarted or down, fleets that shrink.

Each test runs its own private Mosquitto (persistence on, so a restart keeps sessions) and real
`edgellm serve` processes with the real model.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from daemon.transports.mqtt.topics import FLEET_HOPS_PROPERTY, FLEET_MAX_HOPS
from tests.helpers import DaemonProcess, merge, write_config
from tests.mqtt_broker import MosquittoBroker, Probe, free_port
from tests.test_mqtt_daemon import ONCE, mqtt_overrides, start_daemon, wait_online

pytestmark = pytest.mark.slow
NO_MATCHING_SUBSCRIBERS = 16


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path / "broker") as b:
        yield b


def log_events(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """The JSON log lines of a daemon, also after it exited (or was killed)."""
    out = []
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def generated(daemon: DaemonProcess, request_id: str) -> int:
    """How many times this daemon finished generating text for the id."""
    return sum(
        1
        for e in log_events(daemon)
        if e.get("event") == "request.finished"
        and e.get("id") == request_id
        and e.get("finish_reason") in ("stop", "length", "cancelled")
    )


def status(daemon: DaemonProcess) -> dict[str, Any]:
    with daemon.client(timeout=10) as c:
        return c.status()


def wait_until(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def logged(daemon: DaemonProcess, event: str, **fields: Any) -> list[dict[str, Any]]:
    """The daemon's log events of one kind whose fields match."""
    return [
        e for e in log_events(daemon) if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
    ]


def member(daemon: DaemonProcess) -> bool:
    return bool(status(daemon)["mqtt"]["fleet"]["member"])


def _mqtt_string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _mqtt_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + _mqtt_varint(len(body)) + body


def _read_mqtt_packet(sock: socket.socket) -> tuple[int, bytes]:
    """One packet from the broker: (first byte, body)."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
        return data

    first = exactly(1)[0]
    length, shift = 0, 0
    while True:
        digit = exactly(1)[0]
        length |= (digit & 0x7F) << shift
        shift += 7
        if not digit & 0x80:
            break
    return first, exactly(length)


def publish_burst(
    broker: MosquittoBroker, topic: str, messages: list[tuple[dict[str, Any], int]], inbox: str
) -> list[int]:
    """Publish (request, hops) pairs at QoS 1 in ONE socket write, so the broker holds them all
    before the subscriber can react to the first (paho writes each publish as it is called, and a
    member whose queue fills unsubscribes from the fleet: with separate writes its UNSUBSCRIBE can
    reach the broker before the last publishes do). Returns the PUBACK reason codes, in order."""
    with socket.create_connection((broker.host, broker.port), timeout=10) as sock:
        connect_header = _mqtt_string("MQTT") + bytes([5, 0x02]) + (30).to_bytes(2, "big") + _mqtt_varint(0)
        sock.sendall(_mqtt_packet(0x10, connect_header + _mqtt_string(f"burst-{time.monotonic_ns()}")))
        kind, body = _read_mqtt_packet(sock)
        assert kind == 0x20 and body[1] == 0, ("CONNACK", kind, body)
        burst = b""
        for packet_id, (request, hops) in enumerate(messages, start=1):
            props = bytes([0x08]) + _mqtt_string(inbox)  # Response Topic
            if hops:
                props += bytes([0x26]) + _mqtt_string(FLEET_HOPS_PROPERTY) + _mqtt_string(str(hops))  # User Property
            variable = _mqtt_string(topic) + packet_id.to_bytes(2, "big") + _mqtt_varint(len(props)) + props
            burst += _mqtt_packet(0x32, variable + json.dumps(request).encode())  # PUBLISH, QoS 1
        sock.sendall(burst)
        reasons: dict[int, int] = {}
        while len(reasons) < len(messages):
            kind, body = _read_mqtt_packet(sock)
            if kind == 0x40:  # PUBACK: packet id, then the reason code (absent means 0, success)
                reasons[int.from_bytes(body[:2], "big")] = body[2] if len(body) > 2 else 0
        sock.sendall(_mqtt_packet(0xE0, b""))  # DISCONNECT
    return [reasons[packet_id] for packet_id in range(1, len(messages) + 1)]


def finals_by_id(probe: Probe, topic: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for m in list(probe.messages):
        if m.topic != topic:
            continue
        event = m.json
        if event.get("event") in ("done", "error"):
            out.setdefault(event["id"], []).append(event)
    return out


def test_kill_9_mid_generation_loses_nothing_and_generates_nothing_twice(
    tmp_path: Path, gemma_path: Path, broker: MosquittoBroker
) -> None:
    node, inbox = "kill", "client/kill"
    config = write_config(tmp_path / "d", gemma_path, merge(mqtt_overrides(broker, node), {"queue": {"max_depth": 16}}))
    first = DaemonProcess(config)
    first.wait_ready()
    wait_online(broker, f"edgellm/{node}")
    ids = [f"k{i}" for i in range(11)]
    with Probe(broker, [inbox, f"edgellm/{node}/availability"]) as probe:
        probe.publish(
            f"edgellm/{node}/request",
            {"id": ids[0], "prompt": ONCE, "raw": True, "max_tokens": 120, "stream": True},
            response_topic=inbox,
        )
        probe.wait_for(lambda m: m.topic == inbox and m.json.get("event") == "token")
        for rid in ids[1:]:
            probe.publish(
                f"edgellm/{node}/request", {"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 8},
                response_topic=inbox,
            )
        wait_until(lambda: status(first)["mqtt"]["received"] >= len(ids), what="daemon received all requests")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)

        # The broker publishes our Last Will at once: `offline`, retained.
        probe.wait_for(lambda m: m.topic.endswith("/availability") and m.payload == b"offline", timeout=10)
        with Probe(broker, [f"edgellm/{node}/availability"]) as late:
            assert late.wait_for(lambda m: m.retain)[0].payload == b"offline"

        second = DaemonProcess(config)
        try:
            second.wait_ready()
            for rid in ids:
                probe.wait_final(rid, timeout=120)
            time.sleep(1.0)  # room for a duplicate answer to show up, if there were one
            finals = finals_by_id(probe, inbox)
            restarted_status = status(second)
        finally:
            second.stop()
    first.stop()
    for rid in ids:
        assert len(finals[rid]) == 1, (rid, finals[rid])
        assert finals[rid][0]["event"] == "done", finals[rid]
        # The killed daemon never finished any of them; the restarted one generated each once.
        assert generated(first, rid) == 0
        assert generated(second, rid) == 1, rid
    mqtt = restarted_status["mqtt"]
    assert mqtt["received"] >= len(ids)  # redelivered by the broker from the persistent session


def test_broker_restart_mid_stream_reconnects_and_finishes(
    tmp_path: Path, gemma_path: Path, broker: MosquittoBroker
) -> None:
    node, inbox = "brk", "client/brk"
    daemon = start_daemon(tmp_path / "d", gemma_path, broker, node)
    ids = ["s0", "b1", "b2", "b3"]
    try:
        with Probe(broker, [inbox], persistent=True, client_id="probe-brk") as probe:
            probe.publish(
                f"edgellm/{node}/request",
                {"id": "s0", "prompt": ONCE, "raw": True, "max_tokens": 200, "stream": True},
                response_topic=inbox,
            )
            for rid in ids[1:]:
                probe.publish(
                    f"edgellm/{node}/request", {"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 16},
                    response_topic=inbox,
                )
            probe.wait_for(lambda m: m.json.get("id") == "s0" and m.json.get("event") == "token")
            broker.restart(down_s=0.5)
            restarted_at = time.monotonic()
            for rid in ids:
                probe.wait_final(rid, timeout=120)
            stream_done = probe.wait_for(lambda m: m.json.get("id") == "s0" and m.json.get("event") == "done")[0]
            # Really mid-stream: the generation was still running when the broker came back.
            assert stream_done.at > restarted_at
            time.sleep(1.0)
            finals = finals_by_id(probe, inbox)
            stream_events = probe.events("s0")
        after = status(daemon)
    finally:
        daemon.stop()
    for rid in ids:
        assert finals[rid], rid
        assert all(f["event"] == "done" for f in finals[rid]), finals[rid]
        # QoS 1 may deliver an answer twice across a broker restart; never two different answers.
        assert all(f == finals[rid][0] for f in finals[rid])
        assert generated(daemon, rid) == 1, rid
    seqs = [e["seq"] for e in stream_events if e["event"] == "token"]
    assert seqs == sorted(seqs)
    assert finals["s0"][0]["seq"] >= (max(seqs) if seqs else 0) + 1
    assert after["mqtt"]["connected"] is True
    assert after["mqtt"]["reconnects"] >= 1
    # The broker kept the daemon's session through its restart (persistence), so the unacked
    # requests were redelivered to it rather than lost.
    connects = [e for e in log_events(daemon) if e.get("event") == "mqtt.connected"]
    assert [e["session_present"] for e in connects][-1] is True


def test_broker_down_socket_serves_and_answers_made_offline_arrive_after_reconnect(
    tmp_path: Path, gemma_path: Path
) -> None:
    node, inbox = "down", "client/down"
    broker = MosquittoBroker(tmp_path / "broker", port=free_port())  # not started yet
    config = write_config(tmp_path / "d", gemma_path, mqtt_overrides(broker, node))
    with DaemonProcess(config) as daemon:
        daemon.wait_ready()
        with daemon.client() as c:
            assert c.call({"prompt": ONCE, "raw": True, "max_tokens": 4})["event"] == "done"
        assert status(daemon)["mqtt"]["connected"] is False
        wait_until(
            lambda: sum(e.get("event") == "mqtt.connect_failed" for e in log_events(daemon)) >= 4,
            what="a few reconnect attempts",
        )

        broker.start()
        try:
            wait_online(broker, f"edgellm/{node}")
            with Probe(broker, [inbox], persistent=True, client_id="probe-down") as probe:
                probe.publish(
                    f"edgellm/{node}/request", {"id": "o1", "prompt": ONCE, "raw": True, "max_tokens": 150},
                    response_topic=inbox,
                )
                wait_until(lambda: status(daemon)["queue"]["running"] == "o1", what="o1 running")
                broker.stop()
                # Generated while the broker is down: held in the bounded buffer, counted in status.
                wait_until(
                    lambda: status(daemon)["mqtt"]["offline_buffered"] == 1, timeout=60, what="answer buffered"
                )
                assert status(daemon)["mqtt"]["connected"] is False
                broker.start()
                done = probe.wait_final("o1", timeout=60)
            wait_until(lambda: status(daemon)["mqtt"]["offline_buffered"] == 0, what="buffer drained")
            mqtt = status(daemon)["mqtt"]
        finally:
            broker.stop()
    assert done["event"] == "done"
    assert mqtt["answered"] >= 1
    assert generated(daemon, "o1") == 1
    # While the broker was down at start: capped exponential backoff with jitter (reconnect_min_s 0.2,
    # reconnect_max_s 1.0: each wait is in [b/2, b] for b = min(1.0, 0.2 * 2^n), n counting attempts).
    events = log_events(daemon)
    first_connect = next(i for i, e in enumerate(events) if e.get("event") == "mqtt.connected")
    waits = [e["retry_in_s"] for e in events[:first_connect] if e.get("event") == "mqtt.connect_failed"]
    assert len(waits) >= 4, waits
    assert 0.1 <= waits[0] <= 0.2, waits  # starts at reconnect_min_s
    assert all(0.1 <= w <= 1.0 for w in waits), waits  # capped at reconnect_max_s
    assert max(waits) > 0.4, waits  # grew
    assert len(set(waits)) > 1 and not set(waits) <= {0.2, 0.4, 0.8, 1.0}, waits  # jittered


def test_fleet_splits_requests_and_a_leaving_member_hands_its_backlog_to_the_other(
    tmp_path: Path, gemma_path: Path, broker: MosquittoBroker
) -> None:
    fleet_topic, inbox = "fleet/t1/request", "client/fleet"
    overrides = {
        "mqtt": {"fleet": {"enabled": True, "group": "g1", "topic": fleet_topic}},
        "engine": {"n_threads": 1},
        # A short drain: what the leaving member has not finished by then goes back to the fleet.
        "shutdown": {"drain_seconds": 0.5},
        # Room for everything: this test is about splitting and leaving. A member without room is
        # the next two tests.
        "queue": {"max_depth": 16},
    }
    a = start_daemon(tmp_path / "a", gemma_path, broker, "fa", overrides)
    b = start_daemon(tmp_path / "b", gemma_path, broker, "fb", overrides)
    ids = [f"f{i}" for i in range(12)]
    try:
        wait_until(lambda: status(a)["mqtt"]["fleet"]["member"] and status(b)["mqtt"]["fleet"]["member"])
        with Probe(broker, [inbox]) as probe:
            for rid in ids:
                request = {"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 16}
                probe.publish(fleet_topic, request, response_topic=inbox)
            probe.wait_for(lambda m: m.json.get("event") == "done", count=2, timeout=60)
            a.signal(signal.SIGTERM)
            assert a.wait(30) == 0
            for rid in ids:
                probe.wait_final(rid, timeout=120)
            time.sleep(0.5)
            finals = finals_by_id(probe, inbox)
    finally:
        a.stop()
        b.stop()
    for rid in ids:
        assert len(finals[rid]) == 1, (rid, finals[rid])
        assert finals[rid][0]["event"] == "done", finals[rid]
    answered_by_a = [rid for rid in ids if generated(a, rid)]
    answered_by_b = [rid for rid in ids if generated(b, rid)]
    assert answered_by_a and answered_by_b, (answered_by_a, answered_by_b)
    assert sorted(answered_by_a + answered_by_b) == sorted(ids)
    a_events = [e["event"] for e in log_events(a)]
    assert "mqtt.handed_off" in a_events
    assert a_events.index("mqtt.stop_accepting") < a_events.index("mqtt.handed_off")
    # Every fleet request A did not answer (the queued ones and the one running when the drain
    # ran out, all ended `shutting_down`) was handed back exactly once; none was kept back.
    not_answered_by_a = sorted(e["id"] for e in logged(a, "request.finished", finish_reason="shutting_down"))
    assert not_answered_by_a
    assert sorted(e["id"] for e in logged(a, "mqtt.handed_off")) == not_answered_by_a
    assert logged(a, "mqtt.handoff_failed") == []


def test_a_leaving_member_whose_peer_is_full_waits_for_room_and_then_hands_over(
    tmp_path: Path, gemma_path: Path, broker: MosquittoBroker
) -> None:
    """The race behind a lost fleet request: the member that is left has just filled its queue and
    unsubscribed when the leaving one hands its running request back. The broker has no member to
    give it to (PUBACK 16) and drops that copy; the leaving member must not give up on it (its own
    copy would wait in its session until it came back) but publish it again once the peer has room."""
    fleet_topic, inbox = "fleet/t2/request", "client/fleet2"
    fleet = {"mqtt": {"fleet": {"enabled": True, "group": "g2", "topic": fleet_topic}}}
    b = start_daemon(tmp_path / "b", gemma_path, broker, "f2b", merge(fleet, {"queue": {"max_depth": 1}}))
    daemons = [b]
    try:
        with Probe(broker, [inbox]) as probe:
            # B: one long generation running and one request waiting, so no room: it leaves the fleet.
            probe.publish(
                "edgellm/f2b/request", {"id": "L", "prompt": ONCE, "raw": True, "max_tokens": 1000, "stream": True},
                response_topic=inbox,
            )
            probe.wait_for(lambda m: m.json.get("id") == "L" and m.json.get("event") == "token")
            probe.publish(
                "edgellm/f2b/request", {"id": "Q", "prompt": ONCE, "raw": True, "max_tokens": 4}, response_topic=inbox
            )
            wait_until(lambda: not member(b), what="the full peer leaving the fleet")
            leaving = merge(fleet, {"shutdown": {"drain_seconds": 0.2}})
            a = start_daemon(tmp_path / "a", gemma_path, broker, "f2a", leaving)
            daemons.append(a)
            wait_until(lambda: member(a), what="the other member joining")
            request = {"id": "F", "prompt": ONCE, "raw": True, "max_tokens": 200}
            assert probe.publish(fleet_topic, request, response_topic=inbox) != NO_MATCHING_SUBSCRIBERS
            wait_until(lambda: status(a)["queue"]["running"] == "F", what="F running on A")
            a.signal(signal.SIGTERM)
            # A ends F with `shutting_down` and hands it to the fleet, where no member is subscribed.
            wait_until(
                lambda: any(e.get("event", "").startswith(("mqtt.handoff", "mqtt.handed_off")) for e in log_events(a)),
                what="A handing F back",
            )
            probe.publish("edgellm/f2b/cancel", {"id": "L"})  # B makes room and rejoins
            assert a.wait(30) == 0
            final = probe.wait_final("F", timeout=60)
            time.sleep(0.5)
            finals = finals_by_id(probe, inbox)
    finally:
        for daemon in daemons:
            daemon.stop()
    assert final["event"] == "done", final
    assert len(finals["F"]) == 1, finals["F"]
    assert generated(b, "F") == 1
    assert generated(a, "F") == 0
    assert [e["finish_reason"] for e in logged(a, "request.finished", id="F")] == ["shutting_down"]
    assert len(logged(a, "mqtt.handoff_waiting", id="F")) == 1  # the race happened: no member at first
    assert len(logged(a, "mqtt.handed_off", id="F")) == 1
    assert logged(a, "mqtt.handoff_failed") == []


def test_a_full_member_bounces_fleet_requests_to_the_fleet_until_the_hop_limit(
    tmp_path: Path, gemma_path: Path, broker: MosquittoBroker
) -> None:
    """Requests the broker had already sent a member when its queue filled (before it could leave
    the fleet) go back to the fleet with a hop count instead of `queue_full`, and are answered by
    whichever member has room (here: the same one, once it has). One that has been refused
    `FLEET_MAX_HOPS` times is answered with the error: the fleet is saturated."""
    fleet_topic, inbox = "fleet/t3/request", "client/fleet3"
    overrides = {"queue": {"max_depth": 2}, "mqtt": {"fleet": {"enabled": True, "group": "g3", "topic": fleet_topic}}}
    daemon = start_daemon(tmp_path / "d", gemma_path, broker, "f3", overrides)
    try:
        with Probe(broker, [inbox]) as probe:
            probe.publish(
                "edgellm/f3/request", {"id": "L", "prompt": ONCE, "raw": True, "max_tokens": 1000, "stream": True},
                response_topic=inbox,
            )
            probe.wait_for(lambda m: m.json.get("id") == "L" and m.json.get("event") == "token")
            assert member(daemon)  # one running, none waiting: room for two more
            short = {"prompt": ONCE, "raw": True, "max_tokens": 4}
            burst = [({"id": rid, **short}, 0) for rid in ("Q", "R", "X")] + [({"id": "Y", **short}, FLEET_MAX_HOPS)]
            reasons = publish_burst(broker, fleet_topic, burst, inbox)
            # All four reached the member while it was still subscribed: Q and R fill its queue.
            assert reasons == [0, 0, 0, 0], reasons
            refused = probe.wait_final("Y")
            wait_until(lambda: bool(logged(daemon, "mqtt.handoff_waiting", id="X")), what="X waiting for room")
            assert not member(daemon)
            probe.publish("edgellm/f3/cancel", {"id": "L"})
            for rid in ("Q", "R", "X"):
                assert probe.wait_final(rid, timeout=60)["event"] == "done", rid
            time.sleep(0.5)
            finals = finals_by_id(probe, inbox)
        mqtt = status(daemon)["mqtt"]
    finally:
        daemon.stop()
    assert refused["code"] == "queue_full" and refused["retry_after_ms"] > 0, refused
    assert {rid: len(f) for rid, f in finals.items()} == {"L": 1, "Q": 1, "R": 1, "X": 1, "Y": 1}
    assert [e["hops"] for e in logged(daemon, "mqtt.fleet_bounced", id="X")] == [1]
    assert logged(daemon, "mqtt.fleet_bounced", id="Y") == []
    assert [e["finish_reason"] for e in logged(daemon, "request.finished", id="X")] == ["queue_full", "length"]
    assert mqtt["bounced"] == 1 and mqtt["handed_off"] == 1


def test_a_full_member_leaves_the_fleet_and_rejoins_and_a_reload_applies_live(
    tmp_path: Path, gemma_path: Path, broker: MosquittoBroker
) -> None:
    node = "live"
    overrides = {"queue": {"max_depth": 1}, "mqtt": {"fleet": {"enabled": True, "topic": "fleet/live/request"}}}
    daemon = start_daemon(tmp_path / "d", gemma_path, broker, node, overrides)

    def member() -> bool:
        return bool(status(daemon)["mqtt"]["fleet"]["member"])

    try:
        wait_until(member, what="fleet member")
        with Probe(broker, ["client/live"]) as probe:
            probe.publish(
                f"edgellm/{node}/request", {"id": "L", "prompt": ONCE, "raw": True, "max_tokens": 1000, "stream": True},
                response_topic="client/live",
            )
            probe.wait_for(lambda m: m.json.get("event") == "token")
            probe.publish(
                f"edgellm/{node}/request", {"id": "Q", "prompt": ONCE, "raw": True, "max_tokens": 4},
                response_topic="client/live",
            )
            # Queue full: it stops taking fleet work so the broker routes to its peers ...
            wait_until(lambda: not member(), what="leaving the fleet")
            probe.publish(f"edgellm/{node}/cancel", {"id": "L"})
            assert probe.wait_final("Q")["event"] == "done"
            # ... and takes it again once it has room.
            wait_until(member, what="rejoining the fleet")

        # SIGHUP: leave the fleet, publish status every second, withdraw from Home Assistant.
        config = tmp_path / "d" / "config.toml"
        live = {"mqtt": {"fleet": {"enabled": False}, "status_interval_s": 1.0, "homeassistant": {"enabled": False}}}
        write_config(tmp_path / "d", gemma_path, merge(merge(mqtt_overrides(broker, node), overrides), live))
        assert config.exists()
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: not status(daemon)["mqtt"]["fleet"]["enabled"], what="reload")
        # The UNSUBSCRIBE goes out right after the new settings are in place.
        wait_until(lambda: not member(), timeout=5, what="leaving the fleet on reload")
        with Probe(broker, [f"edgellm/{node}/status"]) as watcher:
            watcher.wait_for(lambda m: not m.retain, count=2, timeout=5)  # periodic, with nothing going on
        with Probe(broker, ["homeassistant/#"]) as ha:
            time.sleep(0.5)
            assert [m for m in ha.messages if m.payload] == []  # discovery configs removed
        assert status(daemon)["mqtt"]["connects"] == 1  # all applied without reconnecting

        # A new prefix needs a new connection: `offline` on the old one, and the broker forgets
        # the old request topic of our persistent session.
        moved = merge(merge(merge(mqtt_overrides(broker, node), overrides), live), {"mqtt": {"prefix": "home/moved"}})
        write_config(tmp_path / "d", gemma_path, moved)
        daemon.signal(signal.SIGHUP)
        wait_online(broker, "home/moved")
        with Probe(broker, [f"edgellm/{node}/availability", "client/moved"]) as probe:
            assert probe.wait_for(lambda m: m.retain)[0].payload == b"offline"
            assert probe.publish(f"edgellm/{node}/request", {"prompt": "x"}).value == NO_MATCHING_SUBSCRIBERS
            probe.publish(
                "home/moved/request", {"id": "M", "prompt": ONCE, "raw": True, "max_tokens": 4},
                response_topic="client/moved",
            )
            assert probe.wait_final("M")["event"] == "done"
    finally:
        daemon.stop()
