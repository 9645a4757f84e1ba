"""robomosaic-demo (what `make demo` runs), shortened to two episodes."""

from __future__ import annotations

import imageio.v2 as imageio
import numpy as np
import pytest

from robomosaic.data.demo import main
from robomosaic.data.spec import DatasetSpec, KeySpec
from robomosaic.data.store import EpisodeStore


def test_demo_collects_replays_and_films(tmp_path, capsys):
    old = EpisodeStore.create(
        tmp_path / "lift.zarr", DatasetSpec({"x": KeySpec((1,), "float32")}, 20.0, task="lift")
    )
    old.append_episode({"x": np.zeros((3, 1), np.float32)}, {"success": True})
    main(["episodes=2", f"out_dir={tmp_path}", "workers=1", "video_size=64"])
    printed = capsys.readouterr().out
    store = EpisodeStore.open(tmp_path / "lift.zarr")  # made afresh: the old store is gone
    assert store.n_episodes == 2 and "x" not in store.spec.keys
    assert all(store.meta_array("success"))
    frames = imageio.mimread(tmp_path / "lift_replay.mp4", format="FFMPEG", memtest=False)
    assert len(frames) == len(store.episode(0, ["action"])["action"]) + 1
    assert "max eef divergence 0.000 mm" in printed
    assert f"{tmp_path / 'lift.zarr'}: 2 episodes" in printed


def test_demo_does_not_replace_what_is_not_a_store(tmp_path):
    (tmp_path / "lift.zarr").mkdir()
    (tmp_path / "lift.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is not an episode store; not replacing it"):
        main([f"out_dir={tmp_path}"])
    assert (tmp_path / "lift.zarr" / "notes.txt").read_text() == "mine"
