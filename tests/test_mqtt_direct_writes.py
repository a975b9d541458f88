"""The MQTT adapter writes what the dispatcher publishes on the dispatcher's own thread
(daemon/transports/mqtt/direct_writes.py), against the session's Mosquitto: every packet arrives
whole and in order, a streamed token wakes no other thread, and what the socket cannot take at
once is left to paho's network thread, as paho does it."""

from __future__ import annotations

import os
import queue
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from daemon.config import parse_config
from daemon.transports.mqtt.client import ClientItem, Connected, PahoClient, PubAck


class _CountingWake:
    """Stands in for paho's socketpair end: counts the wake-ups a publish sends its network thread."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.sent = 0

    def send(self, data: bytes) -> int:
        self.sent += 1
        return int(self._sock.send(data))

    def close(self) -> None:
        self._sock.close()


def _subscriber(topic: str) -> tuple[paho.Client, queue.Queue[paho.MQTTMessage]]:
    got: queue.Queue[paho.MQTTMessage] = queue.Queue()
    subscribed = threading.Event()
    sub = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:8]}",
                      protocol=MQTTProtocolVersion.MQTTv5)
    sub.on_message = lambda c, u, m: got.put(m)
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    sub.connect("127.0.0.1", 1883)
    sub.loop_start()
    assert subscribed.wait(10)
    return sub, got


@pytest.fixture
def adapter(tmp_path: Path) -> Iterator[tuple[PahoClient, queue.Queue[ClientItem], str]]:
    cfg = parse_config({"mqtt": {"enabled": True, "host": "127.0.0.1", "port": 1883}}, "test", tmp_path).mqtt
    items: queue.Queue[ClientItem] = queue.Queue()
    client = PahoClient(cfg, f"direct-{os.getpid()}-{uuid.uuid4().hex[:6]}", "direct/will", items.put)
    client.connect()
    try:
        assert isinstance(items.get(timeout=10), Connected)
        yield client, items, f"direct/{uuid.uuid4().hex[:8]}"
    finally:
        client.close()


def _wake_counter(client: PahoClient) -> _CountingWake:
    inner = client._paho
    counter = _CountingWake(inner._sockpairW)
    inner._sockpairW = counter  # type: ignore[assignment]
    return counter


def test_direct_writes_are_on_with_the_installed_paho(adapter: tuple[PahoClient, Any, str]) -> None:
    """A paho upgrade that moves the private parts this relies on must fail here, not quietly
    bring back a wake-up per token."""
    client, _, _ = adapter
    assert client.direct_writes and client._paho.supported()


def test_tokens_and_finals_arrive_in_order_and_no_token_wakes_pahos_thread(
    adapter: tuple[PahoClient, queue.Queue[ClientItem], str],
) -> None:
    client, items, topic = adapter
    sub, got = _subscriber(f"{topic}/#")
    try:
        wakes = _wake_counter(client)
        finals = []
        for n in range(300):
            sent = client.publish(f"{topic}/stream", b'{"n": %d}' % n, qos=0)
            assert sent.ok and not sent.queued_offline
            assert not client._paho.want_write()  # written before publish() returned
            if n % 50 == 49:
                finals.append(client.publish(f"{topic}/answer", b'{"final": %d}' % n, qos=1).mid)
        assert wakes.sent == 0
        received = [got.get(timeout=10) for _ in range(300 + len(finals))]
        assert [m.payload for m in received if m.topic.endswith("/stream")] == [b'{"n": %d}' % n for n in range(300)]
        order = [(m.topic.rsplit("/", 1)[1], m.payload) for m in received]
        for k, (kind, payload) in enumerate(order):  # each final after the token before it
            if kind == "answer":
                n = int(payload.split(b":")[1].rstrip(b"}"))
                assert order[k - 1] == ("stream", b'{"n": %d}' % n)
        acks = [items.get(timeout=10) for _ in finals]
        assert sorted(a.mid for a in acks if isinstance(a, PubAck)) == sorted(finals)
        assert items.empty() and not client._stream_mids  # no QoS 0 write reported as a PUBACK
    finally:
        sub.loop_stop()
        sub.disconnect()


def test_what_the_socket_cannot_take_at_once_is_left_to_pahos_thread(
    adapter: tuple[PahoClient, queue.Queue[ClientItem], str],
) -> None:
    """A 2 MB event fills a small socket buffer: the dispatcher writes what fits, and the rest of it
    and the tokens queued behind it are written by paho's network thread, whole and in order."""
    client, items, topic = adapter
    sub, got = _subscriber(f"{topic}/#")
    try:
        inner = client._paho
        inner.socket().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        wakes = _wake_counter(client)
        big = bytes(range(256)) * (8 * 1024)
        with inner._write_lock:  # paho's thread cannot write meanwhile; this thread can (reentrant)
            assert client.publish(f"{topic}/stream", big, qos=0).ok
            for n in range(20):
                assert client.publish(f"{topic}/stream", b"%d" % n, qos=0).ok
            final = client.publish(f"{topic}/answer", b"done", qos=1)
            head = inner._out_packet[0]
            assert 0 < head["pos"] < len(big) and len(inner._out_packet) == 22  # part written here
            assert wakes.sent >= 1
        received = [got.get(timeout=30).payload for _ in range(22)]
        assert received[0] == big and received[1:] == [b"%d" % n for n in range(20)] + [b"done"]
        ack = items.get(timeout=10)
        assert isinstance(ack, PubAck) and ack.mid == final.mid
        assert items.empty() and not client._stream_mids
    finally:
        sub.loop_stop()
        sub.disconnect()


def test_each_stream_keeps_its_own_correlation_data(adapter: tuple[PahoClient, queue.Queue[ClientItem], str]) -> None:
    """The PUBLISH properties of a stream are built once and reused: never another stream's."""
    client, _, topic = adapter
    sub, got = _subscriber(f"{topic}/#")
    try:
        for n in range(10):
            for stream in (b"a", b"b", b"c"):
                client.publish(f"{topic}/stream", b"%s%d" % (stream, n), qos=0, correlation=b"corr-" + stream)
        received = [got.get(timeout=10) for _ in range(30)]
        assert all(m.properties.CorrelationData == b"corr-" + m.payload[:1] for m in received)
        assert all(m.properties.ContentType == "application/json" for m in received)
    finally:
        sub.loop_stop()
        sub.disconnect()


def test_a_dropped_connection_mid_stream_leaves_the_adapter_working(
    adapter: tuple[PahoClient, queue.Queue[ClientItem], str],
) -> None:
    """paho's thread reconnects (clearing its queue) while the dispatcher keeps publishing: no
    exception, the reconnect happens, and the next answer gets its PUBACK."""
    client, items, topic = adapter
    sub, got = _subscriber(f"{topic}/#")
    try:
        for n in range(200):
            client.publish(f"{topic}/stream", b"%d" % n, qos=0)
            if n == 100:
                client.drop_connection()
        while not isinstance(items.get(timeout=20), Connected):
            pass  # the Disconnected before it
        final = client.publish(f"{topic}/answer", b"done", qos=1)
        ack = items.get(timeout=10)
        assert isinstance(ack, PubAck) and ack.mid == final.mid and not ack.failure
        payloads = []
        while (m := got.get(timeout=10)).payload != b"done":
            payloads.append(int(m.payload))
        assert payloads == sorted(payloads) and payloads[:100] == list(range(100))
    finally:
        sub.loop_stop()
        sub.disconnect()
