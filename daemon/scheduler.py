"""Admission, priorities, slots, suspension, deadlines and cancellation: a pure state machine.

No I/O, no threads, no clock: time comes in as `now` (monotonic seconds). The worker wraps it in
a lock and feeds it events; tests drive it with plain numbers.

Model. `slots` streams run at once (engine.parallel), sharing `kv_capacity` KV cells (the
context): a running job reserves `kv_need` cells (its prompt not shared with another stream,
plus max_tokens). Waiting jobs sit in three FIFO queues (high, normal, low). A job that was
running and got suspended to make room for a more important one waits in front of its own
priority's queue and resumes, from where it stopped, when there is room again. `plan(now)` says
what to suspend and what to start; the worker does it and reports back with `finish`.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from daemon.protocol import PRIORITIES, Code, EdgeError, Origin, Request

if TYPE_CHECKING:
    from daemon.backend import Sink

# Before any request has finished we know nothing about throughput; assume a short answer.
INITIAL_JOB_ESTIMATE_S = 2.0
# Weight of the newest job in the moving average of job durations.
EWMA_ALPHA = 0.3
_sequence = itertools.count()
_RANK = {p: i for i, p in enumerate(PRIORITIES)}  # 0 = most important


class JobState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SUSPENDED = "suspended"


@dataclass(eq=False)
class Job:
    """One accepted request and where its events go. Identity, not value, matters."""

    request: Request
    sink: Sink
    origin: Origin
    received_at: float
    deadline_at: float | None = None
    seq: int = field(default_factory=lambda: next(_sequence))
    # Set from any thread; read by the inference thread between steps (a bool store is atomic).
    cancelled: bool = False
    started_at: float | None = None
    state: JobState = JobState.WAITING
    # KV cells the job holds while it runs; None until the worker has tokenized it.
    kv_need: int | None = None
    suspensions: int = 0

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def rank(self) -> int:
        return _RANK[self.request.priority]


def make_job(request: Request, sink: Sink, origin: Origin, now: float) -> Job:
    deadline = None if request.deadline_ms is None else now + request.deadline_ms / 1000.0
    return Job(request, sink, origin, received_at=now, deadline_at=deadline)


@dataclass(frozen=True)
class Plan:
    """Suspend these (in order), then start or resume these."""

    suspend: tuple[Job, ...] = ()
    start: tuple[Job, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.suspend or self.start)


class Scheduler:
    def __init__(self, max_depth: int, slots: int = 1, kv_capacity: int = 0, preempt: bool = True) -> None:
        self.max_depth = max_depth
        self.slots = slots
        self.kv_capacity = kv_capacity  # 0 = not limited (before a model is loaded)
        self.preempt = preempt
        self._queues: dict[str, deque[Job]] = {p: deque() for p in PRIORITIES}
        self._suspended: dict[str, deque[Job]] = {p: deque() for p in PRIORITIES}
        self._running: list[Job] = []
        self._job_estimate_s = INITIAL_JOB_ESTIMATE_S
        self.preemptions = 0

    # --- queries ---------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests waiting to start (suspended ones are counted apart)."""
        return sum(len(q) for q in self._queues.values())

    @property
    def running(self) -> list[Job]:
        return list(self._running)

    @property
    def suspended(self) -> list[Job]:
        return [job for p in PRIORITIES for job in self._suspended[p]]

    @property
    def kv_reserved(self) -> int:
        return sum(job.kv_need or 0 for job in self._running)

    def waiting(self) -> list[Job]:
        """Jobs not running, in the order they will (re)start."""
        return [job for p in PRIORITIES for job in (*self._suspended[p], *self._queues[p])]

    def unprepared(self) -> list[Job]:
        """Waiting jobs the worker has not tokenized yet (kv_need unknown)."""
        return [job for p in PRIORITIES for job in self._queues[p] if job.kv_need is None]

    def idle(self) -> bool:
        return not self._running and not self.waiting()

    def position(self, job: Job) -> int:
        """1-based place in the start order; 0 when it is running."""
        if job.state is JobState.RUNNING:
            return 0
        for index, waiting in enumerate(self.waiting(), start=1):
            if waiting is job:
                return index
        raise KeyError(job.id)

    def find(self, request_id: str) -> Job | None:
        for job in (*self._running, *self.waiting()):
            if job.id == request_id:
                return job
        return None

    def retry_after_ms(self, now: float) -> int:
        """When a stream is likely to free: the soonest end among the running, by recent job times."""
        remaining = self._job_estimate_s
        started = [job.started_at for job in self._running if job.started_at is not None]
        if started and len(self._running) >= self.slots:
            elapsed = now - min(started)
            remaining = max(self._job_estimate_s - elapsed, 0.1 * self._job_estimate_s)
        return max(100, min(600_000, math.ceil(remaining * 1000)))

    def next_deadline(self) -> float | None:
        deadlines = [j.deadline_at for j in self.waiting() if j.deadline_at is not None]
        return min(deadlines) if deadlines else None

    @property
    def job_estimate_s(self) -> float:
        return self._job_estimate_s

    # --- events ----------------------------------------------------------------------------

    def submit(self, job: Job, now: float, refusal: EdgeError | None = None) -> int:
        """Queue a job and return its position (1-based). Raises `EdgeError` when refused.

        `refusal` is the governor's (or the service's) reason to admit nothing right now.
        """
        if self.find(job.id) is not None:
            raise EdgeError(Code.DUPLICATE_ID, f"a request with id {job.id!r} is already queued or running")
        if refusal is not None:
            raise refusal
        if self.depth >= self.max_depth:
            raise EdgeError(
                Code.QUEUE_FULL,
                f"queue is full ({self.max_depth} waiting)",
                retry_after_ms=self.retry_after_ms(now),
            )
        self._queues[job.request.priority].append(job)
        return self.position(job)

    def plan(self, now: float) -> Plan:
        """Fill free slots in priority order; make room by suspending strictly less important
        streams when `preempt` is on. Within a priority, suspended jobs go first, then FIFO.
        A job that does not fit yet holds its place: nothing behind it jumps ahead."""
        suspend: list[Job] = []
        start: list[Job] = []
        while True:
            candidate = self._next_candidate()
            if candidate is None or candidate.kv_need is None:
                break
            if not self._fits(candidate):
                victims = self._victims_for(candidate) if self.preempt else None
                if not victims:
                    break
                for victim in victims:
                    self.suspend(victim)
                    self.preemptions += 1
                    suspend.append(victim)
            self._take(candidate, now)
            start.append(candidate)
        return Plan(tuple(suspend), tuple(start))

    def start_next(self, now: float) -> Job | None:
        """Start the next job if a slot is free (no preemption); a convenience for one slot."""
        candidate = self._next_candidate()
        if candidate is None or len(self._running) >= self.slots:
            return None
        self._take(candidate, now)
        return candidate

    def finish(self, job: Job, now: float) -> None:
        """A running or suspended job ended (any way); learn from how long it took."""
        if job in self._running:
            self._running.remove(job)
        elif job in self._suspended[job.request.priority]:
            self._suspended[job.request.priority].remove(job)
        else:
            raise RuntimeError(f"job {job.id!r} is not running or suspended")
        if job.started_at is not None:
            took = max(0.0, now - job.started_at)
            self._job_estimate_s = (1 - EWMA_ALPHA) * self._job_estimate_s + EWMA_ALPHA * took

    def suspend(self, job: Job) -> None:
        """Suspend a running job outside a plan (the engine ran out of KV cells)."""
        self._running.remove(job)
        job.state = JobState.SUSPENDED
        job.suspensions += 1
        self._suspended[job.request.priority].appendleft(job)

    def drop(self, job: Job) -> None:
        """Remove a waiting job that the worker could not prepare (its error is sent by the worker)."""
        self._queues[job.request.priority].remove(job)

    def expire(self, now: float) -> list[Job]:
        """Remove and return waiting (never started) jobs whose deadline has passed."""
        expired: list[Job] = []
        for queue in self._queues.values():
            keep = deque(j for j in queue if j.deadline_at is None or j.deadline_at > now)
            if len(keep) != len(queue):
                expired.extend(j for j in queue if j.deadline_at is not None and j.deadline_at <= now)
                queue.clear()
                queue.extend(keep)
        return expired

    def cancel(self, request_id: str) -> tuple[Job | None, bool]:
        """Cancel by id. Returns (job, was_waiting): a job that never started is removed at once;
        a running or suspended one is flagged, and the worker ends it with the text so far."""
        for job in (*self._running, *self.suspended):
            if job.id == request_id:
                job.cancelled = True
                return job, False
        for queue in self._queues.values():
            for job in queue:
                if job.id == request_id:
                    queue.remove(job)
                    job.cancelled = True
                    return job, True
        return None, False

    def take_all_waiting(self) -> list[Job]:
        """Empty the queues of jobs that never started (shutdown, model lost) and hand them back."""
        jobs = [job for p in PRIORITIES for job in self._queues[p]]
        for queue in self._queues.values():
            queue.clear()
        return jobs

    # --- internals -------------------------------------------------------------------------

    def _next_candidate(self) -> Job | None:
        for priority in PRIORITIES:
            if self._suspended[priority]:
                return self._suspended[priority][0]
            if self._queues[priority]:
                return self._queues[priority][0]
        return None

    def _fits(self, job: Job, freed_slots: int = 0, freed_kv: int = 0) -> bool:
        if len(self._running) - freed_slots >= self.slots:
            return False
        if self.kv_capacity <= 0:
            return True
        return self.kv_reserved - freed_kv + (job.kv_need or 0) <= self.kv_capacity

    def _victims_for(self, job: Job) -> list[Job] | None:
        """The fewest least-important running streams whose suspension makes room, or None."""
        # Least important first; among equals the most recently started (it has done least).
        order = sorted(
            (r for r in self._running if r.rank > job.rank),
            key=lambda r: (-r.rank, -(r.started_at or 0.0), -r.seq),
        )
        victims: list[Job] = []
        freed_kv = 0
        for victim in order:
            victims.append(victim)
            freed_kv += victim.kv_need or 0
            if self._fits(job, len(victims), freed_kv):
                return victims
        return None

    def _take(self, job: Job, now: float) -> None:
        if job.state is JobState.SUSPENDED:
            self._suspended[job.request.priority].remove(job)
        else:
            self._queues[job.request.priority].remove(job)
            job.started_at = now
        job.state = JobState.RUNNING
        self._running.append(job)
