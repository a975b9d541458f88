"""The inference worker: the `Backend` every door talks to, and the thread that owns the engine.

Doors call `submit`/`cancel`/`status` from their own threads; those go into the pure `Scheduler`
under one lock. The worker thread loops: apply model changes (reload, keep-alive unload, the
governor's memory unload), tokenize what is waiting, ask the scheduler for a plan (start, resume,
suspend), then let the `BatchLoop` run one step for every running stream. Events leave through
each job's sink, whose `emit()` never blocks.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from daemon import __version__
from daemon.batch_loop import BatchLoop
from daemon.engine import Engine, ModelLoadError
from daemon.pacing import max_tokens_for
from daemon.protocol import Code, EdgeError, ErrorEvent, Origin, QueuedEvent, Request
from daemon.scheduler import Job, Scheduler, make_job

if TYPE_CHECKING:
    from daemon.backend import Sink, StateListener, StatusProvider
    from daemon.config import Config, GenerationConfig
    from daemon.governor import Decision

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
EngineFactory = Callable[[], Engine]

# How long the idle worker sleeps before looking at deadlines, keep-alive and the governor again.
IDLE_TICK_S = 0.5
# Idle this long, saved prefixes already on disk leave RAM (the page cache keeps them warm).
PREFIX_SPILL_IDLE_S = 5.0


class WorkerState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    IDLE = "idle"  # unloaded after engine.keep_alive_s without work; reloads on the next request
    UNAVAILABLE = "unavailable"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True)
class EngineSnapshot:
    parallel: int
    running: tuple[str, ...]
    suspended: tuple[str, ...]
    preemptions: int
    kv_cells: int
    kv_cells_reserved: int
    keep_alive_s: float
    last_cold_start_ms: float | None
    n_threads: int | None
    batch: dict[str, Any]  # the batch loop's: adaptive, width, tokens_per_second
    engine: dict[str, Any]  # the engine's own: kv_type, kv_bytes, prefix_cache

    def to_dict(self) -> dict[str, Any]:
        return {
            "parallel": self.parallel,
            "running": list(self.running),
            "suspended": list(self.suspended),
            "preemptions": self.preemptions,
            "kv_cells": self.kv_cells,
            "kv_cells_reserved": self.kv_cells_reserved,
            "keep_alive_s": self.keep_alive_s,
            "last_cold_start_ms": self.last_cold_start_ms,
            "n_threads": self.n_threads,
            "batch": self.batch,
            **self.engine,
        }


@dataclass(frozen=True)
class StatusSnapshot:
    """What `status` reports, taken under the worker's lock in one go."""

    state: WorkerState
    reason: str
    uptime_s: float
    model: dict[str, Any] | None
    depth: int
    max_depth: int
    counts: dict[str, int]
    last_tokens_per_second: float | None
    governor: dict[str, Any] | None
    engine: EngineSnapshot

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "state": self.state.value,
            "version": __version__,
            "uptime_s": self.uptime_s,
            "model": self.model,
            "queue": {
                "depth": self.depth,
                "max_depth": self.max_depth,
                "running": self.engine.running[0] if self.engine.running else None,
                "suspended": len(self.engine.suspended),
            },
            "requests": self.counts,
            "last_tokens_per_second": self.last_tokens_per_second,
            "governor": self.governor,
            "engine": self.engine.to_dict(),
        }
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class Counts:
    total: int = 0
    done: int = 0
    cancelled: int = 0
    error: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "done": self.done, "cancelled": self.cancelled, "error": self.error}


class InferenceWorker:
    """Lifecycle: `start()` (loads the model on the worker thread), `begin_drain()`, `stop()`."""

    def __init__(self, cfg: Config, engine_factory: EngineFactory, clock: Clock = time.monotonic) -> None:
        self.cfg = cfg
        self._engine_factory = engine_factory
        self._engine: Engine | None = None
        self._clock = clock
        self._started_at = clock()
        self._cv = threading.Condition()
        self._scheduler = Scheduler(
            cfg.queue.max_depth, slots=cfg.engine.parallel, kv_capacity=cfg.model.n_ctx, preempt=cfg.queue.preempt
        )
        self._state = WorkerState.LOADING
        self._state_reason = ""
        self._decision: Decision | None = None
        self._pending_engine: Engine | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._status_sections: dict[str, StatusProvider] = {}
        self._listeners: list[StateListener] = []
        self.counts = Counts()
        self.last_tps: float | None = None
        self._heartbeat = clock()
        self._busy = False
        self._idle_since = clock()
        self._last_cold_start_ms: float | None = None
        self._keep_alive_s: float | None = None  # a client's (Ollama's keep_alive), else the config's
        self._loaded_event = threading.Event()
        self.loop = BatchLoop(self)

    # --- Backend ---------------------------------------------------------------------------

    @property
    def defaults(self) -> GenerationConfig:
        return self.cfg.generation

    def submit(self, request: Request, sink: Sink, origin: Origin) -> None:
        now = self._clock()
        job = make_job(request, sink, origin, now)
        try:
            with self._cv:
                self.counts.total += 1
                position = self._scheduler.submit(job, now, self._refusal(now))
                busy = len(self._scheduler.running) >= self._scheduler.slots or position > 1
                if request.stream and (busy or self._state is not WorkerState.READY):
                    # Under the lock: the worker cannot start (and finish) the job before this goes out.
                    sink.emit(QueuedEvent(request.id, position))
                self._cv.notify_all()
        except EdgeError as exc:
            sink.emit(self.refused_event(job, exc))
            return
        self.notify_listeners()

    def cancel(self, request_id: str) -> bool:
        with self._cv:
            job, was_waiting = self._scheduler.cancel(request_id)
            self._cv.notify_all()
        if job is None:
            return False
        if was_waiting:
            job.sink.emit(self.refused_event(job, EdgeError(Code.CANCELLED, "cancelled before it started")))
            self.notify_listeners()
        return True

    def snapshot(self) -> StatusSnapshot:
        with self._cv:
            scheduler = self._scheduler
            engine = self._engine
            return StatusSnapshot(
                state=self._state,
                reason=self._state_reason,
                uptime_s=round(self._clock() - self._started_at, 1),
                model=None if engine is None or engine.info is None else engine.info.to_dict(),
                depth=scheduler.depth,
                max_depth=scheduler.max_depth,
                counts=self.counts.to_dict(),
                last_tokens_per_second=self.last_tps,
                governor=None if self._decision is None else self._decision.to_dict(),
                engine=EngineSnapshot(
                    parallel=scheduler.slots,
                    running=tuple(job.id for job in scheduler.running),
                    suspended=tuple(job.id for job in scheduler.suspended),
                    preemptions=scheduler.preemptions,
                    kv_cells=scheduler.kv_capacity,
                    kv_cells_reserved=scheduler.kv_reserved,
                    keep_alive_s=self.keep_alive_s,
                    last_cold_start_ms=self._last_cold_start_ms,
                    n_threads=None if engine is None else engine.threads,
                    batch=self.loop.batch_status(running=bool(scheduler.running)),
                    engine={} if engine is None else engine.status(),
                ),
            )

    def status(self) -> dict[str, Any]:
        out = self.snapshot().to_dict()
        with self._cv:
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

    def set_keep_alive(self, seconds: float | None) -> None:
        """How long to stay loaded when idle, as the latest client asked (Ollama's `keep_alive`:
        -1 forever, 0 unload when done); None goes back to `engine.keep_alive_s`."""
        with self._cv:
            self._keep_alive_s = seconds
            self._idle_since = self._clock()
            self._cv.notify_all()

    @property
    def keep_alive_s(self) -> float:
        return self.cfg.engine.keep_alive_s if self._keep_alive_s is None else self._keep_alive_s

    def can_accept(self) -> bool:
        with self._cv:
            return self._refusal(self._clock()) is None and self._scheduler.depth < self._scheduler.max_depth

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
            return self._state.value

    @property
    def decision(self) -> Decision | None:
        return self._decision

    @property
    def stopping(self) -> bool:
        return self._stopping

    def set_decision(self, decision: Decision) -> None:
        """The governor's latest verdict; takes effect at the next step."""
        with self._cv:
            changed = self._decision is None or _decision_key(self._decision) != _decision_key(decision)
            self._decision = decision
            self._cv.notify_all()
        if changed:
            self.notify_listeners()

    def set_max_depth(self, max_depth: int) -> None:
        with self._cv:
            self._scheduler.max_depth = max_depth
            self._scheduler.preempt = self.cfg.queue.preempt

    def swap_engine(self, engine: Engine) -> None:
        """Use an already-loaded engine once the running streams have ended (SIGHUP, new model)."""
        with self._cv:
            self._pending_engine = engine
            self._cv.notify_all()

    def begin_drain(self) -> None:
        """Refuse new work with `shutting_down`; queued and running jobs go on."""
        with self._cv:
            if self._state is not WorkerState.STOPPED:
                self._state = WorkerState.DRAINING
            self._cv.notify_all()
        self.notify_listeners()

    def busy(self) -> bool:
        """Is a generation running? (The governor's controller learns only while it is.)"""
        with self._cv:
            return self._busy

    def idle(self) -> bool:
        with self._cv:
            return self._scheduler.idle()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is left with `shutting_down` and end the thread."""
        with self._cv:
            self._stopping = True
            self._state = WorkerState.DRAINING
            waiting = self._scheduler.take_all_waiting()
            self._cv.notify_all()
        for job in waiting:
            job.sink.emit(self.refused_event(job, EdgeError(Code.SHUTTING_DOWN, "the daemon is shutting down")))
        if self._thread is not None:
            self._thread.join(timeout)
        if self._engine is not None:
            self._engine.flush()  # saved prefixes reach the disk before the process ends
        with self._cv:
            self._state = WorkerState.STOPPED

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

    # --- used by the batch loop (worker thread) --------------------------------------------

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    @property
    def lock(self) -> threading.Condition:
        return self._cv

    @property
    def clock(self) -> Clock:
        return self._clock

    def beat(self, busy: bool) -> None:
        with self._cv:
            self._heartbeat = self._clock()
            self._busy = busy

    def refused_event(self, job: Job, exc: EdgeError) -> ErrorEvent:
        """A job that ends without generating: its final error event, counted and logged."""
        with self._cv:
            self.counts.error += 1
        self.loop.log_summary(job, exc.code, None, None, reason=exc.message)
        return exc.to_event(job.id)

    def retry_after_ms(self) -> int:
        decision = self._decision
        return (decision.retry_after_ms if decision is not None else None) or self._scheduler.retry_after_ms(
            self._clock()
        )

    def notify_listeners(self) -> None:
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

    # --- the worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        self._load_first()
        while True:
            with self._cv:
                if self._stopping and not self.loop.active and not self._scheduler.suspended:
                    return
                now = self._clock()
                self._heartbeat = now
                expired = self._scheduler.expire(now)
            for job in expired:
                expiry = EdgeError(Code.DEADLINE_EXCEEDED, "deadline passed while queued")
                job.sink.emit(self.refused_event(job, expiry))
            if expired:
                self.notify_listeners()
            self._apply_model_changes()
            engine = self._engine
            if engine is None or not engine.loaded or self._state not in (WorkerState.READY, WorkerState.DRAINING):
                self._wait(IDLE_TICK_S)
                continue
            self._prepare_waiting(engine)
            with self._cv:
                # A reloaded model waits for the running streams to end; suspended ones must be
                # able to resume meanwhile, or the swap would wait for them forever.
                can_plan = self._pending_engine is None or bool(self._scheduler.suspended)
                plan = self._scheduler.plan(self._clock()) if can_plan else None
            if plan:
                self.loop.apply(plan, engine)
                self.notify_listeners()  # the queue got shorter: a full fleet member may rejoin
            if not self.loop.active:
                self.loop.end_suspended_if_due(engine)
                with self._cv:
                    if not self._scheduler.idle():
                        self._idle_since = self._clock()
                deadline = self._scheduler.next_deadline()
                now = self._clock()
                self._wait(IDLE_TICK_S if deadline is None else max(0.0, min(IDLE_TICK_S, deadline - now)))
                continue
            self._idle_since = self._clock()
            self.loop.run_step(engine)

    def _wait(self, timeout: float) -> None:
        with self._cv:
            if not self._stopping:
                self._cv.wait(timeout)

    def _prepare_waiting(self, engine: Engine) -> None:
        """Tokenize waiting jobs (on this thread: the model is ours), so the scheduler knows the
        KV cells each one needs and a prompt that cannot fit is refused at once, not after a wait."""
        with self._cv:
            todo = self._scheduler.unprepared()
            waiting = set(self._scheduler.waiting())
            for gone in [j for j in self.loop.prepared if j not in waiting]:  # expired or cancelled
                del self.loop.prepared[gone]
        for job in todo:
            try:
                prepared = engine.prepare(job.request, max_tokens_for(job.request.max_tokens, self._decision))
            except EdgeError as exc:
                with self._cv:
                    if job.cancelled:
                        continue  # cancel() already answered it
                    self._scheduler.drop(job)
                job.sink.emit(self.refused_event(job, exc))
                continue
            except Exception as exc:
                log.exception("request.internal_error", id=job.id)
                with self._cv:
                    self._scheduler.drop(job)
                failure = EdgeError(Code.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
                job.sink.emit(self.refused_event(job, failure))
                continue
            with self._cv:
                self.loop.prepared[job] = prepared
                job.kv_need = prepared.kv_need

    def _load_first(self) -> None:
        try:
            engine = self._engine_factory()
            started = self._clock()
            engine.load()
            self._last_cold_start_ms = round((self._clock() - started) * 1000, 1)
        except ModelLoadError as exc:
            log.error("model.load_failed", error=str(exc))
            self._set_unavailable(str(exc))
        except Exception as exc:  # llama.cpp can fail in ways no one documents
            log.exception("model.load_failed", error=str(exc))
            self._set_unavailable(f"unexpected error loading the model: {exc}")
        else:
            with self._cv:
                self._engine = engine
                self._use_engine_limits(engine)
                if self._state is WorkerState.LOADING:
                    self._state = WorkerState.READY
                self._state_reason = ""
                self._idle_since = self._clock()  # keep_alive_s counts from a loaded model
                self._cv.notify_all()
        finally:
            self._loaded_event.set()
        self.notify_listeners()

    def _use_engine_limits(self, engine: Engine) -> None:
        """Under the lock: the scheduler's slots and KV budget follow the loaded engine."""
        self._scheduler.slots = engine.engine_cfg.parallel
        self._scheduler.kv_capacity = engine.info.n_ctx if engine.info else engine.model_cfg.n_ctx

    def _set_unavailable(self, reason: str) -> None:
        with self._cv:
            if self._state is WorkerState.LOADING:
                self._state = WorkerState.UNAVAILABLE
            self._state_reason = reason
            waiting = self._scheduler.take_all_waiting()
        for job in waiting:
            job.sink.emit(self.refused_event(job, EdgeError(Code.MODEL_UNAVAILABLE, reason)))

    def _apply_model_changes(self) -> None:
        """Between steps, with no stream running: swap in a reloaded model; unload after
        keep_alive_s idle and reload on demand; follow the governor's memory unload/reload.
        Loading and unloading happen outside the lock, so doors are never held up by them."""
        with self._cv:
            if self.loop.active or self._scheduler.suspended:
                return
            engine, pending, decision = self._engine, self._pending_engine, self._decision
            self._pending_engine = None
            waiting = bool(self._scheduler.waiting())
            idle_for = self._clock() - self._idle_since
        if pending is not None:
            with self._cv:
                self._engine = pending
                self._use_engine_limits(pending)
                if self._state in (WorkerState.UNAVAILABLE, WorkerState.LOADING, WorkerState.IDLE):
                    self._state = WorkerState.READY
                self._state_reason = ""
            self.loop.use_engine(pending)
            if engine is not None:
                engine.unload()
            self.notify_listeners()
            return
        if engine is None:
            return
        memory_unload = decision is not None and decision.unload_model
        if engine.loaded and memory_unload:
            self._unload(engine, WorkerState.UNAVAILABLE, "model unloaded: memory critically low")
        elif engine.loaded and self._state is WorkerState.READY and not waiting:
            keep = self.keep_alive_s
            if keep >= 0 and idle_for >= keep:
                self._unload(engine, WorkerState.IDLE, "")
            elif idle_for >= PREFIX_SPILL_IDLE_S:
                engine.spill_prefix_cache()
        elif not engine.loaded and not memory_unload:
            if self._state is WorkerState.UNAVAILABLE and self._state_reason.startswith("model unloaded"):
                self._reload(engine, "memory recovered")
            elif self._state is WorkerState.IDLE and waiting:
                self._reload(engine, "request after keep_alive_s")

    def _unload(self, engine: Engine, state: WorkerState, reason: str) -> None:
        with self._cv:
            if self._state in (WorkerState.READY, WorkerState.IDLE):
                self._state = state
            self._state_reason = reason
            refused = self._scheduler.take_all_waiting() if state is WorkerState.UNAVAILABLE else []
        self.loop.forget_prepared()
        engine.unload()
        log.info("model.idle_unloaded" if state is WorkerState.IDLE else "model.memory_unloaded", reason=reason)
        for job in refused:
            job.sink.emit(self.refused_event(job, EdgeError(Code.MODEL_UNAVAILABLE, reason)))
        self.notify_listeners()

    def _reload(self, engine: Engine, why: str) -> None:
        with self._cv:
            self._state = WorkerState.LOADING
        self.notify_listeners()
        log.info("model.reloading", reason=why)
        started = self._clock()
        try:
            engine.load()
            reloaded = True
        except Exception as exc:
            log.error("model.load_failed", error=str(exc))
            reloaded = False
        with self._cv:
            if reloaded:
                self._last_cold_start_ms = round((self._clock() - started) * 1000, 1)
                self._state, self._state_reason = WorkerState.READY, ""
                self._idle_since = self._clock()
            else:
                self._state, self._state_reason = WorkerState.UNAVAILABLE, "model reload failed"
        if not reloaded:
            self._set_unavailable("model reload failed")
        self.notify_listeners()

    def _refusal(self, now: float) -> EdgeError | None:
        """Under the lock: why no new request may be admitted right now, if any."""
        if self._stopping or self._state is WorkerState.DRAINING:
            return EdgeError(Code.SHUTTING_DOWN, "the daemon is shutting down")
        if self._state is WorkerState.UNAVAILABLE:
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


def _decision_key(decision: Decision) -> tuple[Any, ...]:
    """What listeners (status topic, fleet membership) care about; not every new reading."""
    return (decision.state, decision.memory_state, decision.admit, decision.pause, decision.stop,
            decision.unload_model)
