"""The fast inference path: a denoiser network's forward run by ONNX Runtime on the CPU.

A batch-1 denoiser call of a small U-Net is a few hundred tiny ops; eager PyTorch spends most of
its time dispatching them (~10 us each), and its conv1d runs an im2col path that reads weights at a
fraction of the memory bandwidth. ONNX Runtime runs the same graph with prepacked weights and far
less per-op overhead (docs/results/vs_lerobot.md measures the gain; torch.compile was slower to
start by a minute per process and gave less). The network is exported once per policy by
`torch.onnx.export` (dynamic batch), checked against eager on a probe input, and then called with
the same signature `network(x_in, time, cond) -> raw`, so the noise processes, samplers and
composition are untouched.

The exported graph holds a copy of the weights: `DenoisingPolicy` drops it when weights are loaded,
when the policy is put in training mode and when its backend changes. Gradients (guidance,
real-time chunking's vector-Jacobian product) and non-CPU devices use the eager network.
Anything that fails to export or disagrees with eager falls back to eager with a log line.
"""

from __future__ import annotations

import io
import logging
import statistics
import time as time_module
import warnings

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Largest |onnx - eager| accepted on the probe, relative to the largest |eager| output.
PROBE_RTOL = 1e-4


class FastNetworkError(RuntimeError):
    """The network cannot run on the fast path (export failed or its output disagrees with eager)."""


class OnnxNetwork:
    """`network(x_in, time, cond)` of one exported denoiser network, run by ONNX Runtime."""

    def __init__(
        self, network: nn.Module, horizon: int, action_dim: int, cond_shape: tuple[int, ...]
    ) -> None:
        import onnxruntime as ort

        self.threads = torch.get_num_threads()
        self.cond_shape = tuple(cond_shape)
        x = torch.zeros(1, horizon, action_dim)
        time = torch.zeros(1)
        cond = torch.zeros(1, *cond_shape)
        buffer = io.BytesIO()
        was_training = network.training
        network.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about shape checks in forward
                torch.onnx.export(
                    network,
                    (x, time, cond),
                    buffer,
                    input_names=["x", "time", "cond"],
                    output_names=["raw"],
                    dynamic_axes={name: {0: "batch"} for name in ("x", "time", "cond", "raw")},
                    opset_version=17,
                    dynamo=False,
                )
        finally:
            network.train(was_training)
        sessions = {n: self._session(ort, buffer.getvalue(), n) for n in sorted({1, self.threads})}
        # The exporter drops inputs the graph does not read (a network may ignore its noise level).
        self.inputs = {i.name for i in sessions[1].get_inputs()}
        self.session_threads = self._fastest(sessions, (x, time, cond))
        self.session = sessions[self.session_threads]

    @staticmethod
    def _session(ort, model: bytes, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Spinning workers fight torch's own OpenMP threads for the cores between network calls:
        # with spinning, a 2-thread session won the probe and then ran the small U-Net's chunks
        # 2.3x slower than a 1-thread one (26.6 vs 11.5 ms on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def _fastest(self, sessions: dict, example: tuple[Tensor, ...]) -> int:
        """The thread count whose session runs a batch-1 call fastest (median of 7 after 3 warm-up
        calls). Measured, not assumed: a small network's tiny ops gain nothing from a second thread,
        a 63.5M U-Net does."""
        if len(sessions) == 1:
            return next(iter(sessions))
        feeds = self._feeds(*example)
        medians = {}
        for threads, session in sessions.items():
            times = []
            for i in range(10):
                start = time_module.perf_counter()
                session.run(None, feeds)
                if i >= 3:
                    times.append(time_module.perf_counter() - start)
            medians[threads] = statistics.median(times)
        best = min(medians, key=medians.get)
        log.debug("fast inference: ONNX Runtime with %d thread(s) (median ms %s)", best, medians)
        return best

    def _feeds(self, x_in: Tensor, time: Tensor | float, cond: Tensor) -> dict[str, np.ndarray]:
        batch = x_in.shape[0]
        time = torch.as_tensor(time, dtype=torch.float32).reshape(-1).expand(batch)
        feeds = {"x": x_in, "time": time, "cond": cond}
        return {
            k: np.ascontiguousarray(v.detach().numpy(), dtype=np.float32)
            for k, v in feeds.items()
            if k in self.inputs
        }

    def __call__(self, x_in: Tensor, time: Tensor | float, cond: Tensor) -> Tensor:
        (raw,) = self.session.run(None, self._feeds(x_in, time, cond))
        return torch.from_numpy(raw)


def check_against_eager(fast: OnnxNetwork, network: nn.Module, horizon: int, action_dim: int) -> float:
    """Max |fast - eager| on a random probe (batch 2) relative to max |eager|; raises if above
    PROBE_RTOL."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, horizon, action_dim, generator=g)
    cond = torch.randn(2, *fast.cond_shape, generator=g)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        eager = network(x, t, cond)
    error = float((fast(x, t, cond) - eager).abs().max() / eager.abs().max().clamp(min=1e-6))
    if not error <= PROBE_RTOL:
        raise FastNetworkError(f"its output differs from eager PyTorch by {error:.2e} (relative) on a probe")
    return error


def build_fast_network(
    network: nn.Module, horizon: int, action_dim: int, cond_shape: tuple[int, ...]
) -> OnnxNetwork | None:
    """The network on the fast path for conditions of `cond_shape` (one sample's), or None (with a
    log line saying why) if it cannot run there."""
    name = type(network).__name__
    if not getattr(network, "onnx_exportable", True):
        log.info("fast inference: %s is not exportable (data-dependent routing); using eager PyTorch", name)
        return None
    try:
        fast = OnnxNetwork(network, horizon, action_dim, cond_shape)
        check_against_eager(fast, network, horizon, action_dim)
    except ImportError as e:
        log.warning("fast inference: onnxruntime is not installed (%s); using eager PyTorch", e)
        return None
    except Exception as e:  # any export or runtime failure means: stay on eager
        log.warning("fast inference: %s cannot run in ONNX Runtime (%s); using eager PyTorch", name, e)
        return None
    return fast
