"""Scripted experts as sequences of waypoints followed through the OSC_POSE controller.

An expert plans, at reset, a list of `Waypoint`s whose targets are functions of the observation
(so they follow objects that move), and turns each step's position error into a clipped delta
action. It is a plain proportional controller: OSC already tracks the commanded pose, so nothing
more elaborate is needed for demonstrations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# OSC_POSE scales a unit action to this many metres / radians per step (robosuite's default).
POS_SCALE = 0.05
ROT_SCALE = 0.5

Obs = dict[str, np.ndarray]


@dataclass
class Waypoint:
    """Move the end effector to `target(obs)` with the gripper `closed` or open.

    The waypoint is done when the position error is below `tolerance` (metres) for the first time
    and then at least `min_steps` steps have passed in it, or after `max_steps` steps.
    `yaw(obs)`, when given, is the desired end-effector yaw error (radians) to rotate away.
    """

    target: Callable[[Obs], np.ndarray]
    closed: bool
    tolerance: float = 0.01
    min_steps: int = 0
    max_steps: int = 60
    gain: float = 1.0
    yaw: Callable[[Obs], float] | None = None


class WaypointExpert:
    """Follow waypoints in order; after the last one, hold its target."""

    def __init__(self) -> None:
        self.waypoints: list[Waypoint] = []
        self.index = 0
        self.steps_in_waypoint = 0

    def plan(self, obs: Obs, rng: np.random.Generator) -> list[Waypoint]:
        """Return this episode's waypoints; subclasses decide."""
        raise NotImplementedError

    def reset(self, obs: Obs, rng: np.random.Generator) -> None:
        self.waypoints = self.plan(obs, rng)
        self.index = 0
        self.steps_in_waypoint = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.waypoints)

    def __call__(self, obs: Obs) -> np.ndarray:
        if not self.waypoints:
            raise RuntimeError("call reset(obs, rng) before asking the expert for an action")
        wp = self.waypoints[min(self.index, len(self.waypoints) - 1)]
        error = wp.target(obs) - obs["robot0_eef_pos"]
        action = np.zeros(7)
        action[:3] = np.clip(wp.gain * error / POS_SCALE, -1.0, 1.0)
        if wp.yaw is not None:
            action[5] = np.clip(wp.yaw(obs) / ROT_SCALE, -1.0, 1.0)
        action[6] = 1.0 if wp.closed else -1.0
        if not self.done:
            self.steps_in_waypoint += 1
            reached = np.linalg.norm(error) < wp.tolerance
            if (reached and self.steps_in_waypoint >= wp.min_steps) or self.steps_in_waypoint >= wp.max_steps:
                self.index += 1
                self.steps_in_waypoint = 0
        return action


def yaw(quat_xyzw: np.ndarray) -> float:
    """Heading (radians) of a frame's x axis projected on the table plane."""
    from robosuite.utils.transform_utils import quat2mat

    x_axis = quat2mat(np.asarray(quat_xyzw, dtype=np.float64))[:, 0]
    return float(np.arctan2(x_axis[1], x_axis[0]))


def yaw_error(eef_quat: np.ndarray, object_quat: np.ndarray, symmetry: float = np.pi / 2) -> float:
    """The yaw rotation that aligns the gripper with an object symmetric under `symmetry` radians.

    For a cube (symmetric every quarter turn) the result lies in [-pi/4, pi/4): the gripper never
    turns more than 45 degrees. A positive value is a counter-clockwise turn about world z, which is
    the sign of OSC_POSE's `daz`.
    """
    error = yaw(object_quat) - yaw(eef_quat)
    return float((error + symmetry / 2) % symmetry - symmetry / 2)
