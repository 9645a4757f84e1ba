"""RAPTOR hover trim: gradients through the real simulator remove a steady thrust bias."""

import math

import pytest
import torch
from torch import nn

from robomosaic.policies.raptor import PRETRAINED_STUDENT
from robomosaic.policies.raptor.distill import DistillConfig
from robomosaic.policies.raptor.student import RaptorStudent
from robomosaic.policies.raptor.trim import TrimConfig, settled_position_loss, trim
from robomosaic.sim.quadrotor import dynamics
from robomosaic.sim.quadrotor.params import sample_params


class BiasedStudent(nn.Module):
    """The shipped student with a learnable constant added to every motor command: a stand-in for
    the steady offset imitation leaves, with the student itself frozen so only the bias can move."""

    def __init__(self, bias: float) -> None:
        super().__init__()
        self.student = RaptorStudent.load(PRETRAINED_STUDENT).requires_grad_(False)
        self.bias = nn.Parameter(torch.full((4,), bias))

    def step(self, obs: torch.Tensor, hidden: torch.Tensor | None = None):
        action, hidden = self.student.step(obs, hidden, clip=False)
        return (action + self.bias).clamp(-1, 1), hidden


def settled_rmse(policy: nn.Module, seed: int = 7) -> tuple[float, int]:
    """Hover RMSE over the second of 2 s from rest on 16 sampled vehicles, and how many survived."""
    params = sample_params(16, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        loss, alive = settled_position_loss(
            policy, dynamics.hover_state(params), params, steps=200, settle_steps=100
        )
    return math.sqrt(float(loss)), int(alive.sum())


def test_trim_removes_a_thrust_bias():
    torch.manual_seed(0)
    unbiased, _ = settled_rmse(BiasedStudent(bias=0.0))
    policy = BiasedStudent(bias=0.08)
    before, survived_before = settled_rmse(policy)
    config = TrimConfig(iterations=20, vehicles=16, episode_steps=150, settle_steps=75, lr=0.01)
    metrics = list(trim(policy, lambda generator: torch.zeros(()), config))
    after, survived_after = settled_rmse(policy)
    print(f"bias {policy.bias.tolist()}: RMSE {before:.3f} -> {after:.3f} m (unbiased {unbiased:.3f} m)")
    assert len(metrics) == 20 and metrics[-1]["skipped"] == 0
    assert before > unbiased + 0.2, "the bias should lift the vehicles well above their target"
    # the trim takes the injected bias out again: back to (about) the student's own error
    assert policy.bias.abs().max() < 0.04
    assert after < unbiased + 0.25 * (before - unbiased) and survived_after >= survived_before


def test_settled_position_loss_has_a_gradient_through_the_simulator():
    policy = BiasedStudent(bias=0.0)
    params = sample_params(4, torch.Generator().manual_seed(1))
    loss, _ = settled_position_loss(policy, dynamics.hover_state(params), params, steps=30, settle_steps=10)
    loss.backward()
    assert policy.bias.grad is not None and torch.isfinite(policy.bias.grad).all()
    assert policy.bias.grad.abs().sum() > 0


def test_trim_config_names_bad_keys_and_values():
    with pytest.raises(KeyError, match="learning_rate"):
        TrimConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="settle_steps"):
        TrimConfig.from_dict({"episode_steps": 100, "settle_steps": 100})


def test_distill_config_reads_and_checks_its_trim_section():
    config = DistillConfig.from_dict({"trim": {"iterations": 3, "lr": 0.01}})
    assert config.trim == TrimConfig(iterations=3, lr=0.01)
    with pytest.raises(KeyError, match="learning_rate"):
        DistillConfig.from_dict({"trim": {"learning_rate": 1e-3}})
    with pytest.raises(ValueError, match="settle_steps"):
        DistillConfig(trim={"episode_steps": 100, "settle_steps": 100})
