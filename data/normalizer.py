"""Per-key affine normalizers fitted on an `EpisodeStore`, saved as safetensors.

Every key maps x -> (x - shift) * scale + bias (per dimension of one time step), with

    minmax    per-dimension min/max of the data to [-1, 1]
    meanstd   per-dimension (x - mean) / std
    image     uint8 images to [-1, 1] by a fixed x / 127.5 - 1 (nothing fitted)
    image01   uint8 images to [0, 1] by a fixed x / 255
    identity  unchanged

A dimension that does not vary (max - min < RANGE_EPS, std < STD_EPS) gets scale 1 and maps its
constant value to 0, as diffusion_policy's LinearNormalizer does, so nothing is divided by zero.
Results are float32 (or the float dtype of a tensor given); uint8 images become float32.
Statistics are accumulated chunk by chunk over the store (Chan et al.'s pairwise update for mean and
variance), so fitting never loads a whole array; images are never read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from robomosaic.data.store import EpisodeStore

MODES = ("minmax", "meanstd", "image", "image01", "identity")
RANGE_EPS = 1e-4
STD_EPS = 1e-6
_METADATA_KEY = "robomosaic.normalizer"
_VERSION = 1

Array = np.ndarray | torch.Tensor


class _RunningStats:
    """Per-dimension count, min, max, mean and sum of squared deviations, updated block by block."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.count = 0
        self.min = np.full(shape, np.inf)
        self.max = np.full(shape, -np.inf)
        self.mean = np.zeros(shape)
        self.m2 = np.zeros(shape)

    def update(self, block: np.ndarray) -> None:
        if len(block) == 0:
            return
        block = block.astype(np.float64)
        n, mean = len(block), block.mean(axis=0)
        m2 = ((block - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
        self.count = total
        self.min = np.minimum(self.min, block.min(axis=0))
        self.max = np.maximum(self.max, block.max(axis=0))

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))


def _affine(mode: str, stats: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shift, scale, bias) of a mode: y = (x - shift) * scale + bias.

    Subtracting a data value first keeps float32 results exact at the data's extremes (min maps to
    exactly -1) even for a narrow range far from zero, where x * scale + offset would cancel badly.
    """
    if mode == "minmax":
        lo, hi = stats["min"], stats["max"]
        flat = hi - lo < RANGE_EPS
        scale = np.where(flat, 1.0, 2.0 / np.where(flat, 1.0, hi - lo))
        return lo, scale, np.where(flat, 0.0, -1.0)
    if mode == "meanstd":
        std = np.where(stats["std"] < STD_EPS, 1.0, stats["std"])
        return stats["mean"], 1.0 / std, np.zeros_like(std)
    if mode == "image":
        return np.array(0.0), np.array(1.0 / 127.5), np.array(-1.0)
    if mode == "image01":
        return np.array(0.0), np.array(1.0 / 255.0), np.array(0.0)
    if mode == "identity":
        return np.array(0.0), np.array(1.0), np.array(0.0)
    raise ValueError(f"unknown normalizer mode {mode!r} (modes: {MODES})")


class Normalizer:
    """Affine maps per key; works on numpy arrays and torch tensors (any leading batch/time axes)."""

    def __init__(self, modes: Mapping[str, str], stats: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self.modes = dict(modes)
        self.stats = {k: {n: np.asarray(v, dtype=np.float64) for n, v in s.items()} for k, s in stats.items()}
        self._params: dict[str, tuple[np.ndarray, ...]] = {}
        for key, mode in self.modes.items():
            if mode not in MODES:
                raise ValueError(f"key {key!r}: unknown normalizer mode {mode!r} (modes: {MODES})")
            self._params[key] = tuple(p.astype(np.float32) for p in _affine(mode, self.stats.get(key, {})))
        self._torch_params: dict[tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    @classmethod
    def fit(
        cls,
        store: EpisodeStore,
        keys: Sequence[str],
        mode: str | Mapping[str, str] = "minmax",
        image_mode: str = "image",
        episodes: Sequence[int] | np.ndarray | None = None,
    ) -> Normalizer:
        """Fit `keys` of `store` (optionally only `episodes`). `mode` is one mode for every non-image
        key or a {key: mode} mapping; image keys (uint8 HWC) get `image_mode` and integer keys
        (categorical, such as a task id) `identity` unless mapped."""
        modes, stats = {}, {}
        for key in keys:
            if key not in store.spec.keys:
                raise KeyError(f"{store.path}: no key {key!r} (keys: {sorted(store.spec.keys)})")
            is_image = store.spec.keys[key].is_image
            if is_image:
                default = image_mode
            elif np.issubdtype(np.dtype(store.spec.keys[key].dtype), np.integer):
                default = "identity"
            else:
                default = mode if isinstance(mode, str) else "minmax"
            modes[key] = mode.get(key, default) if isinstance(mode, Mapping) else default
            if modes[key] in ("minmax", "meanstd"):
                if is_image:
                    raise ValueError(f"key {key!r} is an image; use mode 'image' or 'image01'")
                stats[key] = _fit_stats(store, key, episodes)
        return cls(modes, stats)

    # ------------------------------------------------------------------ applying

    def normalize(self, x: Array, key: str) -> Array:
        shift, scale, bias = self._get(key, x)
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x, dtype=np.float32)
        elif not x.is_floating_point():
            x = x.float()
        return (x - shift) * scale + bias

    def unnormalize(self, y: Array, key: str) -> Array:
        shift, scale, bias = self._get(key, y)
        return (y - bias) / scale + shift

    def affine(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shift, scale, bias) of `key`: normalize(x) = (x - shift) * scale + bias, per dimension."""
        if key not in self._params:
            raise KeyError(f"normalizer has no key {key!r} (keys: {sorted(self._params)})")
        return self._params[key]

    def normalize_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Normalize every array of a (nested) dict such as a `SequenceDataset` batch."""
        return {
            k: self.normalize_batch(v) if isinstance(v, Mapping) else self.normalize(v, k)
            for k, v in batch.items()
        }

    def _get(self, key: str, x: Array) -> tuple[Any, ...]:
        if key not in self._params:
            raise KeyError(f"normalizer has no key {key!r} (keys: {sorted(self._params)})")
        params = self._params[key]
        if not isinstance(x, torch.Tensor):
            return params
        dtype = x.dtype if x.is_floating_point() else torch.float32
        cache_key = (key, x.device, dtype)
        if cache_key not in self._torch_params:
            self._torch_params[cache_key] = tuple(
                torch.as_tensor(p, dtype=dtype, device=x.device) for p in params
            )
        return self._torch_params[cache_key]

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> None:
        """Write statistics as safetensors tensors '<key>/<stat>' and the modes as json metadata."""
        tensors = {f"{k}/{n}": np.ascontiguousarray(v) for k, s in self.stats.items() for n, v in s.items()}
        header = {"version": _VERSION, "modes": self.modes}
        save_file(tensors, str(path), metadata={_METADATA_KEY: json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if _METADATA_KEY not in meta:
                raise ValueError(f"{path}: not a normalizer file (no '{_METADATA_KEY}' metadata)")
            header = json.loads(meta[_METADATA_KEY])
            if header.get("version") != _VERSION:
                raise ValueError(f"{path}: normalizer version {header.get('version')!r}, expected {_VERSION}")
            stats: dict[str, dict[str, np.ndarray]] = {}
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                key, _, stat = name.rpartition("/")
                stats.setdefault(key, {})[stat] = f.get_tensor(name)
        return cls(header["modes"], stats)

    def __repr__(self) -> str:
        return f"Normalizer({self.modes})"


def _fit_stats(
    store: EpisodeStore, key: str, episodes: Sequence[int] | np.ndarray | None
) -> dict[str, np.ndarray]:
    """min, max, mean, std of `key` over the chosen episodes, reading one time chunk at a time."""
    arr = store.array(key)
    n = store.n_steps
    if episodes is None:
        use = None
    else:
        use = np.zeros(n, dtype=bool)
        for e in np.asarray(episodes).reshape(-1):
            use[store.episode_slice(int(e))] = True
    block = arr.chunks[0] if hasattr(arr, "chunks") else 1 << 16
    acc = _RunningStats(tuple(store.spec.keys[key].shape))
    for start in range(0, n, block):
        rows = np.asarray(arr[start : min(start + block, n)])
        acc.update(rows if use is None else rows[use[start : start + len(rows)]])
    if acc.count == 0:
        raise ValueError(f"{store.path}: no steps to fit key {key!r} on")
    return {"min": acc.min, "max": acc.max, "mean": acc.mean, "std": acc.std}
