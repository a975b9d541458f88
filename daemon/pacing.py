"""What the batch loop does before its next step, given the governor's decision: pure.

The governor decides policy (duty cycle, pause, stop, threads); this module turns one decision,
the length of the last step and the clock into one instruction for the whole batch. No I/O, no
threads: the worker sleeps or stops as told, the tests pass plain numbers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from daemon.protocol import Code

if TYPE_CHECKING:
    from daemon.governor import Decision


class PaceAction(enum.Enum):
    GO = "go"  # run the next step now
    REST = "rest"  # sleep `seconds` first (duty cycle), then run it
    PAUSE = "pause"  # hold every stream; ask again shortly
    STOP = "stop"  # end every stream with `reason`


@dataclass(frozen=True)
class Pace:
    action: PaceAction
    seconds: float = 0.0
    reason: str | None = None


GO = Pace(PaceAction.GO)


def pace(
    decision: Decision | None,
    last_step_s: float | None,
    paused_since: float | None,
    now: float,
    max_pause_s: float,
) -> Pace:
    """The instruction for the next step.

    Duty cycle: after a step that took t, rest t*(1-duty)/duty, so compute is `duty` of the time.
    A pause longer than `max_pause_s` (measured from `paused_since`) ends the streams `throttled`
    rather than holding their clients forever.
    """
    if decision is None:
        return GO
    if decision.stop:
        return Pace(PaceAction.STOP, reason=decision.reject_code or Code.THROTTLED)
    if decision.pause:
        if paused_since is not None and now - paused_since > max_pause_s:
            return Pace(PaceAction.STOP, reason=Code.THROTTLED)
        return Pace(PaceAction.PAUSE)
    if last_step_s is not None and 0 < decision.duty < 1:
        rest = last_step_s * (1 - decision.duty) / decision.duty
        if rest > 0:
            return Pace(PaceAction.REST, seconds=rest)
    return GO


def wanted_threads(decision: Decision | None, configured: int) -> int:
    """Threads for the next step: the governor's (warm) count, else the configured one — so the
    count comes back as soon as a warm spell ends, between jobs or not."""
    if decision is not None and decision.n_threads:
        return decision.n_threads
    return configured


def max_tokens_for(requested: int, decision: Decision | None) -> int:
    if decision is not None and decision.max_tokens_cap is not None:
        return min(requested, decision.max_tokens_cap)
    return requested
