"""What /proc says about a process: CPU time used and resident memory (Linux)."""

from __future__ import annotations

import os
import time


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    # The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """VmRSS: resident memory, file-backed pages of a mapped model included."""
    return memory_bytes(pid)["VmRSS"]


def memory_bytes(pid: int) -> dict[str, int]:
    """VmRSS and its parts from /proc/<pid>/status: RssAnon (heap, llama.cpp's buffers, KV cache),
    RssFile (mapped files: the model, shared libraries), RssShmem."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    if "VmRSS" not in out:
        raise ValueError(f"no VmRSS for process {pid}")
    return out


def idle_cpu_pct(pid: int, seconds: float) -> float:
    """Percent of one core the process used over the next `seconds` (100 = one core busy)."""
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    used, elapsed = cpu_seconds(pid) - before, time.monotonic() - started
    return used / elapsed * 100.0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    return "unknown"
