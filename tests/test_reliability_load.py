"""Load, soak and floods (issue 11 §4) against a real `edgellm serve` (the real Gemma 3 270M) over
its Unix socket and a private Mosquitto.

- Soak: 2,000 short requests (max_tokens 4-16) from 16 concurrent clients (8 on the socket, 8 over
  MQTT) with random cancels, deadlines and streams: each gets exactly one final event; queue and
  MQTT in-flight end at 0; RSS grows < 5 %; no file descriptor is leaked.
- Flood: 10,000 MQTT requests published as fast as possible against `queue.max_depth = 4`: every
  one is answered (`done`, or `queue_full` for the excess), memory stays bounded, the socket's
  `status` stays responsive (measured and printed), the broker connection survives.

Slow and stuck socket clients and connect/disconnect cycles: tests/test_reliability_clients.py.

Sizes can be lowered for a quick look (EDGELLM_SOAK_REQUESTS, EDGELLM_FLOOD_REQUESTS); the figures
of the last full run are in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.client import Client
from tests.helpers import REPO, DaemonProcess, wait_status
from tests.mqtt_broker import MosquittoBroker, Probe
from tests.reliability import (
    UNBOUNDED_BROKER_QUEUE,
    busy,
    fd_count,
    percentiles,
    report,
    rss_anon_kb,
    rss_kb,
    settle_fds,
    start_mqtt_daemon,
)

pytestmark = pytest.mark.soak

SOAK_REQUESTS = int(os.environ.get("EDGELLM_SOAK_REQUESTS", "2000"))
FLOOD_REQUESTS = int(os.environ.get("EDGELLM_FLOOD_REQUESTS", "10000"))
SOCKET_CLIENTS = 8
MQTT_CLIENTS = 8
# Bounds, not targets: a loop that has not finished by then stops and the test fails on its counts.
SOAK_TIME_LIMIT_S = float(os.environ.get("EDGELLM_SOAK_SECONDS", "480"))
# Longest wait for one answer, then the client gives up: generous, because a box shared with other
# work decodes far slower than an idle one (measured here: 0.1 tok/s instead of 64).
ANSWER_TIMEOUT_S = 600.0
FINAL_CODES = {"deadline_exceeded", "cancelled", "queue_full"}
PROMPTS = [
    "Once upon a time, there was a little",
    "The cat sat on the",
    "One, two, three,",
    "My favourite colour is",
]
ONCE = {"prompt": PROMPTS[0], "raw": True, "max_tokens": 8, "temperature": 0}


def soak_request(rng: random.Random, rid: str) -> tuple[dict[str, Any], bool]:
    """A short random request, and whether its client cancels it right after sending."""
    request: dict[str, Any] = {"id": rid, "max_tokens": rng.randint(4, 16)}
    if rng.random() < 0.2:
        request["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
    else:
        request.update(prompt=rng.choice(PROMPTS), raw=True)
    mode = rng.random()
    if mode < 0.25:
        request["stream"] = True
    elif mode < 0.55:
        request["deadline_ms"] = rng.randint(1, 300)
    if rng.random() < 0.2:
        # Not `low`: strict priority lets a steady stream of normal requests starve it (as documented).
        request["priority"] = "high"
    return request, rng.random() < 0.15


class Outcomes:
    """Every event of every request of the soak, by id, from every client thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: dict[str, dict[str, Any]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.errors: list[str] = []

    def record_sent(self, request: dict[str, Any]) -> None:
        with self.lock:
            self.sent[request["id"]] = request

    def record(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.setdefault(str(event.get("id")), []).append(event)

    def problems(self) -> list[str]:
        """Requests without exactly one final event, or whose final is not a documented outcome."""
        out = list(self.errors)
        for rid, request in self.sent.items():
            events = self.events.get(rid, [])
            finals = [e for e in events if e.get("event") in ("done", "error")]
            if len(finals) != 1:
                out.append(f"{rid}: {len(finals)} final events: {finals}")
                continue
            final = finals[0]
            if events[-1] is not final:
                out.append(f"{rid}: events after the final one: {events}")
            if final["event"] == "error" and final.get("code") not in FINAL_CODES:
                out.append(f"{rid}: unexpected error {final}")
            if final["event"] == "done" and request.get("stream"):
                tokens = "".join(e["text"] for e in events if e.get("event") == "token")
                if tokens != final["text"]:
                    out.append(f"{rid}: tokens {tokens!r} != text {final['text']!r}")
        return out

    def outcome_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rid in self.sent:
            finals = [e for e in self.events.get(rid, []) if e.get("event") in ("done", "error")]
            if finals:
                final = finals[-1]
                key = final["finish_reason"] if final["event"] == "done" else final["code"]
                counts[key] = counts.get(key, 0) + 1
        return counts


def socket_soak_client(
    path: Path, index: int, count: int, stop_at: float, outcomes: Outcomes, seed: int
) -> None:
    rng = random.Random(seed)
    try:
        with Client(path, timeout=ANSWER_TIMEOUT_S) as client:
            for n in range(count):
                if time.monotonic() > stop_at:
                    return
                request, cancel = soak_request(rng, f"sock{index}-{n}")
                outcomes.record_sent(request)
                client.send(request)
                if cancel:
                    time.sleep(rng.uniform(0, 0.05))
                    client.send({"op": "cancel", "id": request["id"]})
                while True:
                    event = client.read_event()
                    if event.get("event") == "cancel":
                        continue
                    outcomes.record(event)
                    if event.get("id") == request["id"] and event.get("event") in ("done", "error"):
                        break
            # Anything that still arrives for these ids (a second final) comes before this reply.
            time.sleep(0.5)
            client.send({"op": "status"})
            while (event := client.read_event()).get("event") != "status":
                outcomes.record(event)
    except Exception as exc:
        outcomes.errors.append(f"socket client {index}: {type(exc).__name__}: {exc}")


def mqtt_soak_client(
    broker: MosquittoBroker, prefix: str, index: int, count: int, stop_at: float, outcomes: Outcomes, seed: int
) -> None:
    rng = random.Random(seed)
    inbox = f"soak/{index}"
    try:
        with Probe(broker, [inbox]) as probe:
            try:
                for n in range(count):
                    if time.monotonic() > stop_at:
                        break
                    request, cancel = soak_request(rng, f"mqtt{index}-{n}")
                    outcomes.record_sent(request)
                    probe.publish(f"{prefix}/request", request, response_topic=inbox)
                    if cancel:
                        time.sleep(rng.uniform(0, 0.05))
                        probe.publish(f"{prefix}/cancel", {"id": request["id"]})
                    probe.wait_final(request["id"], timeout=ANSWER_TIMEOUT_S)
                time.sleep(1.0)  # a second final, if any, would arrive now
            finally:
                for m in list(probe.messages):
                    event = m.json
                    if event.get("event") != "cancel":
                        outcomes.record(event)
    except Exception as exc:
        outcomes.errors.append(f"mqtt client {index}: {type(exc).__name__}: {exc}")


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path / "broker", extra_config=UNBOUNDED_BROKER_QUEUE) as b:
        yield b


def warm_up(daemon: DaemonProcess, broker: MosquittoBroker, prefix: str) -> None:
    """Each door once, so buffers allocated on first use count in the baseline."""
    short = {**ONCE, "max_tokens": 4}
    with daemon.client(timeout=ANSWER_TIMEOUT_S) as c:
        assert c.call(dict(short))["event"] == "done"
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
        assert c.call(chat)["event"] == "done"
    with Probe(broker, ["warm/inbox"]) as probe:
        probe.publish(f"{prefix}/request", {"id": "warm-0", **short}, response_topic="warm/inbox")
        assert probe.wait_final("warm-0", timeout=ANSWER_TIMEOUT_S)["event"] == "done"


def quiet(daemon: DaemonProcess, timeout: float = ANSWER_TIMEOUT_S) -> dict[str, Any]:
    """The status once nothing is queued and nothing is in flight over MQTT."""
    with daemon.client(timeout=10) as c:
        return wait_status(
            c,
            lambda s: s["queue"]["depth"] == 0
            and s.get("mqtt", {}).get("inflight", 0) == 0
            and s.get("mqtt", {}).get("offline_buffered", 0) == 0,
            timeout=timeout,
        )


class RssGrowthError(AssertionError):
    """The soak grew the daemon's RSS by 5 % or more."""


def test_soak_2000_requests_from_16_clients_on_both_doors(
    tmp_path: Path, gemma_path: Path, broker: MosquittoBroker
) -> None:
    node = "soak"
    prefix = f"edgellm/{node}"
    daemon = start_mqtt_daemon(
        tmp_path / "daemon", gemma_path, broker, node, queue_depth=32, extra={"generation": {"max_tokens": 16}}
    )
    try:
        pid = daemon.proc.pid
        warm_up(daemon, broker, prefix)
        quiet(daemon)
        fds_before, rss_before, anon_before = fd_count(pid), rss_kb(pid), rss_anon_kb(pid)
        outcomes = Outcomes()
        per_client = -(-SOAK_REQUESTS // (SOCKET_CLIENTS + MQTT_CLIENTS))
        started = time.monotonic()
        stop_at = started + SOAK_TIME_LIMIT_S
        threads = [
            threading.Thread(
                target=socket_soak_client, args=(daemon.socket_path, i, per_client, stop_at, outcomes, 1000 + i)
            )
            for i in range(SOCKET_CLIENTS)
        ] + [
            threading.Thread(
                target=mqtt_soak_client, args=(broker, prefix, i, per_client, stop_at, outcomes, 2000 + i)
            )
            for i in range(MQTT_CLIENTS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SOAK_TIME_LIMIT_S + 120)
        elapsed = time.monotonic() - started
        assert not any(t.is_alive() for t in threads), "a soak client hung"
        status = quiet(daemon)
        fds_after = settle_fds(pid, fds_before)
        rss_after, anon_after = rss_kb(pid), rss_anon_kb(pid)
        problems = outcomes.problems()
        sent = len(outcomes.sent)
        by_door = {
            "socket": sum(rid.startswith("sock") for rid in outcomes.sent),
            "mqtt": sum(rid.startswith("mqtt") for rid in outcomes.sent),
        }
        report(
            "soak",
            requests=sent,
            by_door=by_door,
            clients=SOCKET_CLIENTS + MQTT_CLIENTS,
            outcomes=outcomes.outcome_counts(),
            problems=len(problems),
            seconds=round(elapsed, 1),
            requests_per_second=round(sent / elapsed, 1),
            queue_depth_after=status["queue"]["depth"],
            mqtt_inflight_after=status["mqtt"]["inflight"],
            rss_before_mb=round(rss_before / 1024, 1),
            rss_growth_pct=round(100 * (rss_after - rss_before) / rss_before, 2),
            rss_anon_growth_mb=round((anon_after - anon_before) / 1024, 1),
            fds_before=fds_before,
            fds_after=fds_after,
        )
        assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:20])
        assert sent >= SOAK_REQUESTS, f"only {sent} of {SOAK_REQUESTS} requests in {SOAK_TIME_LIMIT_S} s"
        assert status["mqtt"]["connected"] is True and status["mqtt"]["connects"] == 1
        assert fds_after <= fds_before, f"fds {fds_before} -> {fds_after}"
        if rss_after - rss_before >= 0.05 * rss_before:
            raise RssGrowthError(f"RSS {rss_before} -> {rss_after} KiB")
    finally:
        daemon.stop()


class FloodReceiver:
    """A subscriber that keeps only what the flood test needs (a `Probe` rescans all messages on
    every arrival, too slow for 10,000 answers): the finals by id, with the time each arrived."""

    def __init__(self, broker: MosquittoBroker, topic: str) -> None:
        self.lock = threading.Lock()
        self.finals: dict[str, list[tuple[dict[str, Any], float]]] = {}
        self.other = 0
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"flood-rx-{os.getpid()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        event = json.loads(msg.payload)
        at = time.monotonic()
        with self.lock:
            if event.get("event") in ("done", "error"):
                self.finals.setdefault(str(event.get("id")), []).append((event, at))
            else:
                self.other += 1

    def answered(self) -> int:
        with self.lock:
            return len(self.finals)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class StatusProbe:
    """`tests/status_probe.py` in a process of its own (its docstring says why): `status` every
    50 ms over the socket and the daemon's RSS, until stopped; then the samples."""

    def __init__(self, daemon: DaemonProcess, out: Path) -> None:
        self.daemon_process = daemon
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        self.latencies_ms: list[float] = []
        self.rss_kb: list[int] = []
        self.inbox: list[tuple[int, int, int]] = []  # the MQTT inbox as status shows it: (messages, bytes, max)
        self.failures: list[str] = []
        self.stopped = False

    def start(self) -> None:
        argv = [str(self.daemon_process.socket_path), str(self.daemon_process.proc.pid), str(self.out)]
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.status_probe", *argv], cwd=REPO)
        deadline = time.monotonic() + 30
        while not (self.out.exists() and self.out.read_text()):  # sampling before the flood starts
            assert self.proc.poll() is None and time.monotonic() < deadline, "the status probe did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the probe (killed if it does not stop) and read its samples; once."""
        if self.proc is None or self.stopped:
            return
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self.failures.append("the status probe did not stop on SIGTERM")
        elif self.proc.returncode != 0:
            self.failures.append(f"the status probe exited with {self.proc.returncode}")
        lines = self.out.read_text().splitlines() if self.out.exists() else []
        for line in lines:
            got = json.loads(line)
            if "failure" in got:
                self.failures.append(got["failure"])
            if "ms" in got:
                self.latencies_ms.append(got["ms"])
                self.inbox.append(tuple(got["inbox"]))
            if "rss_kb" in got:
                self.rss_kb.append(got["rss_kb"])


def test_flood_of_10000_mqtt_requests_against_a_small_queue(
    tmp_path: Path, gemma_path: Path, broker: MosquittoBroker
) -> None:
    node = "flood"
    prefix = f"edgellm/{node}"
    daemon = start_mqtt_daemon(tmp_path / "daemon", gemma_path, broker, node, queue_depth=4)
    receiver = FloodReceiver(broker, "flood/inbox")
    flooder = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id="flooder", protocol=MQTTProtocolVersion.MQTTv5
    )
    flooder.max_inflight_messages_set(0)  # no client-side window: as fast as the broker takes them
    flooder.max_queued_messages_set(0)
    flooder.connect(broker.host, broker.port)
    flooder.loop_start()
    prober = StatusProbe(daemon, tmp_path / "status-probe.jsonl")
    try:
        pid = daemon.proc.pid
        warm_up(daemon, broker, prefix)
        quiet(daemon)
        rss_before = rss_kb(pid)
        published_at: dict[str, float] = {}
        prober.start()
        time.sleep(0.5)
        started = time.monotonic()
        infos = []
        for n in range(FLOOD_REQUESTS):
            rid = f"fl-{n}"
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = "flood/inbox"
            payload = json.dumps({"id": rid, "prompt": PROMPTS[1], "raw": True, "max_tokens": 4})
            published_at[rid] = time.monotonic()
            infos.append(flooder.publish(f"{prefix}/request", payload, qos=1, properties=props))
        for info in infos:
            info.wait_for_publish(120)
        publish_s = time.monotonic() - started
        # Every request answered; a bound, not a target: stop waiting (and fail) once nothing new
        # came for 30 s while the daemon holds nothing, or after ANSWER_TIMEOUT_S.
        last, last_change = -1, time.monotonic()
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while receiver.answered() < FLOOD_REQUESTS and time.monotonic() < deadline:
            if receiver.answered() != last:
                last, last_change = receiver.answered(), time.monotonic()
            elif time.monotonic() - last_change > 30 and not busy(daemon):
                break
            time.sleep(0.2)
        answered_s = time.monotonic() - started
        prober.stop()
        status = quiet(daemon)
        with receiver.lock:
            finals = dict(receiver.finals)
        missing = [rid for rid in published_at if rid not in finals]
        twice = [rid for rid, got in finals.items() if len(got) != 1]
        kinds: dict[str, int] = {}
        full_latency_ms: list[float] = []
        for rid, got in finals.items():
            event, at = got[0]
            key = "done" if event["event"] == "done" else event["code"]
            kinds[key] = kinds.get(key, 0) + 1
            if key == "queue_full":
                full_latency_ms.append((at - published_at[rid]) * 1000)
        lat = prober.latencies_ms
        report(
            "flood",
            requests=FLOOD_REQUESTS,
            queue_max_depth=4,
            answers=kinds,
            missing=len(missing),
            duplicated=len(twice),
            publish_seconds=round(publish_s, 1),
            publish_per_second=round(FLOOD_REQUESTS / publish_s),
            all_answered_seconds=round(answered_s, 1),
            answers_per_second=round(len(finals) / answered_s),
            queue_full_latency_ms=percentiles(full_latency_ms),
            status_latency_ms=percentiles(lat),
            status_over_200ms=sum(v > 200 for v in lat),
            status_failures=len(prober.failures),
            inbox_messages_max=max((m for m, _b, _x in prober.inbox), default=0),
            inbox_bytes_max=max((b for _m, b, _x in prober.inbox), default=0),
            rss_before_mb=round(rss_before / 1024, 1),
            rss_peak_growth_mb=round((max(prober.rss_kb, default=rss_before) - rss_before) / 1024, 1),
            rss_growth_after_mb=round((rss_kb(pid) - rss_before) / 1024, 1),
            mqtt_connects=status["mqtt"]["connects"],
        )
        assert not missing, f"{len(missing)} requests never answered, e.g. {missing[:5]}"
        assert not twice, f"{len(twice)} requests answered more than once, e.g. {finals[twice[0]]}"
        assert set(kinds) <= {"done", "queue_full"}, kinds
        assert kinds.get("queue_full", 0) > 0 and kinds.get("done", 0) > 0, kinds
        assert all("retry_after_ms" in got[0][0] for got in finals.values() if got[0][0]["event"] == "error")
        assert not prober.failures, prober.failures[:5]
        assert lat and max(lat) < 5000, "the socket hung behind the flood"
        # The door holds a bounded number of the flood's messages; the broker keeps the rest.
        assert all(messages <= bound for messages, _b, bound in prober.inbox), max(prober.inbox)
        # Bounded: not in proportion to 10,000 messages.
        assert max(prober.rss_kb) - rss_before < 150 * 1024, "memory is not bounded under the flood"
        assert status["mqtt"]["connected"] is True
        assert status["mqtt"]["connects"] == 1, "the flood cost the broker connection"
    finally:
        try:
            prober.stop()
            flooder.disconnect()
            flooder.loop_stop()
            receiver.close()
        finally:
            daemon.stop()
