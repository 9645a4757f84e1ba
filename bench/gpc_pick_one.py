"""AND / OR on `pick_one`: which cube each arm lifts *and* which cube it goes for, side by side.

Parent A is trained on the episodes that lift red or green, parent B on green or blue
(docs/results/gpc.md has the commands). AND (the product of their densities) should go for green,
the one cube both support; OR (their mixture) for all three. Lifting needs a precise grasp that
weak parents often miss, so besides the lifted cube (the task's `behaviour`) this counts the cube
each rollout *reaches*: the first one whose centre comes within `--reach` metres (horizontally)
of the end effector while the gripper is below `--height` metres above it. That measures what
the operators are about (the choice of mode) apart from how well the parents grasp.

Every rollout is deterministic in its seed, so the success counts equal those of
`robomosaic-compose` on the same report seeds:

    .venv/bin/python bench/gpc_pick_one.py runs/gpc/pick_a8k/best runs/gpc/pick_b8k/best \
        --episodes 100 --results docs/results/gpc_pick_one.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from report import publish

from robomosaic.policies.checkpoint import load_policy
from robomosaic.policies.composition import ComposedPolicy
from robomosaic.policies.rollout import ExecutorPolicy
from robomosaic.sim.envs.pick_one import COLOURS
from robomosaic.sim.measure_experts import machine, wilson_interval
from robomosaic.sim.tasks import make_task
from robomosaic.sim.vector import run_episodes

# `object` layout of PickOne (robomosaic/sim/envs/pick_one.py): gripper-to-cube vectors at 21:30.
GRIPPER_TO_CUBE = slice(21, 30)


def reached(object_state: np.ndarray, reach: float, height: float) -> str:
    """The first cube the gripper comes down on in one episode's object states (T, 30), or ""."""
    offsets = object_state[:, GRIPPER_TO_CUBE].reshape(len(object_state), len(COLOURS), 3)
    close = (np.linalg.norm(offsets[..., :2], axis=-1) < reach) & (-offsets[..., 2] < height)
    hits = np.argwhere(close)
    return COLOURS[hits[0, 1]] if len(hits) else ""


def shares(values: list[str]) -> str:
    counts = Counter(v for v in values if v)
    return ", ".join(f"{c} {counts[c]}" for c in COLOURS) + f", none {sum(1 for v in values if not v)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="parent A (red or green)")
    parser.add_argument("b", type=Path, help="parent B (green or blue)")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed-offset", type=int, default=1_000_000)
    parser.add_argument("--corrector-steps", type=int, default=0, help="AND's Langevin steps per level")
    parser.add_argument("--reach", type=float, default=0.03)
    parser.add_argument("--height", type=float, default=0.12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    a, b = load_policy(args.a), load_policy(args.b)
    arms = {
        "A (red or green)": a,
        "B (green or blue)": b,
        f"AND (1, 1), corrector {args.corrector_steps}": ComposedPolicy(
            [a, b], [1, 1], "and", corrector_steps=args.corrector_steps
        ),
        "OR (0.5, 0.5)": ComposedPolicy([a, b], [0.5, 0.5], "or"),
    }
    spec = make_task("pick_one").spec
    seeds = range(args.seed_offset, args.seed_offset + args.episodes)
    load_before = os.getloadavg()
    lines = [
        "| arm | lifted (success) | 95 % interval | lifted: red, green, blue | reached first: red, green, "
        "blue, none |",
        "|---|---|---|---|---|",
    ]
    for name, policy in arms.items():
        print(f"{name}: {args.episodes} rollouts", flush=True)
        results = run_episodes(
            "pick_one", seeds, ExecutorPolicy(policy, spec), n_envs=args.workers, record=True, progress=False
        )
        lifted = [r.behaviour for r in results]
        reach = [reached(r.trajectory["object"], args.reach, args.height) for r in results]
        k = sum(r.success for r in results)
        lo, hi = wilson_interval(k, len(results))
        counts = Counter(lifted)
        lines.append(
            f"| {name} | {k}/{len(results)} ({100 * k / len(results):.0f} %) | {lo:.3f}-{hi:.3f} | "
            f"{', '.join(str(counts[c]) for c in COLOURS)} | {shares(reach)} |"
        )
        print(lines[-1], flush=True)
    header = [
        "# GPC on pick_one: AND and OR of two parents that share one cube",
        "",
        f"`{shlex.join(['.venv/bin/python', 'bench/gpc_pick_one.py', *sys.argv[1:]])}`",
        "",
        f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, torch {torch.__version__}",
        f"- load average before: {' '.join(f'{x:.2f}' for x in load_before)}, after: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (no timing here)",
        f"- report seeds {seeds.start}..{seeds.stop - 1}; reached: the first cube within {args.reach} m "
        f"horizontally of the end effector with the gripper less than {args.height} m above it",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    publish(text, args.results)


if __name__ == "__main__":
    main()
