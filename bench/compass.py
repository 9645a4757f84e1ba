"""COMPASS results (docs/results/compass.md): the imitation base and the residual specialists, from
`robomosaic-compass eval`'s results.json, with each specialist's learning curve and training time.

    .venv/bin/robomosaic-compass residual out=runs/compass base.checkpoint=runs/mobility/base10k_s0/best
    .venv/bin/robomosaic-compass eval out=runs/compass base.checkpoint=runs/mobility/base10k_s0/best
    .venv/bin/python bench/compass.py runs/compass --results docs/results/compass.md
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from report import publish

from robomosaic.sim.measure_experts import machine, wilson_interval


def cell(rate: float, interval: tuple[float, float]) -> str:
    return f"{rate:.1%} ({interval[0]:.1%}-{interval[1]:.1%})"


def pooled(results: list[dict]) -> tuple[float, tuple[float, float], float, float]:
    """Success (Wilson interval), collision and weighted travel time over several runs' episodes."""
    episodes = [e for r in results for e in r["episodes_list"]]
    wins = sum(e["success"] for e in episodes)
    n = len(episodes)
    times = [e["time"] for e in episodes if e["success"]]
    wtt = float(np.mean(times)) / (wins / n) if wins else float("inf")
    return wins / n, wilson_interval(wins, n), sum(e["collision"] for e in episodes) / n, wtt


def curves(out: Path, folders: list[Path], plot: Path) -> dict[str, float]:
    """Training success per iteration (smoothed) of every specialist; returns wall seconds each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    seconds = {}
    for folder in folders:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        steps = np.array([r["env_steps"] for r in rows])
        success = np.array([np.nan if r["success"] is None else r["success"] for r in rows])
        window = 10
        smooth = []
        for i in range(len(success)):
            recent = success[max(0, i - window + 1) : i + 1]
            smooth.append(np.nanmean(recent) if np.isfinite(recent).any() else np.nan)
        label = str(folder.relative_to(out / "residual"))
        ax.plot(steps, smooth, label=label)
        seconds[label] = sum(r["collect_s"] + r["update_s"] for r in rows)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"success of training episodes (mean of {window} iterations)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="robomosaic-compass out folder")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    report = json.loads((args.out / "eval" / "results.json").read_text())
    base = report["arms"]["base"]
    specialists: dict[str, list[dict]] = defaultdict(list)
    for arm, results in report["arms"].items():
        if arm.startswith("specialist "):
            embodiment = arm.split()[1]
            specialists[embodiment].append(results[embodiment])
    table = [
        "| embodiment | arm | runs | success (95 % interval) | collision | weighted travel time (s) "
        "| vs base |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for name in base:
        b = pooled([base[name]])
        table.append(f"| {name} | base | 1 | {cell(b[0], b[1])} | {b[2]:.1%} | {b[3]:.1f} | 1.00x |")
        if name in specialists:
            s = pooled(specialists[name])
            ratio = s[0] / b[0] if b[0] else float("inf")
            table.append(
                f"| {name} | specialist | {len(specialists[name])} | {cell(s[0], s[1])} | "
                f"{s[2]:.1%} | {s[3]:.1f} | {ratio:.2f}x |"
            )
    plot = (args.results.parent if args.results else args.out / "eval") / "compass_curves.png"
    folders = sorted(p.parent for p in (args.out / "residual").glob("*/s*/metrics.jsonl"))
    seconds = curves(args.out, folders, plot)
    episodes = next(iter(base.values()))["episodes"]
    text = "\n".join(
        [
            "# COMPASS: imitation base and residual specialists",
            "",
            f"`{report['command']}`, then `python bench/compass.py {args.out}"
            + (f" --results {args.results}`" if args.results else "`"),
            "",
            f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}; load average "
            f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} (no timing here)",
            f"- base: {report['base']}; {episodes} episodes per arm and embodiment on seeds 1000000..; "
            "intervals are Wilson 95 % over the pooled episodes; a specialist runs on its own embodiment",
            "- training wall time per specialist on this CPU: "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()),
            "",
            *table,
            "",
            f"![learning curves]({plot.name})",
            "",
        ]
    )
    publish(text, args.results)


if __name__ == "__main__":
    main()
