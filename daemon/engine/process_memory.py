"""Giving memory back to the kernel, so RSS tells what the daemon really holds (Linux, glibc)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

_MADV_DONTNEED = 4  # Linux
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _libc(name: str, *argtypes: Any) -> Any:
    """The C library's function `name`, or None where there is none (not glibc)."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    return function


def drop_mapped_pages(path: Path) -> None:
    """Unmap the model file's pages this process touched while loading (the header, the
    vocabulary, the weights llama.cpp copied into its repacked buffer). They stay in the page
    cache; the weights decoding uses come back at the first step, the rest never counts in RSS."""
    madvise = _libc("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if madvise is None:
        return
    target = os.path.realpath(path)
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            ranges = [line.split()[0] for line in maps if line.rstrip().endswith(" " + target)]
    except OSError:
        return
    for span in ranges:
        start, end = (int(x, 16) for x in span.split("-"))
        madvise(start, end - start, _MADV_DONTNEED)


def release_free_memory() -> None:
    """Hand freed heap memory back to the kernel (glibc keeps it otherwise, and RSS with it)."""
    if (trim := _libc("malloc_trim", ctypes.c_size_t)) is not None:
        trim(0)


def fix_mmap_threshold(size: int) -> None:
    """Serve every allocation of `size` bytes or more with its own mapping, returned to the kernel
    when freed. glibc's default threshold rises to the size of each large block freed: after the
    first 10 MB MQTT payload is freed, the next ones come from the heap, and freed heap memory
    under a live allocation stays in RSS. Setting it also stops that rise (mallopt(3))."""
    if (mallopt := _libc("mallopt", ctypes.c_int, ctypes.c_int)) is not None:
        mallopt(_M_MMAP_THRESHOLD, size)
