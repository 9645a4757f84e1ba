"""Multitask datasets: several single-task stores merged into one, conditioned on a task id.

    robomosaic-merge inputs=[demos/lift.zarr,demos/stack.zarr,demos/door.zarr,demos/pick_one.zarr] \
        out=demos/multitask.zarr

Tasks observe object states of different sizes (a cube, two cubes, a door), so one policy over all
of them sees `object` zero-padded to the largest size plus a `task_id` (the task's index in the
task set). `TaskSet` is that convention, stored in the merged dataset's spec (`extra["task_set"]`)
and in every checkpoint trained on it, and applied to a live task's observation at rollout time so
the policy sees what it was trained on. The simulator `state` key is dropped: its size differs per
task, and replaying an episode is a job for the single-task store it came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from robomosaic.conf.console import RobomosaicError, console_script
from robomosaic.data.spec import DatasetSpec, KeySpec
from robomosaic.data.store import EpisodeStore

TASK_ID = "task_id"
PADDED_KEY = "object"
DROPPED_KEYS = ("state",)


class MergeError(RobomosaicError, ValueError):
    """The input stores cannot be merged (named in the message)."""


@dataclass(frozen=True)
class TaskSet:
    """The tasks of a multitask policy, in task-id order, and the padded object-state size."""

    tasks: tuple[str, ...]
    object_dim: int

    def index(self, task: str) -> int:
        if task not in self.tasks:
            raise KeyError(f"task {task!r} is not in this policy's task set {list(self.tasks)}")
        return self.tasks.index(task)

    def adapt(self, obs: Mapping[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
        """A task's observation as the multitask policy sees it: padded object, task id added."""
        out = dict(obs)
        out[PADDED_KEY] = pad_last_axis(np.asarray(obs[PADDED_KEY]), self.object_dim, PADDED_KEY)
        out[TASK_ID] = np.int64(self.index(task))
        return out

    def adapt_spec(self, obs: Mapping[str, KeySpec]) -> dict[str, KeySpec]:
        """A task's observation spec as the multitask policy sees it (the specs of `adapt`)."""
        out = dict(obs)
        obj = obs[PADDED_KEY]
        out[PADDED_KEY] = KeySpec(
            (self.object_dim,), obj.dtype, obj.units, obj.frame, f"{obj.description}, zero-padded"
        )
        out[TASK_ID] = KeySpec((), "int64", description=f"index in the task set {list(self.tasks)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "object_dim": self.object_dim}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskSet:
        return cls(tuple(d["tasks"]), int(d["object_dim"]))


def pad_last_axis(x: np.ndarray, size: int, key: str) -> np.ndarray:
    if x.shape[-1] > size:
        raise ValueError(f"{key!r} has {x.shape[-1]} dims, more than the task set's {size}")
    pad = [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])]
    return np.pad(x, pad)


def merged_spec(stores: Sequence[EpisodeStore]) -> tuple[DatasetSpec, TaskSet]:
    """The merged store's spec; every input must share keys, control rate, robot and controller."""
    first = stores[0]
    tasks = [s.spec.task for s in stores]
    for store, task in zip(stores, tasks, strict=True):
        if not task:
            raise MergeError(f"{store.path}: its spec names no task; merge needs single-task stores")
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise MergeError(f"task(s) {duplicates} appear in more than one input store")
    keys = {k: v for k, v in first.spec.keys.items() if k not in DROPPED_KEYS}
    if PADDED_KEY not in keys:
        raise MergeError(f"{first.path}: has no {PADDED_KEY!r} key to pad")
    for store in stores[1:]:
        other = {k: v for k, v in store.spec.keys.items() if k not in DROPPED_KEYS}
        if set(other) != set(keys):
            raise MergeError(f"{store.path}: keys {sorted(other)} differ from {first.path}'s {sorted(keys)}")
        for field in ("control_hz", "robot", "controller"):
            if getattr(store.spec, field) != getattr(first.spec, field):
                raise MergeError(
                    f"{store.path}: {field} {getattr(store.spec, field)!r} differs from "
                    f"{first.path}'s {getattr(first.spec, field)!r}"
                )
        for key, spec in other.items():
            if key != PADDED_KEY and spec.shape != keys[key].shape:
                raise MergeError(
                    f"{store.path}: key {key!r} has shape {spec.shape}, {first.path}'s has {keys[key].shape}"
                )
    task_set = TaskSet(tuple(tasks), max(s.spec.keys[PADDED_KEY].shape[-1] for s in stores))
    spec = DatasetSpec(
        keys=task_set.adapt_spec(keys),
        control_hz=first.spec.control_hz,
        robot=first.spec.robot,
        controller=first.spec.controller,
        task="multitask",
        extra={"task_set": task_set.to_dict()},
    )
    return spec, task_set


def merge_stores(inputs: Sequence[str | Path], out: str | Path, progress: bool = True) -> EpisodeStore:
    """Write every episode of `inputs` (one task each) into a new multitask store at `out`."""
    if len(inputs) < 2:
        raise MergeError(f"merge needs at least two input stores, got {list(inputs)}")
    if Path(out).exists():
        raise MergeError(f"{out} already exists; remove it or choose another out=")
    stores = [EpisodeStore.open(p) for p in inputs]
    spec, task_set = merged_spec(stores)
    merged = EpisodeStore.create(out, spec)
    keys = [k for k in spec.keys if k != TASK_ID]
    total = sum(s.n_episodes for s in stores)
    with tqdm(total=total, desc="merge", unit="episode", disable=not progress) as bar:
        for store, task in zip(stores, task_set.tasks, strict=True):
            for i in range(store.n_episodes):
                data = store.episode(i, keys)
                length = len(data["action"])
                data[PADDED_KEY] = pad_last_axis(data[PADDED_KEY], task_set.object_dim, PADDED_KEY)
                data[TASK_ID] = np.full(length, task_set.index(task), np.int64)
                merged.append_episode(data, {**store.episode_meta(i), "task": task})
                bar.update(1)
    return merged


@console_script("robomosaic-merge")
def main(argv: list[str]) -> None:
    from robomosaic.conf import compose

    cfg = compose("merge", argv)
    merged = merge_stores(list(cfg.inputs), cfg.out, progress=cfg.progress)
    task_set = TaskSet.from_dict(merged.spec.extra["task_set"])
    print(
        f"merged {merged.n_episodes} episodes ({merged.n_steps} steps) of tasks {list(task_set.tasks)} "
        f"into {merged.path}; object padded to {task_set.object_dim} dims"
    )


if __name__ == "__main__":
    main()
