"""The contenders' measurements: what one round of each figure does, and the native tools' output.

The functions here take a door (doors.py) or a native binary and add samples to `Results`; the
runner decides which contender runs when, so that the rounds interleave.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.bench.doors import Ask, Door, Trace
from daemon.bench.processes import BenchError, run_tool
from daemon.bench.results import Results
from daemon.bench.stats import rate


def record_decode(results: Results, key: str, contender: str, trace: Trace) -> None:
    """The decode request's figures (a short prompt, as llama-bench's tg decodes from an empty
    context): the contender's own decode rate and the client-side one (cross-check)."""
    results.add(f"{key}.decode", trace.reported_decode_tps, f"decode tok/s, {contender}", "tok/s", contender,
                note=f"after a {trace.prompt_tokens}-token prompt" if trace.prompt_tokens else "")
    results.add(f"{key}.decode_client", trace.client_decode_tps, f"decode tok/s as received, {contender}",
                "tok/s", contender, note="token events after the first / time from the first to the last")


def record_prompt(results: Results, key: str, contender: str, trace: Trace) -> None:
    """The prompt request's figures: its prompt rate (the contender's own), the client-side TTFT and
    the decode rate after that prompt (each token attends over the prompt's cells too)."""
    results.add(f"{key}.prompt", trace.reported_prompt_tps, f"prompt tok/s, {contender}", "tok/s", contender)
    results.add(f"{key}.ttft", trace.ttft_ms, f"TTFT, {contender}", "ms", contender,
                note="client-side, send to first token")
    results.add(f"{key}.decode_deep", trace.reported_decode_tps, f"decode tok/s after the prompt, {contender}",
                "tok/s", contender)


def run_concurrently(door: Door, asks: Sequence[Ask], timeout: float = 900.0) -> list[Trace]:
    """One client thread per request, released together; every trace, or the first error."""
    barrier = threading.Barrier(len(asks))
    traces: list[Trace | None] = [None] * len(asks)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            barrier.wait(60)
            traces[i] = door.run(asks[i], timeout)
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), name=f"bench-client-{i}") for i in range(len(asks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"{door.name}: {errors[0]}") from errors[0]
    return [t for t in traces if t is not None]


def aggregate_tps(traces: Sequence[Trace]) -> float | None:
    """Every generated token of every stream over the wall time from the first send to the last
    final event (prompt evaluation included)."""
    if not traces:
        return None
    return rate(sum(t.completion_tokens for t in traces), max(t.done for t in traces) - min(t.sent for t in traces))


# --- native llama.cpp tools -----------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaBenchResult:
    pp: list[float]  # prompt tok/s, one per repetition
    tg: list[float]  # decode tok/s from an empty context, one per repetition
    # decode tok/s after `depth` tokens already in the context (`-d`): what a server decodes after
    # the prompt it has just evaluated
    tg_deep: list[float] = field(default_factory=list)


def parse_llama_bench(output: str) -> LlamaBenchResult:
    """`llama-bench -o json` output: a JSON array of tests, `n_prompt` xor `n_gen` set, with
    `n_depth` (tokens in the context before the test), `samples_ts` (one rate per repetition) and
    `avg_ts`."""
    start, end = output.find("["), output.rfind("]")
    if start < 0 or end < start:
        raise BenchError(f"llama-bench printed no JSON array: {output[-300:]!r}")
    try:
        tests = json.loads(output[start : end + 1])
    except ValueError as exc:
        raise BenchError(f"llama-bench printed unreadable JSON: {exc}") from exc
    pp: list[float] = []
    tg: list[float] = []
    tg_deep: list[float] = []
    for test in tests:
        samples = [float(x) for x in test.get("samples_ts") or [test["avg_ts"]]]
        deep = int(test.get("n_depth", 0)) > 0
        if int(test.get("n_prompt", 0)) > 0 and int(test.get("n_gen", 0)) == 0:
            if not deep:
                pp += samples
        elif int(test.get("n_gen", 0)) > 0 and int(test.get("n_prompt", 0)) == 0:
            (tg_deep if deep else tg).extend(samples)
    if not pp or not tg:
        raise BenchError("llama-bench output lacks a pp or a tg test")
    return LlamaBenchResult(pp, tg, tg_deep)


def llama_bench(
    binary: Path, model: Path, threads: int, pp: int, tg: int, n_batch: int, reps: int, depth: int = 0
) -> LlamaBenchResult:
    """pp and tg from an empty context; with `depth`, tg also after that many tokens."""
    argv = [str(binary), "-m", str(model), "-t", str(threads), "-p", str(pp), "-n", str(tg),
            *(["-d", f"0,{depth}"] if depth else []),
            "-b", str(n_batch), "-ub", str(n_batch), "-r", str(reps), "-o", "json"]
    return parse_llama_bench(run_tool(argv, timeout=900))


@dataclass(frozen=True)
class BatchedBenchRow:
    """One B of llama-batched-bench: S_TG (generated tokens per second of decode time, its own
    figure) and the generated tokens over its whole time, prompt evaluation included: what
    edgellm's aggregate measures (answer tokens over the wall time from the first send)."""

    speed_tg: float
    generated_over_total: float


def parse_batched_bench(output: str) -> dict[int, BatchedBenchRow]:
    """`llama-batched-bench --output-format jsonl`: one JSON object per line with `pl` (the batch
    size B), `tg` (tokens per sequence), `speed_tg` (S_TG) and `t` (seconds, prompt included)."""
    rows: dict[int, BatchedBenchRow] = {}
    for line in output.splitlines():
        line = line.strip()
        if not (line.startswith("{") and '"speed_tg"' in line):
            continue
        try:
            row = json.loads(line)
            batch = int(row["pl"])
            rows[batch] = BatchedBenchRow(float(row["speed_tg"]), batch * int(row["tg"]) / float(row["t"]))
        except (ValueError, KeyError, TypeError, ZeroDivisionError):
            continue
    if not rows:
        raise BenchError(f"llama-batched-bench printed no result line: {output[-300:]!r}")
    return rows


def batched_bench(binary: Path, model: Path, threads: int, batch: int, pp: int, tg: int, n_ctx: int,
                  n_batch: int, *, unified: bool = False) -> BatchedBenchRow:
    """B = `batch` sequences of `pp` prompt tokens, then `tg` tokens each; each sequence in a KV
    stream of its own (llama.cpp's default), or with `unified` all in one, as the daemon keeps them."""
    ctx = max(n_ctx, batch * (pp + tg) + 16)
    argv = [str(binary), "-m", str(model), "-t", str(threads), "-tb", str(threads), "-c", str(ctx),
            "-b", str(max(n_batch, pp)), "-ub", str(n_batch), "-npp", str(pp), "-ntg", str(tg), "-npl", str(batch),
            *(["-kvu"] if unified else []), "--output-format", "jsonl"]
    rows = parse_batched_bench(run_tool(argv, timeout=900))
    if batch not in rows:
        raise BenchError(f"llama-batched-bench gave no result for B={batch} (context {ctx})")
    return rows[batch]


# --- in-process llama-cpp-python ------------------------------------------------------------------


def load_bare(model: Path, n_ctx: int, n_batch: int, threads: int, seed: int) -> Any:
    """A `Llama` with the context the daemon builds (same n_ctx, batch, threads, full SWA cache)."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                           n_threads=threads, n_threads_batch=threads, swa_full=True, seed=seed, verbose=False)


def kv_bytes_estimate(metadata: dict[str, str], n_ctx: int, kv_type: str) -> int | None:
    """The KV cache by the daemon's one memory plan, from the GGUF's metadata; None when it lacks
    the model's shape."""
    from daemon.gguf import GgufError, ModelShape
    from daemon.memory_plan import kv_cache_bytes

    try:
        return kv_cache_bytes(ModelShape.from_metadata(dict(metadata)), n_ctx, kv_type)
    except GgufError:
        return None
