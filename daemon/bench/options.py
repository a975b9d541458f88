"""What one benchmark run does: sizes, repetitions, contenders. Full and quick presets."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from daemon.config import EngineConfig


@dataclass(frozen=True)
class Options:
    model: Path | None = None  # None: the bundled Gemma 3 270M
    threads: int = 2
    seed: int = 42
    n_ctx: int = 2048
    n_batch: int = 256
    pp: int = 128  # prompt tokens of the single-stream figures (llama-bench -p)
    tg: int = 128  # answer tokens of the single-stream figures (llama-bench -n)
    rounds: int = 3  # every contender once per round, order alternating (A B, B A, …)
    reps: int = 2  # single-stream requests per contender per round
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    agg_prompt: int = 32  # prompt tokens per client in the concurrency figures
    agg_tokens: int = 64  # answer tokens per client in the concurrency figures
    parallel: int = EngineConfig.parallel  # engine.parallel of the main daemon (the default config's)
    kv_types: tuple[str, ...] = ("q8_0", "q4_0")  # engine.kv_type values compared with f16
    system_tokens: int = 900  # the shared system prompt of the prefix-cache figures
    alt_cycles: int = 1  # measured passes over the 2 and 4 alternating system prompts (after a first one)
    idle_s: float = 10.0  # window for idle CPU
    mqtt: bool = True
    llama_bench: Path | None = None
    llama_batched_bench: Path | None = None
    llama_server: Path | None = None
    workdir: Path | None = None  # keep configs and logs here (default: a temporary folder)
    label: str = ""
    quick: bool = False


def quick(options: Options) -> Options:
    """A short run (one round, small sizes) that still produces every figure: for the test suite."""
    return replace(options, rounds=1, reps=1, pp=32, tg=16, concurrency=(1, 2), parallel=2, agg_prompt=16,
                   agg_tokens=8, system_tokens=96, alt_cycles=1, idle_s=2.0, kv_types=("q8_0",), quick=True)


def from_dict(data: dict[str, Any]) -> Options:
    """The options a run recorded in its JSON (`meta.options`); unknown keys are ignored."""
    known = {f.name: f for f in fields(Options)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            continue
        if key in ("concurrency", "kv_types") and not isinstance(value, list):
            continue  # not what a run writes: the default
        if key == "concurrency":
            value = tuple(int(x) for x in value)
        elif key == "kv_types":
            value = tuple(str(x) for x in value)
        elif key in ("model", "llama_bench", "llama_batched_bench", "llama_server", "workdir") and value is not None:
            value = Path(value)
        values[key] = value
    return Options(**values)
