"""`Inbound`: what the MQTT door keeps of a received message (pure; paho's own message class)."""

from __future__ import annotations

import os
import queue
import time
import tracemalloc
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.transports.mqtt.client import Inbound


def _message(topic: bytes, payload: bytes, **props: object) -> paho.MQTTMessage:
    msg = paho.MQTTMessage(7, topic)
    msg.payload = payload
    msg.qos = 1
    msg.dup = True
    if props:
        p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        for name, value in props.items():
            setattr(p, name, value)
        msg.properties = p
    return msg


def test_inbound_keeps_what_the_door_reads() -> None:
    msg = _message(
        b"edgellm/n/request", b'{"prompt": "x"}', ResponseTopic="app/inbox", CorrelationData=b"\x00c1",
        MessageExpiryInterval=30, UserProperty=[("edgellm-hops", "1"), ("k", "v")],
    )
    got = Inbound.of(msg, bytes(msg.payload))
    assert got == Inbound(
        "edgellm/n/request", b'{"prompt": "x"}', 1, 7, True, "app/inbox", b"\x00c1", 30,
        (("edgellm-hops", "1"), ("k", "v")),
    )


def test_inbound_without_properties_and_with_a_topic_that_is_not_utf8() -> None:
    got = Inbound.of(_message(b"edgellm/\xff/request", b"hi"), b"hi")
    assert (got.topic, got.payload, got.response_topic, got.correlation, got.expiry_s, got.user_properties) == (
        "", b"hi", None, None, None, ()
    )


def test_an_inbound_costs_a_fraction_of_a_paho_message() -> None:
    """The inbox holds thousands under a flood: what each one keeps alive is the point."""
    def cost(keep: bool) -> float:
        kept: list[object] = []
        tracemalloc.start()
        start = tracemalloc.get_traced_memory()[0]
        for n in range(500):
            msg = _message(b"edgellm/n/request", b'{"id": "r%d", "prompt": "x"}' % n, ResponseTopic="app/inbox")
            kept.append(msg if keep else Inbound.of(msg, bytes(msg.payload)))
        used = tracemalloc.get_traced_memory()[0] - start
        tracemalloc.stop()
        return used / len(kept)

    paho_bytes, inbound_bytes = cost(True), cost(False)
    assert inbound_bytes * 5 < paho_bytes, (inbound_bytes, paho_bytes)


def test_the_properties_we_publish_with_share_pahos_tables() -> None:
    """paho keeps each published message's Properties until its PUBACK."""
    from daemon.transports.mqtt.client import _properties

    kept: list[Properties] = []
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    for n in range(500):
        props = _properties(PacketTypes.PUBLISH)
        props.CorrelationData = b"%d" % n
        props.ResponseTopic = "app/inbox"
        kept.append(props)
    per_message = (tracemalloc.get_traced_memory()[0] - start) / len(kept)
    tracemalloc.stop()
    assert per_message < 1500, per_message
    packed = kept[7].pack()
    decoded = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    decoded.unpack(packed)
    assert (decoded.CorrelationData, decoded.ResponseTopic) == (b"7", "app/inbox")


def test_the_adapter_hands_over_puback_of_qos1_and_nothing_for_qos0_writes(tmp_path: Path) -> None:
    """Against the session's Mosquitto: paho reports every QoS 0 publish (a stream event) once
    written, under a mid of the same counter as QoS 1; the adapter keeps those reports from the
    dispatcher, which matches mids to finals. Offline, a QoS 0 publish says so (it is lost)."""
    from daemon.config import parse_config
    from daemon.transports.mqtt.client import Connected, PahoClient, PubAck

    cfg = parse_config({"mqtt": {"enabled": True, "host": "127.0.0.1", "port": 1883}}, "test", tmp_path).mqtt
    items: queue.Queue[object] = queue.Queue()
    client = PahoClient(cfg, f"adapter-{os.getpid()}", "adapter/will", items.put)
    offline = client.publish("adapter/test/stream", b"{}", qos=0)
    assert offline.queued_offline
    client.connect()
    try:
        assert isinstance(items.get(timeout=10), Connected)
        tokens = [client.publish("adapter/test/stream", b'{"event": "token"}', qos=0) for _ in range(50)]
        final = client.publish("adapter/test/answer", b'{"event": "done"}', qos=1)
        assert all(t.ok and not t.queued_offline for t in tokens) and final.ok
        got = items.get(timeout=10)
        assert isinstance(got, PubAck) and got.mid == final.mid and not got.failure
        time.sleep(0.5)  # any late report of a token's write would be here by now
        assert items.empty(), items.get_nowait()
    finally:
        client.close()


def test_a_streams_properties_are_packed_once_and_decode_as_paho_packs_them() -> None:
    from daemon.transports.mqtt.client import _publish_properties

    fields = (True, b"\x00corr", "app/inbox", 30, (("edgellm-hops", "1"),))
    once = _publish_properties(*fields, packed_once=True)
    plain = _publish_properties(*fields, packed_once=False)
    assert once.pack() == plain.pack() and once.pack() is once.pack()
    decoded = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    decoded.unpack(once.pack())
    assert (decoded.ContentType, decoded.CorrelationData, decoded.ResponseTopic, decoded.MessageExpiryInterval,
            decoded.UserProperty) == ("application/json", b"\x00corr", "app/inbox", 30, [("edgellm-hops", "1")])
