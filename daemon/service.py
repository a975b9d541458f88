"""The composition root: builds everything from the config and owns the lifecycle.

Threads: the asyncio loop (this module, the Unix socket), the inference worker, the sensor loop,
and paho's network thread when MQTT is on. Signals: SIGTERM/SIGINT drain and exit 0, SIGHUP
reloads the config. systemd hears about all of it through sd_notify.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from daemon import __version__, sdnotify
from daemon.config import Config, ConfigError, load_config
from daemon.constraints import ConstraintCompiler
from daemon.engine import Engine
from daemon.engine.process_memory import fix_mmap_threshold
from daemon.logs import configure_logging
from daemon.paths import serve_socket_path, state_dir
from daemon.tasks import TaskRegistry, limits_of
from daemon.transports.network import NetworkDoors
from daemon.transports.unix_socket import UnixSocketServer
from daemon.worker import InferenceWorker

log = structlog.get_logger(__name__)

# glibc's initial value, kept fixed (process_memory.fix_mmap_threshold): MQTT fuzz RSS growth
# 2.9-5.6 MB with it, 4.3-34.9 MB without (docs/reliability.md, finding 5).
MMAP_THRESHOLD_BYTES = 128 * 1024


def _model_settings(cfg: Config) -> tuple[Any, ...]:
    """What, if changed by a reload, needs a new engine."""
    return (cfg.model, cfg.engine)


def _configured_model_name(cfg: Config) -> str | None:
    """The name the engine reports once loaded (GGUF `general.name`, else the file name's stem),
    read from the file's header before loading: Home Assistant's device is announced once with it."""
    try:
        from daemon.gguf import read_header
        from daemon.models import resolve_model_path

        path = resolve_model_path(cfg.model, cfg.state_dir)
        name = read_header(path, tensors=False).metadata.get("general.name")
    except Exception:
        return None  # the transport falls back to the name in the status once the model is loaded
    return name if isinstance(name, str) and name else path.stem


class Daemon:
    def __init__(self, cfg: Config, config_path: Path | None = None) -> None:
        self.cfg = replace(cfg, state_dir=state_dir(cfg.state_dir))
        self.config_path = config_path
        self.worker = InferenceWorker(self.cfg, self._make_engine)
        from daemon.engine.grammar_check import gbnf_refusal

        self.constraints = ConstraintCompiler(limits_of(self.cfg.constraints), gbnf_refusal)
        self.tasks = TaskRegistry.compile(self.cfg.tasks, self.constraints)
        self.worker.add_status_section("constraints", self.constraints.status)
        self.worker.add_status_section("tasks", self._tasks_status)
        self.socket_server: UnixSocketServer | None = None
        self.mqtt: Any = None
        self.doors: NetworkDoors | None = None  # HTTP and Wyoming
        self.sensors: Any = None
        self._stop = asyncio.Event()
        self._force = False  # a second stop signal: skip the drain
        self._reload_task: asyncio.Task[None] | None = None
        self._last_status_line = ""

    # --- building blocks -------------------------------------------------------------------

    def _tasks_status(self) -> dict[str, Any]:
        """The `tasks` status section: the names, and each trigger's counters (the MQTT door runs them)."""
        mqtt = self.mqtt
        return {"names": self.tasks.names(), "triggers": dict(mqtt.task_door.snapshot) if mqtt is not None else {}}

    def _make_engine(self, cfg: Config | None = None) -> Engine:
        cfg = cfg or self.cfg
        from daemon.models import resolve_model_path

        path = resolve_model_path(cfg.model, cfg.state_dir)
        self._check_model_before_load(cfg, path)
        return Engine(cfg.model, cfg.engine, path, cfg.state_dir)

    def _check_model_before_load(self, cfg: Config, path: Path) -> None:
        """A truncated, corrupt or replaced file, or one that cannot fit in memory, is refused here
        with a message that says so, before llama.cpp sees it (at start, on SIGHUP, on a reload)."""
        from daemon.engine import ModelLoadError
        from daemon.gguf import GgufError, check_model_file
        from daemon.memory_plan import fits, plan_for_engine
        from daemon.sensors import read_available_bytes

        try:
            header = check_model_file(path)
        except GgufError as exc:
            raise ModelLoadError(f"model file {path}: {exc}") from exc
        except OSError:
            return  # missing or unreadable: the engine says which, with the config key to fix
        if not cfg.governor.enabled:
            return
        available = read_available_bytes(cfg.governor)
        if available is None:
            return
        try:
            memory = plan_for_engine(header, cfg.model.n_ctx, cfg.engine)
        except GgufError as exc:
            log.warning("model.memory_plan_unknown", path=str(path), error=str(exc))
            return
        ok, why = fits(memory, available, cfg.governor.memory_reserve_mb * 1024 * 1024)
        if not ok:
            raise ModelLoadError(why)

    # --- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        return asyncio.run(self._main())

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        log.info("daemon.starting", version=__version__, config=self.cfg.source, pid=os.getpid())
        sdnotify.status("loading model")
        self.worker.add_state_listener(self._on_state_change)
        # Bind first: a second daemon on the same socket must fail before it loads a model into
        # memory. Requests that arrive meanwhile wait in the queue until the model is loaded.
        try:
            await self._start_transports(loop)
        except Exception as exc:
            log.error("daemon.start_failed", error=str(exc))
            return 1
        self.worker.start()
        self._start_governor()
        await loop.run_in_executor(None, self.worker.wait_loaded)
        if self._stop.is_set():
            await self._shutdown()
            return 0
        state = self.worker.state
        # Everything made while starting (modules, config, the model's tables) lives as long as the
        # daemon: out of the collector's sight, a full collection under a flood of messages scans
        # only what the flood made, instead of pausing every thread for the whole heap.
        gc.collect()
        gc.freeze()
        log.info("daemon.ready", state=state, socket=str(self.socket_server.path if self.socket_server else ""))
        sdnotify.ready()
        self._publish_status_line(self.worker.status())
        watchdog = asyncio.create_task(self._watchdog())
        await self._stop.wait()
        watchdog.cancel()
        await self._shutdown()
        return 0

    async def _start_transports(self, loop: asyncio.AbstractEventLoop) -> None:
        inherited = sdnotify.listen_fds()
        socket_cfg = replace(self.cfg.socket, path=str(serve_socket_path(self.cfg.socket.path)))
        self.socket_server = UnixSocketServer(
            socket_cfg, self.worker, loop, limits=lambda: self.cfg.limits, constraints=self.constraints,
            tasks=self.tasks,
        )
        await self.socket_server.start(inherited[0] if inherited else None)
        if self.cfg.mqtt.enabled:
            self._start_mqtt(self.cfg)
        self.doors = NetworkDoors(self.worker, loop, constraints=self.constraints)
        await self.doors.start(self.cfg)

    def _start_mqtt(self, cfg: Config) -> None:
        from daemon.transports.mqtt import MqttTransport

        self.mqtt = MqttTransport(
            cfg.mqtt, self.worker, state_dir=cfg.state_dir, version=__version__,
            model_name=_configured_model_name(cfg), limits=lambda: self.cfg.limits,
            constraints=self.constraints, tasks=self.tasks,
        )
        self.mqtt.start()

    def _start_governor(self) -> None:
        if not self.cfg.governor.enabled:
            return
        from daemon.sensors import SensorLoop

        self.sensors = SensorLoop(self.cfg.governor, on_decision=self._on_decision, busy=self.worker.busy)
        self.sensors.start()

    def _on_decision(self, decision: Any, readings: Any, transition: Any) -> None:
        self.worker.set_decision(decision)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            log.warning("daemon.second_signal", signal=sig.name, action="stopping now")
            self._force = True
            return
        log.info("daemon.stopping", signal=sig.name, drain_seconds=self.cfg.shutdown.drain_seconds)
        self._stop.set()

    def _on_reload_signal(self) -> None:
        if self._reload_task is not None and not self._reload_task.done():
            log.warning("config.reload_busy")
            return
        self._reload_task = asyncio.get_running_loop().create_task(self.reload())

    async def _shutdown(self) -> None:
        sdnotify.stopping()
        if self.socket_server is not None:
            self.socket_server.stop_listening()
        self.worker.begin_drain()
        deadline = time.monotonic() + self.cfg.shutdown.drain_seconds
        while not self.worker.idle() and time.monotonic() < deadline and not self._force:
            await asyncio.sleep(0.05)
        drained = self.worker.idle()
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop, 5.0)
        if self.mqtt is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.mqtt.stop, True)
        if self.sensors is not None:
            self.sensors.stop()
        if self.socket_server is not None:
            await asyncio.sleep(0.05)  # let the last events reach the event loop
            await self.socket_server.stop()
        if self.doors is not None:
            await self.doors.stop()
        log.info("daemon.stopped", drained=drained)

    # --- reload ----------------------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: re-read the config, apply what can change live, keep the old on any error."""
        sdnotify.reloading()
        try:
            await self._reload()
        finally:
            sdnotify.ready()

    async def _reload(self) -> None:
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config.reload_rejected", errors=exc.errors, kept=self.cfg.source)
            return
        new = replace(new, state_dir=state_dir(new.state_dir))
        old = self.cfg
        configure_logging(new.logging.level, new.logging.format)
        if new.socket != old.socket:
            log.warning("config.reload_needs_restart", keys="socket.*")
            new = replace(new, socket=old.socket)
        if new.state_dir != old.state_dir:
            log.warning("config.reload_needs_restart", keys="state_dir")
            new = replace(new, state_dir=old.state_dir)
        if _model_settings(new) != _model_settings(old):
            try:
                engine = await asyncio.get_running_loop().run_in_executor(None, self._load_engine, new)
            except Exception as exc:
                log.error("config.reload_model_failed", error=str(exc), kept=str(old.model.path or old.model.name))
                new = replace(new, model=old.model, engine=old.engine)
            else:
                self.worker.swap_engine(engine)
        self.cfg = new
        self.worker.cfg = new
        self.worker.set_max_depth(new.queue.max_depth)
        self._reload_tasks(new)
        self._reload_governor(new)
        if self.mqtt is not None and new.mqtt != old.mqtt:
            if new.mqtt.enabled:
                # A reconnect can block for a second or two: keep the event loop serving.
                await asyncio.get_running_loop().run_in_executor(None, self.mqtt.reconfigure, new.mqtt)
            else:
                await asyncio.get_running_loop().run_in_executor(None, self.mqtt.stop, True)
                self.mqtt = None
        elif self.mqtt is None and new.mqtt.enabled:
            self._start_mqtt(new)
        if self.mqtt is not None:  # task topics, triggers and their Home Assistant entities follow the tasks
            await asyncio.get_running_loop().run_in_executor(None, self.mqtt.tasks_changed)
        if self.doors is not None:
            await self.doors.reload(new)
        log.info("config.reloaded", source=new.source)

    def _reload_governor(self, new: Config) -> None:
        """Start, reconfigure or stop the sensor loop as `governor.enabled` now says. Stopped, its
        last decision must not linger: the worker is handed the neutral one (admit, full speed)."""
        if not new.governor.enabled:
            if self.sensors is not None:
                self.sensors.stop()
                self.sensors = None
                from daemon.governor import Decision

                self.worker.set_decision(Decision.NORMAL)
                log.info("governor.stopped", reason="governor.enabled = false")
            return
        if self.sensors is not None:
            self.sensors.reconfigure(new.governor)
        else:
            self._start_governor()

    def _reload_tasks(self, new: Config) -> None:
        """New constraint limits and tasks (load_config already checked they compile)."""
        self.constraints.reconfigure(limits_of(new.constraints))
        old = self.tasks.names()
        try:
            self.tasks.replace(TaskRegistry.compile(new.tasks, self.constraints))
        except Exception as exc:  # validated at load, so only a bug lands here: keep the old tasks
            log.error("tasks.reload_failed", error=str(exc), kept=old)
            return
        if self.tasks.names() != old:
            log.info("tasks.reloaded", tasks=self.tasks.names(), before=old)

    def _load_engine(self, cfg: Config) -> Engine:
        engine = self._make_engine(cfg)
        engine.load()
        return engine

    # --- watchdog and status ---------------------------------------------------------------

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval_s()
        if interval is None:
            return
        stalled_reported = False
        while True:
            alive, why = self.worker.liveness(self.cfg.service.watchdog_stall_s)
            if alive:
                sdnotify.watchdog()
                if stalled_reported:
                    log.info("watchdog.recovered")
                stalled_reported = False
            elif not stalled_reported:
                # No ping: systemd restarts us after WatchdogSec if this does not clear.
                log.error("watchdog.stalled", reason=why)
                stalled_reported = True
            await asyncio.sleep(interval / 2)

    def _on_state_change(self, status: dict[str, Any]) -> None:
        self._publish_status_line(status)

    def _publish_status_line(self, status: dict[str, Any]) -> None:
        line = status_line(status)
        if line != self._last_status_line:
            self._last_status_line = line
            sdnotify.status(line)


def status_line(status: dict[str, Any]) -> str:
    """The one-line human summary for `systemctl status`."""
    model = status.get("model") or {}
    queue = status.get("queue") or {}
    parts = [str(status.get("state")), str(model.get("name", "no model"))]
    parts.append(f"queue {queue.get('depth', 0)}/{queue.get('max_depth', 0)}")
    governor = status.get("governor") or {}
    readings = governor.get("readings") or {}
    temperature = readings.get("temperature_c")
    if temperature is not None:
        parts.append(f"{temperature:.1f}°C {governor.get('state', '')}".strip())
    return " · ".join(parts)


def serve(config_path: Path | None) -> int:
    """`edgellm serve`: load the config, run until a stop signal, return the exit code."""
    # Before any thread (each gets its own malloc arena) and before any large block.
    fix_mmap_threshold(MMAP_THRESHOLD_BYTES)
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        configure_logging()
        for error in exc.errors:
            log.error("config.invalid", error=error)
        return 2
    configure_logging(cfg.logging.level, cfg.logging.format)
    with contextlib.suppress(KeyboardInterrupt):
        return Daemon(cfg, config_path).run()
    return 0
