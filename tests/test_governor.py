"""The governor policy (pure, injected clock) and its proof on simulated thermal plants.

The simulation runs the real `Governor` against `daemon.thermal_plant`, a first-order (optionally
two-node) heat model driven the way the inference worker applies a Decision: decode steps at full
power, rests of step·(1−duty)/duty, nothing while paused. Minutes of simulated time take
milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from daemon.config import GovernorConfig
from daemon.config import validate_governor_config as validate_config
from daemon.governor import Decision, Governor, Readings
from daemon.thermal_plant import PRESETS, ThermalPlant, simulate

CFG = GovernorConfig()
MIB = 1024 * 1024


def reading(temp: float | None = None, **fields: object) -> Readings:
    fields.setdefault("temperature_source", "test")
    fields.setdefault("mem_available_mb", 4000.0)
    return Readings(temperature_c=temp, **fields)  # type: ignore[arg-type]


class Driver:
    """Feeds a governor readings one interval apart."""

    def __init__(self, cfg: GovernorConfig = CFG) -> None:
        self.gov = Governor(cfg)
        self.now = 0.0

    def feed(self, temp: float | None, times: int = 1, *, busy: bool = True, **fields: object) -> Decision:
        decision = self.gov.update(reading(temp, **fields), self.now, busy=busy)
        self.now += 1.0
        for _ in range(times - 1):
            decision = self.gov.update(reading(temp, **fields), self.now, busy=busy)
            self.now += 1.0
        return decision


# --- thermal states ------------------------------------------------------------------------


def test_defaults_are_the_documented_pi5_thresholds() -> None:
    assert (CFG.warm_c, CFG.hot_c, CFG.critical_c, CFG.hysteresis_c, CFG.target_c) == (70, 78, 83, 3, 75)
    assert validate_config(CFG) == []


def test_states_rise_at_their_entry_and_fall_only_hysteresis_below() -> None:
    d = Driver()
    # Three readings each: states follow the median of the last three.
    path = [
        (69.9, "normal"), (70.0, "warm"), (77.9, "warm"), (78.0, "hot"), (82.9, "hot"), (83.0, "critical"),
        (80.1, "critical"), (79.9, "hot"), (75.1, "hot"), (74.9, "warm"), (67.1, "warm"), (66.9, "normal"),
    ]  # fmt: skip
    for temp, state in path:
        assert d.feed(temp, 3).state == state, temp


def test_decision_per_state() -> None:
    d = Driver(replace(CFG, max_tokens_normal=512, max_tokens_warm=64, warm_n_threads=2))
    normal = d.feed(50.0, 3)
    assert (normal.admit, normal.duty, normal.pause, normal.stop, normal.reject_code) == (True, 1.0, False, False, None)
    assert (normal.max_tokens_cap, normal.n_threads, normal.retry_after_ms) == (512, None, None)
    warm = d.feed(77.0, 3)
    assert warm.admit and not warm.pause and not warm.stop
    assert CFG.min_duty <= warm.duty < 1.0
    assert (warm.max_tokens_cap, warm.n_threads) == (64, 2)
    hot = d.feed(79.0, 3)
    assert (hot.state, hot.admit, hot.pause, hot.stop, hot.reject_code) == ("hot", False, True, False, "throttled")
    assert hot.retry_after_ms is not None and hot.retry_after_ms >= 1000
    critical = d.feed(84.0, 3)
    assert (critical.admit, critical.stop, critical.reject_code) == (False, True, "throttled")
    assert not critical.unload_model


def test_critical_cooled_fast_falls_through_hot_to_warm() -> None:
    d = Driver()
    d.feed(84.0, 3)
    decision = d.feed(73.0, 3)
    assert decision.state == "warm" and decision.admit
    assert d.gov.last_transition is not None
    assert (d.gov.last_transition.from_state, d.gov.last_transition.to_state) == ("critical", "warm")


def test_a_single_noisy_sample_does_not_pause_generation() -> None:
    d = Driver()
    d.feed(77.0, 3)
    assert d.feed(78.6).state == "warm"  # one spike
    assert d.feed(77.2).state == "warm"
    d.feed(78.6)
    assert d.feed(78.5).state == "hot"  # two of the last three: real


def test_transitions_carry_the_readings_that_caused_them() -> None:
    gov = Governor(CFG)
    gov.update(reading(60.0), 0.0)
    gov.update(reading(60.0), 1.0)
    assert gov.transitions == () and gov.last_transition is None
    r = reading(71.0)
    gov.update(r, 2.0)
    assert gov.transitions == ()  # the median of the last three is still 60
    gov.update(r, 3.0)
    (transition,) = gov.transitions
    assert (transition.kind, transition.from_state, transition.to_state) == ("thermal", "normal", "warm")
    assert transition.readings is r and transition.at == 3.0
    assert "71.0" in transition.reason and "70" in transition.reason
    assert json.loads(json.dumps(transition.to_dict()))["readings"]["temperature_c"] == 71.0
    gov.update(r, 4.0)
    assert gov.transitions == () and gov.last_transition is transition


def test_hot_retry_after_follows_the_measured_cooling_rate() -> None:
    d = Driver()
    d.feed(79.0, 3)  # hot, not cooling yet: the configured fallback
    assert d.feed(79.0).retry_after_ms == int(CFG.retry_after_s * 1000)
    temp = 79.0
    for _ in range(16):  # cooling at 0.2 °C/s for the whole slope window
        temp -= 0.2
        decision = d.feed(temp)
    assert decision.state == "hot"
    expected_s = (temp - (CFG.hot_c - CFG.hysteresis_c)) / 0.2  # 0.8 °C to go at 0.2 °C/s = 4 s
    assert decision.retry_after_ms == pytest.approx(expected_s * 1000, rel=0.05)


# --- the duty controller -------------------------------------------------------------------


def test_warm_duty_falls_as_temperature_rises_and_stays_in_bounds() -> None:
    duties = []
    for temp in (71.0, 73.0, 75.0, 77.0, 77.9):
        d = Driver()
        d.feed(71.0, 3)  # enter warm at the same point
        duties.append(d.feed(temp).duty)
    assert duties == sorted(duties, reverse=True) and len(set(duties)) == len(duties)
    assert all(CFG.min_duty <= x <= 1.0 for x in duties)


def test_entering_warm_does_not_jump_from_full_speed() -> None:
    d = Driver()
    d.feed(69.0, 3)
    assert d.feed(70.0, 2).duty == pytest.approx(1.0, abs=1e-9)


def test_integral_does_not_wind_up_below_target() -> None:
    d = Driver()
    d.feed(71.0, 3)
    d.feed(69.0, 2000)  # warm (above the 67 °C exit) and cool: the output saturates at 1
    assert d.gov.controller.integral is not None and d.gov.controller.integral <= 1.0
    # One degree over target must cut the duty at once, not after unwinding 2000 s of error.
    d.feed(76.0, 3)
    assert d.feed(76.0).duty <= 1.0 - CFG.kp * 1.0 + 1e-9


def test_integral_does_not_wind_down_to_zero_while_hot_in_warm() -> None:
    d = Driver()
    d.feed(71.0, 3)
    assert d.feed(77.5, 3000).duty == CFG.min_duty  # floor, never below
    integral = d.gov.controller.integral
    assert integral is not None and integral >= 0.0
    assert d.feed(74.0, 3).duty > CFG.min_duty  # recovers as soon as it is cool


def test_integral_is_frozen_while_nothing_is_generating() -> None:
    d = Driver()
    d.feed(71.0, 3)
    d.feed(76.0, 30)
    before = d.gov.controller.integral
    d.feed(72.0, 600, busy=False)  # idle in warm: the duty had no effect, so nothing is learned
    assert d.gov.controller.integral == before
    d.feed(72.0, 10, busy=True)
    assert d.gov.controller.integral != before


def test_learned_duty_is_kept_for_the_next_warm_episode() -> None:
    d = Driver()
    d.feed(71.0, 3)
    d.feed(76.5, 400)  # learns that much less than full duty is sustainable
    learned = d.gov.controller.integral
    assert learned is not None and learned < 0.5
    d.feed(60.0, 5)
    assert d.gov.state == "normal"
    entry = d.feed(70.5, 3)
    assert entry.state == "warm"
    assert entry.duty == pytest.approx(CFG.kp * (CFG.target_c - 70.5) + learned, abs=0.01)


# --- memory -------------------------------------------------------------------------------


def test_memory_low_by_available_memory_with_hysteresis() -> None:
    d = Driver()
    assert d.feed(50.0, mem_available_mb=250.0).memory_state == "ok"
    low = d.feed(50.0, mem_available_mb=199.0)
    assert (low.memory_state, low.admit, low.reject_code) == ("low", False, "memory_low")
    assert low.retry_after_ms == int(CFG.retry_after_s * 1000)
    assert not low.stop and not low.unload_model and not low.pause  # the running answer finishes
    assert d.feed(50.0, mem_available_mb=240.0).memory_state == "low"  # below 200 + 50
    assert d.feed(50.0, mem_available_mb=250.0).memory_state == "ok"
    (transition,) = d.gov.transitions
    assert (transition.kind, transition.from_state, transition.to_state) == ("memory", "low", "ok")


def test_memory_low_by_pressure_stall_information() -> None:
    d = Driver()
    assert d.feed(50.0, psi_some_avg10=9.9).memory_state == "ok"
    assert d.feed(50.0, psi_some_avg10=10.5).memory_state == "low"
    assert d.feed(50.0, psi_some_avg10=6.0).memory_state == "low"
    assert d.feed(50.0, psi_some_avg10=4.9).memory_state == "ok"
    assert d.feed(50.0, psi_some_avg10=None).memory_state == "ok"  # kernel without PSI


def test_memory_critical_unloads_and_reloads_only_after_a_steady_recovery() -> None:
    d = Driver()
    crit = d.feed(50.0, mem_available_mb=90.0)
    assert (crit.memory_state, crit.unload_model, crit.stop, crit.admit) == ("critical", True, True, False)
    assert d.gov.transitions[0].to_state == "critical"
    # Unloading frees memory at once; the reload waits reload_delay_s of steady recovery.
    assert d.feed(50.0, int(CFG.reload_delay_s) - 1, mem_available_mb=1000.0).unload_model
    d.feed(50.0, mem_available_mb=240.0)  # a dip below the ok floor restarts the wait
    assert d.feed(50.0, int(CFG.reload_delay_s), mem_available_mb=1000.0).unload_model
    back = d.feed(50.0, mem_available_mb=1000.0)
    assert (back.memory_state, back.unload_model, back.admit) == ("ok", False, True)


def test_unknown_memory_holds_the_last_memory_state() -> None:
    d = Driver()
    d.feed(50.0, mem_available_mb=150.0)
    assert d.feed(50.0, 100, mem_available_mb=None).memory_state == "low"


def test_memory_and_heat_together_reject_with_memory_low_and_the_longer_wait() -> None:
    d = Driver()
    d.feed(79.0, 3, mem_available_mb=150.0)
    decision = d.feed(79.0, mem_available_mb=150.0)
    assert (decision.state, decision.memory_state, decision.reject_code) == ("hot", "low", "memory_low")
    assert decision.pause and decision.retry_after_ms == int(CFG.retry_after_s * 1000)


# --- missing temperature ---------------------------------------------------------------------


def test_a_box_without_any_temperature_sensor_is_not_governed_thermally() -> None:
    d = Driver()
    decision = d.feed(None, 100, temperature_source=None)
    assert (decision.state, decision.duty, decision.admit, decision.temperature_stale) == ("normal", 1.0, True, False)
    assert d.gov.last_transition is None


def test_lost_sensor_holds_for_the_grace_period_then_paces_blind() -> None:
    d = Driver()
    d.feed(74.0, 3)
    d.feed(77.0, 300)  # warm, duty learned below the blind duty
    duty = d.gov.decision.duty
    assert duty < CFG.blind_duty
    held = d.feed(None, int(CFG.sensor_grace_s) - 1)
    assert (held.state, held.duty, held.temperature_stale) == ("warm", duty, False)
    blind = d.feed(None)
    assert (blind.state, blind.duty, blind.temperature_stale, blind.admit) == ("warm", duty, True, True)
    (transition,) = d.gov.transitions
    assert (transition.kind, transition.from_state, transition.to_state) == ("temperature_sensor", "ok", "lost")


def test_sensor_failing_from_the_start_paces_at_the_blind_duty() -> None:
    d = Driver()
    assert d.feed(None, int(CFG.sensor_grace_s)).duty == 1.0
    blind = d.feed(None)
    assert (blind.state, blind.duty, blind.temperature_stale) == ("warm", CFG.blind_duty, True)
    assert blind.admit
    back = d.feed(50.0, 3)
    assert (back.state, back.duty, back.temperature_stale) == ("normal", 1.0, False)
    assert [(t.kind, t.to_state) for t in d.gov.transitions] == []
    assert d.gov.last_transition is not None and d.gov.last_transition.kind == "thermal"


def test_lost_sensor_while_hot_stays_hot_until_the_blind_cooldown() -> None:
    d = Driver()
    d.feed(79.0, 3)
    assert d.feed(None, int(CFG.blind_cooldown_s) - 1).state == "hot"
    blind = d.feed(None, 2)
    assert (blind.state, blind.duty, blind.temperature_stale, blind.admit) == ("warm", CFG.blind_duty, True, True)
    assert d.feed(79.5, 3).state == "hot"  # the sensor is back and says hot


def test_readings_from_before_an_outage_do_not_vote_afterwards() -> None:
    d = Driver()
    d.feed(79.0, 3)
    d.feed(None, int(CFG.blind_cooldown_s) + 1)
    back = d.feed(60.0)  # one reading after the outage: the three 79s before it are history
    assert back.state == "normal" and not back.temperature_stale


# --- config, serialisation -------------------------------------------------------------


def test_inconsistent_thresholds_are_refused_with_the_key_names() -> None:
    bad = replace(CFG, warm_c=80.0, critical_available_mb=500, memory_reserve_mb=100)
    keys = [key for key, _ in validate_config(bad)]
    assert keys == ["governor.warm_c", "governor.target_c", "governor.critical_available_mb",
                    "governor.memory_reserve_mb"]  # fmt: skip
    assert "got 80, 78, 83" in validate_config(bad)[0][1]
    with pytest.raises(ValueError, match=r"governor\.target_c: must be >= governor\.warm_c and < governor\.hot_c"):
        Governor(replace(CFG, target_c=79.0))


def test_decisions_and_readings_serialise_to_json() -> None:
    assert Decision.NORMAL.admit and Decision.NORMAL.duty == 1.0 and Decision.NORMAL.state == "normal"
    r = Readings(temperature_c=61.234, temperature_source="/x", throttled=0x50005, mem_available_mb=812.33, at=5.0)
    decision = Governor(CFG).update(r, 5.0)
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["readings"]["temperature_c"] == 61.23
    assert data["readings"]["throttled"]["raw"] == "0x50005"
    assert data["state"] == "normal" and data["admit"] is True


# --- simulation: the acceptance ----------------------------------------------------------------


def test_the_acceptance_plant_is_hot_enough_to_need_a_governor() -> None:
    plant = ThermalPlant(PRESETS["pi5-passive"])
    assert plant.equilibrium_c(1.0) > 85.0
    best = plant.best_constant_duty(CFG.hot_c)
    assert plant.equilibrium_c(best) == pytest.approx(CFG.hot_c, abs=0.01)
    assert 0.5 < best < 0.9
    assert 15.0 < PRESETS["pi5-passive"].tau_s < 600.0  # a real heatsink: tens of seconds to minutes
    # Without the governor (thresholds out of reach) the same run passes 85 °C: the test below can fail.
    off = replace(CFG, warm_c=120.0, target_c=121.0, hot_c=130.0, critical_c=140.0)
    assert simulate(PRESETS["pi5-passive"], off, duration_s=1200).max_temp_after(60.0) > 85.0


@pytest.mark.parametrize("quantum_c", [0.1, 0.5])
def test_acceptance_pi5_passive_holds_the_limit_with_little_lost_throughput(quantum_c: float) -> None:
    result = simulate(PRESETS["pi5-passive"], CFG, duration_s=1800.0, noise_c=0.5, quantum_c=quantum_c)
    assert result.max_temp_after(60.0) <= CFG.hot_c + 1.0
    assert result.duty_ratio() >= 0.85, result.summary()
    assert result.oscillation_c() <= 4.0
    # The governor did govern: it settled in warm near the target, below the hot threshold.
    assert set(result.states[len(result.states) // 2 :]) == {"warm"}
    assert result.mean_temp() == pytest.approx(CFG.target_c, abs=0.5)
    assert result.average_duty() < 0.99


@pytest.mark.parametrize("preset", ["pi5-bare", "pi5-die", "pi4-passive", "pi4-case", "pi5-fan-hot"])
def test_other_plants_stay_under_hot_plus_one_without_wild_oscillation(preset: str) -> None:
    result = simulate(PRESETS[preset], CFG, duration_s=3600.0, quantum_c=0.5)
    assert result.max_temp_after(60.0) <= CFG.hot_c + 1.0, result.summary()
    assert result.oscillation_c() <= 4.0, result.summary()
    assert result.average_duty() >= 0.75 * result.best_duty, result.summary()


def test_active_cooler_never_throttles() -> None:
    result = simulate(PRESETS["pi5-fan"], CFG, duration_s=1800.0)
    assert set(result.states) == {"normal"}
    assert result.average_duty(0.0) > 0.99


def test_slower_sampling_still_holds_the_limit() -> None:
    result = simulate(PRESETS["pi5-die"], replace(CFG, interval_s=5.0), duration_s=1800.0, quantum_c=0.5)
    assert result.max_temp_after(60.0) <= CFG.hot_c + 1.0
    assert result.oscillation_c() <= 4.0


def test_a_burst_after_idling_warm_does_not_overshoot() -> None:
    # A 48 °C room: the idle board sits at 72 °C, inside warm. Ten idle minutes must not teach the
    # controller that full duty is fine (it would, without freezing the integral when idle).
    params = replace(PRESETS["pi5-passive"], name="warm-room", ambient_c=48.0)
    result = simulate(params, CFG, duration_s=2400.0, load=lambda t: not 900.0 <= t < 1500.0)
    assert result.max_temp_after(1500.0) <= CFG.hot_c
    assert "hot" not in result.states[1500:]


def test_a_rise_in_room_temperature_is_absorbed() -> None:
    result = simulate(
        PRESETS["pi5-passive"], CFG, duration_s=2400.0, ambient=lambda t: 25.0 if t < 1000.0 else 33.0
    )
    assert result.max_temp_after(60.0) <= CFG.hot_c + 1.0
    assert result.mean_temp() == pytest.approx(CFG.target_c, abs=0.5)
    assert result.average_duty() < result.average_duty(300.0)  # it gave duty back to the warmer room


def test_a_sensor_outage_paces_blind_and_stays_under_the_limit() -> None:
    result = simulate(
        PRESETS["pi5-passive"], CFG, duration_s=1800.0, sensor_ok=lambda t: not 900.0 <= t < 1200.0
    )
    assert result.max_temp_after(60.0) <= CFG.hot_c + 1.0
    stale = [d for t, d in zip(result.times, result.decisions) if 900.0 + CFG.sensor_grace_s < t < 1200.0]
    assert stale and all(d.temperature_stale and d.duty <= CFG.blind_duty for d in stale)
