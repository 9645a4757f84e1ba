"""Vectorized rollouts (worker processes against in-process) and mp4 writing."""

from __future__ import annotations

import imageio.v2 as imageio
import numpy as np
import pytest

from robomosaic.sim.vector import ExpertPolicy, VectorTask, WorkerError, run_episodes, stack_obs
from robomosaic.sim.video import write_mp4

SEEDS = [0, 1, 2]


def test_two_workers_reproduce_the_in_process_rollouts():
    kwargs = {"record": True, "progress": False}
    workers = run_episodes("lift", SEEDS, ExpertPolicy("lift"), n_envs=2, **kwargs)
    local = run_episodes("lift", SEEDS, ExpertPolicy("lift"), n_envs=1, **kwargs)
    assert [r.seed for r in workers] == SEEDS
    for w, loc in zip(workers, local, strict=True):
        assert w.success and loc.success
        assert w.length == loc.length
        assert set(w.trajectory) == set(loc.trajectory)
        for key in loc.trajectory:
            assert len(loc.trajectory[key]) == loc.length, key
            np.testing.assert_array_equal(w.trajectory[key], loc.trajectory[key], err_msg=key)
    assert w.trajectory["action"].dtype == np.float32 and w.trajectory["action"].shape[1:] == (7,)


def test_worker_error_names_task_and_seed():
    with VectorTask("lift", n_envs=2) as vec:
        obs = vec.reset([10, 11])
        assert stack_obs(obs)["object"].shape == (2, *vec.spec.obs["object"].shape)
        actions = np.zeros((2, 7))
        actions[1, 0] = np.nan
        with pytest.raises(WorkerError, match=r"(?s)'lift'.*seed 11.*not finite"):
            vec.step(actions)
        # the healthy worker answered too, so the pipes stay in step and the envs remain usable
        _, rewards, *_ = vec.step(np.zeros((2, 7)))
        assert rewards.shape == (2,)
        states = vec.get_states()
        assert len(states) == 2 and states[0].ndim == 1


class FailingExpert(ExpertPolicy):
    """The lift expert, failing in the third step of seed 1."""

    def act(self, obs, env_indices):
        self.calls = getattr(self, "calls", {})
        for i in env_indices:
            self.calls[i] = self.calls.get(i, 0) + 1
            if self.seeds[i] == 1 and self.calls[i] == 3:
                raise RuntimeError("policy failed on seed 1")
        return super().act(obs, env_indices)

    def reset(self, env_index, obs, seed):
        self.seeds = {**getattr(self, "seeds", {}), env_index: seed}
        self.calls = {**getattr(self, "calls", {}), env_index: 0}
        super().reset(env_index, obs, seed)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_policy_error_stops_the_rollout_in_either_mode(asynchronous):
    with pytest.raises(RuntimeError, match="policy failed on seed 1"):
        policy = FailingExpert("lift")
        run_episodes("lift", SEEDS, policy, n_envs=2, progress=False, asynchronous=asynchronous)


def test_worker_start_failure_is_reported():
    """Workers build their tasks in the background; the first command reports a failure."""
    vec = VectorTask("no_such_task", n_envs=2)
    with pytest.raises(WorkerError, match=r"(?s)no_such_task.*starting.*KeyError"):
        vec.reset([0, 1])


def test_video_of_a_rollout(tmp_path):
    (result,) = run_episodes(
        "lift",
        [0],
        ExpertPolicy("lift"),
        max_steps=4,
        video_camera="agentview",
        video_size=32,
        progress=False,
    )
    assert result.length == 4 and not result.success
    assert result.frames.shape == (5, 32, 32, 3) and result.frames.dtype == np.uint8
    path = write_mp4(tmp_path / "videos" / "lift.mp4", result.frames, fps=10)
    frames = imageio.mimread(path)
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((3, 32, 32, 3), np.float32), "dtype float32"),
        (np.zeros((3, 32, 32), np.uint8), "shape"),
        (np.zeros((3, 31, 32, 3), np.uint8), "even"),
        (np.zeros((0, 32, 32, 3), np.uint8), "no frames"),
    ],
)
def test_write_mp4_rejects_bad_frames(tmp_path, frames, message):
    with pytest.raises(ValueError, match=message):
        write_mp4(tmp_path / "bad.mp4", frames)
