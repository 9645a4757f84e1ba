"""The inference core: a trained policy reaches the samplers as a *bound denoiser*, and
`sample_chunk` is the one function that samples chunks from one or several of them.

    bound = policy.bind(obs)                                   # its own encoder, its own noise process
    chunk = sample_chunk(bound)                                # (B, horizon, action_dim), robot units
    chunk = sample_chunk([a.bind(obs), b.bind(obs)], weights=[0.3, 0.7])           # GPC
    chunk = sample_chunk(bound, committed=known)               # real-time chunking

`sample_chunk` is the only caller of `samplers.sample` and the one place where composition
(docs/design.md: convex, AND, OR), guidance and real-time chunking (inpainting of committed
actions) are applied. Parents are composed in one normalized action space, so their action
normalizations must agree (`check_same_action_space`); they may have different noise processes,
sampled on the lead parent's schedule clamped into every parent's trained sigma range
(`shared_schedule`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robomosaic.conf.console import RobomosaicError
from robomosaic.data.normalizer import Normalizer
from robomosaic.policies.noise import NoiseProcess
from robomosaic.policies.samplers import (
    OPERATORS,
    Composition,
    Generator,
    Guidance,
    GuidedInpainting,
    Inpainting,
    LangevinCorrector,
    Mixture,
    Product,
    chain_steps,
    sample,
)

# Real-time chunking clips its guidance weight (Black et al. 2025 use beta = 5).
RTC_MAX_GUIDANCE = 5.0
# Relative tolerance below which two parents' per-dimension action normalizations count as equal.
NORMALIZATION_RTOL = 1e-5


class CompositionError(RobomosaicError, ValueError):
    """Parents that cannot be sampled together; the message names the parent and the dimension."""


@dataclass(frozen=True)
class ActionSpace:
    """A policy's normalized action chunks: (horizon, action_dim) and the affine map to robot units."""

    horizon: int
    action_dim: int
    normalizer: Normalizer = field(repr=False)

    def normalize(self, actions: Tensor) -> Tensor:
        return self.normalizer.normalize(actions, "action")

    def unnormalize(self, x: Tensor) -> Tensor:
        return self.normalizer.unnormalize(x, "action")

    def robot_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per dimension, the robot-unit values that normalize to -1 and +1."""
        shift, scale, bias = (
            np.broadcast_to(np.asarray(p, dtype=np.float64).reshape(-1), (self.action_dim,))
            for p in self.normalizer.affine("action")
        )
        return (-1 - bias) / scale + shift, (1 - bias) / scale + shift


def check_same_action_space(spaces: Sequence[ActionSpace], names: Sequence[str]) -> None:
    """Refuse parents whose chunks differ in shape or whose normalizations differ in any dimension:
    a shared noise coordinate means nothing if the same number is a different action to each."""
    first, lo0, hi0 = spaces[0], *spaces[0].robot_range()
    for space, name in zip(spaces[1:], names[1:], strict=True):
        if (space.horizon, space.action_dim) != (first.horizon, first.action_dim):
            raise CompositionError(
                f"{name} predicts chunks of (horizon, action_dim) = {(space.horizon, space.action_dim)}, "
                f"{names[0]} {(first.horizon, first.action_dim)}: parents must predict the same chunks"
            )
        lo, hi = space.robot_range()
        for d in range(first.action_dim):
            scale = max(abs(hi0[d] - lo0[d]), 1e-12)
            if (
                abs(lo[d] - lo0[d]) > NORMALIZATION_RTOL * scale
                or abs(hi[d] - hi0[d]) > NORMALIZATION_RTOL * scale
            ):
                raise CompositionError(
                    f"action dimension {d} is normalized differently: {names[0]} maps "
                    f"[{lo0[d]:.6g}, {hi0[d]:.6g}] to [-1, 1], {name} maps [{lo[d]:.6g}, {hi[d]:.6g}]; "
                    f"train one with normalizer_from=<the other's checkpoint> so that they can be composed"
                )


@dataclass
class BoundDenoiser:
    """A trained policy with its observation already encoded: ``denoise(x, sigma) -> x0_hat`` on
    normalized chunks, the noise process it was trained with, its action space, its own default
    schedule, and its sampling context (the network's hook around one sampling run)."""

    denoise: Callable[[Tensor, Tensor], Tensor]
    process: NoiseProcess
    action_space: ActionSpace
    batch: int
    device: torch.device
    steps: int
    sampler: str
    sampling: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    name: str = "policy"

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        """The samplers' ``denoise(x, sigma, cond)``; the condition is already bound."""
        return self.denoise(x, sigma)


def shared_schedule(processes: Sequence[NoiseProcess], lead: NoiseProcess, steps: int) -> Tensor:
    """The lead process's schedule for `steps`, its positive sigmas clamped into the range every
    process was trained on (repeats after clamping dropped), ending at 0."""
    lo = max(p.sigma_range()[0] for p in processes)
    hi = min(p.sigma_range()[1] for p in processes)
    if lo >= hi:
        raise CompositionError(
            f"the parents' trained sigma ranges do not overlap "
            f"({[p.sigma_range() for p in processes]}): no schedule suits all of them"
        )
    sigmas = lead.sigmas(steps)
    positive = sigmas[sigmas > 0].clamp(lo, hi).unique_consecutive()
    return torch.cat([positive, sigmas.new_zeros(1)])


def check_weights(operator: str, weights: Sequence[float] | None, n: int) -> list[float]:
    if operator not in OPERATORS:
        raise CompositionError(f"operator={operator!r}, expected one of {OPERATORS}")
    if weights is None:
        if n > 1:
            raise CompositionError(f"{n} parents need weights=[...]")
        return [1.0]
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise CompositionError(f"got {len(weights)} weights for {n} parents")
    if not all(np.isfinite(weights)) or min(weights) < 0 or sum(weights) <= 0:
        raise CompositionError(f"weights {weights} must be finite, >= 0 and not all 0")
    if operator != "and" and not np.isclose(sum(weights), 1.0, atol=1e-6):
        raise CompositionError(f"operator {operator!r}: weights {weights} must sum to 1 (sum {sum(weights)})")
    return weights


def sample_chunk(
    parents: BoundDenoiser | Sequence[BoundDenoiser],
    *,
    weights: Sequence[float] | None = None,
    operator: str = "convex",
    guidance: Guidance | None = None,
    committed: Tensor | None = None,
    corrector_steps: int = 0,
    steps: int | None = None,
    sampler: str | None = None,
    generator: Generator = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Action chunks (B, horizon, action_dim) in robot units.

    Several `parents` are combined by `operator` with `weights` (see `samplers.Composition`,
    `Product`, `Mixture`); parents of weight 0 are not evaluated at all, so weights (1, 0, ...) give
    exactly parent 0's chunk. The first parent of positive weight leads: its action space unnormalizes
    the result and its process and default `steps`/`sampler` set the schedule. `committed`
    (B, horizon, action_dim) in robot units, NaN where free, is inpainted (real-time chunking).
    `corrector_steps` Langevin steps at each noise level (see `samplers.LangevinCorrector`) move the
    state toward the composed distribution itself (needed by AND, whose summed scores are only
    exact at sigma = 0). Callers wrap it in `torch.no_grad()`; guidance and committed actions
    turn gradients on where they need them.
    """
    parents = [parents] if isinstance(parents, BoundDenoiser) else list(parents)
    if not parents:
        raise CompositionError("sample_chunk needs at least one bound denoiser")
    weights = check_weights(operator, weights, len(parents))
    active = [(p, w) for p, w in zip(parents, weights, strict=True) if w != 0]
    lead = active[0][0]
    check_same_action_space([p.action_space for p, _ in active], [p.name for p, _ in active])
    batches = {p.batch for p, _ in active}
    if len(batches) > 1:
        raise CompositionError(
            f"parents were bound to observation batches of different sizes {sorted(batches)}"
        )
    steps = int(steps or lead.steps)
    space = lead.action_space
    shape = (lead.batch, space.horizon, space.action_dim)

    if len(active) == 1 and active[0][1] == 1.0:
        denoise, sigmas = lead, None
    else:
        denoisers, ws = [p for p, _ in active], [w for _, w in active]
        if operator == "convex":
            denoise = Composition(denoisers, ws)
        elif operator == "and":
            denoise = Product(denoisers, ws)
        else:
            denoise = Mixture(denoisers, ws, lead.batch, generator)
        sigmas = shared_schedule([p.process for p in denoisers], lead.process, steps)

    on_step = None
    if committed is not None:
        # Guidance pulls the free part of the chunk toward continuations of the committed actions;
        # overwriting makes the committed part itself come out exact.
        mask = torch.isfinite(committed)
        known = space.normalize(torch.nan_to_num(committed.float()))
        denoise = GuidedInpainting(denoise, mask, known, max_weight=RTC_MAX_GUIDANCE)
        on_step = Inpainting(mask, known, generator=generator)
    if corrector_steps:
        on_step = chain_steps(LangevinCorrector(denoise, corrector_steps, generator=generator), on_step)
    with contextlib.ExitStack() as stack:
        for p, _ in active:
            stack.enter_context(p.sampling())
        x = sample(
            denoise,
            shape,
            None,
            steps,
            lead.process,
            sampler or lead.sampler,
            guidance=guidance,
            on_step=on_step,
            sigmas=sigmas,
            generator=generator,
            noise=noise,
            device=lead.device,
        )
    return space.unnormalize(x)


def history_batch(
    history: Mapping[str, np.ndarray], keys: Sequence[str], n_obs_steps: int, device: torch.device
) -> dict[str, Tensor]:
    """One observation history {key: (T >= n_obs_steps, ...)} as a batch of one, its last
    `n_obs_steps` steps for each of `keys` (composed parents may keep histories of different lengths)."""
    obs = {}
    for key in keys:
        if key not in history:
            raise KeyError(f"observation history lacks key {key!r} (has {sorted(history)})")
        value = np.asarray(history[key])
        if len(value) < n_obs_steps:
            raise ValueError(f"observation history of {key!r} has {len(value)} steps, need {n_obs_steps}")
        obs[key] = torch.as_tensor(value[len(value) - n_obs_steps :], device=device)[None]
    return obs
