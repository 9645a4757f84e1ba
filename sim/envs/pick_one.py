"""PickOne: three coloured cubes on a table; lifting any one of them is a success.

The task is multimodal on purpose: every cube is an equally good answer, so demonstrations that
pick cubes at random teach a policy several distinct behaviours. `behaviour()` names the cube
that was lifted.

The environment reuses robosuite's `Lift` (constructor arguments, table, robot placement and the
reset that applies the placement sampler) and replaces its single cube by three.

`object-state` layout (30 values, in this order; positions in metres in the world frame,
quaternions xyzw):

    [0:3]   red_cube_pos      [3:7]   red_cube_quat
    [7:10]  green_cube_pos    [10:14] green_cube_quat
    [14:17] blue_cube_pos     [17:21] blue_cube_quat
    [21:24] gripper_to_red_cube_pos     (cube minus end effector)
    [24:27] gripper_to_green_cube_pos
    [27:30] gripper_to_blue_cube_pos
"""

from __future__ import annotations

import itertools

import numpy as np
from robosuite.environments.manipulation.lift import Lift
from robosuite.models.arenas import TableArena
from robosuite.models.objects import BoxObject
from robosuite.models.tasks import ManipulationTask
from robosuite.utils import RandomizationError
from robosuite.utils.mjcf_utils import CustomMaterial
from robosuite.utils.observables import Observable, sensor
from robosuite.utils.placement_samplers import UniformRandomSampler
from robosuite.utils.transform_utils import convert_quat

COLOURS: tuple[str, ...] = ("red", "green", "blue")
RGBA = {"red": (1, 0, 0, 1), "green": (0, 1, 0, 1), "blue": (0, 0, 1, 1)}
TEXTURES = {"red": "WoodRed", "green": "WoodGreen", "blue": "WoodBlue"}

# Lift's cube half-size is drawn from [0.020, 0.022] when the model is built; the model is built
# once per environment (before any seed is known), so a fixed size keeps resets reproducible.
CUBE_HALF_SIZE = 0.02
# Horizontal distance between cube centres: wide enough for the open gripper's fingers to come
# down around one cube without touching another.
MIN_CUBE_SPACING = 0.10
LIFT_MARGIN = 0.04  # a cube counts as lifted when its centre is this far above the table top


def cube_pos_slice(colour: str) -> slice:
    """Where a cube's position sits in `object-state` (see the module docstring)."""
    i = COLOURS.index(colour) * 7
    return slice(i, i + 3)


def cube_quat_slice(colour: str) -> slice:
    """Where a cube's xyzw quaternion sits in `object-state`."""
    i = COLOURS.index(colour) * 7 + 3
    return slice(i, i + 4)


class SpacedUniformSampler(UniformRandomSampler):
    """`UniformRandomSampler` that redraws until all objects are `min_spacing` apart.

    robosuite's sampler only keeps objects from overlapping (centres one bounding radius apart);
    grasping one cube needs room for the fingers as well.
    """

    def __init__(self, *args, min_spacing: float, max_tries: int = 1000, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.min_spacing = min_spacing
        self.max_tries = max_tries

    def sample(self, fixtures=None, reference=None, on_top=True):
        for _ in range(self.max_tries):
            placements = super().sample(fixtures=fixtures, reference=reference, on_top=on_top)
            xy = [np.asarray(pos[:2]) for pos, _, _ in placements.values()]
            if all(np.linalg.norm(a - b) >= self.min_spacing for a, b in itertools.combinations(xy, 2)):
                return placements
        raise RandomizationError(
            f"{self.name}: could not place {len(self.mujoco_objects)} objects {self.min_spacing} m apart "
            f"in x_range={self.x_range}, y_range={self.y_range} after {self.max_tries} tries"
        )


class PickOne(Lift):
    """Lift any one of a red, a green and a blue cube (single Panda arm, like `Lift`).

    Takes `Lift`'s constructor arguments. With reward shaping the reward is Lift's, measured
    against the nearest cube for reaching and any cube for grasping; it is 1 (times
    `reward_scale`) once a cube is lifted.
    """

    def reward(self, action=None) -> float:
        reward = 0.0
        if self._check_success():
            reward = 2.25
        elif self.reward_shaping:
            gripper = self.robots[0].gripper
            dist = min(
                self._gripper_to_target(gripper=gripper, target=cube.root_body, return_distance=True)
                for cube in self.cubes.values()
            )
            reward += 1 - np.tanh(10.0 * dist)
            if any(self._check_grasp(gripper=gripper, object_geoms=cube) for cube in self.cubes.values()):
                reward += 0.25
        if self.reward_scale is not None:
            reward *= self.reward_scale / 2.25
        return reward

    def _load_model(self) -> None:
        # Skip Lift._load_model (it builds Lift's single cube); keep the robot setup above it.
        super(Lift, self)._load_model()
        xpos = self.robots[0].robot_model.base_xpos_offset["table"](self.table_full_size[0])
        self.robots[0].robot_model.set_base_xpos(xpos)

        arena = TableArena(
            table_full_size=self.table_full_size,
            table_friction=self.table_friction,
            table_offset=self.table_offset,
        )
        arena.set_origin([0, 0, 0])

        self.cubes = {colour: self._make_cube(colour) for colour in COLOURS}
        cubes = list(self.cubes.values())
        if self.placement_initializer is not None:
            self.placement_initializer.reset()
            self.placement_initializer.add_objects(cubes)
        else:
            self.placement_initializer = SpacedUniformSampler(
                name="ObjectSampler",
                mujoco_objects=cubes,
                x_range=[-0.10, 0.10],
                y_range=[-0.16, 0.16],
                rotation=None,
                ensure_object_boundary_in_range=False,
                ensure_valid_placement=True,
                reference_pos=self.table_offset,
                z_offset=0.01,
                rng=self.rng,
                min_spacing=MIN_CUBE_SPACING,
            )
        self.model = ManipulationTask(
            mujoco_arena=arena,
            mujoco_robots=[robot.robot_model for robot in self.robots],
            mujoco_objects=cubes,
        )

    def _make_cube(self, colour: str) -> BoxObject:
        material = CustomMaterial(
            texture=TEXTURES[colour],
            tex_name=f"{colour}wood",
            mat_name=f"{colour}wood_mat",
            tex_attrib={"type": "cube"},
            mat_attrib={"texrepeat": "1 1", "specular": "0.4", "shininess": "0.1"},
        )
        return BoxObject(
            name=f"{colour}_cube", size=[CUBE_HALF_SIZE] * 3, rgba=RGBA[colour], material=material
        )

    def _setup_references(self) -> None:
        super(Lift, self)._setup_references()
        body_id = self.sim.model.body_name2id
        self.cube_body_ids = {colour: body_id(cube.root_body) for colour, cube in self.cubes.items()}

    def _setup_observables(self):
        observables = super(Lift, self)._setup_observables()
        if not self.use_object_obs:
            return observables
        modality = "object"
        sensors = []
        for colour in COLOURS:
            sensors += self._cube_sensors(colour, modality)
        arm_prefixes = self._get_arm_prefixes(self.robots[0], include_robot_name=False)
        full_prefixes = self._get_arm_prefixes(self.robots[0])
        sensors += [
            self._get_obj_eef_sensor(full_pf, f"{c}_cube_pos", f"{arm_pf}gripper_to_{c}_cube_pos", modality)
            for arm_pf, full_pf in zip(arm_prefixes, full_prefixes, strict=True)
            for c in COLOURS
        ]
        for s in sensors:
            observables[s.__name__] = Observable(name=s.__name__, sensor=s, sampling_rate=self.control_freq)
        return observables

    def _cube_sensors(self, colour: str, modality: str) -> list:
        body_id = self.cube_body_ids[colour]

        @sensor(modality=modality)
        def pos(obs_cache):
            return np.array(self.sim.data.body_xpos[body_id])

        @sensor(modality=modality)
        def quat(obs_cache):
            return convert_quat(np.array(self.sim.data.body_xquat[body_id]), to="xyzw")

        pos.__name__ = f"{colour}_cube_pos"
        quat.__name__ = f"{colour}_cube_quat"
        return [pos, quat]

    def visualize(self, vis_settings) -> None:
        super(Lift, self).visualize(vis_settings=vis_settings)

    def cube_heights(self) -> dict[str, float]:
        """Height of each cube's centre above the table top (metres)."""
        table = self.model.mujoco_arena.table_offset[2]
        return {c: float(self.sim.data.body_xpos[i][2] - table) for c, i in self.cube_body_ids.items()}

    def behaviour(self) -> str:
        """The colour of the lifted cube (the highest, if several are), or "" when none is lifted."""
        heights = self.cube_heights()
        colour = max(heights, key=heights.get)
        return colour if heights[colour] > LIFT_MARGIN else ""

    def _check_success(self) -> bool:
        return self.behaviour() != ""
