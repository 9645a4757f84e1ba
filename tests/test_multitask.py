"""Multitask datasets: merging single-task stores, the task-set observation convention, and a
multitask policy trained, selected and evaluated on real tasks through the usual CLIs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robomosaic.data.collect import main as collect
from robomosaic.data.multitask import TASK_ID, MergeError, TaskSet, merge_stores
from robomosaic.data.multitask import main as merge_main
from robomosaic.data.normalizer import Normalizer
from robomosaic.data.spec import DatasetSpec, KeySpec
from robomosaic.data.store import EpisodeStore
from robomosaic.policies.checkpoint import load_policy
from robomosaic.policies.encoders import ObservationEncoder
from robomosaic.policies.evaluate import main as evaluate_main
from robomosaic.policies.train import run as train
from tests.test_train import TINY


def _store(path, task, object_dim, lengths, control_hz=20.0, extra_key=None):
    keys = {
        "eef": KeySpec((3,), "float64"),
        "object": KeySpec((object_dim,), "float64"),
        "action": KeySpec((7,), "float32"),
        "state": KeySpec((object_dim + 4,), "float64"),
    }
    if extra_key:
        keys[extra_key] = KeySpec((1,), "float32")
    store = EpisodeStore.create(path, DatasetSpec(keys, control_hz, task=task))
    rng = np.random.default_rng(object_dim)
    for seed, n in enumerate(lengths):
        data = {k: rng.normal(size=(n, *v.shape)).astype(v.dtype) for k, v in keys.items()}
        store.append_episode(data, {"seed": seed, "success": True, "task": task})
    return store


def test_merge_pads_object_adds_task_id_and_drops_state(tmp_path):
    a = _store(tmp_path / "a.zarr", "lift", 3, [4, 5])
    b = _store(tmp_path / "b.zarr", "stack", 5, [6])
    merged = merge_stores([a.path, b.path], tmp_path / "m.zarr", progress=False)
    assert merged.spec.task == "multitask" and "state" not in merged.spec.keys
    task_set = TaskSet.from_dict(merged.spec.extra["task_set"])
    assert task_set == TaskSet(("lift", "stack"), 5)
    assert merged.n_episodes == 3 and merged.spec.keys["object"].shape == (5,)
    first, last = merged.episode(0), merged.episode(2)
    np.testing.assert_array_equal(first["object"][:, :3], a.episode(0)["object"])
    assert not first["object"][:, 3:].any()
    np.testing.assert_array_equal(last["object"], b.episode(0)["object"])
    assert first[TASK_ID].tolist() == [0] * 4 and last[TASK_ID].tolist() == [1] * 6
    assert [merged.episode_meta(i)["task"] for i in range(3)] == ["lift", "lift", "stack"]


def test_merge_rejects_what_cannot_be_one_dataset(tmp_path):
    a = _store(tmp_path / "a.zarr", "lift", 3, [4])
    with pytest.raises(MergeError, match=r"task\(s\) \['lift'\] appear in more than one"):
        merge_stores([a.path, _store(tmp_path / "b.zarr", "lift", 3, [4]).path], tmp_path / "m1.zarr")
    with pytest.raises(MergeError, match=r"c\.zarr: control_hz 10\.0 differs"):
        merge_stores([a.path, _store(tmp_path / "c.zarr", "door", 3, [4], 10.0).path], tmp_path / "m2.zarr")
    with pytest.raises(MergeError, match=r"d\.zarr: keys .*'extra'.* differ"):
        merge_stores(
            [a.path, _store(tmp_path / "d.zarr", "door", 3, [4], extra_key="extra").path], tmp_path / "m3"
        )
    with pytest.raises(SystemExit, match="a.zarr already exists"):
        merge_main([f"inputs=[{a.path},{a.path}]", f"out={a.path}"])
    assert not (tmp_path / "m1.zarr").exists() and EpisodeStore.open(a.path).n_episodes == 1


def test_task_set_adapts_a_live_observation_like_the_dataset():
    task_set = TaskSet(("lift", "stack"), 5)
    obs = {"object": np.arange(3.0), "eef": np.ones(3)}
    adapted = task_set.adapt(obs, "stack")
    assert adapted["object"].tolist() == [0, 1, 2, 0, 0] and adapted[TASK_ID] == 1
    spec = task_set.adapt_spec({"object": KeySpec((3,), "float64"), "eef": KeySpec((3,), "float64")})
    assert spec["object"].shape == (5,) and spec[TASK_ID].shape == () and spec[TASK_ID].dtype == "int64"
    with pytest.raises(KeyError, match="'door' is not in this policy's task set"):
        task_set.adapt(obs, "door")


def test_observed_task_id_conditions_the_encoder_and_is_not_normalized(tmp_path):
    with pytest.raises(ValueError, match="'task_id' \\(a task id\\) needs encoder num_tasks"):
        ObservationEncoder({"eef": (3,), TASK_ID: ()}, n_obs_steps=2)
    encoder = ObservationEncoder({"eef": (3,), TASK_ID: ()}, n_obs_steps=2, num_tasks=2)
    eef = torch.zeros(2, 2, 3)
    features = encoder({"eef": eef, TASK_ID: torch.tensor([[0.0, 0.0], [1.0, 1.0]])})
    assert not torch.allclose(features[0], features[1])  # same state, different task
    merged = merge_stores(
        [_store(tmp_path / "a.zarr", "lift", 3, [4]).path, _store(tmp_path / "b.zarr", "door", 3, [4]).path],
        tmp_path / "m.zarr",
        progress=False,
    )
    assert Normalizer.fit(merged, ["eef", TASK_ID]).modes[TASK_ID] == "identity"


@pytest.fixture(scope="module")
def multitask_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask")
    for task in ("lift", "pick_one"):
        collect([f"task={task}", "episodes=2", f"out={root / task}.zarr", "workers=1"])
    merge_main([f"inputs=[{root / 'lift.zarr'},{root / 'pick_one.zarr'}]", f"out={root / 'm.zarr'}"])
    return root / "m.zarr"


def test_multitask_policy_trains_selects_and_evaluates_on_each_task(multitask_store, tmp_path):
    out = tmp_path / "run"
    summary = train(
        [f"dataset={multitask_store}", f"out={out}", "task=multitask", "val_ratio=0.25", *TINY,
         "train.steps=10", "train.eval_every=10", "task.max_steps=3"]
    )  # fmt: skip
    assert summary["steps"] == 10
    spec = json.loads((out / "best" / "spec.json").read_text())
    assert spec["task_set"]["tasks"] == ["lift", "pick_one"]
    policy = load_policy(out / "best")
    assert TASK_ID in policy.obs_spec and policy.encoder.task.num_tasks == 2
    report_path = tmp_path / "eval.json"
    evaluate_main(
        [f"checkpoint={out / 'best'}", "episodes=1", "workers=1", "videos=0", "max_steps=3",
         f"out={report_path}", "progress=false"]
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    assert sorted(report["tasks"]) == ["lift", "pick_one"]
    assert report["tasks"]["pick_one"]["mean_length"] == 3
    rates = [r["success_rate"] for r in report["tasks"].values()]
    assert report["mean_success_rate"] == pytest.approx(np.mean(rates))
    with pytest.raises(SystemExit, match=r"needs task= one of \['lift', 'pick_one'\], got 'door'"):
        evaluate_main([f"checkpoint={out / 'best'}", "task=door", "episodes=1", f"out={report_path}"])
