"""robomosaic-demo (what `make demo` runs), shortened: collect, train, evaluate, film."""

from __future__ import annotations

import json

import imageio.v2 as imageio
import numpy as np
import pytest

from robomosaic.data.spec import DatasetSpec, KeySpec
from robomosaic.data.store import EpisodeStore
from robomosaic.policies import load_policy
from robomosaic.policies.demo import demo_config, main


def test_demo_goes_from_nothing_to_an_evaluated_policy(tmp_path, capsys):
    old = EpisodeStore.create(
        tmp_path / "lift.zarr", DatasetSpec({"x": KeySpec((1,), "float32")}, 20.0, task="lift")
    )
    old.append_episode({"x": np.zeros((3, 1), np.float32)}, {"success": True})
    main(
        [
            "quick=true",
            "episodes=2",
            "train_steps=4",
            "batch_size=8",
            "eval_episodes=2",
            f"out_dir={tmp_path}",
            "workers=1",
        ]
    )
    printed = capsys.readouterr().out
    store = EpisodeStore.open(tmp_path / "lift.zarr")  # made afresh: the old store is gone
    assert store.n_episodes == 2 and "x" not in store.spec.keys
    policy = load_policy(tmp_path / "policy" / "best")
    assert policy.horizon > 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["settings"]["episodes"] == 2 and report["settings"]["seed_offset"] >= 100_000
    assert report["checkpoint"]["task"] == "lift"
    (video,) = report["videos"]
    assert len(imageio.mimread(video, format="FFMPEG", memtest=False)) > 10
    assert f"({report['successes']}/2 held-out seeds)" in printed
    assert "robomosaic demo done" in printed


def test_quick_preset_yields_to_explicit_arguments():
    cfg = demo_config(["quick=true", "episodes=3"])
    assert cfg.episodes == 3 and cfg.train_steps == cfg.quick_preset.train_steps
    assert demo_config([]).train_steps != cfg.train_steps


def test_demo_does_not_replace_what_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"holds notes\.txt, which the demo did not write"):
        main([f"out_dir={tmp_path}"])
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "lift.zarr").mkdir()
    (tmp_path / "lift.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is not an episode store; not replacing it"):
        main([f"out_dir={tmp_path}"])
    assert (tmp_path / "lift.zarr" / "notes.txt").read_text() == "mine"
