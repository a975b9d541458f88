"""Pacing is pure: a decision, the last step's length and the clock in; one instruction out."""

from __future__ import annotations

import dataclasses

import pytest

from daemon.governor import Decision
from daemon.pacing import PaceAction, max_tokens_for, pace, wanted_threads


def decision(**fields: object) -> Decision:
    return dataclasses.replace(Decision.NORMAL, **fields)  # type: ignore[arg-type]


def test_no_decision_or_normal_goes() -> None:
    assert pace(None, 0.1, None, 0.0, 60).action is PaceAction.GO
    assert pace(decision(), 0.1, None, 0.0, 60).action is PaceAction.GO


def test_duty_cycle_rests_in_proportion_to_the_last_step() -> None:
    step = pace(decision(duty=0.25), 0.1, None, 0.0, 60)
    assert step.action is PaceAction.REST and step.seconds == pytest.approx(0.3)
    assert pace(decision(duty=0.25), None, None, 0.0, 60).action is PaceAction.GO  # just rested


def test_pause_until_max_pause_then_stop_throttled() -> None:
    assert pace(decision(pause=True), 0.1, None, 0.0, 60).action is PaceAction.PAUSE
    assert pace(decision(pause=True), 0.1, 10.0, 69.0, 60).action is PaceAction.PAUSE
    step = pace(decision(pause=True), 0.1, 10.0, 71.0, 60)
    assert step.action is PaceAction.STOP and step.reason == "throttled"


def test_stop_carries_the_governors_code() -> None:
    step = pace(decision(stop=True, reject_code="memory_low"), 0.1, None, 0.0, 60)
    assert step.action is PaceAction.STOP and step.reason == "memory_low"


def test_threads_come_back_when_the_warm_spell_ends() -> None:
    assert wanted_threads(decision(n_threads=1), 4) == 1
    assert wanted_threads(decision(), 4) == 4
    assert wanted_threads(None, 4) == 4


def test_max_tokens_cap() -> None:
    assert max_tokens_for(100, decision(max_tokens_cap=20)) == 20
    assert max_tokens_for(10, decision(max_tokens_cap=20)) == 10
    assert max_tokens_for(100, None) == 100
