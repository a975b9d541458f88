#!/usr/bin/env python3
"""Run the real governor against simulated Raspberry Pi thermal plants and print how it did.

    python scripts/governor_sim.py                      # every preset, default [governor] settings
    python scripts/governor_sim.py --preset pi5-passive --target 76
    python scripts/governor_sim.py --config /etc/edgellm/config.toml   # your [governor] section
    python scripts/governor_sim.py --plot docs/governor-sim.png        # needs matplotlib

Per preset: the highest temperature after the first minute, the settled average duty against the
best constant duty that keeps the plant at or under the hot threshold, and the settled
peak-to-peak oscillation. The plant and the worker emulation are in daemon/thermal_plant.py.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.config import GovernorConfig, load_config
from daemon.thermal_plant import PRESETS, SimResult, ThermalPlant, simulate

PLOT_PRESETS = ("pi5-passive", "pi4-case", "pi5-die", "pi5-fan-hot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), help="plant preset (repeatable)")
    parser.add_argument("--config", type=Path, help="take the [governor] section from this config file")
    parser.add_argument("--target", type=float, help="override governor.target_c")
    parser.add_argument("--duration", type=float, default=3600.0, help="simulated seconds (default 3600)")
    parser.add_argument("--noise", type=float, default=0.5, help="sensor noise, ±°C uniform (default 0.5)")
    parser.add_argument("--quantum", type=float, default=0.1, help="sensor resolution, °C (default 0.1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", type=Path, help="draw temperature and duty over time into this PNG")
    args = parser.parse_args(argv)

    cfg = load_config(args.config).governor if args.config else GovernorConfig()
    if args.target is not None:
        cfg = replace(cfg, target_c=args.target)
    names = args.preset or list(PRESETS)
    results: dict[str, SimResult] = {}
    header = (
        f"{'preset':<12} {'full-load':>9} {'max>60s':>8} {'avg duty':>8} {'best':>6} {'ratio':>6} "
        f"{'osc':>5} {'mean T':>7}  states"
    )
    out = sys.stdout
    out.write(
        f"governor: warm {cfg.warm_c:g} / hot {cfg.hot_c:g} / critical {cfg.critical_c:g} °C, "
        f"target {cfg.target_c:g} °C, kp {cfg.kp:g}, ki {cfg.ki:g}, interval {cfg.interval_s:g} s; "
        f"sensor ±{args.noise:g} °C, {args.quantum:g} °C steps; {args.duration:g} s, settled = second half\n"
    )
    out.write(header + "\n")
    for name in names:
        params = PRESETS[name]
        result = simulate(
            params, cfg, duration_s=args.duration, noise_c=args.noise, quantum_c=args.quantum, seed=args.seed
        )
        results[name] = result
        s = result.summary()
        states = ",".join(st for st in ("normal", "warm", "hot", "critical") if st in set(result.states))
        out.write(
            f"{name:<12} {ThermalPlant(params).equilibrium_c(1.0):>8.1f}° {s['max_after_60s_c']:>7.2f}° "
            f"{s['avg_duty_settled']:>8.3f} {s['best_constant_duty']:>6.3f} {s['duty_ratio']:>6.3f} "
            f"{s['oscillation_c']:>4.2f}° {s['mean_temp_settled_c']:>6.2f}°  {states}\n"
        )
    out.write(
        "\nfull-load: steady temperature at duty 1; max>60s: highest true temperature after the first minute;\n"
        "avg duty: settled fraction of time computing; best: best constant duty that stays <= hot;\n"
        "ratio: avg/best; osc: settled peak-to-peak temperature.\n"
    )
    if args.plot is not None:
        return plot(results, cfg, args.plot)
    return 0


def plot(results: dict[str, SimResult], cfg: GovernorConfig, path: Path) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.stderr.write("--plot needs matplotlib (pip install matplotlib); the figures above are complete\n")
        return 1
    shown = [n for n in PLOT_PRESETS if n in results] or list(results)[:4]
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 2.8 * len(shown)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], shown):
        result = results[name]
        minutes = [t / 60 for t in result.times]
        ax.plot(minutes, result.temps, color="tab:red", linewidth=1.0, label="temperature")
        for level, style in ((cfg.hot_c, "--"), (cfg.target_c, ":"), (cfg.warm_c, "-.")):
            ax.axhline(level, color="grey", linestyle=style, linewidth=0.8)
        ax.set_ylabel("°C")
        ax.set_ylim(min(result.temps) - 2, max(cfg.hot_c + 3, max(result.temps) + 1))
        duty_ax = ax.twinx()
        window = 10  # smooth the per-second duty over 10 s so the plot shows the trend
        smooth = [
            sum(result.duties[max(0, i - window + 1) : i + 1]) / len(result.duties[max(0, i - window + 1) : i + 1])
            for i in range(len(result.duties))
        ]
        duty_ax.plot(minutes, smooth, color="tab:blue", linewidth=0.8, label="duty (10 s mean)")
        duty_ax.axhline(result.best_duty, color="tab:blue", linestyle="--", linewidth=0.6)
        duty_ax.set_ylim(0, 1.05)
        duty_ax.set_ylabel("duty")
        s = result.summary()
        ax.set_title(
            f"{name}: {result.params.description}\nmax after 1 min {s['max_after_60s_c']:.1f} °C, "
            f"duty {s['avg_duty_settled']:.2f} of best constant {s['best_constant_duty']:.2f} "
            f"({s['duty_ratio'] * 100:.0f} %), oscillation {s['oscillation_c']:.1f} °C",
            fontsize=9,
        )
    axes[-1, 0].set_xlabel("minutes")
    fig.legend(
        handles=[
            plt.Line2D([], [], color="tab:red", label="temperature"),
            plt.Line2D([], [], color="tab:blue", label="duty (10 s mean)"),
            plt.Line2D([], [], color="tab:blue", linestyle="--", label="best constant duty under hot"),
            plt.Line2D([], [], color="grey", linestyle="--", label=f"hot {cfg.hot_c:g} °C"),
            plt.Line2D([], [], color="grey", linestyle=":", label=f"target {cfg.target_c:g} °C"),
            plt.Line2D([], [], color="grey", linestyle="-.", label=f"warm {cfg.warm_c:g} °C"),
        ],
        loc="lower center",
        ncol=3,
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    sys.stdout.write(f"plot written to {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
