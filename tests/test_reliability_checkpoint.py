"""Reliability of checkpoint loading (issue 18), on copies of the shipped lift checkpoints.

Each test damages a real checkpoint folder and recomputes the hashes in spec.json, so the damage
gets past the sha256 check and reaches the check it is aimed at: non-finite weights (and an
evaluation in which no chunk was ever finite), spec.json fields that do not describe the policy
config.yaml and the weights build, file entries that leave the folder, malformed safetensors files
(never unpickled), and the one-line error of the console scripts.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from robomosaic.policies.checkpoint import CheckpointError, _sha256, load_policy
from robomosaic.policies.composition import ComposedPolicy
from robomosaic.policies.evaluate import EvaluationError, evaluate
from robomosaic.policies.raptor.student import RaptorStudent

ASSETS = Path(__file__).parent / "assets" / "gpc_lift"
STUDENT = Path(__file__).parents[1] / "policies" / "raptor" / "pretrained" / "student"
BIN = Path(sys.executable).parent
NAN_TENSOR = "network.final.1.bias"


def copy(tmp_path: Path, kind: str = "unet", name: str | None = None) -> Path:
    return Path(shutil.copytree(ASSETS / kind, tmp_path / (name or kind)))


def edit_spec(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit spec.json and recompute the sha256 of every file it lists that exists."""
    spec = json.loads((path / "spec.json").read_text())
    edit(spec)
    for name in spec["files"]:
        if (path / name).is_file():
            spec["files"][name] = _sha256(path / name)
    (path / "spec.json").write_text(json.dumps(spec, indent=2))


def edit_tensors(path: Path, part: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = {k: v.clone() for k, v in load_file(str(path / f"{part}.safetensors")).items()}
    edit(tensors)
    save_file(tensors, str(path / f"{part}.safetensors"))
    edit_spec(path, lambda spec: None)


def set_value(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name].view(-1)[0] = value

    return edit


# ---------------------------------------------------------------------- 4. non-finite weights


@pytest.mark.parametrize(
    ("kind", "part", "tensor", "value"),
    [
        ("unet", "model", NAN_TENSOR, float("nan")),
        ("transformer", "model", "encoder.state.net.0.weight", float("inf")),
        ("unet", "normalizer", "object/max", float("-inf")),
    ],
)
def test_non_finite_tensors_are_refused_at_load(tmp_path, kind, part, tensor, value):
    path = copy(tmp_path, kind)
    edit_tensors(path, part, set_value(tensor, value))
    with pytest.raises(CheckpointError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert f"{path / part}.safetensors: tensor {tensor!r} holds 1 non-finite value" in message, message


def test_evaluation_without_a_finite_chunk_fails(tmp_path):
    """Finite weights whose outputs overflow: the first encoder layer's bias at 3e38 makes the next
    layer's sums inf - inf, so every chunk is NaN and the executor refuses it (and holds)."""
    path = copy(tmp_path)
    edit_tensors(path, "model", lambda t: t["encoder.state.net.0.bias"].fill_(3e38))
    policy = load_policy(path)  # every tensor is finite: the load check lets it through
    history = {k: np.zeros((policy.n_obs_steps, *v.shape)) for k, v in policy.obs_spec.items()}
    assert not np.isfinite(policy.predict_chunk(history)).any()
    with pytest.raises(EvaluationError, match=r"on lift: no finite action chunk in 1 episode\(s\): 1 chunk"):
        evaluate(path, episodes=1, workers=1, max_steps=3, progress=False)


def test_eval_console_script_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    path = copy(tmp_path)
    edit_tensors(path, "model", set_value(NAN_TENSOR, float("nan")))
    argv = [str(BIN / "robomosaic-eval"), f"checkpoint={path}", "episodes=1", "workers=1", "videos=0"]
    argv += [f"out={tmp_path / 'eval.json'}", "progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ROBOMOSAIC_DEBUG", None)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith(f"robomosaic-eval: {path / 'model.safetensors'}: tensor {NAN_TENSOR!r}")
    assert not (tmp_path / "eval.json").exists()
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True, timeout=300, env=env)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "CheckpointError" in debug.stderr, debug.stderr[-3000:]


def test_compose_console_script_reports_a_damaged_parent_in_one_line(tmp_path):
    from robomosaic.policies.compose import main

    a, b = copy(tmp_path, "unet"), copy(tmp_path, "transformer")
    edit_tensors(b, "model", set_value("encoder.state.net.0.weight", float("nan")))
    with pytest.raises(SystemExit) as caught:
        main([f"checkpoints=[{a},{b}]", "weights=[0.5,0.5]", f"out={tmp_path / 'ab'}", "progress=false",
              "report_episodes=1", "report_parents=false", "max_steps=3", "workers=1"])  # fmt: skip
    assert str(caught.value.code).startswith(
        f"robomosaic-compose: {b / 'model.safetensors'}: tensor 'encoder.state.net.0.weight' holds"
    ), caught.value.code


# ---------------------------------------------------------------------- 5. spec.json vs the policy


def swap_shapes(spec: dict[str, Any]) -> None:
    obs = spec["obs"]
    obs["robot0_eef_pos"]["shape"], obs["robot0_eef_quat"]["shape"] = [4], [3]


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda s: s.update(horizon=32), r"horizon is 32, but the policy .* has 16$"),
        (lambda s: s.update(n_obs_steps=3), r"n_obs_steps is 3, but .* has 2$"),
        (lambda s: s.update(n_action_steps=4), r"n_action_steps is 4, but .* has 8$"),
        (
            swap_shapes,
            r"obs\.robot0_eef_pos\.shape is \[4\], but .*normalizer\.safetensors holds "
            r"'robot0_eef_pos/\w+' of shape \[3\]$",
        ),
        (
            lambda s: s["action"].update(shape=[1, 7]),
            r"action\.shape is \[1, 7\], but .*'action/\w+' of shape \[7\]$",
        ),
        (lambda s: s["normalizer_modes"].pop("object"), r"normalizer_modes\.object is None, expected one of"),
        (
            lambda s: s["normalizer_modes"].update(object="meanstd_typo"),
            r"normalizer_modes\.object is 'meanstd_typo'",
        ),
        (
            lambda s: s.update(task_set={"tasks": ["lift", "pick_one"], "object_dim": 10}),
            r"task_set\.tasks lists 2 task\(s\), but .* embeds None task ids$",
        ),
    ],
    ids=["horizon", "n_obs_steps", "n_action_steps", "swapped_obs", "action", "no_mode",
         "bad_mode", "task_set"],
)  # fmt: skip
def test_spec_fields_are_checked_against_the_policy(tmp_path, edit, pattern):
    path = copy(tmp_path)
    edit_spec(path, edit)
    with pytest.raises(CheckpointError, match=pattern) as caught:
        load_policy(path)
    assert str(caught.value).startswith(str(path / "spec.json")), caught.value


def test_transformer_horizon_in_spec_is_checked(tmp_path):
    path = copy(tmp_path, "transformer")
    edit_spec(path, lambda s: s.update(horizon=32))
    with pytest.raises(CheckpointError, match=r"transformer/spec\.json: horizon is 32, .* has 16$"):
        load_policy(path)


def test_normalizer_statistics_not_in_the_modes_are_refused(tmp_path):
    path = copy(tmp_path)
    edit_tensors(path, "normalizer", lambda t: t.update({"gripper/min": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"normalizer\.safetensors: statistics of 'gripper'"):
        load_policy(path)


def composed(tmp_path: Path) -> tuple[Path, Path, Path]:
    a, b = copy(tmp_path, "unet"), copy(tmp_path, "transformer")
    parents = [load_policy(a), load_policy(b)]
    ab = ComposedPolicy(parents, [0.5, 0.5], names=["unet", "transformer"]).save(
        tmp_path / "ab", [a, b], task="lift"
    )
    return a, b, ab


def test_composed_spec_fields_are_checked(tmp_path):
    _, _, ab = composed(tmp_path)
    assert isinstance(load_policy(ab), ComposedPolicy)
    edit_spec(ab, lambda s: s.update(horizon=32))
    with pytest.raises(CheckpointError, match=r"ab/spec\.json: horizon is 32, .* has 16$"):
        load_policy(ab)
    edit_spec(ab, lambda s: s.update(horizon=16, control_hz=10.0))
    with pytest.raises(CheckpointError, match=r"ab/spec\.json: control_hz is 10\.0, .* has 20\.0$"):
        load_policy(ab)
    edit_spec(ab, lambda s: (s.update(control_hz=20.0), s["obs"]["object"].update(shape=[9])))
    with pytest.raises(CheckpointError, match=r"ab/spec\.json: obs\.object\.shape is \[9\], .* has \[10\]$"):
        load_policy(ab)


def test_composed_policy_loads_its_parents_through_the_same_checks(tmp_path):
    """A parent damaged (and rehashed) before the composition was saved: refused by file and tensor."""
    a, b = copy(tmp_path, "unet"), copy(tmp_path, "transformer")
    parents = [load_policy(a), load_policy(b)]
    edit_tensors(b, "model", set_value("encoder.state.net.0.weight", float("nan")))
    ab = ComposedPolicy(parents, [0.5, 0.5]).save(tmp_path / "ab", [a, b], task="lift")
    with pytest.raises(CheckpointError, match=r"transformer/model\.safetensors: tensor 'encoder"):
        load_policy(ab)


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("obs_dim", 23, r"obs_dim is 23, but .* has 22$"),
        ("action_dim", 3, r"action_dim is 3, but .* has 4$"),
        ("motor_order", ["FL", "BL", "BR", "FR"], r"motor_order is \[\"FL\".* has \[\"FR\""),
        ("frame", "FRD", r"frame is \"FRD\", but .* has \"FLU\"$"),
    ],
)
def test_raptor_student_spec_fields_are_checked(tmp_path, field, value, pattern):
    path = Path(shutil.copytree(STUDENT, tmp_path / "student"))
    assert isinstance(load_policy(path), RaptorStudent)
    edit_spec(path, lambda s: s.update({field: value}))
    with pytest.raises(CheckpointError, match=pattern):
        load_policy(path)
    with pytest.raises(CheckpointError, match=pattern):
        RaptorStudent.load(path)


# ---------------------------------------------------------------------- 6. entries leaving the folder


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_file_entries_leaving_the_folder_are_refused(tmp_path, how):
    path = copy(tmp_path / "runs" / "lift")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(path / "normalizer.safetensors", outside)
    if how == "symlink":
        entry = "normalizer.safetensors"
        (path / entry).unlink()
        (path / entry).symlink_to(outside)
        edit_spec(path, lambda s: None)
    else:
        entry = "../../../outside.safetensors" if how == "dotdot" else str(outside)
        edit_spec(path, lambda s: s["files"].update({entry: _sha256(outside)}))
        assert (path / entry).resolve() == outside.resolve()
    with pytest.raises(CheckpointError) as caught:
        load_policy(path)
    assert str(caught.value) == (
        f"{path / 'spec.json'}: file entry {entry!r} leaves the checkpoint folder "
        "(absolute path, '..' or a symlink pointing outside)"
    )


def test_a_symlink_inside_the_folder_is_accepted(tmp_path):
    path = copy(tmp_path)
    shutil.move(path / "normalizer.safetensors", path / "stats.bin")
    (path / "normalizer.safetensors").symlink_to("stats.bin")
    assert load_policy(path).horizon == 16


# ---------------------------------------------------------------------- 9. malformed safetensors


class Unpickled:
    """Unpickling this creates the file `marker`: proof that nothing was unpickled if it is absent."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def truncate(file: Path, tmp_path: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def bad_utf8_header(file: Path, tmp_path: Path) -> None:
    data = bytearray(file.read_bytes())
    data[8:10] = b"\xff\xfe"  # the first bytes of the json header, after its 8-byte length
    file.write_bytes(bytes(data))


def torch_pickle(file: Path, tmp_path: Path) -> None:
    buffer = io.BytesIO()  # the weights are memory-mapped from `file`: write it only after saving
    torch.save({"weights": load_file(str(file)), "payload": Unpickled(tmp_path / "unpickled")}, buffer)
    file.write_bytes(buffer.getvalue())


def raw_pickle(file: Path, tmp_path: Path) -> None:
    file.write_bytes(pickle.dumps(Unpickled(tmp_path / "unpickled")))


@pytest.mark.parametrize("damage", [truncate, bad_utf8_header, torch_pickle, raw_pickle])
def test_malformed_safetensors_are_refused_by_name(tmp_path, damage):
    path = copy(tmp_path)
    damage(path / "model.safetensors", tmp_path)
    edit_spec(path, lambda s: None)
    with pytest.raises(CheckpointError, match=r"unet/model\.safetensors: not a valid safetensors file \("):
        load_policy(path)
    assert not (tmp_path / "unpickled").exists()
