"""The contenders' processes of one run: started on first use, kept while a later group needs them,
and on retirement measured idle (CPU, RSS) and stopped."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.bench.contenders import kv_bytes_estimate
from daemon.bench.doors import Ask, Door, LlamaServerDoor, MqttDoor, SocketDoor
from daemon.bench.options import Options
from daemon.bench.processes import BenchError, Broker, EdgeDaemon, LlamaServer
from daemon.bench.procfs import cpu_seconds, memory_bytes
from daemon.bench.results import Results
from daemon.config import KV_TYPES

MB = 1e6
DAEMON, SERVER, KV = "daemon", "server", "kv"
Need = tuple[str, int]  # (DAEMON, engine.parallel), (SERVER, -np) or (KV, index in daemon.config.KV_TYPES)


@dataclass(frozen=True)
class RunPlace:
    """Where this run keeps things, and what its processes share."""

    model: Path
    dir: Path  # configs, state, logs
    sockets: Path  # a short folder for Unix sockets (108-byte path limit)
    nonce: str  # makes this run's topics and prompts its own
    broker: Broker | None


class Pool:
    def __init__(self, o: Options, place: RunPlace, results: Results, metadata: dict[str, str],
                 log: Callable[[str], None]) -> None:
        self.o = o
        self.place = place
        self.results = results
        self.metadata = metadata
        self.log = log
        self._daemons: dict[int, EdgeDaemon] = {}
        self._mqtt_doors: dict[int, MqttDoor] = {}
        self._servers: dict[int, LlamaServer] = {}
        self._kv_daemons: dict[str, EdgeDaemon] = {}  # like the main daemon, another engine.kv_type

    # --- edgellm ------------------------------------------------------------------------------

    def daemon_config(self, name: str, parallel: int, state_dir: Path | None = None,
                      kv_type: str = "f16") -> dict[str, Any]:
        o, p = self.o, self.place
        mqtt: dict[str, Any] = {"enabled": False}
        if p.broker is not None:
            mqtt = {"enabled": True, "host": p.broker.host, "port": p.broker.port,
                    "node_id": f"bench-{p.nonce}-{name}", "prefix": self.mqtt_prefix(name),
                    "homeassistant": {"enabled": False}}
        return {
            "state_dir": str(state_dir or p.dir / f"daemon-{name}" / "state"),
            "model": {"path": str(p.model), "n_ctx": o.n_ctx},
            "engine": {"n_threads": o.threads, "n_batch": o.n_batch, "parallel": parallel, "kv_type": kv_type},
            "socket": {"path": str(p.sockets / f"{name}.sock")},
            "queue": {"max_depth": max(16, 2 * max(o.concurrency, default=1))},
            "logging": {"level": "warning", "format": "json"},
            # The governor would pace on a hot box and turn the benchmark into a thermal test.
            "governor": {"enabled": False},
            "mqtt": mqtt,
        }

    def mqtt_prefix(self, name: str) -> str:
        return f"bench/{self.place.nonce}/{name}"

    def daemon(self, parallel: int) -> EdgeDaemon:
        found = self._daemons.get(parallel)
        if found is None:
            self.log(f"starting edgellm serve, engine.parallel = {parallel}")
            found = self._start(self._daemons, parallel, f"p{parallel}", parallel)
        return found

    def kv_daemon(self, kv_type: str) -> EdgeDaemon:
        """A fresh daemon like the main one (engine.parallel of the run) with this engine.kv_type: each
        of them serves the KV group's requests alone, so their RSS compare like for like."""
        found = self._kv_daemons.get(kv_type)
        if found is None:
            self.log(f"starting edgellm serve, engine.kv_type = {kv_type}")
            found = self._start(self._kv_daemons, kv_type, f"kv-{kv_type}", self.o.parallel, kv_type)
        return found

    def _start(self, into: dict[Any, EdgeDaemon], key: Any, name: str, parallel: int,
               kv_type: str = "f16") -> EdgeDaemon:
        """A daemon of this run, kept in `into` under `key`, started and warmed up."""
        daemon = EdgeDaemon(self.place.dir / f"daemon-{name}", self.daemon_config(name, parallel, kv_type=kv_type))
        into[key] = daemon  # before the start: stop_all stops it even if the start fails
        daemon.start()
        self.warm_up(SocketDoor(daemon.socket_path))
        return daemon

    def socket_door(self, parallel: int) -> SocketDoor:
        return SocketDoor(self.daemon(parallel).socket_path)

    def mqtt_door(self, parallel: int) -> MqttDoor:
        door = self._mqtt_doors.get(parallel)
        if door is None:
            broker = self.place.broker
            if broker is None:
                raise BenchError("MQTT is off in this run (--no-mqtt)")
            self.daemon(parallel)
            door = MqttDoor(broker.host, broker.port, self.mqtt_prefix(f"p{parallel}"))
            self._mqtt_doors[parallel] = door
            door.wait_online(120)
            self.warm_up(door)
        return door

    # --- llama.cpp's server -------------------------------------------------------------------

    def server_door(self, parallel: int) -> LlamaServerDoor:
        found = self._servers.get(parallel)
        if found is None:
            o = self.o
            if o.llama_server is None:
                raise BenchError("no --llama-server given")
            self.log(f"starting llama-server -np {parallel}")
            # Each slot gets the daemon's whole context (-c is split between the slots), and a
            # full-size SWA cache like the daemon's, so its prompt cache can reuse long prefixes.
            args = ["-m", str(self.place.model), "-t", str(o.threads), "-tb", str(o.threads),
                    "-c", str(o.n_ctx * parallel), "-np", str(parallel), "-b", str(o.n_batch), "-ub", str(o.n_batch),
                    "--swa-full", "--seed", str(o.seed)]
            found = LlamaServer(o.llama_server, self.place.dir / f"llama-server-np{parallel}", args)
            self._servers[parallel] = found
            found.start()
            self.warm_up(LlamaServerDoor(found.host, found.port))
        return LlamaServerDoor(found.host, found.port)

    def warm_up(self, door: Door) -> None:
        """One small request before any measured one (pages, caches, an MQTT subscription still
        settling: retried for a while)."""
        deadline = time.monotonic() + 120
        while True:
            try:
                door.run(Ask(f"Warm-up {uuid.uuid4().hex[:8]}: once upon a time", 4, self.o.seed), timeout=60)
                return
            except BenchError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    # --- idle, memory, teardown ---------------------------------------------------------------

    def retire(self, needs: list[Need]) -> None:
        """Idle CPU and RSS of the processes no later group needs, over one shared window; then stop them."""
        daemons = {p: self._daemons[p] for kind, p in needs if kind == DAEMON and p in self._daemons}
        servers = {p: self._servers[p] for kind, p in needs if kind == SERVER and p in self._servers}
        pids = {(DAEMON, p): d.pid for p, d in daemons.items()} | {(SERVER, p): s.pid for p, s in servers.items()}
        for kind, index in needs:
            if kind == KV and (daemon := self._kv_daemons.pop(KV_TYPES[index], None)) is not None:
                daemon.stop()
        if not pids:
            return
        self.log(f"idle CPU and RSS over {self.o.idle_s:g} s: " + ", ".join(f"{k} {p}" for k, p in pids))
        time.sleep(1.0)  # let the last answer's bookkeeping settle
        before = {key: cpu_seconds(pid) for key, pid in pids.items()}
        started = time.monotonic()
        time.sleep(self.o.idle_s)
        elapsed = time.monotonic() - started
        for (kind, p), pid in pids.items():
            cpu = (cpu_seconds(pid) - before[(kind, p)]) / elapsed * 100.0
            memory = memory_bytes(pid)
            rss = memory["VmRSS"] / MB
            if kind == DAEMON:
                who = f"edgellm (parallel {p})"
                self.results.add(f"idle.cpu.p{p}", cpu, f"idle CPU, {who}", "% of a core", who,
                                 note=f"/proc/<pid>/stat over {self.o.idle_s:g} s")
                self.results.add(f"idle.rss.p{p}", rss, f"RSS idle, {who}", "MB", who, note="VmRSS")
                # Where the RSS is: mapped files (the model, libraries) and anonymous memory.
                self.results.add(f"idle.rss_file.p{p}", memory.get("RssFile", 0) / MB,
                                 f"RSS idle, mapped files (model, libraries), {who}", "MB", who, note="RssFile")
                self.results.add(f"idle.rss_anon.p{p}", memory.get("RssAnon", 0) / MB,
                                 f"RSS idle, anonymous (heap, llama.cpp buffers, KV), {who}", "MB", who,
                                 note="RssAnon")
                self.results.add(f"memory.bound.p{p}", self._memory_bound(daemons[p]),
                                 f"model file + KV cache + 80 MB, {who}", "MB", who)
            else:
                who = f"llama-server -np {p}"
                self.results.add(f"llama_server.idle.cpu.np{p}", cpu, f"idle CPU, {who}", "% of a core", who)
                self.results.add(f"llama_server.idle.rss.np{p}", rss, f"RSS idle, {who}", "MB", who)
        for p, daemon in daemons.items():
            door = self._mqtt_doors.pop(p, None)
            if door is not None:
                door.close()
            daemon.stop()
            del self._daemons[p]
        for p, server in servers.items():
            server.stop()
            del self._servers[p]

    def _memory_bound(self, daemon: EdgeDaemon) -> float:
        """Model file + KV cache + 80 MB (issue 8): the KV bytes the daemon reports in status, else an
        estimate from the GGUF (n_ctx cells in every layer)."""
        kv: Any = None
        with contextlib.suppress(BenchError, OSError, ValueError):
            engine = daemon.status().get("engine")
            if isinstance(engine, dict):
                # `kv_bytes` (or a key like it: the name is the engine's to choose).
                kv = next((v for k, v in engine.items() if "kv" in k and "bytes" in k
                           and isinstance(v, (int, float)) and v > 0), None)
        if isinstance(kv, (int, float)):
            self.results.meta["kv_bytes_source"] = "status engine.kv_bytes"
        else:
            kv = kv_bytes_estimate(self.metadata, self.o.n_ctx, "f16") or 0
            self.results.meta["kv_bytes_source"] = "estimate from the GGUF (n_ctx x layers x KV heads x f16)"
        self.results.meta["kv_bytes"] = int(kv)
        return (self.place.model.stat().st_size + float(kv)) / MB + 80.0

    def stop_all(self) -> None:
        for door in self._mqtt_doors.values():
            with contextlib.suppress(Exception):
                door.close()
        for daemon in [*self._daemons.values(), *self._kv_daemons.values()]:
            daemon.stop()
        for server in self._servers.values():
            server.stop()
        self._mqtt_doors.clear()
        self._daemons.clear()
        self._kv_daemons.clear()
        self._servers.clear()
