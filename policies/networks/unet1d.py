"""Conditional 1D temporal U-Net with FiLM conditioning (Chi et al., "Diffusion Policy", RSS 2023).

Architecture and parameter layout follow the reference ConditionalUnet1D with
`cond_predict_scale=True`, so a checkpoint-for-checkpoint comparison of sizes holds: Conv1d residual
blocks with GroupNorm + Mish, a FiLM scale and bias per channel predicted from
[noise embedding ; global cond], stride-2 convolutions down and transposed convolutions up.
Written here rather than imported because diffusion_policy is not a pip-installable library and
diffusers' UNet1DModel is a different (non-FiLM) architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robomosaic.policies.networks.base import DenoiserNetwork, register_network
from robomosaic.policies.networks.embedding import NoiseEmbedding, noise_per_sample


class Conv1d(nn.Conv1d):
    """nn.Conv1d, exported to ONNX as a 2-D convolution over (B, C, 1, L).

    ONNX Runtime's CPU kernels for 2-D convolutions (blocked NCHWc layout) are far faster than its
    1-D ones: a DDIM-10 chunk of the (64, 128, 256) U-Net took 18 ms instead of 28 ms. Eager PyTorch
    is unchanged (its own 1-D kernels), as are the parameters and checkpoints."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return super().forward(x)
        (stride,), (padding,), (dilation,) = self.stride, self.padding, self.dilation
        weight = self.weight.unsqueeze(2)
        y = F.conv2d(x.unsqueeze(2), weight, self.bias, (1, stride), (0, padding), (1, dilation), self.groups)
        return y.squeeze(2)


class ConvTranspose1d(nn.ConvTranspose1d):
    """nn.ConvTranspose1d, exported to ONNX as a 2-D transposed convolution (see `Conv1d`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return super().forward(x)
        (stride,), (padding,), (dilation,) = self.stride, self.padding, self.dilation
        (output_padding,) = self.output_padding
        y = F.conv_transpose2d(
            x.unsqueeze(2),
            self.weight.unsqueeze(2),
            self.bias,
            (1, stride),
            (0, padding),
            (0, output_padding),
            self.groups,
            (1, dilation),
        )
        return y.squeeze(2)


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish, length preserving."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int) -> None:
        super().__init__(
            Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )


class FiLMResidualBlock1D(nn.Module):
    """Two conv blocks; the first one's output is modulated by scale * h + bias from the conditioning."""

    def __init__(
        self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int, n_groups: int
    ) -> None:
        super().__init__()
        self.conv1 = Conv1dBlock(in_channels, out_channels, kernel_size, n_groups)
        self.conv2 = Conv1dBlock(out_channels, out_channels, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_channels))
        self.residual = Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        h = scale * self.conv1(x) + bias
        return self.conv2(h) + self.residual(x)


class ConditionalUnet1D(DenoiserNetwork):
    """Denoiser over action chunks: forward(x (B, H, A), noise (B,), cond (B, cond_dim)) -> (B, H, A).

    `down_dims` has one entry per resolution level; the horizon is halved between levels, so H must
    be divisible by 2 ** (len(down_dims) - 1). (256, 512, 1024) is the paper's default;
    (64, 128, 256) is a CPU-sized default. `noise_scale` multiplies the noise input before its
    sinusoidal embedding (see `embedding`: 1000 for a flow time in [0, 1]).
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        down_dims: Sequence[int] = (64, 128, 256),
        noise_embed_dim: int = 128,
        kernel_size: int = 5,
        n_groups: int = 8,
        noise_scale: float = 1.0,
    ) -> None:
        super().__init__()
        down_dims = tuple(int(d) for d in down_dims)
        if not down_dims:
            raise ValueError("down_dims must name at least one level")
        bad = [d for d in down_dims if d % n_groups]
        if bad:
            raise ValueError(f"down_dims {down_dims}: {bad} not divisible by n_groups={n_groups}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to preserve length, got {kernel_size}")
        self.action_dim = action_dim
        self.cond_dim = cond_dim
        self.down_dims = down_dims
        self.noise_embedding = NoiseEmbedding(noise_embed_dim, noise_scale)
        film_dim = noise_embed_dim + cond_dim

        def block(c_in: int, c_out: int) -> FiLMResidualBlock1D:
            return FiLMResidualBlock1D(c_in, c_out, film_dim, kernel_size, n_groups)

        levels = list(zip((action_dim, *down_dims[:-1]), down_dims, strict=True))
        self.down_levels = nn.ModuleList(
            nn.ModuleList(
                [
                    block(c_in, c_out),
                    block(c_out, c_out),
                    Conv1d(c_out, c_out, 3, stride=2, padding=1) if i < len(levels) - 1 else nn.Identity(),
                ]
            )
            for i, (c_in, c_out) in enumerate(levels)
        )
        mid = down_dims[-1]
        self.mid_blocks = nn.ModuleList([block(mid, mid), block(mid, mid)])
        # Going up, each level takes the coarser output concatenated with the same-resolution skip.
        self.up_levels = nn.ModuleList(
            nn.ModuleList(
                [
                    block(2 * c_out, c_in),
                    block(c_in, c_in),
                    ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1),
                ]
            )
            for c_in, c_out in reversed(levels[1:])
        )
        self.final = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            Conv1d(down_dims[0], action_dim, 1),
        )

    @property
    def horizon_multiple(self) -> int:
        return 2 ** (len(self.down_dims) - 1)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | float, cond: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.action_dim:
            raise ValueError(f"x must be (batch, horizon, {self.action_dim}), got {tuple(x.shape)}")
        batch, horizon = x.shape[:2]
        if horizon % self.horizon_multiple:
            raise ValueError(
                f"horizon {horizon} is not divisible by 2 ** (len(down_dims) - 1) = {self.horizon_multiple} "
                f"(down_dims={self.down_dims}); use a multiple of {self.horizon_multiple}"
            )
        if cond.shape != (batch, self.cond_dim):
            raise ValueError(f"cond must be ({batch}, {self.cond_dim}), got {tuple(cond.shape)}")
        noise = noise_per_sample(noise, batch, x.device)
        film_cond = torch.cat([self.noise_embedding(noise), cond], dim=-1)

        h = x.transpose(1, 2)  # (B, A, H): channels are action dimensions
        skips = []
        for res1, res2, downsample in self.down_levels:
            h = res2(res1(h, film_cond), film_cond)
            skips.append(h)
            h = downsample(h)
        for res in self.mid_blocks:
            h = res(h, film_cond)
        # As in the reference, the finest level's skip (skips[0]) is unused: the last up level
        # reaches full resolution through its upsampling.
        for (res1, res2, upsample), skip in zip(self.up_levels, reversed(skips[1:]), strict=True):
            h = torch.cat([h, skip], dim=1)
            h = upsample(res2(res1(h, film_cond), film_cond))
        return self.final(h).transpose(1, 2)


@register_network(
    "unet", defaults={"down_dims": [64, 128, 256], "noise_embed_dim": 128, "kernel_size": 5, "n_groups": 8}
)
def build_unet(
    action_dim: int, cond_dim: int, horizon: int, noise_scale: float, **section
) -> ConditionalUnet1D:
    network = ConditionalUnet1D(action_dim, cond_dim, noise_scale=noise_scale, **section)
    if horizon % network.horizon_multiple:
        raise ValueError(
            f"horizon={horizon} must be a multiple of {network.horizon_multiple} "
            f"for a U-Net with down_dims {list(network.down_dims)}"
        )
    return network
