"""Live fuzz of both doors (issue 11 §3): thousands of generated malformed messages over the Unix
socket and over MQTT to a running `edgellm serve` (the real Gemma 3 270M, a private Mosquitto).

Each malformed input must get a structured error (docs/protocol.md): on the socket one `error`
event per line, with `payload_too_large` and a closed connection for lines over the limit; over
MQTT one `error` on the documented route (the Response Topic, `reply_to`, `<prefix>/response/<id>`
or `<prefix>/error`). Afterwards the daemon answers a normal request exactly as before and its RSS
grew less than 20 MB. The figures (inputs per door) go to docs/reliability.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.fuzz_inputs import ANY_ID, INVALID_JSON, PAYLOAD_TOO_LARGE, Case, malformed, oversize
from tests.helpers import DaemonProcess
from tests.mqtt_broker import MosquittoBroker, Probe
from tests.reliability import (
    UNBOUNDED_BROKER_QUEUE,
    LineSocket,
    report,
    rss_anon_kb,
    rss_kb,
    start_mqtt_daemon,
    wait_count,
)

pytestmark = pytest.mark.soak

SEED = 20261101
NODE = "fuzz"
PREFIX = f"edgellm/{NODE}"
LINE_LIMIT = 262144  # socket.max_request_bytes and mqtt.max_payload_bytes, the documented defaults
RSS_GROWTH_LIMIT_KB = 20 * 1024
NORMAL = {"prompt": "Once upon a time, there was a little", "raw": True, "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path_factory.mktemp("fuzz-broker"), extra_config=UNBOUNDED_BROKER_QUEUE) as b:
        yield b


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, gemma_path: Path, broker: MosquittoBroker
) -> Iterator[DaemonProcess]:
    limits = {"socket": {"max_request_bytes": LINE_LIMIT}, "mqtt": {"max_payload_bytes": LINE_LIMIT}}
    # The default mmap here, as users run it: nothing in the fuzz generates new tokens, so no new
    # weight pages. (Without mmap, glibc keeps ~70 MB of heap freed after the 10 MB payloads.)
    limits["engine"] = {"use_mmap": True}
    d = start_mqtt_daemon(tmp_path_factory.mktemp("fuzz-daemon"), gemma_path, broker, NODE, queue_depth=8, extra=limits)
    yield d
    d.stop()


def normal_answer(daemon: DaemonProcess) -> str:
    with daemon.client(timeout=600) as c:
        done = c.call(dict(NORMAL))
    assert done["event"] == "done", done
    return str(done["text"])


def mismatch(case: Case, event: Any) -> str | None:
    """Why `event` is not an acceptable answer to the malformed `case`, or None."""
    if not isinstance(event, dict) or event.get("event") != "error":
        return f"not an error event: {event!r}"
    if event.get("code") not in case.codes:
        return f"code {event.get('code')!r} not in {sorted(case.codes)}"
    message = event.get("message")
    if not isinstance(message, str) or not message:
        return "no message"
    if len(message) > 500:
        return f"message of {len(message)} chars quotes too much of the input"
    if case.id is not ANY_ID and event.get("id") != case.id:
        return f"id {event.get('id')!r}, expected {case.id!r}"
    if case.field is not None and case.field not in message:
        return f"message does not name {case.field!r}: {message!r}"
    return None


def describe(case: Case, why: str) -> str:
    return f"{case.kind} {case.payload[:120]!r}: {why}"


def test_live_fuzz_of_the_socket(daemon: DaemonProcess) -> None:
    pid = daemon.proc.pid
    before = normal_answer(daemon)
    rss_before = rss_kb(pid)
    started = time.monotonic()
    cases = malformed(SEED, "socket", scale=2)
    failures: list[str] = []
    sent_bytes = 0
    with LineSocket(daemon.socket_path, timeout=60) as conn:
        for start in range(0, len(cases), 64):
            batch = cases[start : start + 64]
            events = conn.exchange([c.payload for c in batch])
            sent_bytes += sum(len(c.payload) + 1 for c in batch)
            assert len(events) == len(batch), f"{len(events)} events for {len(batch)} lines"
            failures += [describe(c, why) for c, e in zip(batch, events) if (why := mismatch(c, e))]
        # One connection took all of it: malformed lines never cost the connection.
        assert not conn.eof

    big = list(oversize(LINE_LIMIT))
    for case in big:
        with LineSocket(daemon.socket_path, timeout=60) as conn:
            events = conn.exchange([case.payload], expect=1)
            sent_bytes += len(case.payload) + 1
            assert events, f"no answer to {case.kind} of {len(case.payload)} bytes"
            if why := mismatch(case, events[0]):
                failures.append(describe(case, why))
            # Documented: the connection is closed after `payload_too_large`, with nothing after it.
            assert conn.read_until_eof(timeout=30) == []

    assert not failures, f"{len(failures)} of {len(cases) + len(big)} inputs answered wrongly:\n" + "\n".join(
        failures[:25]
    )
    elapsed = time.monotonic() - started
    assert daemon.proc.poll() is None
    # What the fuzz cost, read before the next generation adds the engine's sampler memory
    # (docs/reliability.md, findings).
    rss_after = rss_kb(pid)
    assert normal_answer(daemon) == before
    kinds: dict[str, int] = {}
    for case in cases + big:
        kinds[case.kind] = kinds.get(case.kind, 0) + 1
    report(
        "fuzz_socket",
        inputs=len(cases) + len(big),
        oversize_10mb=sum(len(c.payload) >= 10 * 1024 * 1024 for c in big),
        megabytes_sent=round(sent_bytes / 1e6, 1),
        by_kind=kinds,
        seconds=round(elapsed, 1),
        rss_before_mb=round(rss_before / 1024, 1),
        rss_growth_mb=round((rss_after - rss_before) / 1024, 1),
    )
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_KB


def _props(correlation: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = "fuzz/inbox"
    props.CorrelationData = correlation.encode()
    return props


def publish_all(probe: Probe, messages: list[tuple[str, bytes, Properties | None]], timeout: float = 120.0) -> None:
    """Publish back to back (QoS 1) and wait until the broker has acknowledged every one."""
    infos = [probe.client.publish(topic, payload, qos=1, properties=props) for topic, payload, props in messages]
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        assert info.is_published(), "the broker did not acknowledge a fuzz message"


def test_live_fuzz_of_mqtt(daemon: DaemonProcess, broker: MosquittoBroker) -> None:
    pid = daemon.proc.pid
    before = normal_answer(daemon)
    rss_before, anon_before = rss_kb(pid), rss_anon_kb(pid)
    started = time.monotonic()
    cases = malformed(SEED + 1, "mqtt", scale=2) + list(oversize(LINE_LIMIT))
    failures: list[str] = []
    with Probe(broker, ["fuzz/inbox"]) as probe, Probe(
        broker, ["fuzz311/inbox", f"{PREFIX}/error", f"{PREFIX}/response/#"], protocol="3.1.1"
    ) as old:
        # MQTT 5: every case with a Response Topic and its index as Correlation Data.
        for start in range(0, len(cases), 500):
            batch = cases[start : start + 500]
            publish_all(probe, [(f"{PREFIX}/request", c.payload, _props(str(start + i))) for i, c in enumerate(batch)])
        answers = wait_count(probe, lambda m: m.topic == "fuzz/inbox", len(cases))
        rss_after_mqtt5 = rss_kb(pid)  # the 10 MB payloads were the last of these
        by_correlation: dict[bytes | None, list[Any]] = {}
        for m in answers:
            by_correlation.setdefault(m.correlation, []).append(m.json)
        for index, case in enumerate(cases):
            got = by_correlation.get(str(index).encode(), [])
            if len(got) != 1:
                failures.append(describe(case, f"{len(got)} answers on the Response Topic"))
            elif why := mismatch(case, got[0]):
                failures.append(describe(case, why))

        # MQTT 3.1.1 (no properties): the other documented routes.
        unparseable = [c for c in cases if c.kind == "truncated_json"][:150]
        with_reply_to, to_default = [], []
        for index in range(150):
            rid = f"r311-{index}"
            with_reply_to.append((rid, {"id": rid, "prompt": "x", "max_tokens": 0, "reply_to": "fuzz311/inbox"}))
            rid = f"d311-{index}"
            to_default.append((rid, {"id": rid, "prompt": ["not", "a", "string"]}))
        publish_all(
            old,
            [(f"{PREFIX}/request", c.payload, None) for c in unparseable]
            + [(f"{PREFIX}/request", json.dumps(obj).encode(), None) for _rid, obj in with_reply_to + to_default],
        )
        on_error = wait_count(old, lambda m: m.topic == f"{PREFIX}/error", len(unparseable))
        on_reply_to = wait_count(old, lambda m: m.topic == "fuzz311/inbox", len(with_reply_to))
        on_default = wait_count(old, lambda m: m.topic.startswith(f"{PREFIX}/response/"), len(to_default))
        time.sleep(1.0)  # anything extra would arrive now
        assert len([m for m in old.messages if m.topic == f"{PREFIX}/error"]) == len(unparseable)
        assert all(m.json["code"] == INVALID_JSON and m.json["id"] is None for m in on_error)
        assert sorted(m.json["id"] for m in on_reply_to) == sorted(rid for rid, _ in with_reply_to)
        assert all(m.json["code"] == "invalid_request" and "max_tokens" in m.json["message"] for m in on_reply_to)
        assert sorted(m.topic for m in on_default) == sorted(f"{PREFIX}/response/{rid}" for rid, _ in to_default)
        assert all(m.json["code"] == "invalid_request" and "prompt" in m.json["message"] for m in on_default)
        assert len([m for m in probe.messages if m.topic == "fuzz/inbox"]) == len(cases)

        # Garbage on the cancel topic: nothing documented to check but that the daemon lives on.
        cancels = [c.payload for c in cases[:300]]
        publish_all(probe, [(f"{PREFIX}/cancel", payload, _props("cancel")) for payload in cancels])

        assert not failures, f"{len(failures)} of {len(cases)} inputs answered wrongly:\n" + "\n".join(failures[:25])
        rss_after, anon_after = rss_kb(pid), rss_anon_kb(pid)  # before the next generation (see the socket test)
        rid = "after-fuzz"
        probe.publish(f"{PREFIX}/request", {"id": rid, **NORMAL}, response_topic="fuzz/inbox")
        after_mqtt = probe.wait_final(rid, timeout=600)
    elapsed = time.monotonic() - started
    assert after_mqtt["event"] == "done" and after_mqtt["text"] == before
    assert normal_answer(daemon) == before
    with daemon.client(timeout=10) as c:
        mqtt = c.status()["mqtt"]
    assert mqtt["connected"] is True
    assert mqtt["connects"] == 1, "a malformed message cost the broker connection"
    total = len(cases) + len(unparseable) + len(with_reply_to) + len(to_default)
    report(
        "fuzz_mqtt",
        inputs=total,
        on_response_topic=len(cases),
        on_error_topic=len(unparseable),
        on_reply_to=len(with_reply_to),
        on_default_response_topic=len(to_default),
        oversize_10mb=sum(len(c.payload) >= 10 * 1024 * 1024 for c in cases),
        garbage_cancels=len(cancels),
        seconds=round(elapsed, 1),
        rss_before_mb=round(rss_before / 1024, 1),
        rss_growth_mb=round((rss_after - rss_before) / 1024, 1),
        rss_anon_growth_mb=round((anon_after - anon_before) / 1024, 1),
        payload_too_large=sum(c.codes == frozenset({PAYLOAD_TOO_LARGE}) for c in cases),
        rss_growth_after_mqtt5_batch_mb=round((rss_after_mqtt5 - rss_before) / 1024, 1),
    )
    # Was 7-50 MB before the compact inbox and the fixed mmap threshold (docs/reliability.md, finding 5).
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_KB, f"RSS {rss_before} -> {rss_after} KiB"
