"""The flood test's status probe, run as a process of its own: `python -m tests.status_probe SOCKET
PID OUT`. It asks the daemon's socket for `status` every 50 ms on a fresh connection, samples the
daemon's RSS, and appends one JSON line per sample to OUT, until SIGTERM.

Why a process: a thread of the test process would time its own process too. That process publishes
10,000 requests and parses 10,000 answers in three other threads, and a status reply that arrived
waited there for the GIL (up to 5 ms per switch) before the clock stopped. A user's
`edgellm status` runs in a process of its own; so does this probe.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from tests.reliability import op_call, rss_kb

INTERVAL_S = 0.05
TIMEOUT_S = 5.0  # "never hangs": a reply later than this is a failure, not a slow sample


def sample(socket_path: Path, pid: int) -> dict[str, object]:
    started = time.monotonic()
    out: dict[str, object] = {}
    try:
        reply, took = op_call(socket_path, {"op": "status"}, timeout=TIMEOUT_S)
        out["ms"] = took * 1000
        if reply.get("event") != "status":
            out["failure"] = f"status answered {reply}"
        inbox = reply.get("mqtt", {}).get("inbox", {})
        out["inbox"] = [inbox.get("messages", 0), inbox.get("bytes", 0), inbox.get("max", 0)]
    except (OSError, TimeoutError, ValueError) as exc:
        out["failure"] = f"status failed after {time.monotonic() - started:.1f} s: {exc!r}"
    try:
        out["rss_kb"] = rss_kb(pid)
    except (OSError, RuntimeError) as exc:  # the daemon is gone (or a zombie, without VmRSS)
        out["failure"] = f"no RSS for the daemon: {exc!r}"
    return out


def main(argv: list[str]) -> int:
    socket_path, pid, out_path = Path(argv[0]), int(argv[1]), Path(argv[2])
    # A plain flag set by SIGTERM: a threading.Event set from a signal handler can deadlock
    # against the same thread's wait() on it.
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    with out_path.open("a", encoding="utf-8") as out:
        while not stopping:
            out.write(json.dumps(sample(socket_path, pid)) + "\n")
            out.flush()
            time.sleep(INTERVAL_S)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
