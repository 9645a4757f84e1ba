"""Scripted expert for `door`: hook the handle bar and pull the door open along its arc.

`object` is robosuite Door's object-state (use_latch=False): door_pos (0:3), handle_pos (3:6),
hinge_qpos (6), door_to_eef (7:10), handle_to_eef (10:13); positions in the world frame.

The door's pose is not observed directly, but two points rigidly attached to the panel are: the
door body's origin and the handle site. Their offset in the door body's frame is fixed by
robosuite's door.xml, so the panel's heading follows from the observed offset, and with it every
point of the door (the gap behind the handle bar, the hinge axis) in the world.

The gripper comes down closed, its fingers in the gap between the panel and the handle bar, with
the hand turned parallel to the panel (the bar is too close to the panel for the open hand to
straddle it), then pulls along the tangent of the door's arc; targets are recomputed from each
observation, so the pull follows the door as it swings.
"""

from __future__ import annotations

import numpy as np
from robosuite.utils.transform_utils import quat2mat

from robomosaic.sim.experts.base import ROT_SCALE, Obs, Waypoint, WaypointExpert, yaw

# Points in the door body's frame (metres), from robosuite/models/assets/objects/door.xml: the
# handle site is latch (-0.175, 0, -0.025) + (0.125, -0.10, 0); the hinge axis passes through
# (0.255, 0); the panel's surface is at y = -0.02 and the handle bar's inner face at y = -0.085.
HANDLE_IN_DOOR = np.array([-0.05, -0.10])
HINGE_IN_DOOR = np.array([0.255, 0.0])
HOOK_IN_DOOR = np.array([-0.10, -0.055, -0.025])  # behind the middle of the bar, at its height


def door_pos(obs: Obs) -> np.ndarray:
    return obs["object"][0:3]


def handle_pos(obs: Obs) -> np.ndarray:
    return obs["object"][3:6]


def door_heading(obs: Obs) -> float:
    """Heading in [-pi, pi) of the door body's x axis, from the observed door-to-handle offset."""
    offset = handle_pos(obs)[:2] - door_pos(obs)[:2]
    heading = np.arctan2(offset[1], offset[0]) - np.arctan2(HANDLE_IN_DOOR[1], HANDLE_IN_DOOR[0])
    return float((heading + np.pi) % (2 * np.pi) - np.pi)


def in_world(obs: Obs, point: np.ndarray) -> np.ndarray:
    """A point given in the door body's frame (x, y[, z]), in world coordinates."""
    c, s = np.cos(door_heading(obs)), np.sin(door_heading(obs))
    xy = door_pos(obs)[:2] + np.array([c * point[0] - s * point[1], s * point[0] + c * point[1]])
    z = door_pos(obs)[2] + (point[2] if len(point) > 2 else 0.0)
    return np.array([xy[0], xy[1], z])


def opening_direction(obs: Obs) -> np.ndarray:
    """Unit horizontal vector along which the hook point moves as the hinge angle grows."""
    radius = in_world(obs, HOOK_IN_DOOR)[:2] - in_world(obs, HINGE_IN_DOOR)[:2]
    tangent = np.array([-radius[1], radius[0], 0.0])  # z x radius: the hinge turns about +z
    return tangent / np.linalg.norm(tangent)


def hand_parallel_to_panel(obs: Obs) -> float:
    """Yaw error that turns the fingers' closing axis along the panel (symmetric every half turn)."""
    error = door_heading(obs) + np.pi / 2 - yaw(obs["robot0_eef_quat"])
    return float((error + np.pi / 2) % np.pi - np.pi / 2)


def tilt_correction(obs: Obs) -> np.ndarray:
    """OSC_POSE (dax, day) that turns the gripper's approach axis back to pointing straight down.

    The arm starts with a few degrees of random tilt, which OSC's delta control keeps; with the
    hand this close to the panel that tilt is enough to rub the wrist against the door.
    """
    approach = quat2mat(obs["robot0_eef_quat"])[:, 2]
    rotvec = np.cross(approach, [0.0, 0.0, -1.0])  # small-angle rotation taking approach to -z
    return np.clip(rotvec[:2] / ROT_SCALE, -1.0, 1.0)


class Expert(WaypointExpert):
    def __call__(self, obs: Obs) -> np.ndarray:
        action = super().__call__(obs)
        action[3:5] = tilt_correction(obs)
        return action

    def plan(self, obs: Obs, rng: np.random.Generator) -> list[Waypoint]:
        if obs["object"].shape != (13,):
            raise ValueError(
                f"door expert: expected Door's 13-value object-state (use_latch=False), got shape "
                f"{obs['object'].shape}; the latched door (handle_qpos appended) is not supported"
            )
        above = np.array([0.0, 0.0, rng.uniform(0.08, 0.12)])
        depth = np.array([0.0, 0.0, rng.uniform(-0.015, 0.0)])
        reach = rng.uniform(0.04, 0.06)
        gain = rng.uniform(0.8, 1.2)

        def hook(o: Obs) -> np.ndarray:
            return in_world(o, HOOK_IN_DOOR) + depth

        align = hand_parallel_to_panel
        return [
            Waypoint(lambda o: hook(o) + above, closed=True, tolerance=0.02, gain=gain, yaw=align),
            Waypoint(hook, closed=True, tolerance=0.01, gain=gain, yaw=align),
            Waypoint(
                lambda o: hook(o) + reach * opening_direction(o),
                closed=True,
                tolerance=0.0,
                max_steps=200,
                yaw=align,
            ),
        ]
