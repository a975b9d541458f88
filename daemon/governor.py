"""The thermal and memory governor: a pure policy from sensor `Readings` and the time to a `Decision`.

No I/O, no threads, no clock of its own: `Governor.update(readings, now)` is called by the sensor
loop (daemon/sensors.py) once per `governor.interval_s`; the inference worker applies the latest
`Decision` between decode steps. The governor keeps state between calls (thermal hysteresis, the
duty-cycle controller, memory hysteresis, how long a sensor has been silent), and reports every
change of state as a `Transition` the caller logs.

Thermal states, entered at `warm_c` / `hot_c` / `critical_c` and left `hysteresis_c` below:
  normal    full speed.
  warm      paced: a PI controller on the gap to `target_c` sets the duty cycle (fraction of wall time
            spent computing) between `min_duty` and 1; work is still admitted.
  hot       admit nothing (`throttled`), pause the running generation between tokens.
  critical  admit nothing, stop the running generation (`throttled`).
Memory states: ok; low (below `min_available_mb`, or PSI `some avg10` above `psi_some_limit`): admit
nothing (`memory_low`); critical (below `critical_available_mb`): also stop and unload the model, until
memory has been back above the `low` exit for `reload_delay_s`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from daemon.config import validate_governor_config
from daemon.pi_firmware import decode_throttled

if TYPE_CHECKING:
    from daemon.config import GovernorConfig

THERMAL_STATES = ("normal", "warm", "hot", "critical")
MEMORY_STATES = ("ok", "low", "critical")

# Readings within this many seconds feed the temperature slope (retry_after estimates).
SLOPE_WINDOW_S = 15.0
# Thermal states follow the median of this many latest readings: one noisy sample (SoC sensors
# jitter by about ±0.5 °C) must not pause generation for the whole hot hysteresis.
STATE_MEDIAN_OF = 3
# A gap between updates longer than this is not integrated (the process was stopped or starved).
MAX_INTEGRATION_STEP_S = 10.0
# Bounds of a retry_after_ms estimate.
RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 600.0


@dataclass(frozen=True)
class Readings:
    """One sample of the world, as the sensor reader saw it. Every field may be None (not available
    on this box, or the read failed: then `errors` says why)."""

    temperature_c: float | None = None
    # Where the temperature came from (file path or "psutil:<name>"); when the read failed, what was
    # tried; None when this box has no temperature source at all.
    temperature_source: str | None = None
    throttled: int | None = None  # raw firmware throttled word (daemon.pi_firmware)
    mem_available_mb: float | None = None
    mem_total_mb: float | None = None
    swap_used_mb: float | None = None
    psi_some_avg10: float | None = None  # percent of the last 10 s some task stalled on memory
    rss_mb: float | None = None  # this process
    errors: tuple[str, ...] = ()  # "source: what went wrong", one per failed source
    at: float = 0.0  # clock time of the sample (the sensor loop's monotonic clock)

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature_c": _round(self.temperature_c, 2),
            "temperature_source": self.temperature_source,
            "throttled": None if self.throttled is None else decode_throttled(self.throttled),
            "mem_available_mb": _round(self.mem_available_mb, 1),
            "mem_total_mb": _round(self.mem_total_mb, 1),
            "swap_used_mb": _round(self.swap_used_mb, 1),
            "psi_some_avg10": _round(self.psi_some_avg10, 2),
            "rss_mb": _round(self.rss_mb, 1),
            "errors": list(self.errors),
            "at": round(self.at, 3),
        }


@dataclass(frozen=True)
class Decision:
    """What the inference worker and the admission path do until the next update."""

    state: str  # thermal: normal | warm | hot | critical
    memory_state: str  # ok | low | critical
    admit: bool  # False: new requests are rejected with reject_code
    reject_code: str | None  # "throttled" | "memory_low"; also the code for `stop`
    retry_after_ms: int | None
    duty: float  # 0 < duty <= 1: fraction of wall time spent computing while generating
    pause: bool  # hold the running generation between tokens
    stop: bool  # end the running generation with reject_code
    max_tokens_cap: int | None
    n_threads: int | None  # None: the engine's configured thread count
    unload_model: bool  # memory critical: release the model
    temperature_c: float | None = None  # the temperature this decision was based on
    temperature_stale: bool = False  # no temperature for longer than sensor_grace_s: pacing blind
    reason: str = ""  # why the thermal/memory states are what they are, for status
    readings: Readings | None = None  # what this decision was based on (for status)

    NORMAL: ClassVar[Decision]

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "memory_state": self.memory_state,
            "admit": self.admit,
            "reject_code": self.reject_code,
            "retry_after_ms": self.retry_after_ms,
            "duty": round(self.duty, 3),
            "pause": self.pause,
            "stop": self.stop,
            "max_tokens_cap": self.max_tokens_cap,
            "n_threads": self.n_threads,
            "unload_model": self.unload_model,
            "temperature_c": _round(self.temperature_c, 2),
            "temperature_stale": self.temperature_stale,
            "reason": self.reason,
            "readings": None if self.readings is None else self.readings.to_dict(),
        }


Decision.NORMAL = Decision(
    state="normal",
    memory_state="ok",
    admit=True,
    reject_code=None,
    retry_after_ms=None,
    duty=1.0,
    pause=False,
    stop=False,
    max_tokens_cap=None,
    n_threads=None,
    unload_model=False,
    reason="governor disabled",
)


@dataclass(frozen=True)
class Transition:
    """A change of state, with the readings that caused it; the caller logs it as an event."""

    kind: str  # "thermal" | "memory" | "temperature_sensor"
    from_state: str
    to_state: str
    reason: str
    readings: Readings
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "reason": self.reason,
            "readings": self.readings.to_dict(),
            "at": round(self.at, 3),
        }


class DutyController:
    """PI controller: temperature -> duty cycle, used in the `warm` state.

    duty = kp * (target - T) + I, clamped to [min_duty, 1]. The integral I is, once settled, the duty
    the box can sustain at the target; it is kept between warm episodes as a learned estimate.
    Anti-windup by conditional integration: I does not move while the output is saturated in the
    direction the error pushes, and it is frozen while nothing is generating (the duty then has no
    effect on the temperature, so the error says nothing about it).
    Entering `warm` from `normal`, I starts where the output equals 1 (no jump from full speed), or
    at the learned value if that is lower, so a box that needed little duty last time does not
    overshoot while the integral unlearns full speed.
    """

    def __init__(self, kp: float, ki: float, target_c: float, min_duty: float) -> None:
        self.kp = kp
        self.ki = ki
        self.target_c = target_c
        self.min_duty = min_duty
        self.integral: float | None = None

    def enter(self, temperature_c: float) -> None:
        bumpless = 1.0 - self.kp * (self.target_c - temperature_c)
        start = bumpless if self.integral is None else min(bumpless, self.integral)
        self.integral = _clamp(start, 0.0, 1.0)

    def output(self, temperature_c: float) -> float:
        integral = 1.0 if self.integral is None else self.integral
        return _clamp(self.kp * (self.target_c - temperature_c) + integral, self.min_duty, 1.0)

    def step(self, temperature_c: float, dt: float, busy: bool) -> float:
        if self.integral is None:
            self.enter(temperature_c)
        assert self.integral is not None
        error = self.target_c - temperature_c
        raw = self.kp * error + self.integral
        saturated = (raw >= 1.0 and error > 0) or (raw <= self.min_duty and error < 0)
        if busy and dt > 0 and not saturated:
            self.integral = _clamp(self.integral + self.ki * error * dt, 0.0, 1.0)
        return self.output(temperature_c)


class Governor:
    """Stateful, pure policy. `update()` returns the new Decision; `transitions` holds the changes of
    state that update caused (empty when none), `last_transition` the latest ever."""

    def __init__(self, cfg: GovernorConfig) -> None:
        problems = validate_governor_config(cfg)
        if problems:
            raise ValueError("; ".join(f"{key}: {message}" for key, message in problems))
        self.cfg = cfg
        self.controller = DutyController(cfg.kp, cfg.ki, cfg.target_c, cfg.min_duty)
        self.state = "normal"
        self.memory_state = "ok"
        self.decision = Decision.NORMAL
        self.transitions: tuple[Transition, ...] = ()
        self.last_transition: Transition | None = None
        self._duty = 1.0
        self._thermal_reason = "starting"
        self._memory_reason = "starting"
        self._last_update: float | None = None
        self._first_update: float | None = None
        self._last_temp: float | None = None
        self._last_temp_at: float | None = None
        self._stale = False
        self._history: deque[tuple[float, float]] = deque()
        self._recent: deque[float] = deque(maxlen=STATE_MEDIAN_OF)
        self._memory_recovered_since: float | None = None

    # ---------------------------------------------------------------- public

    def update(self, readings: Readings, now: float, *, busy: bool = True) -> Decision:
        """One control step. `busy`: a generation is running (so the duty was in effect since the
        last step); the worker knows, the sensor loop asks it. Defaults to True, the worst case."""
        if self._first_update is None:
            self._first_update = now
        dt = 0.0 if self._last_update is None else now - self._last_update
        if dt < 0 or dt > MAX_INTEGRATION_STEP_S:
            dt = 0.0
        self._last_update = now
        found: list[Transition] = []
        self._update_thermal(readings, now, dt, busy, found)
        self._update_memory(readings, now, found)
        self.transitions = tuple(found)
        if found:
            self.last_transition = found[-1]
        self.decision = self._decide(now, readings)
        return self.decision

    # ---------------------------------------------------------------- thermal

    def _update_thermal(
        self, readings: Readings, now: float, dt: float, busy: bool, found: list[Transition]
    ) -> None:
        cfg = self.cfg
        temp = readings.temperature_c
        if temp is None:
            self._thermal_unknown(readings, now, found)
            return
        if self._stale:
            self._stale = False
            found.append(
                Transition(
                    "temperature_sensor", "lost", "ok", f"temperature readings are back ({temp:.1f} °C)",
                    readings, now,
                )
            )
        self._last_temp, self._last_temp_at = temp, now
        self._history.append((now, temp))
        while self._history and self._history[0][0] < now - SLOPE_WINDOW_S:
            self._history.popleft()

        self._recent.append(temp)
        filtered = sorted(self._recent)[len(self._recent) // 2]
        old = self.state
        new = _next_thermal_state(old, filtered, cfg)
        if new != old:
            self._set_thermal(new, _thermal_reason(old, new, filtered, cfg), readings, now, found)
        else:
            self._thermal_reason = f"{filtered:.1f} °C: {new}"
        if new == "normal":
            self._duty = 1.0
        elif new == "warm":
            if old == "normal":
                self.controller.enter(temp)
                self._duty = self.controller.output(temp)
            else:
                # Coming back from hot/critical the integral was frozen; it resumes from there.
                self._duty = self.controller.step(temp, 0.0 if old != "warm" else dt, busy)
        else:
            self._duty = cfg.min_duty

    def _thermal_unknown(self, readings: Readings, now: float, found: list[Transition]) -> None:
        """No temperature this time. A box that never had a sensor is not governed thermally.
        Otherwise: hold everything for `sensor_grace_s` (a glitch); then pace blind — warm at
        `blind_duty` or lower — except that hot/critical are held until `blind_cooldown_s` after
        the last reading, because nothing says the box has cooled."""
        cfg = self.cfg
        if readings.temperature_source is None and self._last_temp_at is None:
            self._thermal_reason = "no temperature sensor on this box"
            return
        assert self._first_update is not None
        last_seen = self._last_temp_at if self._last_temp_at is not None else self._first_update
        silent = now - last_seen
        if silent < cfg.sensor_grace_s:
            self._thermal_reason = f"temperature unknown for {silent:.0f} s: holding {self.state}"
            return
        if not self._stale:
            self._stale = True
            # Readings from before the outage must not vote on the state or the slope afterwards.
            self._recent.clear()
            self._history.clear()
            found.append(
                Transition(
                    "temperature_sensor", "ok", "lost",
                    f"no temperature for {silent:.0f} s (grace {cfg.sensor_grace_s:g} s)", readings, now,
                )
            )
        if self.state in ("hot", "critical") and silent < cfg.blind_cooldown_s:
            self._thermal_reason = f"temperature unknown for {silent:.0f} s: holding {self.state}"
            return
        blind = min(self._duty if self.state == "warm" else 1.0, cfg.blind_duty)
        reason = f"temperature unknown for {silent:.0f} s: pacing blind at duty {blind:.2f}"
        if self.state != "warm":
            self._set_thermal("warm", reason, readings, now, found)
        self._thermal_reason = reason
        self._duty = blind

    def _set_thermal(
        self, new: str, reason: str, readings: Readings, now: float, found: list[Transition]
    ) -> None:
        found.append(Transition("thermal", self.state, new, reason, readings, now))
        self.state = new
        self._thermal_reason = reason

    def _slope(self) -> float | None:
        """Least-squares temperature slope (°C/s) over the recent window, None if too little data."""
        points = self._history
        if len(points) < 3 or points[-1][0] - points[0][0] < 2.0:
            return None
        n = len(points)
        mean_t = sum(t for t, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        var = sum((t - mean_t) ** 2 for t, _ in points)
        if var <= 0:
            return None
        return sum((t - mean_t) * (y - mean_y) for t, y in points) / var

    def _thermal_retry_s(self, now: float) -> float:
        """Seconds until the box is expected below hot's exit point, from the measured cooling rate;
        `retry_after_s` when there is no usable estimate (still heating, too few readings)."""
        cfg = self.cfg
        exit_c = cfg.hot_c - cfg.hysteresis_c
        if self._stale:
            last_seen = self._last_temp_at if self._last_temp_at is not None else now
            return max(cfg.blind_cooldown_s - (now - last_seen), cfg.retry_after_s)
        slope = self._slope()
        if self._last_temp is None or slope is None or slope > -0.01:
            return cfg.retry_after_s
        return (self._last_temp - exit_c) / -slope

    # ---------------------------------------------------------------- memory

    def _update_memory(self, readings: Readings, now: float, found: list[Transition]) -> None:
        cfg = self.cfg
        available = readings.mem_available_mb
        psi = readings.psi_some_avg10
        if available is None:
            # Unknown: keep the last state; nothing says memory came back (or ran out).
            self._memory_reason = f"memory unknown: holding {self.memory_state}"
            return
        old = self.memory_state
        ok_floor = cfg.min_available_mb + cfg.memory_hysteresis_mb
        psi_high = psi is not None and psi > cfg.psi_some_limit
        psi_calm = psi is None or psi <= cfg.psi_some_limit - cfg.psi_hysteresis
        new = old
        if available < cfg.critical_available_mb:
            new = "critical"
            self._memory_recovered_since = None
            reason = f"{available:.0f} MiB available < critical {cfg.critical_available_mb} MiB"
        elif old == "critical":
            if available >= ok_floor:
                if self._memory_recovered_since is None:
                    self._memory_recovered_since = now
                held = now - self._memory_recovered_since
                if held >= cfg.reload_delay_s:
                    new = "ok" if psi_calm else "low"
                    reason = f"{available:.0f} MiB available >= {ok_floor} MiB for {held:.0f} s"
                else:
                    reason = f"{available:.0f} MiB available, recovering for {held:.0f} s"
            else:
                self._memory_recovered_since = None
                reason = f"{available:.0f} MiB available, below {ok_floor} MiB to recover"
        elif old == "ok" and (available < cfg.min_available_mb or psi_high):
            new = "low"
            reason = (
                f"{available:.0f} MiB available < {cfg.min_available_mb} MiB"
                if available < cfg.min_available_mb
                else f"memory pressure {psi:.1f} % > {cfg.psi_some_limit:g} %"
            )
        elif old == "low" and available >= ok_floor and psi_calm:
            new = "ok"
            reason = f"{available:.0f} MiB available >= {ok_floor} MiB" + (
                "" if psi is None else f", pressure {psi:.1f} %"
            )
        else:
            reason = f"{available:.0f} MiB available" + ("" if psi is None else f", pressure {psi:.1f} %")
        self._memory_reason = reason
        if new != old:
            found.append(Transition("memory", old, new, reason, readings, now))
            self.memory_state = new

    # ---------------------------------------------------------------- decision

    def _decide(self, now: float, readings: Readings) -> Decision:
        cfg = self.cfg
        thermal_ok = self.state in ("normal", "warm")
        memory_ok = self.memory_state == "ok"
        reject_code: str | None = None
        retry_s: float | None = None
        if not memory_ok:
            reject_code = "memory_low"
            retry_s = cfg.retry_after_s
        if not thermal_ok:
            reject_code = reject_code or "throttled"
            retry_s = max(retry_s or 0.0, self._thermal_retry_s(now))
        retry_ms = (
            None if retry_s is None else int(_clamp(retry_s, RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S) * 1000)
        )
        cap = cfg.max_tokens_normal if self.state == "normal" else cfg.max_tokens_warm
        return Decision(
            state=self.state,
            memory_state=self.memory_state,
            admit=thermal_ok and memory_ok,
            reject_code=reject_code,
            retry_after_ms=retry_ms,
            duty=self._duty,
            pause=self.state == "hot",
            stop=self.state == "critical" or self.memory_state == "critical",
            max_tokens_cap=cap or None,
            n_threads=(cfg.warm_n_threads or None) if self.state == "warm" else None,
            unload_model=self.memory_state == "critical",
            temperature_c=self._last_temp if not self._stale else None,
            temperature_stale=self._stale,
            reason=f"{self._thermal_reason}; memory {self.memory_state}: {self._memory_reason}",
            readings=readings,
        )


def _next_thermal_state(old: str, temp: float, cfg: GovernorConfig) -> str:
    """Up as far as the temperature says; down one level per exit point passed (each exit is
    `hysteresis_c` below its entry), so e.g. critical at 74 °C falls through hot to warm."""
    entries = (float("-inf"), cfg.warm_c, cfg.hot_c, cfg.critical_c)
    level = THERMAL_STATES.index(old)
    for candidate in (3, 2, 1):
        if temp >= entries[candidate]:
            if candidate > level:
                return THERMAL_STATES[candidate]
            break
    while level > 0 and temp < entries[level] - cfg.hysteresis_c:
        level -= 1
    return THERMAL_STATES[level]


def _thermal_reason(old: str, new: str, temp: float, cfg: GovernorConfig) -> str:
    entries = {"warm": cfg.warm_c, "hot": cfg.hot_c, "critical": cfg.critical_c}
    if THERMAL_STATES.index(new) > THERMAL_STATES.index(old):
        return f"{temp:.1f} °C >= {new} entry {entries[new]:g} °C"
    return f"{temp:.1f} °C < {old} exit {entries[old] - cfg.hysteresis_c:g} °C"


def _clamp(value: float, low: float, high: float) -> float:
    return low if value < low else high if value > high else value


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
