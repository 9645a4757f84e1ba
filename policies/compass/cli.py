"""`robomosaic-compass`: COMPASS in resumable stages, Hydra overrides after the stage.

    robomosaic-compass base out=runs/compass          # out/base/: demonstrations on carter + the base
    robomosaic-compass residual out=runs/compass      # out/residual/<embodiment>/s<seed>/: specialists
    robomosaic-compass eval out=runs/compass          # out/eval/results.json

`base.checkpoint=<folder>` uses an existing imitation base (COMPASS part 1) instead of stage 1's.
Each stage reads what the previous one wrote under `out`, fails with the command to run first when
it is missing, and continues where it stopped (`resume=true`). The config is conf/compass.yaml.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from robomosaic.conf.console import console_script
from robomosaic.policies.compass.base import FrozenBase
from robomosaic.policies.compass.residual import ResidualConfig, load_specialist, train_residual
from robomosaic.policies.evaluate import load_checkpoint
from robomosaic.policies.evaluate_navigation import evaluate_runner
from robomosaic.sim.mobility.embodiments import embodiment_names

PROGRAM = "robomosaic-compass"
STAGES = ("base", "residual", "eval")
USAGE = f"usage: {PROGRAM} {{{'|'.join(STAGES)}}} [key=value ...]   (config: conf/compass.yaml)"


def base_checkpoint(cfg: DictConfig, out: Path) -> Path:
    """The imitation base the later stages build on: `base.checkpoint`, or stage 1's."""
    path = Path(cfg.base.checkpoint) if cfg.base.checkpoint else out / "base" / "policy" / "best"
    if not (path / "spec.json").is_file():
        raise SystemExit(
            f"{PROGRAM}: no imitation base at {path}; run `{PROGRAM} base out={out}` "
            "or pass base.checkpoint=<checkpoint folder>"
        )
    return path


def stage_base(cfg: DictConfig, out: Path) -> None:
    """Route-expert demonstrations on embodiment A, then the flow-matching base trained on them."""
    from robomosaic.data.collect import main as collect
    from robomosaic.policies.train import main as train

    store, policy = out / "base" / "demos.zarr", out / "base" / "policy"
    if not (store / "meta").exists():
        collect(
            [
                "task=nav",
                f"task.embodiment={cfg.base.embodiment}",
                f"episodes={cfg.base.episodes}",
                f"workers={cfg.base.collect_workers}",
                f"out={store}",
            ]
        )
    if not (policy / "best" / "spec.json").is_file():
        resume = ["resume=true"] if cfg.resume and (policy / "last").exists() else []
        train(["task=nav", f"dataset={store}", f"out={policy}", *list(cfg.base.train), *resume])
    print(f"{PROGRAM} base: {policy / 'best'}")


def specialist_folder(out: Path, embodiment: str, seed: int) -> Path:
    return out / "residual" / embodiment / f"s{seed}"


def stage_residual(cfg: DictConfig, out: Path) -> None:
    base = base_checkpoint(cfg, out)
    settings = OmegaConf.to_container(cfg.residual.config, resolve=True)
    for embodiment in cfg.residual.embodiments:
        for seed in cfg.residual.seeds:
            config = ResidualConfig.from_dict(
                {**settings, "embodiment": str(embodiment), "seed": int(seed)},
                "conf/compass.yaml residual.config",
            )
            folder = specialist_folder(out, embodiment, seed)
            metrics = train_residual(
                config, base, folder, resume=bool(cfg.resume), progress=bool(cfg.progress)
            )
            print(f"{PROGRAM} residual: {folder} {json.dumps(metrics)}")


def stage_eval(cfg: DictConfig, out: Path, command: str) -> dict[str, Any]:
    """The base on every embodiment; each specialist on its own."""
    base_path = base_checkpoint(cfg, out)
    base, _ = load_checkpoint(base_path)
    kwargs = {
        "episodes": int(cfg.eval.episodes),
        "worlds": int(cfg.eval.worlds),
        "progress": bool(cfg.progress),
    }
    report: dict[str, Any] = {"command": command, "base": str(base_path), "arms": {}}
    embodiments = list(cfg.eval.embodiments or embodiment_names(include_held_out=True))
    report["arms"]["base"] = evaluate_runner(
        lambda env: FrozenBase(base, env.n), embodiments, label="base", **kwargs
    )
    for embodiment in cfg.residual.embodiments:
        for seed in cfg.residual.seeds:
            folder = specialist_folder(out, embodiment, seed)
            if not (folder / "residual.json").is_file():
                raise SystemExit(
                    f"{PROGRAM} eval: no specialist at {folder}; run `{PROGRAM} residual out={out}`"
                )
            specialist = load_specialist(folder)
            report["arms"][f"specialist {embodiment} s{seed}"] = evaluate_runner(
                lambda env, s=specialist: s.policy(env.n),
                [str(embodiment)],
                label=f"specialist s{seed}",
                **kwargs,
            )
    target = out / "eval" / "results.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=1))
    for arm, results in report["arms"].items():
        for name, r in results.items():
            print(
                f"{arm:>24} on {name:<7} success {r['success_rate']:6.1%}  "
                f"collision {r['collision_rate']:6.1%}"
            )
    print(f"{PROGRAM} eval: {target}")
    return report


@console_script(PROGRAM)
def main(argv: list[str]) -> None:
    from robomosaic.conf import compose

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ if argv else USAGE)
        if not argv:
            raise SystemExit(2)
        return
    stage, overrides = argv[0], argv[1:]
    if stage not in STAGES:
        raise SystemExit(f"{PROGRAM}: unknown stage {stage!r}\n{USAGE}")
    cfg = compose("compass", overrides)
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    out = Path(cfg.out)
    if stage == "base":
        stage_base(cfg, out)
    elif stage == "residual":
        stage_residual(cfg, out)
    else:
        stage_eval(cfg, out, shlex.join([PROGRAM, *argv]))


if __name__ == "__main__":
    main()
