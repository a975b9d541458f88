"""The Raspberry Pi firmware's throttled word: the one definition of its bits.

`vcgencmd get_throttled` prints `throttled=0x50005`; Pi kernels also expose the same word in sysfs
(`.../get_throttled`, hex without the prefix). Bits 0-3 are conditions now, bits 16-19 the same
conditions "has occurred since boot". The sensors read it (daemon/sensors.py), the governor's
readings carry it to status (`governor.readings.throttled`, decoded by `decode_throttled`), the CLI
prints its `active` names, and `edgellm doctor` judges it. Pure.
"""

from __future__ import annotations

import glob
import re
from typing import Any

# Bit i (now) and bit i + 16 (since boot), by name.
FLAGS = ("under_voltage", "arm_frequency_capped", "throttled", "soft_temperature_limit")
OCCURRED_SHIFT = 16

UNDER_VOLTAGE_NOW = 1 << 0
FREQ_CAPPED_NOW = 1 << 1
THROTTLED_NOW = 1 << 2
SOFT_TEMP_NOW = 1 << 3
UNDER_VOLTAGE_SINCE_BOOT = UNDER_VOLTAGE_NOW << OCCURRED_SHIFT
FREQ_CAPPED_SINCE_BOOT = FREQ_CAPPED_NOW << OCCURRED_SHIFT
THROTTLED_SINCE_BOOT = THROTTLED_NOW << OCCURRED_SHIFT
SOFT_TEMP_SINCE_BOOT = SOFT_TEMP_NOW << OCCURRED_SHIFT

# Where Raspberry Pi kernels expose the word without vcgencmd (Pi 4: soc; Pi 5: soc@107c000000): no
# subprocess, no video group needed. The sensors and `edgellm doctor` look here first.
SYSFS_GLOBS = (
    "/sys/devices/platform/soc/soc:firmware/get_throttled",
    "/sys/devices/platform/soc@*/*firmware*/get_throttled",
    "/sys/devices/platform/*firmware*/get_throttled",
)

_VCGENCMD_OUTPUT = re.compile(r"throttled=(0x[0-9a-fA-F]+)")


class ThrottledParseError(ValueError):
    """The text is not a throttled word."""


def parse_vcgencmd(text: str) -> int:
    """`throttled=0x50005` (vcgencmd's output) -> 0x50005."""
    match = _VCGENCMD_OUTPUT.search(text)
    if match is None:
        raise ThrottledParseError(f"unexpected output {text.strip()[:60]!r}")
    return int(match.group(1), 16)


def parse_sysfs(text: str) -> int:
    """The sysfs file's content (`50005`, hex) -> 0x50005."""
    stripped = text.strip()
    try:
        return int(stripped, 16)
    except ValueError:
        raise ThrottledParseError(f"not a hex word: {stripped[:40]!r}") from None


def find_sysfs(globs: tuple[str, ...] = SYSFS_GLOBS) -> str | None:
    """The first sysfs get_throttled file present, or None (not a Pi, or an older kernel)."""
    for pattern in globs:
        for name in sorted(glob.glob(pattern)):
            return name
    return None


def active_flags(value: int) -> list[str]:
    """The names of the set bits: "under_voltage" (now), "under_voltage_occurred" (since boot), ..."""
    names = [name for bit, name in enumerate(FLAGS) if value & (1 << bit)]
    names += [f"{name}_occurred" for bit, name in enumerate(FLAGS) if value & (1 << (bit + OCCURRED_SHIFT))]
    return names


def decode_throttled(value: int) -> dict[str, Any]:
    """The word as status shows it: `raw` (hex), one boolean per flag and per `<flag>_occurred`, and
    `active`, the names of the set ones (what `edgellm status` prints)."""
    flags: dict[str, Any] = {"raw": hex(value)}
    for bit, name in enumerate(FLAGS):
        flags[name] = bool(value & (1 << bit))
        flags[f"{name}_occurred"] = bool(value & (1 << (bit + OCCURRED_SHIFT)))
    flags["active"] = active_flags(value)
    return flags
