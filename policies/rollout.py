"""A chunk-predicting policy as a `robomosaic.sim.vector.Policy`, run through the shared executor.

    policy = ExecutorPolicy(load_policy("runs/lift/best"), task.spec, blend="ensemble", inference_delay=0.1)
    results = run_episodes("lift", seeds, policy, n_envs=2)
    policy.episode_stats[seed]      # holds, dropped actions, deadline misses, chunks, latencies

Each environment gets its own `ChunkExecutor` with `DelayedInference`, on a simulated clock
(time = step index / control_hz), so an inference delay is reproduced exactly and deterministically
whatever this machine's speed: evaluation in simulation runs the code a robot runs (docs/design.md).
Every episode samples from a torch.Generator seeded from (seed, episode seed), so a result depends
on the episode's seed only, not on the number of workers or the order episodes finish in.

The environments that replan in the same step get their chunks from one `predict_chunks` call
(a policy without one is called once per environment). A policy batches only where the batch is bit
for bit equal to the separate calls (`DenoisingPolicy.predict_chunks`): which environments happen to
replan together depends on the number of workers, and an episode's result must not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from robomosaic.data.spec import KeySpec
from robomosaic.policies.executor import (
    Blend,
    ChunkExecutor,
    DelayedInference,
    ExecutorConfig,
    ExecutorStats,
    hold_zero_motion,
)
from robomosaic.sim.tasks import TaskSpec

Obs = dict[str, np.ndarray]

# OSC delta actions: dimension 6 is the gripper, which keeps its last command during a hold
# (opening it would drop a grasped object).
OSC_GRIPPER_DIMS = (6,)


class ChunkPolicy(Protocol):
    """What `ExecutorPolicy` drives: `DenoisingPolicy` and anything shaped like it."""

    horizon: int
    n_obs_steps: int
    n_action_steps: int
    obs_spec: Mapping[str, KeySpec]

    def predict_chunk(
        self,
        history: Mapping[str, np.ndarray],
        committed: np.ndarray | None = None,
        generator: torch.Generator | None = None,
    ) -> np.ndarray: ...


@dataclass
class EpisodeStats:
    """One episode's executor statistics and the wall time of every `predict_chunk` call."""

    seed: int
    executor: ExecutorStats
    inference_seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        s = self.executor
        return {
            "held": dict(sorted(s.held.items())),
            "rejected_obs": s.rejected_obs,
            "rejected_chunks": s.rejected_chunks,
            "dropped_actions": s.dropped_actions,
            "deadline_misses": s.deadline_misses,
            "chunks": s.chunks,
            "inference_ms_mean": 1000 * float(np.mean(self.inference_seconds))
            if self.inference_seconds
            else None,
        }


def episode_generator(seed: int, episode_seed: int) -> torch.Generator:
    """The sampling noise stream of one episode: a function of both seeds only."""
    state = np.random.SeedSequence([int(seed), int(episode_seed)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class ExecutorPolicy:
    """Runs `policy` in every environment through its own `ChunkExecutor` (see module docstring)."""

    def __init__(
        self,
        policy: ChunkPolicy,
        task: TaskSpec,
        blend: Blend = "none",
        n_action_steps: int | None = None,
        inference_delay: float = 0.0,
        seed: int = 0,
        ensemble_decay: float = 0.01,
        gripper_dims: tuple[int, ...] = OSC_GRIPPER_DIMS,
        obs_adapter: Callable[[Obs], Obs] | None = None,
    ) -> None:
        """`obs_adapter` maps a task's observation to what the policy was trained on (a multitask
        policy's padded object state and task id: `robomosaic.data.multitask.TaskSet.adapt`)."""
        self.policy = policy
        self.obs_adapter = obs_adapter
        self.obs_keys = list(policy.obs_spec)
        self.action_dim = int(np.prod(task.action.shape))
        n_action_steps = int(n_action_steps or policy.n_action_steps)
        usable = policy.horizon - policy.n_obs_steps + 1
        if not 1 <= n_action_steps <= usable:
            raise ValueError(
                f"n_action_steps={n_action_steps} must be in [1, horizon - n_obs_steps + 1 = {usable}]"
            )
        if inference_delay < 0:
            raise ValueError(f"inference_delay must be >= 0 seconds, got {inference_delay}")
        bad = [d for d in gripper_dims if not 0 <= d < self.action_dim]
        if bad:
            raise ValueError(f"gripper_dims {bad} out of range for action_dim={self.action_dim}")
        self.config = ExecutorConfig(
            control_hz=task.control_hz,
            n_obs_steps=policy.n_obs_steps,
            n_action_steps=n_action_steps,
            blend=blend,
            ensemble_decay=ensemble_decay,
        )
        self.inference_delay = float(inference_delay)
        self.seed = int(seed)
        self.gripper_dims = tuple(gripper_dims)
        self.executors: dict[int, ChunkExecutor] = {}
        self.steps: dict[int, int] = {}
        self.current: dict[int, EpisodeStats] = {}
        self.generators: dict[int, torch.Generator] = {}
        self.prefetched: dict[int, np.ndarray] = {}  # chunks computed by `_prefetch` for this step
        self.episode_stats: dict[int, EpisodeStats] = {}  # by episode seed

    def reset(self, env_index: int, obs: Obs, seed: int) -> None:
        if env_index not in self.executors:
            self.executors[env_index] = ChunkExecutor(
                DelayedInference(self._predictor(env_index), self.inference_delay),
                self.config,
                self.action_dim,
                hold=lambda last: hold_zero_motion(last, self.action_dim, self.gripper_dims),
            )
        executor = self.executors[env_index]
        executor.reset()
        self.prefetched.pop(env_index, None)
        self.steps[env_index] = 0
        self.generators[env_index] = episode_generator(self.seed, seed)
        # The executor replaces its stats object at reset; this one fills as the episode runs.
        self.current[env_index] = self.episode_stats[int(seed)] = EpisodeStats(int(seed), executor.stats)

    def act(self, obs: Sequence[Obs], env_indices: Sequence[int]) -> np.ndarray:
        times = [self.steps[i] / self.config.control_hz for i in env_indices]
        for o, i, now in zip(obs, env_indices, times, strict=True):
            if self.obs_adapter is not None:
                o = self.obs_adapter(o)
            self.executors[i].observe({k: o[k] for k in self.obs_keys}, now)
        self._prefetch(env_indices, times)
        actions = np.empty((len(env_indices), self.action_dim))
        for row, (i, now) in enumerate(zip(env_indices, times, strict=True)):
            actions[row], _ = self.executors[i].act(now)
            self.steps[i] += 1
        unused = [i for i in env_indices if i in self.prefetched]
        if unused:  # a chunk left here would be handed to a later request: never let that pass
            raise RuntimeError(f"environments {unused}: the executor did not request the chunk it foresaw")
        return actions

    def _prefetch(self, env_indices: Sequence[int], times: Sequence[float]) -> None:
        """The chunks that this step's `act` calls will request, computed in one batch."""
        requests = {}
        for i, now in zip(env_indices, times, strict=True):
            request = self.executors[i].next_request(now)
            if request is not None:
                requests[i] = request
        if not requests:
            return
        start = time.perf_counter()
        histories, committed = zip(*requests.values(), strict=True)
        generators = [self.generators[i] for i in requests]
        predict_chunks = getattr(self.policy, "predict_chunks", None)
        if predict_chunks is not None:
            chunks = predict_chunks(list(histories), list(committed), generators)
        else:
            chunks = [
                self.policy.predict_chunk(h, c, generator=g)
                for h, c, g in zip(histories, committed, generators, strict=True)
            ]
        # Each environment is charged the batch's wall time: what its chunk cost to wait for.
        seconds = time.perf_counter() - start
        for i, chunk in zip(requests, chunks, strict=True):
            self.prefetched[i] = chunk
            self.current[i].inference_seconds.append(seconds)

    def _predictor(self, env_index: int):
        def predict(history: Obs, committed: np.ndarray | None) -> np.ndarray:
            # `ChunkExecutor.next_request` foresaw this request: `_prefetch` computed its chunk.
            return self.prefetched.pop(env_index)

        return predict


def warm_up(policy: ChunkPolicy) -> np.ndarray:
    """Predict one throwaway chunk from an all-zero history (and return it, for its shape), so that
    the first real request does not wait for what is built on first use (the fast path's export:
    0.3-2 s). Call it where, and with the torch thread count with which, inference will run (the
    fast path is rebuilt when that changes)."""
    history = {
        key: np.zeros((policy.n_obs_steps, *spec.shape), dtype=spec.dtype)
        for key, spec in policy.obs_spec.items()
    }
    return np.asarray(policy.predict_chunk(history, None, generator=torch.Generator().manual_seed(0)))
