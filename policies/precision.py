"""Reduced precision where the hardware has it, detected at run time and never assumed.

The machines we run on differ between sessions: some CPUs have AVX512-BF16 and AMX, others only
AVX2. bf16 autocast pays off only where bf16 matrix units exist (AVX512-BF16/AMX on the CPU, bf16
tensor cores on CUDA); elsewhere it emulates bf16 and is slower than fp32.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")


def bf16_supported(device: torch.device | str) -> bool:
    """True where bf16 matrix multiplication runs on native units of `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'auto' -> 'bf16' where `bf16_supported`, else 'fp32'; an explicit 'bf16' without hardware
    support falls back to fp32 with a log line."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}, expected one of {PRECISIONS}")
    supported = bf16_supported(device)
    if precision == "bf16" and not supported:
        log.warning("precision=bf16: %s has no native bf16 units; training in fp32", device)
    if precision == "fp32" or not supported:
        return "fp32"
    return "bf16"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast for a resolved precision 'bf16'; nothing for 'fp32'. Weights, optimizer state
    and the loss stay fp32 (autocast runs matrix products in bf16 and normalizations in fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
