"""RAPTOR student: structure, recurrence, checkpoints, and its ONNX / numpy / C exports against torch."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from robomosaic.policies import load_policy
from robomosaic.policies.raptor.export import NumpyStudent, export_c, export_onnx
from robomosaic.policies.raptor.student import ACTION_DIM, HIDDEN_DIM, OBS_DIM, OBS_LAYOUT, RaptorStudent

STEPS = 500
TOL = 1e-5


def make_student(seed: int = 0) -> RaptorStudent:
    """A random student whose gates work in their non-linear range (trained weights come later)."""
    torch.manual_seed(seed)
    student = RaptorStudent()
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name == "initial_hidden":
                p.copy_(torch.rand_like(p) * 1.6 - 0.8)
            else:
                p.mul_(2.0)
    return student.eval()


@pytest.fixture(scope="module")
def student() -> RaptorStudent:
    return make_student()


@pytest.fixture(scope="module")
def trajectory(student: RaptorStudent) -> dict[str, np.ndarray]:
    """A 500-step closed-loop torch rollout: smooth random observations, previous action fed back."""
    rng = np.random.default_rng(0)
    t = np.arange(STEPS)[:, None] * 0.01
    freq = rng.uniform(0.2, 3.0, size=(1, OBS_DIM))
    phase = rng.uniform(0, 2 * np.pi, size=(1, OBS_DIM))
    signal = (1.5 * np.sin(2 * np.pi * freq * t + phase) + 0.2 * rng.normal(size=(STEPS, OBS_DIM))).astype(
        np.float32
    )
    a, b = OBS_LAYOUT["previous_action"]
    obs = np.zeros((STEPS, OBS_DIM), np.float32)
    actions = np.zeros((STEPS, ACTION_DIM), np.float32)
    hiddens = np.zeros((STEPS, HIDDEN_DIM), np.float32)
    hidden = None
    previous = np.zeros(ACTION_DIM, np.float32)
    with torch.no_grad():
        for i in range(STEPS):
            obs[i] = signal[i]
            obs[i, a:b] = previous
            action, hidden = student.step(torch.from_numpy(obs[i : i + 1]), hidden)
            actions[i], hiddens[i] = action[0].numpy(), hidden[0].numpy()
            previous = actions[i]
    return {"obs": obs, "actions": actions, "hiddens": hiddens}


def assert_matches(name: str, actions: np.ndarray, hiddens: np.ndarray, ref: dict[str, np.ndarray]) -> None:
    action_err = np.abs(actions - ref["actions"]).max(axis=1)
    hidden_err = np.abs(hiddens - ref["hiddens"]).max(axis=1)
    assert action_err.max() <= TOL, (
        f"{name}: action differs by {action_err.max():.2e} at step {action_err.argmax()}"
    )
    assert hidden_err.max() <= TOL, (
        f"{name}: hidden differs by {hidden_err.max():.2e} at step {hidden_err.argmax()}"
    )


def test_structure_and_parameter_count() -> None:
    student = RaptorStudent()
    shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    assert shapes == {
        "initial_hidden": (16,),
        "input.weight": (16, 22),
        "input.bias": (16,),
        "gru.weight_ih_l0": (48, 16),
        "gru.weight_hh_l0": (48, 16),
        "gru.bias_ih_l0": (48,),
        "gru.bias_hh_l0": (48,),
        "output.weight": (4, 16),
        "output.bias": (4,),
    }
    assert sum(p.numel() for p in student.parameters()) == 2084
    assert sum(p.numel() for p in student.parameters() if p.requires_grad) == 2084


def test_trajectory_is_nonlinear_and_uses_the_clamp(trajectory: dict[str, np.ndarray]) -> None:
    # guards the comparisons below against a student so small that every export agrees trivially
    actions, hiddens = trajectory["actions"], trajectory["hiddens"]
    assert np.abs(hiddens).max() > 0.9
    assert 0.02 < np.mean(np.abs(actions) == 1.0) < 0.9
    assert actions.std(axis=0).min() > 0.1


def test_initial_hidden_state_is_learned_and_used(student: RaptorStudent) -> None:
    obs = torch.randn(3, 5, OBS_DIM)
    with torch.no_grad():
        default, _ = student(obs)
        explicit, _ = student(obs, student.initial_state(3))
        zeros, _ = student(obs, torch.zeros(3, HIDDEN_DIM))
    assert torch.equal(default, explicit)
    assert not torch.allclose(default[:, 0], zeros[:, 0], atol=1e-3)
    obs_seq = torch.randn(2, 7, OBS_DIM)
    loss = student(obs_seq, clip=False)[0].square().sum()
    loss.backward()
    assert student.initial_hidden.grad is not None and student.initial_hidden.grad.abs().sum() > 0
    student.zero_grad()


def test_sequence_forward_equals_stepping(student: RaptorStudent) -> None:
    obs = torch.randn(4, 60, OBS_DIM) * 2
    with torch.no_grad():
        seq_actions, seq_hidden = student(obs)
        hidden = None
        stepped = []
        for t in range(obs.shape[1]):
            action, hidden = student.step(obs[:, t], hidden)
            stepped.append(action)
        # and a sequence split in two with the hidden state carried over
        first, mid = student(obs[:, :25])
        second, end = student(obs[:, 25:], mid)
    torch.testing.assert_close(torch.stack(stepped, 1), seq_actions, atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden, seq_hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat([first, second], 1), seq_actions, atol=1e-6, rtol=0)
    torch.testing.assert_close(end, seq_hidden, atol=1e-6, rtol=0)


def test_bad_shapes_are_named(student: RaptorStudent) -> None:
    with pytest.raises(ValueError, match="obs_seq"):
        student(torch.zeros(2, 3, 21))
    with pytest.raises(ValueError, match="hidden"):
        student.step(torch.zeros(2, OBS_DIM), torch.zeros(3, HIDDEN_DIM))
    with pytest.raises(ValueError, match="obs"):
        NumpyStudent.from_student(student).step(np.zeros(20))


def test_save_load_round_trip_is_bit_identical(student: RaptorStudent, tmp_path: Path) -> None:
    student.save(tmp_path / "ckpt")
    loaded = RaptorStudent.load(tmp_path / "ckpt")
    for key, value in student.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.checkpoint_path == str(tmp_path / "ckpt")
    obs = torch.randn(2, 30, OBS_DIM)
    with torch.no_grad():
        assert torch.equal(student(obs)[0], loaded(obs)[0])
    # the project's generic loader dispatches on spec.json's policy class
    assert isinstance(load_policy(tmp_path / "ckpt"), RaptorStudent)


def test_onnx_matches_torch_over_a_trajectory(
    student: RaptorStudent, trajectory: dict[str, np.ndarray], tmp_path: Path
) -> None:
    import json

    import onnx
    import onnxruntime as ort

    path = export_onnx(student, tmp_path / "raptor.onnx")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    initial = np.asarray(json.loads(meta["initial_hidden"]), np.float32)
    assert np.array_equal(initial, student.initial_hidden.detach().numpy())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hidden = initial[None]
    actions, hiddens = [], []
    for obs in trajectory["obs"]:
        action, hidden = session.run(["action", "hidden_out"], {"obs": obs[None], "hidden": hidden})
        actions.append(action[0])
        hiddens.append(hidden[0])
    assert_matches("onnx", np.array(actions), np.array(hiddens), trajectory)
    # the batch axis is dynamic
    obs, start = trajectory["obs"][:3], trajectory["hiddens"][:3]
    action, hidden = session.run(None, {"obs": obs, "hidden": start})
    with torch.no_grad():
        ref_action, ref_hidden = student.step(torch.from_numpy(obs), torch.from_numpy(start))
    np.testing.assert_allclose(action, ref_action.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(hidden, ref_hidden.numpy(), atol=TOL, rtol=0)


def test_numpy_matches_torch_over_a_trajectory(
    student: RaptorStudent, trajectory: dict[str, np.ndarray]
) -> None:
    policy = NumpyStudent.from_student(student)
    hidden = None
    actions, hiddens = [], []
    for obs in trajectory["obs"]:
        action, hidden = policy.step(obs, hidden)
        assert action.dtype == np.float32 and hidden.dtype == np.float32
        actions.append(action)
        hiddens.append(hidden)
    assert_matches("numpy", np.array(actions), np.array(hiddens), trajectory)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("with_header", [False, True])
def test_c_export_matches_torch_over_a_trajectory(
    student: RaptorStudent, trajectory: dict[str, np.ndarray], tmp_path: Path, with_header: bool
) -> None:
    path_h = tmp_path / "raptor_policy.h" if with_header else None
    path_c = export_c(student, tmp_path / "raptor_policy.c", path_h)
    library = tmp_path / "libraptor_policy.so"
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-std=c99",
            "-Wall",
            "-Werror",
            "-shared",
            "-fPIC",
            str(path_c),
            "-o",
            str(library),
            "-lm",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    lib = ctypes.CDLL(str(library))
    floats = ctypes.POINTER(ctypes.c_float)
    lib.raptor_step.argtypes = [floats, floats, floats]
    lib.raptor_step.restype = None
    lib.raptor_reset.argtypes = [floats]
    lib.raptor_reset.restype = None

    hidden = np.full(HIDDEN_DIM, np.nan, np.float32)
    lib.raptor_reset(hidden.ctypes.data_as(floats))
    assert np.array_equal(hidden, student.initial_hidden.detach().numpy())
    action = np.zeros(ACTION_DIM, np.float32)
    actions, hiddens = [], []
    for obs in trajectory["obs"]:
        obs = np.ascontiguousarray(obs)
        lib.raptor_step(
            obs.ctypes.data_as(floats), hidden.ctypes.data_as(floats), action.ctypes.data_as(floats)
        )
        actions.append(action.copy())
        hiddens.append(hidden.copy())
    assert_matches("C", np.array(actions), np.array(hiddens), trajectory)
    source = path_c.read_text()
    assert "malloc" not in source and "in-memory RaptorStudent" in source


def test_c_header_names_the_source_checkpoint(student: RaptorStudent, tmp_path: Path) -> None:
    student.save(tmp_path / "ckpt")
    path_c = export_c(RaptorStudent.load(tmp_path / "ckpt"), tmp_path / "raptor.c")
    assert f"source checkpoint: {tmp_path / 'ckpt'}" in path_c.read_text()
