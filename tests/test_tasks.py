"""The task API on real robosuite: seeded resets, step contract, input checks, states, cameras."""

from __future__ import annotations

import numpy as np
import pytest

from robomosaic.sim.tasks import make_task


@pytest.fixture(scope="module")
def lift():
    task = make_task("lift")
    yield task
    task.close()


def test_reset_is_determined_by_the_seed(lift):
    a = lift.reset(seed=3)
    lift.step(np.ones(7))  # disturb the scene in between
    b = lift.reset(seed=3)
    c = lift.reset(seed=4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert np.linalg.norm(a["object"][:3] - c["object"][:3]) > 1e-3


def test_step_returns_the_spec_shapes_and_info(lift):
    obs = lift.reset(seed=0)
    assert set(obs) == set(lift.spec.obs)
    obs, reward, terminated, truncated, info = lift.step(np.zeros(7))
    for key, spec in lift.spec.obs.items():
        assert obs[key].shape == spec.shape, key
        assert obs[key].dtype == np.dtype(spec.dtype), key
    assert isinstance(reward, float)
    assert terminated is False and truncated is False
    assert set(info) >= {"success", "behaviour"} and info["success"] is False
    assert lift.spec.action.shape == (7,)


@pytest.mark.parametrize(
    ("action", "message"), [(np.zeros(6), "shape"), (np.array([0, 0, np.nan, 0, 0, 0, 0]), "not finite")]
)
def test_bad_actions_are_rejected(lift, action, message):
    lift.reset(seed=0)
    with pytest.raises(ValueError, match=message) as err:
        lift.step(action)
    assert "lift" in str(err.value)


def test_state_round_trip_restores_the_observation(lift):
    lift.reset(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(5):
        lift.step(rng.uniform(-1, 1, 7))
    state, expected = lift.get_state(), lift.observe()
    for _ in range(5):
        lift.step(rng.uniform(-1, 1, 7))
    moved = lift.observe()
    assert not np.allclose(moved["robot0_eef_pos"], expected["robot0_eef_pos"])
    restored = lift.set_state(state)
    for key in expected:
        np.testing.assert_allclose(restored[key], expected[key], atol=1e-9, err_msg=key)


def test_unknown_task_is_named():
    with pytest.raises(KeyError, match="no_such_task"):
        make_task("no_such_task")


def test_camera_observation_and_truncation():
    task = make_task("lift", cameras=("agentview",), image_size=32, max_steps=2)
    try:
        obs = task.reset(seed=1)
        image = obs["agentview_image"]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert image.std() > 10  # a rendered scene, not a blank frame
        assert task.spec.image_keys == ["agentview_image"]
        _, _, _, truncated, _ = task.step(np.zeros(7))
        assert not truncated
        _, _, _, truncated, _ = task.step(np.zeros(7))
        assert truncated
    finally:
        task.close()
