"""The denoiser contract and the noise processes that are trained to fulfil it.

Every policy exposes ``denoise(x, sigma, cond) -> x0_hat`` in the "variance exploding" (VE)
coordinate of Karras et al. 2022 (EDM, Table 1): ``x = a + sigma * n`` with ``a`` the clean action
chunk (batch, horizon, action_dim) and ``n`` standard normal. A noise process knows

- how to make a training example from clean actions (its own coordinate, time input and target),
- how to turn its network's raw output into the contract (``process.denoiser(network)``),
- its natural sigma schedule for N inference steps and the scale of its initial noise.

The three processes and their VE view:

- DDPM (VP): ``x_vp = sqrt(abar) a + sqrt(1 - abar) eps`` is ``x_ve * sqrt(abar)`` at
  ``sigma = sqrt((1 - abar) / abar)``;
- rectified flow: ``x_t = t a + (1 - t) z`` is ``x_ve * t`` at ``sigma = (1 - t) / t``;
- EDM: already VE, with the preconditioning ``c_skip, c_out, c_in, c_noise``.

A network is any callable ``network(x_in, time, cond) -> raw`` where ``x_in`` and ``time`` are in the
process's own coordinates (the ones it was trained on) and ``cond`` is the already encoded
observation embedding, passed through untouched.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    """``denoise(x, sigma, cond) -> x0_hat``: the predicted clean chunk from a VE-noisy one.

    ``x`` is (batch, ...) with ``x = a + sigma * n``; ``sigma`` has shape (batch,) (or is anything
    broadcastable to it); the result has the shape of ``x``.
    """

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor: ...


Network = Callable[[Tensor, Tensor, Any], Tensor]


def expand_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """``sigma`` of shape (), (batch,) or (batch, 1, ...) reshaped to broadcast against ``x``."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim == 1:
        if sigma.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"sigma has shape {tuple(sigma.shape)}, expected (batch,) = ({x.shape[0]},)")
        return sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return sigma


# --- conversions at a given (x, sigma) in the VE coordinate --------------------------------------
# x = x0 + sigma * eps; score = grad_x log p_sigma(x) = (x0_hat - x) / sigma^2 (Tweedie);
# velocity is the rectified-flow velocity v = a - z = x0 - eps (z = eps is the flow's noise).


def eps_from_x0(x: Tensor, sigma: Tensor | float, x0: Tensor) -> Tensor:
    return (x - x0) / expand_sigma(sigma, x)


def x0_from_eps(x: Tensor, sigma: Tensor | float, eps: Tensor) -> Tensor:
    return x - expand_sigma(sigma, x) * eps


def score_from_x0(x: Tensor, sigma: Tensor | float, x0: Tensor) -> Tensor:
    return (x0 - x) / expand_sigma(sigma, x) ** 2


def x0_from_score(x: Tensor, sigma: Tensor | float, score: Tensor) -> Tensor:
    return x + expand_sigma(sigma, x) ** 2 * score


def velocity_from_x0(x: Tensor, sigma: Tensor | float, x0: Tensor) -> Tensor:
    return x0 - eps_from_x0(x, sigma, x0)


def x0_from_velocity(x: Tensor, sigma: Tensor | float, velocity: Tensor) -> Tensor:
    # x = x0 + sigma * (x0 - v)  =>  x0 = (x + sigma v) / (1 + sigma), i.e. x_t + (1 - t) v.
    s = expand_sigma(sigma, x)
    return (x + s * velocity) / (1 + s)


# --- noise levels and coordinates -----------------------------------------------------------------


def sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: Tensor) -> Tensor:
    return 1 / (1 + sigma**2)


def sigma_from_t(t: Tensor) -> Tensor:
    """Rectified-flow time (t = 1 is data, t = 0 is noise) to VE sigma."""
    return (1 - t) / t


def t_from_sigma(sigma: Tensor) -> Tensor:
    return 1 / (1 + sigma)


def vp_from_ve(x: Tensor, sigma: Tensor | float) -> Tensor:
    return x / (1 + expand_sigma(sigma, x) ** 2).sqrt()


def ve_from_vp(x_vp: Tensor, sigma: Tensor | float) -> Tensor:
    return x_vp * (1 + expand_sigma(sigma, x_vp) ** 2).sqrt()


def flow_from_ve(x: Tensor, sigma: Tensor | float) -> Tensor:
    return x / (1 + expand_sigma(sigma, x))


def ve_from_flow(x_t: Tensor, sigma: Tensor | float) -> Tensor:
    return x_t * (1 + expand_sigma(sigma, x_t))


# --- processes ------------------------------------------------------------------------------------


@dataclass
class TrainingExample:
    """One noised batch: feed ``network(net_input, net_time, cond)`` and regress ``target``.

    ``x`` and ``sigma`` are the same noisy sample in the VE coordinate (what ``denoise`` receives).
    """

    net_input: Tensor
    net_time: Tensor
    target: Tensor
    x: Tensor
    sigma: Tensor


class NoiseProcess(ABC):
    """A way of training a network so that it yields the ``denoise`` contract."""

    @abstractmethod
    def training_example(
        self,
        actions: Tensor,
        noise: Tensor | None = None,
        level: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> TrainingExample:
        """Noise clean ``actions``; ``level`` is the process's own noise level per batch element
        (DDPM: integer timestep, flow: t, EDM: sigma), drawn from the training distribution if None."""

    @abstractmethod
    def denoiser(self, network: Network) -> Denoiser:
        """Wrap a network trained on this process's examples into the ``denoise`` contract."""

    @abstractmethod
    def sigmas(self, steps: int) -> Tensor:
        """Decreasing float64 sigmas for ``steps`` inference steps: ``steps + 1`` values ending at 0."""

    @abstractmethod
    def sigma_range(self) -> tuple[float, float]:
        """The (smallest, largest) positive sigma the network was trained on: where its ``denoise``
        can be trusted, and where a schedule shared with other processes must lie."""

    @abstractmethod
    def prior_scale(self, sigma: Tensor) -> Tensor:
        """Standard deviation of the initial VE sample at ``sigma``: x_T = prior_scale * z.

        It is the process's own assumption at its largest noise level: z in the VP and flow
        coordinates, sigma_max * z in EDM.
        """

    # The probability-flow ODE dy/dtau is integrated in the process's own coordinates (y, tau):
    # the VE pair (x, sigma) by default, where dx/dsigma = eps_hat. Euler steps are the same in any
    # of these coordinates (they all equal DDIM); Heun's trapezoid is not, and must be taken in a
    # variable in which the schedule is evenly spread (see FlowMatchingProcess).

    def ode_time(self, sigma: Tensor) -> Tensor:
        return sigma

    def ode_state(self, x: Tensor, sigma: Tensor) -> Tensor:
        return x

    def ve_from_ode_state(self, y: Tensor, sigma: Tensor) -> Tensor:
        return y

    def ode_derivative(self, x: Tensor, sigma: Tensor, x0_hat: Tensor) -> Tensor:
        """dy/dtau at VE state ``x`` given the denoiser's ``x0_hat``."""
        return eps_from_x0(x, sigma, x0_hat)

    def loss(self, prediction: Tensor, example: TrainingExample) -> Tensor:
        """Mean squared error to the raw target (for EDM this is the paper's weighting)."""
        return F.mse_loss(prediction, example.target)

    @staticmethod
    def _noise_like(actions: Tensor, noise: Tensor | None, generator: torch.Generator | None) -> Tensor:
        if noise is None:
            return torch.randn(actions.shape, generator=generator, dtype=actions.dtype, device=actions.device)
        if noise.shape != actions.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, actions {tuple(actions.shape)}")
        return noise

    @staticmethod
    def _uniform(actions: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.rand(actions.shape[0], generator=generator, dtype=actions.dtype, device=actions.device)


class _Wrapped:
    """``denoise`` made from a network and the process-specific conversion ``to_x0``."""

    def __init__(self, network: Network, to_x0: Callable[[Network, Tensor, Tensor, Any], Tensor]):
        self.network = network
        self._to_x0 = to_x0

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        return self._to_x0(self.network, x, sigma, cond)


class DDPMProcess(NoiseProcess):
    """Discrete-time DDPM (as in diffusion_policy): the network sees ``x_vp`` and the timestep.

    alpha_bar comes from diffusers' ``DDPMScheduler`` betas. ``denoise`` accepts any sigma: the
    timestep fed to the network is interpolated linearly in log-sigma between the discrete ones
    (and clamped to [0, T-1] outside them), while ``x_vp`` uses the exact alpha_bar of that sigma.
    The inference schedule is diffusers' ``DDIMScheduler`` timesteps ("leading" spacing) followed
    by sigma = 0 (``set_alpha_to_one``).
    """

    prediction_types = ("epsilon", "sample", "v_prediction")

    def __init__(
        self,
        num_train_timesteps: int = 100,
        beta_schedule: str = "squaredcos_cap_v2",
        prediction_type: str = "epsilon",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
    ):
        from diffusers import DDPMScheduler  # slow import, only needed by this process

        if prediction_type not in self.prediction_types:
            raise ValueError(f"prediction_type={prediction_type!r}, expected one of {self.prediction_types}")
        self.prediction_type = prediction_type
        self.scheduler_config = dict(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            prediction_type=prediction_type,
        )
        scheduler = DDPMScheduler(**self.scheduler_config)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        self.train_sigmas = sigma_from_alpha_bar(self.alphas_cumprod)  # increasing with timestep

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def timestep_from_sigma(self, sigma: Tensor) -> Tensor:
        """Continuous timestep: linear interpolation in log-sigma over the discrete table."""
        # torch has no interp(); searchsorted + lerp keeps it on the tensor's device and dtype.
        table = self.train_sigmas.to(sigma.device).log()
        log_s = sigma.to(torch.float64).log().clamp(table[0], table[-1])
        hi = torch.searchsorted(table, log_s).clamp(1, len(table) - 1)
        lo = hi - 1
        frac = (log_s - table[lo]) / (table[hi] - table[lo])
        return (lo + frac).to(sigma.dtype)

    def training_example(self, actions, noise=None, level=None, generator=None):
        noise = self._noise_like(actions, noise, generator)
        if level is None:
            level = torch.randint(
                0, self.num_train_timesteps, (actions.shape[0],), generator=generator, device=actions.device
            )
        abar = expand_sigma(self.alphas_cumprod.to(actions.device)[level.long()], actions)
        x_vp = abar.sqrt() * actions + (1 - abar).sqrt() * noise
        target = {
            "epsilon": noise,
            "sample": actions,
            "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * actions,
        }[self.prediction_type]
        sigma = self.train_sigmas.to(actions.device, actions.dtype)[level.long()]
        return TrainingExample(x_vp, level.to(actions.dtype), target, ve_from_vp(x_vp, sigma), sigma)

    def denoiser(self, network):
        return _Wrapped(network, self._to_x0)

    def _to_x0(self, network, x, sigma, cond):
        x_vp = vp_from_ve(x, sigma)
        raw = network(x_vp, self.timestep_from_sigma(sigma), cond)
        if self.prediction_type == "epsilon":
            return x0_from_eps(x, sigma, raw)
        if self.prediction_type == "sample":
            return raw
        abar = expand_sigma(alpha_bar_from_sigma(sigma), x)
        return abar.sqrt() * x_vp - (1 - abar).sqrt() * raw

    def ddim_timesteps(self, steps: int) -> Tensor:
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler(**self.scheduler_config, set_alpha_to_one=True, steps_offset=0)
        scheduler.set_timesteps(steps)
        return scheduler.timesteps

    def sigmas(self, steps):
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"steps={steps} must be in [1, {self.num_train_timesteps}] for DDPM")
        s = self.train_sigmas[self.ddim_timesteps(steps)]
        return torch.cat([s, s.new_zeros(1)])

    def sigma_range(self):
        return float(self.train_sigmas[0]), float(self.train_sigmas[-1])

    def prior_scale(self, sigma):
        return (1 + sigma**2).sqrt()


class FlowMatchingProcess(NoiseProcess):
    """Rectified flow: ``x_t = t a + (1 - t) z``, the network predicts ``v = a - z`` from (x_t, t).

    The inference schedule is the uniform t grid from 0 to 1 (sigma = 0 at t = 1); its first point
    t = 0 (sigma = infinity) is replaced by ``t_min`` so that the VE coordinate stays finite. Training
    times are uniform in [t_min, 1).
    """

    def __init__(self, t_min: float = 1e-5):
        if not 0 < t_min < 1:
            raise ValueError(f"t_min={t_min} must be in (0, 1)")
        self.t_min = t_min

    def training_example(self, actions, noise=None, level=None, generator=None):
        z = self._noise_like(actions, noise, generator)
        t = self.t_min + (1 - self.t_min) * self._uniform(actions, generator) if level is None else level
        te = expand_sigma(t, actions)
        x_t = te * actions + (1 - te) * z
        sigma = sigma_from_t(t)
        return TrainingExample(x_t, t, actions - z, ve_from_flow(x_t, sigma), sigma)

    def denoiser(self, network):
        return _Wrapped(network, self._to_x0)

    @staticmethod
    def _to_x0(network, x, sigma, cond):
        x_t = flow_from_ve(x, sigma)
        t = t_from_sigma(sigma)
        return x_t + expand_sigma(1 - t, x) * network(x_t, t, cond)

    def sigmas(self, steps):
        t = torch.linspace(0, 1, steps + 1, dtype=torch.float64).clamp(min=self.t_min)
        return sigma_from_t(t)

    def sigma_range(self):
        # training times t in [t_min, 1): every sigma in (0, 1/t_min - 1]
        return 0.0, float(sigma_from_t(torch.tensor(self.t_min, dtype=torch.float64)))

    def prior_scale(self, sigma):
        return 1 + sigma

    # The ODE in (x_t, t): dx_t/dt = v. In sigma, the uniform t grid's first interval spans
    # sigma = 1/t_min - 1 down to N - 1, where Heun's trapezoid in sigma diverges.

    def ode_time(self, sigma):
        return t_from_sigma(sigma)

    def ode_state(self, x, sigma):
        return flow_from_ve(x, sigma)

    def ve_from_ode_state(self, y, sigma):
        return ve_from_flow(y, sigma)

    def ode_derivative(self, x, sigma, x0_hat):
        return velocity_from_x0(x, sigma, x0_hat)


class EDMProcess(NoiseProcess):
    """Karras et al. 2022 preconditioning; the network sees ``c_in * x`` and ``c_noise = ln(sigma)/4``.

    Training sigmas: "lognormal" (ln sigma ~ N(p_mean, p_std), the EDM paper) or "loglogistic"
    (ln sigma ~ Logistic(ln sigma_data, 0.5) truncated to [sigma_min, sigma_max], as in BESO/MoDE).
    """

    distributions = ("lognormal", "loglogistic")

    def __init__(
        self,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        distribution: str = "lognormal",
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ):
        if distribution not in self.distributions:
            raise ValueError(f"distribution={distribution!r}, expected one of {self.distributions}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min ({sigma_min}) < sigma_max ({sigma_max})")
        self.sigma_data, self.sigma_min, self.sigma_max, self.rho = sigma_data, sigma_min, sigma_max, rho
        self.distribution, self.p_mean, self.p_std = distribution, p_mean, p_std

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) for sigma of shape (batch,)."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def sample_training_sigmas(self, n: int, generator=None, dtype=torch.float32, device=None) -> Tensor:
        u = torch.rand(n, generator=generator, dtype=dtype, device=device)
        if self.distribution == "lognormal":
            return (self.p_mean + self.p_std * math.sqrt(2) * torch.erfinv(2 * u - 1)).exp()
        loc, scale = math.log(self.sigma_data), 0.5
        # Inverse CDF restricted to [cdf(sigma_min), cdf(sigma_max)] truncates exactly.
        lo, hi = (
            torch.sigmoid(torch.tensor((math.log(s) - loc) / scale)) for s in (self.sigma_min, self.sigma_max)
        )
        u = lo + (hi - lo) * u
        return (loc + scale * torch.logit(u)).exp()

    def training_example(self, actions, noise=None, level=None, generator=None):
        n = self._noise_like(actions, noise, generator)
        sigma = (
            self.sample_training_sigmas(actions.shape[0], generator, actions.dtype, actions.device)
            if level is None
            else level
        )
        c_skip, c_out, c_in, c_noise = (expand_sigma(c, actions) for c in self.preconditioning(sigma))
        x = actions + expand_sigma(sigma, actions) * n
        return TrainingExample(c_in * x, c_noise.reshape(-1), (actions - c_skip * x) / c_out, x, sigma)

    def denoiser(self, network):
        return _Wrapped(network, self._to_x0)

    def _to_x0(self, network, x, sigma, cond):
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        raw = network(expand_sigma(c_in, x) * x, c_noise, cond)
        return expand_sigma(c_skip, x) * x + expand_sigma(c_out, x) * raw

    def sigmas(self, steps):
        # Karras et al. eq. 5. diffusers' EDMEulerScheduler computes the same in float32, but needs
        # the (slow) diffusers import for a one-line formula; tests compare the two.
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        s = (hi + ramp * (lo - hi)) ** self.rho
        return torch.cat([s, s.new_zeros(1)])

    def sigma_range(self):
        return self.sigma_min, self.sigma_max

    def prior_scale(self, sigma):
        return sigma


PROCESSES: dict[str, type[NoiseProcess]] = {
    "ddpm": DDPMProcess,
    "flow": FlowMatchingProcess,
    "edm": EDMProcess,
}


def make_process(name: str, **kwargs: Any) -> NoiseProcess:
    if name not in PROCESSES:
        raise ValueError(f"unknown noise process {name!r}, expected one of {sorted(PROCESSES)}")
    return PROCESSES[name](**kwargs)
