"""Issue 11's defects and limits, tried as a user would: a real daemon, its socket, its CLI."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO, DaemonProcess, wait_status, write_config
from tests.test_governor_daemon import governed, meminfo
from tests.test_service_lifecycle import wait_log


def test_a_huge_integer_answers_invalid_request_with_the_id(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        c.send_raw(b'{"id": "huge-1", "prompt": "hi", "temperature": 1' + b"0" * 400 + b"}\n")
        event = c.read_event()
        assert event["id"] == "huge-1" and event["event"] == "error"
        assert event["code"] == "invalid_request"
        assert event["message"] == "temperature: must be between 0.0 and 5.0, got an integer of about 401 digits"
        # Huge in an integer field too, and the connection keeps serving.
        c.send_raw(b'{"id": "huge-2", "prompt": "hi", "max_tokens": -9' + b"9" * 400 + b"}\n")
        event = c.read_event()
        assert (event["id"], event["code"]) == ("huge-2", "invalid_request") and len(event["message"]) < 120
        done = c.call({"id": "after", "prompt": "Once upon a time", "raw": True, "max_tokens": 3})
        assert done["event"] == "done"
    assert not [e for e in shared_daemon.log_events() if e.get("event") == "socket.internal_error"]


def test_error_messages_quote_only_a_short_prefix(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as c:
        reply = c.call({"op": "x" * 100_000})
        assert reply["code"] == "invalid_request" and len(reply["message"]) < 200
        assert '…" (100000 characters)' in reply["message"]
        reply = c.call({"id": "k", "prompt": "x", "y" * 100_000: 1})
        assert reply["id"] == "k" and len(reply["message"]) < 400


def test_limits_over_the_socket_and_reloaded_by_sighup(tmp_path: Path, gemma_path: Path) -> None:
    limits = {"max_tokens": 64, "max_prompt_bytes": 1000, "max_stop": 2, "max_stop_chars": 8, "max_messages": 3,
              "max_json_depth": 4}
    cfg = write_config(tmp_path, gemma_path, {"limits": limits})
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with d.client() as c:
            cases = {
                "mt": ({"max_tokens": 65}, "max_tokens: 65 is more than limits.max_tokens (64)"),
                "pb": ({"prompt": "p" * 1001}, "prompt: 1001 bytes of text, more than limits.max_prompt_bytes (1000)"),
                "sc": ({"stop": ["a", "b", "c"]}, "stop: 3 strings, more than limits.max_stop (2)"),
                "sl": ({"stop": ["123456789"]}, "stop[0]: 9 characters, more than limits.max_stop_chars (8)"),
                "jd": ({"stop": [[[["a"]]]]}, "request: nested more than 4 levels deep (limits.max_json_depth)"),
            }
            for request_id, (fields, message) in cases.items():
                reply = c.call({"id": request_id, "prompt": "hi", **fields})
                assert (reply["id"], reply["code"], reply["message"]) == (request_id, "invalid_request", message)
            many = [{"role": "user", "content": "u"}] * 4
            reply = c.call({"id": "mm", "messages": many})
            assert reply["message"] == "messages: 4 messages, more than limits.max_messages (3)"
            ok = c.call({"id": "ok", "prompt": "Once", "raw": True, "max_tokens": 3, "stop": ["zz", "12345678"]})
            assert ok["event"] == "done"
        # generation.max_tokens is 32 in the test config: the new ceiling stays above it.
        cfg.write_text(cfg.read_text().replace("max_tokens = 64\n", "max_tokens = 40\n", 1))
        d.signal(signal.SIGHUP)
        wait_log(d, "config.reloaded")
        with d.client() as c:
            reply = c.call({"id": "after", "prompt": "hi", "max_tokens": 41})
            assert reply["message"] == "max_tokens: 41 is more than limits.max_tokens (40)"


def test_sighup_with_the_governor_disabled_stops_it(tmp_path: Path, gemma_path: Path) -> None:
    cfg, temp, mem = governed(tmp_path, gemma_path)
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with d.client() as c:
            wait_status(c, lambda s: (s["governor"] or {}).get("state") == "normal")
            temp.write_text("90000\n")  # critical: nothing is admitted
            wait_status(c, lambda s: s["governor"]["state"] == "critical")
            assert c.call({"id": "hot", "prompt": "x", "max_tokens": 2})["code"] == "throttled"
        # Disable the governor and change a sensor key in the same reload: the sensors must stop,
        # not be reconfigured, and the last (critical) decision must not keep refusing work.
        text = cfg.read_text().replace("enabled = true", "enabled = false")
        text = text.replace("interval_s = 0.1", "interval_s = 0.2")
        cfg.write_text(text)
        d.signal(signal.SIGHUP)
        with d.client() as c:
            status = wait_status(c, lambda s: (s["governor"] or {}).get("reason") == "governor disabled")
            assert status["governor"]["admit"] is True
            mem.write_text(meminfo(10))  # would be memory critical if anyone still read it
            time.sleep(0.6)
            done = c.call({"id": "cool", "prompt": "Once upon a time", "raw": True, "max_tokens": 3})
            assert done["event"] == "done"
            assert c.status()["governor"]["reason"] == "governor disabled"
    events = [e.get("event") for e in d.log_events()]
    assert "governor.stopped" in events and "governor.reconfigured" not in events


def test_status_cli_shows_firmware_throttle_flags(tmp_path: Path, gemma_path: Path) -> None:
    """Producer (the sensors' vcgencmd reading) -> status -> the `edgellm status` table."""
    fake = tmp_path / "vcgencmd"
    fake.write_text("#!/bin/sh\necho throttled=0x50005\n")
    fake.chmod(0o755)
    cfg, _, _ = governed(tmp_path, gemma_path, vcgencmd_command=f"{fake} get_throttled")
    with DaemonProcess(cfg) as d:
        d.wait_ready()
        with d.client() as c:
            status = wait_status(c, lambda s: ((s["governor"] or {}).get("readings") or {}).get("throttled"))
        assert status["governor"]["readings"]["throttled"]["active"] == [
            "under_voltage", "throttled", "under_voltage_occurred", "throttled_occurred"
        ]
        out = subprocess.run(
            [sys.executable, "-m", "daemon", "status", "--socket", str(d.socket_path)],
            capture_output=True, text=True, timeout=30, cwd=str(REPO),
        )
    assert out.returncode == 0, out.stderr
    firmware = [line.split(None, 1)[1] for line in out.stdout.splitlines() if line.startswith("firmware")]
    assert firmware == ["under_voltage", "throttled", "under_voltage_occurred", "throttled_occurred"]
