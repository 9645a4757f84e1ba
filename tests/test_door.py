"""The door expert, on real robosuite Door (no latch)."""

from __future__ import annotations

import numpy as np
import pytest

from robomosaic.sim import make_task
from robomosaic.sim.experts import make_expert
from robomosaic.sim.experts.door import HINGE_IN_DOOR, door_heading, in_world


@pytest.fixture(scope="module")
def task():
    task = make_task("door")
    yield task
    task.close()


def test_door_pose_recovered_from_the_observation_matches_the_model(task):
    """The expert's door.xml constants, checked against the simulator at several door angles."""
    env = task.env
    hinge = env.sim.model.joint_name2id(env.door.joints[0])
    door_body = env.object_body_ids["door"]
    for seed, angle in ((0, 0.0), (1, 0.2), (2, 0.35)):
        task.reset(seed=seed)
        env.sim.data.qpos[env.hinge_qpos_addr] = angle
        env.sim.forward()
        obs = task.observe()
        assert obs["object"][6] == pytest.approx(angle)
        x_axis = env.sim.data.body_xmat[door_body].reshape(3, 3)[:, 0]
        assert door_heading(obs) == pytest.approx(np.arctan2(x_axis[1], x_axis[0]), abs=1e-6)
        anchor = env.sim.data.xanchor[hinge]
        np.testing.assert_allclose(in_world(obs, HINGE_IN_DOOR)[:2], anchor[:2], atol=1e-6)


@pytest.mark.parametrize("seed", [0, 7, 21])
def test_expert_opens_the_door(task, seed):
    expert = make_expert("door")
    obs = task.reset(seed=seed)
    expert.reset(obs, np.random.default_rng(seed))
    assert not task.info()["success"]
    for _ in range(task.max_steps):
        obs, reward, terminated, truncated, _ = task.step(expert(obs))
        if terminated or truncated:
            break
    assert terminated, f"seed {seed}: hinge at {obs['object'][6]:.3f} rad after {task.max_steps} steps"
    assert obs["object"][6] > 0.3
    assert reward == pytest.approx(1.0)


def test_expert_refuses_the_latched_door():
    obs = {"object": np.zeros(14), "robot0_eef_pos": np.zeros(3), "robot0_eef_quat": np.array([1.0, 0, 0, 0])}
    with pytest.raises(ValueError, match="use_latch"):
        make_expert("door").reset(obs, np.random.default_rng(0))
