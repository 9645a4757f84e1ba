"""Throughput of the batched navigation environment: world steps per second, scan included.

Every world steps with the route expert's command (computed outside the timed region) and a world
whose episode ends is reset on the next seed, as in RL training; "step" counts `MobilityEnv.step`
only, "with resets" adds the resets (a new world, two Dijkstra searches). Run it on an idle machine:

    .venv/bin/python bench/mobility_env.py --results docs/results/mobility_env.md
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from report import publish

from robomosaic.sim.measure_experts import machine
from robomosaic.sim.mobility.env import MobilityEnv
from robomosaic.sim.mobility.rollout import RouteExpertPolicy

TARGET = 5000  # steps/s with 64 worlds (issue 16)


def measure(embodiment: str, n_worlds: int, steps: int) -> dict[str, float]:
    env = MobilityEnv([embodiment] * n_worlds)
    expert = RouteExpertPolicy(env)
    obs = env.reset(range(n_worlds))
    next_seed = n_worlds
    step_time = reset_time = 0.0
    resets = 0
    worlds = list(range(n_worlds))
    for _ in range(steps):
        actions = expert.act([{k: v[i] for k, v in obs.items()} for i in worlds], worlds)
        start = time.perf_counter()
        obs, _, terminated, truncated, _ = env.step(actions)
        step_time += time.perf_counter() - start
        done = np.flatnonzero(terminated | truncated)
        if len(done):
            start = time.perf_counter()
            obs = env.reset_worlds(done, range(next_seed, next_seed + len(done)))
            reset_time += time.perf_counter() - start
            next_seed += len(done)
            resets += len(done)
    total = n_worlds * steps
    return {
        "step": total / step_time,
        "with_resets": total / (step_time + reset_time),
        "us_per_world_step": 1e6 * step_time / total,
        "ms_per_reset": 1e3 * reset_time / max(resets, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="batched steps per configuration")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    before = os.getloadavg()
    lines = [
        "| embodiment (rays) | worlds | steps/s (step) | steps/s (with resets) | us / world step "
        "| ms / reset | vs 5000 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for embodiment, rays in (("carter", 64), ("spot", 90)):
        for n_worlds in (1, 16, 64):
            m = measure(embodiment, n_worlds, args.steps)
            lines.append(
                f"| {embodiment} ({rays}) | {n_worlds} | {m['step']:,.0f} | {m['with_resets']:,.0f} | "
                f"{m['us_per_world_step']:.0f} | {m['ms_per_reset']:.1f} | "
                f"{m['with_resets'] / TARGET:.2f}x |"
            )
    after = os.getloadavg()
    text = "\n".join(
        [
            "# Navigation environment throughput",
            "",
            "`.venv/bin/python bench/mobility_env.py"
            + (f" --results {args.results}`" if args.results else "`"),
            "",
            f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, one process (numpy and MuJoCo "
            "on one core)",
            f"- load average before: {' '.join(f'{v:.2f}' for v in before)}, after: "
            f"{' '.join(f'{v:.2f}' for v in after)}",
            f"- {args.steps} batched steps per row; the last column is 'with resets' against the target of "
            f"{TARGET} steps/s at 64 worlds",
            "",
            *lines,
            "",
        ]
    )
    publish(text, args.results)


if __name__ == "__main__":
    main()
