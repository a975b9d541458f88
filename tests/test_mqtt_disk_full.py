"""Issue 11 §5 for the MQTT door: `state_dir` full. The daemon's state_dir is a 1 MB tmpfs that the
test fills up. A QoS 1 request whose answer cannot be journalled is not published and not
acknowledged: status and logs say why, the socket keeps answering, and the answer goes out as soon
as the disk has room again. If the daemon dies meanwhile, the broker still has the request and the
next start answers it."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProcess, wait_status, write_config
from tests.mqtt_broker import MosquittoBroker, Probe
from tests.test_mqtt_daemon import mqtt_overrides, wait_online

NODE = "full"
INBOX = "client/full"


@pytest.fixture()
def small_state_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for state_dir (needs root): {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def ask(probe: Probe, rid: str) -> None:
    probe.publish(f"edgellm/{NODE}/request", {"id": rid, "prompt": "hi", "max_tokens": 3}, response_topic=INBOX)


def finals(probe: Probe, rid: str) -> list[dict[str, Any]]:
    return [e for e in probe.events(rid) if e.get("event") in ("done", "error")]


def test_answers_that_cannot_be_journalled_wait_unacknowledged_until_the_disk_has_room(
    tmp_path: Path, tiny_olmo_path: Path, small_state_dir: Path
) -> None:
    with MosquittoBroker(tmp_path / "broker") as broker:
        overrides = mqtt_overrides(broker, NODE)
        overrides["state_dir"] = str(small_state_dir)
        config = write_config(tmp_path / "d", tiny_olmo_path, overrides)
        daemon = DaemonProcess(config)
        try:
            daemon.wait_ready()
            wait_online(broker, f"edgellm/{NODE}")
            with Probe(broker, [INBOX], persistent=True, client_id="probe-full") as probe, daemon.client() as client:
                # Served once the disk is back, without a restart.
                filler = fill(small_state_dir)
                ask(probe, "r1")
                held = wait_status(client, lambda s: s["mqtt"]["journal"]["held"] == 1, timeout=60)
                assert held["mqtt"]["journal"]["ok"] is False
                assert "full" in held["mqtt"]["journal"]["error"], held["mqtt"]["journal"]
                logged = [e for e in daemon.log_events() if e.get("event") == "mqtt.journal_write_failed"]
                assert logged and logged[0]["id"] == "r1" and "state_dir" in logged[0]["hint"]
                # The socket keeps answering while the MQTT answer waits.
                assert client.call({"prompt": "hi", "max_tokens": 2})["event"] == "done"
                time.sleep(1.5)
                assert finals(probe, "r1") == []
                filler.unlink()
                done = probe.wait_final("r1", timeout=30)
                assert done["event"] == "done"
                wait_status(client, lambda s: s["mqtt"]["journal"]["ok"] and s["mqtt"]["journal"]["held"] == 0)

                # Not acknowledged while held: a daemon killed meanwhile gets it again on its next start.
                filler = fill(small_state_dir)
                ask(probe, "r2")
                wait_status(client, lambda s: s["mqtt"]["journal"]["held"] == 1, timeout=60)
                daemon.signal(signal.SIGKILL)
                daemon.wait(10)
                assert finals(probe, "r2") == []
                filler.unlink()
                daemon.stop()
                daemon = DaemonProcess(config)
                daemon.wait_ready()
                second = probe.wait_final("r2", timeout=60)
                time.sleep(0.5)
                assert second["event"] == "done"
                assert len(finals(probe, "r1")) == 1 and len(finals(probe, "r2")) == 1
        finally:
            daemon.stop()
