"""Vectorized rollouts: one `Task` per worker process, driven in lock step from the parent.

    with VectorTask("lift", n_envs=2) as vec:
        obs = vec.reset([0, 1])                              # list of observation dicts
        obs, rewards, terminated, truncated, infos = vec.step(actions)   # actions (n, 7)

    results = run_episodes("lift", seeds=range(100), policy=ExpertPolicy("lift"), n_envs=2)

Workers are started with the 'spawn' context (safe with torch and MuJoCo, which must not be
forked after initialisation) and talk to the parent over pipes. A failure inside a worker is
re-raised in the parent as `WorkerError` carrying the worker's traceback, the task and the seed.
With `n_envs=1` the task runs in the parent process (no workers), which is what tests and
debuggers want; both paths share `_execute`, so they behave the same.

The policy is called in the parent with the observations of every running environment at once,
so a neural policy can batch its inference; see `Policy`.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np

from robomosaic.sim.tasks import Task, TaskSpec

Obs = dict[str, np.ndarray]
StepResult = tuple[list[Obs], np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]


class WorkerError(RuntimeError):
    """A task raised inside a worker (or in-process environment); the message holds its traceback."""


def _execute(task: Task, command: str, args: tuple) -> Any:
    """Run one command on a task: the single implementation behind workers and in-process envs."""
    if command == "reset":
        return task.reset(*args)
    if command == "step":
        return task.step(*args)
    if command == "get_state":
        return task.get_state()
    if command == "set_state":
        return task.set_state(*args)
    if command == "render":
        return task.render(*args)
    if command == "spec":
        return task.spec
    raise ValueError(f"unknown command {command!r}")


def _worker(conn: Connection, task_kwargs: dict[str, Any]) -> None:
    """Worker process main loop: build the task, then answer commands until 'close'."""
    try:
        task = Task(**task_kwargs)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        conn.send(("ok", None))
        while True:
            command, args = conn.recv()
            if command == "close":
                break
            try:
                conn.send(("ok", _execute(task, command, args)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass  # the parent is gone or interrupted: leave quietly, it reports the cause
    finally:
        task.close()


class _ProcessEnv:
    """A task living in a worker process."""

    def __init__(self, ctx: mp.context.BaseContext, task_kwargs: dict[str, Any]) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, task_kwargs), daemon=True)
        self.process.start()
        child.close()

    def send(self, command: str, args: tuple = ()) -> None:
        self.conn.send((command, args))

    def receive(self) -> tuple[str, Any]:
        try:
            return self.conn.recv()
        except EOFError:
            return "error", f"worker process exited unexpectedly (exit code {self.process.exitcode})"

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self.conn.send(("close", ()))
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self.conn.close()


class _LocalEnv:
    """A task in the parent process behind the same send/receive interface as a worker."""

    def __init__(self, task_kwargs: dict[str, Any]) -> None:
        self.task = Task(**task_kwargs)
        self.reply: tuple[str, Any] = ("ok", None)

    def send(self, command: str, args: tuple = ()) -> None:
        try:
            self.reply = ("ok", _execute(self.task, command, args))
        except Exception:
            self.reply = ("error", traceback.format_exc())

    def receive(self) -> tuple[str, Any]:
        return self.reply

    def close(self) -> None:
        self.task.close()


class VectorTask:
    """`n_envs` copies of one task, stepped together; each can be reset to its own seed."""

    def __init__(
        self,
        task_name: str,
        n_envs: int,
        cameras: Sequence[str] = (),
        image_size: int = 84,
        max_steps: int | None = None,
        in_process: bool | None = None,
    ) -> None:
        if n_envs < 1:
            raise ValueError(f"n_envs must be at least 1, got {n_envs}")
        in_process = n_envs == 1 if in_process is None else in_process
        if in_process and n_envs != 1:
            raise ValueError(f"in_process needs n_envs=1, got n_envs={n_envs}")
        self.task_name = task_name
        self.n_envs = n_envs
        self.seeds: list[int | None] = [None] * n_envs
        kwargs = {"name": task_name, "cameras": tuple(cameras), "image_size": image_size}
        kwargs["max_steps"] = max_steps
        self._envs: list[_ProcessEnv | _LocalEnv] = []
        try:
            if in_process:
                self._envs.append(_LocalEnv(kwargs))
            else:
                ctx = mp.get_context("spawn")
                self._envs = [_ProcessEnv(ctx, kwargs) for _ in range(n_envs)]
                for i, env in enumerate(self._envs):
                    self._check(i, env.receive(), "starting")
            self.spec: TaskSpec = self._call("spec", [()] * n_envs, range(n_envs))[0]
        except BaseException:
            self.close()
            raise

    # -- batched API ------------------------------------------------------------------------------
    def reset(self, seeds: Sequence[int], env_indices: Sequence[int] | None = None) -> list[Obs]:
        """Reset the given environments (all by default) to one seed each; returns their observations."""
        indices = self._indices(env_indices)
        if len(seeds) != len(indices):
            raise ValueError(f"reset: {len(seeds)} seeds for {len(indices)} environments")
        for i, seed in zip(indices, seeds, strict=True):
            self.seeds[i] = int(seed)
        return self._call("reset", [(int(s),) for s in seeds], indices)

    def step(self, actions: np.ndarray, env_indices: Sequence[int] | None = None) -> StepResult:
        """Step the given environments (all by default), one action row each."""
        indices = self._indices(env_indices)
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[0] != len(indices):
            raise ValueError(f"step: actions have shape {actions.shape}, expected ({len(indices)}, 7)")
        results = self._call("step", [(a,) for a in actions], indices)
        obs, rewards, terminated, truncated, infos = zip(*results, strict=True)
        return list(obs), np.array(rewards), np.array(terminated), np.array(truncated), list(infos)

    def get_states(self, env_indices: Sequence[int] | None = None) -> list[np.ndarray]:
        indices = self._indices(env_indices)
        return self._call("get_state", [()] * len(indices), indices)

    def set_states(self, states: Sequence[np.ndarray], env_indices: Sequence[int] | None = None) -> list[Obs]:
        indices = self._indices(env_indices)
        return self._call("set_state", [(s,) for s in states], indices)

    def render(
        self, camera: str = "agentview", size: int | None = None, env_indices: Sequence[int] | None = None
    ) -> list[np.ndarray]:
        """RGB frames (uint8 HWC) from each environment's `camera`."""
        indices = self._indices(env_indices)
        return self._call("render", [(camera, size)] * len(indices), indices)

    def close(self) -> None:
        envs, self._envs = getattr(self, "_envs", []), []
        for env in envs:
            env.close()

    def __enter__(self) -> VectorTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------
    def _indices(self, env_indices: Sequence[int] | None) -> list[int]:
        if env_indices is None:
            return list(range(self.n_envs))
        indices = [int(i) for i in env_indices]
        bad = [i for i in indices if not 0 <= i < self.n_envs]
        if bad:
            raise IndexError(f"environment indices {bad} out of range for n_envs={self.n_envs}")
        return indices

    def _call(self, command: str, args: Sequence[tuple], indices: Iterable[int]) -> list[Any]:
        """Send one command to each environment first, then collect: workers run in parallel."""
        indices = list(indices)
        if not self._envs:
            raise RuntimeError(f"VectorTask({self.task_name!r}) is closed")
        for i, a in zip(indices, args, strict=True):
            self._envs[i].send(command, a)
        replies = [self._envs[i].receive() for i in indices]  # drain every pipe before raising
        return [self._check(i, reply, command) for i, reply in zip(indices, replies, strict=True)]

    def _check(self, index: int, reply: tuple[str, Any], command: str) -> Any:
        status, value = reply
        if status == "error":
            raise WorkerError(
                f"task {self.task_name!r}, environment {index} (seed {self.seeds[index]}) "
                f"failed in {command!r}:\n{value}"
            )
        return value


class Policy(Protocol):
    """What `run_episodes` drives: per-environment resets, batched actions.

    `reset(env_index, obs, seed)` is called whenever environment `env_index` starts an episode;
    `act(obs, env_indices)` gets the observations of the running environments (obs[k] belongs to
    env_indices[k]) and returns one action per row, shape (len(obs), 7).
    """

    def reset(self, env_index: int, obs: Obs, seed: int) -> None: ...

    def act(self, obs: Sequence[Obs], env_indices: Sequence[int]) -> np.ndarray: ...


class ExpertPolicy:
    """The scripted expert of a task as a `Policy`: one expert per environment, seeded per episode."""

    def __init__(self, task_name: str) -> None:
        from robomosaic.sim.experts import make_expert

        self.task_name = task_name
        make_expert(task_name)  # fail now, not in the middle of a rollout, if there is no expert
        self._make = make_expert
        self.experts: dict[int, Any] = {}

    def reset(self, env_index: int, obs: Obs, seed: int) -> None:
        expert = self.experts.setdefault(env_index, self._make(self.task_name))
        # A stream of its own, so that the expert's draws do not mirror the task's placement draws.
        expert.reset(obs, np.random.default_rng([seed, 1]))

    def act(self, obs: Sequence[Obs], env_indices: Sequence[int]) -> np.ndarray:
        return np.stack([self.experts[i](o) for o, i in zip(obs, env_indices, strict=True)])


@dataclass
class EpisodeResult:
    """One finished episode. `trajectory` (when recorded) holds per-step arrays of equal length T:
    every observation key (the observation the action was chosen on), `action`, `reward`, `state`
    (the simulator state at that observation); `frames` holds T + 1 video frames (with the last)."""

    seed: int
    success: bool
    length: int
    behaviour: str
    duration: float
    trajectory: dict[str, np.ndarray] | None = None
    frames: np.ndarray | None = None


@dataclass
class _Running:
    seed: int
    started: float
    length: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)


def iter_episodes(
    vec: VectorTask,
    seeds: Iterator[int],
    policy: Policy,
    record: bool = False,
    video_camera: str | None = None,
    video_size: int = 128,
    more: Callable[[int], bool] | None = None,
) -> Iterator[tuple[int, EpisodeResult]]:
    """Run episodes on `vec`'s environments, yielding (index, result) as each one ends.

    `index` counts the seeds drawn from `seeds`. An environment that is free starts the next seed
    while `seeds` has one and `more(number of running episodes)` (if given) allows it: a recorder can
    stop starting episodes once enough have succeeded. `record` keeps the trajectory; `video_camera`
    keeps rendered frames (`video_size` pixels square) of that camera.
    """
    running: dict[int, tuple[int, _Running]] = {}  # env index -> (seed index, episode)
    obs: dict[int, Obs] = {}
    drawn = 0

    def start(env_indices: list[int]) -> None:
        nonlocal drawn
        batch = []
        for i in env_indices:
            if more is not None and not more(len(running) + len(batch)):
                break
            seed = next(seeds, None)
            if seed is None:
                break
            batch.append((i, drawn, int(seed)))
            drawn += 1
        if not batch:
            return
        indices = [i for i, _, _ in batch]
        first = vec.reset([s for _, _, s in batch], indices)
        for (i, index, seed), o in zip(batch, first, strict=True):
            policy.reset(i, o, seed)
            running[i] = (index, _Running(seed, time.perf_counter()))
            obs[i] = o
        if video_camera:
            for i, frame in zip(indices, vec.render(video_camera, video_size, indices), strict=True):
                running[i][1].frames.append(frame)

    start(list(range(vec.n_envs)))
    while running:
        active = sorted(running)
        # Actions are stored as float32 (the task's action spec): step with exactly what is recorded.
        actions = np.asarray(policy.act([obs[i] for i in active], active), dtype=np.float32)
        states = vec.get_states(active) if record else [None] * len(active)
        next_obs, rewards, terminated, truncated, infos = vec.step(actions, active)
        frames = vec.render(video_camera, video_size, active) if video_camera else None
        finished = []
        for k, i in enumerate(active):
            episode = running[i][1]
            episode.length += 1
            if record:
                step = {**obs[i], "action": actions[k], "reward": rewards[k], "state": states[k]}
                episode.steps.append(step)
            if frames is not None:
                episode.frames.append(frames[k])
            obs[i] = next_obs[k]
            if terminated[k] or truncated[k]:
                index = running.pop(i)[0]
                finished.append(i)
                yield index, _finish(episode, infos[k], record)
        if finished:
            start(finished)


def run_episodes(
    task_name: str,
    seeds: Iterable[int],
    policy: Policy,
    n_envs: int = 1,
    cameras: Sequence[str] = (),
    image_size: int = 84,
    max_steps: int | None = None,
    record: bool = False,
    video_camera: str | None = None,
    video_size: int = 128,
    progress: bool = True,
) -> list[EpisodeResult]:
    """Run one episode per seed on `n_envs` environments, each starting its next seed when done.

    Results come back in the order of `seeds` (see `iter_episodes` for `record` and `video_camera`).
    """
    from tqdm import tqdm

    seeds = [int(s) for s in seeds]
    if not seeds:
        return []
    n_envs = max(1, min(n_envs, len(seeds)))
    results: dict[int, EpisodeResult] = {}
    with (
        VectorTask(task_name, n_envs, cameras, image_size, max_steps) as vec,
        tqdm(total=len(seeds), desc=f"{task_name} episodes", disable=not progress) as bar,
    ):
        for index, result in iter_episodes(vec, iter(seeds), policy, record, video_camera, video_size):
            results[index] = result
            bar.update(1)
            bar.set_postfix(success=f"{np.mean([r.success for r in results.values()]):.2f}")
    return [results[p] for p in range(len(seeds))]


def _finish(episode: _Running, info: dict[str, Any], record: bool) -> EpisodeResult:
    trajectory = None
    if record:
        trajectory = {k: np.stack([s[k] for s in episode.steps]) for k in episode.steps[0]}
        trajectory["action"] = trajectory["action"].astype(np.float32)
        trajectory["reward"] = trajectory["reward"].astype(np.float32)
    return EpisodeResult(
        seed=episode.seed,
        success=bool(info["success"]),
        length=episode.length,
        behaviour=str(info.get("behaviour", "")),
        duration=time.perf_counter() - episode.started,
        trajectory=trajectory,
        frames=np.stack(episode.frames) if episode.frames else None,
    )


def stack_obs(obs: Sequence[Obs]) -> dict[str, np.ndarray]:
    """A list of observation dicts as one dict of arrays with a leading batch axis."""
    return {k: np.stack([o[k] for o in obs]) for k in obs[0]}
