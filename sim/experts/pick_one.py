"""Scripted expert for `pick_one`: choose one of the three cubes at random, then lift it.

The choice is drawn uniformly from the expert's rng at reset, so a dataset collected with this
expert shows three distinct behaviours in equal shares (the point of the task). Once a cube is
chosen the motion is exactly the `lift` expert's: its waypoints are reused on a view of the
observation in which `object` holds only the chosen cube, laid out as Lift's object-state.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from robomosaic.sim.envs.pick_one import COLOURS, cube_pos_slice, cube_quat_slice
from robomosaic.sim.experts import lift
from robomosaic.sim.experts.base import Obs, Waypoint, WaypointExpert


def lift_view(obs: Obs, colour: str) -> Obs:
    """`obs` with `object` replaced by Lift's layout for one cube: pos, quat xyzw, cube minus eef."""
    pos = obs["object"][cube_pos_slice(colour)]
    quat = obs["object"][cube_quat_slice(colour)]
    return {**obs, "object": np.concatenate([pos, quat, pos - obs["robot0_eef_pos"]])}


class Expert(WaypointExpert):
    """Lift one cube: `target` fixes its colour, None draws it at every reset."""

    def __init__(self, target: str | None = None) -> None:
        super().__init__()
        if target is not None and target not in COLOURS:
            raise ValueError(f"pick_one expert: target must be None or one of {COLOURS}, got {target!r}")
        self.target = target
        self.colour = ""

    def plan(self, obs: Obs, rng: np.random.Generator) -> list[Waypoint]:
        self.colour = self.target or str(rng.choice(COLOURS))
        colour = self.colour
        waypoints = lift.Expert().plan(lift_view(obs, colour), rng)
        return [
            replace(
                wp,
                target=lambda o, f=wp.target: f(lift_view(o, colour)),
                yaw=None if wp.yaw is None else (lambda o, f=wp.yaw: f(lift_view(o, colour))),
            )
            for wp in waypoints
        ]
