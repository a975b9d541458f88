"""sd_notify and socket activation against real AF_UNIX sockets (and systemd's own activator)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from daemon import sdnotify

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound where systemd would listen, and $NOTIFY_SOCKET pointing at it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_unset_notify_socket_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with structlog.testing.capture_logs() as logs:
        assert sdnotify.notify("READY=1") is False
        assert sdnotify.ready() is False
        assert sdnotify.watchdog() is False
    assert logs == []


def test_each_helper_sends_the_documented_assignment(notify_socket: socket.socket) -> None:
    assert sdnotify.ready() is True
    assert _receive(notify_socket) == "READY=1"
    assert sdnotify.ready("serving gemma-3-270m") is True
    assert _receive(notify_socket) == "READY=1\nSTATUS=serving gemma-3-270m"
    assert sdnotify.stopping() is True
    assert _receive(notify_socket) == "STOPPING=1"
    assert sdnotify.watchdog() is True
    assert _receive(notify_socket) == "WATCHDOG=1"
    assert sdnotify.extend_timeout(90) is True
    assert _receive(notify_socket) == "EXTEND_TIMEOUT_USEC=90000000"


def test_status_is_one_line_so_it_cannot_inject_assignments(notify_socket: socket.socket) -> None:
    assert sdnotify.status("ready · queue 2/16\nREADY=1") is True
    assert _receive(notify_socket) == "STATUS=ready · queue 2/16 READY=1"


def test_reloading_carries_the_monotonic_timestamp(notify_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = _receive(notify_socket).split("\n")
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert sdnotify.reloading(now_monotonic_usec=42) is True
    assert _receive(notify_socket) == "RELOADING=1\nMONOTONIC_USEC=42"


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edgellm-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1") is True
        assert sock.recv(100) == b"READY=1"


def test_socket_gone_is_logged_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    with structlog.testing.capture_logs() as logs:
        assert sdnotify.watchdog() is False
    assert logs[0]["event"] == "sdnotify.send_failed"
    assert logs[0]["log_level"] == "warning"


def test_unsupported_address_family_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with structlog.testing.capture_logs() as logs:
        assert sdnotify.ready() is False
    assert logs[0]["event"] == "sdnotify.unsupported_socket"


def test_same_datagram_format_as_systemd_notify(notify_socket: socket.socket) -> None:
    """systemd's own client writes what our helper writes, so the test receiver reads the real protocol."""
    tool = shutil.which("systemd-notify")
    if tool is None:
        pytest.skip("systemd-notify not installed")
    subprocess.run([tool, "--no-block", "--status=hello"], check=True, env=dict(os.environ))
    assert _receive(notify_socket) == "STATUS=hello"
    sdnotify.status("hello")
    assert _receive(notify_socket) == "STATUS=hello"


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval_s({}) is None
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 30.0
    # Inherited by a child: the watchdog belongs to another process.
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    with structlog.testing.capture_logs() as logs:
        assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
    assert logs[0]["event"] == "sdnotify.bad_watchdog_usec"


def test_listen_fds_without_activation_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert sdnotify.listen_fds() == []


def test_listen_fds_meant_for_another_process_are_not_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert sdnotify.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ  # unset like sd_listen_fds(1), so nobody else takes fd 3


_CHILD = """
import os, socket, sys
sys.path.insert(0, {repo!r})
from daemon import sdnotify
pairs = sdnotify.listen_fds_with_names()
assert "LISTEN_FDS" not in os.environ
name, listener = pairs[0]
conn, _ = listener.accept()
inheritable = os.get_inheritable(listener.fileno())
conn.sendall(f"{{len(pairs)}} {{name}} {{listener.fileno()}} {{listener.family.name}} {{listener.type.name}} "
             f"inheritable={{inheritable}}".encode())
conn.close()
"""


def test_socket_activation_through_systemd_socket_activate(tmp_path: Path) -> None:
    """systemd-socket-activate sets LISTEN_* exactly as PID 1 does and starts us on the first connect."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate not installed")
    sock_path = tmp_path / "edgellm.sock"
    proc = subprocess.Popen(
        [tool, "-l", str(sock_path), "--fdname=edgellm", sys.executable, "-c", _CHILD.format(repo=str(REPO))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock_path.exists():
            assert time.monotonic() < deadline, "activator never listened"
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(sock_path))  # a client may connect before the daemon even runs
            reply = client.recv(200).decode()
        assert proc.wait(timeout=10) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert reply == "1 edgellm 3 AF_UNIX SOCK_STREAM inheritable=False"
