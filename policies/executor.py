"""The chunk executor: turns a chunk-predicting policy into one action per control period.

The same object runs inside simulated evaluation and inside the ROS 2 policy node, so what we
measure in simulation is what a robot runs. Per control period the caller does

    executor.observe(obs, stamp)          # whenever a new observation arrives
    action, status = executor.act(now)    # once per control period; never waits for inference

and the executor

- keeps the last `n_obs_steps` observations (rejecting non-finite ones),
- requests a new chunk every `n_action_steps` periods, with the history at that moment, and lets an
  inference runner compute it off the control thread (`ThreadedInference` on a robot) or release it
  after a simulated delay (`DelayedInference` in simulation, deterministic in simulated time),
- stamps each chunk: action j of a chunk computed from the observation stamped t is meant for time
  t + (j - n_obs_steps + 1) / control_hz (the dataset convention: action index n_obs_steps - 1 is
  the action taken at the newest observation), so actions whose time has passed are dropped,
- blends overlapping chunks: `none` switches to the newest chunk, `ensemble` averages every chunk's
  action for the current time with exponential weights (ACT's temporal ensembling), `rtc` switches
  to the newest chunk but asks the policy to condition it on the actions already committed for the
  time inference takes (real-time chunking by inpainting),
- holds safely when the newest observation is stale or non-finite, or when no chunk covers now
  because inference missed its deadline.

Written by hand because no library does this for chunked generative policies: LeRobot's and
diffusion_policy's versions are tied to their own policy classes and robot drivers.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

Obs = dict[str, np.ndarray]
Blend = Literal["none", "ensemble", "rtc"]


class ChunkPredictor(Protocol):
    """Maps an observation history to an action chunk (horizon, action_dim) in robot units.

    `history` holds each key stacked over the last n_obs_steps observations, oldest first.
    `committed`, given in `rtc` mode, is a (horizon, action_dim) array on the new chunk's time grid
    with the actions that will execute before the chunk can take over and NaN elsewhere; the policy
    should reproduce them (inpainting) so the switch is seamless.
    """

    def __call__(self, history: Obs, committed: np.ndarray | None) -> np.ndarray: ...


@dataclass(frozen=True)
class ExecutorConfig:
    control_hz: float
    n_obs_steps: int
    n_action_steps: int
    blend: Blend = "none"
    # ACT's temporal ensembling weight exp(-ensemble_decay * i), i = 0 for the oldest chunk.
    ensemble_decay: float = 0.01
    # Observations older than this (seconds) make the executor hold.
    max_obs_age: float = 0.25
    # Inference slower than this (seconds) counts as a missed deadline; default: one replan period.
    deadline: float | None = None

    def __post_init__(self) -> None:
        if self.control_hz <= 0:
            raise ValueError(f"control_hz must be positive, got {self.control_hz}")
        if self.n_obs_steps < 1 or self.n_action_steps < 1:
            raise ValueError(
                f"n_obs_steps and n_action_steps must be >= 1, got {self.n_obs_steps}, {self.n_action_steps}"
            )
        if self.blend not in ("none", "ensemble", "rtc"):
            raise ValueError(f"blend must be one of none, ensemble, rtc; got {self.blend!r}")

    @property
    def dt(self) -> float:
        return 1.0 / self.control_hz

    @property
    def deadline_s(self) -> float:
        return self.deadline if self.deadline is not None else self.n_action_steps * self.dt


@dataclass
class Chunk:
    """A predicted chunk; `t0` is the time its action 0 is meant for."""

    t0: float
    actions: np.ndarray
    requested: float
    latency: float

    def index_at(self, now: float, dt: float) -> int:
        # Half-period rounding so that float jitter in `now` never skips or repeats an action.
        return math.floor((now - self.t0) / dt + 0.5)


@dataclass
class ExecutorStats:
    steps: int = 0
    held: dict[str, int] = field(default_factory=dict)
    rejected_obs: int = 0
    rejected_chunks: int = 0
    chunks: int = 0
    dropped_actions: int = 0
    deadline_misses: int = 0
    latencies: list[float] = field(default_factory=list)


class InferenceRunner(Protocol):
    """Computes a chunk for a request and reports it once it may be used."""

    def submit(self, history: Obs, committed: np.ndarray | None, now: float) -> None: ...

    def poll(self, now: float) -> tuple[np.ndarray, float, float] | None:
        """(chunk, request time, latency) once the pending result is available at `now`."""
        ...

    @property
    def busy(self) -> bool: ...

    def close(self) -> None: ...


class DelayedInference:
    """Runs the policy at once but releases the chunk `delay` seconds of simulated time later.

    For evaluation in simulation: the effect of inference latency is reproduced exactly and
    deterministically, independent of how fast this machine happens to run the network.
    """

    def __init__(self, predict: ChunkPredictor, delay: float = 0.0) -> None:
        self.predict, self.delay = predict, float(delay)
        self._pending: tuple[np.ndarray, float] | None = None

    def submit(self, history: Obs, committed: np.ndarray | None, now: float) -> None:
        self._pending = (np.asarray(self.predict(history, committed)), now)

    def poll(self, now: float) -> tuple[np.ndarray, float, float] | None:
        if self._pending is None or now + 1e-9 < self._pending[1] + self.delay:
            return None
        chunk, requested = self._pending
        self._pending = None
        return chunk, requested, self.delay

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def close(self) -> None:
        self._pending = None


class ThreadedInference:
    """Runs the policy in a background thread so the control loop never waits for it."""

    def __init__(self, predict: ChunkPredictor, clock: Callable[[], float] = time.monotonic) -> None:
        self.predict, self.clock = predict, clock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._result: tuple[np.ndarray, float, float] | None = None
        self._error: BaseException | None = None

    def submit(self, history: Obs, committed: np.ndarray | None, now: float) -> None:
        if self.busy:
            raise RuntimeError("inference is already running; wait for its result before submitting")

        def run() -> None:
            start = self.clock()
            try:
                chunk = np.asarray(self.predict(history, committed))
            except BaseException as e:  # surfaced on the control thread by poll()
                with self._lock:
                    self._error = e
                return
            with self._lock:
                self._result = (chunk, now, self.clock() - start)

        self._thread = threading.Thread(target=run, name="robomosaic-inference", daemon=True)
        self._thread.start()

    def poll(self, now: float) -> tuple[np.ndarray, float, float] | None:
        with self._lock:
            if self._error is not None:
                error, self._error = self._error, None
                raise RuntimeError("policy inference failed") from error
            result, self._result = self._result, None
        return result

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        with self._lock:
            self._result, self._error = None, None


def hold_zero_motion(
    last_action: np.ndarray | None, action_dim: int, gripper_dims: tuple[int, ...] = ()
) -> np.ndarray:
    """The safe action for delta/velocity control: no motion, grippers keep their last command."""
    action = np.zeros(action_dim)
    if last_action is not None and gripper_dims:
        action[list(gripper_dims)] = last_action[list(gripper_dims)]
    return action


class ChunkExecutor:
    """Observation history, chunk scheduling, blending and safety holds (see module docstring)."""

    def __init__(
        self,
        runner: InferenceRunner,
        config: ExecutorConfig,
        action_dim: int,
        hold: Callable[[np.ndarray | None], np.ndarray] | None = None,
    ) -> None:
        self.runner, self.config, self.action_dim = runner, config, int(action_dim)
        self.hold = hold or (lambda last: hold_zero_motion(last, self.action_dim))
        self.reset()

    def reset(self) -> None:
        """Forget history, chunks and statistics (a new episode); a pending result is discarded."""
        self.runner.close()
        self.history: deque[Obs] = deque(maxlen=self.config.n_obs_steps)
        self.last_stamp: float | None = None
        self.newest_rejected = False  # the newest observation offered was non-finite
        self.chunks: list[Chunk] = []
        self.last_action: np.ndarray | None = None
        self.last_request: float | None = None
        self._request_stamp = 0.0
        self._late_flagged = False
        self.stats = ExecutorStats()

    # -- inputs -------------------------------------------------------------------------------
    def observe(self, obs: Obs, stamp: float) -> bool:
        """Add an observation; non-finite ones are rejected (returns False) and never used."""
        for value in obs.values():
            arr = np.asarray(value)
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                self.stats.rejected_obs += 1
                self.newest_rejected = True
                return False
        if self.last_stamp is not None and stamp < self.last_stamp:
            self.stats.rejected_obs += 1
            return False
        if not self.history:
            # Pad the history by repeating the first observation, as the training sampler does.
            self.history.extend([obs] * (self.config.n_obs_steps - 1))
        self.history.append(obs)
        self.last_stamp = float(stamp)
        self.newest_rejected = False
        return True

    # -- one control period -------------------------------------------------------------------
    def act(self, now: float) -> tuple[np.ndarray, str]:
        """The action for time `now` and a status: `ok`, or `hold:<reason>`."""
        self.stats.steps += 1
        self._collect(now)
        reason = self._hold_reason(now)
        if reason == "stale_observation":
            self.chunks = []  # the plan was made for a world that may have moved on: never resume it
        if reason is not None:
            return self._hold(reason)
        if self._needs_chunk(now):
            self._request(now)
            self._collect(now)  # a result may be ready at once (no simulated delay)
        action = self._select(now)
        if action is None:
            return self._hold("no_chunk")
        self.last_action = action
        return action, "ok"

    def next_request(self, now: float) -> tuple[Obs, np.ndarray | None] | None:
        """The (history, committed) that `act(now)` will submit, or None if it submits nothing.
        Lets a caller that drives several executors compute their chunks in one batch before
        calling `act` (policies/rollout.py); changes nothing that `act(now)` would not."""
        self._collect(now)
        if self._hold_reason(now) is not None or not self._needs_chunk(now):
            return None
        return self._request_inputs(now)

    def close(self) -> None:
        self.runner.close()

    # -- internals ----------------------------------------------------------------------------
    def _hold(self, reason: str) -> tuple[np.ndarray, str]:
        self.stats.held[reason] = self.stats.held.get(reason, 0) + 1
        return np.asarray(self.hold(self.last_action), dtype=np.float64), f"hold:{reason}"

    def _hold_reason(self, now: float) -> str | None:
        if self.last_stamp is None:
            return "no_observation"
        if now - self.last_stamp > self.config.max_obs_age + 1e-9:
            return "stale_observation"
        if self.newest_rejected:
            return "nonfinite_observation"
        return None

    def _collect(self, now: float) -> None:
        result = self.runner.poll(now)
        if result is None:
            waited = now - self.last_request if self.last_request is not None else 0.0
            if self.runner.busy and waited > self.config.deadline_s + 1e-9 and not self._late_flagged:
                self.stats.deadline_misses += 1
                self._late_flagged = True
            return
        actions, requested, latency = result
        if actions.ndim != 2 or actions.shape[1] != self.action_dim:
            raise ValueError(
                f"policy returned a chunk of shape {actions.shape}, expected (horizon, {self.action_dim})"
            )
        if not np.all(np.isfinite(actions)):
            # Never execute it; the current plan runs on, and the executor holds when it runs out.
            self.stats.rejected_chunks += 1
            return
        stamp = self._request_stamp
        t0 = stamp - (self.config.n_obs_steps - 1) * self.config.dt
        chunk = Chunk(t0=t0, actions=actions.astype(np.float64), requested=requested, latency=latency)
        self.stats.chunks += 1
        self.stats.latencies.append(latency)
        if latency > self.config.deadline_s + 1e-9 and not self._late_flagged:
            self.stats.deadline_misses += 1
        first_live = chunk.index_at(now, self.config.dt)
        self.stats.dropped_actions += max(0, min(first_live, len(actions)) - (self.config.n_obs_steps - 1))
        self.chunks.append(chunk)
        # Keep only chunks that still cover the present or future.
        self.chunks = [c for c in self.chunks if c.index_at(now, self.config.dt) < len(c.actions)]

    def _needs_chunk(self, now: float) -> bool:
        if self.runner.busy:
            return False
        if self.last_request is None:
            return True
        return now - self.last_request >= self.config.n_action_steps * self.config.dt - 1e-9

    def _request_inputs(self, now: float) -> tuple[Obs, np.ndarray | None]:
        history = {k: np.stack([o[k] for o in self.history]) for k in self.history[-1]}
        return history, self._committed(now) if self.config.blend == "rtc" else None

    def _request(self, now: float) -> None:
        history, committed = self._request_inputs(now)
        self._request_stamp = float(self.last_stamp)
        self.last_request = now
        self._late_flagged = False
        self.runner.submit(history, committed, now)

    def _committed(self, now: float) -> np.ndarray | None:
        """The current plan's actions that will execute before the next chunk can take over, on the
        next chunk's time grid; NaN elsewhere (those the new chunk is free to choose).

        The next chunk arrives after the inference latency, estimated as the largest of the last
        few measured latencies; until then the current plan runs, so only the actions it executes
        in that window are committed.
        """
        if not self.chunks:
            return None
        dt = self.config.dt
        current = self.chunks[-1]
        horizon = len(current.actions)
        latency = max(self.stats.latencies[-5:], default=0.0)
        t0_next = float(self.last_stamp) - (self.config.n_obs_steps - 1) * dt
        takeover = now + latency  # first time the new chunk can act
        committed = np.full((horizon, self.action_dim), np.nan)
        for j in range(horizon):
            t = t0_next + j * dt
            i = current.index_at(t, dt)
            if t < takeover - 1e-9 and 0 <= i < horizon:
                committed[j] = current.actions[i]
        return committed

    def _select(self, now: float) -> np.ndarray | None:
        live = []
        for chunk in self.chunks:
            i = chunk.index_at(now, self.config.dt)
            if 0 <= i < len(chunk.actions):
                live.append(chunk.actions[i])
        if not live:
            return None
        if self.config.blend != "ensemble":
            return live[-1].copy()
        weights = np.exp(-self.config.ensemble_decay * np.arange(len(live)))
        return np.average(np.stack(live), axis=0, weights=weights)
