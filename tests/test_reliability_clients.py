"""Slow, stuck and short-lived socket clients (issue 11 §4) against a real `edgellm serve` (the real
Gemma 3 270M): a client that never reads, and clients that stall mid-line, block neither other
clients nor the inference thread; 1,000 connect/disconnect cycles leak neither fds nor RSS.
Figures: docs/reliability.md.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProcess, write_config
from tests.reliability import NO_MMAP, op_call, report, rss_kb, settle_fds
from tests.test_reliability_load import ANSWER_TIMEOUT_S, ONCE, quiet

pytestmark = pytest.mark.soak

WRITE_BUFFER = 65536  # socket.max_write_buffer_bytes of this daemon: a non-reader is dropped past it


@pytest.fixture(scope="module")
def socket_daemon(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("slow-clients")
    overrides = {
        **NO_MMAP,
        "model": {"n_ctx": 256},
        "socket": {"max_write_buffer_bytes": WRITE_BUFFER},
        "queue": {"max_depth": 32},
        "logging": {"level": "info"},
    }
    with DaemonProcess(write_config(tmp, gemma_path, overrides)) as d:
        d.wait_ready()
        yield d


def answer(daemon: DaemonProcess, request: dict[str, Any] = ONCE) -> tuple[str, float]:
    started = time.monotonic()
    with daemon.client(timeout=ANSWER_TIMEOUT_S) as c:
        done = c.call(dict(request))
    assert done["event"] == "done", done
    return str(done["text"]), time.monotonic() - started


def raw_connect(daemon: DaemonProcess, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(str(daemon.socket_path))
    return sock


def drain(sock: socket.socket, timeout: float = 30.0) -> tuple[bytes, bool]:
    """Read what the daemon sent until it closes the connection (True) or `timeout` passes with
    the connection still open (False)."""
    data = b""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def test_a_client_that_never_reads_blocks_neither_others_nor_the_model(socket_daemon: DaemonProcess) -> None:
    daemon = socket_daemon
    expected, alone_s = answer(daemon)
    # A: asks for far more than the write buffer (status replies) and never reads: dropped.
    flooder = raw_connect(daemon, rcvbuf=4096)
    status_line = b'{"op": "status"}\n'
    flooder.setblocking(False)
    queued = status_line * 4000
    sent = 0
    deadline = time.monotonic() + 10
    while sent < len(queued) and time.monotonic() < deadline:
        try:
            sent += flooder.send(queued[sent:])
        except BlockingIOError:
            time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            break
    # B: a streaming generation whose tokens it does not read (yet): the model goes on regardless.
    reader_later = raw_connect(daemon, rcvbuf=4096)
    reader_later.sendall(b'{"id": "unread", "prompt": "The cat sat on the", "raw": true, "max_tokens": 16,'
                         b' "stream": true, "temperature": 0}\n')
    # C: a normal client, meanwhile, gets the same answers as when it was alone.
    took = []
    for _ in range(2):
        text, seconds = answer(daemon)
        assert text == expected
        took.append(seconds)
    with daemon.client(timeout=10) as c:
        status_started = time.monotonic()
        assert c.status()["event"] == "status"
        status_ms = (time.monotonic() - status_started) * 1000

    received, dropped = drain(flooder)
    flooder.close()
    assert dropped, "a client that never reads was not disconnected"
    replies = received.count(b'"event":"status"')
    assert replies < 4000, f"all {replies} status replies were buffered for a client that does not read"

    data, closed = drain(reader_later, timeout=3.0)
    reader_later.close()
    assert not closed, "a client within the write buffer was dropped"
    events = [json.loads(line) for line in data.splitlines() if line.strip()]
    finals = [e for e in events if e.get("event") in ("done", "error")]
    assert len(finals) == 1 and finals[0]["event"] == "done", events[-3:]
    assert "".join(e["text"] for e in events if e.get("event") == "token") == finals[0]["text"]
    report(
        "slow_client_never_reads",
        status_lines_sent=sent // len(status_line),
        status_replies_before_drop=replies,
        dropped=dropped,
        unread_stream_tokens=finals[0]["usage"]["completion_tokens"],
        others_answer_s=[round(t, 2) for t in took],
        alone_answer_s=round(alone_s, 2),
        status_ms=round(status_ms, 1),
    )


def test_clients_stalled_mid_line_block_nobody_and_finish_later(socket_daemon: DaemonProcess) -> None:
    daemon = socket_daemon
    expected, _ = answer(daemon)
    stalled = []
    for n in range(20):
        sock = raw_connect(daemon)
        sock.sendall(b'{"id": "half-%d", "prompt": "The cat sat on the", "raw": tr' % n)
        stalled.append(sock)
    gone = raw_connect(daemon)
    gone.sendall(b'{"id": "gone", "prompt": "The cat')
    gone.close()  # half a line, then away
    text, took = answer(daemon)
    assert text == expected
    with daemon.client(timeout=10) as c:
        assert c.status()["event"] == "status"
    # The stalled ones finish their lines: each is answered.
    for sock in stalled:
        sock.sendall(b'ue, "max_tokens": 4}\n')
    texts = []
    for n, sock in enumerate(stalled):
        sock.settimeout(ANSWER_TIMEOUT_S)
        line = sock.makefile("rb").readline()
        event = json.loads(line)
        assert event["id"] == f"half-{n}" and event["event"] == "done", event
        texts.append(event["text"])
        sock.close()
    report("slow_clients_stalled_mid_line", stalled=len(stalled), others_answer_s=round(took, 2), finished=len(texts))


def test_1000_connect_disconnect_cycles_leak_nothing(socket_daemon: DaemonProcess) -> None:
    daemon = socket_daemon
    pid = daemon.proc.pid
    path = daemon.socket_path

    def cycle(n: int) -> None:
        kind = n % 5
        sock = raw_connect(daemon)
        try:
            if kind == 1:
                sock.sendall(b'{"op": "status"}\n')
                assert b'"event":"status"' in sock.makefile("rb").readline()
            elif kind == 2:
                sock.sendall(b'{"id": "half", "prompt": "The ca')
            elif kind == 3:
                sock.sendall(b"\xff not json\n")
                assert b'"invalid_json"' in sock.makefile("rb").readline()
            elif kind == 4:
                # A request that reaches the model (tokenized, refused as too long for n_ctx), and
                # gone before its answer. It generates nothing: this test is about connections, not
                # the engine's memory (the soak covers generation and disconnect-cancels).
                sock.sendall(b'{"id": "c-%d", "prompt": "The cat sat on the", "max_tokens": 5000}\n' % n)
        finally:
            sock.close()

    for n in range(100):  # warm up: the first connections allocate what later ones reuse
        cycle(n)
    quiet(daemon)
    fds_before, rss_before = settle_fds(pid, 0, timeout=1.0), rss_kb(pid)
    started = time.monotonic()
    for n in range(1000):
        cycle(n)
    elapsed = time.monotonic() - started
    quiet(daemon)
    fds_after, rss_after = settle_fds(pid, fds_before), rss_kb(pid)
    assert op_call(path, {"op": "health"})[0]["event"] == "health"
    report(
        "connect_disconnect_cycles",
        cycles=1000,
        seconds=round(elapsed, 1),
        fds_before=fds_before,
        fds_after=fds_after,
        rss_growth_mb=round((rss_after - rss_before) / 1024, 2),
    )
    assert fds_after <= fds_before, f"fds {fds_before} -> {fds_after}"
    assert rss_after - rss_before < 4 * 1024, "1,000 short connections grew the daemon by 4 MB or more"
