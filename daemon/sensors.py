"""Reading the world into `Readings`, and the thread that feeds them to the governor.

Every source is optional and every read may fail (missing file, garbage, permission denied, a read
that hangs): a failure becomes a line in `Readings.errors` ("source: what went wrong"), never an
exception. Blocking reads run on a short-lived daemon thread each and are waited for at most
`governor.read_timeout_s`; a read that does not come back leaves its thread parked, and that source
is reported as stuck (without starting another read of it) until the parked read returns. So a hung
sysfs file costs one idle thread, never the sensor loop. `vcgencmd` runs as a subprocess with the
same timeout (the child is killed when it expires).

Sources:
- temperature: the files in `governor.temperature_files`; when that list is empty, every
  `/sys/class/thermal/thermal_zone*/temp` whose `type` names a CPU/SoC zone; when there is none,
  `psutil.sensors_temperatures()` restricted to CPU-like sensors. The hottest reading counts.
  Values are millidegrees Celsius as sysfs writes them; a value below 200 in magnitude is taken as
  whole degrees (no SoC runs at 0.2 °C, and tests can write "79").
- the firmware's throttled word (daemon/pi_firmware.py): from sysfs (`.../get_throttled`) when the
  kernel has it, else `vcgencmd get_throttled` (`governor.vcgencmd_command`); "" disables both;
  neither present = not a Pi.
- memory: MemAvailable/MemTotal and swap from psutil, or from `governor.meminfo_file` (a file in
  /proc/meminfo format) when set: that is how a test injects memory readings through the config.
- PSI `some avg10` from `governor.psi_file` (absent file = kernel without PSI, not an error).
- this process's RSS (psutil).
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psutil
import structlog

from daemon import pi_firmware
from daemon.governor import Decision, Governor, Readings, Transition

if TYPE_CHECKING:
    from daemon.config import GovernorConfig

log = structlog.get_logger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]
OnDecision = Callable[[Decision, Readings, tuple[Transition, ...]], None]

MIB = 1024 * 1024
THERMAL_ROOT = Path("/sys/class/thermal")
# Thermal zone types and psutil sensor names that mean "the CPU/SoC": Raspberry Pi `cpu-thermal`,
# Rockchip/Allwinner `soc-thermal`/`cpu_thermal`, Intel `x86_pkg_temp`/`coretemp`, AMD `k10temp`.
CPU_SENSOR = re.compile(r"cpu|soc|x86_pkg_temp|coretemp|k10temp|package", re.IGNORECASE)
# Sane range for a SoC temperature; anything outside is a broken sensor, not a temperature.
TEMPERATURE_RANGE_C = (-50.0, 150.0)


class SensorError(Exception):
    """A read that failed in a way worth one line in Readings.errors."""


def parse_temperature(text: str) -> float:
    """sysfs millidegrees ("48312") or, below 200 in magnitude, degrees ("79", "79.5")."""
    stripped = text.strip()
    try:
        value = float(stripped)
    except ValueError:
        raise SensorError(f"not a temperature: {stripped[:40]!r}") from None
    if value != value:  # NaN
        raise SensorError(f"not a temperature: {stripped[:40]!r}")
    celsius = value if abs(value) < 200 else value / 1000.0
    low, high = TEMPERATURE_RANGE_C
    if not low <= celsius <= high:
        raise SensorError(f"implausible temperature {celsius:g} °C (read {stripped[:40]!r})")
    return celsius


def parse_meminfo(text: str) -> tuple[float, float | None, float | None]:
    """/proc/meminfo format -> (MemAvailable MiB, MemTotal MiB, swap used MiB)."""
    fields: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = float(parts[0])
        except ValueError:
            continue
        unit = parts[1].lower() if len(parts) > 1 else "kb"
        fields[name.strip()] = value / 1024.0 if unit == "kb" else value / MIB
    if "MemAvailable" not in fields:
        raise SensorError("no MemAvailable line")
    swap_used = None
    if "SwapTotal" in fields and "SwapFree" in fields:
        swap_used = fields["SwapTotal"] - fields["SwapFree"]
    return fields["MemAvailable"], fields.get("MemTotal"), swap_used


def parse_psi_some_avg10(text: str) -> float:
    """`some avg10=1.23 avg60=... total=...` -> 1.23 (percent)."""
    for line in text.splitlines():
        if line.startswith("some "):
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                if key == "avg10":
                    try:
                        return float(value)
                    except ValueError:
                        break
    raise SensorError(f"no 'some avg10=' in {text.strip()[:60]!r}")


def describe(exc: BaseException) -> str:
    if isinstance(exc, SensorError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


class _Pending:
    def __init__(self, started: float) -> None:
        self.started = started
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class TimedCalls:
    """Run a blocking call on its own daemon thread and wait at most `timeout` for it. One call per
    key at a time: while a timed-out call is still parked, the key reports stuck without a new try."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._stuck: dict[str, _Pending] = {}

    def call(self, key: str, fn: Callable[[], T], timeout: float) -> T:
        parked = self._stuck.get(key)
        if parked is not None:
            if not parked.done.is_set():
                raise SensorError(f"read still stuck after {self._clock() - parked.started:.0f} s")
            del self._stuck[key]
        pending = _Pending(self._clock())

        def run() -> None:
            try:
                pending.value = fn()
            except BaseException as exc:  # reported to the caller, whatever it is
                pending.error = exc
            finally:
                pending.done.set()

        threading.Thread(target=run, name=f"sensor-read {key}", daemon=True).start()
        if not pending.done.wait(timeout):
            self._stuck[key] = pending
            raise SensorError(f"read timed out after {timeout:g} s")
        if pending.error is not None:
            raise pending.error
        value: T = pending.value
        return value


class SensorReader:
    """`read()` samples every source once and never raises."""

    def __init__(
        self,
        cfg: GovernorConfig,
        clock: Clock = time.monotonic,
        *,
        thermal_root: Path = THERMAL_ROOT,
        throttled_globs: tuple[str, ...] = pi_firmware.SYSFS_GLOBS,
    ) -> None:
        self.cfg = cfg
        self._clock = clock
        self._calls = TimedCalls(clock)
        self._thermal_root = thermal_root
        self._throttled_globs = throttled_globs
        self._throttled_file: str | None = None  # the sysfs file, looked for on the first read
        self._throttled_probed = False
        self._zones: list[Path] | None = None  # auto-detected temp files, found on the first read
        self._psutil_temps_absent = False
        self._vcgencmd: list[str] | None = None  # resolved command, [] when absent or disabled
        self._vcgencmd_problem = ""
        self._process = psutil.Process()

    def read(self) -> Readings:
        at = self._clock()
        errors: list[str] = []
        temperature, source = self._temperature(errors)
        available, total, swap = self._memory(errors)
        return Readings(
            temperature_c=temperature,
            temperature_source=source,
            throttled=self._throttled(errors),
            mem_available_mb=available,
            mem_total_mb=total,
            swap_used_mb=swap,
            psi_some_avg10=self._psi(errors),
            rss_mb=self._rss(errors),
            errors=tuple(errors),
            at=at,
        )

    def _timed(self, key: str, fn: Callable[[], T], errors: list[str], grace_s: float = 0.0) -> T | None:
        try:
            return self._calls.call(key, fn, self.cfg.read_timeout_s + grace_s)
        except Exception as exc:
            errors.append(f"{key}: {describe(exc)}")
            return None

    # --- temperature ---------------------------------------------------------------------

    def _temperature(self, errors: list[str]) -> tuple[float | None, str | None]:
        files = [Path(p) for p in self.cfg.temperature_files] or self._thermal_zones(errors)
        if files:
            best: tuple[float, str] | None = None
            for path in files:
                value = self._timed(f"temperature:{path}", functools.partial(_read_temperature, path), errors)
                if value is not None and (best is None or value > best[0]):
                    best = (value, str(path))
            if best is None:
                return None, ",".join(str(p) for p in files)
            return best
        if self._psutil_temps_absent:
            return None, None
        try:
            found = self._calls.call("psutil_temperatures", _psutil_cpu_temperature, self.cfg.read_timeout_s)
        except Exception as exc:
            errors.append(f"psutil_temperatures: {describe(exc)}")
            return None, "psutil"
        if found is None:
            self._psutil_temps_absent = True  # no CPU sensor on this box: stop asking
            return None, None
        return found

    def _thermal_zones(self, errors: list[str]) -> list[Path]:
        if self._zones is None:
            found = self._timed("thermal_zones", lambda: find_cpu_zones(self._thermal_root), errors)
            if found is None:
                return []  # try again next time
            self._zones = found
        return self._zones

    # --- firmware --------------------------------------------------------------------------

    def _throttled(self, errors: list[str]) -> int | None:
        if not self.cfg.vcgencmd_command:
            return None  # "" = do not ask the firmware at all
        if not self._throttled_probed:
            self._throttled_probed = True
            self._throttled_file = pi_firmware.find_sysfs(self._throttled_globs)
        if self._throttled_file is not None:
            path = Path(self._throttled_file)
            return self._timed("throttled", lambda: _read_sysfs_throttled(path), errors)
        if self._vcgencmd is None:
            try:
                command = shlex.split(self.cfg.vcgencmd_command)
            except ValueError as exc:  # unbalanced quotes: reported on every read, never run
                self._vcgencmd_problem = f"vcgencmd: cannot parse governor.vcgencmd_command: {exc}"
                command = []
            self._vcgencmd = command if command and shutil.which(command[0]) else []
        if self._vcgencmd_problem:
            errors.append(self._vcgencmd_problem)
        if not self._vcgencmd:
            return None
        command, timeout = self._vcgencmd, self.cfg.read_timeout_s
        # The child has its own timeout (it is killed); the extra second covers reaping it.
        return self._timed("vcgencmd", lambda: _run_vcgencmd(command, timeout), errors, grace_s=1.0)

    # --- memory ----------------------------------------------------------------------------

    def _memory(self, errors: list[str]) -> tuple[float | None, float | None, float | None]:
        meminfo = self.cfg.meminfo_file
        if meminfo:
            found = self._timed("meminfo", lambda: parse_meminfo(Path(meminfo).read_text()), errors)
        else:
            found = self._timed("meminfo", _psutil_memory, errors)
        return found if found is not None else (None, None, None)

    def _psi(self, errors: list[str]) -> float | None:
        path = self.cfg.psi_file
        if not path:
            return None

        def read() -> float | None:
            try:
                text = Path(path).read_text()
            except FileNotFoundError:
                return None  # kernel without PSI (or psi=0): not a failure
            return parse_psi_some_avg10(text)

        return self._timed("psi", read, errors)

    def _rss(self, errors: list[str]) -> float | None:
        rss = self._timed("rss", lambda: self._process.memory_info().rss, errors)
        return None if rss is None else rss / MIB


def _read_temperature(path: Path) -> float:
    return parse_temperature(path.read_text())


def _read_sysfs_throttled(path: Path) -> int:
    try:
        return pi_firmware.parse_sysfs(path.read_text())
    except pi_firmware.ThrottledParseError as exc:
        raise SensorError(str(exc)) from None


def _run_vcgencmd(command: list[str], timeout: float) -> int:
    # Runs on a TimedCalls thread: if the child is stuck where SIGKILL cannot reach it (a hung
    # /dev/vchiq), subprocess.run's wait after the kill blocks that thread, not the loop.
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise SensorError(f"timed out after {timeout:g} s") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise SensorError(f"exit {done.returncode}" + (f": {lines[0][:80]}" if lines else ""))
    try:
        return pi_firmware.parse_vcgencmd(done.stdout)
    except pi_firmware.ThrottledParseError as exc:
        raise SensorError(str(exc)) from None


def find_cpu_zones(root: Path) -> list[Path]:
    zones = []
    for zone in sorted(root.glob("thermal_zone*")):
        try:
            kind = (zone / "type").read_text().strip()
        except OSError:
            continue
        if CPU_SENSOR.search(kind) and (zone / "temp").exists():
            zones.append(zone / "temp")
    return zones


def _psutil_cpu_temperature() -> tuple[float, str] | None:
    sensors_temperatures = getattr(psutil, "sensors_temperatures", None)
    if sensors_temperatures is None:
        return None
    best: tuple[float, str] | None = None
    for name, entries in sensors_temperatures().items():
        if not CPU_SENSOR.search(name):
            continue
        for entry in entries:
            if entry.current is not None and (best is None or entry.current > best[0]):
                best = (float(entry.current), f"psutil:{name}")
    return best


def _psutil_memory() -> tuple[float, float, float]:
    vm = psutil.virtual_memory()
    swap = psutil.swap_memory()
    return vm.available / MIB, vm.total / MIB, swap.used / MIB


def read_available_bytes(cfg: GovernorConfig) -> int | None:
    """MemAvailable in bytes for the pre-load check, from the same source the governor uses;
    None when it cannot be read."""
    try:
        if cfg.meminfo_file:
            available_mb, _, _ = parse_meminfo(Path(cfg.meminfo_file).read_text())
        else:
            available_mb = psutil.virtual_memory().available / MIB
    except Exception as exc:
        log.warning("sensor.memory_unreadable", error=describe(exc))
        return None
    return int(available_mb * MIB)


# --- the loop ---------------------------------------------------------------------------------


class SensorLoop:
    """The sensor thread: every `interval_s`, read, let the governor decide, log transitions and
    sensor failures (once per episode), and hand the result to `on_decision(decision, readings,
    transitions)`. `busy()` tells the governor whether a generation is running (default: assume so)."""

    def __init__(
        self,
        cfg: GovernorConfig,
        on_decision: OnDecision,
        *,
        clock: Clock = time.monotonic,
        busy: Callable[[], bool] | None = None,
        reader: SensorReader | None = None,
    ) -> None:
        self.cfg = cfg
        self._on_decision = on_decision
        self._clock = clock
        self._busy = busy
        self._lock = threading.Lock()
        self.reader = reader or SensorReader(cfg, clock)
        self.governor = Governor(cfg)
        self.readings: Readings | None = None
        self.decision: Decision | None = None
        self._failing: dict[str, float] = {}  # source -> since when (monotonic)
        self._under_voltage = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sensors", daemon=True)
        self._thread.start()
        log.info("governor.started", interval_s=self.cfg.interval_s)

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def reconfigure(self, cfg: GovernorConfig) -> None:
        """SIGHUP: a changed [governor] section takes effect at the next tick. The policy starts
        afresh (normal/ok); the next reading puts it back where the temperature says."""
        if cfg == self.cfg:
            return
        with self._lock:
            self.cfg = cfg
            self.reader = SensorReader(cfg, self._clock)
            self.governor = Governor(cfg)
        log.info("governor.reconfigured")

    def status(self) -> dict[str, Any]:
        """The latest decision with its readings, for the status op (empty before the first tick)."""
        decision = self.decision
        return {} if decision is None else decision.to_dict()

    def tick(self) -> Decision:
        """One sample-decide-report cycle (the thread calls this; tests may call it directly)."""
        with self._lock:
            reader, governor = self.reader, self.governor
        readings = reader.read()
        busy = True
        if self._busy is not None:
            try:
                busy = self._busy()
            except Exception:
                log.exception("governor.busy_probe_failed")
        decision = governor.update(readings, self._clock(), busy=busy)
        transitions = governor.transitions
        self.readings, self.decision = readings, decision
        self._log_sensor_episodes(readings)
        self._log_power(readings)
        for transition in transitions:
            _log_transition(transition)
        try:
            self._on_decision(decision, readings, transitions)
        except Exception:
            log.exception("governor.on_decision_failed")
        return decision

    def _run(self) -> None:
        next_at = self._clock()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must outlive any bug in a tick
                log.exception("governor.tick_failed")
            interval = self.cfg.interval_s
            next_at += interval
            now = self._clock()
            if next_at < now:  # fell behind (a slow read): skip ahead rather than burst
                next_at = now + interval
            self._stop.wait(next_at - now)

    def _log_sensor_episodes(self, readings: Readings) -> None:
        current: dict[str, str] = {}
        for error in readings.errors:
            source, _, message = error.partition(": ")
            current.setdefault(source, message)
        now = readings.at
        for source, message in current.items():
            if source not in self._failing:
                self._failing[source] = now
                log.warning("sensor.failed", source=source, error=message)
        for source in [s for s in self._failing if s not in current]:
            since = self._failing.pop(source)
            log.info("sensor.recovered", source=source, failed_s=round(now - since, 1))

    def _log_power(self, readings: Readings) -> None:
        if readings.throttled is None:
            return
        under = bool(readings.throttled & pi_firmware.UNDER_VOLTAGE_NOW)
        if under and not self._under_voltage:
            log.warning("power.under_voltage", throttled=hex(readings.throttled))
        elif self._under_voltage and not under:
            log.info("power.under_voltage_cleared", throttled=hex(readings.throttled))
        self._under_voltage = under


def _log_transition(transition: Transition) -> None:
    worse = _severity(transition.to_state) > _severity(transition.from_state)
    fields = transition.to_dict()
    (log.warning if worse else log.info)("governor.transition", **fields)


def _severity(state: str) -> int:
    order = {"normal": 0, "ok": 0, "warm": 1, "low": 1, "lost": 1, "hot": 2, "critical": 3}
    return order.get(state, 0)
