"""SequenceSampler windows and padding against hand-computed frame indices, on real zarr stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from robomosaic.data.sampler import SequenceDataset, SequenceSampler, make_dataloader, split_episodes
from robomosaic.data.spec import DatasetSpec, KeySpec
from robomosaic.data.store import EpisodeStore

SPEC = DatasetSpec(
    keys={"obs": KeySpec((1,), "int64"), "action": KeySpec((2,), "float32"), "other": KeySpec((), "int64")},
    control_hz=10.0,
)


def tiny_store(path: Path, lengths=(5, 3)) -> EpisodeStore:
    """Every key holds its global frame index, so windows show which frames they read."""
    store = EpisodeStore.create(path, SPEC)
    start = 0
    for i, n in enumerate(lengths):
        t = np.arange(start, start + n)
        store.append_episode(
            {"obs": t[:, None], "action": np.stack([t, -t], 1).astype(np.float32), "other": t},
            {"seed": i, "success": True},
        )
        start += n
    return store


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sampler") / "tiny.zarr"
    tiny_store(path)
    return path


@pytest.fixture(params=[False, True], ids=["disk", "memory"])
def store(request, tiny_path) -> EpisodeStore:
    return EpisodeStore.open(tiny_path, in_memory=request.param)


def windows(sampler: SequenceSampler) -> list[tuple[list[int], list[int]]]:
    out = []
    for i in range(len(sampler)):
        w = sampler.sample(i)
        out.append((w["obs"][:, 0].tolist(), w["action"][:, 0].astype(int).tolist()))
    return out


def test_default_padding_gives_one_window_per_step(store):
    # Episodes: frames 0..4 and 5..7. horizon 4, n_obs_steps 2 -> pad_before 1, pad_after 2.
    sampler = SequenceSampler(store, ["obs"], ["action"], horizon=4, n_obs_steps=2)
    assert (sampler.pad_before, sampler.pad_after) == (1, 2)
    assert windows(sampler) == [
        ([0, 0], [0, 0, 1, 2]),  # t = -1: history padded with the first frame
        ([0, 1], [0, 1, 2, 3]),
        ([1, 2], [1, 2, 3, 4]),
        ([2, 3], [2, 3, 4, 4]),
        ([3, 4], [3, 4, 4, 4]),  # t = 3: actions padded with the last frame
        ([5, 5], [5, 5, 6, 7]),  # second episode, never mixing in frames of the first
        ([5, 6], [5, 6, 7, 7]),
        ([6, 7], [6, 7, 7, 7]),
    ]
    # the current observation (last of the history) runs over every step exactly once
    assert [w[0][-1] for w in windows(sampler)] == list(range(8))
    np.testing.assert_array_equal(sampler.window_episode, [0, 0, 0, 0, 0, 1, 1, 1])


def test_explicit_padding(store):
    sampler = SequenceSampler(store, ["obs"], ["action"], horizon=3, n_obs_steps=1, pad_before=0, pad_after=0)
    # episode 0: starts 0..2; episode 1 (length 3): start 5 only
    assert windows(sampler) == [([0], [0, 1, 2]), ([1], [1, 2, 3]), ([2], [2, 3, 4]), ([5], [5, 6, 7])]
    sampler = SequenceSampler(store, ["obs"], ["action"], horizon=4, n_obs_steps=3, pad_before=0, pad_after=0)
    assert windows(sampler) == [([0, 1, 2], [0, 1, 2, 3]), ([1, 2, 3], [1, 2, 3, 4])]  # episode 1 too short


def test_extra_action_like_keys_and_values(store):
    sampler = SequenceSampler(store, ["obs"], ["action", "other"], horizon=4, n_obs_steps=2)
    w = sampler.sample(5)
    assert w["obs"].shape == (2, 1) and w["obs"].dtype == np.int64
    assert w["action"].shape == (4, 2) and w["action"].dtype == np.float32
    np.testing.assert_array_equal(w["action"], [[5, -5], [5, -5], [6, -6], [7, -7]])
    np.testing.assert_array_equal(w["other"], [5, 5, 6, 7])


def test_episode_subset_by_mask_and_list(store):
    by_list = SequenceSampler(store, ["obs"], horizon=4, n_obs_steps=2, episodes=[1])
    by_mask = SequenceSampler(store, ["obs"], horizon=4, n_obs_steps=2, episodes=np.array([False, True]))
    assert (
        windows(by_list)
        == windows(by_mask)
        == [([5, 5], [5, 5, 6, 7]), ([5, 6], [5, 6, 7, 7]), ([6, 7], [6, 7, 7, 7])]
    )
    with pytest.raises(ValueError, match="mask has shape"):
        SequenceSampler(store, ["obs"], episodes=np.array([True]))
    with pytest.raises(ValueError, match="episode indices"):
        SequenceSampler(store, ["obs"], episodes=[2])


def test_batch_equals_single_windows(store):
    sampler = SequenceSampler(store, ["obs"], ["action"], horizon=4, n_obs_steps=2)
    batch = sampler.sample_batch([7, 0, 3, 3])
    assert batch["obs"].shape == (4, 2, 1) and batch["action"].shape == (4, 4, 2)
    for row, i in enumerate([7, 0, 3, 3]):
        single = sampler.sample(i)
        for key in batch:
            np.testing.assert_array_equal(batch[key][row], single[key])
    with pytest.raises(IndexError):
        sampler.sample_batch([8])


def test_bad_arguments(store):
    with pytest.raises(KeyError, match="nope"):
        SequenceSampler(store, ["nope"])
    with pytest.raises(ValueError, match="n_obs_steps"):
        SequenceSampler(store, ["obs"], horizon=2, n_obs_steps=3)
    with pytest.raises(ValueError, match="pad_after"):
        SequenceSampler(store, ["obs"], horizon=4, pad_after=4)
    with pytest.raises(ValueError, match="both observation and action"):
        SequenceSampler(store, ["action"], ["action"])


def test_split_episodes():
    train, val = split_episodes(20, 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert sorted([*train, *val]) == list(range(20))
    np.testing.assert_array_equal(split_episodes(20, 0.2, seed=3)[1], val)
    assert not np.array_equal(split_episodes(20, 0.2, seed=4)[1], val)
    assert len(split_episodes(3, 0.01)[1]) == 1  # at least one validation episode
    assert len(split_episodes(2, 0.9)[0]) == 1  # at least one training episode
    assert len(split_episodes(5, 0.0)[1]) == 0
    with pytest.raises(ValueError, match="val_ratio"):
        split_episodes(5, 1.0)


def test_dataset_and_dataloader(store):
    sampler = SequenceSampler(store, ["obs"], ["action"], horizon=4, n_obs_steps=2)
    dataset = SequenceDataset(sampler)
    item = dataset[2]
    assert set(item) == {"obs", "action"} and set(item["obs"]) == {"obs"}
    assert item["obs"]["obs"].shape == (2, 1) and item["action"].dtype == torch.float32
    loader = make_dataloader(dataset, batch_size=3, shuffle=True, drop_last=False, seed=0)
    seen = []
    for batch in loader:
        assert batch["obs"]["obs"].shape[1:] == (2, 1) and batch["action"].shape[1:] == (4, 2)
        seen += batch["obs"]["obs"][:, -1, 0].tolist()  # current observation = window id here
    assert sorted(seen) == list(range(8))
    assert [len(b["action"]) for b in make_dataloader(dataset, batch_size=3)] == [3, 3]  # drop_last


def test_disk_reader_matches_memory_across_chunks_and_cache_evictions(tmp_path):
    """Images span many chunks; a tiny cache forces evictions; both must give the numpy answer."""
    spec = DatasetSpec(
        keys={"image": KeySpec((32, 32, 3), "uint8"), "action": KeySpec((7,), "float32")}, control_hz=20
    )
    store = EpisodeStore.create(tmp_path / "img.zarr", spec)
    rng = np.random.default_rng(0)
    for seed in range(6):
        n = int(rng.integers(60, 120))
        store.append_episode(
            {
                "image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                "action": rng.random((n, 7), np.float32),
            },
            {"seed": seed, "success": True},
        )
    assert store.array("image").chunks[0] * 10 < store.n_steps
    memory = EpisodeStore.open(tmp_path / "img.zarr", in_memory=True)
    disk = EpisodeStore.open(
        tmp_path / "img.zarr", cache_bytes=3 * 32 * 32 * 3 * store.array("image").chunks[0]
    )
    on_disk = SequenceSampler(disk, ["image"], ["action"], horizon=8, n_obs_steps=3)
    in_memory = SequenceSampler(memory, ["image"], ["action"], horizon=8, n_obs_steps=3)
    for _ in range(3):
        index = rng.integers(0, len(on_disk), 64)
        a, b = on_disk.sample_batch(index), in_memory.sample_batch(index)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_dataloader_with_worker_processes(tiny_path):
    store = EpisodeStore.open(tiny_path)
    dataset = SequenceDataset(SequenceSampler(store, ["obs"], ["action"], horizon=4, n_obs_steps=2))
    loader = make_dataloader(dataset, batch_size=2, shuffle=False, num_workers=2, drop_last=False)
    seen = [v for batch in loader for v in batch["obs"]["obs"][:, -1, 0].tolist()]
    assert seen == list(range(8))


def test_arrays_with_other_codecs_are_read_through_zarr(tmp_path):
    """A store whose array was rewritten by another tool (zstd, not blosc) still reads correctly."""
    path = tmp_path / "tiny.zarr"
    tiny_store(path)
    group = zarr.open_group(path, mode="r+")
    action = group["data/action"][:]
    del group["data/action"]
    group.create_array("data/action", data=action, chunks=(3, 2), compressors=[zarr.codecs.ZstdCodec()])
    disk = SequenceSampler(EpisodeStore.open(path), ["obs"], ["action"], horizon=4, n_obs_steps=2)
    memory = SequenceSampler(
        EpisodeStore.open(path, in_memory=True), ["obs"], ["action"], horizon=4, n_obs_steps=2
    )
    index = np.arange(len(disk))
    np.testing.assert_array_equal(disk.sample_batch(index)["action"], memory.sample_batch(index)["action"])
    assert memory.sample(7)["action"][:, 0].tolist() == [6, 7, 7, 7]
