"""The firmware throttled word: decoding, parsing, and what status/CLI show of it."""

from __future__ import annotations

import pytest

from daemon import pi_firmware
from daemon.cli import format_status
from daemon.governor import Governor, Readings
from daemon.pi_firmware import ThrottledParseError, active_flags, decode_throttled
from tests.test_governor import CFG


def test_throttled_word_decoding() -> None:
    flags = decode_throttled(0x50005)
    assert flags["under_voltage"] and flags["throttled"]
    assert not flags["arm_frequency_capped"] and not flags["soft_temperature_limit"]
    assert flags["under_voltage_occurred"] and flags["throttled_occurred"]
    assert not flags["arm_frequency_capped_occurred"]
    assert flags["active"] == ["under_voltage", "throttled", "under_voltage_occurred", "throttled_occurred"]
    assert decode_throttled(0x80008)["soft_temperature_limit"] and decode_throttled(0x80008)[
        "soft_temperature_limit_occurred"
    ]
    assert active_flags(0) == [] and decode_throttled(0)["raw"] == "0x0"


def test_bit_constants_match_the_flag_names() -> None:
    assert active_flags(pi_firmware.UNDER_VOLTAGE_NOW) == ["under_voltage"]
    assert active_flags(pi_firmware.FREQ_CAPPED_NOW) == ["arm_frequency_capped"]
    assert active_flags(pi_firmware.THROTTLED_NOW) == ["throttled"]
    assert active_flags(pi_firmware.SOFT_TEMP_NOW) == ["soft_temperature_limit"]
    assert active_flags(pi_firmware.UNDER_VOLTAGE_SINCE_BOOT) == ["under_voltage_occurred"]
    assert active_flags(pi_firmware.THROTTLED_SINCE_BOOT) == ["throttled_occurred"]


def test_parsers() -> None:
    assert pi_firmware.parse_vcgencmd("throttled=0x50005\n") == 0x50005
    assert pi_firmware.parse_sysfs("50005\n") == 0x50005
    with pytest.raises(ThrottledParseError, match="unexpected output"):
        pi_firmware.parse_vcgencmd("error=1 error_msg=\"Command not registered\"")
    with pytest.raises(ThrottledParseError, match="not a hex word"):
        pi_firmware.parse_sysfs("garbage")


def test_status_table_shows_the_flags_the_governor_reports() -> None:
    """Producer (Readings.to_dict via the governor's decision) and reader (format_status) agree."""
    decision = Governor(CFG).update(Readings(temperature_c=50.0, temperature_source="/x", throttled=0x50005), 1.0)
    table = format_status({"state": "ready", "governor": decision.to_dict()})
    firmware = [line.split(None, 1)[1] for line in table.splitlines() if line.startswith("firmware")]
    assert firmware == ["under_voltage", "throttled", "under_voltage_occurred", "throttled_occurred"]
    quiet = Governor(CFG).update(Readings(temperature_c=50.0, temperature_source="/x", throttled=0), 1.0)
    assert "firmware" not in format_status({"state": "ready", "governor": quiet.to_dict()})
