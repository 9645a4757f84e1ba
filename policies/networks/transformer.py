"""DiT-style transformer denoiser (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

Tokens: one per action step (linear in + learned positional embedding), preceded by the
observation conditioning tokens (a global vector is one token; a sequence (B, n_cond, cond_dim) is
n_cond tokens), each with its own learned positional embedding. Conditioning enters twice:
- the cond tokens are prepended and attended by plain self-attention in every block (chosen over
  cross-attention: one attention op per block, and cond tokens are refined alongside the actions);
- adaLN-Zero: every block's pre-norm shift/scale and residual gates are regressed from
  c = noise embedding + mean of the projected cond tokens, from zero-initialized linears, and the
  output layer is zero-initialized too, so a fresh network outputs exactly zero and each block
  starts as the identity.

The feed-forward module is pluggable: `ffn_factory(d_model)` returns a module called as
`ffn(x, noise_emb)`; the noise embedding is passed so a mixture-of-experts FFN can route on the
noise level alone (MoDE, Reuss et al. 2025). The default `FeedForward` ignores it.

`ChunkTransformer` is the input side every transformer denoiser shares (shape checks, noise
embedding, action and cond token projections with their positions); `networks.mode` builds on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from robomosaic.policies.networks.base import DenoiserNetwork, register_network
from robomosaic.policies.networks.embedding import NoiseEmbedding, noise_per_sample


def make_norm(kind: Literal["layernorm", "rmsnorm"], dim: int) -> nn.Module:
    """Parameter-free norm: the affine part comes from the adaLN modulation."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, elementwise_affine=False, eps=1e-6)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class FeedForward(nn.Module):
    """Two-layer GELU MLP; takes (x, noise_emb) like every pluggable FFN and ignores noise_emb."""

    def __init__(self, d_model: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, hidden_dim),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, d_model),
        )

    def forward(self, x: torch.Tensor, noise_emb: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention; `qk_norm` RMS-normalizes queries and keys per head (learned gain)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, qk_norm: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        head_dim = d_model // n_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Pre-norm attention + FFN, each with adaLN shift/scale and a residual gate from c."""

    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module, norm: str, dropout: float) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.norm2 = make_norm(norm, d_model)
        self.ffn = ffn
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 6 * d_model))

    def forward(self, x: torch.Tensor, c: torch.Tensor, noise_emb: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.ffn(modulate(self.norm2(x), shift2, scale2), noise_emb)


class ChunkTransformer(DenoiserNetwork):
    """Input side shared by the transformer denoisers.

    `embed(x, noise, cond)` checks shapes and returns the noise embedding (B, d), the projected cond
    tokens (B, n_cond, d) without positions (add `cond_pos[:, :n_cond]` where they become tokens) and
    the action tokens (B, H, d) with positions. `horizon` and `max_cond_tokens` size the learned
    positional embeddings; shorter sequences use their first entries. `noise_scale` multiplies the
    noise input before its sinusoidal embedding (see `embedding`: 1000 for a flow time in [0, 1]).
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        horizon: int,
        d_model: int,
        max_cond_tokens: int,
        noise_scale: float,
    ) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.cond_dim = cond_dim
        self.horizon = horizon
        self.max_cond_tokens = max_cond_tokens
        self.action_in = nn.Linear(action_dim, d_model)
        self.cond_in = nn.Linear(cond_dim, d_model)
        self.action_pos = nn.Parameter(torch.zeros(1, horizon, d_model))
        self.cond_pos = nn.Parameter(torch.zeros(1, max_cond_tokens, d_model))
        self.noise_embedding = NoiseEmbedding(d_model, noise_scale)

    def _init_shared_weights(self) -> None:
        """DiT's initialization: xavier linears, normal positions and noise MLP (call after building)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.action_pos, std=0.02)
        nn.init.normal_(self.cond_pos, std=0.02)
        for mlp in (self.noise_embedding[1], self.noise_embedding[3]):
            nn.init.normal_(mlp.weight, std=0.02)

    def embed(
        self, x: torch.Tensor, noise: torch.Tensor | float, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.ndim != 3 or x.shape[-1] != self.action_dim or x.shape[1] > self.horizon:
            raise ValueError(
                f"x must be (batch, horizon <= {self.horizon}, {self.action_dim}), got {tuple(x.shape)}"
            )
        batch, horizon = x.shape[:2]
        if cond.ndim == 2:
            cond = cond.unsqueeze(1)
        if (
            cond.ndim != 3
            or cond.shape[0] != batch
            or cond.shape[2] != self.cond_dim
            or not 1 <= cond.shape[1] <= self.max_cond_tokens
        ):
            raise ValueError(
                f"cond must be ({batch}, {self.cond_dim}) or ({batch}, n_cond <= {self.max_cond_tokens}, "
                f"{self.cond_dim}), got {tuple(cond.shape)}"
            )
        noise_emb = self.embed_noise(noise_per_sample(noise, batch, x.device))
        return noise_emb, self.cond_in(cond), self.action_in(x) + self.action_pos[:, :horizon]

    def embed_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """(B,) float32 noise inputs -> (B, d_model) in the weights' dtype (the sinusoid stays float32)."""
        sinusoid, *mlp = self.noise_embedding
        h = sinusoid(noise).to(self.action_pos.dtype)
        for layer in mlp:
            h = layer(h)
        return h


class TransformerDenoiser(ChunkTransformer):
    """forward(x (B, H, A), noise (B,), cond (B, cond_dim) or (B, n_cond, cond_dim)) -> (B, H, A).

    See `ChunkTransformer` for `horizon`, `max_cond_tokens` and `noise_scale`.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        horizon: int,
        d_model: int = 256,
        depth: int = 6,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        max_cond_tokens: int = 1,
        norm: Literal["layernorm", "rmsnorm"] = "layernorm",
        dropout: float = 0.0,
        ffn_factory: Callable[[int], nn.Module] | None = None,
        noise_scale: float = 1.0,
    ) -> None:
        super().__init__(action_dim, cond_dim, horizon, d_model, max_cond_tokens, noise_scale)
        if ffn_factory is None:

            def ffn_factory(d: int) -> nn.Module:
                return FeedForward(d, int(mlp_ratio * d), dropout)

        self.blocks = nn.ModuleList(
            DiTBlock(d_model, n_heads, ffn_factory(d_model), norm, dropout) for _ in range(depth)
        )
        self.final_norm = make_norm(norm, d_model)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 2 * d_model))
        self.action_out = nn.Linear(d_model, action_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialization, with zero adaLN and output layers."""
        self._init_shared_weights()
        zero_init = [block.modulation[-1] for block in self.blocks]
        zero_init += [self.final_modulation[-1], self.action_out]
        for linear in zero_init:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | float, cond: torch.Tensor) -> torch.Tensor:
        noise_emb, cond_tokens, action_tokens = self.embed(x, noise, cond)
        n_cond = cond_tokens.shape[1]
        c = noise_emb + cond_tokens.mean(dim=1)
        tokens = torch.cat([cond_tokens + self.cond_pos[:, :n_cond], action_tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens, c, noise_emb)
        shift, scale = self.final_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.action_out(modulate(self.final_norm(tokens[:, n_cond:]), shift, scale))


@register_network("transformer", defaults={"d_model": 128, "depth": 4, "n_heads": 4, "mlp_ratio": 4.0})
def build_transformer(
    action_dim: int, cond_dim: int, horizon: int, noise_scale: float, **section
) -> TransformerDenoiser:
    return TransformerDenoiser(action_dim, cond_dim, horizon, noise_scale=noise_scale, **section)
