"""What the staged console scripts (robomosaic-compass, robomosaic-raptor) share: the command line
`<program> <stage> [key=value ...]`, its help and usage, the config composed from
conf/<config>.yaml with the overrides, and `torch_threads`.

    run = parse_stage("robomosaic-compass", __doc__, "compass", STAGES, argv)
    if run is not None:          # None: the help was printed
        STAGE_FUNCTIONS[run.stage](run.cfg, run.out)
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig


@dataclass(frozen=True)
class StageRun:
    stage: str
    cfg: DictConfig
    out: Path  # cfg.out
    command: str  # the command line, for the reports


def parse_stage(
    program: str, doc: str | None, config: str, stages: Sequence[str], argv: Sequence[str]
) -> StageRun | None:
    """The stage and config of `argv`; prints `doc` and returns None for -h/--help; exits with the
    usage for no stage (status 2) or an unknown one."""
    import torch

    from robomosaic.conf import compose

    usage = f"usage: {program} {{{'|'.join(stages)}}} [key=value ...]   (config: conf/{config}.yaml)"
    if not argv or argv[0] in ("-h", "--help"):
        print(doc if argv else usage)
        if not argv:
            raise SystemExit(2)
        return None
    stage, overrides = argv[0], list(argv[1:])
    if stage not in stages:
        raise SystemExit(f"{program}: unknown stage {stage!r}\n{usage}")
    cfg = compose(config, overrides)
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    return StageRun(stage, cfg, Path(cfg.out), shlex.join([program, *argv]))
