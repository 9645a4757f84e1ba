"""Samplers that only ever call the ``denoise(x, sigma, cond) -> x0_hat`` contract.

All of them integrate in the VE coordinate ``x = a + sigma * n`` over a decreasing sigma schedule
ending at 0 (the process's natural one unless given):

- ``ddim``: x' = x0_hat + sigma' * eps_hat (eta = 0), or with fresh noise for eta > 0 (the DDIM
  variance rewritten in sigma; eta = 1 on the full training schedule is DDPM ancestral sampling);
- ``euler``: one Euler step per interval of the probability-flow ODE, dx/dsigma = (x - x0_hat) / sigma
  in VE coordinates. This is algebraically the same update as DDIM with eta = 0 (Karras et al. 2022,
  sec. 4), and also the same as the Euler step in t of a flow model;
- ``heun``: EDM Algorithm 1 (2nd order; the last step to sigma = 0 is an Euler step), taken in the
  process's ODE coordinates (``NoiseProcess.ode_time``...): sigma for DDPM and EDM, t for flow
  matching, whose uniform t grid is badly spread in sigma.

Hooks, applied at every evaluation: a guidance term added to x0_hat (a score shift times sigma^2,
DynaGuide), and ``on_step`` that may overwrite the state after each step (inpainting committed
actions for real-time chunking, Langevin corrector steps). Several denoisers are combined into one
before they get here (``Composition``, ``Product``, ``Mixture``: the composition operators of GPC,
docs/design.md), by ``policies.inference.sample_chunk``, the one caller of ``sample``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from robomosaic.policies.noise import Denoiser, NoiseProcess, expand_sigma

SAMPLERS = ("ddim", "euler", "heun")
OPERATORS = ("convex", "and", "or")


class Guidance(Protocol):
    """``guide(x0_hat, x, sigma, cond) -> delta`` added to x0_hat (= sigma^2 times a score shift)."""

    def __call__(self, x0_hat: Tensor, x: Tensor, sigma: Tensor, cond: Any) -> Tensor: ...


OnStep = Callable[[Tensor, Tensor, int], Tensor]
"""``on_step(x, sigma, step) -> x``: called with the state at its new sigma after each step."""


class RowGenerators:
    """One `torch.Generator` per batch row. Every draw of a sampling run takes row k's numbers from
    generator k, exactly what a batch-1 run on generator k draws, so a batch sampled with these
    equals its rows sampled one by one: evaluation batches the environments that replan together
    without changing any episode (policies/rollout.py)."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    def __len__(self) -> int:
        return len(self.generators)


Generator = torch.Generator | RowGenerators | None


def randn(shape: Sequence[int], generator: Generator, dtype: torch.dtype, device: Any) -> Tensor:
    """N(0, I) of `shape` from a generator, or row by row from `RowGenerators`."""
    if not isinstance(generator, RowGenerators):
        return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
    if shape[0] != len(generator):
        raise ValueError(f"{len(generator)} row generators for a batch of {shape[0]}")
    rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in generator.generators]
    return torch.stack(rows).to(device)


class Composition:
    """Weighted mean of several denoisers' x0_hat at the same (x, sigma): a convex combination of
    their scores. ``allow_negative=True`` admits negative weights (still summing to 1), the
    extrapolating "AND NOT" style of composition, which leaves the convex hull of the parents."""

    def __init__(self, denoisers: Sequence[Denoiser], weights: Sequence[float], allow_negative: bool = False):
        if len(denoisers) == 0:
            raise ValueError("composition needs at least one denoiser")
        if len(weights) != len(denoisers):
            raise ValueError(f"got {len(weights)} weights for {len(denoisers)} denoisers")
        if not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
            raise ValueError(f"composition weights {list(weights)} must sum to 1 (sum {sum(weights)})")
        if not allow_negative and min(weights) < 0:
            raise ValueError(
                f"composition weights {list(weights)} must be >= 0 (or pass allow_negative=True)"
            )
        self.denoisers = list(denoisers)
        self.weights = [float(w) for w in weights]

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        return sum(w * d(x, sigma, cond) for d, w in zip(self.denoisers, self.weights, strict=True))


class Product:
    """AND: the product of the denoisers' densities raised to their weights, prod_i p_i^w_i
    (weights >= 0, any sum; (1, 1) is the plain product). Its score is sum_i w_i score_i, so
    x0_hat = x + sum_i w_i (x0_hat_i - x). With weights summing to 1 this is ``Composition``.

    The sum of the noised scores is the score of the noised product only at sigma -> 0; along an ODE
    trajectory it shrinks the spread far below the product's (for two unit Gaussians, by about
    sigma_max^2). Langevin corrector steps at each level (``LangevinCorrector``, Du et al. 2023,
    "Reduce, Reuse, Recycle") sample each level's product instead, which tends to the product.
    """

    def __init__(self, denoisers: Sequence[Denoiser], weights: Sequence[float]):
        if len(weights) != len(denoisers) or not denoisers:
            raise ValueError(f"got {len(weights)} weights for {len(denoisers)} denoisers")
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"product weights {list(weights)} must be >= 0 and not all 0")
        self.denoisers, self.weights = list(denoisers), [float(w) for w in weights]
        self.rest = 1.0 - sum(self.weights)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        total = sum(w * d(x, sigma, cond) for d, w in zip(self.denoisers, self.weights, strict=True))
        return total if self.rest == 0 else total + self.rest * x


class Mixture:
    """OR: the mixture sum_i w_i p_i (weights >= 0 summing to 1). Each batch row draws one denoiser
    i ~ Categorical(w) when the object is made and follows that denoiser alone along its whole
    trajectory: an exact sample of the mixture, with no estimate of the parents' noised densities
    (which a score-level mixture needs for its posterior responsibilities; SuperDiff, Skreta et al.
    2025, estimates them along the trajectory). A denoiser no row chose is never evaluated.
    Make one per sampling run."""

    def __init__(
        self,
        denoisers: Sequence[Denoiser],
        weights: Sequence[float],
        batch: int,
        generator: Generator = None,
    ):
        if len(weights) != len(denoisers) or not denoisers:
            raise ValueError(f"got {len(weights)} weights for {len(denoisers)} denoisers")
        if min(weights) < 0 or not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
            raise ValueError(f"mixture weights {list(weights)} must be >= 0 and sum to 1")
        self.denoisers = list(denoisers)
        probs = torch.tensor([float(w) for w in weights], dtype=torch.float64)
        if isinstance(generator, RowGenerators):
            rows = [torch.multinomial(probs, 1, generator=g) for g in generator.generators]
            self.choice = torch.cat(rows)
        else:
            self.choice = torch.multinomial(probs, batch, replacement=True, generator=generator)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        choice = self.choice.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
        out = None
        for i, d in enumerate(self.denoisers):
            if bool((self.choice == i).any()):
                x0 = d(x, sigma, cond)
                out = x0 if out is None else torch.where(choice == i, x0, out)
        return out


class LangevinCorrector:
    """``on_step``: ``steps`` unadjusted Langevin steps at the new noise level (the corrector of
    predictor-corrector sampling, Song et al. 2021), x <- x + eps score + sqrt(2 eps) z with
    eps = step_size * sigma^2, i.e. x <- x + step_size (x0_hat - x) + sqrt(2 step_size) sigma z.
    They move the state toward the denoiser's own distribution at that level, which the ODE alone
    does not reach when the scores are not those of one noised density (``Product``). Nothing is
    done at sigma = 0."""

    def __init__(
        self,
        denoiser: Denoiser,
        steps: int,
        step_size: float = 0.1,
        generator: Generator = None,
    ):
        if steps < 0 or not 0 < step_size < 1:
            raise ValueError(f"corrector steps={steps} must be >= 0 and step_size={step_size} in (0, 1)")
        self.denoiser, self.steps, self.step_size, self.generator = denoiser, steps, step_size, generator

    def __call__(self, x: Tensor, sigma: Tensor, step: int) -> Tensor:
        if bool((sigma == 0).all()):
            return x
        s = expand_sigma(sigma, x)
        for _ in range(self.steps):
            x0_hat = self.denoiser(x, sigma, None)
            z = randn(x.shape, self.generator, x.dtype, x.device)
            x = x + self.step_size * (x0_hat - x) + math.sqrt(2 * self.step_size) * s * z
        return x


def chain_steps(*hooks: OnStep | None) -> OnStep | None:
    """One ``on_step`` that applies the given ones (None skipped) in order."""
    present = [h for h in hooks if h is not None]
    if len(present) <= 1:
        return present[0] if present else None

    def on_step(x: Tensor, sigma: Tensor, step: int) -> Tensor:
        for hook in present:
            x = hook(x, sigma, step)
        return x

    return on_step


class GradientGuidance:
    """Guidance from a differentiable ``log_prob(a, cond)`` of a goal given clean actions.

    The exact x0_hat shift is sigma^2 * grad_x log p(goal | x). With p(goal | x) ~ p(goal | x0_hat)
    and the Jacobian of x0_hat replaced by the posterior covariance of a Gaussian with std
    ``sigma_data`` (Cov[a | x] = sigma^2 * d x0_hat / dx), the shift is
    ``scale * sigma_data^2 sigma^2 / (sigma_data^2 + sigma^2) * grad_a log p(goal | a)`` at
    a = x0_hat: it needs only the goal model's gradient, not a backward pass through the policy.
    """

    def __init__(
        self, log_prob: Callable[[Tensor, Any], Tensor], scale: float = 1.0, sigma_data: float = 0.5
    ):
        self.log_prob, self.scale, self.sigma_data = log_prob, scale, sigma_data

    def __call__(self, x0_hat: Tensor, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        with torch.enable_grad():
            a = x0_hat.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(a, cond).sum(), a)
        s2 = expand_sigma(sigma, x0_hat) ** 2
        sd2 = self.sigma_data**2
        return self.scale * sd2 * s2 / (sd2 + s2) * grad


class Inpainting:
    """``on_step`` that overwrites the known part of the chunk: where ``mask`` is True, x becomes
    ``known + sigma * n`` with one noise draw ``n`` reused along the trajectory, so at sigma = 0 the
    known actions come out exactly. ``mask`` and ``known`` broadcast against the chunk.

    Replacement conditions the free part only weakly (an ODE trajectory is mostly decided at high
    sigma, where the noisy known part says little); ``GuidedInpainting`` conditions it properly.
    The two can be combined to also get the known part exactly. The noise draw is kept by the
    object: make one per ``sample`` call."""

    def __init__(self, mask: Tensor, known: Tensor, generator: Generator = None):
        self.mask, self.known, self.generator = mask.bool(), known, generator
        self._noise: Tensor | None = None

    def __call__(self, x: Tensor, sigma: Tensor, step: int) -> Tensor:
        if self._noise is None or self._noise.shape != x.shape:
            self._noise = randn(x.shape, self.generator, x.dtype, x.device)
        noisy_known = self.known.to(x) + expand_sigma(sigma, x) * self._noise
        return torch.where(self.mask.to(x.device), noisy_known, x)


class GuidedInpainting:
    """A denoiser conditioned on known actions by guidance (PiGDM, Song et al. 2023; the
    "real-time chunking" of Black et al. 2025), which conditions the free part of the chunk far
    better than overwriting the state (``Inpainting``) does.

    With p(known | x) ~ N(known; x0_hat(x), r^2) on the masked entries and
    r^2 = sigma_data^2 sigma^2 / (sigma_data^2 + sigma^2), x0_hat is shifted by
    ``w * J^T (mask * (known - x0_hat))`` with J = d x0_hat / dx and w = sigma^2 / r^2 (clipped to
    ``max_weight``): one vector-Jacobian product through the wrapped denoiser per evaluation.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        mask: Tensor,
        known: Tensor,
        sigma_data: float = 1.0,
        max_weight: float | None = None,
    ):
        self.denoiser, self.mask, self.known = denoiser, mask.bool(), known
        self.sigma_data, self.max_weight = sigma_data, max_weight

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            x0_hat = self.denoiser(x_in, sigma, cond)
            residual = torch.where(self.mask.to(x.device), self.known.to(x) - x0_hat, 0).detach()
            (vjp,) = torch.autograd.grad(x0_hat, x_in, residual)
        s2 = expand_sigma(sigma, x) ** 2
        weight = (self.sigma_data**2 + s2) / self.sigma_data**2  # sigma^2 / r^2
        if self.max_weight is not None:
            weight = weight.clamp(max=self.max_weight)
        return x0_hat.detach() + weight * vjp


def guided(denoiser: Denoiser, guidance: Guidance | None) -> Denoiser:
    if guidance is None:
        return denoiser

    def denoise(x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        x0_hat = denoiser(x, sigma, cond)
        return x0_hat + guidance(x0_hat, x, sigma, cond)

    return denoise


def sample(
    denoiser: Denoiser,
    shape: Sequence[int],
    cond: Any,
    steps: int,
    process: NoiseProcess,
    sampler: str = "ddim",
    *,
    guidance: Guidance | None = None,
    on_step: OnStep | None = None,
    eta: float = 0.0,
    sigmas: Tensor | None = None,
    generator: Generator = None,
    noise: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw clean action chunks of ``shape`` (batch, horizon, action_dim).

    ``cond`` is the already encoded observation, handed unchanged to every ``denoise`` call.
    ``sigmas`` overrides ``process.sigmas(steps)``; the initial state is
    ``process.prior_scale(sigmas[0]) * noise`` (``noise`` ~ N(0, I) drawn from ``generator`` if None).
    Returns x at the last sigma (0: clean).
    Gradients are not disabled here; callers wrap in ``torch.no_grad()`` as they need.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}, expected one of {SAMPLERS}")
    if eta < 0 or (eta > 0 and sampler != "ddim"):
        raise ValueError(f"eta={eta}: must be >= 0 and is only used by the 'ddim' sampler")
    denoise = guided(denoiser, guidance)

    sigmas = process.sigmas(steps) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2 or bool((sigmas[1:] >= sigmas[:-1]).any()) or sigmas[-1] < 0:
        raise ValueError(f"sigmas must be a strictly decreasing 1-D schedule >= 0, got {sigmas.tolist()}")
    if noise is None:
        noise = randn(shape, generator, dtype, device)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
    x = process.prior_scale(sigmas[0]).item() * noise
    batch = x.shape[0]

    for i in range(len(sigmas) - 1):
        s, s_next = (
            torch.full((batch,), float(v), dtype=x.dtype, device=x.device) for v in sigmas[i : i + 2]
        )
        x0_hat = denoise(x, s, cond)
        if sampler == "ddim":
            x = _ddim_step(x, x0_hat, s, s_next, eta, generator)
        else:
            x = _ode_step(process, denoise, cond, x, x0_hat, s, s_next, heun=sampler == "heun")
        if on_step is not None:
            x = on_step(x, s_next, i)
    return x


def _ode_step(
    process: NoiseProcess,
    denoise: Denoiser,
    cond: Any,
    x: Tensor,
    x0_hat: Tensor,
    s: Tensor,
    s_next: Tensor,
    heun: bool,
) -> Tensor:
    """Euler, or Heun (EDM Algorithm 1; Euler into sigma = 0), in the process's ODE coordinates."""
    dtau = expand_sigma(process.ode_time(s_next) - process.ode_time(s), x)
    d = process.ode_derivative(x, s, x0_hat)
    y_next = process.ode_state(x, s) + dtau * d
    x_next = process.ve_from_ode_state(y_next, s_next)
    if not heun or bool((s_next == 0).any()):
        return x_next
    d_next = process.ode_derivative(x_next, s_next, denoise(x_next, s_next, cond))
    return process.ve_from_ode_state(process.ode_state(x, s) + dtau * (d + d_next) / 2, s_next)


def _ddim_step(
    x: Tensor, x0_hat: Tensor, s: Tensor, s_next: Tensor, eta: float, generator: Generator
) -> Tensor:
    eps = (x - x0_hat) / expand_sigma(s, x)
    if eta == 0:
        return x0_hat + expand_sigma(s_next, x) * eps
    # DDIM's sigma_t (Song et al. eq. 16) in VP, divided by sqrt(alpha_bar_prev), is this VE std.
    s_up = (eta * s_next * (s**2 - s_next**2).clamp(min=0).sqrt() / s).clamp(max=s_next)
    s_down = (s_next**2 - s_up**2).clamp(min=0).sqrt()
    z = randn(x.shape, generator, x.dtype, x.device)
    return x0_hat + expand_sigma(s_down, x) * eps + expand_sigma(s_up, x) * z
