"""Scripted expert for `lift`: above the cube, down, close, up.

`object` is robosuite Lift's object-state: cube_pos (0:3), cube_quat xyzw (3:7), gripper_to_cube (7:10).
Each episode draws a small grasp offset, approach height and speed from the expert's rng, so that
demonstrations of one initial state are not all identical.
"""

from __future__ import annotations

import numpy as np

from robomosaic.sim.experts.base import Obs, Waypoint, WaypointExpert, yaw_error


def cube_pos(obs: Obs) -> np.ndarray:
    return obs["object"][0:3]


def cube_quat(obs: Obs) -> np.ndarray:
    return obs["object"][3:7]


class Expert(WaypointExpert):
    def plan(self, obs: Obs, rng: np.random.Generator) -> list[Waypoint]:
        offset = np.array([*rng.uniform(-0.004, 0.004, size=2), rng.uniform(-0.008, -0.002)])
        hover = np.array([offset[0], offset[1], rng.uniform(0.06, 0.10)])
        lift = np.array([0.0, 0.0, rng.uniform(0.12, 0.16)])
        gain = rng.uniform(0.8, 1.2)
        start = cube_pos(obs).copy()

        def align(o: Obs) -> float:
            return yaw_error(o["robot0_eef_quat"], cube_quat(o))

        return [
            Waypoint(lambda o: cube_pos(o) + hover, closed=False, tolerance=0.008, gain=gain, yaw=align),
            Waypoint(lambda o: cube_pos(o) + offset, closed=False, tolerance=0.006, gain=gain, yaw=align),
            Waypoint(lambda o: cube_pos(o) + offset, closed=True, tolerance=1.0, min_steps=8),
            Waypoint(lambda o: start + lift, closed=True, tolerance=0.01, gain=gain),
        ]
