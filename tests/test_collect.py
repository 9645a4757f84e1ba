"""robomosaic-collect: scripted lift episodes into a real zarr store, appending, schema checks, and a
collector killed with SIGKILL mid-episode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from robomosaic.data.collect import free_seeds, main
from robomosaic.data.spec import KeySpec
from robomosaic.data.store import EpisodeStore

COLLECT = Path(sys.executable).parent / "robomosaic-collect"


@pytest.fixture(scope="module")
def lift_task():
    from robomosaic.sim.tasks import make_task

    task = make_task("lift")
    yield task
    task.close()


def _check_episode(store: EpisodeStore, i: int, task) -> None:
    """A complete, successful lift episode whose stored states reproduce its stored observations."""
    ep = store.episode(i)
    n = len(ep["action"])
    assert n > 5 and all(len(v) == n for v in ep.values())
    assert store.episode_meta(i)["success"] is True
    assert np.all(np.abs(ep["action"]) <= 1.0) and np.all(np.isfinite(ep["state"]))
    task.reset(store.episode_meta(i)["seed"])
    for t in (0, n // 2, n - 1):
        obs = task.set_state(ep["state"][t])
        # observations during a step lag the state by one physics substep: well under a millimetre
        assert np.abs(obs["robot0_eef_pos"] - ep["robot0_eef_pos"][t]).max() < 2e-3


@pytest.fixture(scope="module")
def lift_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("collect") / "lift.zarr"
    main(["task=lift", "episodes=2", f"out={out}", "workers=2"])
    return out


def test_collect_two_lift_episodes_and_read_them_back(lift_store, lift_task):
    store = EpisodeStore.open(lift_store)
    assert store.n_episodes == 2
    assert sorted(store.meta_array("seed")) == [0, 1]
    spec = store.spec
    assert spec.task == "lift" and spec.robot == "Panda" and spec.controller == "OSC_POSE"
    assert {"robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"} <= set(spec.keys)
    assert {"action", "reward", "state"} <= set(spec.keys)
    for i in range(2):
        _check_episode(store, i, lift_task)
        meta = store.episode_meta(i)
        assert meta["task"] == "lift"
        assert meta["duration"] == pytest.approx(len(store.episode(i, ["action"])["action"]) / 20.0)


def test_appending_skips_seeds_already_stored(lift_store):
    main(["task=lift", "episodes=1", f"out={lift_store}", "workers=1"])
    store = EpisodeStore.open(lift_store)
    assert store.n_episodes == 3
    assert sorted(store.meta_array("seed")) == [0, 1, 2]
    assert list(islice(free_seeds(0, {0, 1, 3}), 3)) == [2, 4, 5]


def test_appending_with_a_different_schema_names_the_key(lift_store):
    with pytest.raises(SystemExit, match="agentview_image"):
        main(["task=lift", "episodes=1", f"out={lift_store}", "task.cameras=[agentview]"])
    other = lift_store.parent / "other.zarr"
    spec = EpisodeStore.open(lift_store).spec
    spec.keys["object"] = KeySpec((3,), "float64")
    EpisodeStore.create(other, spec)
    with pytest.raises(SystemExit, match=r"other\.zarr: key 'object' differs"):
        main(["task=lift", "episodes=1", f"out={other}"])


def test_failed_episodes_are_kept_only_when_asked(tmp_path):
    out = tmp_path / "short.zarr"
    with pytest.raises(SystemExit, match="only 0 of 1 episodes stored"):
        main(["task=lift", "task.max_steps=4", "episodes=1", "max_attempts=2", f"out={out}", "workers=1"])
    assert EpisodeStore.open(out).n_episodes == 0
    main(["task=lift", "task.max_steps=4", "episodes=2", "keep_failed=true", f"out={out}", "workers=1"])
    store = EpisodeStore.open(out)
    assert [store.episode_meta(i)["success"] for i in range(2)] == [False, False]
    assert list(np.diff(store.episode_ends, prepend=0)) == [4, 4]


def test_camera_images_are_recorded_live(tmp_path):
    from robomosaic.data.replay import replay_episode

    out = tmp_path / "cameras.zarr"
    main(
        [
            "task=lift",
            "task.cameras=[agentview]",
            "task.image_size=32",
            "episodes=1",
            f"out={out}",
            "workers=1",
        ]
    )
    store = EpisodeStore.open(out)
    assert store.spec.keys["agentview_image"].shape == (32, 32, 3)
    images = store.episode(0, ["agentview_image"])["agentview_image"]
    assert images.dtype == np.uint8 and images.std() > 10
    # the frames a replay renders from the stored actions are the recorded ones, pixel for pixel
    frames = replay_episode(store, 0, "actions", camera="agentview", size=32).frames
    np.testing.assert_array_equal(frames[:-1], images)


def _start_collector(out: Path, workers: int) -> subprocess.Popen:
    return subprocess.Popen(
        # Far more episodes than run before the test interrupts it, however fast the machine is.
        [str(COLLECT), "task=lift", "episodes=500", f"out={out}", f"workers={workers}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # a process group of its own: signals reach its workers as from a terminal
        # A foreground job in a terminal has Ctrl-C enabled; a test runner started in the background
        # (as CI may be) passes SIGINT on ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_first_episode(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        with warnings.catch_warnings():  # reading while it writes: a tail of the next episode
            warnings.simplefilter("ignore")
            if (out / "meta" / "episode_ends").exists() and EpisodeStore.open(out).n_episodes >= 1:
                return
        assert proc.poll() is None, "the collector exited before storing an episode"
        time.sleep(0.2)
    pytest.fail("no episode stored within 300 s")


def test_sigkill_mid_episode_keeps_earlier_episodes(tmp_path, lift_task):
    out = tmp_path / "killed.zarr"
    proc = _start_collector(out, workers=1)
    try:
        _wait_for_first_episode(proc, out)
        time.sleep(0.5)  # well inside the next episode, which takes a few seconds
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    store = EpisodeStore.open(out, mode="a")
    n = store.n_episodes
    assert 1 <= n < 500
    assert sorted(store.meta_array("seed")) == list(range(n))
    for i in range(n):
        _check_episode(store, i, lift_task)
    # A fresh collection of the same seeds gives the same episodes, to the bit.
    again = tmp_path / "again.zarr"
    main(["task=lift", f"episodes={n}", f"out={again}", "workers=1"])
    fresh = EpisodeStore.open(again)
    by_seed = {fresh.episode_meta(i)["seed"]: i for i in range(n)}
    for i in range(n):
        expected = fresh.episode(by_seed[store.episode_meta(i)["seed"]])
        for key, value in store.episode(i).items():
            np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_ctrl_c_stores_finished_episodes_and_says_so(tmp_path):
    out = tmp_path / "interrupted.zarr"
    proc = _start_collector(out, workers=2)
    try:
        _wait_for_first_episode(proc, out)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        printed, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    stored = EpisodeStore.open(out).n_episodes
    assert 1 <= stored < 500
    assert f"collected {stored} episodes into {out}" in printed and "(interrupted)" in printed


@pytest.mark.parametrize("device", ["keyboard", "spacemouse"])
def test_teleop_without_a_display_is_a_clear_error(tmp_path, monkeypatch, device):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    out = tmp_path / "teleop.zarr"
    with pytest.raises(SystemExit, match=f"device={device}: needs a display"):
        main(["task=lift", f"device={device}", "episodes=1", f"out={out}"])
    assert not out.exists()


def test_teleop_loop_records_what_the_device_commands(lift_task):
    """The teleop loop with the hardware replaced by a device that answers `input2action` the way
    robosuite's devices do (their module needs an X display to import): up for six steps, then reset."""
    from robomosaic.data.devices import teleop_episode

    class Upwards:
        def start_control(self):
            self.calls = 0

        def input2action(self):
            self.calls += 1
            if self.calls > 6:
                return None  # the operator pressed reset
            up = np.array([0.0, 0.0, 0.75, 0.0, 0.0, 0.0])
            return {"right_delta": up, "right_abs": np.zeros(6), "right_gripper": np.array([1.0])}

    class Window:
        def is_running(self):
            return True

        def sync(self):
            pass

    data, meta = teleop_episode(lift_task, Upwards(), Window(), seed=4, max_fr=None)
    assert len(data["action"]) == 6 and meta["seed"] == 4 and meta["success"] is False
    np.testing.assert_array_equal(data["action"][:, :6], np.tile([0, 0, 0.75, 0, 0, 0], (6, 1)))
    np.testing.assert_array_equal(data["action"][:, 6], 1.0)  # gripper closed
    assert data["robot0_eef_pos"][-1, 2] > data["robot0_eef_pos"][0, 2] + 0.01
    assert set(data) == set(lift_task.spec.obs) | {"action", "reward", "state"}
