"""Training windows over an `EpisodeStore`: observation history plus an action chunk.

A window starts at time t of an episode of length L (t may be negative or run past the end; those
frames are padded by repeating the episode's first or last frame):

    observation keys   frames t .. t + n_obs_steps - 1
    action-like keys   frames t .. t + horizon - 1

Window starts range over -pad_before .. L - horizon + pad_after. The defaults pad_before =
n_obs_steps - 1 and pad_after = horizon - n_obs_steps make the windows' last observed frames
(t + n_obs_steps - 1) run over exactly 0 .. L - 1: every step of every episode is the "current"
observation of one window, the first ones with a history padded by the initial frame (what a policy
sees right after reset), the last ones with an action chunk padded by the final action (a held
pose). This is diffusion_policy's SequenceSampler with the padding chosen so that no step is
sampled twice or never.

Only what a window uses is read: observation keys `n_obs_steps` frames, action keys `horizon` frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from robomosaic.data.store import EpisodeStore


def split_episodes(n_episodes: int, val_ratio: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random split of episode indices into sorted (train, val) arrays.

    The validation set has round(val_ratio * n) episodes, at least one when val_ratio > 0, and the
    training set keeps at least one episode.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be at least 1, got {n_episodes}")
    n_val = round(val_ratio * n_episodes)
    if val_ratio > 0:
        n_val = min(max(n_val, 1), n_episodes - 1)
    perm = np.random.default_rng(seed).permutation(n_episodes)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _episode_selection(episodes: Sequence[int] | np.ndarray | None, n_episodes: int) -> np.ndarray:
    """Episode indices from None (all), a boolean mask of length n_episodes, or an index list."""
    if episodes is None:
        return np.arange(n_episodes)
    sel = np.asarray(episodes)
    if sel.dtype == bool:
        if sel.shape != (n_episodes,):
            raise ValueError(f"episode mask has shape {sel.shape}, the store has {n_episodes} episodes")
        return np.flatnonzero(sel)
    sel = sel.astype(np.int64).reshape(-1)
    if sel.size and (sel.min() < 0 or sel.max() >= n_episodes):
        raise ValueError(f"episode indices must be in [0, {n_episodes}), got {sel.min()}..{sel.max()}")
    return sel


class SequenceSampler:
    """Index table of windows and the reader that gathers them (see the module docstring)."""

    def __init__(
        self,
        store: EpisodeStore,
        obs_keys: Sequence[str],
        action_keys: Sequence[str] = ("action",),
        horizon: int = 16,
        n_obs_steps: int = 2,
        pad_before: int | None = None,
        pad_after: int | None = None,
        episodes: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        if not 1 <= n_obs_steps <= horizon:
            raise ValueError(
                f"need 1 <= n_obs_steps <= horizon, got n_obs_steps={n_obs_steps}, horizon={horizon}"
            )
        pad_before = n_obs_steps - 1 if pad_before is None else pad_before
        pad_after = horizon - n_obs_steps if pad_after is None else pad_after
        for name, pad in (("pad_before", pad_before), ("pad_after", pad_after)):
            if not 0 <= pad < horizon:
                raise ValueError(f"{name} must be in [0, horizon={horizon}), got {pad}")
        overlap = sorted(set(obs_keys) & set(action_keys))
        if overlap:
            raise ValueError(f"keys {overlap} are both observation and action keys")
        for key in [*obs_keys, *action_keys]:
            if key not in store.spec.keys:
                raise KeyError(f"{store.path}: no key {key!r} (keys: {sorted(store.spec.keys)})")
        self.store = store
        self.obs_keys = list(obs_keys)
        self.action_keys = list(action_keys)
        self.horizon = horizon
        self.n_obs_steps = n_obs_steps
        self.pad_before = pad_before
        self.pad_after = pad_after
        self.episodes = _episode_selection(episodes, store.n_episodes)

        # Index table, one row per window: global start of its episode, episode length, window
        # start t relative to the episode (negative inside pad_before).
        ends = store.episode_ends
        starts = ends - np.diff(ends, prepend=0)
        lengths = (ends - starts)[self.episodes]
        counts = np.maximum(lengths - horizon + pad_after + pad_before + 1, 0)
        first_row = np.cumsum(counts) - counts
        rows = np.arange(counts.sum())
        which = np.repeat(np.arange(len(self.episodes)), counts)
        self.episode_start = starts[self.episodes][which]
        self.episode_length = lengths[which]
        self.window_start = rows - first_row[which] - pad_before
        self.window_episode = self.episodes[which]

    def __len__(self) -> int:
        return len(self.window_start)

    def frames(self, index: np.ndarray, n: int) -> np.ndarray:
        """Global frame indices (len(index), n) of the first `n` steps of windows `index`, padded."""
        index = np.asarray(index, dtype=np.int64)
        offsets = self.window_start[index, None] + np.arange(n)
        padded = np.clip(offsets, 0, self.episode_length[index, None] - 1)
        return self.episode_start[index, None] + padded

    def sample_batch(self, index: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Windows `index` stacked: obs keys (B, n_obs_steps, ...), action keys (B, horizon, ...)."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"window index out of range for {len(self)} windows")
        index = index % max(len(self), 1)
        out = {}
        obs_frames = self.frames(index, self.n_obs_steps)
        for key in self.obs_keys:
            out[key] = self.store.read_frames(key, obs_frames)
        action_frames = self.frames(index, self.horizon)
        for key in self.action_keys:
            out[key] = self.store.read_frames(key, action_frames)
        return out

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """One window: obs keys (n_obs_steps, ...), action keys (horizon, ...)."""
        return {k: v[0] for k, v in self.sample_batch([i]).items()}


class SequenceDataset(Dataset):
    """Torch view of a `SequenceSampler`: items are {"obs": {key: tensor}, <action key>: tensor}.

    Values keep the store's dtypes (images stay uint8 HWC; normalize on the training device). An item
    index may be an int (one window) or a list of ints (a whole batch, gathered in one pass over the
    store): `make_dataloader` feeds it whole batches.
    """

    def __init__(self, sampler: SequenceSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, index: int | Sequence[int]) -> dict[str, Any]:
        if isinstance(index, (int, np.integer)):
            arrays = self.sampler.sample(int(index))
        else:
            arrays = self.sampler.sample_batch(index)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        batch: dict[str, Any] = {"obs": {k: tensors[k] for k in self.sampler.obs_keys}}
        batch.update({k: tensors[k] for k in self.sampler.action_keys})
        return batch


def make_dataloader(
    dataset: SequenceDataset,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    drop_last: bool = True,
    seed: int | None = None,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader that asks the dataset for whole batches (one gather per batch, not per item)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(
        dataset,
        sampler=BatchSampler(order, batch_size=batch_size, drop_last=drop_last),
        batch_size=None,  # the sampler yields index lists; the dataset returns collated batches
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        **kwargs,
    )
