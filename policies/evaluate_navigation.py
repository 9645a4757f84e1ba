"""Navigation evaluation: a trained chunk policy (or the route expert) on each embodiment.

    robomosaic-eval checkpoint=runs/mobility/base/best task=nav task.embodiment=kaya episodes=200
    evaluate_navigation("runs/mobility/base/best", ["carter", "kaya"], episodes=200)

The policy runs through `ExecutorPolicy`, the shared chunk executor that `robomosaic-eval` and the
ROS 2 policy node use, on a simulated clock at the environment's 10 Hz: an episode samples from a
stream seeded by (seed, episode seed) and depends on nothing else, so the number of worlds stepped
together does not change a result. Seeds seed_offset, seed_offset + 1, ... give the same worlds,
starts and goals on every embodiment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from robomosaic.policies.rollout import ChunkPolicy, ExecutorPolicy, warm_up
from robomosaic.sim.mobility.env import MobilityEnv
from robomosaic.sim.mobility.rollout import RouteExpertPolicy, run_navigation, summarize
from robomosaic.sim.vector import Policy

EXPERT = "expert"


def evaluate_navigation(
    policy_or_checkpoint: ChunkPolicy | str | Path,
    embodiments: Sequence[str],
    episodes: int = 200,
    seed_offset: int = 1_000_000,
    worlds: int = 16,
    seed: int = 0,
    n_action_steps: int | None = None,
    backend: str = "auto",
    torch_threads: int | None = 1,
    families: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Success, collision and weighted travel time per embodiment (json-ready), on seeds
    seed_offset .. seed_offset + episodes - 1. `policy_or_checkpoint="expert"` runs the route expert."""
    from robomosaic.policies.evaluate import EvaluationError, check_spec, load_checkpoint

    if episodes < 1 or worlds < 1:
        raise EvaluationError(f"episodes and worlds must be >= 1, got {episodes}, {worlds}")
    checkpoint = None
    policy = policy_or_checkpoint
    if isinstance(policy_or_checkpoint, (str, Path)) and str(policy_or_checkpoint) != EXPERT:
        policy, spec_json = load_checkpoint(policy_or_checkpoint, backend)
        checkpoint = {"path": str(policy_or_checkpoint), "task": spec_json.get("task")}
        if spec_json.get("task") != "nav":
            raise EvaluationError(
                f"{policy_or_checkpoint}: trained on task {spec_json.get('task')!r}, not nav"
            )
    threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        if str(policy) != EXPERT:
            warm_up(policy)

        def runner(env: MobilityEnv) -> Policy:
            if str(policy) == EXPERT:
                return RouteExpertPolicy(env)
            check_spec(policy, env.spec)
            return ExecutorPolicy(policy, env.spec, n_action_steps=n_action_steps, seed=seed, gripper_dims=())

        results = evaluate_runner(runner, embodiments, episodes, seed_offset, worlds, families, progress)
    finally:
        torch.set_num_threads(threads)
    return {
        "checkpoint": checkpoint,
        "policy": EXPERT if str(policy) == EXPERT else type(policy).__name__,
        "seed_offset": seed_offset,
        "seed": seed,
        "embodiments": results,
    }


def evaluate_runner(
    make_runner: Callable[[MobilityEnv], Policy],
    embodiments: Sequence[str],
    episodes: int = 200,
    seed_offset: int = 1_000_000,
    worlds: int = 16,
    families: Sequence[str] | None = None,
    progress: bool = True,
    label: str = "nav",
) -> dict[str, Any]:
    """{embodiment: summary} of the `Policy` that `make_runner(env)` builds for each embodiment's
    worlds, on seeds seed_offset .. seed_offset + episodes - 1 (`evaluate_navigation`'s loop)."""
    results: dict[str, Any] = {}
    for name in embodiments:
        start = time.perf_counter()
        kwargs = {"families": tuple(families)} if families else {}
        env = MobilityEnv([name] * min(worlds, episodes), **kwargs)
        runner = make_runner(env)
        seeds = range(seed_offset, seed_offset + episodes)
        with tqdm(total=episodes, desc=f"{label} {name}", unit="episode", disable=not progress) as bar:
            done = list(run_navigation(env, seeds, runner, on_episode=lambda _: bar.update()))
        done.sort(key=lambda e: e.seed)
        results[name] = {
            **summarize(done),
            "seconds": time.perf_counter() - start,
            "by_family": {
                f: summarize([e for e in done if e.family == f]) for f in sorted({e.family for e in done})
            },
            "episodes_list": [
                {k: getattr(e, k) for k in ("seed", "success", "collision", "time", "family")} for e in done
            ],
        }
    return results


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per embodiment of an `evaluate_navigation` report."""
    lines = []
    for name, r in report["embodiments"].items():
        lo, hi = r["success_interval"]
        lines.append(
            f"{name}: success {r['success_rate']:.1%} ({lo:.1%}-{hi:.1%}), "
            f"collision {r['collision_rate']:.1%}, weighted travel time "
            f"{r['weighted_travel_time']:.1f} s over {r['episodes']} episodes"
        )
    return lines
