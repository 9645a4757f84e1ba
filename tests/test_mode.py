"""MoDE denoiser: noise-only routing, load balancing, expert caching exact and invalidated, training."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from robomosaic.conf import load_group_option
from robomosaic.data.normalizer import Normalizer
from robomosaic.data.spec import KeySpec
from robomosaic.policies.checkpoint import load_policy
from robomosaic.policies.denoising_policy import DenoisingPolicy
from robomosaic.policies.networks import ModeDenoiser, MoEFeedForward, load_balancing_loss
from robomosaic.policies.networks.mode import swiglu

OBS = {"eef": KeySpec((3,), "float64"), "object": KeySpec((4,), "float64")}
ACTION = KeySpec((2,), "float32")
HORIZON, STEPS = 8, 10


def perturb(module: nn.Module, seed: int = 0) -> None:
    """Give the zero-initialized output layer and the near-uniform routers real values, so that
    outputs depend on the weights and routes change with the noise level."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, ModeDenoiser):
                m.action_out.weight.copy_(0.3 * torch.randn(m.action_out.weight.shape, generator=g))
            if isinstance(m, MoEFeedForward):
                last = m.router[-1]
                last.weight.copy_(torch.randn(last.weight.shape, generator=g))


def small_net(**kwargs) -> ModeDenoiser:
    args = dict(action_dim=2, cond_dim=16, horizon=HORIZON, d_model=32, depth=2, n_heads=2)
    torch.manual_seed(0)
    net = ModeDenoiser(**{**args, "expert_hidden": 32, "noise_scale": 100.0, **kwargs})
    perturb(net)
    return net


def normalizer() -> Normalizer:
    stats = {
        "eef": {"min": -np.ones(3), "max": np.ones(3)},
        "object": {"min": -2 * np.ones(4), "max": 2 * np.ones(4)},
        "action": {"min": np.array([-1.5, 0.0]), "max": np.array([1.5, 4.0])},
    }
    return Normalizer({k: "minmax" for k in stats}, stats)


def small_policy(**mode) -> DenoisingPolicy:
    config = {
        "horizon": HORIZON,
        "n_obs_steps": 2,
        "n_action_steps": 4,
        "network": "mode",
        "mode": {"d_model": 32, "depth": 2, "n_heads": 2, "expert_hidden": 32, **mode},
        "encoder": {"state_feature_dim": 32, "state_hidden_dims": [64]},
        **load_group_option("flow", "edm"),  # MoDE's: EDM, log-logistic sigmas, DDIM in 10 steps
        "steps": STEPS,
    }
    torch.manual_seed(0)
    return DenoisingPolicy(config, OBS, ACTION, normalizer())


def batch(b: int = 16) -> dict:
    g = torch.Generator().manual_seed(1)
    obs = {
        "eef": torch.rand(b, 2, 3, generator=g) * 2 - 1,
        "object": torch.rand(b, 2, 4, generator=g) * 4 - 2,
    }
    t = torch.linspace(0, 1, HORIZON)
    a0 = obs["eef"][:, -1, :1] + 0.5 * t
    a1 = 2 + obs["object"][:, -1, :1] * t
    return {"obs": obs, "action": torch.stack([a0, a1], dim=-1)}


def sample_both(policy: DenoisingPolicy, obs: dict, steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The same initial noise sampled with and without the expert cache."""
    noise = torch.randn(obs["eef"].shape[0], HORIZON, 2, generator=torch.Generator().manual_seed(7))
    net = policy.network
    net.cache_enabled = True
    cached = policy.sample_actions(obs, noise=noise, steps=steps)
    net.cache_enabled = False
    uncached = policy.sample_actions(obs, noise=noise, steps=steps)
    net.cache_enabled = True
    return cached, uncached


def edm_network_noise(policy: DenoisingPolicy, steps: int) -> list[float]:
    """The noise inputs the network sees on the sampler's schedule: c_noise = ln(sigma) / 4 in float32."""
    sigmas = policy.process.sigmas(steps)[:-1].float()
    return [float(s) for s in policy.process.preconditioning(sigmas)[3]]


# --- the sparse layer -----------------------------------------------------------------------------


def test_fused_experts_equal_the_weighted_mixture():
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 24, num_experts=4, top_k=2, router="noise")
    x = torch.randn(3, 5, 16)
    top_i, top_w = torch.tensor([3, 1]), torch.tensor([0.7, 0.3])
    mixture = sum(
        w * swiglu(x, moe.w_in[e], moe.w_out[e]) for e, w in zip(top_i.tolist(), top_w.tolist(), strict=True)
    )
    w_in, w_out = moe.fuse(top_i)
    assert w_in.shape == (2 * 2 * 24, 16) and w_out.shape == (16, 2 * 24)
    torch.testing.assert_close(swiglu(x, w_in, w_out, moe.unit_scale(top_w)), mixture, atol=1e-6, rtol=1e-5)


def test_load_balancing_loss_is_minimal_for_uniform_use():
    experts, units = 4, 8
    uniform = torch.full((units, experts), 1 / experts)
    balanced = torch.tensor([[0, 1], [2, 3]] * (units // 2))
    assert load_balancing_loss(uniform, balanced).item() == pytest.approx(1.0, abs=1e-6)
    # Every unit prefers experts 0 and 1 and is sent there: the loss rises with the skew.
    skewed_probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).expand(units, -1)
    skewed = torch.tensor([[0, 1]]).expand(units, -1)
    mild = load_balancing_loss(skewed_probs, skewed)
    assert mild.item() == pytest.approx(4 * (0.5 * 0.4 + 0.5 * 0.3))
    harsh = load_balancing_loss(torch.tensor([[0.7, 0.2, 0.05, 0.05]]).expand(units, -1), skewed)
    assert 1.0 < mild < harsh
    # Its gradient lowers the logits of the overused experts and raises the unused ones.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().expand(units, -1).clone().requires_grad_(True)
    load_balancing_loss(logits.softmax(-1), skewed).backward()
    assert (logits.grad[:, :2] > 0).all() and (logits.grad[:, 2:] < 0).all()


def test_route_depends_only_on_sigma():
    net = small_net().eval()
    g = torch.Generator().manual_seed(3)
    noise = torch.linspace(-1.7, 1.1, 6)  # EDM c_noise over sigma in [0.001, 80]
    routes = []
    for _ in range(2):
        x, cond = torch.randn(6, HORIZON, 2, generator=g), torch.randn(6, 16, generator=g)
        with torch.no_grad():
            net(x, noise, cond)
        routes.append([block.ffn.last_combine for block in net.blocks])
    for layer, (a, b) in enumerate(zip(*routes, strict=True)):
        assert a.shape == (6, 4), "one route per sample"
        assert torch.equal(a, b), f"layer {layer}: the route changed with x / cond at the same sigma"
        assert ((a > 0).sum(dim=1) == 2).all() and torch.allclose(a.sum(dim=1), torch.ones(6))
    # ... while different sigmas take different routes (in at least one layer).
    assert any(len({tuple(r.nonzero()[:, 1].tolist()) for r in layer.split(1)}) > 1 for layer in routes[0])
    # The token router, by contrast, routes each token on its content.
    token = small_net(router="token").eval()
    x = torch.randn(1, HORIZON, 2, generator=g)
    with torch.no_grad():
        token(x, noise[:1], torch.randn(1, 16, generator=g))
    per_token = token.blocks[0].ffn.last_combine
    assert per_token.shape == (1 + 1 + HORIZON, 4)
    assert len({tuple(r.nonzero()[:, 1].tolist()) for r in per_token.split(1)}) > 1


def test_training_loss_includes_the_load_balancing_loss():
    policy = small_policy(load_balancing_weight=0.0)
    policy.train()
    b = batch()
    noise = torch.randn(16, HORIZON, 2, generator=torch.Generator().manual_seed(2))
    sigma = policy.process.sample_training_sigmas(16, torch.Generator().manual_seed(3))
    without = policy(b, noise=noise, level=sigma)
    policy.network.load_balancing_weight = 1.0
    with_aux = policy(b, noise=noise, level=sigma)
    # recomputed from the routers, on the noise inputs of the training sigmas
    noise_emb = policy.network.embed_noise(policy.process.preconditioning(sigma)[3])
    expected = torch.stack(
        [load_balancing_loss(*block.ffn.route(noise_emb)[:2]) for block in policy.network.blocks]
    ).mean()
    torch.testing.assert_close(with_aux - without, expected)
    assert expected > 0.5
    assert policy.network.auxiliary_loss().item() == 0.0, "an auxiliary loss is used once"


# --- expert caching -------------------------------------------------------------------------------


def test_cached_and_uncached_sampling_return_the_same_chunk():
    policy = small_policy()
    perturb(policy)
    policy.eval()
    obs = batch(3)["obs"]
    net = policy.network
    assert net.cache_enabled, "caching is on by default for the noise router"
    cached, uncached = sample_both(policy, obs)
    assert net.cache.builds == STEPS
    assert list(net.cache.entries) == edm_network_noise(policy, STEPS)
    assert (cached - uncached).abs().max() <= 1e-5
    assert (cached[0] - cached[1]).abs().max() > 1e-2, "chunks depend on the observation"
    # levels that select the same experts of a layer share one concatenation of their weights
    distinct = 0
    for layer, block in enumerate(net.blocks):
        routes = [
            tuple(sorted(block.ffn.route(net.embed_noise(torch.tensor([level])))[1][0].tolist()))
            for level in net.cache.entries
        ]
        concatenations = [entry[layer][0] for entry in net.cache.entries.values()]
        assert len(set(routes)) < len(routes), "some levels of this layer take the same route"
        pairs = itertools.combinations(zip(routes, concatenations, strict=True), 2)
        for (route_a, w_a), (route_b, w_b) in pairs:
            assert (w_a is w_b) == (route_a == route_b)
        distinct += len(set(routes))
    assert len(net.cache.concatenated) == distinct
    # a second run reuses the cache: nothing rebuilt, same chunk
    again, _ = sample_both(policy, obs)
    assert net.cache.builds == STEPS and torch.equal(again, cached)


def test_cache_follows_schedule_weights_and_dtype():
    policy = small_policy()
    perturb(policy)
    policy.eval()
    net, obs = policy.network, batch(2)["obs"]
    sample_both(policy, obs)
    assert net.cache.builds == STEPS
    # a new sigma schedule: its noise levels are built, and the chunk is still exact
    cached, uncached = sample_both(policy, obs, steps=5)
    new_levels = set(edm_network_noise(policy, 5)) - set(edm_network_noise(policy, STEPS))
    assert len(new_levels) == 3, "the Karras schedules share sigma_max and sigma_min"
    assert net.cache.builds == STEPS + 3
    assert set(edm_network_noise(policy, 5)) <= set(list(net.cache.entries))
    assert (cached - uncached).abs().max() <= 1e-5
    # an optimizer step: the cache is dropped and rebuilt from the new weights
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    policy(batch()).backward()
    optimizer.step()
    policy.eval()
    cached, uncached = sample_both(policy, obs)
    assert net.cache.builds == STEPS + 3 + STEPS
    assert (cached - uncached).abs().max() <= 1e-5
    # a write through .data (as diffusers' EMAModel.copy_to does) bumps no version counter
    with torch.no_grad():
        for block in net.blocks:
            block.ffn.w_out.data.mul_(1.5)
    cached, uncached = sample_both(policy, obs)
    assert net.cache.builds == 3 * STEPS + 3
    assert (cached - uncached).abs().max() <= 1e-5
    # a dtype change (network level: the policy's normalizer works in float32)
    x, cond, noise = torch.randn(2, HORIZON, 2), torch.randn(2, net.cond_dim), torch.full((2,), 0.25)
    with torch.no_grad():
        net(x, noise, cond)
        builds = net.cache.builds
        net.double()
        out = net(x.double(), noise, cond.double())
        assert net.cache.builds == builds + 1
        assert all(
            w.dtype == torch.float64 for entry in net.cache.entries.values() for ws in entry for w in ws
        )
        net.cache_enabled = False
        torch.testing.assert_close(out, net(x.double(), noise, cond.double()), atol=1e-12, rtol=0)


def test_cache_is_never_used_in_training_or_with_gradients():
    net = small_net()
    x, cond, noise = torch.randn(2, HORIZON, 2), torch.randn(2, 16), torch.full((2,), 0.25)
    net.train()
    with torch.no_grad():
        net(x, noise, cond)
    net(x, noise, cond).sum().backward()
    net.eval()
    net(x, noise, cond)  # eval, but gradients on (guidance needs them)
    assert net.cache.builds == 0 and list(net.cache.entries) == []
    with torch.no_grad():
        net(x, torch.tensor([0.25, 0.5]), cond)  # two noise levels in one batch: routed live
        assert net.cache.builds == 0
        net(x, noise, cond)
    assert net.cache.builds == 1


def test_token_router_and_dense_network_refuse_caching():
    with pytest.raises(ValueError, match="router='noise'"):
        small_net(router="token", cache=True)
    token = small_net(router="token")
    assert not token.cache_enabled
    with pytest.raises(ValueError, match="router='noise'"):
        token.cache_enabled = True
    with pytest.raises(ValueError, match="dense"):
        small_net(num_experts=1, top_k=1, cache=True)
    with pytest.raises(ValueError, match="top_k"):
        small_net(num_experts=1, top_k=2)
    with pytest.raises(ValueError, match="router must be"):
        small_net(router="sigma")


def test_dense_variant_is_one_swiglu_per_block_without_auxiliary_loss():
    dense = small_net(num_experts=1, top_k=1, expert_hidden=64).train()
    assert not any(isinstance(m, MoEFeedForward) for m in dense.modules())
    dense(torch.randn(2, HORIZON, 2), torch.rand(2), torch.randn(2, 16)).sum().backward()
    assert dense.auxiliary_loss().item() == 0.0
    assert all(p.grad is not None for p in dense.parameters())
    policy = small_policy(num_experts=1, top_k=1, expert_hidden=64).eval()
    chunk = policy.sample_actions(batch(2)["obs"])
    assert chunk.shape == (2, HORIZON, 2) and torch.isfinite(chunk).all()


# --- the policy -----------------------------------------------------------------------------------


def test_mode_policy_trains_and_round_trips(tmp_path):
    policy = small_policy()
    b = batch()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    policy.train()
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = policy(b, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-15:]) < 0.5 * np.mean(losses[:15]), (losses[:15], losses[-15:])
    assert all(block.ffn.router[-1].weight.grad.abs().sum() > 0 for block in policy.network.blocks)

    policy.eval()
    path = policy.save(tmp_path / "mode")
    loaded = load_policy(path)
    assert isinstance(loaded.network, ModeDenoiser) and loaded.network.cache_enabled
    assert loaded.config["mode"] == policy.config["mode"]
    for key, value in policy.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    noise = torch.randn(4, HORIZON, 2, generator=torch.Generator().manual_seed(5))
    obs = {k: v[:4] for k, v in b["obs"].items()}
    torch.testing.assert_close(
        loaded.sample_actions(obs, noise=noise), policy.sample_actions(obs, noise=noise), atol=1e-6, rtol=0
    )
    # the trained policy fits the batch (robot units)
    err = (policy.sample_actions(obs, noise=noise) - b["action"][:4]).abs().mean()
    assert err < 0.3, f"mean abs error {err:.3f}"
