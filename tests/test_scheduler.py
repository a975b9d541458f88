"""The scheduler is pure: these tests drive it with plain numbers for time."""

from __future__ import annotations

import pytest

from daemon.protocol import Code, EdgeError, ErrorEvent, Event, Origin, Request
from daemon.scheduler import Scheduler, make_job


class ListSink:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)


def job(request_id: str, now: float = 0.0, **fields: object):  # type: ignore[no-untyped-def]
    return make_job(Request(id=request_id, prompt="x", **fields), ListSink(), Origin("test"), now)  # type: ignore[arg-type]


def test_fifo_within_priority_and_priorities_first() -> None:
    s = Scheduler(max_depth=10)
    for rid, prio in [("l1", "low"), ("n1", "normal"), ("h1", "high"), ("n2", "normal"), ("h2", "high")]:
        s.submit(job(rid, priority=prio), now=0)
    order = []
    while (j := s.start_next(now=1)) is not None:
        order.append(j.id)
        s.finish(j, now=2)
    assert order == ["h1", "h2", "n1", "n2", "l1"]


def test_positions_follow_run_order() -> None:
    s = Scheduler(max_depth=10)
    assert s.submit(job("a"), 0) == 1
    assert s.submit(job("b", priority="low"), 0) == 2
    assert s.submit(job("c", priority="high"), 0) == 1
    assert [j.id for j in s.waiting()] == ["c", "a", "b"]


def test_queue_full_has_retry_after_from_recent_job_times() -> None:
    s = Scheduler(max_depth=2)
    first = job("first")
    s.submit(first, 0)
    s.start_next(0)
    s.finish(first, 10.0)  # a 10 s job moves the estimate up from its 2 s start
    s.submit(job("a"), 10)
    s.submit(job("b"), 10)
    with pytest.raises(EdgeError) as err:
        s.submit(job("c"), 10)
    assert err.value.code == Code.QUEUE_FULL
    assert err.value.retry_after_ms is not None
    expected = int((0.7 * 2.0 + 0.3 * 10.0) * 1000)
    assert abs(err.value.retry_after_ms - expected) <= 1


def test_duplicate_id_refused_while_queued_or_running() -> None:
    s = Scheduler(max_depth=5)
    s.submit(job("x"), 0)
    with pytest.raises(EdgeError) as err:
        s.submit(job("x"), 0)
    assert err.value.code == Code.DUPLICATE_ID
    running = s.start_next(0)
    assert running is not None
    with pytest.raises(EdgeError):
        s.submit(job("x"), 0)
    s.finish(running, 1)
    s.submit(job("x"), 1)  # finished ids may be reused


def test_refusal_is_raised_before_queueing() -> None:
    s = Scheduler(max_depth=5)
    refusal = EdgeError(Code.THROTTLED, "hot", retry_after_ms=5000)
    with pytest.raises(EdgeError) as err:
        s.submit(job("x"), 0, refusal)
    assert err.value is refusal
    assert s.depth == 0


def test_deadlines_expire_only_waiting_jobs() -> None:
    s = Scheduler(max_depth=5)
    s.submit(job("soon", deadline_ms=100), now=0)
    s.submit(job("late", deadline_ms=5000), now=0)
    s.submit(job("none"), now=0)
    assert s.next_deadline() == pytest.approx(0.1)
    assert s.expire(0.05) == []
    expired = s.expire(0.2)
    assert [j.id for j in expired] == ["soon"]
    assert [j.id for j in s.waiting()] == ["late", "none"]


def test_cancel_waiting_removes_and_running_is_flagged() -> None:
    s = Scheduler(max_depth=5)
    s.submit(job("run"), 0)
    s.submit(job("wait"), 0)
    running = s.start_next(0)
    assert running is not None and running.id == "run"
    cancelled, was_waiting = s.cancel("wait")
    assert cancelled is not None and was_waiting and s.depth == 0
    cancelled, was_waiting = s.cancel("run")
    assert cancelled is running and not was_waiting and running.cancelled
    assert s.cancel("nobody") == (None, False)


def test_take_all_waiting_empties_queues() -> None:
    s = Scheduler(max_depth=5)
    for rid in "abc":
        s.submit(job(rid), 0)
    assert [j.id for j in s.take_all_waiting()] == ["a", "b", "c"]
    assert s.depth == 0


def test_error_event_shape() -> None:
    event = EdgeError(Code.QUEUE_FULL, "full", retry_after_ms=1200).to_event("r1")
    assert isinstance(event, ErrorEvent)
    assert event.to_dict() == {
        "id": "r1", "event": "error", "code": "queue_full", "message": "full", "retry_after_ms": 1200,
    }


# --- slots, KV budget and preemption (engine v2) ---------------------------------------------


def prepared(j, kv: int = 10):  # type: ignore[no-untyped-def]
    j.kv_need = kv
    return j


def test_plan_fills_every_free_slot_in_priority_order() -> None:
    s = Scheduler(max_depth=10, slots=2, kv_capacity=1000)
    for rid, prio in [("n1", "normal"), ("l1", "low"), ("h1", "high")]:
        s.submit(prepared(job(rid, priority=prio)), 0)
    plan = s.plan(1)
    assert [j.id for j in plan.start] == ["h1", "n1"] and not plan.suspend
    assert [j.id for j in s.running] == ["h1", "n1"] and [j.id for j in s.waiting()] == ["l1"]
    assert not s.plan(1)  # no free slot, nothing less important running: no change


def test_unprepared_job_blocks_the_plan_until_tokenized() -> None:
    s = Scheduler(max_depth=10, slots=2, kv_capacity=1000)
    first = job("a")
    s.submit(first, 0)
    assert s.unprepared() == [first]
    assert not s.plan(0)
    prepared(first)
    assert [j.id for j in s.plan(0).start] == ["a"]


def test_kv_budget_holds_a_job_that_does_not_fit_and_nothing_jumps_ahead() -> None:
    s = Scheduler(max_depth=10, slots=4, kv_capacity=100)
    s.submit(prepared(job("big1"), 60), 0)
    s.submit(prepared(job("big2"), 60), 0)
    s.submit(prepared(job("small"), 5), 0)
    assert [j.id for j in s.plan(0).start] == ["big1"]
    assert s.kv_reserved == 60
    (running,) = s.running
    s.finish(running, 1)
    assert [j.id for j in s.plan(1).start] == ["big2", "small"]


def test_preemption_suspends_the_least_important_latest_stream() -> None:
    s = Scheduler(max_depth=10, slots=2, kv_capacity=1000, preempt=True)
    s.submit(prepared(job("low-old", priority="low")), 0)
    s.submit(prepared(job("low-new", priority="low")), 0)
    s.plan(0)
    s.running[1].started_at = 5  # started later
    s.submit(prepared(job("high", priority="high")), 6)
    plan = s.plan(6)
    assert [j.id for j in plan.suspend] == ["low-new"] and [j.id for j in plan.start] == ["high"]
    assert [j.id for j in s.suspended] == ["low-new"] and s.preemptions == 1
    assert s.position(plan.suspend[0]) == 1  # it resumes before anything else of its priority


def test_equal_priority_never_preempts_and_suspended_resume_first() -> None:
    s = Scheduler(max_depth=10, slots=1, kv_capacity=1000, preempt=True)
    s.submit(prepared(job("low", priority="low")), 0)
    s.plan(0)
    s.submit(prepared(job("normal")), 1)
    assert [j.id for j in s.plan(1).suspend] == ["low"]
    s.submit(prepared(job("normal2")), 2)
    assert not s.plan(2)  # normal does not preempt normal
    s.submit(prepared(job("low2", priority="low")), 3)
    (running,) = s.running
    s.finish(running, 4)
    assert [j.id for j in s.plan(4).start] == ["normal2"]
    (running,) = s.running
    s.finish(running, 5)
    assert [j.id for j in s.plan(5).start] == ["low"]  # the suspended one before the newer low


def test_preemption_off_waits() -> None:
    s = Scheduler(max_depth=10, slots=1, kv_capacity=1000, preempt=False)
    s.submit(prepared(job("low", priority="low")), 0)
    s.plan(0)
    s.submit(prepared(job("high", priority="high")), 1)
    assert not s.plan(1)


def test_preemption_frees_kv_for_a_big_important_job() -> None:
    s = Scheduler(max_depth=10, slots=4, kv_capacity=100, preempt=True)
    for rid in ("l1", "l2"):
        s.submit(prepared(job(rid, priority="low"), 40), 0)
    s.plan(0)
    s.submit(prepared(job("h", priority="high"), 70), 1)
    plan = s.plan(1)
    assert sorted(j.id for j in plan.suspend) == ["l1", "l2"] and [j.id for j in plan.start] == ["h"]


def test_cancel_of_a_suspended_job_is_flagged_for_the_worker() -> None:
    s = Scheduler(max_depth=10, slots=1, kv_capacity=1000)
    s.submit(prepared(job("low", priority="low")), 0)
    s.plan(0)
    s.submit(prepared(job("high", priority="high")), 1)
    s.plan(1)
    cancelled, was_waiting = s.cancel("low")
    assert cancelled is not None and cancelled.cancelled and not was_waiting
    s.finish(cancelled, 2)  # the worker ends it with the text so far
    assert s.suspended == []
