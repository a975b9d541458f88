"""The batch loop: runs the scheduler's plan on the engine, one step at a time, and turns what
each step produced into events.

Owned by the worker thread. Before every step it ends the streams that must stop (cancel,
deadline, shutdown), asks `pacing` what the governor's decision means for the whole batch (go,
rest, pause, stop), sets the thread count, then runs one `Engine.step` for every running stream.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog

from daemon.batch_width import BatchWidth
from daemon.constraints import parse_answer
from daemon.engine import Aborted, Engine, KvFull, LlamaError, Prepared, Stream
from daemon.pacing import PaceAction, pace, wanted_threads
from daemon.protocol import Code, DoneEvent, EdgeError, ErrorEvent, TokenEvent
from daemon.scheduler import Job, Plan

if TYPE_CHECKING:
    from daemon.worker import InferenceWorker

log = structlog.get_logger(__name__)

# How often a paused batch re-checks cancel/deadline/decision.
PAUSE_TICK_S = 0.05
_STOPPED_MESSAGES = {
    Code.DEADLINE_EXCEEDED: "deadline passed during generation",
    Code.THROTTLED: "stopped by the thermal governor",
    Code.MEMORY_LOW: "stopped by the governor: memory critically low",
    Code.SHUTTING_DOWN: "the daemon is shutting down",
    Code.INTERNAL_ERROR: "internal error during generation",
}


class BatchLoop:
    def __init__(self, worker: InferenceWorker) -> None:
        self.worker = worker
        self.streams: dict[Job, Stream] = {}  # running and suspended
        self.prepared: dict[Job, Prepared] = {}  # tokenized, waiting to start
        self._free_seqs: list[int] = []
        self._n_seqs = 0
        self.paused_since: float | None = None
        self.last_step_s: float | None = None
        self.width = BatchWidth(adaptive=worker.cfg.engine.adaptive_batch)
        self._steps = 0
        self._last_stepped: dict[Job, int] = {}  # step count when each stream last decoded
        self._narrow: int | None = None  # the width while fewer than all decode, for the log
        self.last_width = 0  # streams decoded by the latest step, for status

    @property
    def active(self) -> list[Job]:
        """Jobs whose stream is on a sequence (running, not suspended)."""
        return [job for job, s in self.streams.items() if s.seq is not None]

    def use_engine(self, engine: Engine) -> None:
        """A new engine replaces the old (a reload, perhaps with other engine settings): what was
        prepared and what the steps were timed at no longer hold."""
        self.forget_prepared()
        self.width = BatchWidth(adaptive=engine.engine_cfg.adaptive_batch)

    def forget_prepared(self) -> None:
        """The model changes: tokens of waiting jobs must be made again."""
        with self.worker.lock:
            for job in self.prepared:
                job.kv_need = None
            self.prepared.clear()

    # --- the plan --------------------------------------------------------------------------

    def apply(self, plan: Plan, engine: Engine) -> None:
        self._size_seqs(engine)
        for job in plan.suspend:
            stream = self.streams[job]
            seq = stream.seq
            try:
                engine.suspend(stream)
            except LlamaError as exc:
                log.error("generation.suspend_failed", id=job.id, error=str(exc))
                self.end(job, Code.INTERNAL_ERROR, engine)
                continue
            assert seq is not None
            self._free_seqs.append(seq)
            log.info("generation.suspended", id=job.id, priority=job.request.priority, tokens=stream.completion)
        running = [self.streams[j] for j in self.active]
        for job in plan.start:
            seq = self._free_seqs.pop()
            suspended = self.streams.get(job)
            try:
                if suspended is not None:
                    engine.resume(suspended, seq)
                    log.info("generation.resumed", id=job.id, suspensions=job.suspensions)
                else:
                    prepared = self.prepared.pop(job)
                    opened = engine.open(job.request, prepared, seq, running, time.monotonic())
                    self.streams[job] = opened
                    running.append(opened)
            except (EdgeError, LlamaError) as exc:
                self._free_seqs.append(seq)
                error = exc if isinstance(exc, EdgeError) else EdgeError(Code.INTERNAL_ERROR, str(exc))
                self._fail_start(job, error)
        self.worker.beat(busy=bool(self.active))

    def _size_seqs(self, engine: Engine) -> None:
        if self._n_seqs != engine.n_seq and not self.streams:
            self._n_seqs = engine.n_seq
            self._free_seqs = list(range(engine.n_seq - 1, -1, -1))

    def _fail_start(self, job: Job, exc: EdgeError) -> None:
        self.streams.pop(job, None)
        with self.worker.lock:
            self.worker.scheduler.finish(job, self.worker.clock())
        job.sink.emit(self.worker.refused_event(job, exc))

    # --- one step --------------------------------------------------------------------------

    def run_step(self, engine: Engine) -> None:
        worker = self.worker
        now = worker.clock()
        self.end_suspended_if_due(engine)
        for job in self.active:
            reason = self._reason_to_stop(job, now)
            if reason is not None:
                self.end(job, reason, engine)
        active = self.active
        if not active:
            return
        decision = worker.decision
        step = pace(decision, self.last_step_s, self.paused_since, now, worker.cfg.governor.max_pause_s)
        if step.action is PaceAction.STOP:
            if self.paused_since is not None:
                for job in active:
                    log.warning("generation.pause_too_long", id=job.id, paused_s=round(now - self.paused_since, 1))
            for job in active:
                self.end(job, step.reason or Code.THROTTLED, engine)
            self.paused_since = None
            return
        if step.action is PaceAction.PAUSE:
            if self.paused_since is None:
                self.paused_since = now
                for job in active:  # one event per stream, as the docs show them
                    log.info("generation.paused", id=job.id, governor_state=decision.state if decision else None)
            worker.beat(busy=True)
            self._rest(PAUSE_TICK_S, active)
            return
        if self.paused_since is not None:
            for job in active:
                log.info("generation.resumed", id=job.id, paused_s=round(now - self.paused_since, 1))
            self.paused_since = None
        if step.action is PaceAction.REST:
            self._rest(step.seconds, active)
            self.last_step_s = None  # rested for that step: the next one goes
            return
        threads = engine.n_threads
        engine.set_threads(wanted_threads(decision, engine.n_threads))
        if engine.n_threads != threads:
            self.width.forget()
        active, timed = self._this_step(active)
        streams = [self.streams[j] for j in active]
        worker.beat(busy=True)
        started = time.monotonic()
        try:
            engine.step(streams, should_abort=lambda: self._must_abort(active))
        except Aborted:
            # llama.cpp rolled the batch back; the next turn ends whoever asked for it.
            log.debug("generation.step_aborted", ids=[j.id for j in active])
            return
        except KvFull:
            self._relieve_kv(active, engine)
            return
        except Exception:
            log.exception("generation.step_failed", ids=[j.id for j in active])
            for job in active:
                self.end(job, Code.INTERNAL_ERROR, engine)
            return
        self.last_step_s = time.monotonic() - started
        if timed:
            self.width.record(len(active), self.last_step_s)
        worker.beat(busy=True)
        for job, stream in zip(active, streams):
            if stream.out:
                if job.request.stream:
                    for text in stream.out:
                        job.sink.emit(TokenEvent(job.id, text))
                stream.out.clear()
            if stream.finish is not None:
                self.end(job, stream.finish, engine)

    def _this_step(self, active: list[Job]) -> tuple[list[Job], bool]:
        """The jobs that decode in this step, and whether it is a decode-only step to time.

        A step with prompt tokens decodes every stream (the prompt dominates its cost); otherwise
        `BatchWidth` says how many, and those that waited longest go first."""
        self._steps += 1
        if any(self.streams[j].in_prompt for j in active):
            chosen, timed = active, False
        else:
            width = self.width.width(len(active))
            chosen = sorted(active, key=lambda j: (self._last_stepped.get(j, 0), j.rank))[:width]
            timed = True
            narrow = width if width < len(active) else None
            if narrow != self._narrow:
                log.debug("generation.batch_width", width=width, decoding=len(active),
                          tokens_per_second=self.width.tokens_per_second())
            self._narrow = narrow
        for job in chosen:
            self._last_stepped[job] = self._steps
        self.last_width = len(chosen)
        return chosen, timed

    def batch_status(self, *, running: bool) -> dict[str, Any]:
        """For status, read from other threads (so it touches no dict the loop changes): the width
        of the latest step (0 when no stream runs) and the measured rate of each width."""
        return {
            "adaptive": self.width.adaptive,
            "width": self.last_width if running else 0,
            "tokens_per_second": {str(w): rate for w, rate in self.width.tokens_per_second().items()},
        }

    def _rest(self, seconds: float, active: list[Job]) -> None:
        worker = self.worker
        with worker.lock:
            worker.lock.wait_for(lambda: worker.stopping or any(j.cancelled for j in active), timeout=seconds)

    def _must_abort(self, active: list[Job]) -> bool:
        now = self.worker.clock()
        return self.worker.stopping or any(self._reason_to_stop(j, now) is not None for j in active)

    def _reason_to_stop(self, job: Job, now: float) -> str | None:
        if job.cancelled:
            return Code.CANCELLED
        if self.worker.stopping:
            return Code.SHUTTING_DOWN
        if job.deadline_at is not None and now >= job.deadline_at:
            return Code.DEADLINE_EXCEEDED
        return None

    def end_suspended_if_due(self, engine: Engine) -> None:
        """A suspended stream can be cancelled, run out of time or meet a shutdown while it waits."""
        now = self.worker.clock()
        for job in [j for j, s in self.streams.items() if s.seq is None]:
            reason = self._reason_to_stop(job, now)
            if reason is not None:
                self.end(job, reason, engine)

    def _relieve_kv(self, active: list[Job], engine: Engine) -> None:
        """The KV cache ran out (shared prefixes made the budget optimistic): suspend the least
        important stream and go on; a lone stream that cannot fit ends with an error."""
        if len(active) == 1:
            log.error("generation.kv_full", id=active[0].id)
            self.end(active[0], Code.INTERNAL_ERROR, engine)
            return
        victim = max(active, key=lambda j: (j.rank, j.started_at or 0.0))
        with self.worker.lock:
            self.worker.scheduler.suspend(victim)
        self.apply(Plan(suspend=(victim,)), engine)

    # --- the end of a stream ---------------------------------------------------------------

    def end(self, job: Job, reason: str, engine: Engine) -> None:
        worker = self.worker
        stream = self.streams.pop(job)
        self._last_stepped.pop(job, None)
        seq = stream.seq
        if reason in ("stop", "length"):
            tail = stream.text.finish()
            if tail:
                if job.request.stream:
                    job.sink.emit(TokenEvent(job.id, tail))
                if stream.first_token_at is None:
                    stream.first_token_at = time.monotonic()
            text = stream.text.text
        else:
            text = stream.text.released()
        engine.close(stream)
        if seq is not None:
            self._free_seqs.append(seq)
        final = self._final_event(job, stream, reason, text)
        with worker.lock:
            worker.scheduler.finish(job, worker.clock())
            if isinstance(final, DoneEvent):
                if reason == "cancelled":
                    worker.counts.cancelled += 1
                else:
                    worker.counts.done += 1
            else:
                worker.counts.error += 1
            tps = stream.tokens_per_second
            if tps is not None and stream.completion >= 4:
                worker.last_tps = round(tps, 2)
        worker.beat(busy=bool(self.active))
        job.sink.emit(final)
        worker.notify_listeners()

    def _final_event(self, job: Job, stream: Stream, reason: str, text: str) -> DoneEvent | ErrorEvent:
        ended = time.monotonic()
        started = job.started_at if job.started_at is not None else job.received_at
        prompt_done = stream.prompt_done_at or ended
        tps = stream.tokens_per_second
        timings: dict[str, float | int | None] = {
            "queued_ms": round((started - job.received_at) * 1000, 1),
            "prompt_ms": round((prompt_done - stream.started_at) * 1000, 1),
            # From receipt: queueing, templating, tokenizing and the prompt all count.
            "ttft_ms": None if stream.first_token_at is None
            else round((stream.first_token_at - job.received_at) * 1000, 1),
            "generation_ms": round((ended - prompt_done) * 1000, 1),
            "tokens_per_second": None if tps is None else round(tps, 2),
            "cached_tokens": stream.cached,
        }
        usage = {"prompt_tokens": len(stream.tokens), "completion_tokens": stream.completion}
        if reason in ("stop", "length", Code.CANCELLED):
            self.log_summary(job, reason, usage, timings, text)
            if job.request.grammar is None:
                return DoneEvent(job.id, text, reason, usage, timings)
            # A constrained answer carries its parsed JSON too (null when it was cut off).
            parsed = parse_answer(text, reason)
            return DoneEvent(job.id, text, reason, usage, timings, constrained=True, json_value=parsed)
        retry = self.worker.retry_after_ms() if reason in (Code.THROTTLED, Code.MEMORY_LOW) else None
        self.log_summary(job, reason, usage, timings, text)
        return ErrorEvent(job.id, reason, _STOPPED_MESSAGES.get(reason, reason), retry)

    def log_summary(
        self,
        job: Job,
        finish: str,
        usage: dict[str, int] | None,
        timings: dict[str, Any] | None,
        answer: str | None = None,
        reason: str | None = None,
    ) -> None:
        """The one summary event every request gets, however it ended."""
        fields: dict[str, Any] = {
            "id": job.id,
            "transport": job.origin.transport,
            "peer": job.origin.peer,
            "priority": job.request.priority,
            "finish_reason": finish,
        }
        if reason:
            fields["reason"] = reason
        fields.update(usage if usage else {"prompt_tokens": None, "completion_tokens": 0})
        if timings:
            fields.update(
                ttft_ms=timings["ttft_ms"], tokens_per_second=timings["tokens_per_second"],
                queued_ms=timings["queued_ms"], cached_tokens=timings["cached_tokens"],
            )
        if job.suspensions:
            fields["suspensions"] = job.suspensions
        if self.worker.cfg.logging.log_prompts:
            fields["prompt"] = job.request.prompt
            fields["messages"] = (
                None if job.request.messages is None else [m.__dict__ for m in job.request.messages]
            )
            fields["answer"] = answer
        log.info("request.finished", **fields)
