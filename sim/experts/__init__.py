"""Scripted experts, one module per task: `robomosaic.sim.experts.<task>` defines `Expert`."""

from __future__ import annotations

import importlib

from robomosaic.sim.experts.base import Waypoint, WaypointExpert

__all__ = ["Waypoint", "WaypointExpert", "make_expert"]


def make_expert(task: str) -> WaypointExpert:
    """A fresh scripted expert for `task`; call `reset(obs, rng)` at the start of each episode."""
    try:
        module = importlib.import_module(f"robomosaic.sim.experts.{task}")
    except ModuleNotFoundError as e:
        raise KeyError(f"no scripted expert for task {task!r}") from e
    return module.Expert()
