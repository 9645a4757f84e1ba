"""robomosaic.conf: Hydra config groups shared by every console script.

The scripts parse their arguments as Hydra overrides (`task=lift episodes=50 out=demos/lift.zarr`)
through Hydra's compose API rather than `@hydra.main`, so that they neither change the working
directory nor write an `outputs/` folder on every call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf


def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Load `conf/<config_name>.yaml` with its defaults list and apply command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException

    with initialize_config_module(config_module="robomosaic.conf", version_base="1.3"):
        try:
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        except HydraException as e:
            raise SystemExit(f"robomosaic: bad arguments {' '.join(overrides)!r}: {e}") from None


def load_group_option(group: str, option: str) -> dict:
    """One option of a config group as a plain dict, e.g. ("flow", "edm") -> conf/flow/edm.yaml."""
    from importlib.resources import files

    return OmegaConf.to_container(OmegaConf.load(files(__name__) / group / f"{option}.yaml"), resolve=True)


def check_known_keys(values: Mapping[str, Any], config_class: type, where: str) -> None:
    """Raise a KeyError naming ``where`` and every key of ``values`` that is not a field of the
    dataclass ``config_class`` (a typo in a YAML file or an override must not be ignored)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise KeyError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
