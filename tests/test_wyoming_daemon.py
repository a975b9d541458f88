"""The Wyoming door in a real daemon with the bundled model, driven by the `wyoming` package's own
client; the zeroconf announcement registered on loopback and browsed locally."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from wyoming.asr import Transcript
from wyoming.client import AsyncTcpClient
from wyoming.handle import Handled, NotHandled
from wyoming.info import Describe, Info

from daemon.transports.wyoming import SPOKEN
from tests.helpers import DaemonProcess, free_port, wait_status, write_config
from tests.test_http_daemon import hot_governor


def wyoming_daemon(tmp: Path, model: Path, **extra: Any) -> tuple[DaemonProcess, int]:
    port = free_port()
    wyoming = {"enabled": True, "port": port, **extra.pop("wyoming", {})}
    return DaemonProcess(write_config(tmp, model, {"wyoming": wyoming, **extra})), port


async def exchange(port: int, event: Any, timeout: float = 120) -> Any:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(event.event())
        return await asyncio.wait_for(client.read_event(), timeout)


def test_describe_info_and_transcript_handled(tmp_path: Path, gemma_path: Path) -> None:
    daemon, port = wyoming_daemon(tmp_path, gemma_path)
    with daemon:
        daemon.wait_ready()
        started = time.monotonic()
        info_event = asyncio.run(exchange(port, Describe(), timeout=1.0))
        info_s = time.monotonic() - started
        answer = asyncio.run(exchange(port, Transcript(text="What is the capital of France?", language="en")))
    assert Info.is_type(info_event.type)
    info = Info.from_event(info_event)
    (program,) = info.handle
    assert program.name == "edgellm" and program.installed and program.version
    assert program.attribution.name and program.description and program.supports_handled_streaming is False
    (model,) = program.models
    assert model.name == "gemma-3-270m" and model.languages == [] and model.installed
    assert info_s < 1.0
    assert Handled.is_type(answer.type), answer
    assert Handled.from_event(answer).text
    finished = [e for e in daemon.log_events() if e.get("event") == "request.finished"]
    assert finished and finished[-1]["transport"] == "wyoming"


def test_throttled_is_not_handled_with_a_sentence_to_speak(tmp_path: Path, gemma_path: Path) -> None:
    daemon, port = wyoming_daemon(tmp_path, gemma_path, governor=hot_governor(tmp_path))
    with daemon:
        daemon.wait_ready()
        with daemon.client() as client:
            wait_status(client, lambda s: (s["governor"] or {}).get("state") == "hot")
        answer = asyncio.run(exchange(port, Transcript(text="Turn on the lights")))
        empty = asyncio.run(exchange(port, Transcript(text="  ")))
    assert NotHandled.is_type(answer.type)
    assert NotHandled.from_event(answer).text == SPOKEN["throttled"]
    assert NotHandled.is_type(empty.type) and NotHandled.from_event(empty).text


def test_zeroconf_announces_the_service_on_loopback(tmp_path: Path, gemma_path: Path) -> None:
    zeroconf = pytest.importorskip("zeroconf")
    from zeroconf import IPVersion, ServiceBrowser, ServiceListener, Zeroconf

    found: list[str] = []

    class Listener(ServiceListener):
        def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            found.append(name)

        def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            pass

        def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            pass

    try:
        browser_zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    except OSError as exc:
        pytest.skip(f"no multicast on loopback here: {exc}")
    daemon, port = wyoming_daemon(tmp_path, gemma_path, wyoming={"zeroconf": True})
    try:
        ServiceBrowser(browser_zc, "_wyoming._tcp.local.", Listener())
        with daemon:
            daemon.wait_ready()
            deadline = time.monotonic() + 10
            while not found and time.monotonic() < deadline:
                time.sleep(0.1)
            announced = [e for e in daemon.log_events() if e.get("event") == "wyoming.announced"]
            if not found and announced:
                pytest.skip("announced, but multicast does not loop back on this machine's lo interface")
            info = browser_zc.get_service_info("_wyoming._tcp.local.", found[0], timeout=3000) if found else None
    finally:
        browser_zc.close()
    assert announced and announced[0]["address"] == "127.0.0.1"
    assert found and found[0].startswith("edgellm-") and zeroconf is not None
    assert info is not None and info.port == port
