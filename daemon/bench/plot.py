"""`--plot PATH`: a PNG bar chart of a run (matplotlib, an optional extra: `pip install 'edgellm[bench]'`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.bench.report import RATIO, Verdict
from daemon.bench.results import Results

INSTALL_HINT = (
    "--plot needs matplotlib, an optional extra: pip install 'edgellm[bench]' "
    "(from a clone: .venv/bin/pip install -e '.[bench]', or just .venv/bin/pip install matplotlib)"
)


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _bars(ax: Any, groups: list[tuple[str, list[tuple[str, float | None]]]], unit: str, title: str) -> None:
    """Grouped bars: one group per scenario, one bar per contender (missing ones left out)."""
    names: list[str] = []
    for _, bars in groups:
        for name, value in bars:
            if value is not None and name not in names:
                names.append(name)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys = [], []
        for g, (_, bars) in enumerate(groups):
            value = dict(bars).get(name)
            if value is not None:
                xs.append(g + (i - (len(names) - 1) / 2) * width)
                ys.append(value)
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def _scaled(value: float | None, divisor: float) -> float | None:
    return None if value is None else value / divisor


def write(path: Path, results: Results, verdicts: Sequence[Verdict]) -> list[str]:
    """Write the chart; its panels' titles, top to bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = results.value
    opts = results.meta.get("options", {})
    concurrency = opts.get("concurrency") or []
    kv_types = ["f16", *(t for t in opts.get("kv_types") or [] if t != "f16")]
    kv_groups = [
        (label, [(f"kv {t}", _scaled(v(f"kv.{t}.{key}"), scale)) for t in kv_types])
        for label, key, scale in (("decode tok/s", "decode", 1), ("prompt tok/s / 10", "prompt", 10),
                                  ("KV cache MB", "kv_mb", 1), ("RSS MB / 10", "rss", 10))
    ]
    with_kv = any(value is not None for _, bars in kv_groups for _, value in bars)
    fig, axes = plt.subplots(5 if with_kv else 4, 1, figsize=(12, 21 if with_kv else 17))
    ax_single, ax_clients, ax_prefix, *ax_kv, ax_ratios = axes
    _bars(ax_single, [
        ("decode", [("llama-bench", v("llama_bench.tg")), ("bare", v("bare.decode")),
                    ("llama-server", v("llama_server.decode")), ("edgellm socket", v("socket.decode")),
                    ("edgellm MQTT", v("mqtt.decode"))]),
        ("prompt / 10", [(name, _scaled(x, 10)) for name, x in (
            ("llama-bench", v("llama_bench.pp")), ("bare", v("bare.prompt")),
            ("llama-server", v("llama_server.prompt")), ("edgellm socket", v("socket.prompt")),
            ("edgellm MQTT", v("mqtt.prompt")))]),
        (f"decode after the {opts.get('pp', '--pp')}-token prompt", [
            ("llama-bench", v("llama_bench.tg_deep")), ("bare", v("bare.decode_deep")),
            ("llama-server", v("llama_server.decode_deep")), ("edgellm socket", v("socket.decode_deep")),
            ("edgellm MQTT", v("mqtt.decode_deep"))]),
    ], "tok/s", "Single stream (prompt rate divided by 10 to share the axis; llama-bench: pp, tg, tg at -d pp)")
    _bars(ax_clients, [
        (f"{c} clients", [("llama-batched-bench S_TG", v(f"batched_bench.tg.b{c}")),
                          ("llama-batched-bench -kvu S_TG", v(f"batched_bench.tg_kvu.b{c}")),
                          ("llama-server -np N", v(f"llama_server.aggregate.c{c}")),
                          ("edgellm single-slot", v(f"single_slot.aggregate.c{c}") if c > 1
                           else v(f"socket.aggregate.c{c}")),
                          ("edgellm parallel N", v(f"socket.aggregate.c{c}")),
                          ("edgellm parallel N, MQTT", v(f"mqtt.aggregate.c{c}"))])
        for c in concurrency
    ], "tok/s", "Aggregate over N concurrent streaming clients")
    _bars(ax_prefix, [
        (label, [("llama-server", v(f"llama_server.prefix.{key}")), ("edgellm", v(f"prefix.{key}")),
                 ("edgellm MQTT", v(f"mqtt.prefix.{key}"))])
        for label, key in (("cold", "cold"), ("warm", "warm"), ("2 alternating", "alt2"), ("4 alternating", "alt4"))
    ] + [("after restart", [("edgellm", v("prefix.restart")),
                            ("edgellm, first after a start (cold)", v("restart.first_cold"))])], "ms (median)",
        "Time to first token with a long system prompt")
    for ax in ax_kv:
        _bars(ax, kv_groups, "(see each group)", "KV cache type (engine.kv_type): daemons that differ only in it")
    gated = [x for x in verdicts if x.check.target is not None and x.check.kind == RATIO and x.result is not None]
    labels = [x.check.label if len(x.check.label) <= 60 else x.check.label[:58] + "…" for x in gated]
    ax_ratios.barh(range(len(gated)), [x.result or 0 for x in gated],
             color=["tab:green" if x.met else "tab:red" for x in gated])
    for i, x in enumerate(gated):
        assert x.check.target is not None
        ax_ratios.plot([x.check.target.bound] * 2, [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax_ratios.set_yticks(range(len(gated)), labels, fontsize=7)
    ax_ratios.invert_yaxis()
    ax_ratios.set_xlabel("ratio (black mark: the target; green met, red not met)")
    ax_ratios.set_title("Ratios to peers against the issue's targets", fontsize=10)
    ax_ratios.grid(axis="x", alpha=0.3)
    model = results.meta.get("model", {}).get("name", "")
    label = results.meta.get("label") or ""
    fig.suptitle(f"edgellm bench: {model}, {opts.get('threads')} threads {label}".strip(), fontsize=11)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.98))
    fig.savefig(path, dpi=110)
    titles = [ax.get_title() for ax in axes]
    plt.close(fig)
    return titles
