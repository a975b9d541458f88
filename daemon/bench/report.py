"""From figures to verdicts: each figure beside its peer, the ratio, the issue's target, met or not.

Pure: `checks()` lists the comparisons, `evaluate()` applies them to a run's results, and `table()`
/ `to_json()` render them. The plot lives in plot.py (matplotlib is optional).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from daemon.bench.options import Options
from daemon.bench.results import Figure, Results

RATIO = "ratio"  # figure / peer
DIFFERENCE = "difference"  # figure - peer (same unit)
VALUE = "value"  # the figure itself against a bound


@dataclass(frozen=True)
class Target:
    op: str  # ">=", "<=", "<"
    bound: float
    source: str = "issue 8"

    def met(self, x: float) -> bool:
        if self.op == ">=":
            return x >= self.bound
        if self.op == "<=":
            return x <= self.bound
        if self.op == "<":
            return x < self.bound
        raise ValueError(f"unknown target operator {self.op!r}")

    def text(self, kind: str, unit: str = "") -> str:
        symbol = {">=": "≥", "<=": "≤", "<": "<"}[self.op]
        if kind == RATIO:
            return f"{symbol} {self.bound:g}×"
        return f"{symbol} {self.bound:g} {unit}".rstrip()


@dataclass(frozen=True)
class Check:
    section: str
    label: str
    figure: str
    peer: str | None  # figure id of the peer; None for a VALUE check
    kind: str
    target: Target | None = None  # None: shown for information, no verdict


@dataclass(frozen=True)
class Verdict:
    check: Check
    value: float | None
    peer_value: float | None
    result: float | None  # the ratio, the difference or the value
    met: bool | None  # None: no target, or something not measured

    def to_dict(self, results: Results) -> dict[str, Any]:
        c = self.check
        fig = results.figures.get(c.figure)
        return {
            "section": c.section,
            "label": c.label,
            "figure": c.figure,
            "peer": c.peer,
            "kind": c.kind,
            "value": self.value,
            "peer_value": self.peer_value,
            "result": self.result,
            "target": None if c.target is None else {"op": c.target.op, "bound": c.target.bound,
                                                     "source": c.target.source,
                                                     "text": c.target.text(c.kind, fig.unit if fig else "")},
            "met": self.met,
        }


SINGLE, CONSTRAINED, KV, CONCURRENCY, PREFIX, IDLE, CROSS = (
    "Single stream", "Constrained output", "KV cache type (engine.kv_type)", "Concurrency",
    "Prefix cache: time to first token", "Idle and memory", "Cross-checks",
)


def checks(o: Options) -> list[Check]:
    """Every comparison the report makes, for the contenders and sizes of these options."""
    tg, pp = f"llama-bench tg{o.tg}", f"llama-bench pp{o.pp}"
    out = [
        Check(SINGLE, f"decode, socket vs {tg}", "socket.decode", "llama_bench.tg", RATIO, Target(">=", 0.97)),
        Check(SINGLE, f"prompt, socket vs {pp}", "socket.prompt", "llama_bench.pp", RATIO, Target(">=", 0.95)),
        Check(SINGLE, f"decode, MQTT vs {tg}", "mqtt.decode", "llama_bench.tg", RATIO, Target(">=", 0.97)),
        Check(SINGLE, "decode, socket vs bare llama-cpp-python", "socket.decode", "bare.decode", RATIO,
              Target(">=", 0.97, "issue 2")),
        Check(SINGLE, "TTFT, socket minus bare llama-cpp-python", "socket.ttft", "bare.ttft", DIFFERENCE,
              Target("<=", 15.0, "issue 2")),
        Check(SINGLE, "TTFT, MQTT minus socket", "mqtt.ttft", "socket.ttft", DIFFERENCE, Target("<=", 30.0, "issue 3")),
        Check(SINGLE, "decode, socket vs llama-server", "socket.decode", "llama_server.decode", RATIO),
        Check(SINGLE, "TTFT, socket vs llama-server", "socket.ttft", "llama_server.ttft", RATIO),
        Check(SINGLE, f"decode, bare llama-cpp-python vs {tg}", "bare.decode", "llama_bench.tg", RATIO),
        Check(SINGLE, f"prompt, bare llama-cpp-python vs {pp}", "bare.prompt", "llama_bench.pp", RATIO),
        Check(SINGLE, f"decode, llama-server vs {tg}", "llama_server.decode", "llama_bench.tg", RATIO),
        # After the pp-token prompt, each token attends over pp more cells: against llama-bench -d pp.
        Check(SINGLE, f"decode after the {o.pp}-token prompt, socket vs {tg} @ d{o.pp}", "socket.decode_deep",
              "llama_bench.tg_deep", RATIO),
        Check(SINGLE, f"decode after the {o.pp}-token prompt, MQTT vs {tg} @ d{o.pp}", "mqtt.decode_deep",
              "llama_bench.tg_deep", RATIO),
        Check(SINGLE, f"decode after the {o.pp}-token prompt, llama-server vs {tg} @ d{o.pp}",
              "llama_server.decode_deep", "llama_bench.tg_deep", RATIO),
    ]
    for mode in ("greedy", "sampled"):
        out.append(Check(CONSTRAINED, f"decode with a JSON schema vs without, same prompt ({mode})",
                         f"schema.{mode}.decode", f"free.{mode}.decode", RATIO, Target(">=", 0.9, "issue 9")))
    for t in o.kv_types:  # the trade, measured: no target
        out += [
            Check(KV, f"decode, kv {t} vs f16", f"kv.{t}.decode", "kv.f16.decode", RATIO),
            Check(KV, f"prompt, kv {t} vs f16", f"kv.{t}.prompt", "kv.f16.prompt", RATIO),
            Check(KV, f"KV cache, kv {t} vs f16", f"kv.{t}.kv_mb", "kv.f16.kv_mb", RATIO),
            Check(KV, f"RSS after the same requests, kv {t} vs f16", f"kv.{t}.rss", "kv.f16.rss", RATIO),
            Check(KV, f"greedy answer, kv {t}: share of the f16 answer before the first difference",
                  f"kv.{t}.agree", None, VALUE),
        ]
    for c in o.concurrency:
        gate = c in (4, 8)
        out += [
            Check(CONCURRENCY, f"{c} clients, edgellm (parallel {c}) vs llama-server -np {c}",
                  f"socket.aggregate.c{c}", f"llama_server.aggregate.c{c}", RATIO, Target(">=", 1.0) if gate else None),
            Check(CONCURRENCY, f"{c} clients, edgellm (parallel {c}) vs llama-batched-bench B={c}",
                  f"socket.aggregate.c{c}", f"batched_bench.tg.b{c}", RATIO, Target(">=", 0.9) if gate else None),
            # The same two, both with their prompt time (S_TG leaves it out, the aggregate cannot).
            Check(CONCURRENCY, f"{c} clients, edgellm (parallel {c}) vs llama-batched-bench B={c}, prompt time in both",
                  f"socket.aggregate.c{c}", f"batched_bench.total.b{c}", RATIO),
        ]
        if c > 1:
            out.append(Check(CONCURRENCY, f"{c} clients, edgellm (parallel {c}) vs llama-batched-bench -kvu B={c} "
                             "(one unified KV cache, as the daemon's)", f"socket.aggregate.c{c}",
                             f"batched_bench.tg_kvu.b{c}", RATIO))
            out.append(Check(CONCURRENCY, f"{c} clients, edgellm (parallel {c}) vs the single-slot daemon",
                             f"socket.aggregate.c{c}", f"single_slot.aggregate.c{c}", RATIO, Target(">=", 1.0)))
        out.append(Check(CONCURRENCY, f"{c} clients, MQTT vs socket (both parallel {c})", f"mqtt.aggregate.c{c}",
                         f"socket.aggregate.c{c}", RATIO))
    out += [
        Check(PREFIX, "warm vs cold", "prefix.warm", "prefix.cold", RATIO, Target("<=", 0.25)),
        Check(PREFIX, "2 system prompts alternating vs cold", "prefix.alt2", "prefix.cold", RATIO, Target("<=", 0.25)),
        Check(PREFIX, "4 system prompts alternating vs cold", "prefix.alt4", "prefix.cold", RATIO, Target("<=", 0.25)),
        Check(PREFIX, "first request after a restart (persisted prefix) vs first after a start (cold)",
              "prefix.restart", "restart.first_cold", RATIO, Target("<=", 0.25)),
        Check(PREFIX, "MQTT: warm vs cold", "mqtt.prefix.warm", "mqtt.prefix.cold", RATIO, Target("<=", 0.25)),
        Check(PREFIX, "MQTT: 2 system prompts alternating vs cold", "mqtt.prefix.alt2", "mqtt.prefix.cold", RATIO,
              Target("<=", 0.25)),
        Check(PREFIX, "MQTT: 4 system prompts alternating vs cold", "mqtt.prefix.alt4", "mqtt.prefix.cold", RATIO,
              Target("<=", 0.25)),
        Check(PREFIX, "cold, edgellm vs llama-server", "prefix.cold", "llama_server.prefix.cold", RATIO),
        Check(PREFIX, "warm, edgellm vs llama-server", "prefix.warm", "llama_server.prefix.warm", RATIO),
        Check(PREFIX, "2 alternating, edgellm vs llama-server", "prefix.alt2", "llama_server.prefix.alt2", RATIO),
        Check(PREFIX, "4 alternating, edgellm vs llama-server", "prefix.alt4", "llama_server.prefix.alt4", RATIO),
        Check(PREFIX, "llama-server: warm vs cold", "llama_server.prefix.warm", "llama_server.prefix.cold", RATIO),
        Check(PREFIX, "llama-server: 2 alternating vs cold", "llama_server.prefix.alt2", "llama_server.prefix.cold",
              RATIO),
        Check(PREFIX, "llama-server: 4 alternating vs cold", "llama_server.prefix.alt4", "llama_server.prefix.cold",
              RATIO),
    ]
    for p in sorted({o.parallel, 1, *o.concurrency}):
        out += [
            Check(IDLE, f"idle CPU, edgellm (parallel {p})", f"idle.cpu.p{p}", None, VALUE, Target("<", 0.5)),
            Check(IDLE, f"RSS idle vs model + KV + 80 MB, edgellm (parallel {p})", f"idle.rss.p{p}",
                  f"memory.bound.p{p}", RATIO, Target("<=", 1.0)),
        ]
    for key, name in (("socket", "socket"), ("mqtt", "MQTT"), ("bare", "bare"), ("llama_server", "llama-server")):
        out.append(Check(CROSS, f"decode as received vs as reported, {name}", f"{key}.decode_client",
                         f"{key}.decode", RATIO))
    return out


def evaluate(results: Results, all_checks: Sequence[Check]) -> list[Verdict]:
    """The checks whose figure was measured (a missing peer leaves the ratio empty)."""
    verdicts = []
    for c in all_checks:
        value = results.value(c.figure)
        if value is None:
            continue
        peer = results.value(c.peer) if c.peer else None
        result: float | None
        if c.kind == VALUE:
            result = value
        elif peer is None:
            result = None
        elif c.kind == DIFFERENCE:
            result = value - peer
        else:
            result = value / peer if peer else None
        met = None if c.target is None or result is None else c.target.met(result)
        verdicts.append(Verdict(c, value, peer, result, met))
    return verdicts


def to_json(results: Results, verdicts: Sequence[Verdict]) -> dict[str, Any]:
    gated = [v for v in verdicts if v.check.target is not None]
    return {
        "meta": results.meta,
        "figures": {key: fig.to_dict() for key, fig in sorted(results.figures.items())},
        "comparisons": [v.to_dict(results) for v in verdicts],
        "summary": {
            "targets": len(gated),
            "met": sum(1 for v in gated if v.met is True),
            "not_met": sum(1 for v in gated if v.met is False),
            "no_peer": sum(1 for v in gated if v.met is None),
        },
        "warnings": list(results.warnings),
    }


# --- the readable table ------------------------------------------------------------------------------


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit in ("% of a core", "of 1"):
        return f"{value:.2f}"
    if unit in ("ms", "MB", "tokens") or abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.1f}"


def noise(fig: Figure | None) -> str:
    summary = None if fig is None else fig.summary
    if fig is None or summary is None:
        return ""
    text = f"n={summary.n}"
    if fig.unit == "ms":
        text += f", p95 {fmt(summary.p95, 'ms')}"
    if summary.n > 1:
        text += f", ±{summary.spread_pct / 2:.0f}%"
    return text


def _render(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return lines


def table(results: Results, verdicts: Sequence[Verdict]) -> str:
    meta = results.meta
    opts = meta.get("options", {})
    model = meta.get("model", {})
    out = [
        f"edgellm bench — {model.get('name')} ({(model.get('size_bytes') or 0) / 1e6:.0f} MB), "
        f"{opts.get('threads')} threads, seed {opts.get('seed')}, n_ctx {opts.get('n_ctx')}, "
        f"{opts.get('rounds')} rounds{' (quick)' if opts.get('quick') else ''}"
        + (f" — {meta['label']}" if meta.get("label") else ""),
        f"single stream: prompt {opts.get('pp')} tokens, {opts.get('tg')}-token answers, {opts.get('reps')} per "
        f"contender per round; concurrency: {opts.get('agg_prompt')}-token prompts, {opts.get('agg_tokens')}-token "
        f"answers; prefix: ~{meta.get('system_prompt_tokens', opts.get('system_tokens'))}-token system prompt; "
        f"main daemon engine.parallel = {opts.get('parallel')}",
    ]
    header = ["comparison", "value", "noise", "peer", "ratio", "target", "verdict"]
    used: set[str] = set()
    for section in (SINGLE, CONSTRAINED, KV, CONCURRENCY, PREFIX, IDLE, CROSS):
        rows = []
        for v in verdicts:
            c = v.check
            if c.section != section:
                continue
            fig = results.figures.get(c.figure)
            peer_fig = results.figures.get(c.peer) if c.peer else None
            unit = fig.unit if fig else ""
            used.update(x for x in (c.figure, c.peer) if x)
            if c.kind == RATIO:
                result = "-" if v.result is None else f"{v.result:.2f}×"
            elif c.kind == DIFFERENCE:
                result = "-" if v.result is None else f"{v.result:+.0f} {unit}"
            else:
                result = ""
            verdict = "" if c.target is None else {True: "met", False: "NOT MET", None: "no peer"}[v.met]
            peer = "" if c.peer is None else f"{fmt(v.peer_value, peer_fig.unit if peer_fig else unit)}"
            if peer_fig is not None and v.peer_value is not None:
                peer += f" ({noise(peer_fig)})"
            rows.append([c.label, f"{fmt(v.value, unit)} {unit}", noise(fig), peer, result,
                         "" if c.target is None else c.target.text(c.kind, unit) + f" ({c.target.source})", verdict])
        if rows:
            out += ["", section, *_render(rows, header)]
    rest = [fig for key, fig in sorted(results.figures.items()) if key not in used and fig.samples]
    if rest:
        out += ["", "Other figures"]
        out += _render([[f.label, f"{fmt(f.value, f.unit)} {f.unit}", noise(f)] for f in rest],
                       ["figure", "value", "noise"])
    gated = [v for v in verdicts if v.check.target is not None]
    out += [
        "",
        f"targets: {sum(v.met is True for v in gated)} met, {sum(v.met is False for v in gated)} not met, "
        f"{sum(v.met is None for v in gated)} without a peer in this run",
        "value = median of n samples; ±x% = half the spread (max - min) / median; TTFT is client-side, "
        "send to first token; p95 by linear interpolation (with few samples it is close to the maximum).",
    ]
    host = meta.get("host", {})
    out.append(f"host: {host.get('cpu')} ({host.get('cpus')} CPUs), load average "
               f"{_load(host.get('loadavg_start'))} at start, {_load(meta.get('loadavg_end'))} at the end; "
               f"{meta.get('duration_s')} s; {meta.get('git') or 'no git checkout'}")
    for warning in results.warnings:
        out.append(f"warning: {warning}")
    return "\n".join(out)


def _load(values: Any) -> str:
    if not isinstance(values, list) or not values:
        return "?"
    return "/".join(f"{float(x):.1f}" for x in values)
