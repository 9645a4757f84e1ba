"""The route expert and the imitation base on every embodiment (COMPASS part 1, docs/results/mobility.md).

The expert (tuned for carter) runs on three disjoint ranges of report seeds; each base checkpoint
(one per training seed, all trained on carter's demonstrations) runs on the first range. Every
embodiment sees the same worlds, starts and goals. A plot shows one world's trajectories of both.

    .venv/bin/python bench/mobility.py runs/mobility/base_s0/best runs/mobility/base_s1/best \
        runs/mobility/base_s2/best --episodes 200 --results docs/results/mobility.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from report import publish

from robomosaic.policies.evaluate import load_checkpoint
from robomosaic.policies.evaluate_navigation import evaluate_navigation
from robomosaic.policies.rollout import ExecutorPolicy
from robomosaic.sim.measure_experts import machine, wilson_interval
from robomosaic.sim.mobility.embodiments import embodiment_names, load_embodiment
from robomosaic.sim.mobility.env import MobilityEnv
from robomosaic.sim.mobility.rollout import RouteExpertPolicy, run_navigation

SEED_OFFSET = 1_000_000


def pooled(runs: list[dict]) -> dict:
    """Success/collision over several runs of one arm, with the spread of the per-run rates."""
    n = sum(r["episodes"] for r in runs)
    wins = sum(round(r["success_rate"] * r["episodes"]) for r in runs)
    hits = sum(round(r["collision_rate"] * r["episodes"]) for r in runs)
    return {
        "n": n,
        "success": wins / n,
        "interval": wilson_interval(wins, n),
        "collision": hits / n,
        "per_run": [r["success_rate"] for r in runs],
        "wtt": [r["weighted_travel_time"] for r in runs],
    }


def row(arm: str, name: str, p: dict) -> str:
    lo, hi = p["interval"]
    per_run = ", ".join(f"{s:.1%}" for s in p["per_run"])
    wtt = np.mean([w for w in p["wtt"] if np.isfinite(w)]) if any(np.isfinite(p["wtt"])) else float("inf")
    return (
        f"| {name} | {arm} | {p['success']:.1%} ({lo:.1%}-{hi:.1%}) | {per_run} | "
        f"{p['collision']:.1%} | {wtt:.1f} |"
    )


def how_trained(checkpoint: Path) -> str:
    """The command that trained a base (from its run folder's config.yaml), or what is known."""
    import yaml

    config = Path(checkpoint).parent / "config.yaml"
    if not config.is_file():
        return "training config not found"
    cfg = yaml.safe_load(config.read_text())
    return (
        f"`robomosaic-train task=nav dataset={cfg['dataset']} seed={cfg['seed']} "
        f"policy={cfg['policy']['network']} "
        f"flow={cfg['flow']['process']['name']} policy.horizon={cfg['policy']['horizon']} "
        f"policy.n_action_steps={cfg['policy']['n_action_steps']} train.steps={cfg['train']['steps']}`"
    )


def datasets(checkpoints: list[Path]) -> list[str]:
    """The stores the bases were trained on (from their run folders' config.yaml), each once."""
    import yaml

    configs = [Path(c).parent / "config.yaml" for c in checkpoints]
    return sorted({yaml.safe_load(c.read_text())["dataset"] for c in configs if c.is_file()})


def how_collected(store: str) -> str:
    """The robomosaic-collect command that records a store like `store` (from the store itself)."""
    from robomosaic.data.store import EpisodeStore

    if not Path(store).exists():
        return "store not found"
    opened = EpisodeStore.open(store)
    embodiments = opened.spec.extra.get("embodiments", [])
    return (
        f"{opened.n_episodes} route-expert episodes on {', '.join(embodiments)}: `robomosaic-collect "
        f"task=nav task.embodiment={','.join(embodiments)} episodes={opened.n_episodes} workers=32 "
        f"out={store}`"
    )


def trajectories(checkpoint: Path, seed: int, out: Path) -> None:
    """One world, every embodiment: the expert's path and the base's, on the map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = embodiment_names()
    policy, _ = load_checkpoint(checkpoint)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4), sharey=True)
    for ax, arm in zip(axes, ("route expert", "imitation base"), strict=True):
        for k, name in enumerate(names):
            env = MobilityEnv([name])
            runner = (
                RouteExpertPolicy(env)
                if arm == "route expert"
                else ExecutorPolicy(policy, env.spec, gripper_dims=())
            )
            (episode,) = run_navigation(env, [seed], runner, record=True)
            xy = episode.trajectory["state"][:, 2:4]
            end = "reached" if episode.success else ("collided" if episode.collision else "timed out")
            ax.plot(xy[:, 0], xy[:, 1], color=f"C{k}", lw=1.6, label=f"{name}: {end}, {episode.time:.1f} s")
        world = env.worlds[0]
        for (cx, cy, hx, hy, yaw), mapped in zip(world.boxes, world.mapped, strict=True):
            c, s = np.cos(yaw), np.sin(yaw)
            corner = (cx - c * hx + s * hy, cy - s * hx - c * hy)
            ax.add_patch(
                Rectangle(
                    corner,
                    2 * hx,
                    2 * hy,
                    angle=np.degrees(yaw),
                    facecolor="0.3" if mapped else "none",
                    edgecolor="0.3",
                    hatch=None if mapped else "////",
                )
            )
        ax.plot(*world.start[:2], "ko", ms=7)
        ax.plot(*world.goal, "k*", ms=14)
        ax.add_patch(plt.Circle(world.goal, 0.5, fill=False, ls="--", color="k"))
        ax.set_title(f"{arm}, world {seed} ({world.family}); hatched: not on the map")
        ax.set_xlim(-0.3, 10.3)
        ax.set_ylim(-0.3, 10.3)
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bases", type=Path, nargs="+", help="base checkpoints, one per training seed")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--worlds", type=int, default=50)
    parser.add_argument("--plot-seed", type=int, default=SEED_OFFSET + 3)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    names = embodiment_names()
    started = time.time()
    load = os.getloadavg()
    expert_runs = [
        evaluate_navigation(
            "expert", names, args.episodes, SEED_OFFSET + k * args.episodes, args.worlds, progress=False
        )
        for k in range(3)
    ]
    base_runs = [
        evaluate_navigation(b, names, args.episodes, SEED_OFFSET, args.worlds, progress=False)
        for b in args.bases
    ]
    table = [
        "| embodiment | arm | success (95 % interval) | per seed | collision | weighted travel time (s) |",
        "|---|---|---|---|---|---|",
    ]
    summary = {}
    for name in names:
        held = " (held out)" if load_embodiment(name).held_out else ""
        for arm, runs in (("route expert", expert_runs), ("imitation base", base_runs)):
            p = pooled([r["embodiments"][name] for r in runs])
            summary.setdefault(name, {})[arm] = p
            table.append(row(arm, name + held, p))
    plot = (
        args.results.with_name("mobility_trajectories.png")
        if args.results
        else Path("/tmp/mobility_trajectories.png")
    )
    trajectories(args.bases[0], args.plot_seed, plot)
    carter = summary["carter"]["imitation base"]["success"]
    text = "\n".join(
        [
            "# Navigation: route expert and imitation base on every embodiment",
            "",
            f"`{shlex.join([sys.executable.split('/')[-1], *sys.argv])}`",
            "",
            f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}",
            *[f"- {base}: {how_trained(base)}" for base in args.bases],
            *[f"- {store}: {how_collected(store)}" for store in datasets(args.bases)],
            f"- load average before: {' '.join(f'{v:.2f}' for v in load)} (no timing here); "
            f"{time.time() - started:.0f} s in all",
            f"- expert: seeds {SEED_OFFSET}.. in 3 ranges of {args.episodes}; each base: seeds "
            f"{SEED_OFFSET}..{SEED_OFFSET + args.episodes - 1}; per seed = per range (expert) or per "
            "training seed (base); intervals are Wilson 95 % over the pooled episodes; weighted travel "
            "time = mean time of the successful episodes / success rate, averaged over seeds",
            "",
            *table,
            "",
            "Imitation base relative to its own success on carter: "
            + ", ".join(
                f"{n} {summary[n]['imitation base']['success'] / carter:.2f}x" for n in names if n != "carter"
            ),
            "",
            f"![trajectories]({plot.name})",
            "",
        ]
    )
    publish(text, args.results)
    if args.results:
        raw = {"expert": expert_runs, "bases": base_runs}
        for runs in raw.values():
            for r in runs:
                for e in r["embodiments"].values():
                    e.pop("episodes_list")
        args.results.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    main()
