"""robomosaic-collect: record demonstrations of a task into a zarr episode store.

    robomosaic-collect task=lift device=scripted episodes=50 out=demos/lift.zarr
                       [keep_failed=false] [seed=0] [workers=2] [task.cameras=[agentview] task.image_size=84]

Devices: `scripted` runs the task's expert (`robomosaic.sim.experts.<task>`) in simulator worker
processes (for `task=nav`, the route expert in `workers` worlds of one batched navigation environment,
`robomosaic.sim.mobility`, on `task.embodiment`);
`keyboard` and `spacemouse` are robosuite's teleoperation devices (`data/devices.py`).

Every step records each observation key of the task (the observation before the action), `action`,
`reward` (after the action) and `state`, the flattened simulator state before the action, from
which `robomosaic-replay` restarts an episode. Each episode records its seed, success, task,
behaviour and duration (steps / control rate, seconds).

Episodes are appended to the store one by one as they finish, so an interrupted or killed run keeps
every finished episode (the store's append is atomic). An existing store is appended to after its
schema is checked against the task's. Seeds run consecutively from `seed`, skipping the seeds the
store already holds, so running the same command twice adds new episodes instead of duplicates.

Cameras are rendered live during collection rather than re-rendered afterwards from the stored
states: robosuite's observations during a step lag the state by one physics substep, so frames
rendered from states would differ slightly from what a policy sees when it is evaluated, and live
recording keeps training and evaluation images identical. It costs rendering time (about 9 steps/s
with two 84x84 cameras against 45 without, per worker).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from robomosaic.conf.console import console_script
from robomosaic.data.spec import DatasetSpec, KeySpec
from robomosaic.data.store import EpisodeStore

Episode = tuple[dict[str, np.ndarray], dict[str, Any]]


@dataclass
class CollectSummary:
    out: str
    stored: int = 0  # episodes appended by this run
    attempted: int = 0  # episodes run to the end by this run
    successes: int = 0
    dropped: int = 0  # failed episodes not stored (keep_failed=false)
    interrupted: bool = False
    store_episodes: int = 0  # episodes in the store after this run
    seconds: float = 0.0

    def text(self) -> str:
        rate = f"{self.successes}/{self.attempted} succeeded" if self.attempted else "no episode finished"
        why = " (interrupted)" if self.interrupted else ""
        dropped = f", {self.dropped} failed episodes dropped" if self.dropped else ""
        return (
            f"collected {self.stored} episodes into {self.out} in {self.seconds:.0f} s{why}: "
            f"{rate}{dropped}; the store now holds {self.store_episodes} episodes"
        )


def dataset_spec(task: Any) -> DatasetSpec:
    """What collection records for `task`: its observations, action, reward and simulator state."""
    keys = dict(task.spec.obs)
    keys["action"] = task.spec.action
    keys["reward"] = KeySpec((), "float32", description="reward (shaped) after the action")
    keys["state"] = KeySpec(
        task.get_state().shape,
        "float64",
        description="flattened MuJoCo state (time, qpos, qvel) before the action",
    )
    return DatasetSpec(
        keys=keys,
        control_hz=task.spec.control_hz,
        robot=task.spec.robot,
        controller=task.spec.controller,
        task=task.spec.name,
    )


def free_seeds(start: int, taken: set[int]) -> Iterator[int]:
    """Seeds start, start+1, ... that are not in `taken`."""
    return (s for s in count(start) if s not in taken)


def _task_kwargs(cfg: DictConfig) -> dict[str, Any]:
    return {
        "cameras": tuple(cfg.task.cameras),
        "image_size": int(cfg.task.image_size),
        "max_steps": cfg.task.max_steps,
    }


@contextmanager
def _ctrl_c_after() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, so that an episode that finished is also stored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def _scripted_episodes(
    cfg: DictConfig, seeds: Iterator[int], budget: int, wanted_more: Callable[[], int]
) -> Iterator[Episode]:
    """Run the task's expert in `cfg.workers` processes, yielding each episode as it ends.

    A new episode starts while fewer than `wanted_more()` are running and `budget` attempts are left.
    """
    from robomosaic.sim.vector import ExpertPolicy, VectorTask, iter_episodes

    policy = ExpertPolicy(cfg.task.name)
    n_envs = max(1, min(int(cfg.workers), budget, wanted_more()))
    with VectorTask(cfg.task.name, n_envs, **_task_kwargs(cfg)) as vec:
        attempts = islice(seeds, budget)
        for _, result in iter_episodes(vec, attempts, policy, record=True, more=lambda n: n < wanted_more()):
            meta = {
                "seed": result.seed,
                "success": result.success,
                "task": cfg.task.name,
                "behaviour": result.behaviour,
                "duration": result.length / vec.spec.control_hz,
            }
            yield result.trajectory, meta


def navigation_episodes(
    env: Any, seeds: Iterable[int], policy: Any, wanted_more: Callable[[], int] | None = None
) -> Iterator[Episode]:
    """`policy` (any `robomosaic.sim.vector.Policy`: the route expert, a specialist) driving the
    worlds of the `MobilityEnv` `env` on `seeds`, each episode recorded as it ends, until
    `wanted_more()` reaches 0 (or the caller stops)."""
    from robomosaic.sim.mobility.rollout import run_navigation

    for episode in run_navigation(env, seeds, policy, record=True):
        meta = {
            "seed": episode.seed,
            "success": episode.success,
            "task": env.spec.name,
            "behaviour": f"{episode.embodiment}/{episode.family}",
            "duration": episode.time,
        }
        yield episode.trajectory, meta
        if wanted_more is not None and wanted_more() <= 0:
            return


def _navigation_episodes(
    cfg: DictConfig, seeds: Iterator[int], budget: int, wanted_more: Callable[[], int]
) -> Iterator[Episode]:
    """Run the route expert in `cfg.workers` worlds of one batched navigation environment."""
    from robomosaic.sim.mobility.rollout import RouteExpertPolicy

    env = _navigation_env(cfg, max(1, min(int(cfg.workers), budget)))
    return navigation_episodes(env, islice(seeds, budget), RouteExpertPolicy(env), wanted_more)


def _navigation_env(cfg: DictConfig, n_worlds: int) -> Any:
    from robomosaic.sim.mobility.env import MAX_STEPS, MobilityEnv

    max_steps = cfg.task.max_steps or MAX_STEPS
    return MobilityEnv([cfg.task.embodiment] * n_worlds, tuple(cfg.task.families), int(max_steps))


def _teleop_episodes(cfg: DictConfig, task: Any, device: Any, seeds: Iterator[int]) -> Iterator[Episode]:
    from robomosaic.data.devices import open_viewer, teleop_episode

    with open_viewer(task) as viewer:
        for seed in seeds:
            episode = teleop_episode(task, device, viewer, seed, cfg.device.max_fr)
            if episode is None:  # the viewer window was closed
                return
            yield episode


def collect(cfg: DictConfig, progress: bool = True) -> CollectSummary:
    """Record `cfg.episodes` episodes (see the module docstring); Ctrl-C stops after storing what finished."""
    from robomosaic.sim.tasks import make_task

    started = time.time()
    navigation = cfg.task.name == "nav"
    if navigation and cfg.device.name != "scripted":
        raise SystemExit(
            f"robomosaic-collect: task=nav records the route expert (device=scripted) only, "
            f"not device={cfg.device.name}"
        )
    if cfg.device.name != "scripted":
        from robomosaic.data.devices import require_display

        require_display(cfg.device.name)
    if navigation:
        from robomosaic.sim.mobility.rollout import navigation_dataset_spec

        task, spec = None, navigation_dataset_spec(_navigation_env(cfg, 1))
    else:
        task = make_task(cfg.task.name, **_task_kwargs(cfg))
        spec = dataset_spec(task)
    if cfg.device.name != "scripted":
        from robomosaic.data.devices import open_device

        device = open_device(cfg.device, task.env)  # before touching the store: fails without hardware
    store = EpisodeStore.open_or_create(cfg.out, spec)
    seeds = free_seeds(int(cfg.seed), {int(s) for s in store.meta_array("seed")})
    wanted = int(cfg.episodes)
    summary = CollectSummary(out=str(cfg.out))
    if cfg.device.name == "scripted":
        budget = int(cfg.max_attempts) if cfg.get("max_attempts") else 3 * wanted
        if navigation:
            episodes = _navigation_episodes(cfg, seeds, budget, lambda: wanted - summary.stored)
        else:
            task.close()  # the workers build their own
            episodes = _scripted_episodes(cfg, seeds, budget, lambda: wanted - summary.stored)
    else:
        episodes = _teleop_episodes(cfg, task, device, seeds)
    try:
        store_episodes(
            store, episodes, wanted, bool(cfg.keep_failed), summary, f"collect {cfg.task.name}", progress
        )
    finally:
        if cfg.device.name != "scripted":
            task.close()
    summary.seconds = time.time() - started
    return summary


def store_episodes(
    store: EpisodeStore,
    episodes: Iterator[Episode],
    wanted: int,
    keep_failed: bool,
    summary: CollectSummary,
    desc: str,
    progress: bool = True,
) -> None:
    """Append `episodes` to `store` as they end until `wanted` are stored (failed ones only with
    `keep_failed`), counting into `summary`; Ctrl-C stops after storing what finished, and the
    generator is closed at the end (which stops its workers or viewer)."""
    bar = tqdm(total=wanted, desc=desc, unit="episode", disable=not progress)
    try:
        for data, meta in episodes:
            summary.attempted += 1
            summary.successes += bool(meta["success"])
            if meta["success"] or keep_failed:
                with _ctrl_c_after():
                    store.append_episode(data, meta)
                    summary.stored += 1
                bar.update()
            else:
                summary.dropped += 1
            bar.set_postfix(success=f"{summary.successes}/{summary.attempted}")
            if summary.stored >= wanted:
                break
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
        episodes.close()
    summary.store_episodes = store.n_episodes


@console_script("robomosaic-collect")
def main(argv: list[str]) -> None:
    from robomosaic.conf import compose

    cfg = compose("collect", argv)
    if int(cfg.episodes) < 1:
        raise SystemExit(f"robomosaic-collect: episodes={cfg.episodes}: must be at least 1")
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    try:
        summary = collect(cfg)
    except KeyError as e:  # an unknown task=
        raise SystemExit(f"robomosaic-collect: {e}") from None
    print(summary.text())
    if summary.interrupted:
        raise SystemExit(130)  # the shell's code for a run stopped by Ctrl-C
    if summary.stored < int(cfg.episodes):
        raise SystemExit(
            f"robomosaic-collect: only {summary.stored} of {cfg.episodes} episodes stored "
            f"({summary.attempted} attempted)"
        )


if __name__ == "__main__":
    main()
