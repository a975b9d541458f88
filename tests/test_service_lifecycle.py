"""What systemd sees of a real daemon: sd_notify datagrams, the watchdog, SIGHUP reloads."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProcess, base_config, merge, read_until_final, toml_dumps, wait_status, write_config

ONCE = "Once upon a time, there was a little"


class NotifyListener:
    """A datagram socket where systemd's would be; records (time, message) pairs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self) -> list[str]:
        return [m for _, m in self.messages]

    def times_of(self, text: str) -> list[float]:
        return [t for t, m in self.messages if text in m.split("\n")]

    def wait_for(self, text: str, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            times = self.times_of(text)
            if times:
                return times[0]
            time.sleep(0.02)
        raise AssertionError(f"{text!r} never arrived; got {self.lines()}")

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_ready_after_load_status_watchdog_and_stopping(
    tmp_path: Path, gemma_path: Path, notify: NotifyListener
) -> None:
    cfg = write_config(tmp_path, gemma_path)
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    with DaemonProcess(cfg, env=env) as d:
        ready_at = notify.wait_for("READY=1")
        # READY only once the model is loaded and the socket answers.
        with d.client() as c:
            assert c.health()["state"] == "ready"
        loaded = [e for e in d.log_events() if e.get("event") == "model.loaded"]
        assert loaded, "READY=1 before the model was loaded"
        time.sleep(1.0)
        pings = [t for t in notify.times_of("WATCHDOG=1") if t > ready_at]
        assert len(pings) >= 5  # every WATCHDOG_USEC/2 = 0.1 s
        statuses = [m for m in notify.lines() if m.startswith("STATUS=")]
        assert any("ready" in s and "Gemma" in s and "queue 0/8" in s for s in statuses), statuses
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0
    notify.wait_for("STOPPING=1", timeout=5)


def test_watchdog_stops_pinging_while_the_inference_thread_is_stuck(
    tmp_path: Path, gemma_path: Path, notify: NotifyListener
) -> None:
    # One prompt-evaluation step of ~1800 tokens in a single batch takes far longer than the 0.3 s
    # stall limit on this hardware: a real stuck step, not a simulated one.
    cfg = write_config(
        tmp_path, gemma_path,
        {"model": {"n_ctx": 2048}, "engine": {"n_batch": 2048, "prompt_chunk": 2048},
         "service": {"watchdog_stall_s": 0.3}},
    )
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "100000"}
    with DaemonProcess(cfg, env=env) as d:
        notify.wait_for("READY=1")
        time.sleep(0.5)
        with d.client() as c:
            sent = time.monotonic()
            done = c.call({"prompt": "story " * 1800, "raw": True, "max_tokens": 2})
            finished = time.monotonic()
        time.sleep(0.5)
    assert done["event"] == "done", done
    assert done["timings"]["prompt_ms"] > 600, "the step was too quick to test the watchdog"
    pings = notify.times_of("WATCHDOG=1")
    during = [t for t in pings if sent < t < finished]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) > 0.5, "pings went on while the inference thread was stuck"
    assert len(during) < (finished - sent) / 0.05 / 2
    assert [t for t in pings if t > finished], "pings did not resume after the step returned"
    events = [e["event"] for e in d.log_events()]
    assert "watchdog.stalled" in events and "watchdog.recovered" in events


def test_sighup_good_and_bad_config_with_a_client_streaming_throughout(
    tmp_path: Path, gemma_path: Path, tiny_olmo_path: Path, notify: NotifyListener
) -> None:
    base = base_config(tmp_path, gemma_path)
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(toml_dumps(base))
    env = {"NOTIFY_SOCKET": str(notify.path)}
    with DaemonProcess(cfg_path, env=env) as d:
        d.wait_ready()
        with d.client() as streamer, d.client() as c:
            streamer.send({"id": "stream", "prompt": ONCE, "raw": True, "max_tokens": 150, "stream": True})
            assert streamer.read_event()["event"] == "token"

            # 1. a good config: live changes apply, the stream goes on
            cfg_path.write_text(toml_dumps(merge(base, {"queue": {"max_depth": 3}, "logging": {"level": "info"}})))
            d.signal(signal.SIGHUP)
            wait_status(c, lambda s: s["queue"]["max_depth"] == 3)

            # 2. a bad config: rejected with its errors, the old one stays
            cfg_path.write_text(toml_dumps(merge(base, {"queue": {"max_depth": 0, "max_dept": 5}})))
            d.signal(signal.SIGHUP)
            wait_log(d, "config.reload_rejected")
            assert c.status()["queue"]["max_depth"] == 3

            # 3. a new model path that fails to load: the old model keeps serving
            broken = tmp_path / "broken.gguf"
            broken.write_bytes(b"GGUF" + b"\0" * 32)
            cfg_path.write_text(toml_dumps(merge(base, {"model": {"path": str(broken)}})))
            d.signal(signal.SIGHUP)
            wait_log(d, "config.reload_model_failed")
            assert c.status()["model"]["arch"] == "gemma3"

            events = list(read_until_final(streamer, "stream"))
            assert events[-1]["event"] == "done" and events[-1]["usage"]["completion_tokens"] == 150

            # 4. a new model that loads: swapped in, the next request uses it
            cfg_path.write_text(toml_dumps(merge(base, {"model": {"path": str(tiny_olmo_path), "n_ctx": 256}})))
            d.signal(signal.SIGHUP)
            wait_status(c, lambda s: (s["model"] or {}).get("arch") == "olmo2" or s.get("state") != "ready",
                        timeout=30)
            answer = c.call({"prompt": "hi", "max_tokens": 3})
            assert c.status()["model"]["arch"] == "olmo2"
    assert answer["event"] == "done"
    rejected = next(e for e in d.log_events() if e.get("event") == "config.reload_rejected")
    assert any("queue.max_depth" in err for err in rejected["errors"])
    assert any("max_dept" in err for err in rejected["errors"])
    reloads = [m for m in notify.lines() if m.startswith("RELOADING=1")]
    assert len(reloads) == 4
    assert all("MONOTONIC_USEC=" in m for m in reloads)
    assert len(notify.times_of("READY=1")) >= 5  # start + after each reload


def wait_log(d: DaemonProcess, event: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in d.log_events() if e.get("event") == event]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, f"no {event} in log"
        time.sleep(0.05)


def test_socket_activation_serves_on_the_inherited_socket(tmp_path: Path, gemma_path: Path) -> None:
    """systemd-socket-activate passes the listening socket as fd 3 (LISTEN_FDS), as PID 1 does:
    the daemon serves on it without binding, and leaves the path to the socket unit."""
    import shutil
    import subprocess
    import sys

    from daemon.client import Client

    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate is part of the systemd package the setup installs"
    activated = tmp_path / "activated.sock"
    cfg = write_config(tmp_path, gemma_path)  # its own socket.path differs: it must not be used
    proc = subprocess.Popen(
        [tool, "-l", str(activated), sys.executable, "-m", "daemon", "serve", "--config", str(cfg)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not activated.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Connecting starts the daemon; the request waits in the queue until the model is loaded.
        with Client(activated, timeout=60) as c:
            done = c.call({"prompt": ONCE, "raw": True, "max_tokens": 4})
        assert done["event"] == "done" and done["text"].startswith(" girl")
        assert not (tmp_path / "edgellm.sock").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert activated.exists()  # the socket unit's file, not ours to remove
