"""Sensor reading against real files, FIFOs and processes, and the sensor loop thread.

A Pi's sensors cannot exist here, so they are what the daemon reads on a Pi: a thermal file a test
writes (millidegrees, like sysfs), a fake sysfs tree for auto-detection, a `vcgencmd` stand-in
script printing what the firmware prints, a /proc/meminfo-format file and a PSI file.
"""

from __future__ import annotations

import collections
import json
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from structlog.testing import capture_logs

from daemon.config import GovernorConfig
from daemon.governor import Decision, Readings, Transition
from daemon.sensors import (
    SensorError,
    SensorLoop,
    SensorReader,
    parse_temperature,
    read_available_bytes,
)

MIB = 1024 * 1024


def config(tmp: Path, **overrides: Any) -> GovernorConfig:
    """Sensors pointed at files under tmp; no vcgencmd unless asked."""
    base: dict[str, Any] = {
        "temperature_files": (str(tmp / "temp"),),
        "vcgencmd_command": "",
        "meminfo_file": "",
        "psi_file": str(tmp / "psi"),
        "read_timeout_s": 0.3,
    }
    base.update(overrides)
    return replace(GovernorConfig(), **base)


def meminfo(available_kb: int) -> str:
    return (
        f"MemTotal:        4000000 kB\nMemFree:          100000 kB\nMemAvailable:   {available_kb} kB\n"
        "SwapTotal:       1000000 kB\nSwapFree:         900000 kB\n"
    )


def errors_for(readings: Readings, source: str) -> list[str]:
    return [e for e in readings.errors if e.startswith(source + ": ")]


# --- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "celsius"), [("48312\n", 48.312), ("79", 79.0), ("79.5\n", 79.5), ("-5000", -5.0), ("0", 0.0)]
)
def test_parse_temperature_millidegrees_or_degrees(text: str, celsius: float) -> None:
    assert parse_temperature(text) == pytest.approx(celsius)


@pytest.mark.parametrize("text", ["", "hot", "48 312", "nan", "199", "999999", "-99000"])
def test_parse_temperature_rejects_garbage(text: str) -> None:
    with pytest.raises(SensorError):
        parse_temperature(text)


# --- temperature --------------------------------------------------------------------------------


def test_hottest_configured_file_counts(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("61000\n")
    (tmp_path / "b").write_text("64500\n")
    reader = SensorReader(config(tmp_path, temperature_files=(str(tmp_path / "a"), str(tmp_path / "b"))))
    readings = reader.read()
    assert readings.temperature_c == pytest.approx(64.5)
    assert readings.temperature_source == str(tmp_path / "b")
    assert readings.errors == ()


def test_missing_and_garbage_files_are_errors_not_exceptions(tmp_path: Path) -> None:
    reader = SensorReader(config(tmp_path))
    missing = reader.read()
    assert missing.temperature_c is None
    assert missing.temperature_source == str(tmp_path / "temp")  # what was tried: a failure, not "no sensor"
    assert errors_for(missing, f"temperature:{tmp_path / 'temp'}") == [
        f"temperature:{tmp_path / 'temp'}: No such file or directory"
    ]
    (tmp_path / "temp").write_text("not a number\n")
    garbage = reader.read()
    assert garbage.temperature_c is None
    assert "not a temperature" in errors_for(garbage, f"temperature:{tmp_path / 'temp'}")[0]
    (tmp_path / "temp").write_text("79\n")
    assert reader.read().temperature_c == 79.0


def test_one_broken_file_of_two_still_gives_a_temperature(tmp_path: Path) -> None:
    (tmp_path / "good").write_text("55000")
    reader = SensorReader(config(tmp_path, temperature_files=(str(tmp_path / "gone"), str(tmp_path / "good"))))
    readings = reader.read()
    assert readings.temperature_c == 55.0
    assert len(readings.errors) == 1 and "gone" in readings.errors[0]


def test_permission_denied_is_an_error(tmp_path: Path) -> None:
    # Root reads any file: when running as root, the reader runs in a forked child as `nobody`.
    shared = Path(tempfile.mkdtemp(prefix="edgellm-perm-"))
    temp = shared / "temp"
    try:
        shared.chmod(0o755)
        temp.write_text("50000")
        temp.chmod(0)
        cfg = config(tmp_path, temperature_files=(str(temp),), psi_file="", read_timeout_s=5.0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop root, read, report, exit without running pytest's teardown
            try:
                os.close(read_end)
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                r = SensorReader(cfg).read()
                os.write(write_end, json.dumps({"t": r.temperature_c, "errors": list(r.errors)}).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            result = json.loads(pipe.read())
        os.waitpid(pid, 0)
        assert result["t"] is None
        assert result["errors"] == [f"temperature:{temp}: Permission denied"]
    finally:
        temp.unlink(missing_ok=True)
        shared.rmdir()


def test_a_stuck_read_times_out_and_is_not_retried_until_it_returns(tmp_path: Path) -> None:
    fifo = tmp_path / "temp"
    os.mkfifo(fifo)  # open() for reading blocks until a writer appears: a hung sensor
    reader = SensorReader(config(tmp_path, read_timeout_s=0.2))
    started = time.monotonic()
    first = reader.read()
    assert time.monotonic() - started < 5.0  # it came back instead of hanging with the FIFO
    assert first.temperature_c is None
    assert errors_for(first, f"temperature:{fifo}") == [f"temperature:{fifo}: read timed out after 0.2 s"]
    threads = threading.active_count()
    second = reader.read()
    assert "read still stuck after" in errors_for(second, f"temperature:{fifo}")[0]
    assert threading.active_count() == threads  # no second thread parked on the same file
    with open(fifo, "w") as writer:  # a writer unblocks the parked read...
        writer.write("50000")
    fifo.unlink()  # ...and the sensor becomes a plain file again
    fifo.write_text("52000")
    deadline = time.monotonic() + 10
    readings = reader.read()
    while readings.temperature_c is None and time.monotonic() < deadline:
        time.sleep(0.05)
        readings = reader.read()
    assert readings.temperature_c == 52.0 and readings.errors == ()


def test_cpu_thermal_zones_are_found_by_type(tmp_path: Path) -> None:
    root = tmp_path / "thermal"
    for index, (kind, millideg) in enumerate(
        [("cpu-thermal", 55000), ("gpu-thermal", 90000), ("x86_pkg_temp", 61000), ("acpitz", 95000)]
    ):
        zone = root / f"thermal_zone{index}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(f"{millideg}\n")
    reader = SensorReader(config(tmp_path, temperature_files=()), thermal_root=root)
    readings = reader.read()
    assert readings.temperature_c == 61.0  # hottest of the CPU zones; the GPU and ACPI zones do not count
    assert readings.temperature_source == str(root / "thermal_zone2" / "temp")


def test_without_zones_psutil_cpu_sensors_are_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine has no temperature sensors at all; psutil's answer on a Pi is stood in for.
    shwtemp = collections.namedtuple("shwtemp", "label current high critical")
    sensors = {
        "cpu_thermal": [shwtemp("", 58.4, None, None)],
        "nvme": [shwtemp("Composite", 70.0, None, None)],
    }
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: sensors)
    reader = SensorReader(config(tmp_path, temperature_files=()), thermal_root=tmp_path / "nothing")
    readings = reader.read()
    assert (readings.temperature_c, readings.temperature_source) == (58.4, "psutil:cpu_thermal")
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {"nvme": sensors["nvme"]})
    none = SensorReader(config(tmp_path, temperature_files=()), thermal_root=tmp_path / "nothing").read()
    assert (none.temperature_c, none.temperature_source) == (None, None)  # no CPU sensor: not governed
    assert none.errors == ()


# --- firmware flags ----------------------------------------------------------------------------


@pytest.fixture
def vcgencmd(tmp_path: Path) -> Iterator[Path]:
    """A stand-in `vcgencmd` whose behaviour the test sets through a file."""
    script = tmp_path / "vcgencmd"
    script.write_text(
        "#!/bin/sh\n"
        f'mode=$(cat "{tmp_path}/vc-mode")\n'
        'case "$mode" in\n'
        '  fail) echo "VCHI initialization failed" >&2; exit 1 ;;\n'
        "  hang) exec sleep 30 ;;\n"
        '  odd) echo "error=1 error_msg=\\"Command not registered\\"" ;;\n'
        '  *) echo "throttled=$mode" ;;\n'
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    yield script


def test_vcgencmd_throttled_word(tmp_path: Path, vcgencmd: Path) -> None:
    (tmp_path / "vc-mode").write_text("0x50005")
    reader = SensorReader(config(tmp_path, vcgencmd_command=f"{vcgencmd} get_throttled"))
    readings = reader.read()
    assert readings.throttled == 0x50005
    assert readings.to_dict()["throttled"]["under_voltage"] is True


@pytest.mark.parametrize(
    ("mode", "error"),
    [("fail", "vcgencmd: exit 1: VCHI initialization failed"), ("odd", "vcgencmd: unexpected output"),
     ("hang", "vcgencmd: timed out after 0.3 s")],
)  # fmt: skip
def test_vcgencmd_failures_are_errors(tmp_path: Path, vcgencmd: Path, mode: str, error: str) -> None:
    (tmp_path / "vc-mode").write_text(mode)
    readings = SensorReader(config(tmp_path, vcgencmd_command=f"{vcgencmd} get_throttled")).read()
    assert readings.throttled is None
    assert errors_for(readings, "vcgencmd")[0].startswith(error)


def test_no_vcgencmd_means_not_a_pi_and_no_error(tmp_path: Path) -> None:
    for command in ("", "/nonexistent/vcgencmd get_throttled"):
        readings = SensorReader(config(tmp_path, vcgencmd_command=command)).read()
        assert readings.throttled is None and errors_for(readings, "vcgencmd") == []


def test_the_sysfs_word_comes_first_and_needs_no_vcgencmd(tmp_path: Path, vcgencmd: Path) -> None:
    word = tmp_path / "soc" / "get_throttled"
    word.parent.mkdir()
    word.write_text("80008\n")
    (tmp_path / "vc-mode").write_text("0x50005")
    globs = (str(tmp_path / "nothing*" / "get_throttled"), str(tmp_path / "so*" / "get_throttled"))
    reader = SensorReader(config(tmp_path, vcgencmd_command=f"{vcgencmd} get_throttled"), throttled_globs=globs)
    readings = reader.read()
    assert readings.throttled == 0x80008 and readings.to_dict()["throttled"]["active"] == [
        "soft_temperature_limit", "soft_temperature_limit_occurred"
    ]
    word.write_text("garbage\n")
    assert errors_for(reader.read(), "throttled")[0].startswith("throttled: not a hex word")
    # "" still means: do not ask the firmware at all.
    off = SensorReader(config(tmp_path, vcgencmd_command=""), throttled_globs=globs).read()
    assert off.throttled is None and errors_for(off, "throttled") == []


def test_an_unparsable_vcgencmd_command_is_an_error_not_an_exception(tmp_path: Path) -> None:
    reader = SensorReader(config(tmp_path, vcgencmd_command='vcgencmd "get_throttled'))
    for _ in range(2):  # on every read, so the failure episode does not look recovered
        readings = reader.read()
        assert readings.throttled is None
        assert errors_for(readings, "vcgencmd")[0].startswith("vcgencmd: cannot parse governor.vcgencmd_command")


# --- memory ---------------------------------------------------------------------------------------


def test_memory_from_psutil_by_default(tmp_path: Path) -> None:
    readings = SensorReader(config(tmp_path)).read()
    assert readings.mem_available_mb is not None and readings.mem_total_mb is not None
    assert 0 < readings.mem_available_mb <= readings.mem_total_mb
    assert readings.mem_total_mb == pytest.approx(psutil.virtual_memory().total / 2**20)
    assert readings.swap_used_mb is not None and readings.swap_used_mb >= 0
    assert readings.rss_mb is not None and readings.rss_mb > 10  # this Python process


def test_meminfo_file_overrides_memory_readings(tmp_path: Path) -> None:
    info = tmp_path / "meminfo"
    info.write_text(meminfo(available_kb=150 * 1024))
    cfg = config(tmp_path, meminfo_file=str(info))
    readings = SensorReader(cfg).read()
    assert readings.mem_available_mb == pytest.approx(150.0)
    assert readings.mem_total_mb == pytest.approx(4_000_000 / 1024)
    assert readings.swap_used_mb == pytest.approx(100_000 / 1024)
    assert read_available_bytes(cfg) == 150 * 1024 * 1024
    info.write_text("MemTotal: 4000 kB\n")
    broken = SensorReader(cfg).read()
    assert broken.mem_available_mb is None and errors_for(broken, "meminfo") == ["meminfo: no MemAvailable line"]
    assert read_available_bytes(cfg) is None


def test_psi_some_avg10(tmp_path: Path) -> None:
    psi = tmp_path / "psi"
    psi.write_text(
        "some avg10=12.50 avg60=3.00 avg300=1.00 total=123456\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=1\n"
    )
    reader = SensorReader(config(tmp_path))
    assert reader.read().psi_some_avg10 == 12.5
    psi.write_text("full avg10=1.00\n")
    assert "no 'some avg10='" in errors_for(reader.read(), "psi")[0]
    psi.unlink()
    gone = reader.read()
    assert gone.psi_some_avg10 is None and errors_for(gone, "psi") == []  # kernel without PSI


def test_real_proc_pressure_if_present(tmp_path: Path) -> None:
    if not Path("/proc/pressure/memory").exists():
        pytest.skip("kernel without PSI")
    readings = SensorReader(config(tmp_path, psi_file="/proc/pressure/memory")).read()
    assert readings.psi_some_avg10 is not None and 0.0 <= readings.psi_some_avg10 <= 100.0


# --- the loop ------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Decision, Readings, tuple[Transition, ...]]] = []
        self.event = threading.Event()

    def __call__(self, decision: Decision, readings: Readings, transitions: tuple[Transition, ...]) -> None:
        self.calls.append((decision, readings, transitions))
        self.event.set()


def test_loop_logs_a_sensor_failure_once_per_episode_and_its_recovery(tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.write_text("50000")
    recorder = Recorder()
    loop = SensorLoop(config(tmp_path), recorder)
    with capture_logs() as logs:
        loop.tick()
        temp.unlink()
        for _ in range(5):
            loop.tick()
        temp.write_text("garbage")  # still failing, differently: same episode
        loop.tick()
        temp.write_text("51000")
        loop.tick()
        temp.unlink()
        loop.tick()
    sensor_events = [(e["event"], e["source"]) for e in logs if e["event"].startswith("sensor.")]
    source = f"temperature:{temp}"
    assert sensor_events == [
        ("sensor.failed", source), ("sensor.recovered", source), ("sensor.failed", source),
    ]  # fmt: skip
    failed = next(e for e in logs if e["event"] == "sensor.failed")
    assert failed["error"] == "No such file or directory" and failed["log_level"] == "warning"
    assert len(recorder.calls) == 9
    decision, readings, _ = recorder.calls[1]
    assert readings.temperature_c is None and decision.state == "normal"  # within the grace period
    assert loop.status()["readings"]["errors"] == [f"{source}: No such file or directory"]


def test_loop_logs_transitions_with_their_readings(tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    recorder = Recorder()
    loop = SensorLoop(config(tmp_path), recorder)
    with capture_logs() as logs:
        temp.write_text("60000")
        loop.tick()
        temp.write_text("79000")
        loop.tick()
        loop.tick()
    transitions = [e for e in logs if e["event"] == "governor.transition"]
    assert len(transitions) == 1
    event = transitions[0]
    assert (event["kind"], event["from_state"], event["to_state"], event["log_level"]) == (
        "thermal", "normal", "hot", "warning",
    )  # fmt: skip
    assert event["readings"]["temperature_c"] == 79.0
    decision, _, passed = recorder.calls[1]
    assert decision.state == "hot" and decision.pause and not decision.admit
    assert [t.to_state for t in passed] == ["hot"] and recorder.calls[2][2] == ()


def test_loop_warns_about_under_voltage_once_per_episode(tmp_path: Path, vcgencmd: Path) -> None:
    (tmp_path / "temp").write_text("50000")
    mode = tmp_path / "vc-mode"
    loop = SensorLoop(config(tmp_path, vcgencmd_command=f"{vcgencmd} get_throttled"), Recorder())
    with capture_logs() as logs:
        for word in ("0x0", "0x50005", "0x50005", "0x50000", "0x50001"):
            mode.write_text(word)
            loop.tick()
    power = [e["event"] for e in logs if e["event"].startswith("power.")]
    assert power == ["power.under_voltage", "power.under_voltage_cleared", "power.under_voltage"]


def test_loop_thread_runs_survives_a_failing_callback_and_stops(tmp_path: Path) -> None:
    (tmp_path / "temp").write_text("50000")
    calls: list[float] = []
    ran = threading.Event()

    def flaky(decision: Decision, readings: Readings, transitions: tuple[Transition, ...]) -> None:
        calls.append(readings.at)
        if len(calls) >= 3:
            ran.set()
        raise RuntimeError("callback bug")

    loop = SensorLoop(config(tmp_path, interval_s=0.05), flaky, busy=lambda: False)
    with capture_logs() as logs:
        loop.start()
        try:
            assert ran.wait(10.0)
        finally:
            loop.stop()
    count = len(calls)
    time.sleep(0.2)
    assert len(calls) == count  # stopped means stopped
    assert any(e["event"] == "governor.on_decision_failed" for e in logs)
    assert calls == sorted(calls)


def test_reconfigure_takes_the_new_sensor_files(tmp_path: Path) -> None:
    (tmp_path / "temp").write_text("50000")
    (tmp_path / "other").write_text("71000")
    recorder = Recorder()
    loop = SensorLoop(config(tmp_path), recorder)
    assert loop.tick().temperature_c == 50.0
    loop.reconfigure(config(tmp_path, temperature_files=(str(tmp_path / "other"),)))
    decision = loop.tick()
    assert decision.temperature_c == 71.0 and decision.state == "warm"
