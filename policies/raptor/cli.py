"""`robomosaic-raptor`: the RAPTOR pipeline in four resumable stages, Hydra overrides after the stage.

    robomosaic-raptor train-teachers out=runs/raptor teachers.n=32  # out/teachers/
    robomosaic-raptor distill out=runs/raptor     # out/distill/: student, mlp (BC, DAgger, trim)
    robomosaic-raptor eval out=runs/raptor        # docs/results/raptor.md, plots
    robomosaic-raptor export out=runs/raptor      # out/export/: ONNX, C + header, npz

Each stage reads what the previous one wrote under `out` and fails with the command to run first
when it is missing; `resume=true` (the default) continues an interrupted stage. The config is
conf/raptor.yaml.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robomosaic.conf.stages import parse_stage
from robomosaic.policies.checkpoint import CheckpointError
from robomosaic.policies.raptor.distill import POLICY_TYPES, DistillConfig, distill, load_distilled
from robomosaic.policies.raptor.evaluate import (
    EvalConfig,
    eval_vehicles,
    evaluate,
    linear_probe,
    standard_controllers,
    write_report,
)
from robomosaic.sim.quadrotor.params import QuadrotorParams, sample_params

PROGRAM = "robomosaic-raptor"
STAGES = ("train-teachers", "distill", "eval", "export")
PREVIOUS = {"distill": "train-teachers", "eval": "distill", "export": "distill"}


class StageInputError(SystemExit):
    """A stage's inputs are missing: the message says which command makes them."""


def _container(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _missing(stage: str, what: str, path: Path, out: Path, detail: str = "") -> StageInputError:
    producer = PREVIOUS.get(stage, "train-teachers")
    extra = f" ({detail})" if detail else ""
    return StageInputError(
        f"{PROGRAM} {stage}: {what} not found at {path}{extra}; run `{PROGRAM} {producer} out={out}` first"
    )


def _teachers_module():
    """robomosaic.policies.raptor.teachers, imported only by the stages that need it."""
    try:
        from robomosaic.policies.raptor import teachers
    except ImportError as e:
        raise SystemExit(
            f"{PROGRAM}: the RL teachers (robomosaic.policies.raptor.teachers) are unavailable: {e}"
        ) from None
    return teachers


def teacher_params(cfg: DictConfig) -> QuadrotorParams:
    """The teachers' vehicles: ``teachers.n`` sampled with ``teachers.seed``."""
    return sample_params(int(cfg.teachers.n), torch.Generator().manual_seed(int(cfg.teachers.seed)))


def _train_teacher_ensemble(cfg: DictConfig, out: Path, params: Any) -> Any:
    """Teachers for ``params`` (one per vehicle) with the configured TeacherConfig, into ``out``."""
    teachers = _teachers_module()
    values = {**_container(cfg.teachers.config), "n_teachers": len(params), "seed": int(cfg.teachers.seed)}
    config = teachers.TeacherConfig.from_dict(values, source="teachers.config")
    return teachers.train_teachers(config, out, params=params, progress=cfg.progress, resume=cfg.resume)


def load_teachers(directory: Path, stage: str, out: Path) -> Any:
    if not directory.is_dir():
        raise _missing(stage, "the teachers", directory, out)
    try:
        return _teachers_module().TeacherEnsemble.load(directory)
    except (OSError, ValueError, KeyError, CheckpointError) as e:
        raise _missing(stage, "complete teachers", directory, out, str(e)) from None


def _load_policy(out: Path, kind: str, stage: str) -> Any:
    path = out / "distill" / kind / "final"
    if not (path / "spec.json").is_file():
        raise _missing(stage, f"the distilled {kind}", path, out)
    return load_distilled(out / "distill", kind)


def _imitation_student(out: Path) -> Any:
    """The student before the hover trim, when the trim ran (the eval's ablation row), else None."""
    folder = out / "distill" / "student"
    if not (folder / "trim" / "spec.json").is_file():
        return None
    return POLICY_TYPES["student"].load(folder / "imitation")


# ---- stages ------------------------------------------------------------------------------------
def stage_train_teachers(cfg: DictConfig, out: Path) -> None:
    _train_teacher_ensemble(cfg, out / "teachers", teacher_params(cfg))
    print(f"{PROGRAM}: teachers in {out / 'teachers'}")


def stage_distill(cfg: DictConfig, out: Path) -> None:
    teachers = load_teachers(out / "teachers", "distill", out)
    config = DistillConfig.from_dict(_container(cfg.distill))
    distill(teachers, config, out / "distill", progress=cfg.progress, resume=cfg.resume)
    print(f"{PROGRAM}: student and MLP baseline in {out / 'distill'}")


def stage_eval(cfg: DictConfig, out: Path, command: str) -> Path:
    student = _load_policy(out, "student", "eval")
    mlp = _load_policy(out, "mlp", "eval")
    teachers = load_teachers(out / "teachers", "eval", out)
    config = EvalConfig.from_dict(_container(cfg.eval))
    params, names, groups = eval_vehicles(config.n_vehicles, config.seed)
    own = _train_teacher_ensemble(cfg, out / "eval_teachers", params) if cfg.own_teachers else None
    controllers = standard_controllers(student, mlp, teachers, own, params, _imitation_student(out))
    result = evaluate(controllers, params, groups, config, names, progress=cfg.progress)
    held_out = params.select(torch.nonzero(groups["held-out"]).flatten())
    fit_vehicles = teachers.params.replace(disturbance_force=[0.0, 0.0, 0.0])
    result.probe = linear_probe(student, fit_vehicles, held_out, config)
    notes = (
        "The own-teacher upper bound is not reported: run with own_teachers=true."
        if own is None
        else "Own teachers: an ensemble trained (same teacher config) on exactly the evaluation vehicles."
    )
    if "student, imitation only" in controllers:
        notes += (
            " Student (GRU) is the distilled student after its hover trim (policies/raptor/trim.py); "
            "'student, imitation only' is the same student before it (behaviour cloning and DAgger only)."
        )
    report = write_report(result, cfg.report_dir, command, notes)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "raptor.json").write_text(json.dumps(result.to_dict(), indent=1))
    print(report.read_text())
    return report


def stage_export(cfg: DictConfig, out: Path) -> dict[str, Path]:
    from robomosaic.policies.raptor.export import export_c, export_onnx, student_weights

    student = _load_policy(out, "student", "export")
    folder = out / "export"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "onnx": export_onnx(student, folder / "raptor_student.onnx"),
        "c": export_c(student, folder / "raptor_policy.c", folder / "raptor_policy.h"),
        "h": folder / "raptor_policy.h",
        "npz": folder / "raptor_student_weights.npz",
    }
    np.savez(paths["npz"], **student_weights(student))  # plain arrays: np.load(..., allow_pickle=False)
    for name, path in paths.items():
        print(f"{PROGRAM}: {name:4s} {path}")
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    run = parse_stage(PROGRAM, __doc__, "raptor", STAGES, list(sys.argv[1:] if argv is None else argv))
    if run is None:
        return
    stage, cfg, out = run.stage, run.cfg, run.out
    try:
        if stage == "train-teachers":
            stage_train_teachers(cfg, out)
        elif stage == "distill":
            stage_distill(cfg, out)
        elif stage == "eval":
            stage_eval(cfg, out, run.command)
        else:
            stage_export(cfg, out)
    except (KeyError, ValueError, CheckpointError) as e:
        raise SystemExit(f"{PROGRAM} {stage}: {e}") from None


if __name__ == "__main__":
    main()
