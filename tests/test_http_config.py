"""[http] and [wyoming]: the secure-by-default rules, and the doors following the config on SIGHUP."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.config import ConfigError, is_loopback_host, load_config
from tests.helpers import DaemonProcess, free_port, merge, toml_dumps, write_config
from tests.helpers import base_config as daemon_config


def errors(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.errors


def test_defaults_are_off_and_on_loopback(tmp_path: Path) -> None:
    cfg = load_config(None)
    assert (cfg.http.enabled, cfg.http.host, cfg.http.port, cfg.http.api_key_file) == (False, "127.0.0.1", 11434, "")
    assert (cfg.wyoming.enabled, cfg.wyoming.host, cfg.wyoming.port, cfg.wyoming.zeroconf) == (
        False, "127.0.0.1", 10700, False)


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.5.5.5", True), ("::1", True),
                                                ("localhost", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                                ("pi.local", False), ("::", False)])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_non_loopback_without_a_key_is_an_error_naming_the_way_out(tmp_path: Path) -> None:
    (error,) = errors(tmp_path, '[http]\nenabled = true\nhost = "0.0.0.0"\n')
    assert "http.api_key_file: must be set" in error and "allow_unauthenticated" in error


def test_non_loopback_with_a_key_or_explicitly_unauthenticated_is_allowed(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[http]\nenabled = true\nhost = "0.0.0.0"\napi_key_file = "key"\n')
    assert load_config(path).http.api_key_file == str(tmp_path / "key")  # resolved against the file's folder
    path.write_text('[http]\nenabled = true\nhost = "0.0.0.0"\nallow_unauthenticated = true\n')
    assert load_config(path).http.allow_unauthenticated


def test_the_two_doors_cannot_share_a_port(tmp_path: Path) -> None:
    (error,) = errors(tmp_path, "[http]\nenabled = true\nport = 9000\n[wyoming]\nenabled = true\nport = 9000\n")
    assert error.endswith("wyoming.port: must differ from http.port (both 9000)")


def test_unreadable_key_file_fails_the_start_with_a_clear_log(tmp_path: Path, gemma_path: Path) -> None:
    cfg = write_config(tmp_path, gemma_path, {"http": {"enabled": True, "port": free_port(),
                                                       "api_key_file": str(tmp_path / "missing")}})
    with DaemonProcess(cfg) as daemon:
        assert daemon.wait(60) == 1
    assert "http.api_key_file: cannot read" in daemon.log()


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        # A connection the kernel accepted while the door was closing gets no answer: a read
        # timeout (seen in CI). The socket's `health` after the loop shows the daemon still serves.
        return False


def until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_sighup_starts_moves_and_stops_the_http_door(tmp_path: Path, gemma_path: Path) -> None:
    first, second = free_port(), free_port()
    path = write_config(tmp_path, gemma_path)
    base = daemon_config(tmp_path, gemma_path)
    with DaemonProcess(path) as daemon:
        daemon.wait_ready()
        assert not answers(first)
        path.write_text(toml_dumps(merge(base, {"http": {"enabled": True, "port": first}})))
        daemon.signal(signal.SIGHUP)
        assert until(lambda: answers(first)), daemon.log()
        path.write_text(toml_dumps(merge(base, {"http": {"enabled": True, "port": second}})))
        daemon.signal(signal.SIGHUP)
        assert until(lambda: answers(second) and not answers(first)), daemon.log()
        path.write_text(toml_dumps(merge(base, {"http": {"enabled": False, "port": second}})))
        daemon.signal(signal.SIGHUP)
        assert until(lambda: not answers(second)), daemon.log()
        with daemon.client() as client:
            assert client.health()["state"] == "ready"
