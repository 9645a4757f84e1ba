"""The fast inference path (ONNX Runtime) against eager PyTorch, its fallbacks, and bf16 training."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from robomosaic.policies.checkpoint import load_policy
from robomosaic.policies.denoising_policy import DenoisingPolicy
from robomosaic.policies.fast_network import OnnxNetwork
from robomosaic.policies.networks.base import NETWORKS, DenoiserNetwork, register_network
from robomosaic.policies.precision import bf16_supported, resolve_precision
from robomosaic.policies.train import training_step
from tests.test_evaluate import lift_state_obs, tiny_policy

# Chunks are in robot units of a [-1, 1]-normalized action range 2 wide.
CHUNK_ATOL = 1e-4


def history(policy: DenoisingPolicy, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(-1, 1, (policy.n_obs_steps, *s.shape)) for k, s in policy.obs_spec.items()}


def chunks(policy: DenoisingPolicy, obs: dict[str, np.ndarray], committed=None, seed: int = 3) -> np.ndarray:
    return policy.predict_chunk(obs, committed, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"process": {"name": "flow"}, "sampler": "euler"},
        {"network": "transformer", "transformer": {"d_model": 32, "depth": 2, "n_heads": 2}},
    ],
    ids=["unet-ddpm", "unet-flow", "transformer"],
)
def test_loaded_policy_runs_fast_and_matches_eager(tmp_path, config):
    source = tiny_policy()
    config = {**source.config, **config}
    policy = DenoisingPolicy(config, source.obs_spec, source.action_spec, source.normalizer)
    policy.save(tmp_path / "ckpt", extra_spec={"task": "lift"})
    loaded = load_policy(tmp_path / "ckpt")
    assert loaded.backend == "auto"
    obs = history(loaded)
    fast = chunks(loaded, obs)
    assert isinstance(loaded._fast, OnnxNetwork)  # the chunk really came from ONNX Runtime
    eager = chunks(loaded.use_backend("eager"), obs)
    assert loaded._fast is None
    np.testing.assert_allclose(fast, eager, atol=CHUNK_ATOL, rtol=0)
    assert not np.allclose(chunks(loaded, obs, seed=4), eager, atol=1e-3)  # the noise is an input


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_batched_chunks_equal_separate_chunks_bit_for_bit(tmp_path, backend):
    """Evaluation batches the environments that replan together; no episode may notice. The fast
    path batches (ONNX Runtime's kernels are batch-invariant here), eager predicts one by one."""
    source = tiny_policy()
    source.save(tmp_path / "ckpt", extra_spec={"task": "lift"})
    policy = load_policy(tmp_path / "ckpt").use_backend(backend)
    histories = [history(policy, seed=i) for i in range(4)]

    def generators():
        return [torch.Generator().manual_seed(10 + i) for i in range(4)]

    separate = [policy.predict_chunk(h, None, g) for h, g in zip(histories, generators(), strict=True)]
    batched = policy.predict_chunks(histories, [None] * 4, generators())
    assert isinstance(policy._fast, OnnxNetwork) == (backend == "auto")
    for a, b in zip(separate, batched, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(batched[0], batched[1])


def test_fast_path_follows_new_weights_and_threads(tmp_path):
    policy = tiny_policy().eval().use_backend("auto")
    obs = history(policy)
    before = chunks(policy, obs)
    first = policy._fast
    other = tiny_policy().eval()
    with torch.no_grad():
        for p in other.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.load_state_dict(other.state_dict())
    after = chunks(policy, obs)
    assert policy._fast is not first
    assert not np.allclose(before, after, atol=1e-3)
    np.testing.assert_allclose(after, chunks(other, obs), atol=CHUNK_ATOL, rtol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if threads == 1 else 1)
        chunks(policy, obs)
        assert policy._fast.threads == torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    policy.train()
    assert policy._fast is None
    assert chunks(policy, obs) is not None and policy._fast is None  # training mode: eager


def test_committed_actions_take_gradients_through_eager():
    policy = tiny_policy().eval().use_backend("auto")
    obs = history(policy)
    committed = np.full((policy.horizon, 7), np.nan)
    committed[:3] = 0.2
    fast = chunks(policy, obs, committed)
    eager = chunks(policy.use_backend("eager"), obs, committed)
    np.testing.assert_allclose(fast, eager, atol=CHUNK_ATOL, rtol=0)
    np.testing.assert_allclose(fast[:3], 0.2, atol=1e-5)


class HostRoundTrip(DenoiserNetwork):
    """A network whose forward leaves torch (a Python float of its input): tracing freezes that
    value into a constant, so the exported graph computes something else, and the probe against
    eager must catch it."""

    def __init__(self, action_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.out = nn.Linear(action_dim + cond_dim, action_dim)

    def forward(self, x, noise, cond):
        scale = float(x.abs().max())
        return scale * self.out(torch.cat([x, cond[:, None].expand(-1, x.shape[1], -1)], dim=-1))


@pytest.fixture
def host_round_trip_registered():
    """Registered for one test only: every registered network adds its section to policy configs,
    and checkpoints saved by later tests must load in processes that never registered it."""
    register_network("host_round_trip")(
        lambda action_dim, cond_dim, *_, **__: HostRoundTrip(action_dim, cond_dim)
    )
    yield
    NETWORKS.pop("host_round_trip")


@pytest.mark.parametrize("network", ["host_round_trip", "mode"])
def test_fast_path_that_cannot_be_built_falls_back_and_says_so(caplog, host_round_trip_registered, network):
    source = tiny_policy()
    config = {**source.config, "network": network}
    if network == "mode":
        config["mode"] = {"d_model": 32, "depth": 1, "n_heads": 2, "num_experts": 2, "top_k": 1}
    policy = DenoisingPolicy(config, source.obs_spec, source.action_spec, source.normalizer).eval()
    obs = history(policy)
    eager = chunks(policy, obs)
    with caplog.at_level(logging.INFO, logger="robomosaic.policies.fast_network"):
        fast = chunks(policy.use_backend("auto"), obs)
    assert policy._fast is False
    expected = "differs from eager" if network == "host_round_trip" else "not exportable"
    assert any(expected in r.getMessage() and "eager PyTorch" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(fast, eager)


def test_precision_is_detected_not_assumed():
    expected = "bf16" if bf16_supported("cpu") else "fp32"
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("bf16", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision='fp16'"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_learns_in_each_precision(precision):
    if precision == "bf16" and not bf16_supported("cpu"):
        pytest.skip("this CPU has no native bf16 units")
    policy = tiny_policy(lift_state_obs()).train()
    g = torch.Generator().manual_seed(0)
    obs = {k: torch.rand(32, 2, *s.shape, generator=g) * 2 - 1 for k, s in policy.obs_spec.items()}
    batch = {"obs": obs, "action": torch.rand(32, policy.horizon, 7, generator=g) * 1.6 - 0.8}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        torch.manual_seed(step % 4)  # the same 4 noise draws again and again: the loss must fall
        loss, grad_norm = training_step(policy, batch, optimizer, 1.0, precision)
        assert loss.dtype == torch.float32 and torch.isfinite(grad_norm)
        losses.append(float(loss))
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])
