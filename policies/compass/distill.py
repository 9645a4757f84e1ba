"""COMPASS stage 3: the specialists' rollouts, recorded for offline distillation into one
cross-embodiment generalist, and how closely the generalist follows each specialist.

    record_teachers({"kaya": lambda env: kaya.policy(env.n), ...}, "rollouts.zarr", episodes=500)
    agreement(teacher, student, "kaya", seeds=range(2_000_000, 2_000_020))

The generalist itself is one of our denoising policies, trained by `robomosaic-train` on the
recorded store with `GENERALIST_OBS_KEYS`: the navigation observation plus the embodiment one-hot
(`sim/mobility/embodiments.py`), which every recorded step carries. COMPASS distils into a Gaussian
MLP head with a KL loss; a flow-matching chunk policy fits the same role here and is saved, loaded
and run (ROS 2 node, executor) like every other policy.

Only successful episodes are kept: the generalist imitates what a specialist does when it works.
Each (training seed, embodiment) records on its own seed range, `DISTILL_SEEDS` +
(seed * n_teachers + k) * `SEEDS_PER_TEACHER` + i, apart from the base's demonstrations (0 on),
evaluation (1_000_000 on) and RL training (50_000_000 on); below 1e6 because each step's `state`
records its seed and stores bound every value by 1e6.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from robomosaic.data.collect import CollectSummary, navigation_episodes, store_episodes
from robomosaic.data.store import EpisodeStore
from robomosaic.sim.mobility.env import EMBODIMENT_KEY, OBS_SPEC, MobilityEnv
from robomosaic.sim.mobility.rollout import navigation_dataset_spec, run_navigation
from robomosaic.sim.vector import Obs, Policy

GENERALIST_OBS_KEYS = [*OBS_SPEC, EMBODIMENT_KEY]
DISTILL_SEEDS = 500_000
SEEDS_PER_TEACHER = 10_000
ATTEMPTS_PER_EPISODE = 5  # a teacher tries at most 5x as many episodes as are wanted from it

MakePolicy = Callable[[MobilityEnv], Policy]


class DistillError(RuntimeError):
    """Recording was interrupted before every teacher's episodes were stored."""


def teacher_seeds(seed: int, k: int, n_teachers: int) -> range:
    """The episode seeds of teacher `k` (of `n_teachers`) for training seed `seed`."""
    start = DISTILL_SEEDS + (seed * n_teachers + k) * SEEDS_PER_TEACHER
    if start + SEEDS_PER_TEACHER > 1_000_000:
        raise ValueError(f"seed={seed} with {n_teachers} teachers runs past the distillation seed range")
    return range(start, start + SEEDS_PER_TEACHER)


def record_teachers(
    teachers: Mapping[str, MakePolicy],
    out: str | Path,
    episodes: int,
    worlds: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """`episodes` successful episodes of each teacher (embodiment -> a function building its policy
    over an environment's worlds) on its own embodiment, appended to the store `out`, within
    `ATTEMPTS_PER_EPISODE` times as many attempts (a weak teacher records fewer, with a warning).
    Resumable: a teacher's episodes already in the store count. Returns {embodiment: what this run
    recorded}."""
    names = list(teachers)
    spec = navigation_dataset_spec(MobilityEnv(names))
    store = EpisodeStore.open_or_create(out, spec)
    taken = {int(s) for s in store.meta_array("seed")}
    report: dict[str, dict[str, Any]] = {}
    for k, (embodiment, make_policy) in enumerate(teachers.items()):
        seeds = teacher_seeds(seed, k, len(names))
        have = sum(s in taken for s in seeds)
        summary = CollectSummary(out=str(out), store_episodes=store.n_episodes)
        if have < episodes:
            wanted = episodes - have
            env = MobilityEnv([embodiment] * max(1, min(worlds, wanted)))
            free = islice((s for s in seeds if s not in taken), ATTEMPTS_PER_EPISODE * wanted)
            recorded = navigation_episodes(
                env, free, make_policy(env), lambda w=wanted, c=summary: w - c.stored
            )
            store_episodes(store, recorded, wanted, False, summary, f"teacher {embodiment}", progress)
            if summary.interrupted:
                raise DistillError(f"{out}: interrupted while recording {embodiment}'s episodes")
            if summary.stored < wanted:
                warnings.warn(
                    f"{out}: the {embodiment} teacher succeeded in {summary.successes} of its "
                    f"{summary.attempted} attempts; {have + summary.stored} of {episodes} episodes stored",
                    stacklevel=2,
                )
        report[embodiment] = {
            "episodes": have + summary.stored,
            "recorded": summary.stored,
            "attempted": summary.attempted,
            "successes": summary.successes,
        }
    return report


class _Shadow:
    """Drives with `teacher`; asks `student` for its action on the same observations, unused."""

    def __init__(self, teacher: Policy, student: Policy) -> None:
        self.teacher, self.student = teacher, student
        self.teacher_actions: list[np.ndarray] = []
        self.student_actions: list[np.ndarray] = []

    def reset(self, env_index: int, obs: Obs, seed: int) -> None:
        self.teacher.reset(env_index, obs, seed)
        self.student.reset(env_index, obs, seed)

    def act(self, obs: Sequence[Obs], env_indices: Sequence[int]) -> np.ndarray:
        action = np.asarray(self.teacher.act(obs, env_indices))
        self.teacher_actions.append(action)
        self.student_actions.append(np.asarray(self.student.act(obs, env_indices)))
        return action


def agreement(
    teacher: MakePolicy, student: MakePolicy, embodiment: str, seeds: Sequence[int], worlds: int = 16
) -> dict[str, Any]:
    """How closely `student` follows `teacher` on the teacher's own episodes (the teacher drives,
    the student sees the same observations): per command dimension (vx, vy, yaw rate) the mean and
    95th percentile of |student - teacher|, beside the mean |teacher| for scale."""
    env = MobilityEnv([embodiment] * max(1, min(worlds, len(seeds))))
    shadow = _Shadow(teacher(env), student(env))
    episodes = list(run_navigation(env, seeds, shadow))
    ours, theirs = np.concatenate(shadow.student_actions), np.concatenate(shadow.teacher_actions)
    error = np.abs(ours - theirs)
    return {
        "embodiment": embodiment,
        "episodes": len(episodes),
        "teacher_success_rate": float(np.mean([e.success for e in episodes])),
        "steps": len(error),
        "abs_error_mean": error.mean(axis=0).tolist(),
        "abs_error_p95": np.percentile(error, 95, axis=0).tolist(),
        "teacher_abs_mean": np.abs(theirs).mean(axis=0).tolist(),
    }
