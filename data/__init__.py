"""robomosaic.data: zarr episode store, training-window sampler, normalizers.

Kept light on purpose: the names below are imported on first use (PEP 562), so that e.g. a recorder
using only the store does not import torch; collection, conversion and replay modules (which import
simulators) are never imported from here.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DatasetSpec": "spec",
    "KeySpec": "spec",
    "EpisodeStore": "store",
    "StoreError": "store",
    "SequenceSampler": "sampler",
    "SequenceDataset": "sampler",
    "make_dataloader": "sampler",
    "split_episodes": "sampler",
    "Normalizer": "normalizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
