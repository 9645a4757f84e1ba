"""Embedding of the noise level that every denoiser network is conditioned on.

The network does not know which noise process trained it: the caller feeds whatever scalar its
process uses (a DDPM timestep in [0, 1000), a flow time, EDM's c_noise = ln(sigma) / 4). The
sinusoidal angular frequencies span 1 .. 1e-4 rad per unit, made for inputs that range over
hundreds of units; for a flow time t in [0, 1] set `noise_scale=1000` on the network (as e.g.
Stable Diffusion 3 feeds 1000 t), so that its embedding is as discriminative as a DDPM timestep's.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def noise_per_sample(noise: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """The noise input as a float tensor (batch,): a scalar is broadcast, anything else must be (batch,)."""
    noise = torch.as_tensor(noise, device=device)
    if noise.ndim == 0:
        noise = noise.expand(batch)
    if noise.shape != (batch,):
        raise ValueError(f"noise must be a scalar or have shape ({batch},), got {tuple(noise.shape)}")
    return noise.float()


class SinusoidalEmbedding(nn.Module):
    """Transformer positional encoding of a scalar (as diffusion_policy's SinusoidalPosEmb)."""

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"embedding dim must be even and >= 4, got {dim}")
        self.dim = dim
        self.scale = scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000.0) / (half - 1)))
        args = (self.scale * t.float())[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class NoiseEmbedding(nn.Sequential):
    """Sinusoidal embedding of scale * noise, then the MLP dim -> 4 dim -> Mish -> dim of diffusion_policy."""

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__(
            SinusoidalEmbedding(dim, scale),
            nn.Linear(dim, dim * 4),
            nn.Mish(),
            nn.Linear(dim * 4, dim),
        )
