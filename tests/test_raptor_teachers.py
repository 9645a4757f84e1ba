"""RAPTOR teachers: the batched PPO ensemble acts per teacher, saves bit-identically, learns, resumes."""

from __future__ import annotations

import json

import pytest
import torch

from robomosaic.policies.raptor.teachers import (
    METRICS,
    TeacherConfig,
    TeacherEnsemble,
    evaluate_teachers,
    train_teachers,
)
from robomosaic.sim.quadrotor.dynamics import PRIVILEGED_OBS_DIM, QuadrotorBatch
from robomosaic.sim.quadrotor.params import sample_params


def small_config(**overrides) -> TeacherConfig:
    values = dict(n_teachers=2, envs_per_teacher=32, rollout_steps=32, hidden=32, total_steps=32 * 32 * 4)
    values.update(overrides)
    return TeacherConfig(**values)


def privileged_obs(n: int) -> torch.Tensor:
    env = QuadrotorBatch(sample_params(n, torch.Generator().manual_seed(5)), torch.Generator().manual_seed(6))
    return env.observe(privileged=True)


def test_act_is_batched_and_teacher_specific():
    config = small_config(n_teachers=3)
    ensemble = TeacherEnsemble(config, sample_params(3, torch.Generator().manual_seed(1)))
    obs = privileged_obs(5)
    obs = torch.cat([obs, obs, obs])  # every observation seen by every teacher
    index = torch.arange(3).repeat_interleave(5)
    actions = ensemble.act(obs, index)
    assert actions.shape == (15, 4)
    assert actions.abs().max() <= 1
    # batched answers equal one-teacher-at-a-time answers
    for k in range(3):
        rows = index == k
        alone = ensemble.act(obs[rows], torch.full((5,), k))
        torch.testing.assert_close(actions[rows], alone)
    # the same observation gets a different action from a different teacher (own vehicle, own init)
    assert (actions[:5] - actions[5:10]).abs().max() > 1e-3
    assert (actions[5:10] - actions[10:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="teacher_index"):
        ensemble.act(obs[:2], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="obs must be"):
        ensemble.act(obs[:, :22], index)


def test_save_load_round_trip_is_bit_identical(tmp_path):
    config = small_config()
    ensemble = TeacherEnsemble(config, sample_params(2, torch.Generator().manual_seed(2)))
    with torch.no_grad():  # make the statistics non-trivial
        ensemble.update_obs_statistics(torch.randn(2, 50, PRIVILEGED_OBS_DIM))
    ensemble.save(tmp_path)
    loaded = TeacherEnsemble.load(tmp_path)
    assert loaded.config == config
    for name, tensor in ensemble.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    for name in ("mass", "inertia", "thrust_curve", "disturbance_force"):
        assert torch.equal(getattr(ensemble.params, name), getattr(loaded.params, name)), name
    obs = privileged_obs(4)
    index = torch.tensor([0, 1, 1, 0])
    assert torch.equal(ensemble.act(obs, index), loaded.act(obs, index))
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    (tmp_path / "teachers.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="teachers.safetensors"):
        TeacherEnsemble.load(tmp_path)


def test_short_training_improves_return_and_resumes(tmp_path):
    # The exploring policy PPO optimises (LQR prior + MLP residual, noise std 0.2, full-size random
    # starts, hover), evaluated on the same seeds (starts and action noise) before and after training.
    config = small_config(
        total_steps=32 * 32 * 12,
        checkpoint_every=6,
        anneal_lr=False,
        learning_rate=1e-3,
        initial_log_std=-1.6,
        curriculum_start=1.0,
        hover_fraction=1.0,
    )
    params = sample_params(2, torch.Generator().manual_seed(3))

    def evaluate(ensemble: TeacherEnsemble) -> dict[str, torch.Tensor]:
        return evaluate_teachers(
            ensemble,
            episodes_per_teacher=32,
            steps=200,
            settle_steps=100,
            seed=11,
            stochastic=True,
            termination=config.training_termination,
        )

    before = evaluate(TeacherEnsemble(config, params))

    half = TeacherConfig(**{**config.to_dict(), "total_steps": 32 * 32 * 6})
    train_teachers(half, tmp_path, params=params, progress=False)
    saved = json.loads((tmp_path / "training_state.json").read_text())
    assert saved["step"] == 32 * 32 * 6 and saved["iteration"] == 6
    # resuming with a longer budget continues from the saved step, not from zero
    ensemble = train_teachers(config, tmp_path, params=params, progress=False)
    saved = json.loads((tmp_path / "training_state.json").read_text())
    assert saved["step"] == 32 * 32 * 12 and saved["iteration"] == 12
    records = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["iteration"] for r in records] == sorted(r["iteration"] for r in records)
    assert records[-1]["iteration"] == 12

    for tensor in ensemble.state_dict().values():
        assert torch.isfinite(tensor).all()
    after = evaluate(ensemble)
    assert after["mean_return"].mean() > before["mean_return"].mean() + 5

    # a checkpoint trained with another config is not silently resumed
    with pytest.raises(ValueError, match="different TeacherConfig"):
        train_teachers(small_config(hidden=16), tmp_path, params=params, progress=False)


def test_lqr_prior_alone_recovers_from_random_starts():
    """Before any training, each teacher's prior (its own vehicle's LQR gain plus the feedforward
    against its disturbance force) already hovers from RAPTOR's 90-degree starts; without the prior
    the same untrained ensemble (hover command only) crashes."""
    params = sample_params(4, torch.Generator().manual_seed(7))
    with_prior = evaluate_teachers(
        TeacherEnsemble(small_config(n_teachers=4), params), episodes_per_teacher=16, steps=400, seed=3
    )
    assert with_prior["survival"].min() >= 0.9
    assert with_prior["hover_rmse"].max() < 0.3
    without = evaluate_teachers(
        TeacherEnsemble(small_config(n_teachers=4, prior="none"), params),
        episodes_per_teacher=16,
        steps=400,
        seed=3,
    )
    assert without["survival"].mean() < 0.5


def test_zero_steps_saves_the_prior_only(tmp_path):
    config = small_config(total_steps=0)
    params = sample_params(2, torch.Generator().manual_seed(8))
    ensemble = train_teachers(config, tmp_path, params=params, progress=False)
    fresh = TeacherEnsemble(config, params)
    assert torch.equal(ensemble.prior_gain, fresh.prior_gain)
    assert torch.equal(ensemble.actor.layers[0].weight, fresh.actor.layers[0].weight)
    loaded = TeacherEnsemble.load(tmp_path)
    assert torch.equal(loaded.obs_mean, ensemble.obs_mean)
    assert json.loads((tmp_path / "training_state.json").read_text())["step"] == 0
