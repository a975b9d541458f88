"""`edgellm bench`: its arguments and what it prints."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from daemon.bench.options import Options, quick

DESCRIPTION = """\
Benchmark edgellm against its peers in one run, side by side: native llama.cpp (llama-bench,
llama-batched-bench, llama-server -np N, when their paths are given), bare llama-cpp-python in this
process, and edgellm over the Unix socket and over MQTT (its own `edgellm serve` processes with
generated configs and a private Mosquitto). Same model, prompts, threads and seed for all; rounds
interleave the contenders (A B, B A, ...). Prints every figure with its ratio to its peer and the
issue's target. docs/benchmarks.md explains every column and how to build the native tools."""

TOOLS = ("llama-bench", "llama-batched-bench", "llama-server")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmark edgellm against llama.cpp and bare llama-cpp-python",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Options()
    p.add_argument("--model", type=Path, help="GGUF model (default: the bundled Gemma 3 270M)")
    p.add_argument("--threads", type=int, default=d.threads, help=f"threads for every contender (default {d.threads})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"sampling seed for every contender (default {d.seed})")
    p.add_argument("--n-ctx", type=int, default=d.n_ctx, help=f"context tokens (default {d.n_ctx})")
    p.add_argument("--n-batch", type=int, default=d.n_batch, help=f"prompt batch (default {d.n_batch})")
    p.add_argument("--pp", type=int, help=f"prompt tokens, single stream (default {d.pp}, llama-bench -p)")
    p.add_argument("--tg", type=int, help=f"answer tokens, single stream (default {d.tg}, llama-bench -n)")
    p.add_argument("--rounds", type=int, help=f"rounds (default {d.rounds}; --quick: 1)")
    p.add_argument("--reps", type=int, help=f"single-stream requests per contender per round (default {d.reps})")
    p.add_argument("--concurrency", type=_counts, help="client counts, comma-separated (default 1,2,4,8; --quick: 1,2)")
    p.add_argument("--kv-types", type=_kv_types,
                   help="engine.kv_type values compared with f16, comma-separated; '' for none (default q8_0,q4_0)")
    p.add_argument("--agg-tokens", type=int, help=f"answer tokens per client when concurrent (default {d.agg_tokens})")
    p.add_argument("--parallel", type=int,
                   help=f"engine.parallel of the main daemon (default {d.parallel}, the config's; --quick: 2)")
    p.add_argument("--system-tokens", type=int,
                   help=f"system prompt tokens, prefix figures (default {d.system_tokens})")
    p.add_argument("--idle-seconds", type=float, help=f"idle CPU window (default {d.idle_s:g})")
    p.add_argument("--no-mqtt", action="store_true", help="skip MQTT (no Mosquitto needed)")
    p.add_argument("--llama-bench", type=Path, help="path of llama.cpp's llama-bench")
    p.add_argument("--llama-batched-bench", type=Path, help="path of llama.cpp's llama-batched-bench")
    p.add_argument("--llama-server", type=Path, help="path of llama.cpp's llama-server")
    p.add_argument("--native-dir", type=Path, help="a llama.cpp build/bin folder holding all three")
    p.add_argument("--quick", action="store_true", help="a short run (one round, small sizes): structure, not speed")
    p.add_argument("--workdir", type=Path, help="keep generated configs and logs here (default: a temporary folder)")
    p.add_argument("--label", default="", help="a note printed with the results (e.g. the branch)")
    p.add_argument("--json", action="store_true", help="print every figure as JSON instead of the table")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also write a bar chart (needs matplotlib)")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="run nothing: render the table (or --plot) of a run saved with --json")


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def _kv_types(text: str) -> tuple[str, ...]:
    from daemon.config import KV_TYPES

    chosen = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    wrong = [x for x in chosen if x not in KV_TYPES or x == "f16"]
    if wrong:
        raise argparse.ArgumentTypeError(f"kv types to compare with f16: {', '.join(KV_TYPES[1:])} (got {wrong})")
    return chosen


def options_from(args: argparse.Namespace) -> Options:
    o = Options(model=args.model, threads=args.threads, seed=args.seed, n_ctx=args.n_ctx, n_batch=args.n_batch,
                mqtt=not args.no_mqtt, workdir=args.workdir, label=args.label)
    if args.native_dir is not None:
        found = {tool: args.native_dir / tool for tool in TOOLS if (args.native_dir / tool).is_file()}
        o = replace(o, llama_bench=found.get("llama-bench"), llama_batched_bench=found.get("llama-batched-bench"),
                    llama_server=found.get("llama-server"))
    o = replace(o, llama_bench=args.llama_bench or o.llama_bench,
                llama_batched_bench=args.llama_batched_bench or o.llama_batched_bench,
                llama_server=args.llama_server or o.llama_server)
    if args.quick:
        o = quick(o)
    given: dict[str, Any] = {"pp": args.pp, "tg": args.tg, "rounds": args.rounds, "reps": args.reps,
                             "agg_tokens": args.agg_tokens, "system_tokens": args.system_tokens,
                             "idle_s": args.idle_seconds, "parallel": args.parallel}
    if args.concurrency:
        given["concurrency"] = args.concurrency
    if args.kv_types is not None:
        given["kv_types"] = args.kv_types
    return replace(o, **{k: v for k, v in given.items() if v is not None})


def problems(o: Options) -> list[str]:
    """What makes these options unusable, said before minutes of benchmarking."""
    out = []
    for name, value, low in (("--threads", o.threads, 1), ("--pp", o.pp, 1), ("--tg", o.tg, 2),
                             ("--rounds", o.rounds, 1), ("--reps", o.reps, 1), ("--agg-tokens", o.agg_tokens, 1),
                             ("--system-tokens", o.system_tokens, 16), ("--n-batch", o.n_batch, 1)):
        if value < low:
            out.append(f"{name} must be at least {low} (got {value})")
    if not o.concurrency or any(not 1 <= c <= 16 for c in o.concurrency):
        out.append("--concurrency: client counts from 1 to 16 (engine.parallel's range)")
    if not 1 <= o.parallel <= 16:
        out.append("--parallel must be within 1..16")
    if o.idle_s <= 0:
        out.append("--idle-seconds must be positive")
    if o.pp + o.tg > o.n_ctx or o.system_tokens + 64 > o.n_ctx:
        out.append("--n-ctx is too small for --pp + --tg or --system-tokens")
    for name, path in (("--llama-bench", o.llama_bench), ("--llama-batched-bench", o.llama_batched_bench),
                       ("--llama-server", o.llama_server)):
        if path is not None and not path.is_file():
            out.append(f"{name}: no such file: {path} (docs/benchmarks.md tells how to build it)")
    return out


def run(args: argparse.Namespace) -> int:
    from daemon.bench import options, plot, report
    from daemon.bench.processes import BenchError
    from daemon.bench.results import Results
    from daemon.bench.runner import Runner, main_stderr

    o = options_from(args)
    errors = [] if args.report is not None else problems(o)
    if args.plot is not None and not plot.available():
        errors.append(plot.INSTALL_HINT)
    if errors:
        for error in errors:
            sys.stderr.write(f"edgellm bench: {error}\n")
        return 2
    if args.report is not None:
        try:
            results = Results.from_json(json.loads(args.report.read_text()))
            recorded = results.meta.get("options")
            o = options.from_dict(recorded if isinstance(recorded, dict) else {})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            sys.stderr.write(f"edgellm bench: cannot read {args.report}: {exc}\n")
            return 2
    else:
        try:
            results = Runner(o, main_stderr).run()
        except (BenchError, OSError) as exc:
            sys.stderr.write(f"edgellm bench: {exc}\n")
            return 1
    verdicts = report.evaluate(results, report.checks(o))
    if args.json:
        sys.stdout.write(json.dumps(report.to_json(results, verdicts), indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(report.table(results, verdicts) + "\n")
    if args.plot is not None:
        plot.write(args.plot, results, verdicts)
        sys.stderr.write(f"edgellm bench: chart written to {args.plot}\n")
    return 0
