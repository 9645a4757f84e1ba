"""Hover trim: fine-tune a distilled policy through the differentiable simulator.

Meta-imitation leaves the student with a steady hover offset that every vehicle shares (+0.11 m up,
-0.04 m sideways, 1 cm of ripple; 1.55-1.69x its own teachers' hover RMSE). The imitation loss is
dominated by the large actions of the recoveries from 90-degree tilts, and a thrust bias of 0.02 at
the settled state costs it almost nothing. Weighting the settled steps of the imitation loss more
helped little: x20 lowered the hover-from-rest RMSE on the evaluation vehicles from 0.148 m to
0.126-0.138 m, x100 raised it to 0.163 m; this trim brought it to 0.099 m (own teachers: 0.101 m).

This stage optimizes what the offset is: the position error after settling, by backpropagation
through the batched RK4 simulator (dynamics.step is plain torch, so the gradient is analytic; the
same idea as learning quadrotor control with differentiable simulation, Heeg et al. 2024). Every
iteration flies a fresh batch of sampled vehicles (not the teachers', not the evaluation's) from
random starts for ``episode_steps`` and minimises the mean squared position error from
``settle_steps`` on, plus ``imitation_weight`` times the imitation loss on the aggregated teacher
data, which keeps the recoveries the teachers taught. This is our addition to RAPTOR's recipe (the
paper distils 1000 teachers and stops there); `robomosaic-raptor eval` reports the student before it
as an ablation. A small learning rate matters: two Adam steps at 1e-3 tripled the hover error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robomosaic.conf import check_known_keys
from robomosaic.sim.quadrotor import dynamics
from robomosaic.sim.quadrotor.params import QuadrotorParams, sample_params

TRIM_SEED = 2_000_000  # the trim's vehicles: teachers use seed 0 upwards, evaluation 1_000_000


@dataclass
class TrimConfig:
    iterations: int = 200  # 0 skips the stage (the imitation policy is final)
    vehicles: int = 128  # sampled afresh every iteration
    episode_steps: int = 300
    settle_steps: int = 100  # the position error counts from here on
    lr: float = 1e-4
    imitation_weight: float = 1.0
    imitation_batch: int = 64  # episodes of the aggregated imitation data per iteration
    max_angle: float = math.pi / 6  # random starts: tilt, speed (sample_initial_state)
    max_velocity: float = 0.5
    grad_clip: float = 1.0
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrimConfig:
        check_known_keys(values, cls, "trim config")
        config = cls(**values)
        if (
            config.iterations < 0
            or config.vehicles < 1
            or not 0 <= config.settle_steps < config.episode_steps
        ):
            raise ValueError(
                f"trim config: need iterations >= 0, vehicles >= 1 and 0 <= settle_steps < episode_steps, "
                f"got {config.iterations}, {config.vehicles}, {config.settle_steps}, {config.episode_steps}"
            )
        return config


def settled_position_loss(
    policy: nn.Module,
    initial_state: torch.Tensor,
    params: QuadrotorParams,
    steps: int,
    settle_steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fly ``policy`` to hover at the origin with gradients through the simulator; returns the mean
    squared position error over the steps from ``settle_steps`` on (vehicles that terminated stop
    counting) and which vehicles survived. A terminated vehicle is frozen, so its state stays finite."""
    state = initial_state
    previous_action = dynamics.hover_action(params)
    alive = torch.ones(len(params), dtype=torch.bool)
    hidden = None
    total = state.new_zeros(())
    counted = 0
    for t in range(steps):
        obs = dynamics.observe(state, previous_action)
        action, hidden = policy.step(obs.float(), hidden)
        action = torch.where(alive[:, None], action.to(params.dtype), previous_action.detach())
        state = torch.where(alive[:, None], dynamics.step(state, action, params), state.detach())
        previous_action = action
        alive = alive & ~dynamics.terminated(state.detach())
        if t >= settle_steps:
            squared = state[:, dynamics.POSITION].pow(2).sum(dim=-1)
            total = total + torch.where(alive, squared, torch.zeros_like(squared)).sum()
            counted += int(alive.sum())
    return total / max(counted, 1), alive


def trim(
    policy: nn.Module,
    imitation_loss: Callable[[torch.Generator], torch.Tensor],
    config: TrimConfig,
    progress: bool = False,
    description: str = "trim",
) -> Iterator[dict[str, float]]:
    """Adam on the settled position error + ``imitation_weight`` x ``imitation_loss(generator)`` (the
    policy's imitation loss on a random batch of teacher data); yields {"iteration", "settled_rmse",
    "imitation_loss", "survival", "skipped"} after every iteration. An iteration whose gradient is not
    finite is skipped and counted."""
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(TRIM_SEED + config.seed)
    skipped = 0
    policy.train()
    bar = tqdm(range(config.iterations), desc=description, disable=not progress, leave=False)
    for iteration in bar:
        params = sample_params(config.vehicles, generator)
        initial = dynamics.sample_initial_state(
            params, generator, max_angle=config.max_angle, max_velocity=config.max_velocity
        )
        task, alive = settled_position_loss(
            policy, initial, params, config.episode_steps, config.settle_steps
        )
        imitation = imitation_loss(generator)
        optimizer.zero_grad()
        (task + config.imitation_weight * imitation).backward()
        norm = nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
        if torch.isfinite(norm):
            optimizer.step()
        else:
            skipped += 1
        metrics = {
            "iteration": iteration + 1,
            "settled_rmse": float(task.detach().sqrt()),
            "imitation_loss": float(imitation.detach()),
            "survival": float(alive.float().mean()),
            "skipped": skipped,
        }
        bar.set_postfix(rmse=f"{metrics['settled_rmse']:.3f}")
        yield metrics
    policy.eval()
