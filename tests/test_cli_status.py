"""`edgellm status` against daemons that misbehave: an error line and exit 1, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.cli import format_status
from tests.helpers import REPO


class FakeDaemon:
    """A real Unix socket server whose answer to a connection is `behave(conn)`."""

    def __init__(self, path: Path, behave: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.behave = behave
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self.behave(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def close_at_once(conn: socket.socket) -> None:
    conn.close()


def read_then_close(conn: socket.socket) -> None:
    conn.recv(1024)
    conn.close()


def never_answer(conn: socket.socket) -> None:
    pass  # keeps the connection open and silent


def answer_garbage(conn: socket.socket) -> None:
    conn.recv(1024)
    conn.sendall(b"this is not json\n")


def refuse(conn: socket.socket) -> None:  # what a daemon says to a peer not in socket.allowed_uids
    conn.sendall(b'{"id":null,"event":"error","code":"forbidden","message":"uid 1000 (gid 1000) may not use '
                 b'this socket (socket.allowed_uids / allowed_gids)"}\n')
    conn.close()


def answer_an_array(conn: socket.socket) -> None:
    conn.recv(1024)
    conn.sendall(b"[1, 2]\n")


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[[Callable[[socket.socket], None]], Path]]:
    made: list[FakeDaemon] = []

    def start(behave: Callable[[socket.socket], None]) -> Path:
        path = tmp_path / f"fake-{len(made)}.sock"
        made.append(FakeDaemon(path, behave))
        return path

    yield start
    for daemon in made:
        daemon.close()


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=timeout, cwd=str(REPO)
    )


@pytest.mark.parametrize(
    ("behave", "message"),
    [
        (close_at_once, "connection"),
        (read_then_close, "connection closed by the daemon"),
        (answer_garbage, "not JSON"),
        (answer_an_array, "not an event"),
        (refuse, "error [forbidden]: uid 1000 (gid 1000) may not use this socket"),
    ],
)
def test_status_against_a_daemon_that_closes_or_talks_nonsense(
    fake: Callable[[Callable[[socket.socket], None]], Path], behave: Callable[[socket.socket], None], message: str
) -> None:
    done = run_cli("status", "--socket", str(fake(behave)), "--timeout", "5")
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.startswith("edgellm: ") and message in done.stderr


def test_status_against_a_daemon_that_never_answers(fake: Callable[[Callable[[socket.socket], None]], Path]) -> None:
    done = run_cli("status", "--socket", str(fake(never_answer)), "--timeout", "0.5")
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    assert "edgellm: no answer from the daemon within 0.5 s" in done.stderr


def test_status_has_a_default_timeout(fake: Callable[[Callable[[socket.socket], None]], Path]) -> None:
    """Without --timeout a stuck daemon does not hang `edgellm status` forever."""
    done = run_cli("status", "--socket", str(fake(never_answer)), timeout=60.0)
    assert done.returncode == 1 and "no answer from the daemon within 10 s" in done.stderr


def test_ask_against_a_daemon_that_closes_early(fake: Callable[[Callable[[socket.socket], None]], Path]) -> None:
    done = run_cli("ask", "hi", "--socket", str(fake(read_then_close)), "--timeout", "5")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "connection closed by the daemon" in done.stderr


def test_status_table_shows_the_engine_and_says_when_no_model_is_loaded() -> None:
    engine = {"parallel": 4, "running": ["a", "b"], "suspended": [], "n_threads": 2, "kv_type": "f16",
              "kv_bytes": 37_748_736, "kv_cells": 2048, "kv_cells_reserved": 300,
              "batch": {"adaptive": True, "width": 1, "tokens_per_second": {"1": 88.0, "2": 64.0}},
              "prefix_cache": {"entries": 3, "bytes": 12_000_000, "hits": 5, "misses": 2},
              "keep_alive_s": -1, "last_cold_start_ms": 1234.5}
    loaded = format_status({"state": "busy", "model": {"name": "m", "size_bytes": 1}, "engine": engine})
    assert "2/4 streams running, 1 per step, 0 suspended, 2 threads" in loaded
    assert "f16, 38 MB, 300/2048 cells reserved" in loaded and "3 entries, 12 MB, 5 hits, 2 misses" in loaded
    idle = format_status({"state": "idle", "model": None, "engine": {**engine, "running": []}})
    assert "0/4 streams running, 0 suspended, model not loaded" in idle
    assert "cells reserved" not in idle  # no KV cache is allocated while unloaded
    assert "last cold start 1.2 s" in loaded and "unloaded after" not in loaded  # kept loaded: -1
    unloading = format_status({"state": "idle", "model": None, "engine": {**engine, "keep_alive_s": 300}})
    assert "last cold start 1.2 s, unloaded after 300 s idle" in unloading
