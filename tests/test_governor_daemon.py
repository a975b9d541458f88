"""The governor in a real daemon: a temperature file and a meminfo file stand in for the Pi's
sensors (the only fakes: the board is not here); the model, socket and process are real."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.helpers import REPO, DaemonProcess, merge, read_until_final, wait_status, write_config

ONCE = "Once upon a time, there was a little"


def meminfo(available_mb: int, total_mb: int = 4096) -> str:
    return (
        f"MemTotal:       {total_mb * 1024} kB\nMemFree:        {available_mb * 1024} kB\n"
        f"MemAvailable:   {available_mb * 1024} kB\nSwapTotal:      0 kB\nSwapFree:       0 kB\n"
    )


def governed(tmp: Path, model: Path, overrides: dict[str, Any] | None = None, **extra: Any) -> tuple[Path, Path, Path]:
    temp = tmp / "temp"
    temp.write_text("50000\n")
    mem = tmp / "meminfo"
    mem.write_text(meminfo(8000))
    governor = {
        "enabled": True, "interval_s": 0.1, "temperature_files": [str(temp)], "meminfo_file": str(mem),
        "psi_file": "", "vcgencmd_command": "", "max_pause_s": 60.0,
    }
    governor.update(extra)
    cfg = write_config(tmp, model, merge({"governor": governor}, overrides or {}))
    return cfg, temp, mem


def drain(events: queue.Queue[dict[str, Any]], quiet_for: float) -> list[dict[str, Any]]:
    """Everything that arrives until nothing has for `quiet_for` seconds."""
    got = []
    while True:
        try:
            got.append(events.get(timeout=quiet_for) if quiet_for else events.get_nowait())
        except queue.Empty:
            return got


def test_hot_pauses_generation_and_refuses_new_work_then_resumes(tmp_path: Path, gemma_path: Path) -> None:
    cfg, temp, _ = governed(tmp_path, gemma_path)
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with d.client() as c, d.client() as other:
            wait_status(other, lambda s: (s["governor"] or {}).get("state") == "normal")
            c.send({"id": "long", "prompt": ONCE, "raw": True, "max_tokens": 120, "stream": True})
            assert c.read_event()["event"] == "token"
            temp.write_text("79000\n")
            wait_status(other, lambda s: s["governor"]["state"] == "hot")
            refused = other.call({"id": "new", "prompt": ONCE, "raw": True, "max_tokens": 2})
            # Paused: at most the token in flight arrives once the governor says hot.
            events: queue.Queue[dict[str, Any]] = queue.Queue()
            reader = threading.Thread(target=lambda: [events.put(e) for e in read_until_final(c, "long")])
            reader.start()
            before_pause = drain(events, quiet_for=0.3)  # tokens already in flight or buffered
            during_hot = drain(events, quiet_for=1.5)
            temp.write_text("60000\n")
            reader.join(60)
            rest = drain(events, quiet_for=0.0)
    assert refused["event"] == "error" and refused["code"] == "throttled"
    assert refused["retry_after_ms"] > 0
    assert all(e["event"] == "token" for e in before_pause), "it finished instead of pausing"
    # At full speed 1.5 s is dozens of tokens; paused, only a token already being decoded when the
    # governor turned hot may still arrive (on a loaded machine it can be late).
    assert len(during_hot) <= 1 and all(e["event"] == "token" for e in during_hot), during_hot
    assert rest and rest[0]["event"] == "token"
    assert rest[-1]["event"] == "done" and rest[-1]["finish_reason"] == "length"
    assert rest[-1]["usage"]["completion_tokens"] == 120
    logged = [e for e in d.log_events() if e.get("event") == "generation.paused"]
    assert logged and logged[0]["id"] == "long"


def test_hot_pauses_every_stream_of_a_batch_and_all_resume(tmp_path: Path, gemma_path: Path) -> None:
    """Pausing acts on the whole batch: two streams decoding together both stop while hot (at most
    the token in flight each) and both finish, complete, once it cools."""
    cfg, temp, _ = governed(tmp_path, gemma_path, {"engine": {"parallel": 2}})
    ids = ("one", "two")
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with d.client() as a, d.client() as b, d.client() as other:
            wait_status(other, lambda s: (s["governor"] or {}).get("state") == "normal")
            for c, rid in zip((a, b), ids):
                c.send({"id": rid, "prompt": ONCE, "raw": True, "max_tokens": 120, "stream": True})
            for c in (a, b):
                while (event := c.read_event())["event"] == "queued":  # until the worker takes it
                    pass
                assert event["event"] == "token", event
            assert len(wait_status(other, lambda s: len(s["engine"]["running"]) == 2)["engine"]["running"]) == 2
            temp.write_text("79000\n")
            wait_status(other, lambda s: s["governor"]["state"] == "hot")
            queues: dict[str, queue.Queue[dict[str, Any]]] = {rid: queue.Queue() for rid in ids}
            readers = [
                threading.Thread(target=lambda c=c, rid=rid: [queues[rid].put(e) for e in read_until_final(c, rid)])
                for c, rid in zip((a, b), ids)
            ]
            for reader in readers:
                reader.start()
            for rid in ids:
                drain(queues[rid], quiet_for=0.3)  # tokens already in flight or buffered
            during_hot = {rid: drain(queues[rid], quiet_for=1.5) for rid in ids}
            temp.write_text("60000\n")
            for reader in readers:
                reader.join(60)
            rest = {rid: drain(queues[rid], quiet_for=0.0) for rid in ids}
    for rid in ids:
        assert len(during_hot[rid]) <= 1, (rid, during_hot[rid])
        assert rest[rid] and rest[rid][-1]["event"] == "done", rid
        assert rest[rid][-1]["usage"]["completion_tokens"] == 120, rest[rid][-1]
    paused = {e["id"] for e in d.log_events() if e.get("event") == "generation.paused"}
    assert paused == set(ids), paused


def test_critical_stops_generation_with_throttled(tmp_path: Path, gemma_path: Path) -> None:
    cfg, temp, _ = governed(tmp_path, gemma_path)
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with d.client() as c:
            c.send({"id": "long", "prompt": ONCE, "raw": True, "max_tokens": 400, "stream": True})
            assert c.read_event()["event"] == "token"
            temp.write_text("90000\n")
            events = list(read_until_final(c, "long"))
    assert events[-1]["code"] == "throttled"


def test_pause_longer_than_max_pause_stops_with_throttled(tmp_path: Path, gemma_path: Path) -> None:
    cfg, temp, _ = governed(tmp_path, gemma_path, max_pause_s=1.0)
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with d.client() as c:
            c.send({"id": "long", "prompt": ONCE, "raw": True, "max_tokens": 400, "stream": True})
            assert c.read_event()["event"] == "token"
            temp.write_text("79500\n")
            started = time.monotonic()
            events = list(read_until_final(c, "long"))
            waited = time.monotonic() - started
    assert events[-1]["code"] == "throttled"
    assert waited >= 1.0


def test_low_memory_refuses_and_critical_unloads_then_reloads(tmp_path: Path, gemma_path: Path) -> None:
    cfg, _, mem = governed(tmp_path, gemma_path, reload_delay_s=0.5)
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with d.client() as c:
            mem.write_text(meminfo(150))  # below min_available_mb (200)
            wait_status(c, lambda s: (s["governor"] or {}).get("memory_state") == "low")
            low = c.call({"prompt": ONCE, "raw": True, "max_tokens": 2})
            mem.write_text(meminfo(50))  # below critical_available_mb (100)
            unloaded = wait_status(c, lambda s: s["state"] == "unavailable")
            mem.write_text(meminfo(8000))
            wait_status(c, lambda s: s["state"] == "ready", timeout=20)
            ok = c.call({"prompt": ONCE, "raw": True, "max_tokens": 4})
    assert low["code"] == "memory_low" and low["retry_after_ms"] > 0
    assert "memory" in unloaded.get("reason", "")
    assert ok["event"] == "done" and ok["text"].startswith(" girl")


def test_refuses_to_load_a_model_that_does_not_fit(tmp_path: Path, gemma_path: Path) -> None:
    cfg, _, mem = governed(tmp_path, gemma_path)
    mem.write_text(meminfo(400))  # 253 MB model + context + 300 MB reserve do not fit
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with d.client() as c:
            status = c.status()
            err = c.call({"prompt": "hi"})
    assert status["state"] == "unavailable"
    assert "not enough memory to load the model" in status["reason"]
    assert err["code"] == "model_unavailable"


def test_sensor_failures_are_reported_logged_once_and_serving_goes_on(tmp_path: Path, gemma_path: Path) -> None:
    cfg, temp, _ = governed(tmp_path, gemma_path)
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with d.client() as c:
            temp.write_text("not a number\n")
            garbage = wait_status(c, lambda s: any("temp" in e for e in s["governor"]["readings"]["errors"]))
            temp.unlink()
            missing = wait_status(c, lambda s: any("No such file" in e or "not found" in e.lower()
                                                 for e in s["governor"]["readings"]["errors"]))
            time.sleep(1.0)  # ten more ticks: still one log line per episode
            ok = c.call({"prompt": ONCE, "raw": True, "max_tokens": 4})
            temp.write_text("50000\n")
            wait_status(c, lambda s: not s["governor"]["readings"]["errors"])
    assert garbage["state"] == "ready" and missing["state"] == "ready"
    assert ok["event"] == "done"
    failures = [e for e in d.log_events() if e.get("event", "").startswith("sensor.") and "fail" in e["event"]]
    assert 1 <= len(failures) <= 3, failures  # per episode, not per tick (about 20 ticks here)


def test_edgellm_status_shows_the_governor_live(tmp_path: Path, gemma_path: Path) -> None:
    cfg, temp, _ = governed(tmp_path, gemma_path)
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        temp.write_text("72500\n")
        with d.client() as c:
            wait_status(c, lambda s: s["governor"]["state"] == "warm")
        out = subprocess.run(
            [sys.executable, "-m", "daemon", "status", "--socket", str(d.socket_path)],
            capture_output=True, text=True, cwd=REPO, timeout=30, check=True,
        ).stdout
    assert "governor" in out and "warm" in out
    assert "72.5 °C" in out


def test_hot_fleet_member_leaves_the_shared_subscription_and_rejoins(tmp_path: Path, gemma_path: Path) -> None:
    """A member that cannot take work must not be handed any: when hot it unsubscribes from the
    shared fleet topic (the broker routes to its peers) and its MQTT status says why."""
    from tests.mqtt_broker import MosquittoBroker, Probe
    from tests.test_mqtt_daemon import mqtt_overrides

    with MosquittoBroker(tmp_path / "broker") as broker:
        temp = tmp_path / "temp"
        temp.write_text("50000\n")
        mem = tmp_path / "meminfo"
        mem.write_text(meminfo(8000))
        overrides = merge(
            mqtt_overrides(broker, "hotnode", fleet={"enabled": True, "topic": "fleet/gov/request"}),
            {"governor": {"enabled": True, "interval_s": 0.1, "temperature_files": [str(temp)],
                          "meminfo_file": str(mem), "psi_file": "", "vcgencmd_command": ""}},
        )
        with DaemonProcess(write_config(tmp_path / "d", gemma_path, overrides)) as d:
            d.wait_ready()
            with d.client() as c, Probe(broker, ["edgellm/hotnode/status"]) as probe:
                wait_status(c, lambda s: s["mqtt"]["fleet"]["member"], timeout=30)
                temp.write_text("80000\n")
                hot = wait_status(c, lambda s: not s["mqtt"]["fleet"]["member"])
                # The retained status topic tells the rest of the house, too.
                probe.wait_for(lambda m: (m.json.get("governor") or {}).get("state") == "hot", timeout=10)
                temp.write_text("55000\n")
                back = wait_status(c, lambda s: s["mqtt"]["fleet"]["member"], timeout=15)
    assert hot["governor"]["state"] == "hot" and not hot["governor"]["admit"]
    assert back["governor"]["state"] == "normal"


def test_warm_threads_apply_to_the_batch_and_come_back_after_a_warm_spell_between_jobs(
    tmp_path: Path, gemma_path: Path
) -> None:
    cfg, temp, _ = governed(tmp_path, gemma_path, warm_n_threads=1)
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with d.client() as c:
            wait_status(c, lambda s: (s["governor"] or {}).get("state") == "normal")
            c.call({"prompt": ONCE, "raw": True, "max_tokens": 2})
            assert c.status()["engine"]["n_threads"] == 2
            temp.write_text("72000\n")  # warm
            wait_status(c, lambda s: s["governor"]["state"] == "warm")
            c.call({"prompt": ONCE, "raw": True, "max_tokens": 2})
            assert c.status()["engine"]["n_threads"] == 1
            temp.write_text("50000\n")  # the warm spell ends while nothing runs
            wait_status(c, lambda s: s["governor"]["state"] == "normal")
            done = c.call({"prompt": ONCE, "raw": True, "max_tokens": 2})
            assert done["event"] == "done" and c.status()["engine"]["n_threads"] == 2
