"""Vectorized rollouts: one `Task` per worker process, driven from the parent.

    with VectorTask("lift", n_envs=2) as vec:
        obs = vec.reset([0, 1])                              # list of observation dicts
        obs, rewards, terminated, truncated, infos = vec.step(actions)   # actions (n, 7)

    results = run_episodes("lift", seeds=range(100), policy=ExpertPolicy("lift"), n_envs=2)

Workers are fresh Python processes (never forked: torch and MuJoCo must not be forked after
initialisation) that import only the simulator and talk to the parent over sockets. A failure
inside a worker is re-raised in the parent as `WorkerError` carrying the worker's traceback, the
task and the seed.
With `n_envs=1` the task runs in the parent process (no workers), which is what tests and
debuggers want; both paths share `_execute`, so they behave the same.

The policy runs in the parent. In lock step it gets the observations of every running environment
at once, so a neural policy can batch its inference; asynchronously (`run_episodes`' default) each
environment is driven by a thread of its own; see `iter_episodes` and `Policy`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
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
    """A task living in a worker process: `python -m robomosaic.sim.vector <socket fd>`.

    Started as a plain subprocess rather than by multiprocessing's spawn, which imports the parent's
    `__main__` module in every worker: for the console scripts (robomosaic-eval, robomosaic-train)
    that is torch and the whole policy stack, 1.7 s of CPU per worker, as much as the task itself
    takes to build. The worker imports only the simulator, and talks over a socket pair with
    multiprocessing's `Connection` (pickled messages)."""

    def __init__(self, task_kwargs: dict[str, Any]) -> None:
        mine, theirs = socket.socketpair()
        with theirs:
            fd = theirs.fileno()
            command = [sys.executable, "-m", "robomosaic.sim.vector", str(fd)]
            self.process = subprocess.Popen(command, pass_fds=[fd])
        self.conn = Connection(mine.detach())
        self.conn.send(task_kwargs)
        self.closing = False

    def send(self, command: str, args: tuple = ()) -> None:
        self.conn.send((command, args))

    def receive(self) -> tuple[str, Any]:
        try:
            return self.conn.recv()
        except (EOFError, ConnectionResetError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=1)
            return "error", f"worker process exited unexpectedly (exit code {self.process.returncode})"

    def request_close(self) -> None:
        """Ask the worker to exit (`close` waits for it): all workers of a VectorTask exit at once."""
        if not self.closing and self.process.poll() is None:
            self.closing = True
            with contextlib.suppress(BrokenPipeError, OSError):
                self.conn.send(("close", ()))

    def close(self) -> None:
        self.request_close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=5)
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
        self._started = in_process
        self._spec: TaskSpec | None = None
        try:
            if in_process:
                self._envs.append(_LocalEnv(kwargs))
            else:
                self._envs = [_ProcessEnv(kwargs) for _ in range(n_envs)]
        except BaseException:
            self.close()
            raise

    @property
    def in_process(self) -> bool:
        return any(isinstance(env, _LocalEnv) for env in self._envs)

    @property
    def spec(self) -> TaskSpec:
        """The task's spec (from environment 0): the first use waits for the workers to start."""
        if self._spec is None:
            self._spec = self._call("spec", [()], [0])[0]
        return self._spec

    def _wait_started(self) -> None:
        """Workers build their tasks in the background (a second or two each): the constructor
        returns at once, so a caller can load its policy meanwhile; the first command waits here."""
        if self._started:
            return
        self._started = True
        try:
            for i, env in enumerate(self._envs):
                self._check(i, env.receive(), "starting")
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
            if isinstance(env, _ProcessEnv):
                env.request_close()
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
        self._wait_started()
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

    def advance(
        self,
        obs: Obs,
        action: np.ndarray,
        reward: float,
        state: np.ndarray | None,
        frame: np.ndarray | None,
        record: bool,
    ) -> None:
        """One step taken: `action` chosen on `obs` (at simulator `state`), then `frame` rendered."""
        self.length += 1
        if record:
            self.steps.append({**obs, "action": action, "reward": reward, "state": state})
        if frame is not None:
            self.frames.append(frame)


def iter_episodes(
    vec: VectorTask,
    seeds: Iterator[int],
    policy: Policy,
    record: bool = False,
    video_camera: str | None = None,
    video_size: int = 128,
    more: Callable[[int], bool] | None = None,
    asynchronous: bool = False,
) -> Iterator[tuple[int, EpisodeResult]]:
    """Run episodes on `vec`'s environments, yielding (index, result) as each one ends.

    `index` counts the seeds drawn from `seeds`. An environment that is free starts the next seed
    while `seeds` has one and `more(number of running episodes)` (if given) allows it: a recorder can
    stop starting episodes once enough have succeeded. `record` keeps the trajectory; `video_camera`
    keeps rendered frames (`video_size` pixels square) of that camera.

    Lock step (the default) steps every running environment, waits for all of them, then asks the
    policy for all their actions at once (it may batch them). `asynchronous` drives each environment
    from a thread of its own, so that the policy's work for one environment (its inference releases
    the GIL) runs while the others step, instead of between their steps. An episode still depends on
    its seed alone, if the policy keeps environments apart (`ExecutorPolicy` and `ExpertPolicy` do);
    only which environment runs which seed, and the order results arrive in, vary. With `more`,
    which seeds are started at all would vary too, so the two cannot be combined.
    """
    if asynchronous and more is not None:
        raise ValueError("iter_episodes: `more` needs lock step (asynchronous=False)")
    if asynchronous and not vec.in_process:  # one environment in this process: nothing to overlap
        yield from _iter_threaded(vec, seeds, policy, record, video_camera, video_size)
        return
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
        frames = vec.render(video_camera, video_size, indices) if video_camera else [None] * len(batch)
        for (i, index, seed), o, frame in zip(batch, first, frames, strict=True):
            policy.reset(i, o, seed)
            running[i] = (index, _Running(seed, time.perf_counter(), frames=[frame] if video_camera else []))
            obs[i] = o

    start(list(range(vec.n_envs)))
    while running:
        active = sorted(running)
        actions = _actions(policy, [obs[i] for i in active], active)
        states = vec.get_states(active) if record else [None] * len(active)
        next_obs, rewards, terminated, truncated, infos = vec.step(actions, active)
        frames = vec.render(video_camera, video_size, active) if video_camera else [None] * len(active)
        finished = []
        for k, i in enumerate(active):
            running[i][1].advance(obs[i], actions[k], rewards[k], states[k], frames[k], record)
            obs[i] = next_obs[k]
            if terminated[k] or truncated[k]:
                index, episode = running.pop(i)
                finished.append(i)
                yield index, _finish(episode, infos[k], record)
        if finished:
            start(finished)


def _actions(policy: Policy, obs: Sequence[Obs], env_indices: Sequence[int]) -> np.ndarray:
    # Actions are stored as float32 (the task's action spec): step with exactly what is recorded.
    return np.asarray(policy.act(obs, env_indices), dtype=np.float32)


def _iter_threaded(
    vec: VectorTask,
    seeds: Iterator[int],
    policy: Policy,
    record: bool,
    video_camera: str | None,
    video_size: int,
) -> Iterator[tuple[int, EpisodeResult]]:
    """`iter_episodes(asynchronous=True)`: one thread per environment runs episode after episode
    (each talks only to its own worker), and this generator yields their results as they end."""
    vec.spec  # noqa: B018 -- wait for the workers here, not in every thread at once
    lock, stop = threading.Lock(), threading.Event()
    done: queue.Queue[tuple[int, EpisodeResult] | BaseException | None] = queue.Queue()
    drawn = 0

    def next_seed() -> tuple[int, int] | None:
        nonlocal drawn
        with lock:
            seed = None if stop.is_set() else next(seeds, None)
            if seed is None:
                return None
            drawn += 1
            return drawn - 1, int(seed)

    def episode(i: int, seed: int) -> EpisodeResult:
        (o,) = vec.reset([seed], [i])
        policy.reset(i, o, seed)
        frames = vec.render(video_camera, video_size, [i]) if video_camera else []
        running = _Running(seed, time.perf_counter(), frames=list(frames))
        while not stop.is_set():
            action = _actions(policy, [o], [i])
            state = vec.get_states([i])[0] if record else None
            (next_o,), rewards, terminated, truncated, (info,) = vec.step(action, [i])
            frame = vec.render(video_camera, video_size, [i])[0] if video_camera else None
            running.advance(o, action[0], rewards[0], state, frame, record)
            o = next_o
            if terminated[0] or truncated[0]:
                return _finish(running, info, record)
        raise RuntimeError("stopped")

    def run(i: int) -> None:
        try:
            while (item := next_seed()) is not None:
                done.put((item[0], episode(i, item[1])))
        except BaseException as e:  # re-raised by the generator below
            done.put(e)
        finally:
            done.put(None)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(vec.n_envs)]
    for t in threads:
        t.start()
    try:
        for _ in threads:
            while (item := done.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        stop.set()
        for t in threads:
            t.join()


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
    asynchronous: bool = True,
) -> list[EpisodeResult]:
    """Run one episode per seed on `n_envs` environments, each starting its next seed when done.

    Results come back in the order of `seeds` (see `iter_episodes` for `record`, `video_camera`
    and `asynchronous`, which lets the policy work while other environments step).
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        return []
    with VectorTask(task_name, max(1, min(n_envs, len(seeds))), cameras, image_size, max_steps) as vec:
        return episodes_on(vec, seeds, policy, record, video_camera, video_size, progress, asynchronous)


def episodes_on(
    vec: VectorTask,
    seeds: Sequence[int],
    policy: Policy,
    record: bool = False,
    video_camera: str | None = None,
    video_size: int = 128,
    progress: bool = True,
    asynchronous: bool = True,
) -> list[EpisodeResult]:
    """`run_episodes` on environments already started (a caller can start them, then load its
    policy while they build their tasks, and use them for several batches of seeds)."""
    from tqdm import tqdm

    results: dict[int, EpisodeResult] = {}
    with tqdm(total=len(seeds), desc=f"{vec.task_name} episodes", disable=not progress) as bar:
        for index, result in iter_episodes(
            vec, iter(seeds), policy, record, video_camera, video_size, asynchronous=asynchronous
        ):
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


if __name__ == "__main__":  # a worker started by `_ProcessEnv`
    with contextlib.suppress(KeyboardInterrupt, EOFError):
        connection = Connection(int(sys.argv[1]))
        _worker(connection, connection.recv())
    # The task is closed and nothing is left to save: skip the interpreter's teardown of robosuite,
    # numba and MuJoCo (~0.3 s per worker, which the parent waits for).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
