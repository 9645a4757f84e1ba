"""robomosaic.conf: Hydra config groups shared by every console script.

The scripts parse their arguments as Hydra overrides (`task=lift episodes=50 out=demos/lift.zarr`)
through Hydra's compose API rather than `@hydra.main`, so that they neither change the working
directory nor write an `outputs/` folder on every call.
"""

from __future__ import annotations

from collections.abc import Sequence

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
