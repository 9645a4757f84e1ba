"""`robomosaic-compass`: COMPASS in resumable stages, Hydra overrides after the stage.

    robomosaic-compass base out=runs/compass          # out/base/: demonstrations on carter + the base
    robomosaic-compass residual out=runs/compass      # out/residual/<embodiment>/s<seed>/: specialists
    robomosaic-compass distill out=runs/compass       # out/distill/s<seed>/: rollouts, generalist, agreement
    robomosaic-compass eval out=runs/compass          # out/eval/results.json

`base.checkpoint=<folder>` uses an existing imitation base (COMPASS part 1) instead of stage 1's.
Each stage reads what the previous one wrote under `out`, fails with the command to run first when
it is missing, and continues where it stopped (`resume=true`); eval keeps each finished arm in
out/eval/arms/ and reuses it. The config is conf/compass.yaml.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robomosaic.conf.console import console_script
from robomosaic.conf.stages import parse_stage
from robomosaic.policies.compass.base import FrozenBase
from robomosaic.policies.compass.distill import GENERALIST_OBS_KEYS, agreement, record_teachers
from robomosaic.policies.compass.residual import ResidualConfig, load_specialist, train_residual
from robomosaic.policies.evaluate import load_checkpoint
from robomosaic.policies.evaluate_navigation import evaluate_runner
from robomosaic.policies.rollout import ExecutorPolicy
from robomosaic.sim.mobility.embodiments import embodiment_names

PROGRAM = "robomosaic-compass"
STAGES = ("base", "residual", "distill", "eval")


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
    train_policy(cfg, store, policy, list(cfg.base.train))
    print(f"{PROGRAM} base: {policy / 'best'}")


def train_policy(cfg: DictConfig, store: Path, policy: Path, overrides: list[str]) -> Path:
    """`robomosaic-train task=nav` on `store` into `policy` unless it is done; resumes a started run."""
    from robomosaic.policies.train import main as train

    if not (policy / "best" / "spec.json").is_file():
        resume = ["resume=true"] if cfg.resume and (policy / "last").exists() else []
        train(["task=nav", f"dataset={store}", f"out={policy}", *overrides, *resume])
    return policy / "best"


@contextmanager
def timed(path: Path, name: str) -> Iterator[None]:
    """Add the block's wall seconds to `name` in the json file `path` (summed over resumed runs;
    also when the block raises, Ctrl-C included)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = json.loads(path.read_text()) if path.is_file() else {}
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(seconds))


def specialist_folder(out: Path, embodiment: str, seed: int) -> Path:
    return out / "residual" / embodiment / f"s{seed}"


def specialist_at(out: Path, embodiment: str, seed: int) -> Path:
    """A trained specialist's folder, or the command that makes it."""
    folder = specialist_folder(out, embodiment, seed)
    if not (folder / "residual.json").is_file():
        raise SystemExit(
            f"{PROGRAM}: no specialist at {folder}; run `{PROGRAM} residual out={out} "
            f'"residual.seeds=[{seed}]"`'
        )
    return folder


def specialist_runner(folder: Path) -> Callable[[Any], Any]:
    """The specialist in `folder` over an environment's worlds."""
    specialist = load_specialist(folder)
    return lambda env: specialist.policy(env.n)


def generalist_folder(out: Path, seed: int) -> Path:
    return out / "distill" / f"s{seed}"


def executor(policy: Any) -> Any:
    """A trained chunk policy as robomosaic-eval and the ROS 2 node run it, over an env's worlds."""
    return lambda env: ExecutorPolicy(policy, env.spec, seed=0, gripper_dims=())


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


def stage_distill(cfg: DictConfig, out: Path) -> None:
    """Per training seed: the specialists' successful rollouts, the generalist trained on them with
    the embodiment one-hot, and its agreement with each specialist on held-apart seeds."""
    d = cfg.distill
    for seed in (int(s) for s in cfg.residual.seeds):
        folder = generalist_folder(out, seed)
        embodiments = [str(e) for e in cfg.residual.embodiments]
        teachers = {e: specialist_runner(specialist_at(out, e, seed)) for e in embodiments}
        store, recorded = folder / "rollouts.zarr", folder / "recorded.json"
        if not recorded.is_file():  # written once every teacher has its episodes or used its attempts
            with timed(folder / "seconds.json", "record"):
                report = record_teachers(
                    teachers, store, int(d.episodes), int(d.worlds), seed, bool(cfg.progress)
                )
            recorded.write_text(json.dumps(report, indent=1))
        print(f"{PROGRAM} distill: {store} {recorded.read_text()}")
        keys = f"task.obs_keys=[{','.join(GENERALIST_OBS_KEYS)}]"
        with timed(folder / "seconds.json", "train"):
            best = train_policy(cfg, store, folder / "policy", [keys, f"seed={seed}", *list(d.train)])
        if not (folder / "agreement.json").is_file():
            student, _ = load_checkpoint(best)
            seeds = range(int(d.agreement_seed), int(d.agreement_seed) + int(d.agreement_episodes))
            with timed(folder / "seconds.json", "agreement"):
                close = {e: agreement(teachers[e], executor(student), e, seeds) for e in teachers}
            (folder / "agreement.json").write_text(json.dumps(close, indent=1))
        for e, r in json.loads((folder / "agreement.json").read_text()).items():
            print(f"{PROGRAM} distill s{seed} on {e}: |generalist - specialist| mean {r['abs_error_mean']}")


def stage_eval(cfg: DictConfig, out: Path, command: str) -> dict[str, Any]:
    """The base and each generalist on every embodiment; each specialist on its own. Each arm's
    results are kept in out/eval/arms/ and reused by the next run."""
    base_path = base_checkpoint(cfg, out)
    kwargs = {
        "episodes": int(cfg.eval.episodes),
        "worlds": int(cfg.eval.worlds),
        "progress": bool(cfg.progress),
    }
    report: dict[str, Any] = {"command": command, "base": str(base_path), "arms": {}}
    embodiments = list(cfg.eval.embodiments or embodiment_names(include_held_out=True))
    cache = out / "eval" / "arms"
    cache.parent.mkdir(parents=True, exist_ok=True)

    def arm(name: str, load: Callable[[], Any], on: list[str]) -> None:
        """Results of the arm `name` (its runner built by `load()`) on `on`, cached by name."""
        path = cache / f"{name.replace(' ', '_')}.json"
        settings = {**kwargs, "embodiments": on}
        settings.pop("progress")
        if path.is_file() and (kept := json.loads(path.read_text()))["settings"] == settings:
            report["arms"][name] = kept["results"]
            return
        results = evaluate_runner(load(), on, label=name, **kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": settings, "results": results}))
        report["arms"][name] = results

    def frozen_base() -> Any:
        base, _ = load_checkpoint(base_path)
        return lambda env: FrozenBase(base, env.n)

    arm("base", frozen_base, embodiments)
    for seed in cfg.residual.seeds:
        for embodiment in cfg.residual.embodiments:
            folder = specialist_at(out, str(embodiment), int(seed))
            arm(f"specialist {embodiment} s{seed}", lambda f=folder: specialist_runner(f), [str(embodiment)])
        best = generalist_folder(out, int(seed)) / "policy" / "best"
        if (best / "spec.json").is_file():
            arm(f"generalist s{seed}", lambda b=best: executor(load_checkpoint(b)[0]), embodiments)
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
    run = parse_stage(PROGRAM, __doc__, "compass", STAGES, argv)
    if run is None:
        return
    if run.stage == "eval":
        stage_eval(run.cfg, run.out, run.command)
    else:
        {"base": stage_base, "residual": stage_residual, "distill": stage_distill}[run.stage](
            run.cfg, run.out
        )


if __name__ == "__main__":
    main()
