"""Admission, priorities, deadlines and cancellation: a pure state machine.

No I/O, no threads, no clock: time comes in as `now` (monotonic seconds). The inference worker
wraps it in a lock and feeds it events; tests drive it with plain numbers.
"""

from __future__ import annotations

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


@dataclass(eq=False)
class Job:
    """One accepted request and where its events go. Identity, not value, matters."""

    request: Request
    sink: Sink
    origin: Origin
    received_at: float
    deadline_at: float | None = None
    seq: int = field(default_factory=lambda: next(_sequence))
    # Set from any thread; read by the inference thread between tokens (a bool store is atomic).
    cancelled: bool = False
    started_at: float | None = None

    @property
    def id(self) -> str:
        return self.request.id


def make_job(request: Request, sink: Sink, origin: Origin, now: float) -> Job:
    deadline = None if request.deadline_ms is None else now + request.deadline_ms / 1000.0
    return Job(request, sink, origin, received_at=now, deadline_at=deadline)


class Scheduler:
    """Three FIFO queues (high, normal, low), a bound on how many wait, one running job."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self._queues: dict[str, deque[Job]] = {p: deque() for p in PRIORITIES}
        self.running: Job | None = None
        self._job_estimate_s = INITIAL_JOB_ESTIMATE_S

    # --- queries ---------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def waiting(self) -> list[Job]:
        """Jobs in the order they will run."""
        return [job for p in PRIORITIES for job in self._queues[p]]

    def position(self, job: Job) -> int:
        """1-based place in the run order; 0 when it is running."""
        if job is self.running:
            return 0
        for index, waiting in enumerate(self.waiting(), start=1):
            if waiting is job:
                return index
        raise KeyError(job.id)

    def find(self, request_id: str) -> Job | None:
        if self.running is not None and self.running.id == request_id:
            return self.running
        for job in self.waiting():
            if job.id == request_id:
                return job
        return None

    def retry_after_ms(self, now: float) -> int:
        """When a slot is likely to free: what is left of the running job, by recent job times."""
        remaining = self._job_estimate_s
        if self.running is not None and self.running.started_at is not None:
            remaining = max(self._job_estimate_s - (now - self.running.started_at), 0.1 * self._job_estimate_s)
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

    def expire(self, now: float) -> list[Job]:
        """Remove and return waiting jobs whose deadline has passed."""
        expired: list[Job] = []
        for queue in self._queues.values():
            keep = deque(j for j in queue if j.deadline_at is None or j.deadline_at > now)
            if len(keep) != len(queue):
                expired.extend(j for j in queue if j.deadline_at is not None and j.deadline_at <= now)
                queue.clear()
                queue.extend(keep)
        return expired

    def start_next(self, now: float) -> Job | None:
        """Pop the highest-priority waiting job and mark it running (expire first)."""
        if self.running is not None:
            raise RuntimeError("a job is already running")
        for priority in PRIORITIES:
            queue = self._queues[priority]
            if queue:
                job = queue.popleft()
                job.started_at = now
                self.running = job
                return job
        return None

    def finish(self, job: Job, now: float) -> None:
        """The running job ended (any way); learn from how long it took."""
        if job is not self.running:
            raise RuntimeError(f"job {job.id!r} is not the running job")
        self.running = None
        if job.started_at is not None:
            took = max(0.0, now - job.started_at)
            self._job_estimate_s = (1 - EWMA_ALPHA) * self._job_estimate_s + EWMA_ALPHA * took

    def cancel(self, request_id: str) -> tuple[Job | None, bool]:
        """Cancel by id. Returns (job, was_waiting): a waiting job is removed at once; the running
        one is flagged and stops at its next token."""
        if self.running is not None and self.running.id == request_id:
            self.running.cancelled = True
            return self.running, False
        for queue in self._queues.values():
            for job in queue:
                if job.id == request_id:
                    queue.remove(job)
                    job.cancelled = True
                    return job, True
        return None, False

    def take_all_waiting(self) -> list[Job]:
        """Empty every queue (shutdown, model lost) and hand back what was waiting."""
        jobs = self.waiting()
        for queue in self._queues.values():
            queue.clear()
        return jobs
