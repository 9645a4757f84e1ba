"""MoDE: a transformer denoiser with a noise-routed mixture of SwiGLU experts (Reuss et al.,
"Efficient Diffusion Transformer Policies with Mixture of Expert Denoisers for Multitask Learning",
ICLR 2025; reference implementation intuitive-robots/MoDE_Diffusion_Policy, modedit.py).

Tokens: [noise embedding, cond tokens (+ positions), action tokens (+ positions)] (the input side
is `ChunkTransformer`'s). Each block is pre-norm with RMSNorm:

    x = x + Attention(RMSNorm(x) + noise_emb)      # noise-conditioned attention, QK-norm
    x = x + MoE(RMSNorm(x))                        # top-k of E SwiGLU experts

There is no adaLN: the noise level enters through the prepended token, the attention input and the
router. With `router="noise"` (the paper's) the router reads only the noise embedding, so every
token of a sample takes the same route and the route depends on sigma alone; `router="token"`
routes every token from the token itself (the ablation). Top-k weights are renormalized to sum to
1, and training adds the Switch Transformer load-balancing loss (`auxiliary_loss`).

Expert caching. A noise-routed layer at a given noise level is the fixed mixture sum_j w_j
SwiGLU_j(x) over its top-k experts, which is itself one SwiGLU with k times the hidden units:
concatenate the selected experts' input and output projections, and scale each expert's hidden units
by its routing weight, the diagonal between the two projections. Folding that diagonal into the
output projection would give every noise level its own copy of its k experts: 5x the layer's expert
weights for a 10-step schedule with 4 experts (31 MB at the bench's size, beyond what the CPU's
caches hold). Kept apart, the levels that select the same experts share one concatenation, at most
C(E, k) per layer; in the bench that is 11 MB and a batch-1 chunk about 2 % faster. At inference
(eval mode, gradients off, one noise level for the whole batch, as the samplers call it) the network
builds that fused MLP per layer the first time it sees a noise level and reuses it at every later
call with the same level: a sampler's sigma schedule is fixed, so after the first chunk every step
costs one dense MLP of the active size. Each entry is keyed by the exact noise input, so a new sigma
schedule simply fills new entries (the oldest are evicted beyond `cache_size`). The whole cache is
dropped when the routing or expert weights change (`ExpertCache.validate`: version counters,
storage, dtype, and a probe of sampled values that also sees `param.data` writes such as diffusers'
`EMAModel.copy_to`). A standalone forward validates every time; inside `sampling()`, which
DenoisingPolicy wraps around every chunk, the weights are validated once at the start and each step
only looks its level up. Training never reads the cache. `num_experts=1` is the dense SwiGLU
transformer of the same architecture (no router, no cache).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robomosaic.policies.networks.base import register_network
from robomosaic.policies.networks.embedding import noise_per_sample
from robomosaic.policies.networks.transformer import ChunkTransformer, SelfAttention

Router = Literal["noise", "token"]


def swiglu(x: Tensor, w_in: Tensor, w_out: Tensor, unit_scale: Tensor | None = None) -> Tensor:
    """SwiGLU MLP: w_in (2h, d) holds the value rows then the gate rows, w_out is (d, h);
    `unit_scale` (h,) multiplies the hidden units (a fused MLP's routing weights)."""
    value, gate = F.linear(x, w_in).chunk(2, dim=-1)
    hidden = value * F.silu(gate)
    if unit_scale is not None:
        hidden.mul_(unit_scale)  # in place: a new (B, N, h) tensor costs 15 % of the MLP at batch 64
    return F.linear(hidden, w_out)


FusedMLP = tuple[Tensor, Tensor, Tensor]  # (w_in, w_out, unit_scale) of `swiglu`: a layer's cached experts


def load_balancing_loss(probs: Tensor, top_i: Tensor) -> Tensor:
    """Switch Transformer's auxiliary loss E * sum_e f_e P_e over routing units (samples or tokens).

    probs (U, E): router probabilities; top_i (U, k): the experts each unit is dispatched to.
    f_e is the fraction of the U * k dispatch slots that go to expert e (a count, without gradient)
    and P_e the mean probability of e, so the gradient lowers the probability of overused experts.
    Uniform use (f = P = 1/E) gives 1, the minimum of E * sum_e P_e^2 that the loss is when dispatch
    follows the probabilities; any skew toward some experts raises it.
    """
    counts = torch.bincount(top_i.reshape(-1), minlength=probs.shape[-1]).to(probs.dtype)
    return probs.shape[-1] * (counts / top_i.numel() * probs.mean(dim=0)).sum()


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward, called as `ffn(x, noise_emb)` like every pluggable FFN."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor, noise_emb: Tensor) -> Tensor:
        return swiglu(x, self.w_in.weight, self.w_out.weight)


class MoEFeedForward(nn.Module):
    """E SwiGLU experts (stacked weights), a top-k router on the noise embedding or on each token.

    `forward(x (B, N, d), noise_emb (B, d))` dispatches each routing unit (a whole sample for the
    noise router, a token for the token router) to its k experts and sums their outputs weighted
    by the renormalized top-k probabilities, running each expert only on the units routed to it
    (the reference's gather/scatter). It keeps, from the last call, `balance_loss` (training only)
    and `last_combine` (U, E), the routing weights it used (0 for experts not selected).
    """

    def __init__(self, d_model: int, hidden: int, num_experts: int, top_k: int, router: Router) -> None:
        super().__init__()
        if router not in ("noise", "token"):
            raise ValueError(f"router must be 'noise' or 'token', got {router!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.hidden, self.num_experts, self.top_k, self.router_input = hidden, num_experts, top_k, router
        self.router = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, num_experts))
        self.w_in = nn.Parameter(torch.empty(num_experts, 2 * hidden, d_model))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        for e in range(num_experts):
            nn.init.xavier_uniform_(self.w_in[e])
            nn.init.xavier_uniform_(self.w_out[e])
        self.balance_loss: Tensor | None = None
        self.last_combine: Tensor | None = None

    def route(self, router_input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(U, d) -> probabilities (U, E), top-k experts (U, k), renormalized top-k weights (U, k)."""
        probs = self.router(router_input).softmax(dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        return probs, top_i, top_w / top_w.sum(dim=-1, keepdim=True)

    def fuse(self, experts: Tensor) -> tuple[Tensor, Tensor]:
        """The experts `experts` (k,) as one SwiGLU of width k * h: its (w_in, w_out) for `swiglu`,
        whose hidden units are expert experts[0]'s, then experts[1]'s, and so on."""
        k, h = len(experts), self.hidden
        w_in = self.w_in[experts]  # (k, 2h, d): values then gates of every selected expert
        w_in = torch.cat([w_in[:, :h].reshape(k * h, -1), w_in[:, h:].reshape(k * h, -1)])
        w_out = self.w_out[experts].permute(1, 0, 2).reshape(-1, k * h)
        return w_in, w_out

    def unit_scale(self, weights: Tensor) -> Tensor:
        """The routing weights (k,) of fused experts as the scale of its k * h hidden units:
        `swiglu(x, *fuse(i), unit_scale(w))` is sum_j w[j] * expert i[j](x)."""
        return weights.repeat_interleave(self.hidden)

    def forward(self, x: Tensor, noise_emb: Tensor) -> Tensor:
        batch, n, d = x.shape
        if self.router_input == "noise":
            units = x
            probs, top_i, top_w = self.route(noise_emb)
        else:
            units = x.reshape(batch * n, 1, d)
            probs, top_i, top_w = self.route(units[:, 0])
        self.balance_loss = load_balancing_loss(probs, top_i) if self.training else None
        combine = torch.zeros_like(probs).scatter(1, top_i, top_w)
        self.last_combine = combine.detach()
        out = torch.zeros_like(units)
        for e in range(self.num_experts):
            rows = (top_i == e).any(dim=1).nonzero().squeeze(1)
            if rows.numel():
                y = swiglu(units[rows], self.w_in[e], self.w_out[e])
                out = out.index_add(0, rows, combine[rows, e, None, None] * y)
        return out.reshape(batch, n, d)


class ModeBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.attn = SelfAttention(d_model, n_heads, dropout, qk_norm=True)
        self.ffn_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.ffn = ffn

    def forward(self, x: Tensor, noise_emb: Tensor, fused: FusedMLP | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x) + noise_emb[:, None])
        h = self.ffn_norm(x)
        return x + (swiglu(h, *fused) if fused is not None else self.ffn(h, noise_emb))


class ExpertCache:
    """The fused experts of every layer per noise level (`entries`), valid for one state of the weights.

    The concatenated weights of a set of experts are kept once per layer and set (`concatenated`),
    shared by every noise level that selects them; an entry adds only its routing weights.

    `validate(params)` drops every entry if the weights changed since they were built: version
    counters (in-place writes: optimizer steps, `load_state_dict`, updates under `no_grad`), storage
    pointers and dtypes (`.to()`, assigning loads), and a probe of about 64 values spread over each
    tensor, compared exactly, which also sees writes through `param.data` that bump no counter
    (diffusers' `EMAModel.copy_to`). `get(key, build)` returns an entry, building it on a miss; the
    least recently used entries beyond `size` are evicted. `builds` counts the entries built.
    `concatenation(key, build)` returns the concatenated weights for `key` (layer, experts).
    """

    PROBES_PER_TENSOR = 64

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[float, list[FusedMLP]] = OrderedDict()
        self.concatenated: dict[tuple[int, tuple[int, ...]], tuple[Tensor, Tensor]] = {}
        self.builds = 0
        self._stamp: tuple | None = None
        self._probe_views: list[Tensor] = []
        self._probe: Tensor | None = None

    def clear(self) -> None:
        self.entries.clear()
        self.concatenated.clear()
        self._stamp = self._probe = None

    def validate(self, params: list[Tensor]) -> None:
        # Tensor._version counts in-place writes through autograd-visible tensors.
        stamp = tuple((p._version, p.data_ptr(), p.dtype) for p in params)
        if stamp == self._stamp and torch.equal(torch.cat(self._probe_views), self._probe):
            return
        self.clear()
        self._stamp = stamp
        # Strided views into the parameters' storage (which the stamp pins): they read current values.
        self._probe_views = [
            p.detach().view(-1)[:: max(1, p.numel() // self.PROBES_PER_TENSOR)] for p in params
        ]
        self._probe = torch.cat(self._probe_views)

    def get(self, key: float, build: Callable[[], list[FusedMLP]]) -> list[FusedMLP]:
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = build()
            self.builds += 1
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        return entry

    def concatenation(
        self, key: tuple[int, tuple[int, ...]], build: Callable[[], tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        found = self.concatenated.get(key)
        if found is None:
            found = self.concatenated[key] = build()
        return found


class ModeDenoiser(ChunkTransformer):
    """forward(x (B, H, A), noise (B,), cond (B, cond_dim) or (B, n_cond, cond_dim)) -> (B, H, A).

    `expert_hidden` is each expert's SwiGLU width (default 4 * d_model, the reference's); a sample
    activates `top_k` experts. `num_experts=1, top_k=1` is the dense SwiGLU transformer.
    `load_balancing_weight` scales `auxiliary_loss()`. `cache` (default: on for the noise router)
    enables expert caching at inference; `cache_size` bounds the number of cached noise levels
    (each holds its routing weights, k * h numbers per layer; the concatenated experts are shared
    between levels, at most C(E, k) sets per layer, 0.8 MB each at d_model 128, width 256, top-2;
    a schedule longer than the cache re-routes at every step).
    """

    onnx_exportable = False  # top-k routing and the expert cache branch on data

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        horizon: int,
        d_model: int = 128,
        depth: int = 4,
        n_heads: int = 4,
        num_experts: int = 4,
        top_k: int = 2,
        expert_hidden: int | None = None,
        router: Router = "noise",
        load_balancing_weight: float = 0.01,
        cache: bool | None = None,
        cache_size: int = 32,
        max_cond_tokens: int = 1,
        dropout: float = 0.0,
        noise_scale: float = 1.0,
    ) -> None:
        super().__init__(action_dim, cond_dim, horizon, d_model, max_cond_tokens, noise_scale)
        hidden = expert_hidden or 4 * d_model
        if num_experts == 1 and top_k != 1:
            raise ValueError(f"top_k={top_k} with a single expert: a dense FFN needs top_k=1")

        def ffn() -> nn.Module:
            if num_experts == 1:
                return SwiGLU(d_model, hidden)
            return MoEFeedForward(d_model, hidden, num_experts, top_k, router)

        self.blocks = nn.ModuleList(ModeBlock(d_model, n_heads, ffn(), dropout) for _ in range(depth))
        self.final_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.action_out = nn.Linear(d_model, action_dim)
        self.router, self.load_balancing_weight = router, load_balancing_weight
        self._init_weights()
        self.cache = ExpertCache(cache_size)
        self._routing_modules = [
            module
            for root in (self.noise_embedding, *(block.ffn for block in self.blocks))
            for module in root.modules()
            if module._parameters
        ]
        self._in_sampling = False
        self._cache_enabled = False
        self.cache_enabled = self.is_sparse and router == "noise" if cache is None else cache

    def _init_weights(self) -> None:
        """Shared init (xavier linears), zero output layer (a fresh network predicts 0), and a
        near-uniform router (small logits, as the reference's zero-initialized one, but with ties broken)."""
        self._init_shared_weights()
        nn.init.zeros_(self.action_out.weight)
        nn.init.zeros_(self.action_out.bias)
        for block in self.blocks:
            if isinstance(block.ffn, MoEFeedForward):
                nn.init.normal_(block.ffn.router[-1].weight, std=0.02)

    @property
    def is_sparse(self) -> bool:
        return isinstance(self.blocks[0].ffn, MoEFeedForward)

    @property
    def cache_enabled(self) -> bool:
        return self._cache_enabled

    @cache_enabled.setter
    def cache_enabled(self, enabled: bool) -> None:
        if enabled and not self.is_sparse:
            raise ValueError("cache=True needs experts to fuse: this ModeDenoiser is dense (num_experts=1)")
        if enabled and self.router != "noise":
            raise ValueError(
                f"cache=True needs router='noise', got router={self.router!r}: a token-conditioned route "
                "depends on every token, not on the noise level alone, so it cannot be precomputed"
            )
        self._cache_enabled = bool(enabled)

    def auxiliary_loss(self) -> Tensor:
        """load_balancing_weight * the mean load-balancing loss of the MoE layers in the last
        training forward (0 for a dense network); each value is used once and then forgotten."""
        losses = []
        for block in self.blocks:
            if isinstance(block.ffn, MoEFeedForward) and block.ffn.balance_loss is not None:
                losses.append(block.ffn.balance_loss)
                block.ffn.balance_loss = None
        if not losses:
            return self.action_out.weight.new_zeros(())
        return self.load_balancing_weight * torch.stack(losses).mean()

    def _routing_params(self) -> list[Tensor]:
        # Read from the leaf modules' own parameter dicts: `parameters()` walks the module tree at a
        # cost comparable to a whole cached step at batch 1, and parameters may be replaced
        # (`load_state_dict(assign=True)`), so a list kept from __init__ could go stale.
        return [p for module in self._routing_modules for p in module._parameters.values() if p is not None]

    @contextmanager
    def sampling(self) -> Iterator[None]:
        """A sampling run (DenoisingPolicy wraps every chunk in one): the weights are validated
        against the cache once here instead of at every denoising step."""
        if self._cache_enabled:
            self.cache.validate(self._routing_params())
        outer, self._in_sampling = self._in_sampling, True
        try:
            yield
        finally:
            self._in_sampling = outer

    def _cached_experts(self, noise: Tensor) -> list[FusedMLP] | None:
        """The fused experts of every layer for this call's noise level, or None to route live."""
        if not self._cache_enabled or self.training or torch.is_grad_enabled():
            return None
        if not bool((noise == noise[0]).all()):
            return None
        if not self._in_sampling:
            self.cache.validate(self._routing_params())
        return self.cache.get(float(noise[0]), lambda: self._fuse_experts(noise[:1]))

    def _fuse_experts(self, noise: Tensor) -> list[FusedMLP]:
        noise_emb = self.embed_noise(noise)
        fused = []
        for layer, block in enumerate(self.blocks):
            _, top_i, top_w = block.ffn.route(noise_emb)
            order = top_i[0].argsort()  # one concatenation per set of experts, whatever their ranks
            experts, weights = top_i[0][order], top_w[0][order]
            key = (layer, tuple(experts.tolist()))
            w_in, w_out = self.cache.concatenation(key, partial(block.ffn.fuse, experts))
            fused.append((w_in, w_out, block.ffn.unit_scale(weights)))
        return fused

    def forward(self, x: Tensor, noise: Tensor | float, cond: Tensor) -> Tensor:
        noise = noise_per_sample(noise, x.shape[0], x.device)
        noise_emb, cond_tokens, action_tokens = self.embed(x, noise, cond)
        n_cond = cond_tokens.shape[1]
        tokens = torch.cat(
            [noise_emb[:, None], cond_tokens + self.cond_pos[:, :n_cond], action_tokens], dim=1
        )
        fused = self._cached_experts(noise)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, noise_emb, None if fused is None else fused[i])
        return self.action_out(self.final_norm(tokens[:, 1 + n_cond :]))


# MoDE (networks.mode): E SwiGLU experts, top-k routed on the noise level; expert caching at
# inference; the load-balancing loss is added to the training loss.
@register_network(
    "mode",
    defaults={
        "d_model": 128,
        "depth": 4,
        "n_heads": 4,
        "num_experts": 4,
        "top_k": 2,
        "expert_hidden": 256,
        "router": "noise",
        "load_balancing_weight": 0.01,
        "cache": None,
    },
)
def build_mode(action_dim: int, cond_dim: int, horizon: int, noise_scale: float, **section) -> ModeDenoiser:
    return ModeDenoiser(action_dim, cond_dim, horizon, noise_scale=noise_scale, **section)
