"""Checkpoint folders: round trip without pickle, tampering and mismatches rejected by name."""

from __future__ import annotations

import json

import pytest
import torch

from robomosaic.policies.checkpoint import (
    CheckpointError,
    check_state_dict,
    read_checkpoint,
    save_checkpoint,
)


def make(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = save_checkpoint(
        tmp_path / "ckpt",
        "Dummy",
        {"net": {"in": 3, "out": 2}},
        {"model": net.state_dict(), "normalizer": {"action.scale": torch.ones(2)}},
        {"action": {"shape": [2], "dtype": "float32"}},
    )
    return net, path


def test_round_trip(tmp_path):
    net, path = make(tmp_path)
    ckpt = read_checkpoint(path)
    assert ckpt.config == {"net": {"in": 3, "out": 2}}
    assert ckpt.spec["policy_class"] == "Dummy"
    assert ckpt.spec["provenance"]["torch"] == torch.__version__
    for k, v in net.state_dict().items():
        assert torch.equal(ckpt.parts["model"][k], v)
    assert sorted(p.name for p in path.iterdir()) == [
        "config.yaml",
        "model.safetensors",
        "normalizer.safetensors",
        "spec.json",
    ]


def test_tampered_weights_are_rejected(tmp_path):
    _, path = make(tmp_path)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*sha256"):
        read_checkpoint(path)


def test_tampered_config_is_rejected(tmp_path):
    _, path = make(tmp_path)
    (path / "config.yaml").write_text("net: {in: 4, out: 2}\n")
    with pytest.raises(CheckpointError, match=r"config\.yaml"):
        read_checkpoint(path)


def test_missing_file_and_bad_version(tmp_path):
    _, path = make(tmp_path)
    (path / "normalizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="normalizer.safetensors.*missing"):
        read_checkpoint(path)
    _, path = make(tmp_path / "b")
    spec = json.loads((path / "spec.json").read_text())
    spec["format_version"] = 99
    (path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="format_version 99"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="no spec.json"):
        read_checkpoint(tmp_path / "nothing-here")


def test_state_dict_mismatch_names_the_tensor(tmp_path):
    expected = torch.nn.Linear(3, 2).state_dict()
    found = torch.nn.Linear(4, 2).state_dict()
    with pytest.raises(CheckpointError, match=r"'weight' has shape \(2, 4\)"):
        check_state_dict("ckpt", expected, found)
    with pytest.raises(CheckpointError, match="missing tensor 'bias'"):
        check_state_dict("ckpt", expected, {"weight": expected["weight"]})
