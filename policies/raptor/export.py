"""The RAPTOR student outside torch: an ONNX step graph, plain numpy inference and a C99 file.

All three compute one control step `(obs, hidden) -> (action, hidden)` as `RaptorStudent.step`
does (Dense + ReLU, GRU with torch's gate order r, z, n, linear output clamped to [-1, 1]), up to
float32 rounding (tests/test_raptor_student.py holds each to 1e-5 over 500-step trajectories);
an episode starts from the student's learned initial hidden state, not zeros.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from robomosaic.policies.raptor.student import ACTION_DIM, MOTOR_ORDER, OBS_DIM, OBS_LAYOUT

if TYPE_CHECKING:
    from robomosaic.policies.raptor.student import RaptorStudent

# numpy/C name -> RaptorStudent state_dict name
WEIGHT_NAMES = {
    "input_weight": "input.weight",
    "input_bias": "input.bias",
    "gru_weight_ih": "gru.weight_ih_l0",
    "gru_weight_hh": "gru.weight_hh_l0",
    "gru_bias_ih": "gru.bias_ih_l0",
    "gru_bias_hh": "gru.bias_hh_l0",
    "initial_hidden": "initial_hidden",
    "output_weight": "output.weight",
    "output_bias": "output.bias",
}


def student_weights(student: RaptorStudent) -> dict[str, np.ndarray]:
    """The student's parameters as float32 numpy arrays under the names of `WEIGHT_NAMES`."""
    state = student.state_dict()
    return {
        name: state[key].detach().cpu().numpy().astype(np.float32, copy=True)
        for name, key in WEIGHT_NAMES.items()
    }


def _weight_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    return {
        "input_weight": (hidden, OBS_DIM),
        "input_bias": (hidden,),
        "gru_weight_ih": (3 * hidden, hidden),
        "gru_weight_hh": (3 * hidden, hidden),
        "gru_bias_ih": (3 * hidden,),
        "gru_bias_hh": (3 * hidden,),
        "initial_hidden": (hidden,),
        "output_weight": (ACTION_DIM, hidden),
        "output_bias": (ACTION_DIM,),
    }


def _checked(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "initial_hidden" not in weights:
        raise ValueError("weights: missing 'initial_hidden'")
    hidden = int(np.shape(weights["initial_hidden"])[0])
    expected = _weight_shapes(hidden)
    for name, shape in expected.items():
        if name not in weights:
            raise ValueError(f"weights: missing {name!r}")
        if tuple(np.shape(weights[name])) != shape:
            raise ValueError(
                f"weights: {name!r} has shape {tuple(np.shape(weights[name]))}, expected {shape}"
            )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise ValueError(f"weights: unexpected {unexpected[0]!r}")
    return {name: np.ascontiguousarray(weights[name], dtype=np.float32) for name in expected}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp(-x) overflows to inf for x < -88 in float32, and 1 / (1 + inf) = 0 is the right answer
    with np.errstate(over="ignore"):
        return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


class NumpyStudent:
    """`RaptorStudent.step` in float32 numpy: no torch at inference time."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        self.weights = _checked(weights)
        self.hidden_dim = self.weights["initial_hidden"].shape[0]

    @classmethod
    def from_student(cls, student: RaptorStudent) -> NumpyStudent:
        return cls(student_weights(student))

    def initial_state(self, batch: int = 1) -> np.ndarray:
        return np.tile(self.weights["initial_hidden"], (batch, 1))

    def step(self, obs: np.ndarray, hidden: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """obs (B, 22) or (22,), hidden (B, H) / (H,) or None -> action, hidden (same batch shape)."""
        w = self.weights
        obs = np.asarray(obs, dtype=np.float32)
        if obs.shape[-1:] != (OBS_DIM,) or obs.ndim > 2:
            raise ValueError(f"obs must have shape ({OBS_DIM},) or (batch, {OBS_DIM}), got {obs.shape}")
        single = obs.ndim == 1
        obs = np.atleast_2d(obs)
        h = self.initial_state(obs.shape[0]) if hidden is None else np.asarray(hidden, dtype=np.float32)
        h = np.atleast_2d(h)
        if h.shape != (obs.shape[0], self.hidden_dim):
            raise ValueError(f"hidden must have shape ({obs.shape[0]}, {self.hidden_dim}), got {h.shape}")
        x = np.maximum(obs @ w["input_weight"].T + w["input_bias"], np.float32(0.0))
        gi = x @ w["gru_weight_ih"].T + w["gru_bias_ih"]
        gh = h @ w["gru_weight_hh"].T + w["gru_bias_hh"]
        i_r, i_z, i_n = np.split(gi, 3, axis=-1)
        h_r, h_z, h_n = np.split(gh, 3, axis=-1)
        r = _sigmoid(i_r + h_r)
        z = _sigmoid(i_z + h_z)
        n = np.tanh(i_n + r * h_n)
        h = n + z * (h - n)  # = (1 - z) n + z h, in the order torch's CPU kernel rounds it
        action = np.clip(h @ w["output_weight"].T + w["output_bias"], -1.0, 1.0).astype(np.float32)
        return (action[0], h[0]) if single else (action, h)


# -- ONNX ---------------------------------------------------------------------------------------
def export_onnx(student: RaptorStudent, path: str | Path) -> Path:
    """One control step as ONNX: inputs obs (B, 22), hidden (B, H); outputs action (B, 4), hidden_out.

    The learned initial hidden state is stored as json in the model's metadata ("initial_hidden").
    """
    import onnx
    import torch

    class StepGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = student

        def forward(self, obs: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.student.step(obs, hidden)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = student.training
    student.eval()
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        # torch's exporter warns about its own internals (nn.GRU's flat weights, deprecations)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*(_flat_weights|axis name).*")
        try:
            torch.onnx.export(
                StepGraph().eval(),
                (torch.zeros(2, OBS_DIM), torch.zeros(2, student.hidden_dim)),
                str(path),
                input_names=["obs", "hidden"],
                output_names=["action", "hidden_out"],
                dynamic_shapes={"obs": {0: batch}, "hidden": {0: batch}},
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        finally:
            student.train(was_training)
    model = onnx.load(str(path))
    initial = student_weights(student)["initial_hidden"]
    onnx.helper.set_model_props(
        model,
        {
            "initial_hidden": json.dumps([float(v) for v in initial]),
            "obs_layout": json.dumps(OBS_LAYOUT),
            "motor_order": json.dumps(list(MOTOR_ORDER)),
            "source": student.checkpoint_path or "in-memory RaptorStudent",
        },
    )
    onnx.save(model, str(path))
    return path


# -- C --------------------------------------------------------------------------------------------
def _c_float(value: np.float32) -> str:
    # the shortest decimal that reads back as the same float32, so the C constants are exact
    return np.format_float_scientific(np.float32(value), unique=True, trim="0") + "f"


def _c_values(values: np.ndarray, indent: str, per_line: int = 8) -> str:
    lines = [values[i : i + per_line] for i in range(0, len(values), per_line)]
    return ",\n".join(indent + ", ".join(_c_float(v) for v in line) for line in lines)


def _c_array(name: str, array: np.ndarray, comment: str, static: bool = True) -> str:
    dims = "".join(f"[{d}]" for d in array.shape)
    if array.ndim == 1:
        body = _c_values(array, "    ")
    else:
        body = ",\n".join("    {\n" + _c_values(row, "        ") + "\n    }" for row in array)
    prefix = "static const" if static else "const"
    return f"/* {comment} */\n{prefix} float {name}{dims} = {{\n{body}\n}};\n"


def _c_declarations(hidden: int) -> str:
    return f"""#define RAPTOR_OBS_DIM {OBS_DIM}
#define RAPTOR_HIDDEN_DIM {hidden}
#define RAPTOR_ACTION_DIM {ACTION_DIM}

/* The learned hidden state every episode starts from. */
extern const float raptor_initial_hidden[RAPTOR_HIDDEN_DIM];

/* Set hidden to the learned initial state (call at the start of each episode). */
void raptor_reset(float hidden[RAPTOR_HIDDEN_DIM]);

/* One control step: reads obs, updates hidden in place, writes action (each in [-1, 1]). */
void raptor_step(const float obs[RAPTOR_OBS_DIM], float hidden[RAPTOR_HIDDEN_DIM],
                 float action[RAPTOR_ACTION_DIM]);
"""


def _c_header_comment(student: RaptorStudent, weights: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256(b"".join(weights[name].tobytes() for name in WEIGHT_NAMES)).hexdigest()
    layout = "\n".join(f" *   {f'obs[{a}:{b}]':12}{name}" for name, (a, b) in OBS_LAYOUT.items())
    n_params = sum(int(w.size) for w in weights.values())
    return f"""/*
 * RAPTOR student policy (Eschmann et al. 2025), generated by robomosaic.policies.raptor.export.
 * Do not edit: regenerate from the checkpoint instead.
 *
 * source checkpoint: {student.checkpoint_path or "in-memory RaptorStudent (no checkpoint)"}
 * weights sha256 (float32, in declaration order): {digest}
 * generated: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC
 *
 * network ({n_params} parameters):
 *   x  = relu(W_x obs + b_x)                                   Dense {OBS_DIM} -> {student.hidden_dim}
 *   r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)                GRU {student.hidden_dim}, gate rows r, z, n
 *   z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
 *   n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))
 *   h' = (1 - z) * n + z * h
 *   action = clamp(W_o h' + b_o, -1, 1)                        Dense {student.hidden_dim} -> {ACTION_DIM}
 *
 * observation ({OBS_DIM} floats, FLU frame):
{layout}
 * action ({ACTION_DIM} floats in [-1, 1]): motors {", ".join(MOTOR_ORDER)}
 *
 * C99, no allocation, no global mutable state; needs only expf from libm (link with -lm).
 */
"""


def export_c(student: RaptorStudent, path_c: str | Path, path_h: str | Path | None = None) -> Path:
    """Write the student as a dependency-free C99 file (and optionally a header declaring its API).

    Without `path_h` the C file carries its own declarations.
    """
    weights = student_weights(student)
    hidden = student.hidden_dim
    path_c = Path(path_c)
    path_c.parent.mkdir(parents=True, exist_ok=True)
    comment = _c_header_comment(student, weights)
    if path_h is not None:
        path_h = Path(path_h)
        path_h.parent.mkdir(parents=True, exist_ok=True)
        guard = "RAPTOR_POLICY_" + "".join(c if c.isalnum() else "_" for c in path_h.name.upper())
        path_h.write_text(
            f"{comment}\n#ifndef {guard}\n#define {guard}\n\n{_c_declarations(hidden)}\n#endif\n"
        )
        declarations = f'#include "{path_h.name}"\n'
    else:
        declarations = _c_declarations(hidden)
    arrays = "\n".join(
        [
            _c_array("raptor_input_weight", weights["input_weight"].T, "input Dense weight, [in][out]"),
            _c_array("raptor_input_bias", weights["input_bias"], "input Dense bias"),
            _c_array(
                "raptor_gru_weight_ih",
                weights["gru_weight_ih"].T,
                "GRU input weights, [in][out], out r, z, n",
            ),
            _c_array(
                "raptor_gru_weight_hh",
                weights["gru_weight_hh"].T,
                "GRU hidden weights, [in][out], out r, z, n",
            ),
            _c_array("raptor_gru_bias_ih", weights["gru_bias_ih"], "GRU input biases, r, z, n"),
            _c_array("raptor_gru_bias_hh", weights["gru_bias_hh"], "GRU hidden biases, r, z, n"),
            _c_array(
                "raptor_initial_hidden", weights["initial_hidden"], "learned initial hidden state", False
            ),
            _c_array("raptor_output_weight", weights["output_weight"].T, "output Dense weight, [in][out]"),
            _c_array("raptor_output_bias", weights["output_bias"], "output Dense bias"),
        ]
    )
    code = f"""{comment}
#include <math.h>

{declarations}
{arrays}
static float raptor_sigmoid(float x) {{
    return 1.0f / (1.0f + expf(-x));
}}

/* tanh(x) = 2 sigmoid(2x) - 1: one expf, about 4x faster than glibc's tanhf, absolute error ~1e-7 */
static float raptor_tanh(float x) {{
    return 2.0f / (1.0f + expf(-2.0f * x)) - 1.0f;
}}

void raptor_reset(float hidden[RAPTOR_HIDDEN_DIM]) {{
    int i;
    for (i = 0; i < RAPTOR_HIDDEN_DIM; ++i) {{
        hidden[i] = raptor_initial_hidden[i];
    }}
}}

void raptor_step(const float obs[RAPTOR_OBS_DIM], float hidden[RAPTOR_HIDDEN_DIM],
                 float action[RAPTOR_ACTION_DIM]) {{
    /* Weights are stored [in][out] so that the inner loops run over outputs: independent sums
     * that the compiler vectorises, each still accumulated in input order (bias first). */
    float x[RAPTOR_HIDDEN_DIM];
    float gi[3 * RAPTOR_HIDDEN_DIM]; /* W_i x + b_i for gates r, z, n */
    float gh[3 * RAPTOR_HIDDEN_DIM]; /* W_h h + b_h for gates r, z, n */
    float y[RAPTOR_ACTION_DIM];
    int i, j;

    for (i = 0; i < RAPTOR_HIDDEN_DIM; ++i) {{
        x[i] = raptor_input_bias[i];
    }}
    for (j = 0; j < RAPTOR_OBS_DIM; ++j) {{
        const float v = obs[j];
        for (i = 0; i < RAPTOR_HIDDEN_DIM; ++i) {{
            x[i] += raptor_input_weight[j][i] * v;
        }}
    }}
    for (i = 0; i < RAPTOR_HIDDEN_DIM; ++i) {{
        x[i] = x[i] > 0.0f ? x[i] : 0.0f;
    }}

    for (i = 0; i < 3 * RAPTOR_HIDDEN_DIM; ++i) {{
        gi[i] = raptor_gru_bias_ih[i];
        gh[i] = raptor_gru_bias_hh[i];
    }}
    for (j = 0; j < RAPTOR_HIDDEN_DIM; ++j) {{
        const float xv = x[j];
        const float hv = hidden[j];
        for (i = 0; i < 3 * RAPTOR_HIDDEN_DIM; ++i) {{
            gi[i] += raptor_gru_weight_ih[j][i] * xv;
            gh[i] += raptor_gru_weight_hh[j][i] * hv;
        }}
    }}
    /* gh already holds everything the old hidden state contributes: update it in place */
    for (i = 0; i < RAPTOR_HIDDEN_DIM; ++i) {{
        const float r = raptor_sigmoid(gi[i] + gh[i]);
        const float z = raptor_sigmoid(gi[RAPTOR_HIDDEN_DIM + i] + gh[RAPTOR_HIDDEN_DIM + i]);
        const float n = raptor_tanh(gi[2 * RAPTOR_HIDDEN_DIM + i] + r * gh[2 * RAPTOR_HIDDEN_DIM + i]);
        hidden[i] = n + z * (hidden[i] - n);
    }}

    for (i = 0; i < RAPTOR_ACTION_DIM; ++i) {{
        y[i] = raptor_output_bias[i];
    }}
    for (j = 0; j < RAPTOR_HIDDEN_DIM; ++j) {{
        const float v = hidden[j];
        for (i = 0; i < RAPTOR_ACTION_DIM; ++i) {{
            y[i] += raptor_output_weight[j][i] * v;
        }}
    }}
    for (i = 0; i < RAPTOR_ACTION_DIM; ++i) {{
        action[i] = y[i] < -1.0f ? -1.0f : (y[i] > 1.0f ? 1.0f : y[i]);
    }}
}}
"""
    path_c.write_text(code)
    return path_c
