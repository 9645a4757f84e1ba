"""Policies: everything that maps observations to actions.

The core contract (docs/design.md): every generative policy exposes
``denoise(x, sigma, cond) -> x0_hat`` in the VE noise coordinate; samplers only call that.
"""

from robomosaic.policies.checkpoint import CheckpointError, load_policy
from robomosaic.policies.noise import (
    PROCESSES,
    DDPMProcess,
    Denoiser,
    EDMProcess,
    FlowMatchingProcess,
    NoiseProcess,
    TrainingExample,
    make_process,
)
from robomosaic.policies.samplers import (
    SAMPLERS,
    Composition,
    GradientGuidance,
    Guidance,
    GuidedInpainting,
    Inpainting,
    sample,
)

__all__ = [
    "PROCESSES",
    "SAMPLERS",
    "CheckpointError",
    "Composition",
    "DDPMProcess",
    "Denoiser",
    "EDMProcess",
    "FlowMatchingProcess",
    "GradientGuidance",
    "Guidance",
    "GuidedInpainting",
    "Inpainting",
    "NoiseProcess",
    "TrainingExample",
    "load_policy",
    "make_process",
    "sample",
]
