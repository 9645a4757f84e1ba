"""DenoisingPolicy: training signal, inference in robot units, checkpoints that round-trip exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robomosaic.data.normalizer import Normalizer
from robomosaic.data.spec import KeySpec
from robomosaic.policies.checkpoint import CheckpointError, _sha256, load_policy
from robomosaic.policies.denoising_policy import DenoisingPolicy

OBS = {"eef": KeySpec((3,), "float64"), "object": KeySpec((4,), "float64")}
ACTION = KeySpec((2,), "float32")


def normalizer() -> Normalizer:
    stats = {
        "eef": {"min": -np.ones(3), "max": np.ones(3)},
        "object": {"min": -2 * np.ones(4), "max": 2 * np.ones(4)},
        "action": {"min": np.array([-1.5, 0.0]), "max": np.array([1.5, 4.0])},
    }
    return Normalizer({k: "minmax" for k in stats}, stats)


def small(process: str = "ddpm", network: str = "unet", **extra) -> DenoisingPolicy:
    config = {
        "horizon": 8,
        "n_obs_steps": 2,
        "n_action_steps": 4,
        "network": network,
        "unet": {"down_dims": [32, 64], "noise_embed_dim": 32},
        "transformer": {"d_model": 32, "depth": 2, "n_heads": 2},
        "encoder": {"state_feature_dim": 32, "state_hidden_dims": [64]},
        "process": {"name": process},
        **extra,
    }
    torch.manual_seed(0)
    return DenoisingPolicy(config, OBS, ACTION, normalizer())


def batch(b: int = 16) -> dict:
    g = torch.Generator().manual_seed(1)
    obs = {
        "eef": torch.rand(b, 2, 3, generator=g) * 2 - 1,
        "object": torch.rand(b, 2, 4, generator=g) * 4 - 2,
    }
    # The action chunk is a deterministic function of the observation: learnable exactly.
    t = torch.linspace(0, 1, 8)
    a0 = obs["eef"][:, -1, :1] + 0.5 * t
    a1 = 2 + obs["object"][:, -1, :1] * t
    return {"obs": obs, "action": torch.stack([a0, a1], dim=-1)}


@pytest.mark.parametrize(
    ("process", "network", "sampler"),
    [("ddpm", "unet", "ddim"), ("flow", "unet", "euler"), ("edm", "transformer", "heun")],
)
def test_policy_overfits_one_batch(process, network, sampler):
    policy = small(process, network, sampler=sampler)
    data = batch()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(600 if process == "ddpm" else 400):  # epsilon-prediction learns slowest
        loss = policy(data, generator=g)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Single-batch losses are noisy (random noise levels): compare averages.
    assert np.mean(losses[-50:]) < 0.25 * np.mean(losses[:10])
    policy.eval()
    pred = policy.sample_actions(data["obs"], generator=torch.Generator().manual_seed(0))
    err = (pred - data["action"]).abs().mean().item()
    assert err < 0.15, f"{process}/{network}: mean abs error {err:.3f} in robot units"


def test_predict_chunk_shape_and_units():
    policy = small()
    history = {"eef": np.zeros((2, 3)), "object": np.zeros((2, 4))}
    chunk = policy.predict_chunk(history, generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (8, 2) and chunk.dtype == np.float64
    with pytest.raises(KeyError, match="object"):
        policy.predict_chunk({"eef": np.zeros((2, 3))})


def test_inpainting_reproduces_committed_actions():
    policy = small()
    history = {"eef": np.zeros((2, 3)), "object": np.zeros((2, 4))}
    committed = np.full((8, 2), np.nan)
    committed[:3] = [[0.5, 1.0], [0.25, 2.0], [0.0, 3.0]]
    chunk = policy.predict_chunk(history, committed=committed, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(chunk[:3], committed[:3], atol=1e-5)


def test_save_load_gives_identical_chunks(tmp_path):
    policy = small("flow", sampler="euler")
    policy.save(tmp_path / "ckpt")
    loaded = load_policy(tmp_path / "ckpt")
    assert isinstance(loaded, DenoisingPolicy)
    history = {"eef": np.full((2, 3), 0.3), "object": np.full((2, 4), -0.5)}
    a = policy.predict_chunk(history, generator=torch.Generator().manual_seed(7))
    b = loaded.use_backend("eager").predict_chunk(history, generator=torch.Generator().manual_seed(7))
    assert np.array_equal(a, b)
    fast = loaded.use_backend("auto").predict_chunk(history, generator=torch.Generator().manual_seed(7))
    np.testing.assert_allclose(fast, a, atol=1e-4, rtol=0)  # a loaded policy runs the fast path


def test_mismatched_checkpoint_is_rejected(tmp_path):
    """A config edited consistently (hash updated) but not matching the weights fails by tensor name."""
    path = small().save(tmp_path / "ckpt")
    config = (path / "config.yaml").read_text().replace("- 64\n", "- 48\n")
    (path / "config.yaml").write_text(config)
    spec = json.loads((path / "spec.json").read_text())
    spec["files"]["config.yaml"] = _sha256(path / "config.yaml")
    (path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*shape"):
        load_policy(path)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="multiple of 2"):
        small(horizon=7)
    with pytest.raises(KeyError, match="unknown policy config key 'horizn'"):
        small(horizn=8)
    with pytest.raises(ValueError, match="n_action_steps"):
        small(n_action_steps=9)
