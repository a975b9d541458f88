"""The MQTT adapter writes what the dispatcher publishes on the dispatcher's own thread
(daemon/transports/mqtt/direct_writes.py), against a real Mosquitto: every packet arrives whole
and in order, a streamed token wakes no other thread, and what the socket cannot take at once is
left to paho's network thread, as paho does it."""

from __future__ import annotations

import os
import queue
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import parse_config
from daemon.transports.mqtt.client import ClientItem, Connected, PahoClient, PubAck
from tests.mqtt_broker import MosquittoBroker, Probe


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


Adapter = tuple[PahoClient, "queue.Queue[ClientItem]", str]


@pytest.fixture
def adapter(tmp_path: Path, broker: MosquittoBroker) -> Iterator[Adapter]:
    cfg = parse_config({"mqtt": {"enabled": True, "host": broker.host, "port": broker.port}}, "test", tmp_path).mqtt
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


def _received(probe: Probe, topic: str, count: int) -> list[Any]:
    return probe.wait_for(lambda m: m.topic.startswith(topic + "/"), count, timeout=30)


def test_direct_writes_are_on_with_the_installed_paho(adapter: Adapter) -> None:
    """A paho upgrade that moves the private parts this relies on must fail here, not quietly
    bring back a wake-up per token."""
    client, _, _ = adapter
    assert client.direct_writes and client._paho.supported()


def test_tokens_and_finals_arrive_in_order_and_no_token_wakes_pahos_thread(
    adapter: Adapter, broker: MosquittoBroker
) -> None:
    client, items, topic = adapter
    with Probe(broker, [f"{topic}/#"]) as probe:
        wakes = _wake_counter(client)
        finals = []
        for n in range(300):
            sent = client.publish(f"{topic}/stream", b'{"n": %d}' % n, qos=0)
            assert sent.ok and not sent.queued_offline
            assert not client._paho.want_write()  # written before publish() returned
            if n % 50 == 49:
                finals.append(client.publish(f"{topic}/answer", b'{"final": %d}' % n, qos=1).mid)
        assert wakes.sent == 0
        received = _received(probe, topic, 300 + len(finals))
        assert [m.payload for m in received if m.topic.endswith("/stream")] == [b'{"n": %d}' % n for n in range(300)]
        order = [(m.topic.rsplit("/", 1)[1], m.payload) for m in received]
        for k, (kind, payload) in enumerate(order):  # each final after the token before it
            if kind == "answer":
                n = int(payload.split(b":")[1].rstrip(b"}"))
                assert order[k - 1] == ("stream", b'{"n": %d}' % n)
        acks = [items.get(timeout=10) for _ in finals]
        assert sorted(a.mid for a in acks if isinstance(a, PubAck)) == sorted(finals)
        assert items.empty() and not client._stream_mids  # no QoS 0 write reported as a PUBACK


def test_what_the_socket_cannot_take_at_once_is_left_to_pahos_thread(
    adapter: Adapter, broker: MosquittoBroker
) -> None:
    """A 2 MB event fills a small socket buffer: the dispatcher writes what fits, and the rest of it
    and the tokens queued behind it are written by paho's network thread, whole and in order."""
    client, items, topic = adapter
    with Probe(broker, [f"{topic}/#"]) as probe:
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
        received = [m.payload for m in _received(probe, topic, 22)]
        assert received[0] == big and received[1:] == [b"%d" % n for n in range(20)] + [b"done"]
        ack = items.get(timeout=10)
        assert isinstance(ack, PubAck) and ack.mid == final.mid
        assert items.empty() and not client._stream_mids


def test_each_stream_keeps_its_own_correlation_data(adapter: Adapter, broker: MosquittoBroker) -> None:
    """The PUBLISH properties of a stream are built once and reused: never another stream's."""
    client, _, topic = adapter
    with Probe(broker, [f"{topic}/#"]) as probe:
        for n in range(10):
            for stream in (b"a", b"b", b"c"):
                client.publish(f"{topic}/stream", b"%s%d" % (stream, n), qos=0, correlation=b"corr-" + stream)
        received = _received(probe, topic, 30)
        assert all(m.correlation == b"corr-" + m.payload[:1] for m in received)
        assert all(m.content_type == "application/json" for m in received)


def test_a_dropped_connection_mid_stream_leaves_the_adapter_working(
    adapter: Adapter, broker: MosquittoBroker
) -> None:
    """paho's thread reconnects (clearing its queue) while the dispatcher keeps publishing: no
    exception, the reconnect happens, and the next answer gets its PUBACK."""
    client, items, topic = adapter
    with Probe(broker, [f"{topic}/#"]) as probe:
        for n in range(200):
            client.publish(f"{topic}/stream", b"%d" % n, qos=0)
            if n == 100:
                client.drop_connection()
        while not isinstance(items.get(timeout=20), Connected):
            pass  # the Disconnected before it
        final = client.publish(f"{topic}/answer", b"done", qos=1)
        ack = items.get(timeout=10)
        assert isinstance(ack, PubAck) and ack.mid == final.mid and not ack.failure
        probe.wait_for(lambda m: m.payload == b"done", timeout=10)
        payloads = [int(m.payload) for m in _received(probe, topic, 1) if m.payload != b"done"]
        assert payloads == sorted(payloads) and payloads[:100] == list(range(100))
