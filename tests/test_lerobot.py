"""LeRobot v3 datasets into stores: tests/assets/lerobot_v3 was written by LeRobot 0.4.4's own
`LeRobotDataset.create/add_frame/save_episode/finalize` (bench/lerobot_fixture.py, in a venv of its
own: LeRobot pins another torch); read here with pyarrow and PyAV only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from robomosaic.data.convert import main as convert_main
from robomosaic.data.lerobot import LeRobotError, convert_lerobot
from robomosaic.data.store import EpisodeStore

FIXTURE = Path(__file__).parent / "assets" / "lerobot_v3"
LENGTHS = (6, 8, 7)
TASKS = ("lift the red cube", "lift the red cube", "open the door")


def expected(episode: int, frame: int) -> dict[str, np.ndarray]:
    """bench/lerobot_fixture.py's values (it runs without robomosaic, so it cannot share this)."""
    state = np.arange(9, dtype=np.float32) + 10 * episode + 0.5 * frame
    action = np.linspace(-1, 1, 7, dtype=np.float32) * (frame + 1) / 10 + episode
    image = np.zeros((24, 32, 3), dtype=np.uint8)
    image[:, : 4 * (frame + 1)] = (60 * episode + 40) % 256
    return {"robot_state": state, "action": action, "front_image": image}


def test_a_dataset_written_by_lerobot_converts_with_its_frames_fps_actions_and_tasks(tmp_path, capsys):
    convert_main([f"input={FIXTURE}", f"out={tmp_path / 's.zarr'}"])
    assert "converted 3 episodes (21 frames)" in capsys.readouterr().out
    store = EpisodeStore.open(tmp_path / "s.zarr")
    assert store.spec.control_hz == 20.0 and store.spec.robot == "panda"
    assert set(store.spec.keys) == {"robot_state", "action", "front_image"}
    assert store.spec.keys["front_image"].shape == (24, 32, 3)
    assert [len(store.episode(i, ["action"])["action"]) for i in range(3)] == list(LENGTHS)
    for e, n in enumerate(LENGTHS):
        data = store.episode(e)
        want = [expected(e, f) for f in range(n)]
        for key in ("action", "robot_state"):
            np.testing.assert_array_equal(data[key], np.stack([w[key] for w in want]).astype(np.float64))
        # video frames are lossy (AV1, yuv420p): each within a few levels of what was written, and the
        # bar's width (it grows by 4 pixels a frame) right, so no frame is shifted
        written = np.stack([w["front_image"] for w in want]).astype(int)
        error = np.abs(data["front_image"].astype(int) - written)
        assert error.mean() < 3 and np.percentile(error, 99) < 40, (e, error.mean())
        assert store.episode_meta(e)["task"] == TASKS[e]


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(FIXTURE, root)
    return root


def test_a_missing_video_is_refused_by_name_and_nothing_is_written(tmp_path):
    root = _copy(tmp_path)
    video = root / "videos" / "observation.images.front" / "chunk-000" / "file-000.mp4"
    video.unlink()
    with pytest.raises(LeRobotError, match=r"file-000\.mp4: missing \(video 'observation\.images\.front'"):
        convert_lerobot(root, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("version", r"codebase_version 'v2\.1'; only v3\.0 is read"),
        ("no_action", r"no 'action' feature"),
        ("data", r"data/chunk-000/file-000\.parquet: not a readable parquet file"),
        ("video", r"file-000\.mp4: (cannot decode|episode 0 needs 6 frames)"),
    ],
)
def test_damaged_datasets_are_refused_by_name(tmp_path, damage, message):
    root = _copy(tmp_path)
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    if damage == "version":
        info["codebase_version"] = "v2.1"
    elif damage == "no_action":
        del info["features"]["action"]
    elif damage == "data":
        path = root / "data" / "chunk-000" / "file-000.parquet"
        path.write_bytes(path.read_bytes()[:200])
    else:
        path = root / "videos" / "observation.images.front" / "chunk-000" / "file-000.mp4"
        path.write_bytes(path.read_bytes()[:300])
    info_path.write_text(json.dumps(info))
    with pytest.raises(LeRobotError, match=message):
        convert_lerobot(root, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_export_then_convert_gives_the_same_store(tmp_path):
    """store -> LeRobot v3 (parquet + AV1 video, as LeRobot writes it) -> store: actions and states
    exact (float32), video frames within compression error, tasks and fps kept."""
    from robomosaic.data.export import main as export_main

    convert_lerobot(FIXTURE, tmp_path / "a.zarr", progress=False)
    export_main([f"store={tmp_path / 'a.zarr'}", f"out={tmp_path / 'ds'}", "format=lerobot"])
    assert not (tmp_path / "ds.partial").exists()
    convert_lerobot(tmp_path / "ds", tmp_path / "b.zarr", progress=False)
    a, b = EpisodeStore.open(tmp_path / "a.zarr"), EpisodeStore.open(tmp_path / "b.zarr")
    assert b.n_episodes == 3 and b.spec.control_hz == a.spec.control_hz
    assert set(b.spec.keys) == set(a.spec.keys)
    for i in range(3):
        ea, eb = a.episode(i), b.episode(i)
        np.testing.assert_array_equal(eb["action"], ea["action"])
        np.testing.assert_array_equal(eb["robot_state"], ea["robot_state"])
        assert np.abs(eb["front_image"].astype(int) - ea["front_image"]).mean() < 3
        assert b.episode_meta(i)["task"] == a.episode_meta(i)["task"]
    with pytest.raises(SystemExit, match="robomosaic-export: out=.*ds: already exists"):
        export_main([f"store={tmp_path / 'a.zarr'}", f"out={tmp_path / 'ds'}", "format=lerobot"])
