"""robomosaic-convert on a demo.hdf5 recorded with robosuite's own DataCollectionWrapper and
gathered by robosuite's gather_demonstrations_as_hdf5, and on a robomimic-format file."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from robomosaic.data.convert import ConvertError, convert, main
from robomosaic.data.store import EpisodeStore


@pytest.fixture(scope="module")
def robosuite_demo(tmp_path_factory):
    """One successful scripted lift episode recorded the way collect_human_demonstrations.py does."""
    from robosuite.controllers import load_composite_controller_config
    from robosuite.scripts.collect_human_demonstrations import gather_demonstrations_as_hdf5
    from robosuite.wrappers import DataCollectionWrapper

    from robomosaic.sim.experts import make_expert
    from robomosaic.sim.tasks import make_task

    root = tmp_path_factory.mktemp("robosuite_demo")
    task = make_task("lift")
    task.reset(seed=1)
    env = DataCollectionWrapper(task.env, str(root / "raw"))
    env.reset()
    obs = task.observe()
    expert = make_expert("lift")
    expert.reset(obs, np.random.default_rng(1))
    live = []  # what the task observed before each action, during recording
    for _ in range(task.max_steps):
        live.append(obs)
        env.step(expert(obs))
        obs = task.observe()
        if task.info()["success"]:
            break
    assert task.info()["success"], "the scripted lift expert failed on seed 1"
    env.close()
    env_info = {
        "env_name": "Lift",
        "robots": ["Panda"],
        "controller_configs": load_composite_controller_config(controller="BASIC", robot="Panda"),
    }
    gather_demonstrations_as_hdf5(str(root / "raw"), str(root), json.dumps(env_info))
    return root / "demo.hdf5", live


def test_robosuite_demo_hdf5_converts_by_replaying_states(robosuite_demo, tmp_path):
    demo, live = robosuite_demo
    out = tmp_path / "lift.zarr"
    main([f"input={demo}", f"out={out}", "task=lift", "cameras=[agentview]", "image_size=32"])
    store = EpisodeStore.open(out)
    assert store.n_episodes == 1
    assert store.spec.task == "lift" and store.spec.controller == "OSC_POSE"
    ep = store.episode(0)
    with h5py.File(demo) as f:
        states, actions = f["data/demo_1/states"][()], f["data/demo_1/actions"][()]
    assert len(ep["action"]) == len(actions) == len(live)
    np.testing.assert_array_equal(ep["state"], states)
    np.testing.assert_allclose(ep["action"], actions.astype(np.float32))
    # robosuite's observations during a step lag the state by one physics substep (<= 1 mm here).
    eef = np.stack([o["robot0_eef_pos"] for o in live])
    assert np.abs(ep["robot0_eef_pos"] - eef).max() < 2e-3
    assert ep["agentview_image"].shape == (len(actions), 32, 32, 3)
    assert ep["agentview_image"].std() > 10  # a rendered scene, not a blank frame
    assert store.episode_meta(0)["success"] is True
    assert ep["reward"][-1] == pytest.approx(1.0)  # Lift's shaped reward is 1 on success


def test_converting_twice_appends(robosuite_demo, tmp_path):
    demo, _ = robosuite_demo
    out = tmp_path / "lift.zarr"
    convert(demo, out, progress=False)
    convert(demo, out, progress=False)
    store = EpisodeStore.open(out)
    assert store.n_episodes == 2
    np.testing.assert_array_equal(store.episode(0)["state"], store.episode(1)["state"])


def _write_robomimic(path, n_demos=2, steps=(5, 7), drop=None):
    rng = np.random.default_rng(0)
    demos = []
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        env_kwargs = {"control_freq": 20, "robots": ["Panda"], "controller_configs": {"type": "OSC_POSE"}}
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": env_kwargs})
        for i in range(n_demos):
            t = steps[i]
            d = {
                "obs/robot0_eef_pos": rng.normal(size=(t, 3)),
                "obs/object": rng.normal(size=(t, 10)),
                "obs/agentview_image": rng.integers(0, 255, size=(t, 8, 8, 3), dtype=np.uint8),
                "actions": rng.uniform(-1, 1, size=(t, 7)),
                "rewards": np.r_[np.zeros(t - 1), 1.0 if i == 0 else 0.0],
                "dones": np.r_[np.zeros(t - 1), 1.0],
                "states": rng.normal(size=(t, 32)),
            }
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = t
            for k, v in d.items():
                if k != drop:
                    g.create_dataset(k, data=v)
            demos.append(d)
    return demos


def test_robomimic_hdf5_is_copied_key_by_key(tmp_path):
    src = tmp_path / "robomimic.hdf5"
    demos = _write_robomimic(src)
    out = tmp_path / "rm.zarr"
    summary = convert(src, out, progress=False)
    assert summary.format == "robomimic" and summary.episodes == 2 and summary.steps == 12
    store = EpisodeStore.open(out)
    assert set(store.spec.keys) == {
        "robot0_eef_pos",
        "object",
        "agentview_image",
        "action",
        "reward",
        "state",
    }
    assert store.spec.keys["agentview_image"].is_image
    assert store.spec.task == "lift" and store.spec.control_hz == 20.0
    for i, d in enumerate(demos):
        ep = store.episode(i)
        np.testing.assert_array_equal(ep["robot0_eef_pos"], d["obs/robot0_eef_pos"])
        np.testing.assert_array_equal(ep["agentview_image"], d["obs/agentview_image"])
        np.testing.assert_array_equal(ep["state"], d["states"])
        np.testing.assert_allclose(ep["action"], d["actions"].astype(np.float32))
    assert [store.episode_meta(i)["success"] for i in range(2)] == [True, False]


def test_missing_key_is_named_with_the_file(tmp_path):
    src = tmp_path / "broken.hdf5"
    _write_robomimic(src, drop="actions")
    with pytest.raises(ConvertError, match=r"broken\.hdf5.*'/data/demo_0/actions'"):
        convert(src, tmp_path / "x.zarr", progress=False)


def test_unknown_layout_and_missing_file_are_rejected(tmp_path):
    src = tmp_path / "other.hdf5"
    with h5py.File(src, "w") as f:
        f.create_group("data/demo_0").create_dataset("foo", data=np.zeros(3))
    with pytest.raises(ConvertError, match=r"other\.hdf5.*neither 'obs'"):
        convert(src, tmp_path / "x.zarr", progress=False)
    with pytest.raises(SystemExit, match="no such file"):
        main([f"input={tmp_path / 'nope.hdf5'}", f"out={tmp_path / 'x.zarr'}"])
