"""A simulated Raspberry Pi thermal plant and a closed-loop run of the real governor against it.

Not used by the running daemon: it is how tests (tests/test_governor.py) and
`scripts/governor_sim.py` prove the governor without a Pi. It lives in the package so both import
it the same way.

The plant is first order, `C·dT/dt = P_idle + P_compute·u − (T − T_ambient)·G(T)`, with `u` the
fraction of time the worker computes, `G = 1/R` plus an optional fan conductance following the
Raspberry Pi 5 Active Cooler curve, and optionally a second, fast node for the die (the sensor sits
on the die; the heat crosses `r_die` to the heatsink node), which is what makes a real SoC read
several degrees hotter within a second of load starting.

The closed loop emulates the inference worker exactly as it applies a Decision: decode steps of
`step_s` at full power, each followed by a rest of `step·(1−duty)/duty` at idle power; paused (hot)
or stopped (critical) means idle until a decision says otherwise. The governor sees the die
temperature once per `interval_s`, with uniform noise and quantisation like a real sensor.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from daemon.governor import Decision, Governor, Readings

if TYPE_CHECKING:
    from daemon.config import GovernorConfig

# Raspberry Pi 5 Active Cooler default curve: (°C, fan fraction); below the first point it is off.
PI5_FAN_CURVE: tuple[tuple[float, float], ...] = ((50.0, 0.3), (60.0, 0.5), (67.5, 0.7), (75.0, 1.0))


@dataclass(frozen=True)
class PlantParams:
    name: str
    description: str
    ambient_c: float
    p_idle_w: float
    p_compute_w: float  # extra power while a decode step runs
    r_k_per_w: float  # heatsink node to air, passive
    tau_s: float  # R·C of the heatsink node
    fan_w_per_k: float = 0.0  # extra conductance with the fan at 100 %
    fan_curve: tuple[tuple[float, float], ...] = ()
    r_die_k_per_w: float = 0.0  # die to heatsink; 0: one node, the sensor reads the heatsink node
    tau_die_s: float = 2.0


# Figures are chosen to match published behaviour (pi-facts.md): a bare Pi 5 under full load passes
# 85 °C, the Active Cooler holds it near 60 °C; a Pi 4 draws less but cools worse.
PRESETS: dict[str, PlantParams] = {
    p.name: p
    for p in (
        PlantParams(
            "pi5-passive", "Pi 5, passive heatsink, 25 °C room: full load settles at 91 °C",
            ambient_c=25.0, p_idle_w=2.5, p_compute_w=4.5, r_k_per_w=9.5, tau_s=90.0,
        ),
        PlantParams(
            "pi5-bare", "Pi 5 without heatsink: same losses, small mass (tau 30 s)",
            ambient_c=25.0, p_idle_w=2.5, p_compute_w=4.5, r_k_per_w=9.5, tau_s=30.0,
        ),
        PlantParams(
            "pi5-die", "Pi 5 passive with a fast die node (9 °C jump between idle and full load)",
            ambient_c=25.0, p_idle_w=2.5, p_compute_w=4.5, r_k_per_w=7.5, tau_s=90.0,
            r_die_k_per_w=2.0, tau_die_s=1.5,
        ),
        PlantParams(
            "pi4-passive", "Pi 4, passive, 25 °C room, slow (tau 200 s): full load 95 °C",
            ambient_c=25.0, p_idle_w=2.7, p_compute_w=3.7, r_k_per_w=11.0, tau_s=200.0,
        ),
        PlantParams(
            "pi4-case", "Pi 4 in a closed case at 30 °C, very slow (tau 400 s): needs duty 0.3",
            ambient_c=30.0, p_idle_w=2.7, p_compute_w=3.7, r_k_per_w=12.0, tau_s=400.0,
        ),
        PlantParams(
            "pi5-fan", "Pi 5 with the Active Cooler, 25 °C room: never needs throttling",
            ambient_c=25.0, p_idle_w=2.5, p_compute_w=4.5, r_k_per_w=9.5, tau_s=90.0,
            fan_w_per_k=0.25, fan_curve=PI5_FAN_CURVE,
        ),
        PlantParams(
            "pi5-fan-hot", "Pi 5 with the Active Cooler in a 48 °C enclosure: fan at 100 % is not enough",
            ambient_c=48.0, p_idle_w=2.5, p_compute_w=4.5, r_k_per_w=9.5, tau_s=90.0,
            fan_w_per_k=0.06, fan_curve=PI5_FAN_CURVE,
        ),
    )
}


def _interpolate(curve: Sequence[tuple[float, float]], x: float) -> float:
    if not curve or x < curve[0][0]:
        return 0.0
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


class ThermalPlant:
    def __init__(self, params: PlantParams, start_c: float | None = None) -> None:
        self.params = params
        self.capacity = params.tau_s / params.r_k_per_w
        self.die_capacity = params.tau_die_s / params.r_die_k_per_w if params.r_die_k_per_w else 0.0
        self.ambient_c = params.ambient_c
        idle = self.equilibrium_c(0.0) if start_c is None else start_c
        self.sink_c = idle - params.p_idle_w * params.r_die_k_per_w
        self.die_c = idle
        self.max_substep_s = min(0.1, params.tau_die_s / 20) if params.r_die_k_per_w else 0.1

    @property
    def sensor_c(self) -> float:
        """What the SoC sensor reads (no noise)."""
        return self.die_c if self.params.r_die_k_per_w else self.sink_c

    def conductance(self, sink_c: float) -> float:
        p = self.params
        return 1.0 / p.r_k_per_w + p.fan_w_per_k * _interpolate(p.fan_curve, sink_c)

    def advance(self, power_w: float, seconds: float) -> float:
        """Integrate with constant power; returns the highest sensor temperature on the way."""
        p = self.params
        steps = max(1, math.ceil(seconds / self.max_substep_s))
        h = seconds / steps
        peak = self.sensor_c
        for _ in range(steps):
            if p.r_die_k_per_w:
                flow = (self.die_c - self.sink_c) / p.r_die_k_per_w
                self.die_c += h * (power_w - flow) / self.die_capacity
            else:
                flow = power_w
            self.sink_c += h * (flow - (self.sink_c - self.ambient_c) * self.conductance(self.sink_c)) / self.capacity
            if not p.r_die_k_per_w:
                self.die_c = self.sink_c
            peak = max(peak, self.sensor_c)
        return peak

    def equilibrium_c(self, duty: float) -> float:
        """Steady sensor temperature at a constant duty (bisection: the fan makes G depend on T)."""
        p = self.params
        power = p.p_idle_w + p.p_compute_w * duty
        low, high = self.ambient_c, self.ambient_c + 1000.0
        for _ in range(100):
            mid = (low + high) / 2
            if (mid - self.ambient_c) * self.conductance(mid) < power:
                low = mid
            else:
                high = mid
        return low + power * p.r_die_k_per_w

    def best_constant_duty(self, limit_c: float) -> float:
        """The highest constant duty whose steady temperature stays at or under `limit_c`."""
        if self.equilibrium_c(1.0) <= limit_c:
            return 1.0
        if self.equilibrium_c(0.0) > limit_c:
            return 0.0
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            if self.equilibrium_c(mid) <= limit_c:
                low = mid
            else:
                high = mid
        return low


@dataclass
class SimResult:
    params: PlantParams
    limit_c: float  # the hot threshold: the best constant duty keeps the plant at or under it
    best_duty: float
    settle_from_s: float
    # One entry per governor interval:
    times: list[float] = field(default_factory=list)
    temps: list[float] = field(default_factory=list)  # true sensor temperature at the sample
    peaks: list[float] = field(default_factory=list)  # highest true temperature during the interval
    duties: list[float] = field(default_factory=list)  # fraction of the interval spent computing
    states: list[str] = field(default_factory=list)  # governor state after the sample
    decisions: list[Decision] = field(default_factory=list)

    def _window(self, start_s: float) -> range:
        first = next((i for i, t in enumerate(self.times) if t >= start_s), len(self.times))
        return range(first, len(self.times))

    def max_temp_after(self, start_s: float) -> float:
        return max(self.peaks[i] for i in self._window(start_s))

    def average_duty(self, start_s: float | None = None) -> float:
        window = self._window(self.settle_from_s if start_s is None else start_s)
        return sum(self.duties[i] for i in window) / len(window)

    def duty_ratio(self) -> float:
        """Settled average duty over the best constant duty (1.0 when the best is 0)."""
        return self.average_duty() / self.best_duty if self.best_duty > 0 else 1.0

    def oscillation_c(self) -> float:
        """Peak-to-peak true temperature once settled."""
        window = self._window(self.settle_from_s)
        return max(self.peaks[i] for i in window) - min(self.temps[i] for i in window)

    def mean_temp(self) -> float:
        window = self._window(self.settle_from_s)
        return sum(self.temps[i] for i in window) / len(window)

    def summary(self) -> dict[str, float]:
        return {
            "max_after_60s_c": round(self.max_temp_after(60.0), 2),
            "avg_duty_settled": round(self.average_duty(), 3),
            "avg_duty_after_60s": round(self.average_duty(60.0), 3),
            "best_constant_duty": round(self.best_duty, 3),
            "duty_ratio": round(self.duty_ratio(), 3),
            "oscillation_c": round(self.oscillation_c(), 2),
            "mean_temp_settled_c": round(self.mean_temp(), 2),
        }


def simulate(
    params: PlantParams,
    cfg: GovernorConfig,
    *,
    duration_s: float = 1800.0,
    settle_from_s: float | None = None,
    step_s: float = 0.1,
    noise_c: float = 0.5,
    quantum_c: float = 0.1,
    seed: int = 1,
    start_c: float | None = None,
    load: Callable[[float], bool] | None = None,
    ambient: Callable[[float], float] | None = None,
    sensor_ok: Callable[[float], bool] | None = None,
    governor: Governor | None = None,
) -> SimResult:
    """Run the real Governor against the plant for `duration_s` of simulated time.

    load(t): a generation is running (default always); ambient(t): room temperature (default the
    preset's); sensor_ok(t): the temperature sensor answers (default always). The settled window
    starts at `settle_from_s` (default: the second half of the run).
    """
    plant = ThermalPlant(params, start_c)
    gov = governor or Governor(cfg)
    rng = random.Random(seed)
    interval = cfg.interval_s
    result = SimResult(
        params=params,
        limit_c=cfg.hot_c,
        best_duty=plant.best_constant_duty(cfg.hot_c),
        settle_from_s=duration_s / 2 if settle_from_s is None else settle_from_s,
    )
    decision = Decision.NORMAL
    now = 0.0
    # Worker emulation: "compute" until phase_end, then "rest" until phase_end; "idle" when there is
    # no generation, or it is paused/stopped (re-checked at the next decision).
    phase, phase_end = "idle", 0.0
    while now < duration_s:
        if ambient is not None:
            plant.ambient_c = ambient(now)
        busy = load(now) if load is not None else True
        measured: float | None = None
        if sensor_ok is None or sensor_ok(now):
            noisy = plant.sensor_c + rng.uniform(-noise_c, noise_c)
            measured = round(noisy / quantum_c) * quantum_c
        readings = Readings(temperature_c=measured, temperature_source="plant", at=now)
        decision = gov.update(readings, now, busy=busy)
        if not busy or decision.pause or decision.stop:
            phase, phase_end = "idle", now
        elif phase == "idle":
            phase, phase_end = "compute", now
        interval_end = now + interval
        computed = 0.0
        peak = plant.sensor_c
        temp_at_sample = plant.sensor_c
        t = now
        while t < interval_end - 1e-9:
            if phase != "idle" and t >= phase_end - 1e-9:
                if phase == "compute" and decision.duty < 1.0:
                    phase, phase_end = "rest", t + step_s * (1.0 - decision.duty) / decision.duty
                else:
                    phase, phase_end = "compute", t + step_s
            until = interval_end if phase == "idle" else min(phase_end, interval_end)
            power = params.p_idle_w + (params.p_compute_w if phase == "compute" else 0.0)
            peak = max(peak, plant.advance(power, until - t))
            if phase == "compute":
                computed += until - t
            t = until
        result.times.append(now)
        result.temps.append(temp_at_sample)
        result.peaks.append(peak)
        result.duties.append(computed / interval)
        result.states.append(decision.state)
        result.decisions.append(decision)
        now = interval_end
    return result
