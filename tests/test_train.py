"""robomosaic-train end to end on real collected data, resume, and data-parallel equivalence."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from robomosaic.data.collect import main as collect
from robomosaic.data.normalizer import Normalizer
from robomosaic.data.spec import KeySpec
from robomosaic.policies.checkpoint import load_policy
from robomosaic.policies.denoising_policy import DenoisingPolicy
from robomosaic.policies.train import run as train

TINY = [
    "policy.unet.down_dims=[16,32]",
    "policy.unet.noise_embed_dim=16",
    "policy.encoder.state_feature_dim=16",
    "policy.encoder.state_hidden_dims=[32]",
    "train.batch_size=16",
    "train.log_every=5",
    "train.checkpoint_every=10",
    "train.eval_workers=1",
    "train.eval_episodes=1",
    "progress=false",
]


@pytest.fixture(scope="module")
def lift_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "lift.zarr"
    collect(["task=lift", "episodes=3", f"out={path}", "workers=1"])
    return path


def test_train_selects_resumes_and_loads(lift_store, tmp_path):
    out = tmp_path / "run"
    args = [f"dataset={lift_store}", f"out={out}", "val_ratio=0.34", *TINY]
    summary = train([*args, "train.steps=20", "train.eval_every=10"])
    assert summary["steps"] == 20
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    assert 1 <= len(index) <= 3 and {e["step"] for e in index} <= {10, 20}
    policy = load_policy(out / "best")
    assert isinstance(policy, DenoisingPolicy)
    spec = json.loads((out / "best" / "spec.json").read_text())
    assert spec["task"] == "lift" and spec["train_step"] in (10, 20)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [5, 10, 15, 20]
    assert all(np.isfinite(r["loss"]) for r in lines if "loss" in r)
    assert sum("success_rate" in r for r in lines) == 2

    # A finished run is not overwritten by accident, and resumes where it stopped.
    with pytest.raises(SystemExit, match="resume=true"):
        train([*args, "train.steps=30", "train.eval_every=0"])
    summary = train([*args, "train.steps=30", "train.eval_every=0", "resume=true"])
    assert summary["steps"] == 30
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r][-2:] == [25, 30]
    assert json.loads((out / "last" / "spec.json").read_text())["train_step"] == 30


def test_console_script_exits_zero_after_training(lift_store, tmp_path):
    script = Path(sys.executable).with_name("robomosaic-train")
    args = [f"dataset={lift_store}", f"out={tmp_path / 'run'}", *TINY, "train.steps=2", "train.eval_every=0"]
    done = subprocess.run([script, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "best" / "spec.json").exists()


def test_bad_dataset_is_rejected_before_training(lift_store, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        train([f"dataset={tmp_path / 'nope.zarr'}", f"out={tmp_path / 'a'}", *TINY])
    with pytest.raises(SystemExit, match="lacks key.*agentview_image"):
        train([f"dataset={lift_store}", f"out={tmp_path / 'b'}", "task.cameras=[agentview]", *TINY])
    with pytest.raises(SystemExit, match="recorded on task 'lift'"):
        train([f"dataset={lift_store}", f"out={tmp_path / 'c'}", "task=stack", *TINY])
    assert not (tmp_path / "b" / "last").exists()


def test_episode_filter_and_normalizer_from(lift_store, tmp_path):
    """Parent B trained on other episodes than A, with A's action normalization (GPC parents)."""
    base = [f"dataset={lift_store}", "val_ratio=0", "train.steps=2", "train.eval_every=0", *TINY]
    train([*base, f"out={tmp_path / 'a'}", "episodes={seed:[0,1]}"])
    train(
        [
            *base,
            f"out={tmp_path / 'b'}",
            "episodes={seed:[1,2]}",
            f"normalizer_from={tmp_path / 'a' / 'best'}",
        ]
    )
    spec_a = json.loads((tmp_path / "a" / "best" / "spec.json").read_text())
    spec_b = json.loads((tmp_path / "b" / "best" / "spec.json").read_text())
    assert spec_a["train_episodes"] == [0, 1] and spec_b["train_episodes"] == [1, 2]
    a, b = load_policy(tmp_path / "a" / "best"), load_policy(tmp_path / "b" / "best")
    for stat, value in a.normalizer.stats["action"].items():
        np.testing.assert_array_equal(b.normalizer.stats["action"][stat], value)
    assert not np.array_equal(a.normalizer.stats["object"]["min"], b.normalizer.stats["object"]["min"])
    with pytest.raises(SystemExit, match=r"episodes.colour: no such episode field"):
        train([*base, f"out={tmp_path / 'c'}", "episodes={colour:[red]}"])
    with pytest.raises(SystemExit, match="normalizer_from=.*nope"):
        train([*base, f"out={tmp_path / 'd'}", f"normalizer_from={tmp_path / 'nope'}"])


# -- data parallel: one 2-process gloo step equals one single-process step on the doubled batch --

OBS = {"eef": KeySpec((3,), "float64")}


def _policy() -> DenoisingPolicy:
    stats = {
        "eef": {"min": -np.ones(3), "max": np.ones(3)},
        "action": {"min": -np.ones(2), "max": np.ones(2)},
    }
    torch.manual_seed(0)
    config = {"horizon": 8, "n_action_steps": 4, "unet": {"down_dims": [16, 32], "noise_embed_dim": 16}}
    return DenoisingPolicy(
        config, OBS, KeySpec((2,), "float32"), Normalizer({k: "minmax" for k in stats}, stats)
    )


def _data():
    g = torch.Generator().manual_seed(3)
    batch = {"obs": {"eef": torch.rand(8, 2, 3, generator=g)}, "action": torch.rand(8, 8, 2, generator=g)}
    return batch, torch.randn(8, 8, 2, generator=g), torch.randint(0, 100, (8,), generator=g)


def _step(model, policy, batch, noise, level):
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)  # Adam would amplify rounding of tiny grads
    loss = model(batch, noise=noise, level=level)
    loss.backward()
    optimizer.step()
    return torch.cat([p.detach().flatten() for p in policy.parameters()])


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    policy = _policy()
    model = torch.nn.parallel.DistributedDataParallel(policy)
    batch, noise, level = _data()
    half = slice(4 * rank, 4 * rank + 4)
    params = _step(
        model,
        policy,
        {"obs": {"eef": batch["obs"]["eef"][half]}, "action": batch["action"][half]},
        noise[half],
        level[half],
    )
    if rank == 0:
        save_file({"params": params}, out)
    # Tear down only when both ranks are done, and the DDP wrapper (which holds the process group)
    # first: a rank that exited while gloo threads were still live once aborted (SIGABRT) under load.
    dist.barrier()
    del model
    dist.destroy_process_group()


def test_ddp_step_matches_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.safetensors"
    mp.start_processes(_ddp_worker, args=(port, str(out)), nprocs=2, start_method="spawn")
    ddp_params = load_file(out)["params"]
    policy = _policy()
    batch, noise, level = _data()
    single = _step(policy, policy, batch, noise, level)
    before = torch.cat([p.detach().flatten() for p in _policy().parameters()])
    assert not torch.allclose(single, before)  # the step did change the weights
    torch.testing.assert_close(ddp_params, single, rtol=1e-5, atol=1e-6)
