"""Navigation episodes on a `MobilityEnv`: any `robomosaic.sim.vector.Policy` (the route expert, or
a trained chunk policy through `ExecutorPolicy`) over a list of seeds, and their metrics.

    env = MobilityEnv(["carter"] * 16)
    episodes = list(run_navigation(env, range(200), RouteExpertPolicy(env)))
    summary = summarize(episodes)   # success, collision, weighted travel time, with intervals

All worlds step in lock step; a world whose episode ended starts the next unused seed, and a world
with no seed left idles (it steps with a zero command, its results unused). Each episode depends on
its seed only: its world, start, goal and scan noise are drawn from it, and the policy is reset with
it, so results do not depend on the number of worlds.

Weighted travel time is COMPASS's: the mean time of the successful episodes divided by the success
rate (a policy that seldom arrives pays for it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from robomosaic.data.spec import DatasetSpec, KeySpec
from robomosaic.sim.measure_experts import wilson_interval
from robomosaic.sim.mobility.env import MobilityEnv
from robomosaic.sim.mobility.planner import RouteExpert
from robomosaic.sim.vector import Policy

Obs = dict[str, np.ndarray]
STATE_SIZE = 10  # MobilityEnv.get_state: seed, step, pose (3), base velocity (3), goal (2)


@dataclass
class NavEpisode:
    """One finished navigation episode; `trajectory` (when recorded) holds per-step arrays."""

    seed: int
    embodiment: str
    family: str
    success: bool
    collision: bool
    steps: int
    time: float
    trajectory: dict[str, np.ndarray] | None = None


class RouteExpertPolicy:
    """`planner.RouteExpert` as a `Policy` over the worlds of `env`, following the route around
    every obstacle (`env.expert_route`), including those missing from the map the base is given."""

    def __init__(self, env: MobilityEnv) -> None:
        self.env = env
        self.expert = RouteExpert(env.embodiments)

    def reset(self, env_index: int, obs: Obs, seed: int) -> None:
        """The expert keeps no state between steps."""

    def act(self, obs: Sequence[Obs], env_indices: Sequence[int]) -> np.ndarray:
        batch = {"goal": np.stack([o["goal"] for o in obs]), "route": self.env.expert_route(env_indices)}
        return self.expert(batch, worlds=env_indices)


def _rows(obs: Obs, n: int) -> list[Obs]:
    return [{k: v[i] for k, v in obs.items()} for i in range(n)]


def run_navigation(
    env: MobilityEnv,
    seeds: Iterable[int],
    policy: Policy,
    record: bool = False,
    on_episode: Callable[[NavEpisode], None] | None = None,
) -> Iterator[NavEpisode]:
    """Run one episode per seed (see module docstring), yielding each as it ends.

    `record` keeps every step: the observation the action was chosen on, `action`, `reward` (after
    the action), `state` (`env.get_state`, before the action)."""
    pending = iter(seeds)
    running: dict[int, int] = {}  # world -> seed
    steps: dict[int, list[dict[str, np.ndarray]]] = {}

    def start(worlds: list[int]) -> Obs:
        chosen = []
        for i in worlds:
            seed = next(pending, None)
            if seed is None:
                running.pop(i, None)
            else:
                running[i] = int(seed)
                chosen.append(i)
        obs = env.reset_worlds(chosen, [running[i] for i in chosen]) if chosen else env.observe()
        rows = _rows(obs, env.n)
        for i in chosen:
            policy.reset(i, rows[i], running[i])
            steps[i] = []
        return obs

    obs = start(list(range(env.n)))
    while running:
        rows = _rows(obs, env.n)
        active = sorted(running)
        actions = np.zeros((env.n, 3))
        actions[active] = policy.act([rows[i] for i in active], active)
        states = [env.get_state(i) for i in active] if record else []
        obs, reward, terminated, truncated, info = env.step(actions)
        finished = []
        for k, i in enumerate(active):
            if record:
                steps[i].append({**rows[i], "action": actions[i], "reward": reward[i], "state": states[k]})
            if terminated[i] or truncated[i]:
                episode = NavEpisode(
                    seed=running[i],
                    embodiment=env.embodiments[i].name,
                    family=env.worlds[i].family,
                    success=bool(info["success"][i]),
                    collision=bool(info["collision"][i]),
                    steps=int(env.steps[i]),
                    time=float(info["time"][i]),
                    trajectory=_stack(steps[i]) if record else None,
                )
                finished.append(i)
                if on_episode is not None:
                    on_episode(episode)
                yield episode
        if finished:
            obs = start(finished)


def _stack(steps: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([np.asarray(s[k]) for s in steps]) for k in steps[0]}


def summarize(episodes: Sequence[NavEpisode]) -> dict[str, Any]:
    """Success and collision rates (Wilson 95 % intervals), mean time to the goal and the weighted
    travel time (with a bootstrap 95 % interval over episodes) of one set of episodes."""
    n = len(episodes)
    success = np.array([e.success for e in episodes])
    collision = np.array([e.collision for e in episodes])
    times = np.array([e.time for e in episodes])

    def weighted(s: np.ndarray, t: np.ndarray) -> float:
        return float(t[s].mean() / s.mean()) if s.any() else float("inf")

    rng = np.random.default_rng(0)
    draws = [weighted(success[i], times[i]) for i in (rng.integers(0, n, n) for _ in range(1000))]
    finite = np.array([d for d in draws if np.isfinite(d)])
    return {
        "episodes": n,
        "success_rate": float(success.mean()),
        "success_interval": list(wilson_interval(int(success.sum()), n)),
        "collision_rate": float(collision.mean()),
        "collision_interval": list(wilson_interval(int(collision.sum()), n)),
        "mean_success_time": float(times[success].mean()) if success.any() else None,
        "weighted_travel_time": weighted(success, times),
        "weighted_travel_time_interval": (
            [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]
            if len(finite) == len(draws)
            else None
        ),
    }


def navigation_dataset_spec(env: MobilityEnv) -> DatasetSpec:
    """What collection records for navigation: observations, action, reward and the world state."""
    spec = env.spec
    keys = dict(spec.obs)
    keys["action"] = spec.action
    keys["reward"] = KeySpec((), "float32", description="COMPASS reward after the action")
    keys["state"] = KeySpec(
        (STATE_SIZE,), "float64", description="seed, step, pose x y yaw, base velocity, goal x y"
    )
    return DatasetSpec(
        keys=keys,
        control_hz=spec.control_hz,
        robot=spec.robot,
        controller=spec.controller,
        task=spec.name,
        extra={"embodiments": sorted({e.name for e in env.embodiments}), "families": list(env.families)},
    )
