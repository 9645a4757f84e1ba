"""The scripted experts solve their tasks on fixed seeds, and vary between episodes."""

from __future__ import annotations

import numpy as np
import pytest

from robomosaic.sim.experts import make_expert
from robomosaic.sim.experts.base import yaw_error
from robomosaic.sim.tasks import make_task


def rollout(task, expert, seed: int, expert_seed: int) -> tuple[bool, np.ndarray]:
    obs = task.reset(seed)
    expert.reset(obs, np.random.default_rng(expert_seed))
    actions = []
    for _ in range(task.max_steps):
        actions.append(expert(obs))
        obs, _, terminated, truncated, _ = task.step(actions[-1])
        if terminated or truncated:
            return terminated, np.array(actions)
    raise AssertionError("the task must end by truncation")


@pytest.mark.parametrize(("name", "seeds"), [("lift", [0, 1, 2]), ("stack", [0, 1])])
def test_expert_succeeds(name, seeds):
    task, expert = make_task(name), make_expert(name)
    try:
        for seed in seeds:
            success, actions = rollout(task, expert, seed, seed)
            assert success, f"{name} expert failed on seed {seed}"
            assert len(actions) < task.max_steps
    finally:
        task.close()


def test_expert_demonstrations_vary_with_the_expert_rng():
    task, expert = make_task("lift"), make_expert("lift")
    try:
        ok_a, a = rollout(task, expert, seed=7, expert_seed=1)
        ok_b, b = rollout(task, expert, seed=7, expert_seed=2)
    finally:
        task.close()
    assert ok_a and ok_b
    n = min(len(a), len(b))
    assert np.abs(a[:n] - b[:n]).max() > 0.05


def test_yaw_error_turns_at_most_an_eighth_of_a_turn():
    def quat_z(angle: float) -> np.ndarray:  # xyzw rotation about world z
        return np.array([0.0, 0.0, np.sin(angle / 2), np.cos(angle / 2)])

    assert yaw_error(quat_z(0.0), quat_z(0.3)) == pytest.approx(0.3)
    assert yaw_error(quat_z(0.0), quat_z(np.pi / 2 + 0.1)) == pytest.approx(0.1)
    assert yaw_error(quat_z(0.2), quat_z(-0.1 + np.pi)) == pytest.approx(-0.3)
    for angle in np.linspace(-np.pi, np.pi, 13):
        assert abs(yaw_error(quat_z(0.0), quat_z(angle))) <= np.pi / 4 + 1e-9
