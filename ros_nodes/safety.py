"""The last gate between a policy and the robot: per-dimension limits and a maximum change per step.

The policy node runs it on every action the chunk executor (robomosaic.policies.executor) hands
out. The executor already holds on stale or non-finite observations and on missed deadlines; this
filter adds what a robot's parameter file configures:

- a non-finite action (which the executor should never produce) becomes the safe command,
- each dimension is clamped to [action_min, action_max],
- each dimension moves at most max_delta from the previous command (rate limit),
- a hold (the executor's decision) sends the safe command, built from the last command actually
  sent (so the gripper keeps what the robot last received), at once: stopping is never
  rate-limited, so a hold reaches the robot in the period it is decided.

Pure numpy, no ROS: the same filter can wrap any controller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from robomosaic.policies.executor import hold_zero_motion


@dataclass
class SafetyStats:
    commands: int = 0
    holds: int = 0
    nonfinite: int = 0
    clamped: int = 0
    rate_limited: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


def _per_dim(name: str, values: Sequence[float] | np.ndarray | None, dim: int) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.full(dim, float(arr[0]))
    if arr.size != dim:
        raise ValueError(
            f"{name} needs {dim} values (one per action dimension) or one for all, got {arr.size}"
        )
    if np.any(np.isnan(arr)):
        raise ValueError(f"{name} contains NaN: {arr.tolist()}")
    return arr


class SafetyFilter:
    """Limits and rate limit per action dimension (see the module docstring).

    `safe_action(last_command)` gives the safe command; by default zero motion with the
    `gripper_dims` keeping their last command (delta and velocity control).
    """

    def __init__(
        self,
        action_dim: int,
        action_min: Sequence[float] | np.ndarray | None = None,
        action_max: Sequence[float] | np.ndarray | None = None,
        max_delta: Sequence[float] | np.ndarray | None = None,
        gripper_dims: Sequence[int] = (),
        safe_action: Callable[[np.ndarray | None], np.ndarray] | None = None,
    ) -> None:
        self.action_dim = int(action_dim)
        self.action_min = _per_dim("action_min", action_min, self.action_dim)
        self.action_max = _per_dim("action_max", action_max, self.action_dim)
        self.max_delta = _per_dim("max_delta", max_delta, self.action_dim)
        if self.action_min is not None and self.action_max is not None:
            bad = np.flatnonzero(self.action_min > self.action_max)
            if bad.size:
                raise ValueError(f"action_min > action_max in dimension(s) {bad.tolist()}")
        if self.max_delta is not None and np.any(self.max_delta <= 0):
            raise ValueError(f"max_delta must be positive in every dimension, got {self.max_delta.tolist()}")
        bad_dims = [d for d in gripper_dims if not 0 <= d < self.action_dim]
        if bad_dims:
            raise ValueError(f"gripper_dims {bad_dims} out of range for action dimension {self.action_dim}")
        self.gripper_dims = tuple(int(d) for d in gripper_dims)
        self._safe = safe_action or (lambda last: hold_zero_motion(last, self.action_dim, self.gripper_dims))
        self.reset()

    def reset(self) -> None:
        """A new episode starts from the safe command; the gripper dimensions keep their last value
        (a position-controlled gripper must not open because the history was reset)."""
        last = getattr(self, "last", None)
        self.last: np.ndarray | None = None if last is None else self.safe_command()
        self.stats = SafetyStats()

    def safe_command(self) -> np.ndarray:
        return np.asarray(self._safe(self.last), dtype=np.float64)

    def __call__(self, action: np.ndarray, hold: bool = False) -> tuple[np.ndarray, str]:
        """The command to send for `action` and why it differs: `ok`, `hold` (the safe command,
        whatever `action` is), `nonfinite`, `clamped`, `rate_limited` (`clamped+rate_limited`)."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.size != self.action_dim:
            raise ValueError(f"action has {action.size} values, the safety filter expects {self.action_dim}")
        self.stats.commands += 1
        if hold or not np.all(np.isfinite(action)):
            status = "hold" if hold else "nonfinite"
            self.stats.holds += hold
            self.stats.nonfinite += not hold
            return self._commit(self.safe_command(), status)
        command, flags = self.limit(action, self.last)
        self.stats.clamped += "clamped" in flags
        self.stats.rate_limited += "rate_limited" in flags
        return self._commit(command, "+".join(flags) or "ok")

    def limit(self, action: np.ndarray, previous: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
        """Clamp `action` to the limits and to max_delta around `previous` (no state change)."""
        command = np.asarray(action, dtype=np.float64).copy()
        flags = []
        if self.action_min is not None or self.action_max is not None:
            clamped = np.clip(command, self.action_min, self.action_max)
            if not np.array_equal(clamped, command):
                flags.append("clamped")
            command = clamped
        if self.max_delta is not None:
            reference = previous if previous is not None else self.safe_command()
            limited = np.clip(command, reference - self.max_delta, reference + self.max_delta)
            if not np.array_equal(limited, command):
                flags.append("rate_limited")
            # the limits win: a reference outside them (a safe command of 0 with limits that exclude
            # 0) must not pull the command out of [action_min, action_max]
            command = limited
            if self.action_min is not None or self.action_max is not None:
                command = np.clip(command, self.action_min, self.action_max)
        return command, flags

    def limit_chunk(self, chunk: np.ndarray, first: np.ndarray) -> np.ndarray:
        """A planned trajectory (N, D) after the command `first` (already filtered and sent), with
        every point limited and rate-limited relative to the point before it."""
        out = np.empty((len(chunk), self.action_dim))
        previous = np.asarray(first, dtype=np.float64)
        for i, action in enumerate(np.asarray(chunk, dtype=np.float64)):
            if not np.all(np.isfinite(action)):
                return out[:i]  # never plan past a non-finite point
            previous = out[i] = self.limit(action, previous)[0]
        return out

    def _commit(self, command: np.ndarray, status: str) -> tuple[np.ndarray, str]:
        self.last = command.copy()
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
        return command, status
