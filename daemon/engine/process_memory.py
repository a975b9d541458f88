"""Giving memory back to the kernel, so RSS tells what the daemon really holds (Linux, glibc)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_MADV_DONTNEED = 4  # Linux


def drop_mapped_pages(path: Path) -> None:
    """Unmap the model file's pages this process touched while loading (the header, the
    vocabulary, the weights llama.cpp copied into its repacked buffer). They stay in the page
    cache; the weights decoding uses come back at the first step, the rest never counts in RSS."""
    try:
        target = os.path.realpath(path)
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        with open("/proc/self/maps", encoding="utf-8") as maps:
            ranges = [line.split()[0] for line in maps if line.rstrip().endswith(" " + target)]
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for span in ranges:
        start, end = (int(x, 16) for x in span.split("-"))
        madvise(start, end - start, _MADV_DONTNEED)


def release_free_memory() -> None:
    """Hand freed heap memory back to the kernel (glibc keeps it otherwise, and RSS with it)."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fix_mmap_threshold(size: int) -> None:
    """Serve every allocation of `size` bytes or more with its own mapping, returned to the kernel
    when freed. glibc's default threshold rises to the size of each large block freed: after the
    first 10 MB MQTT payload is freed, the next ones come from the heap, and freed heap memory
    under a live allocation stays in RSS. Setting it also stops that rise (mallopt(3))."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, size)
