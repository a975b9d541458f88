"""`edgellm bench`: a real quick run's JSON (structure, never speed), and its pure parts.

The quick run drives real `edgellm serve` processes, a real Mosquitto and the real model; it checks
that every figure is there, is a positive number, and that every ratio is what its figures say. No
assertion here is about how fast anything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.bench import contenders, plot, prompts, report
from daemon.bench.cli import options_from, problems
from daemon.bench.options import Options
from daemon.bench.processes import BenchError, toml_text
from daemon.bench.results import Results
from daemon.bench.stats import percentile, summarize
from daemon.cli import build_parser, main
from tests.helpers import REPO

# What a quick run (--concurrency 1,2, main daemon parallel 2, MQTT on, no native tools) must yield.
QUICK_FIGURES = [
    *(f"{door}.{what}" for door in ("bare", "socket", "mqtt")
      for what in ("decode", "decode_client", "decode_deep", "prompt", "ttft")),
    "socket.aggregate.c1", "socket.aggregate.c2", "mqtt.aggregate.c1", "mqtt.aggregate.c2",
    "single_slot.aggregate.c2",
    *(f"{key}.{mode}.decode" for key in ("free", "schema") for mode in ("greedy", "sampled")),
    "prefix.cold", "prefix.warm", "prefix.alt2", "prefix.alt4", "prefix.restart", "restart.first_cold",
    "mqtt.prefix.cold", "mqtt.prefix.warm", "mqtt.prefix.alt2", "mqtt.prefix.alt4",
    "idle.cpu.p1", "idle.cpu.p2", "idle.rss.p1", "idle.rss.p2", "memory.bound.p1", "memory.bound.p2",
    "idle.rss_file.p1", "idle.rss_anon.p1", "idle.rss_file.p2", "idle.rss_anon.p2",
    *(f"kv.{t}.{what}" for t in ("f16", "q8_0") for what in ("decode", "prompt", "kv_mb", "rss")), "kv.q8_0.agree",
]
# An idle daemon may use no CPU at all; a cold prompt caches none; a quantized cache's greedy answer
# may differ from the first character.
ZERO_ALLOWED_UNITS = {"% of a core", "tokens", "of 1"}


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "bench", "--quick", "--json", "--model", str(gemma_path),
         "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=900, cwd=str(REPO), check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data: dict[str, Any] = json.loads(done.stdout)
    data["_stderr"] = done.stderr
    data["_leftovers"] = _processes_mentioning(str(workdir))
    data["_partial"] = json.loads((workdir / "partial.json").read_text())
    return data


@pytest.mark.slow
def test_quick_run_compares_kv_types_on_daemons_that_really_use_them(quick_run: dict[str, Any]) -> None:
    figures = quick_run["figures"]
    kv = {t: figures[f"kv.{t}.kv_mb"]["value"] for t in ("f16", "q8_0")}
    assert kv["q8_0"] == pytest.approx(kv["f16"] * 34 / 64, rel=0.02), kv
    assert 0.0 <= figures["kv.q8_0.agree"]["value"] <= 1.0
    labels = {c["label"] for c in quick_run["comparisons"] if c["section"] == "KV cache type (engine.kv_type)"}
    assert "decode, kv q8_0 vs f16" in labels and "RSS after the same requests, kv q8_0 vs f16" in labels


def test_rounds_alternate_the_order_of_the_contenders() -> None:
    """A B C, then C B A, then A B C: a slow minute of the machine hits every side of a ratio."""
    from daemon.bench.options import Options
    from daemon.bench.runner import Runner, Step

    runner = Runner(Options(rounds=3), log=lambda _text: None)
    seen: list[tuple[str, int]] = []
    steps: list[Step] = [(name, (lambda r, name=name: seen.append((name, r))), False) for name in "ABC"]
    runner._interleave("group", steps)
    assert seen == [("A", 0), ("B", 0), ("C", 0), ("C", 1), ("B", 1), ("A", 1), ("A", 2), ("B", 2), ("C", 2)]


@pytest.mark.slow
def test_quick_run_has_every_figure_as_a_positive_number(quick_run: dict[str, Any]) -> None:
    figures = quick_run["figures"]
    missing = [key for key in QUICK_FIGURES if key not in figures]
    assert not missing, f"missing figures: {missing}; got {sorted(figures)}"
    for key, fig in figures.items():
        assert fig["samples"], key
        assert fig["n"] == len(fig["samples"]), key
        assert all(isinstance(x, (int, float)) for x in fig["samples"]), key
        low = 0.0 if fig["unit"] in ZERO_ALLOWED_UNITS else None
        if low is None:
            assert all(x > 0 for x in fig["samples"]), (key, fig)
        else:
            assert all(x >= low for x in fig["samples"]), (key, fig)
        assert fig["min"] <= fig["median"] <= fig["max"], key
        assert fig["median"] <= fig["p95"] <= fig["max"], key
        assert fig["value"] == fig["median"] == fig["p50"], key
        assert fig["label"] and fig["unit"] and fig["contender"], key
    # Native tools were not given: none of their figures may appear.
    assert not [k for k in figures if k.startswith(("llama_bench.", "batched_bench.", "llama_server."))]
    # The idle RSS split, read at one instant: its parts add up (shared memory aside), and the
    # mapped model file is most of the file-backed part.
    rss, mapped, anon = (figures[f"idle.{k}.p2"]["value"] for k in ("rss", "rss_file", "rss_anon"))
    assert abs(mapped + anon - rss) < 2.0, (rss, mapped, anon)
    assert mapped > 0.8 * quick_run["meta"]["model"]["size_bytes"] / 1e6, (mapped, quick_run["meta"]["model"])


@pytest.mark.slow
def test_quick_run_ratios_follow_from_the_figures(quick_run: dict[str, Any]) -> None:
    figures = quick_run["figures"]
    comparisons = quick_run["comparisons"]
    assert comparisons
    seen = set()
    for c in comparisons:
        seen.add(c["figure"])
        assert c["value"] == figures[c["figure"]]["value"], c
        if c["peer"] is not None and c["peer"] in figures:
            peer = figures[c["peer"]]["value"]
            assert c["peer_value"] == peer, c
            expected = c["value"] - peer if c["kind"] == "difference" else c["value"] / peer
            assert c["result"] == pytest.approx(expected), c
        elif c["kind"] != "value":
            assert c["peer_value"] is None and c["result"] is None and c["met"] is None, c
        if c["target"] is not None and c["result"] is not None:
            assert isinstance(c["met"], bool), c
            op, bound = c["target"]["op"], c["target"]["bound"]
            assert c["met"] == {">=": c["result"] >= bound, "<=": c["result"] <= bound, "<": c["result"] < bound}[op]
    # The edgellm targets that need no native peer were all evaluated.
    gated = {(c["figure"], c["peer"]) for c in comparisons if c["met"] is not None}
    for pair in [("prefix.warm", "prefix.cold"), ("prefix.alt2", "prefix.cold"), ("prefix.alt4", "prefix.cold"),
                 ("prefix.restart", "restart.first_cold"), ("socket.aggregate.c2", "single_slot.aggregate.c2"),
                 ("idle.cpu.p2", None), ("idle.rss.p2", "memory.bound.p2")]:
        assert pair in gated, pair
    summary = quick_run["summary"]
    assert summary["met"] + summary["not_met"] + summary["no_peer"] == summary["targets"]
    assert summary["no_peer"] > 0  # the native peers' targets, without native tools in this run


@pytest.mark.slow
def test_quick_run_metadata_and_cleanup(quick_run: dict[str, Any], gemma_path: Path) -> None:
    meta = quick_run["meta"]
    assert meta["schema"] == "edgellm-bench/2"
    assert meta["options"]["quick"] is True
    assert meta["options"]["threads"] == 2 and meta["options"]["seed"] == 42
    assert meta["model"]["size_bytes"] == gemma_path.stat().st_size
    assert meta["duration_s"] > 0 and len(meta["host"]["loadavg_start"]) == 3
    assert meta["system_prompt_tokens"] > 0 and meta["kv_bytes"] > 0
    # Interleaved rounds and progress go to stderr, the JSON alone to stdout.
    assert "prefix cache, round 1/1" in quick_run["_stderr"]
    # With --workdir, the figures so far are saved after every group.
    assert set(quick_run["_partial"]["figures"]) <= set(quick_run["figures"])
    assert "socket.aggregate.c2" in quick_run["_partial"]["figures"]
    # Every daemon, broker and client the run started is gone.
    assert quick_run["_leftovers"] == []


# --- pure parts -----------------------------------------------------------------------------------


def test_percentile_and_summary() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([10.0, 20.0], 95) == pytest.approx(19.5)
    assert percentile([7.0], 95) == 7.0
    s = summarize([4.0, 1.0, 3.0, 2.0, 100.0])
    assert (s.n, s.median, s.minimum, s.maximum) == (5, 3.0, 1.0, 100.0)
    assert s.spread_pct == pytest.approx(99 / 3 * 100)
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        percentile([1.0], 101)


LLAMA_BENCH_JSON = """\
[
  {
    "build_commit": "unknown", "model_filename": "gemma-3-270m-q4_k_m.gguf", "n_threads": 2,
    "n_prompt": 128, "n_gen": 0, "n_depth": 0, "avg_ns": 193000000, "stddev_ns": 1000000,
    "avg_ts": 662.1, "stddev_ts": 3.2, "samples_ns": [192000000, 194000000], "samples_ts": [665.3, 658.9]
  },
  {
    "build_commit": "unknown", "model_filename": "gemma-3-270m-q4_k_m.gguf", "n_threads": 2,
    "n_prompt": 0, "n_gen": 128, "n_depth": 0, "avg_ns": 1758000000, "stddev_ns": 2000000,
    "avg_ts": 72.8, "stddev_ts": 0.4, "samples_ns": [1755000000, 1761000000], "samples_ts": [73.1, 72.5]
  },
  {
    "build_commit": "unknown", "model_filename": "gemma-3-270m-q4_k_m.gguf", "n_threads": 2,
    "n_prompt": 128, "n_gen": 0, "n_depth": 128, "avg_ns": 203000000, "stddev_ns": 1000000,
    "avg_ts": 630.5, "stddev_ts": 3.2, "samples_ns": [202000000, 204000000], "samples_ts": [633.0, 628.0]
  },
  {
    "build_commit": "unknown", "model_filename": "gemma-3-270m-q4_k_m.gguf", "n_threads": 2,
    "n_prompt": 0, "n_gen": 128, "n_depth": 128, "avg_ns": 1798000000, "stddev_ns": 2000000,
    "avg_ts": 71.2, "stddev_ts": 0.4, "samples_ns": [1795000000, 1801000000], "samples_ts": [71.4, 71.0]
  }
]
"""


def test_parse_llama_bench() -> None:
    result = contenders.parse_llama_bench("load_backend: loaded CPU backend\n" + LLAMA_BENCH_JSON)
    assert result.pp == [665.3, 658.9]
    assert result.tg == [73.1, 72.5]  # from an empty context
    assert result.tg_deep == [71.4, 71.0]  # after -d 128
    with pytest.raises(BenchError):
        contenders.parse_llama_bench("error: failed to load model")


def test_parse_batched_bench() -> None:
    # A line as the vendored llama-batched-bench prints it (measured here, on a very busy machine).
    output = (
        "main: n_kv_max = 512\n"
        '{"n_kv_max": 512, "n_batch": 256, "n_ubatch": 256, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, '
        '"n_threads": 2, "n_threads_batch": 2, "pp": 8, "tg": 4, "pl": 2, "n_kv": 24, "t_pp": 2.964937, '
        '"speed_pp": 5.396405, "t_tg": 11.052192, "speed_tg": 0.723838, "t": 14.017129, "speed": 1.712191}\n'
        "llama_perf_context_print: total time = 14017 ms\n"
    )
    row = contenders.parse_batched_bench(output)[2]
    assert row.speed_tg == 0.723838
    assert row.generated_over_total == pytest.approx(2 * 4 / 14.017129)  # B x tg over t: the prompt's time too
    with pytest.raises(BenchError):
        contenders.parse_batched_bench("nothing here")


def test_kv_estimate_from_gguf_metadata() -> None:
    gemma = {"general.architecture": "gemma3", "gemma3.block_count": "18", "gemma3.attention.head_count": "4",
             "gemma3.attention.head_count_kv": "1", "gemma3.attention.key_length": "256",
             "gemma3.attention.value_length": "256", "gemma3.embedding_length": "640"}
    assert contenders.kv_bytes_estimate(gemma, 2048, "f16") == 2048 * 18 * 1 * 512 * 2
    assert contenders.kv_bytes_estimate(gemma, 2048, "q8_0") == int(2048 * 18 * 512 * 34 / 32)
    assert contenders.kv_bytes_estimate({"general.architecture": "x"}, 2048, "f16") is None


def _count(text: str) -> int:
    return len(text.split())


def test_prompts_are_long_enough_and_part_at_the_first_word() -> None:
    a, b = prompts.system_prompt("r0-a", 300, _count), prompts.system_prompt("r0-b", 300, _count)
    assert _count(a) >= 300 and _count(b) >= 300
    assert a.split()[0] != b.split()[0]  # no shared opening for a prefix cache to reuse
    assert prompts.system_prompt("r0-a", 300, _count) == a  # the same tag gives the same text
    assert prompts.with_question(a, 0) != prompts.with_question(a, 1)
    assert prompts.with_question(a, 0).startswith(a)
    for target in (50, 51, 128, 300):  # exactly: llama-bench's -p is an exact length
        story = prompts.story(f"x{target}", target, _count)
        assert _count(story) == target and story.endswith("there was a little"), story


def _results(values: dict[str, list[float]]) -> Results:
    results = Results()
    for key, samples in values.items():
        unit = "ms" if "ttft" in key or key.startswith("prefix") else "tok/s"
        for x in samples:
            results.add(key, x, key, unit, "test")
    return results


def test_evaluate_ratios_differences_and_verdicts() -> None:
    results = _results({
        "socket.decode": [60.0, 64.0, 62.0], "llama_bench.tg": [64.0], "bare.decode": [61.0],
        "socket.ttft": [50.0], "bare.ttft": [40.0], "prefix.cold": [1000.0, 1200.0], "prefix.warm": [100.0],
        "prefix.alt2": [900.0], "idle.cpu.p4": [0.7], "socket.prompt": [600.0],
    })
    verdicts = {(v.check.figure, v.check.peer): v for v in report.evaluate(results, report.checks(Options()))}
    decode = verdicts[("socket.decode", "llama_bench.tg")]
    assert decode.result == pytest.approx(62 / 64) and decode.met is False  # 0.969 < 0.97
    assert verdicts[("socket.decode", "bare.decode")].met is True
    ttft = verdicts[("socket.ttft", "bare.ttft")]
    assert ttft.result == 10.0 and ttft.met is True
    assert verdicts[("prefix.warm", "prefix.cold")].met is True  # 100 / 1100
    assert verdicts[("prefix.alt2", "prefix.cold")].met is False
    assert verdicts[("idle.cpu.p4", None)].met is False
    no_peer = verdicts[("socket.prompt", "llama_bench.pp")]
    assert no_peer.result is None and no_peer.met is None and no_peer.check.target is not None
    assert ("mqtt.decode", "llama_bench.tg") not in verdicts  # a figure that was not measured is not listed
    assert verdicts[("socket.decode", "llama_server.decode")].result is None
    text = report.table(results, list(verdicts.values()))
    assert "NOT MET" in text and "no peer" in text and "0.97×" in text
    data = report.to_json(results, list(verdicts.values()))
    assert data["summary"]["not_met"] >= 3 and json.dumps(data)


def test_options_quick_and_overrides(tmp_path: Path) -> None:
    parse = build_parser().parse_args
    o = options_from(parse(["bench", "--quick", "--concurrency", "1,3", "--parallel", "3"]))
    assert o.quick and o.rounds == 1 and o.concurrency == (1, 3) and o.parallel == 3
    full = options_from(parse(["bench"]))
    assert full.rounds == 3 and full.concurrency == (1, 2, 4, 8) and full.parallel == 4 and full.tg == 128
    (tmp_path / "llama-bench").write_text("")
    found = options_from(parse(["bench", "--native-dir", str(tmp_path)]))
    assert found.llama_bench == tmp_path / "llama-bench" and found.llama_server is None
    assert problems(full) == []
    bad = options_from(parse(["bench", "--concurrency", "0,32", "--llama-server", str(tmp_path / "nope")]))
    assert len(problems(bad)) == 2


def test_plot_without_matplotlib_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(plot, "available", lambda: False)
    assert main(["bench", "--quick", "--plot", "out.png"]) == 2
    assert "pip install 'edgellm[bench]'" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = _results({"socket.decode": [60.0], "llama_bench.tg": [70.0], "prefix.cold": [900.0],
                        "prefix.warm": [40.0], "socket.aggregate.c2": [90.0], "single_slot.aggregate.c2": [60.0],
                        "socket.decode_deep": [58.0], "llama_bench.tg_deep": [66.0], "mqtt.prefix.warm": [45.0],
                        "batched_bench.tg_kvu.b2": [80.0], "kv.f16.decode": [60.0], "kv.q8_0.decode": [61.0],
                        "kv.q8_0.kv_mb": [20.0], "kv.q8_0.rss": [398.0]})
    results.meta["options"] = {"concurrency": [1, 2], "threads": 2, "pp": 128, "kv_types": ["q8_0"]}
    verdicts = report.evaluate(results, report.checks(Options(concurrency=(1, 2))))
    titles = plot.write(tmp_path / "bench.png", results, verdicts)
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(titles) == 5 and titles[3].startswith("KV cache type"), titles
    # A run without the KV group (--kv-types '') gets no empty panel for it.
    for key in [k for k in results.figures if k.startswith("kv.")]:
        del results.figures[key]
    titles = plot.write(tmp_path / "bench.png", results, verdicts)
    assert len(titles) == 4 and not any(t.startswith("KV cache type") for t in titles), titles


def test_generated_daemon_config_is_valid(tmp_path: Path) -> None:
    from daemon.config import load_config

    text = toml_text({"state_dir": str(tmp_path), "model": {"path": "/m.gguf", "n_ctx": 2048},
                      "engine": {"parallel": 4, "n_threads": 2},
                      "mqtt": {"enabled": True, "port": 1884, "homeassistant": {"enabled": False}}})
    (tmp_path / "c.toml").write_text(text)
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.engine.parallel == 4 and cfg.mqtt.port == 1884 and cfg.mqtt.homeassistant.enabled is False


@pytest.mark.slow
def test_a_saved_run_renders_again(quick_run: dict[str, Any], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({k: v for k, v in quick_run.items() if not k.startswith("_")}))
    assert main(["bench", "--report", str(saved), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["comparisons"] == quick_run["comparisons"]
    assert main(["bench", "--report", str(saved), "--plot", str(tmp_path / "run.png")]) == 0
    table = capsys.readouterr().out
    for section in ("Single stream", "Concurrency", "Prefix cache", "Idle and memory", "targets:"):
        assert section in table
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "--report", str(tmp_path / "missing.json")]) == 2


def test_report_reads_schema_1_with_a_warning_and_refuses_other_json(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    figures = {"socket.decode": {"label": "decode", "unit": "tok/s", "contender": "edgellm socket",
                                 "samples": [55.0, 57.0]},
               "llama_bench.tg": {"label": "tg", "unit": "tok/s", "contender": "llama-bench", "samples": [60.0]}}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"meta": {"schema": "edgellm-bench/1", "options": {"concurrency": [1]}},
                               "figures": figures}))
    assert main(["bench", "--report", str(old)]) == 0
    table = capsys.readouterr().out
    assert "warning: schema edgellm-bench/1" in table and "0.93×" in table  # 56 / 60
    figures["socket.decode_deep"] = dict(figures["socket.decode"])  # session 8: /1, decode measured as /2
    old.write_text(json.dumps({"meta": {"schema": "edgellm-bench/1"}, "figures": figures}))
    assert main(["bench", "--report", str(old)]) == 0
    assert "warning: schema" not in capsys.readouterr().out
    meta = {"schema": "edgellm-bench/2"}
    for name, data, says in (
        ("other.json", {"meta": {"schema": "edgellm-bench/9"}, "figures": figures}, "'edgellm-bench/9'"),
        ("none.json", {"meta": {}, "figures": figures}, "meta.schema is None"),
        ("list.json", [1, 2], "no 'meta' object"),
        ("figure.json", {"meta": meta, "figures": {"socket.decode": 5}}, "'socket.decode': not a figure"),
        ("sample.json", {"meta": meta, "figures": {"x": {**figures["socket.decode"], "samples": [None]}}},
         "'x': a sample is not a number"),
        ("options.json", {"meta": {**meta, "options": {"concurrency": ["many"]}}, "figures": figures}, "many"),
    ):
        (tmp_path / name).write_text(json.dumps(data))
        assert main(["bench", "--report", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"cannot read {tmp_path / name}: " in err and says in err, err


NATIVE_DIR = os.environ.get("EDGELLM_BENCH_NATIVE_DIR", "")


@pytest.mark.slow
@pytest.mark.skipif(not NATIVE_DIR, reason="set EDGELLM_BENCH_NATIVE_DIR to a llama.cpp build/bin (docs/benchmarks.md)")
def test_quick_run_with_the_native_peers(tmp_path: Path, gemma_path: Path) -> None:
    """With llama-bench, llama-batched-bench and llama-server built, their figures join the run."""
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "bench", "--quick", "--json", "--no-mqtt", "--model", str(gemma_path),
         "--native-dir", NATIVE_DIR, "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=1200, cwd=str(REPO), check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(done.stdout)
    assert not data["warnings"] or all("stopped after" in w for w in data["warnings"]), data["warnings"]
    figures = data["figures"]
    for key in ("llama_bench.pp", "llama_bench.tg", "batched_bench.tg.b1", "batched_bench.tg.b2",
                "batched_bench.total.b2", "llama_server.decode", "llama_server.prompt", "llama_server.ttft",
                "llama_server.aggregate.c1",
                "llama_server.aggregate.c2", "llama_server.prefix.cold", "llama_server.prefix.warm",
                "llama_server.prefix.alt2", "llama_server.prefix.alt4", "llama_server.idle.rss.np2"):
        assert key in figures and all(x > 0 for x in figures[key]["samples"]), key
    verdict = {(c["figure"], c["peer"]): c for c in data["comparisons"]}
    assert isinstance(verdict[("socket.decode", "llama_bench.tg")]["met"], bool)
    assert isinstance(verdict[("socket.aggregate.c2", "llama_server.aggregate.c2")]["result"], float)
    assert _processes_mentioning(str(tmp_path)) == []
