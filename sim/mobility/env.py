"""The batched navigation environment: N worlds stepped together, one embodiment per world.

    env = MobilityEnv(["carter"] * 64)
    obs = env.reset(seeds=range(64))                   # dict of (N, ...) arrays, see `OBS_SPEC`
    obs, reward, terminated, truncated, info = env.step(actions)    # actions (N, 3): vx, vy, yaw rate
    env.reset_worlds([3], [64])                       # a finished world starts its next episode

Every world is a MuJoCo model of its own: the room's walls and obstacles are a fixed pool of boxes
on the world body, moved and resized at reset (no recompilation), and the base is a cylinder on two
slide joints and a hinge. The base moves kinematically (`embodiments.BaseDynamics`); MuJoCo
detects its collisions (`mj_collision`) and casts its range scan (`mj_multiRay`). An episode ends
with success within `GOAL_RADIUS` of the goal, with failure at the first collision, or truncated
after `max_steps` control periods.

Observations are in the base's frame and the same size for every embodiment, so that one policy can
drive them all: the scan is pooled into `SCAN_BINS` sectors around the base (each the nearest return
within `SCAN_CAP`; a sector the scanner does not cover reads `SCAN_CAP`, as "nothing seen"), the
measured velocity, the goal, and the planner's route as waypoints. `raw_scan(i)` gives world i's
scan as its scanner produces it (its own field of view and ray count), for `sensor_msgs/LaserScan`.
"""

from __future__ import annotations

from collections.abc import Sequence

import mujoco
import numpy as np

from robomosaic.data.spec import KeySpec
from robomosaic.sim.mobility.embodiments import (
    BaseDynamics,
    Embodiment,
    embodiment_embedding,
    known_embodiments,
    load_embodiment,
)
from robomosaic.sim.mobility.planner import ROUTE_HOPS, GridPlanner, RouteTable, to_body_frame
from robomosaic.sim.mobility.worlds import FAMILIES, HEIGHT, MAX_BOXES, ROOM, World, make_world
from robomosaic.sim.tasks import TaskSpec

CONTROL_HZ = 10.0
MAX_STEPS = 500  # 50 s
GOAL_RADIUS = 0.5  # m
SCAN_BINS = 36
SCAN_CAP = 5.0  # m
REACH_BONUS, COLLISION_PENALTY = 2000.0, -1000.0  # COMPASS's reward terms

OBS_SPEC: dict[str, KeySpec] = {
    "scan": KeySpec((SCAN_BINS,), "float32", "m", "base", f"nearest return in {SCAN_BINS} sectors, capped"),
    "velocity": KeySpec((3,), "float32", "m/s, rad/s", "base", "measured vx, vy, yaw rate"),
    "goal": KeySpec((2,), "float32", "m", "base", "goal position"),
    "route": KeySpec((2 * len(ROUTE_HOPS),), "float32", "m", "base", "planner route waypoints x, y"),
}
# A cross-embodiment policy also observes which base it drives (COMPASS's embodiment one-hot); the
# single-embodiment base and the residuals observe OBS_SPEC only.
EMBODIMENT_KEY = "embodiment"
EMBODIMENT_SPEC = KeySpec(
    (len(known_embodiments()),), "float32", "", "", f"one-hot of the nearest of {known_embodiments()}"
)
ACTION_SPEC = KeySpec((3,), "float32", "m/s, rad/s", "base", "velocity command vx, vy, yaw rate")


def _model_xml(embodiment: Embodiment) -> str:
    boxes = "\n".join(
        f'<geom name="box{i}" type="box" size="0.1 0.1 {HEIGHT / 2}" pos="0 0 -10"/>'
        for i in range(MAX_BOXES)
    )
    return f"""
<mujoco model="mobility_{embodiment.name}">
  <option timestep="{1 / CONTROL_HZ}" gravity="0 0 0"/>
  <worldbody>
    {boxes}
    <body name="base" pos="0 0 0">
      <joint name="x" type="slide" axis="1 0 0"/>
      <joint name="y" type="slide" axis="0 1 0"/>
      <joint name="yaw" type="hinge" axis="0 0 1"/>
      <geom name="footprint" type="cylinder" size="{embodiment.radius} 0.1" pos="0 0 0.1"/>
    </body>
  </worldbody>
</mujoco>"""


def scan_sectors(angles: np.ndarray) -> np.ndarray:
    """The pooled sector (0 .. SCAN_BINS-1, counter-clockwise from behind) of every ray angle."""
    return ((np.asarray(angles) + np.pi) / (2 * np.pi) * SCAN_BINS).astype(int) % SCAN_BINS


def pool_scan(ranges: np.ndarray, sectors: np.ndarray) -> np.ndarray:
    """(SCAN_BINS,) the nearest return per sector, capped at SCAN_CAP (uncovered sectors read the cap)."""
    pooled = np.full(SCAN_BINS, SCAN_CAP)
    np.minimum.at(pooled, sectors, np.minimum(ranges, SCAN_CAP))
    return pooled


def navigation_obs(
    scan: np.ndarray, velocity: np.ndarray, goal: np.ndarray, route: np.ndarray, pose: np.ndarray
) -> dict[str, np.ndarray]:
    """The policy observation (`OBS_SPEC`) of N bases from pooled scans (N, SCAN_BINS), measured
    body-frame velocities (N, 3), goals (N, 2) and routes (N, hops, 2) in the world frame, and poses
    (N, 3); shared by the environment and the ROS 2 policy node, so both observe alike."""
    return {
        "scan": np.asarray(scan, dtype=np.float32),
        "velocity": np.asarray(velocity, dtype=np.float32),
        "goal": to_body_frame(np.asarray(goal, dtype=np.float64), pose).astype(np.float32),
        "route": to_body_frame(np.asarray(route, dtype=np.float64), pose)
        .reshape(len(pose), -1)
        .astype(np.float32),
    }


class MobilityEnv:
    """N navigation worlds (see module docstring); `embodiments` has one entry per world."""

    def __init__(
        self,
        embodiments: Sequence[str | Embodiment],
        families: Sequence[str] = FAMILIES,
        max_steps: int = MAX_STEPS,
    ) -> None:
        self.embodiments = [load_embodiment(e) for e in embodiments]
        if not self.embodiments:
            raise ValueError("MobilityEnv needs at least one world")
        self.n = len(self.embodiments)
        self.families = tuple(families)
        self.max_steps = int(max_steps)
        self.dynamics = BaseDynamics(self.embodiments)
        self._models: list[mujoco.MjModel] = []
        self._data: list[mujoco.MjData] = []
        self._angles = [e.scan.angles() for e in self.embodiments]  # per world: ray angles, body frame
        self._sector = [scan_sectors(a) for a in self._angles]
        self._ray_dist = [np.empty(len(a)) for a in self._angles]
        self._ray_geom = [np.empty(len(a), dtype=np.int32) for a in self._angles]
        for e in self.embodiments:
            model = mujoco.MjModel.from_xml_string(_model_xml(e))
            self._models.append(model)
            self._data.append(mujoco.MjData(model))
        self._embedding = np.stack([embodiment_embedding(e) for e in self.embodiments])
        self._base_body = self._models[0].body("base").id
        self._footprint = self._models[0].geom("footprint").id
        self.worlds: list[World | None] = [None] * self.n
        self.pose = np.zeros((self.n, 3))
        self.velocity = np.zeros((self.n, 3))
        self.steps = np.zeros(self.n, dtype=int)
        self.seeds = np.zeros(self.n, dtype=int)
        self._rngs = [np.random.default_rng(0) for _ in range(self.n)]
        self._raw_scans: list[np.ndarray] = [np.zeros(len(a)) for a in self._angles]
        self._route = np.zeros((self.n, len(ROUTE_HOPS), 2))
        self._routes = RouteTable(self.n)  # on the map: what the base is told
        self._expert_route = np.zeros((self.n, len(ROUTE_HOPS), 2))
        self._expert_routes = RouteTable(self.n)  # on every obstacle: what the expert knows

    @property
    def spec(self) -> TaskSpec:
        names = sorted({e.name for e in self.embodiments})
        return TaskSpec(
            "nav",
            {**OBS_SPEC, EMBODIMENT_KEY: EMBODIMENT_SPEC},
            ACTION_SPEC,
            CONTROL_HZ,
            self.max_steps,
            robot="+".join(names),
            controller="twist",
        )

    # -- episodes -------------------------------------------------------------------------------
    def reset(self, seeds: Sequence[int]) -> dict[str, np.ndarray]:
        """Start an episode in every world, world i on `seeds[i]`."""
        if len(seeds) != self.n:
            raise ValueError(f"reset: {len(seeds)} seeds for {self.n} worlds")
        return self.reset_worlds(range(self.n), seeds)

    def reset_worlds(self, indices: Sequence[int], seeds: Sequence[int]) -> dict[str, np.ndarray]:
        """Start new episodes in the worlds `indices` (the others keep running); all observations."""
        for i, seed in zip(indices, seeds, strict=True):
            self.set_world(i, make_world(int(seed), families=self.families))
        return self.observe()

    def set_world(self, i: int, world: World, goal: np.ndarray | None = None) -> None:
        """Put world `i` into `world` at its start, heading for `goal` (default the world's own);
        a goal inside or too near an obstacle for this base is refused with `WorldError`."""
        goal = world.goal if goal is None else np.asarray(goal, dtype=np.float64).reshape(2)
        world.check_free(goal, self.embodiments[i].radius)
        world.goal = goal
        model = self._models[i]
        k = len(world.boxes)
        model.geom_pos[:MAX_BOXES] = (0.0, 0.0, -10.0)  # the unused part of the pool, far below
        model.geom_size[:MAX_BOXES, :2] = 0.01
        model.geom_pos[:k, :2] = world.boxes[:, :2]
        model.geom_pos[:k, 2] = HEIGHT / 2
        model.geom_size[:k, :2] = world.boxes[:, 2:4]
        half_yaw = world.boxes[:, 4] / 2
        model.geom_quat[:k] = np.stack([np.cos(half_yaw), 0 * half_yaw, 0 * half_yaw, np.sin(half_yaw)], 1)
        # the bounding volumes MuJoCo's collision broad phase and ray casting cull with
        model.geom_rbound[:MAX_BOXES] = np.linalg.norm(model.geom_size[:MAX_BOXES], axis=1)
        model.geom_aabb[:MAX_BOXES, 3:] = model.geom_size[:MAX_BOXES]
        # The world body's bounding-volume tree (which mj_multiRay culls with) was built around the
        # compile-time box positions; every node becomes the whole room, which culls nothing.
        tree = slice(model.body_bvhadr[0], model.body_bvhadr[0] + model.body_bvhnum[0])
        model.bvh_aabb[tree] = (ROOM / 2, ROOM / 2, HEIGHT / 2, ROOM, ROOM, HEIGHT)
        self.worlds[i] = world
        self._plan(i)
        self.pose[i] = world.start
        self.velocity[i] = 0.0
        self.dynamics.reset(i)
        self.steps[i] = 0
        self.seeds[i] = world.seed
        self._rngs[i] = np.random.default_rng([world.seed, 7002])  # the scan noise of this episode
        self._sense([i])

    def set_goal(self, i: int, goal: np.ndarray) -> None:
        """Send world i's base from where it stands to a new `goal`, as a new episode (its step
        count restarts); a goal inside or too near an obstacle is refused with `WorldError`, and
        the world keeps its goal."""
        world, radius = self.worlds[i], self.embodiments[i].radius
        goal = np.asarray(goal, dtype=np.float64).reshape(2)
        world.check_free(goal, radius)
        world.goal = goal
        self._plan(i)
        self._look_up_routes([i])
        self.steps[i] = 0

    def _plan(self, i: int) -> None:
        """World i's two planners to its goal: on the map (the route the base observes) and on
        every obstacle (the route the expert follows)."""
        world, radius = self.worlds[i], self.embodiments[i].radius
        self._routes.set(i, GridPlanner(world.map_occupancy, radius, world.goal))
        self._expert_routes.set(i, GridPlanner(world.occupancy, radius, world.goal, world.clearance))

    def _look_up_routes(self, indices: Sequence[int] | range) -> None:
        self._route[indices] = self._routes.route(self.pose[indices, :2], indices)
        self._expert_route[indices] = self._expert_routes.route(self.pose[indices, :2], indices)

    def step(
        self, actions: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """One control period in every world. A finished world must be reset before it steps again."""
        actions = np.asarray(actions, dtype=np.float64).reshape(self.n, 3)
        bad = np.flatnonzero(~np.isfinite(actions).all(axis=1))
        if len(bad):
            raise ValueError(f"worlds {bad.tolist()}: action is not finite: {actions[bad].tolist()}")
        before = self.goal_distance()
        self.pose, self.velocity = self.dynamics.step(self.pose, actions, 1 / CONTROL_HZ)
        self.steps += 1
        collision = self._sense(range(self.n))
        after = self.goal_distance()
        success = (after <= GOAL_RADIUS) & ~collision
        truncated = (self.steps >= self.max_steps) & ~success & ~collision
        terms = {
            "goal_distance": -after,  # COMPASS's per-step reward, -||goal||
            "progress": before - after,
            "reached": np.where(success, REACH_BONUS, 0.0),
            "collision": np.where(collision, COLLISION_PENALTY, 0.0),
        }
        reward = terms["goal_distance"] + terms["reached"] + terms["collision"]
        info = {
            "success": success,
            "collision": collision,
            "time": self.steps / CONTROL_HZ,
            "reward_terms": terms,
        }
        return self.observe(), reward, success | collision, truncated, info

    # -- sensing ----------------------------------------------------------------------------------
    def _sense(self, indices: Sequence[int] | range) -> np.ndarray:
        """Move the bases of worlds `indices` in MuJoCo to their poses, cast their scans and look up
        their routes; return which of them touch an obstacle."""
        collided = np.zeros(len(indices), dtype=bool)
        for row, i in enumerate(indices):
            model, data, scan = self._models[i], self._data[i], self.embodiments[i].scan
            data.qpos[:] = self.pose[i]
            mujoco.mj_kinematics(model, data)
            mujoco.mj_collision(model, data)  # only the base can collide: the boxes share one body
            collided[row] = data.ncon > 0 and bool((data.contact.dist[: data.ncon] < 0).any())
            x, y, yaw = self.pose[i]
            angles = self._angles[i] + yaw
            vec = np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)], axis=1)
            dist, geom = self._ray_dist[i], self._ray_geom[i]
            start = np.array([x, y, scan.height])
            mujoco.mj_multiRay(
                model, data, start, vec.ravel(), None, 1, self._base_body, geom, dist, len(dist), scan.range
            )
            dist[dist < 0] = scan.range  # no return within range
            noisy = dist + self._rngs[i].normal(0.0, scan.noise, len(dist))
            self._raw_scans[i] = np.clip(noisy, 0.0, scan.range)
        self._look_up_routes(indices)
        return collided

    def raw_scan(self, i: int) -> np.ndarray:
        """World i's last scan as its scanner produced it: (rays,) ranges in m over `scan.angles()`."""
        return self._raw_scans[i].copy()

    def goal_distance(self) -> np.ndarray:
        goals = np.array([w.goal for w in self.worlds])
        return np.linalg.norm(goals - self.pose[:, :2], axis=1)

    def observe(self) -> dict[str, np.ndarray]:
        """The observation of every world (`OBS_SPEC` and `EMBODIMENT_KEY`), each key (N, ...)."""
        goals = np.array([w.goal for w in self.worlds])
        obs = navigation_obs(
            np.stack([pool_scan(r, s) for r, s in zip(self._raw_scans, self._sector, strict=True)]),
            self.velocity,
            goals,
            self._route,
            self.pose,
        )
        obs[EMBODIMENT_KEY] = self._embedding.copy()
        return obs

    def expert_route(self, indices: Sequence[int]) -> np.ndarray:
        """(len(indices), hops * 2) the route around every obstacle, mapped or not, in each base's
        frame: privileged information for the expert, never part of the observation."""
        indices = list(indices)
        route = to_body_frame(self._expert_route[indices], self.pose[indices])
        return route.reshape(len(indices), -1).astype(np.float32)

    def route(self, i: int) -> np.ndarray:
        """World i's current route: (hops, 2) waypoints in the world frame, the last one nearest the goal."""
        return self._route[i].copy()

    def get_state(self, i: int) -> np.ndarray:
        """World i's state: seed, step, pose (x, y, yaw), base velocity and goal (x, y)."""
        return np.array(
            [self.seeds[i], self.steps[i], *self.pose[i], *self.dynamics.velocity[i], *self.worlds[i].goal]
        )
