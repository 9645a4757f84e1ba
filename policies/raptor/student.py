"""The RAPTOR student: Dense(22->16, ReLU) -> GRU(16) -> Dense(16->4), 2,084 parameters.

Structure, activations and parameter count follow rl-tools, where the paper's policy is trained
(`src/foundation_policy/post_training/config.h`: `MODULE_CHAIN = Module<INPUT_LAYER, Module<GRU,
Module<OUTPUT_LAYER>>>`, HIDDEN_DIM 16, input layer RELU, output layer IDENTITY):

    input   Dense 22 -> 16, ReLU               16*22 + 16            =   368
    gru     GRU 16 -> 16 (gates r, z, n)       2 * (48*16 + 48)      = 1,632
            learned initial hidden state       16                    =    16
    output  Dense 16 -> 4, identity            4*16 + 4              =    68
                                                                       2,084

The 16 parameters that torch's `nn.GRU` (two bias vectors, like rl-tools) does not have are the
GRU's trainable initial hidden state: rl-tools' `nn/layers/gru/layer.h` declares
`initial_hidden_state` (shape HIDDEN_DIM, parameter category Biases, zero-initialised in
`operations_generic.h`'s malloc), `evaluate` uses it in place of h_{-1} at step 0 of every
sequence, and the backward pass accumulates its gradient. Here it is `initial_hidden`, used
whenever `hidden` is None (the start of an episode). The GRU equations are the same as torch's:
r = s(W_ir x + b_ir + W_hr h + b_hr), z = s(W_iz x + b_iz + W_hz h + b_hz),
n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) n + z h.

The output layer is linear; the L2F simulator clamps each action to [-1, 1] before using it
(`rl/environments/l2f/operations_generic.h`, `step`). The student clamps too (`clip=True`, for
control and export); training losses should use `clip=False`, as rl-tools computes its imitation
loss on the identity output (a clamped output has no gradient once it is outside [-1, 1]).

Observation (22, FLU world frame, rl-tools' `Position, OrientationRotationMatrix, LinearVelocity,
AngularVelocity, ActionHistory<1>`): see `OBS_LAYOUT`. Action (4): motor commands in [-1, 1] for
motors `MOTOR_ORDER` = [FR, BR, BL, FL].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from robomosaic.policies.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_spec_fields,
    check_state_dict,
    read_checkpoint,
    save_checkpoint,
)

OBS_DIM = 22
ACTION_DIM = 4
HIDDEN_DIM = 16
# name -> (start, stop) in the observation vector
OBS_LAYOUT: dict[str, tuple[int, int]] = {
    "position_error": (0, 3),  # position - target position, world frame, m
    "rotation_matrix": (3, 12),  # body-to-world rotation, row-major
    "velocity_error": (12, 15),  # linear velocity - target velocity, world frame, m/s
    "angular_velocity": (15, 18),  # body rates, body frame, rad/s
    "previous_action": (18, 22),  # the action sent at the previous step, [-1, 1]
}
MOTOR_ORDER = ("FR", "BR", "BL", "FL")
FRAME = "FLU"


class RaptorStudent(nn.Module):
    """Recurrent controller: `forward` over sequences for BPTT, `step` for control."""

    policy_class = "RaptorStudent"

    def __init__(self, hidden_dim: int = HIDDEN_DIM) -> None:
        super().__init__()
        if not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive int, got {hidden_dim!r}")
        self.hidden_dim = hidden_dim
        self.input = nn.Linear(OBS_DIM, hidden_dim)
        self.gru = nn.GRU(hidden_dim, hidden_dim, batch_first=True)
        self.initial_hidden = nn.Parameter(torch.zeros(hidden_dim))
        self.output = nn.Linear(hidden_dim, ACTION_DIM)
        self.checkpoint_path: str | None = None  # set by `load`; named in exported code

    @property
    def config(self) -> dict[str, Any]:
        return {"hidden_dim": self.hidden_dim}

    def initial_state(self, batch: int) -> torch.Tensor:
        """The learned hidden state an episode starts from, (batch, hidden_dim)."""
        return self.initial_hidden.expand(batch, self.hidden_dim)

    def forward(
        self, obs_seq: torch.Tensor, hidden: torch.Tensor | None = None, clip: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """obs_seq (B, T, 22), hidden (B, H) or None (episode start) -> actions (B, T, 4), hidden (B, H)."""
        if obs_seq.ndim != 3 or obs_seq.shape[-1] != OBS_DIM:
            raise ValueError(f"obs_seq must have shape (batch, time, {OBS_DIM}), got {tuple(obs_seq.shape)}")
        batch = obs_seq.shape[0]
        if hidden is None:
            hidden = self.initial_state(batch)
        elif hidden.shape != (batch, self.hidden_dim):
            raise ValueError(
                f"hidden must have shape ({batch}, {self.hidden_dim}), got {tuple(hidden.shape)}"
            )
        features = F.relu(self.input(obs_seq))
        out, last = self.gru(features, hidden.unsqueeze(0).contiguous())
        actions = self.output(out)
        if clip:
            actions = actions.clamp(-1.0, 1.0)
        return actions, last.squeeze(0)

    def step(
        self, obs: torch.Tensor, hidden: torch.Tensor | None = None, clip: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One control step: obs (B, 22), hidden (B, H) or None -> action (B, 4), hidden (B, H)."""
        if obs.ndim != 2 or obs.shape[-1] != OBS_DIM:
            raise ValueError(f"obs must have shape (batch, {OBS_DIM}), got {tuple(obs.shape)}")
        actions, hidden = self.forward(obs.unsqueeze(1), hidden, clip=clip)
        return actions.squeeze(1), hidden

    # -- checkpoints ----------------------------------------------------------------------------
    def spec_dict(self) -> dict[str, Any]:
        """What spec.json says about the interface (checked against the student at load)."""
        return {
            "obs_dim": self.input.in_features,
            "obs_layout": {k: list(v) for k, v in OBS_LAYOUT.items()},
            "action_dim": self.output.out_features,
            "motor_order": list(MOTOR_ORDER),
            "frame": FRAME,
        }

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint folder (config.yaml, model.safetensors, spec.json; policies/checkpoint.py)."""
        return save_checkpoint(
            path, self.policy_class, self.config, {"model": self.state_dict()}, self.spec_dict()
        )

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> RaptorStudent:
        try:
            student = cls(**ckpt.config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"{ckpt.path / 'config.yaml'}: does not build a RaptorStudent: {e}"
            ) from None
        weights = ckpt.parts.get("model")
        if weights is None:
            raise CheckpointError(f"{ckpt.path}: no model.safetensors")
        check_state_dict(str(ckpt.path / "model.safetensors"), student.state_dict(), weights)
        check_spec_fields(ckpt.path, ckpt.spec, student.spec_dict())
        student.load_state_dict(weights)
        student.checkpoint_path = str(ckpt.path)
        return student.eval()

    @classmethod
    def load(cls, path: str | Path) -> RaptorStudent:
        ckpt = read_checkpoint(path)
        if ckpt.spec.get("policy_class") != cls.policy_class:
            raise CheckpointError(
                f"{ckpt.path}: policy class is {ckpt.spec.get('policy_class')!r}, not {cls.policy_class!r}"
            )
        return cls.from_checkpoint(ckpt)
