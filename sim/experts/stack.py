"""Scripted expert for `stack`: pick the red cube A, carry it over the green cube B, set it down, let go.

`object` is robosuite Stack's object-state: cubeA_pos (0:3), cubeA_quat (3:7), cubeB_pos (7:10),
cubeB_quat (10:14), cubeA_to_cubeB (14:17), gripper_to_cubeA (17:20), gripper_to_cubeB (20:23).
Cube A is 4 cm and cube B 5 cm wide (robosuite's Stack), so A rests on B with its centre
4.5 cm above B's. Grasp offset, carry height and speed are drawn per episode from the expert's rng.
"""

from __future__ import annotations

import numpy as np

from robomosaic.sim.experts.base import Obs, Waypoint, WaypointExpert, yaw_error

A_HALF = 0.02
B_HALF = 0.025


def cube_a(obs: Obs) -> np.ndarray:
    return obs["object"][0:3]


def cube_b(obs: Obs) -> np.ndarray:
    return obs["object"][7:10]


def above_b(obs: Obs, clearance: float) -> np.ndarray:
    """Where the gripper must be for the held cube A to hang `clearance` above cube B's top."""
    held = obs["robot0_eef_pos"] - cube_a(obs)  # cube A's offset in the hand, as it is now
    target = cube_b(obs) + held
    target[2] = cube_b(obs)[2] + B_HALF + A_HALF + clearance + held[2]
    return target


class Expert(WaypointExpert):
    def plan(self, obs: Obs, rng: np.random.Generator) -> list[Waypoint]:
        grasp = np.array([*rng.uniform(-0.004, 0.004, size=2), rng.uniform(-0.008, -0.002)])
        hover = np.array([grasp[0], grasp[1], rng.uniform(0.06, 0.10)])
        carry = rng.uniform(0.05, 0.08)
        gain = rng.uniform(0.8, 1.2)

        def align(o: Obs) -> float:
            return yaw_error(o["robot0_eef_quat"], o["object"][3:7])

        def lifted(o: Obs) -> np.ndarray:
            return np.array([*o["robot0_eef_pos"][:2], cube_b(o)[2] + B_HALF + 2 * A_HALF + carry])

        return [
            Waypoint(lambda o: cube_a(o) + hover, closed=False, tolerance=0.008, gain=gain, yaw=align),
            Waypoint(lambda o: cube_a(o) + grasp, closed=False, tolerance=0.006, gain=gain, yaw=align),
            Waypoint(lambda o: cube_a(o) + grasp, closed=True, tolerance=1.0, min_steps=8),
            Waypoint(lifted, closed=True, tolerance=0.02, gain=gain),
            Waypoint(lambda o: above_b(o, carry), closed=True, tolerance=0.01, gain=gain),
            Waypoint(lambda o: above_b(o, 0.005), closed=True, tolerance=0.006, gain=0.7 * gain),
            Waypoint(lambda o: above_b(o, 0.005), closed=False, tolerance=1.0, min_steps=6),
            Waypoint(lambda o: o["robot0_eef_pos"] + [0, 0, 0.05], closed=False, max_steps=20),
        ]
