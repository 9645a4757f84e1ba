"""PickOne environment and its expert, on real robosuite."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from robomosaic.sim import make_task
from robomosaic.sim.envs.pick_one import (
    COLOURS,
    LIFT_MARGIN,
    MIN_CUBE_SPACING,
    cube_pos_slice,
    cube_quat_slice,
)
from robomosaic.sim.experts.pick_one import Expert


@pytest.fixture(scope="module")
def task():
    task = make_task("pick_one")
    yield task
    task.close()


def table_height(task) -> float:
    return float(task.env.model.mujoco_arena.table_offset[2])


def test_three_cubes_on_the_table_apart_in_the_documented_layout(task):
    obs = task.reset(seed=4)
    assert task.spec.obs["object"].shape == (30,)
    env = task.env
    positions = {}
    for colour in COLOURS:
        body = env.sim.model.body_name2id(env.cubes[colour].root_body)
        positions[colour] = obs["object"][cube_pos_slice(colour)]
        np.testing.assert_allclose(positions[colour], env.sim.data.body_xpos[body])
        np.testing.assert_allclose(np.linalg.norm(obs["object"][cube_quat_slice(colour)]), 1.0)
        assert positions[colour][2] > table_height(task)
    for a, b in itertools.combinations(COLOURS, 2):
        assert np.linalg.norm(positions[a][:2] - positions[b][:2]) >= MIN_CUBE_SPACING
    gripper_to_cubes = obs["object"][21:30].reshape(3, 3)
    for colour, vector in zip(COLOURS, gripper_to_cubes, strict=True):
        np.testing.assert_allclose(vector, positions[colour] - obs["robot0_eef_pos"], atol=1e-9)
    assert task.info() == {"success": False, "behaviour": ""}


def test_same_seed_same_scene_even_in_a_new_task(task):
    first = task.reset(seed=11)
    task.reset(seed=12)
    again = task.reset(seed=11)
    other = make_task("pick_one")
    try:
        fresh = other.reset(seed=11)
    finally:
        other.close()
    for key in ("object", "robot0_eef_pos", "robot0_gripper_qpos"):
        np.testing.assert_array_equal(first[key], again[key])
        np.testing.assert_array_equal(first[key], fresh[key])
    assert not np.allclose(first["object"], task.reset(seed=12)["object"])


def test_success_and_behaviour_follow_the_cube_height(task):
    task.reset(seed=2)
    env = task.env
    joint = env.cubes["blue"].joints[0]
    qpos = env.sim.data.get_joint_qpos(joint).copy()
    for height, lifted in ((LIFT_MARGIN - 0.01, False), (LIFT_MARGIN + 0.01, True)):
        qpos[2] = table_height(task) + height
        env.sim.data.set_joint_qpos(joint, qpos)
        env.sim.forward()
        assert task.info() == {"success": lifted, "behaviour": "blue" if lifted else ""}


@pytest.mark.parametrize("colour", COLOURS)
def test_expert_lifts_the_cube_it_is_told_to(task, colour):
    for seed in (0, 1):
        obs = task.reset(seed=seed)
        expert = Expert(target=colour)
        expert.reset(obs, np.random.default_rng(seed))
        for _ in range(task.max_steps):
            obs, reward, terminated, truncated, info = task.step(expert(obs))
            if terminated or truncated:
                break
        assert terminated, f"seed {seed}: the {colour} cube was not lifted"
        assert info["behaviour"] == colour
        assert reward == pytest.approx(1.0)
        others = [c for c in COLOURS if c != colour]
        heights = task.env.cube_heights()
        assert all(heights[c] < LIFT_MARGIN for c in others)


def test_expert_picks_each_colour_about_a_third_of_the_time(task):
    obs = task.reset(seed=0)
    expert = Expert()
    picks = Counter()
    for i in range(300):
        expert.reset(obs, np.random.default_rng(i))
        picks[expert.colour] += 1
    assert set(picks) == set(COLOURS)
    assert all(70 <= n <= 130 for n in picks.values()), picks


def test_expert_rejects_an_unknown_colour():
    with pytest.raises(ValueError, match="purple"):
        Expert(target="purple")
