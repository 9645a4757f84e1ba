"""Descriptions of the arrays a dataset or a task carries.

A `KeySpec` is what the store writes into its root attributes for every key and what a task
publishes for every observation: enough for a reader to check shapes and dtypes before touching
the data, and for a human to know the units and frame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class KeySpec:
    """Shape of one time step (without the time axis), dtype, units and frame of a data key."""

    shape: tuple[int, ...]
    dtype: str
    units: str = ""
    frame: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)

    @property
    def is_image(self) -> bool:
        """Images are uint8 HWC with 1 or 3 channels."""
        return self.dtype == "uint8" and len(self.shape) == 3 and self.shape[-1] in (1, 3)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KeySpec:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class DatasetSpec:
    """Everything a store's root attributes say about the dataset as a whole."""

    keys: dict[str, KeySpec]
    control_hz: float
    robot: str = ""
    controller: str = ""
    task: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "keys": {k: v.to_dict() for k, v in self.keys.items()},
            "control_hz": float(self.control_hz),
            "robot": self.robot,
            "controller": self.controller,
            "task": self.task,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetSpec:
        return cls(
            keys={k: KeySpec.from_dict(v) for k, v in d["keys"].items()},
            control_hz=float(d["control_hz"]),
            robot=d.get("robot", ""),
            controller=d.get("controller", ""),
            task=d.get("task", ""),
            extra=dict(d.get("extra", {})),
        )
