"""The inference worker: one thread that owns the engine and runs one job at a time.

It is the `Backend` every transport talks to. Submissions arrive on the event-loop or MQTT
threads and go into the pure `Scheduler` under one lock; the worker thread takes the next job,
runs it on the engine, and between every prompt chunk and every token asks its `_JobControl`
whether to go on (cancel, deadline, shutdown, and the governor's latest `Decision`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from daemon import __version__
from daemon.engine import Engine, Generation, ModelLoadError
from daemon.protocol import (
    Code,
    DoneEvent,
    EdgeError,
    ErrorEvent,
    Origin,
    QueuedEvent,
    Request,
    TokenEvent,
)
from daemon.scheduler import Job, Scheduler, make_job

if TYPE_CHECKING:
    from daemon.backend import Sink, StateListener, StatusProvider
    from daemon.config import Config, GenerationConfig
    from daemon.governor import Decision

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
EngineFactory = Callable[[], Engine]

# How long the idle worker sleeps before looking at deadlines and the governor again.
IDLE_TICK_S = 0.5
# How often a paused generation re-checks cancel/deadline/decision.
PAUSE_TICK_S = 0.05


class InferenceWorker:
    """Lifecycle: `start()` (loads the model on the worker thread), `begin_drain()`, `stop()`."""

    def __init__(self, cfg: Config, engine_factory: EngineFactory, clock: Clock = time.monotonic) -> None:
        self.cfg = cfg
        self._engine_factory = engine_factory
        self._engine: Engine | None = None
        self._clock = clock
        self._started_at = clock()
        self._cv = threading.Condition()
        self._scheduler = Scheduler(cfg.queue.max_depth)
        self._state = "loading"
        self._state_reason = ""
        self._decision: Decision | None = None
        self._pending_engine: Engine | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._status_sections: dict[str, StatusProvider] = {}
        self._listeners: list[StateListener] = []
        self._counts = {"total": 0, "done": 0, "cancelled": 0, "error": 0}
        self._last_tps: float | None = None
        self._heartbeat = clock()
        self._busy = False
        self._loaded_event = threading.Event()

    # --- Backend ---------------------------------------------------------------------------

    @property
    def defaults(self) -> GenerationConfig:
        return self.cfg.generation

    def submit(self, request: Request, sink: Sink, origin: Origin) -> None:
        now = self._clock()
        job = make_job(request, sink, origin, now)
        try:
            with self._cv:
                self._counts["total"] += 1
                position = self._scheduler.submit(job, now, self._refusal(now))
                must_wait = self._scheduler.running is not None or position > 1 or self._state != "ready"
                self._cv.notify_all()
        except EdgeError as exc:
            sink.emit(self._refused_event(job, exc))
            return
        if request.stream and must_wait:
            sink.emit(QueuedEvent(request.id, position))
        self._notify_listeners()

    def cancel(self, request_id: str) -> bool:
        with self._cv:
            job, was_waiting = self._scheduler.cancel(request_id)
            self._cv.notify_all()
        if job is None:
            return False
        if was_waiting:
            self._finish_refused(job, EdgeError(Code.CANCELLED, "cancelled before it started"))
            self._notify_listeners()
        return True

    def status(self) -> dict[str, Any]:
        with self._cv:
            running = self._scheduler.running
            out: dict[str, Any] = {
                "state": self._state,
                "version": __version__,
                "uptime_s": round(self._clock() - self._started_at, 1),
                "model": None
                if self._engine is None or self._engine.info is None
                else self._engine.info.to_dict(),
                "queue": {
                    "depth": self._scheduler.depth,
                    "max_depth": self._scheduler.max_depth,
                    "running": None if running is None else running.id,
                },
                "requests": dict(self._counts),
                "last_tokens_per_second": self._last_tps,
                "governor": None if self._decision is None else self._decision.to_dict(),
            }
            if self._state_reason:
                out["reason"] = self._state_reason
            sections = list(self._status_sections.items())
        for name, provider in sections:
            try:
                out[name] = provider()
            except Exception as exc:  # a broken section must not break status
                out[name] = {"error": str(exc)}
        return out

    def add_status_section(self, name: str, provider: StatusProvider) -> None:
        with self._cv:
            self._status_sections[name] = provider

    def remove_status_section(self, name: str) -> None:
        with self._cv:
            self._status_sections.pop(name, None)

    def add_state_listener(self, listener: StateListener) -> None:
        with self._cv:
            self._listeners.append(listener)

    def remove_state_listener(self, listener: StateListener) -> None:
        with self._cv:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def can_accept(self) -> bool:
        with self._cv:
            return (
                self._refusal(self._clock()) is None and self._scheduler.depth < self._scheduler.max_depth
            )

    # --- control from the service ----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """True once the first load attempt has finished (loaded or failed)."""
        return self._loaded_event.wait(timeout)

    @property
    def state(self) -> str:
        with self._cv:
            return self._state

    def set_decision(self, decision: Decision) -> None:
        """The governor's latest verdict; takes effect at the next token."""
        with self._cv:
            changed = self._decision is None or _decision_key(self._decision) != _decision_key(decision)
            self._decision = decision
            self._cv.notify_all()
        if changed:
            self._notify_listeners()

    def set_max_depth(self, max_depth: int) -> None:
        with self._cv:
            self._scheduler.max_depth = max_depth

    def swap_engine(self, engine: Engine) -> None:
        """Use an already-loaded engine from the next job on (SIGHUP with a new model)."""
        with self._cv:
            self._pending_engine = engine
            self._cv.notify_all()

    def begin_drain(self) -> None:
        """Refuse new work with `shutting_down`; queued and running jobs go on."""
        with self._cv:
            if self._state not in ("stopped",):
                self._state = "draining"
            self._cv.notify_all()
        self._notify_listeners()

    def busy(self) -> bool:
        """Is a generation running? (The governor's controller learns only while it is.)"""
        with self._cv:
            return self._busy

    def idle(self) -> bool:
        with self._cv:
            return self._scheduler.running is None and self._scheduler.depth == 0

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is left with `shutting_down` and end the thread."""
        with self._cv:
            self._stopping = True
            self._state = "draining"
            waiting = self._scheduler.take_all_waiting()
            self._cv.notify_all()
        for job in waiting:
            self._finish_refused(job, EdgeError(Code.SHUTTING_DOWN, "the daemon is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            self._state = "stopped"

    def liveness(self, stall_s: float) -> tuple[bool, str]:
        """Is the inference thread making progress? Feeds the systemd watchdog."""
        with self._cv:
            thread_alive = self._thread is not None and self._thread.is_alive()
            busy, heartbeat = self._busy, self._heartbeat
        if not thread_alive and not self._stopping:
            return False, "inference thread is not running"
        stalled = self._clock() - heartbeat
        if busy and stalled > stall_s:
            return False, f"a generation step has not returned for {stalled:.1f} s"
        return True, "ok"

    # --- the worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        self._load()
        while True:
            with self._cv:
                job = self._next_job()
                if job is None:
                    if self._stopping:
                        return
                    continue
            self._notify_listeners()  # the queue got shorter: a full fleet member may rejoin
            final = self._execute(job)
            with self._cv:
                self._scheduler.finish(job, self._clock())
                self._busy = False
            job.sink.emit(final)
            self._notify_listeners()

    def _next_job(self) -> Job | None:
        """Under the lock: expire, apply engine changes, then take a job or wait a tick."""
        now = self._clock()
        self._heartbeat = now
        expired = self._scheduler.expire(now)
        if expired:
            self._cv.release()
            try:
                self._refuse_expired(expired)
            finally:
                self._cv.acquire()
        if self._stopping:
            return None
        self._apply_engine_changes()
        if self._state in ("ready", "draining") and self._engine is not None and self._engine.loaded:
            started = self._scheduler.start_next(now)
            if started is not None:
                self._busy = True
                self._heartbeat = now
                return started
        deadline = self._scheduler.next_deadline()
        timeout = IDLE_TICK_S if deadline is None else max(0.0, min(IDLE_TICK_S, deadline - now))
        self._cv.wait(timeout)
        return None

    def _refuse_expired(self, expired: list[Job]) -> None:
        for job in expired:
            self._finish_refused(job, EdgeError(Code.DEADLINE_EXCEEDED, "deadline passed while queued"))

    def expire_waiting(self, now: float) -> None:
        """Drop queued jobs whose deadline passed; called between tokens too, so a request does
        not wait for the running one to learn that its own deadline is gone."""
        with self._cv:
            deadline = self._scheduler.next_deadline()
            if deadline is None or deadline > now:
                return
            expired = self._scheduler.expire(now)
        self._refuse_expired(expired)

    def _load(self) -> None:
        try:
            engine = self._engine_factory()
            engine.load()
        except ModelLoadError as exc:
            log.error("model.load_failed", error=str(exc))
            self._set_unavailable(str(exc))
        except Exception as exc:  # llama.cpp can fail in ways no one documents
            log.exception("model.load_failed", error=str(exc))
            self._set_unavailable(f"unexpected error loading the model: {exc}")
        else:
            with self._cv:
                self._engine = engine
                if self._state == "loading":
                    self._state = "ready"
                self._state_reason = ""
                self._cv.notify_all()
        finally:
            self._loaded_event.set()
        self._notify_listeners()

    def _set_unavailable(self, reason: str) -> None:
        with self._cv:
            if self._state == "loading":
                self._state = "unavailable"
            self._state_reason = reason
            waiting = self._scheduler.take_all_waiting()
        for job in waiting:
            self._finish_refused(job, EdgeError(Code.MODEL_UNAVAILABLE, reason))

    def _apply_engine_changes(self) -> None:
        """Under the lock, between jobs: swap in a reloaded model, or follow the governor's
        unload/reload of the model when memory is critical."""
        if self._pending_engine is not None:
            old, self._engine = self._engine, self._pending_engine
            self._pending_engine = None
            if old is not None:
                old.unload()
            if self._state in ("unavailable", "loading"):
                self._state = "ready"
            self._state_reason = ""
            return
        decision = self._decision
        if decision is None or self._engine is None:
            return
        if decision.unload_model and self._engine.loaded:
            self._engine.unload()
            if self._state == "ready":
                self._state = "unavailable"
            self._state_reason = "model unloaded: memory critically low"
            waiting = self._scheduler.take_all_waiting()
            self._cv.release()
            try:
                for job in waiting:
                    self._finish_refused(job, EdgeError(Code.MODEL_UNAVAILABLE, self._state_reason))
                self._notify_listeners()
            finally:
                self._cv.acquire()
        elif not decision.unload_model and not self._engine.loaded and self._state == "unavailable":
            self._state = "loading"
            self._cv.release()
            try:
                log.info("model.reloading", reason="memory recovered")
                self._engine.load()
                reloaded = True
            except Exception as exc:
                log.error("model.load_failed", error=str(exc))
                reloaded = False
            finally:
                self._cv.acquire()
            self._state = "ready" if reloaded else "unavailable"
            self._state_reason = "" if reloaded else "model reload failed"

    def _refusal(self, now: float) -> EdgeError | None:
        """Under the lock: why no new request may be admitted right now, if any."""
        if self._stopping or self._state == "draining":
            return EdgeError(Code.SHUTTING_DOWN, "the daemon is shutting down")
        if self._state == "unavailable":
            return EdgeError(Code.MODEL_UNAVAILABLE, self._state_reason or "no model is loaded")
        decision = self._decision
        if decision is not None and not decision.admit:
            code = decision.reject_code or Code.THROTTLED
            return EdgeError(
                code,
                f"not admitting new requests: governor state {decision.state}"
                + (f", memory {decision.memory_state}" if code == Code.MEMORY_LOW else ""),
                retry_after_ms=decision.retry_after_ms or self._scheduler.retry_after_ms(now),
            )
        return None

    def _execute(self, job: Job) -> DoneEvent | ErrorEvent:
        """Run one job to its final event (returned, not emitted: the job must leave the scheduler
        first, so a client that reacts to `done` finds the worker free)."""
        request = job.request
        engine = self._engine
        assert engine is not None
        decision = self._decision
        max_tokens = request.max_tokens
        if decision is not None and decision.max_tokens_cap is not None:
            max_tokens = min(max_tokens, decision.max_tokens_cap)
        sink = job.sink
        try:
            prepared = engine.prepare(request, max_tokens)
            control = _JobControl(self, job)
            on_token: Callable[[str], None] = (
                (lambda text: sink.emit(TokenEvent(request.id, text))) if request.stream else (lambda text: None)
            )
            generation = engine.generate(request, prepared, control, on_token)
        except EdgeError as exc:
            return self._refused_event(job, exc)
        except Exception as exc:
            log.exception("request.internal_error", id=request.id)
            return self._refused_event(job, EdgeError(Code.INTERNAL_ERROR, f"internal error: {type(exc).__name__}"))
        return self._generated_event(job, generation)

    def _generated_event(self, job: Job, gen: Generation) -> DoneEvent | ErrorEvent:
        request = job.request
        started = job.started_at if job.started_at is not None else job.received_at
        queued_ms = (started - job.received_at) * 1000
        tps = gen.tokens_per_second
        timings: dict[str, float | int | None] = {
            "queued_ms": round(queued_ms, 1),
            "prompt_ms": round(gen.prompt_ms, 1),
            # From receipt: queueing, templating, tokenizing and the prompt all count.
            "ttft_ms": None if gen.first_token_at is None else round((gen.first_token_at - job.received_at) * 1000, 1),
            "generation_ms": round(gen.generation_ms, 1),
            "tokens_per_second": None if tps is None else round(tps, 2),
            "cached_tokens": gen.cached_tokens,
        }
        usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens}
        reason = gen.finish_reason
        if reason in ("stop", "length", "cancelled"):
            event: DoneEvent | ErrorEvent = DoneEvent(request.id, gen.text, reason, usage, timings)
        else:
            messages = {
                Code.DEADLINE_EXCEEDED: "deadline passed during generation",
                Code.THROTTLED: "stopped by the thermal governor",
                Code.MEMORY_LOW: "stopped by the governor: memory critically low",
                Code.SHUTTING_DOWN: "the daemon is shutting down",
            }
            retry = None
            if reason in (Code.THROTTLED, Code.MEMORY_LOW):
                decision = self._decision
                retry = (decision.retry_after_ms if decision is not None else None) or self._scheduler.retry_after_ms(
                    self._clock()
                )
            event = ErrorEvent(request.id, reason, messages.get(reason, reason), retry)
        with self._cv:
            if isinstance(event, DoneEvent):
                self._counts["cancelled" if reason == "cancelled" else "done"] += 1
            else:
                self._counts["error"] += 1
            if tps is not None and gen.completion_tokens >= 4:
                self._last_tps = round(tps, 2)
        self._log_summary(job, reason, usage, timings, gen.text)
        return event

    def _refused_event(self, job: Job, exc: EdgeError) -> ErrorEvent:
        """A job that ends without generating: its final error event, counted and logged."""
        with self._cv:
            self._counts["error"] += 1
        self._log_summary(job, exc.code, None, None, reason=exc.message)
        return exc.to_event(job.id)

    def _finish_refused(self, job: Job, exc: EdgeError) -> None:
        job.sink.emit(self._refused_event(job, exc))

    def _log_summary(
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
        if self.cfg.logging.log_prompts:
            fields["prompt"] = job.request.prompt
            fields["messages"] = (
                None if job.request.messages is None else [m.__dict__ for m in job.request.messages]
            )
            fields["answer"] = answer
        log.info("request.finished", **fields)

    def _notify_listeners(self) -> None:
        with self._cv:
            listeners = list(self._listeners)
        if not listeners:
            return
        snapshot = self.status()
        for listener in listeners:
            try:
                listener(snapshot)
            except Exception:
                log.exception("status.listener_failed")


def _decision_key(decision: Decision) -> tuple[Any, ...]:
    """What listeners (status topic, fleet membership) care about; not every new reading."""
    return (decision.state, decision.memory_state, decision.admit, decision.pause, decision.stop,
            decision.unload_model)


class _JobControl:
    """The engine's per-step question "go on?", answered from cancel, deadline, shutdown and the
    governor. Runs on the inference thread; blocks only to pace or pause."""

    def __init__(self, worker: InferenceWorker, job: Job) -> None:
        self.worker = worker
        self.job = job
        self.step_started: float | None = None
        self.paused_since: float | None = None
        self.threads: int | None = None

    def check(self) -> str | None:
        worker = self.worker
        clock = worker._clock
        now = clock()
        decision = worker._decision
        # Duty cycle: after a step that took t, rest t*(1-duty)/duty so compute is `duty` of the time.
        if decision is not None and self.step_started is not None and 0 < decision.duty < 1:
            rest = (now - self.step_started) * (1 - decision.duty) / decision.duty
            if rest > 0:
                with worker._cv:
                    worker._cv.wait_for(lambda: self.job.cancelled or worker._stopping, timeout=rest)
                now = clock()
        while True:
            worker.expire_waiting(now)
            with worker._cv:
                worker._heartbeat = now
                decision = worker._decision
            reason = self._reason_to_stop(now, decision)
            if reason is not None:
                return reason
            if decision is None or not decision.pause:
                break
            if self.paused_since is None:
                self.paused_since = now
                log.info("generation.paused", id=self.job.id, governor_state=decision.state)
            if now - self.paused_since > worker.cfg.governor.max_pause_s:
                log.warning("generation.pause_too_long", id=self.job.id, paused_s=round(now - self.paused_since, 1))
                return Code.THROTTLED
            with worker._cv:
                worker._cv.wait(PAUSE_TICK_S)
            now = clock()
        if self.paused_since is not None:
            log.info("generation.resumed", id=self.job.id, paused_s=round(now - self.paused_since, 1))
            self.paused_since = None
        engine = worker._engine
        if decision is not None and engine is not None:
            wanted = decision.n_threads or (engine.info.n_threads if engine.info else None)
            if wanted is not None and wanted != self.threads:
                if self.threads is not None or decision.n_threads is not None:
                    engine.set_threads(wanted)
                self.threads = wanted
        self.step_started = clock()
        return None

    def _reason_to_stop(self, now: float, decision: Decision | None) -> str | None:
        job = self.job
        if job.cancelled:
            return Code.CANCELLED
        if self.worker._stopping:
            return Code.SHUTTING_DOWN
        if job.deadline_at is not None and now >= job.deadline_at:
            return Code.DEADLINE_EXCEEDED
        if decision is not None and decision.stop:
            return decision.reject_code or Code.THROTTLED
        return None
