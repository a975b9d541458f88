"""Helpers of the reliability tests (fuzz, soak, flood, faults): process figures read from /proc,
a pipelining NDJSON socket client, and the figures report.

Everything here drives the daemon from outside, as a user would: its Unix socket, its MQTT topics,
and /proc for its memory and file descriptors. Nothing imports the daemon's internals.

Figures: every test calls `report(name, **figures)`; they are printed (visible with `pytest -s`),
listed again in the terminal summary at the end of the run, and written as JSON to the file named
by `EDGELLM_FIGURES` when it is set (docs/reliability.md says how they are used).
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_FIGURES: list[tuple[str, dict[str, Any]]] = []


def rss_kb(pid: int) -> int:
    """Resident set size of a process in KiB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def rss_anon_kb(pid: int) -> int:
    """Anonymous resident memory in KiB (RssAnon): the heap, without file-backed pages."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError(f"no RssAnon for pid {pid}")


# Daemons of the reliability tests read the model into memory at load instead of mapping it: with
# mmap, RSS grows by file pages of the weights as new tokens are first seen, which is no leak but
# would hide one. With `use_mmap = false` VmRSS is flat once loaded, so its growth means allocation.
NO_MMAP = {"engine": {"use_mmap": False}}


# Mosquitto drops messages beyond `max_queued_messages` per client (default 1000) itself: a flood
# must measure the daemon, not the broker (/work/shared/client-facts.md).
UNBOUNDED_BROKER_QUEUE = "max_queued_messages 0\n"


def start_mqtt_daemon(
    tmp: Path, model: Path, broker: Any, node: str, queue_depth: int, extra: dict[str, Any] | None = None
) -> Any:
    """A daemon for these tests: MQTT on `broker` as `node`, no mmap, a small context, info logs."""
    from tests.helpers import merge
    from tests.test_mqtt_daemon import start_daemon

    overrides = {**NO_MMAP, "model": {"n_ctx": 256}, "queue": {"max_depth": queue_depth}, "logging": {"level": "info"}}
    return start_daemon(tmp, model, broker, node, merge(overrides, extra or {}))


def busy(daemon: Any) -> bool:
    """The daemon holds requests: queued, or received over MQTT and not yet acknowledged (status)."""
    from daemon.client import ClientError

    try:
        with daemon.client(timeout=10) as c:
            status = c.status()
    except (ClientError, OSError):
        return True
    return bool(status["queue"]["depth"] or status.get("mqtt", {}).get("inflight"))


def fd_count(pid: int) -> int:
    """How many file descriptors a process has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle_fds(pid: int, at_most: int, timeout: float = 10.0) -> int:
    """The fd count once it is back to `at_most` (closing a connection is asynchronous), or the
    last count seen when `timeout` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        count = fd_count(pid)
        if count <= at_most or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / p99 / max of a sample, rounded for printing."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 2),
        "p95": at(0.95),
        "p99": at(0.99),
        "max": round(ordered[-1], 2),
    }


def report(name: str, **figures: Any) -> None:
    """Print one test's figures and keep them for the summary and `EDGELLM_FIGURES`."""
    _FIGURES.append((name, figures))
    print(f"\n[reliability] {name}: {json.dumps(figures)}")
    out = os.environ.get("EDGELLM_FIGURES")
    if out:
        path = Path(out)
        existing: dict[str, Any] = {}
        if path.exists():
            try:
                existing = json.loads(path.read_text())
            except ValueError:
                existing = {}
        existing[name] = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}
        path.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The figures of this run's reliability tests, after the test results (conftest imports this)."""
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for name, figures in _FIGURES:
        terminalreporter.write_line(f"{name}: {json.dumps(figures)}")


class LineSocket:
    """A raw NDJSON connection to the daemon that can pipeline: write many lines, then read the
    events back, without ever blocking on either side (a selector drives both)."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.sock.setblocking(False)
        self._buf = b""
        self.eof = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> LineSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exchange(self, lines: Sequence[bytes], expect: int | None = None) -> list[dict[str, Any]]:
        """Send `lines` (each gets a newline) and read `expect` events (default: one per line),
        or until the daemon closes the connection. Fails after `timeout` s: the daemon never hangs."""
        want = len(lines) if expect is None else expect
        out = bytearray(b"".join(line + b"\n" for line in lines))
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0))
            while len(events) < want and not self.eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"got {len(events)} of {want} events in {self.timeout} s; last: {events[-3:]}")
                for _key, mask in sel.select(min(left, 1.0)):
                    if mask & selectors.EVENT_WRITE and out:
                        try:
                            sent = self.sock.send(out[:1 << 16])
                        except BlockingIOError:
                            sent = 0
                        except (BrokenPipeError, ConnectionResetError):
                            out.clear()  # the daemon closed on us (e.g. after payload_too_large)
                            sent = 0
                        del out[:sent]
                        if not out:
                            sel.modify(self.sock, selectors.EVENT_READ)
                    if mask & selectors.EVENT_READ:
                        events.extend(self._read_available())
        return events

    def _read_available(self) -> list[dict[str, Any]]:
        try:
            chunk = self.sock.recv(1 << 16)
        except BlockingIOError:
            return []
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
        self._buf += chunk
        *complete, self._buf = self._buf.split(b"\n")
        return [json.loads(line) for line in complete if line.strip()]

    def read_until_eof(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every event left on the connection until the daemon closes it."""
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            while not self.eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the daemon did not close the connection within {timeout} s")
                if sel.select(min(left, 1.0)):
                    events.extend(self._read_available())
        return events


def op_call(path: Path, obj: dict[str, Any], timeout: float = 10.0) -> tuple[dict[str, Any], float]:
    """One control op (`status`, `health`, `cancel`) on a fresh connection: (its reply, seconds)."""
    started = time.monotonic()
    with LineSocket(path, timeout=timeout) as conn:
        events = conn.exchange([json.dumps(obj).encode()], expect=1)
    return events[0], time.monotonic() - started



def wait_count(probe: Any, predicate: Any, count: int, *, quiet_s: float = 15.0, timeout: float = 180.0) -> list[Any]:
    """At least `count` messages of an MQTT `Probe` that match `predicate`. Gives up early (a test
    failure, not a hang) once nothing new has matched for `quiet_s`, or after `timeout`."""
    deadline = time.monotonic() + timeout
    seen, last_change = -1, time.monotonic()
    while True:
        with probe._cv:
            found = [m for m in probe.messages if predicate(m)]
            if len(found) >= count:
                return found
            if len(found) != seen:
                seen, last_change = len(found), time.monotonic()
            now = time.monotonic()
            if now > deadline or now - last_change > quiet_s:
                raise TimeoutError(f"got {len(found)} of {count} matching messages; last: {probe.messages[-5:]}")
            probe._cv.wait(0.5)
