"""Chunk execution side by side: naive switching, temporal ensembling, real-time chunking x delay.

Runs one trained chunk policy (default `tests/assets/lift_flow`, shipped) on its task through
`ExecutorPolicy` for every blend mode (none, ensemble, rtc) and simulated inference delay
(default 0, 50, 150 ms = 0, 1, 3 control periods at 20 Hz), every cell on the same evaluation
seeds 1_000_000 + i, two simulator workers shared by all cells, one torch thread. Per cell it
reports success, episode length, and how smooth the executed actions are at the steps where a new
chunk takes over versus inside a chunk (definitions in `DEFINITIONS`, copied into the results).
Run by hand:

    nice -n 5 .venv/bin/python bench/chunking.py --results docs/results/chunking.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from robomosaic.policies.checkpoint import load_policy
from robomosaic.policies.evaluate import task_spec
from robomosaic.policies.rollout import ExecutorPolicy
from robomosaic.sim.measure_experts import machine, wilson_interval
from robomosaic.sim.vector import VectorTask, iter_episodes

BLENDS = ("none", "ensemble", "rtc")
POSITION = slice(0, 3)  # OSC_POSE delta: dims 0:3 are the end-effector translation command

DEFINITIONS = """\
- **take-over step**: a control step at which a newly computed chunk became available to the
  executor (its `ExecutorStats.chunks` counter rose during that step's `act`), so the executed action
  comes from (none, rtc) or newly includes (ensemble) the new chunk. The episode's first chunk is
  not counted (before it the executor holds with a zero motion command). Every other step is
  *inside* a chunk.
- **jump** at step t: `||a_t - a_{t-1}||_2` over the position dims 0:3 of the executed 7-d action
  (OSC delta, normalized units in [-1, 1]); **jerk** at step t: `||a_t - 2 a_{t-1} + a_{t-2}||_2`
  over the same dims.
- **boundary jump / jerk**: mean over all take-over steps of all episodes of the cell.
  **inside jerk**: mean over steps t where neither t nor t-1 is a take-over step (so a_{t-2..t}
  come from the same chunk set) and no step in t-2..t is a hold.
- **smoothness**: mean jump over all steps t >= 1 of all episodes where neither t nor t-1 is a hold
  (lower is smoother). Means are pooled over steps, so long (failed, 150-step) episodes weigh more.
- **ratio**: the cell's value divided by the naive (blend none), no-delay cell's value.
"""


class RecordingExecutorPolicy(ExecutorPolicy):
    """`ExecutorPolicy` that also keeps, per episode seed, every executed action and whether a new
    chunk arrived or the executor held at that step (ExecutorPolicy discards the status)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: dict[int, dict[str, list]] = {}

    def reset(self, env_index: int, obs, seed: int) -> None:
        super().reset(env_index, obs, seed)
        self.log[int(seed)] = {"action": [], "new_chunk": [], "held": []}

    def act(self, obs, env_indices):
        before = [self._counts(i) for i in env_indices]
        actions = super().act(obs, env_indices)
        for row, (i, (chunks, holds)) in enumerate(zip(env_indices, before, strict=True)):
            after_chunks, after_holds = self._counts(i)
            log = self.log[self.current[i].seed]
            log["action"].append(actions[row].copy())
            log["new_chunk"].append(after_chunks > chunks)
            log["held"].append(after_holds > holds)
        return actions

    def _counts(self, env_index: int) -> tuple[int, int]:
        stats = self.executors[env_index].stats
        return stats.chunks, sum(stats.held.values())


@dataclass
class Cell:
    blend: str
    delay: float
    successes: int
    episodes: int
    mean_length: float
    boundary_jump: float
    boundary_jerk: float
    inside_jerk: float
    smoothness: float
    takeovers: int
    holds: int
    inference_ms: float
    wall_s: float


def step_metrics(log: dict[str, list]) -> dict[str, list[float]]:
    """Per-step jumps and jerks of one episode, split as in DEFINITIONS."""
    a = np.asarray(log["action"])[:, POSITION]
    new, held = np.asarray(log["new_chunk"]), np.asarray(log["held"])
    takeover = new.copy()
    first = np.flatnonzero(new)
    if first.size:
        takeover[first[0]] = False
    out: dict[str, list[float]] = {"bjump": [], "bjerk": [], "ijerk": [], "jump": []}
    for t in range(1, len(a)):
        jump = float(np.linalg.norm(a[t] - a[t - 1]))
        if not (held[t] or held[t - 1]):
            out["jump"].append(jump)
        if takeover[t]:
            out["bjump"].append(jump)
        if t < 2:
            continue
        jerk = float(np.linalg.norm(a[t] - 2 * a[t - 1] + a[t - 2]))
        if takeover[t]:
            out["bjerk"].append(jerk)
        elif not takeover[t - 1] and not held[t - 2 : t + 1].any():
            out["ijerk"].append(jerk)
    return out


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def run_cell(vec: VectorTask, policy, spec, blend: str, delay: float, seeds: list[int]) -> Cell:
    runner = RecordingExecutorPolicy(policy, spec, blend=blend, inference_delay=delay)
    start = time.perf_counter()
    results = [r for _, r in iter_episodes(vec, iter(seeds), runner)]
    wall = time.perf_counter() - start
    pooled: dict[str, list[float]] = {"bjump": [], "bjerk": [], "ijerk": [], "jump": []}
    for seed in seeds:
        for key, values in step_metrics(runner.log[seed]).items():
            pooled[key] += values
    stats = runner.episode_stats.values()
    inference = [s for e in stats for s in e.inference_seconds]
    return Cell(
        blend=blend,
        delay=delay,
        successes=sum(r.success for r in results),
        episodes=len(results),
        mean_length=float(np.mean([r.length for r in results])),
        boundary_jump=mean(pooled["bjump"]),
        boundary_jerk=mean(pooled["bjerk"]),
        inside_jerk=mean(pooled["ijerk"]),
        smoothness=mean(pooled["jump"]),
        takeovers=len(pooled["bjerk"]),
        holds=sum(sum(e.executor.held.values()) for e in stats),
        inference_ms=1000 * mean(inference),
        wall_s=wall,
    )


def table(cells: list[Cell]) -> str:
    base = next(c for c in cells if c.blend == "none" and c.delay == 0.0)
    lines = [
        "| blend | delay ms | success | 95% CI | mean length | boundary jump "
        "| boundary jerk (x base) | inside jerk | boundary / inside | smoothness (x base) "
        "| take-overs | holds | inference ms | wall s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        lo, hi = wilson_interval(c.successes, c.episodes)
        lines.append(
            f"| {c.blend} | {1000 * c.delay:.0f} | {c.successes}/{c.episodes} | {lo:.2f}-{hi:.2f} "
            f"| {c.mean_length:.1f} | {c.boundary_jump:.3f} "
            f"| {c.boundary_jerk:.3f} ({c.boundary_jerk / base.boundary_jerk:.2f}) "
            f"| {c.inside_jerk:.3f} | {c.boundary_jerk / c.inside_jerk:.2f} "
            f"| {c.smoothness:.3f} ({c.smoothness / base.smoothness:.2f}) "
            f"| {c.takeovers} | {c.holds} | {c.inference_ms:.0f} | {c.wall_s:.0f} |"
        )
    return "\n".join(lines)


def plot(cells: list[Cell], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("success rate", lambda c: c.successes / c.episodes),
        ("boundary jerk (position dims)", lambda c: c.boundary_jerk),
        ("smoothness: mean |a_t - a_t-1|", lambda c: c.smoothness),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.8))
    for ax, (label, value) in zip(axes, panels, strict=True):
        for blend in BLENDS:
            row = [c for c in cells if c.blend == blend]
            ax.plot([1000 * c.delay for c in row], [value(c) for c in row], marker="o", label=blend)
        ax.set_xlabel("simulated inference delay (ms)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="tests/assets/lift_flow")
    parser.add_argument("--task", default="lift")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--delays-ms", type=float, nargs="+", default=[0.0, 50.0, 150.0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--results", default="docs/results/chunking.md")
    args = parser.parse_args(argv)

    if not Path(args.checkpoint, "spec.json").exists():
        raise SystemExit(
            f"bench/chunking.py needs a trained checkpoint at {args.checkpoint} (the default, "
            "tests/assets/lift_flow, ships with the repository); make one with\n"
            "  robomosaic-collect task=lift episodes=100 out=demos/lift.zarr\n"
            "  robomosaic-train dataset=demos/lift.zarr out=runs/lift_ddpm\n"
            "or pass --checkpoint <dir>"
        )
    torch.set_num_threads(1)
    policy = load_policy(args.checkpoint)
    spec = task_spec(args.task, (), 84)
    seeds = [1_000_000 + i for i in range(args.episodes)]
    delays = [d / 1000 for d in args.delays_ms]
    load_before = os.getloadavg()
    cells = []
    start = time.perf_counter()
    with VectorTask(args.task, args.workers) as vec:
        for delay in delays:
            for blend in BLENDS:
                cell = run_cell(vec, policy, spec, blend, delay, seeds)
                cells.append(cell)
                print(
                    f"{blend:8s} {1000 * delay:4.0f} ms: {cell.successes}/{cell.episodes} success, "
                    f"boundary jerk {cell.boundary_jerk:.3f}, inside {cell.inside_jerk:.3f}, "
                    f"smoothness {cell.smoothness:.3f} ({cell.wall_s:.0f} s)",
                    flush=True,
                )
    total = time.perf_counter() - start
    print(table(cells))

    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    png = results.with_suffix(".png")
    plot(cells, png, f"{args.task}: {args.checkpoint}, {args.episodes} seeds per cell")
    command = shlex.join([".venv/bin/python", "bench/chunking.py", *(argv or sys.argv[1:])])
    load_after = os.getloadavg()
    results.write_text(
        f"# Chunk execution: naive switching vs temporal ensembling vs real-time chunking\n\n"
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- machine: {machine()}\n"
        f"- load average (1/5/15 min) before: {load_before[0]:.2f} {load_before[1]:.2f} "
        f"{load_before[2]:.2f}; after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}\n"
        f"- command: `{command}` ({total:.0f} s)\n"
        f"- policy: `{args.checkpoint}` (horizon {policy.horizon}, n_obs_steps {policy.n_obs_steps}, "
        f"n_action_steps {policy.n_action_steps}); task `{args.task}`, {args.episodes} evaluation seeds "
        f"{seeds[0]}..{seeds[-1]} in every cell, {args.workers} simulator workers, 1 torch thread; "
        f"delays are simulated time (`DelayedInference`), so they do not depend on this machine's speed\n\n"
        f"![boundary jerk and success vs delay]({png.name})\n\n"
        f"{table(cells)}\n\n## Definitions\n\n{DEFINITIONS}"
    )
    print(f"wrote {results} and {png}")


if __name__ == "__main__":
    main()
