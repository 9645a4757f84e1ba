"""The task registry: robosuite manipulation environments behind one small, seeded API.

    task = make_task("lift", cameras=("agentview",), image_size=84)
    obs = task.reset(seed=3)
    obs, reward, terminated, truncated, info = task.step(action)   # info["success"]

Every task is a Panda arm under robosuite's OSC_POSE controller in delta mode at 20 Hz: the action
is (dx, dy, dz, dax, day, daz, gripper) in [-1, 1], scaled by the controller to at most 5 cm and
0.5 rad per step; gripper +1 closes. Observations are a flat dict of numpy arrays described by
`task.spec.obs` (state keys, and `<camera>_image` uint8 HWC keys when cameras are asked for).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robomosaic.data.spec import KeySpec

# Offscreen rendering on machines without a GPU goes through OSMesa; EGL does not work there.
# Users with a GPU can set MUJOCO_GL=egl before importing robomosaic.
os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

CONTROL_HZ = 20.0
ROBOT = "Panda"
CONTROLLER = "OSC_POSE"

PROPRIO_KEYS: dict[str, KeySpec] = {
    "robot0_eef_pos": KeySpec((3,), "float64", "m", "world", "end-effector position"),
    "robot0_eef_quat": KeySpec((4,), "float64", "quaternion xyzw", "world", "end-effector orientation"),
    "robot0_gripper_qpos": KeySpec((2,), "float64", "m", "gripper", "finger joint positions"),
}
ACTION_SPEC = KeySpec(
    (7,),
    "float32",
    "normalized [-1, 1]",
    "world",
    "OSC_POSE delta: dx, dy, dz (x 0.05 m), dax, day, daz (x 0.5 rad), gripper (+1 closes)",
)


def _only_errors(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


# robosuite logs several INFO/WARNING lines at import and per environment (missing optional robot
# models, unused controller parts); a filter, unlike a level, survives robosuite's own logger setup
# at import time, whichever module imports robosuite first. Errors still show.
logging.getLogger("robosuite_logs").addFilter(_only_errors)


@dataclass(frozen=True)
class TaskDef:
    """How to build one task: the robosuite environment and its settings."""

    name: str
    env_name: str
    max_steps: int
    description: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)


TASKS: dict[str, TaskDef] = {}


def register_task(task: TaskDef) -> TaskDef:
    """Add a task to the registry (names are unique)."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


register_task(TaskDef("lift", "Lift", 150, "lift the cube above the table"))
register_task(TaskDef("stack", "Stack", 250, "put the red cube on the green cube"))
register_task(TaskDef("door", "Door", 250, "open the door past 0.3 rad", {"use_latch": False}))
register_task(
    TaskDef("pick_one", "PickOne", 150, "lift any one of three coloured cubes (multimodal on purpose)")
)


@dataclass(frozen=True)
class TaskSpec:
    """What a task observes and accepts; written into datasets and checked against checkpoints."""

    name: str
    obs: dict[str, KeySpec]
    action: KeySpec
    control_hz: float
    max_steps: int
    robot: str = ROBOT
    controller: str = CONTROLLER

    @property
    def state_keys(self) -> list[str]:
        return [k for k, v in self.obs.items() if not v.is_image]

    @property
    def image_keys(self) -> list[str]:
        return [k for k, v in self.obs.items() if v.is_image]


class Task:
    """One robosuite environment with seeded resets, flat observations and simulator states."""

    def __init__(
        self,
        name: str,
        cameras: Sequence[str] = (),
        image_size: int = 84,
        max_steps: int | None = None,
    ) -> None:
        if name not in TASKS:
            raise KeyError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}")
        import robosuite
        from robosuite import macros
        from robosuite.controllers import load_composite_controller_config

        from robomosaic.sim import envs  # noqa: F401  (registers our own robosuite environments)

        macros.IMAGE_CONVENTION = "opencv"  # row 0 at the top, as every image library expects
        self.definition = TASKS[name]
        self.name = name
        self.cameras = tuple(cameras)
        self.image_size = int(image_size)
        self.max_steps = int(max_steps or self.definition.max_steps)
        controller = load_composite_controller_config(controller="BASIC", robot=ROBOT)
        self.env = robosuite.make(
            self.definition.env_name,
            robots=ROBOT,
            controller_configs=controller,
            has_renderer=False,
            has_offscreen_renderer=bool(self.cameras),
            use_camera_obs=bool(self.cameras),
            camera_names=list(self.cameras) or "agentview",
            camera_heights=self.image_size,
            camera_widths=self.image_size,
            control_freq=int(CONTROL_HZ),
            horizon=10**9,  # we count steps ourselves, robosuite must never reset on its own
            ignore_done=True,
            hard_reset=False,
            # Building the model draws from the env's rng (e.g. Lift's cube size); a fixed seed makes
            # every Task instance the same model, so reset(seed) gives the same episode in any process.
            seed=0,
            reward_shaping=True,
            **self.definition.env_kwargs,
        )
        self._steps = 0
        self.spec = self._make_spec(self.env.reset())

    # -- the uniform API ----------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """Reset to the initial state drawn from `seed` (object placement and arm noise)."""
        rng = np.random.default_rng(seed)
        self.env.rng = rng
        if getattr(self.env, "placement_initializer", None) is not None:
            self.env.placement_initializer.rng = rng
            for sampler in getattr(self.env.placement_initializer, "samplers", {}).values():
                sampler.rng = rng
        self._steps = 0
        return self._observe(self.env.reset())

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Apply one 20 Hz action; terminated means success, truncated means out of steps."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != ACTION_SPEC.shape:
            raise ValueError(
                f"task {self.name}: action has shape {action.shape}, expected {ACTION_SPEC.shape}"
            )
        if not np.all(np.isfinite(action)):
            raise ValueError(f"task {self.name}: action is not finite: {action}")
        raw, reward, _, _ = self.env.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        info = self.info()
        truncated = self._steps >= self.max_steps and not info["success"]
        return self._observe(raw), float(reward), bool(info["success"]), truncated, info

    def info(self) -> dict[str, Any]:
        """Success now, and which behaviour the episode shows (for multimodal tasks)."""
        behaviour = self.env.behaviour() if hasattr(self.env, "behaviour") else ""
        return {"success": bool(self.env._check_success()), "behaviour": behaviour}

    # -- simulator state, for replay and offline rendering -------------------------------------
    def get_state(self) -> np.ndarray:
        """The flattened MuJoCo state (time, qpos, qvel): enough to restore the scene exactly."""
        return np.asarray(self.env.sim.get_state().flatten(), dtype=np.float64)

    def set_state(self, state: np.ndarray) -> dict[str, np.ndarray]:
        """Restore a state from `get_state` and return the observation there."""
        self.env.sim.set_state_from_flattened(np.asarray(state, dtype=np.float64))
        self.env.sim.forward()
        return self.observe()

    def object_poses(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each task object's root body pose in the world frame: name -> (xyz, quaternion xyzw)."""
        sim = self.env.sim
        poses = {}
        for o in self.env.model.mujoco_objects:
            body = sim.model.body_name2id(o.root_body)
            w, x, y, z = sim.data.body_xquat[body]
            poses[o.name] = (sim.data.body_xpos[body].copy(), np.array([x, y, z, w]))
        return poses

    def observe(self) -> dict[str, np.ndarray]:
        """The observation at the current simulator state (renders cameras if any).

        Kinematics are recomputed first: the observation `step` returns is robosuite's, computed
        before the last physics substep's kinematics update (about 2 ms of motion behind the state).
        """
        self.env.sim.forward()
        return self._observe(self.env._get_observations(force_update=True))

    def model_xml(self) -> str:
        return self.env.sim.model.get_xml()

    def render(self, camera: str = "agentview", size: int | None = None) -> np.ndarray:
        """An RGB frame (uint8 HWC, row 0 at the top) from any camera, for videos."""
        size = int(size or self.image_size)
        sim = self.env.sim
        if sim._render_context_offscreen is None:  # a task without cameras renders only for videos
            from robosuite.utils.binding_utils import MjRenderContextOffscreen

            context = MjRenderContextOffscreen(sim, device_id=-1)  # registers itself with `sim`
            context.vopt.geomgroup[0] = 0  # as robosuite does: visual meshes, not collision meshes
            context.vopt.geomgroup[1] = 1
        frame = sim.render(camera_name=camera, height=size, width=size)
        return np.ascontiguousarray(frame[::-1])

    def close(self) -> None:
        self.env.close()

    # -- internals ----------------------------------------------------------------------------
    def _observe(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = {k: np.asarray(raw[k], dtype=np.float64) for k in PROPRIO_KEYS}
        obs["object"] = np.asarray(raw["object-state"], dtype=np.float64)
        for cam in self.cameras:
            obs[f"{cam}_image"] = np.asarray(raw[f"{cam}_image"], dtype=np.uint8)
        return obs

    def _make_spec(self, raw: dict[str, np.ndarray]) -> TaskSpec:
        keys = dict(PROPRIO_KEYS)
        keys["object"] = KeySpec(
            (len(raw["object-state"]),), "float64", "m, quaternion xyzw", "world", "task object state"
        )
        for cam in self.cameras:
            keys[f"{cam}_image"] = KeySpec(
                (self.image_size, self.image_size, 3), "uint8", "RGB", cam, f"{cam} camera"
            )
        return TaskSpec(self.name, keys, ACTION_SPEC, CONTROL_HZ, self.max_steps)


def make_task(
    name: str, cameras: Sequence[str] = (), image_size: int = 84, max_steps: int | None = None
) -> Task:
    """Build a registered task (see `TASKS`)."""
    return Task(name, cameras=cameras, image_size=image_size, max_steps=max_steps)
