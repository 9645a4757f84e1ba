"""Normalizer fitted on real zarr stores: ranges, streaming statistics, degenerate dims, safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

import robomosaic.data.store as store_module
from robomosaic.data.normalizer import Normalizer
from robomosaic.data.spec import DatasetSpec, KeySpec
from robomosaic.data.store import EpisodeStore

SPEC = DatasetSpec(
    keys={
        "pos": KeySpec((3,), "float32"),
        "action": KeySpec((4,), "float32"),
        "image": KeySpec((4, 4, 3), "uint8"),
    },
    control_hz=20.0,
)


def make_data(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    pos = rng.normal([1.0, -2.0, 0.5], [0.1, 3.0, 1e-3], (n, 3)).astype(np.float32)
    action = rng.uniform(-0.5, 2.0, (n, 4)).astype(np.float32)
    action[:, 2] = 0.25  # a dimension that never moves (e.g. an unused gripper)
    return {"pos": pos, "action": action, "image": rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)}


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> tuple[EpisodeStore, list[dict[str, np.ndarray]]]:
    """A store whose low-dimensional chunks hold only 64 steps, so fitting streams over many."""
    path = tmp_path_factory.mktemp("norm") / "s.zarr"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store_module, "LOWDIM_CHUNK_BYTES", 64 * 16)
        store = EpisodeStore.create(path, SPEC)
    rng = np.random.default_rng(0)
    episodes = [make_data(int(n), rng) for n in rng.integers(100, 300, 5)]
    for i, ep in enumerate(episodes):
        store.append_episode(ep, {"seed": i, "success": True})
    assert store.array("action").chunks[0] == 64 and store.n_steps > 5 * 64
    return EpisodeStore.open(path), episodes


def test_minmax_maps_data_to_minus_one_one(filled):
    store, episodes = filled
    norm = Normalizer.fit(store, ["pos", "action"])
    for key in ("pos", "action"):
        x = np.concatenate([ep[key] for ep in episodes])
        y = norm.normalize(x, key)
        assert y.dtype == np.float32 and np.isfinite(y).all()
        moving = [d for d in range(x.shape[1]) if np.ptp(x[:, d]) > 0]
        np.testing.assert_allclose(y[:, moving].min(0), -1, atol=1e-6)
        np.testing.assert_allclose(y[:, moving].max(0), 1, atol=1e-6)
        np.testing.assert_allclose(norm.unnormalize(y, key), x, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        norm.stats["action"]["min"], np.concatenate([e["action"] for e in episodes]).min(0)
    )


def test_meanstd_streaming_statistics_match_numpy(filled):
    store, episodes = filled
    norm = Normalizer.fit(store, ["pos", "action"], mode="meanstd")
    for key in ("pos", "action"):
        x = np.concatenate([ep[key] for ep in episodes]).astype(np.float64)
        np.testing.assert_allclose(norm.stats[key]["mean"], x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(norm.stats[key]["std"], x.std(0), rtol=1e-9, atol=1e-12)
        y = norm.normalize(x.astype(np.float32), key)
        assert np.isfinite(y).all()
    y = norm.normalize(np.concatenate([ep["pos"] for ep in episodes]), "pos")
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(y.std(0), 1, atol=1e-3)


def test_degenerate_dimensions_map_to_zero_without_nan(filled):
    store, _ = filled
    for mode in ("minmax", "meanstd"):
        norm = Normalizer.fit(store, ["action"], mode=mode)
        x = np.array([[0.0, 1.0, 0.25, 1.5], [1.0, 0.0, 0.25, -0.5]], np.float32)
        y = norm.normalize(x, "action")
        assert np.isfinite(y).all(), mode
        np.testing.assert_array_equal(y[:, 2], 0.0)
        np.testing.assert_allclose(norm.unnormalize(y, "action"), x, atol=1e-6)
        # an unseen value of the constant dimension passes through with scale 1, not 1/0
        np.testing.assert_allclose(norm.normalize(x + 1, "action")[:, 2], 1.0)


def test_fit_on_episode_subset(filled):
    store, episodes = filled
    norm = Normalizer.fit(store, ["pos"], episodes=[1, 3])
    x = np.concatenate([episodes[1]["pos"], episodes[3]["pos"]])
    np.testing.assert_array_equal(norm.stats["pos"]["min"], x.min(0))
    np.testing.assert_array_equal(norm.stats["pos"]["max"], x.max(0))


def test_images_are_scaled_not_fitted(filled):
    store, _episodes = filled
    norm = Normalizer.fit(store, ["image", "pos"], mode={"pos": "meanstd"})
    assert norm.modes == {"image": "image", "pos": "meanstd"} and "image" not in norm.stats
    img = torch.tensor([[0, 255, 51]], dtype=torch.uint8)
    out = norm.normalize(img, "image")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[-1.0, 1.0, -0.6]]))
    norm01 = Normalizer.fit(store, ["image"], image_mode="image01")
    torch.testing.assert_close(norm01.normalize(img, "image"), torch.tensor([[0.0, 1.0, 0.2]]))
    with pytest.raises(ValueError, match="image"):
        Normalizer.fit(store, ["image"], mode={"image": "minmax"})


def test_torch_and_numpy_agree(filled):
    store, episodes = filled
    norm = Normalizer.fit(store, ["action"])
    x = episodes[0]["action"]
    y = norm.normalize(torch.from_numpy(x).double(), "action")
    assert y.dtype == torch.float64
    np.testing.assert_allclose(y.numpy(), norm.normalize(x, "action"), atol=1e-6)
    back = norm.unnormalize(y, "action")
    np.testing.assert_allclose(back.numpy(), x, atol=1e-6)


def test_normalize_batch_nested(filled):
    store, _episodes = filled
    norm = Normalizer.fit(store, ["pos", "action", "image"])
    batch = {
        "obs": {"pos": torch.zeros(2, 3), "image": torch.zeros(2, 4, 4, 3, dtype=torch.uint8)},
        "action": torch.ones(2, 4),
    }
    out = norm.normalize_batch(batch)
    torch.testing.assert_close(out["obs"]["pos"], norm.normalize(batch["obs"]["pos"], "pos"))
    assert (out["obs"]["image"] == -1).all()
    with pytest.raises(KeyError, match="'wrist'"):
        norm.normalize_batch({"wrist": torch.zeros(1)})


def test_save_load_round_trip(filled, tmp_path: Path):
    store, episodes = filled
    norm = Normalizer.fit(store, ["pos", "image"], mode={"pos": "meanstd"})
    norm_path = tmp_path / "normalizer.safetensors"
    norm.save(norm_path)
    with safe_open(str(norm_path), framework="np") as f:
        header = json.loads(f.metadata()["robomosaic.normalizer"])
        assert header["modes"] == {"pos": "meanstd", "image": "image"}
        assert set(f.keys()) == {"pos/min", "pos/max", "pos/mean", "pos/std"}
    loaded = Normalizer.load(norm_path)
    assert loaded.modes == norm.modes
    for key in ("pos", "image"):
        x = episodes[2][key]
        np.testing.assert_array_equal(loaded.normalize(x, key), norm.normalize(x, key))


def test_load_rejects_other_safetensors(tmp_path: Path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(path))
    with pytest.raises(ValueError, match="not a normalizer file"):
        Normalizer.load(path)


def test_bad_arguments(filled):
    store, _ = filled
    with pytest.raises(KeyError, match="nope"):
        Normalizer.fit(store, ["nope"])
    with pytest.raises(ValueError, match="unknown normalizer mode 'zscore'"):
        Normalizer.fit(store, ["pos"], mode="zscore")
