"""robomosaic-experts: measure each task's scripted expert over many seeds and write a markdown table.

    robomosaic-experts tasks=[lift,stack,door,pick_one] seeds=100 workers=2 out=docs/results/experts.md

Arguments are Hydra overrides of `conf/experts.yaml`. A task without an expert module is listed as
missing rather than failing the whole run.
"""

from __future__ import annotations

import collections
import datetime
import importlib.util
import platform
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robomosaic.conf.console import console_script
from robomosaic.sim.vector import EpisodeResult, ExpertPolicy, run_episodes


@dataclass
class ExpertMeasurement:
    task: str
    episodes: int
    successes: int
    ci_low: float
    ci_high: float
    mean_length: float
    behaviours: dict[str, int]
    failed_seeds: list[int]
    seconds: float

    @property
    def rate(self) -> float:
        return self.successes / self.episodes


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (scipy's implementation)."""
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def has_expert(task: str) -> bool:
    return importlib.util.find_spec(f"robomosaic.sim.experts.{task}") is not None


def measure(task: str, seeds: Sequence[int], workers: int, progress: bool = True) -> ExpertMeasurement:
    """Run the expert of `task` once per seed and summarise."""
    start = time.perf_counter()
    results: list[EpisodeResult] = run_episodes(
        task, seeds, ExpertPolicy(task), n_envs=workers, progress=progress
    )
    successes = sum(r.success for r in results)
    low, high = wilson_interval(successes, len(results))
    return ExpertMeasurement(
        task=task,
        episodes=len(results),
        successes=successes,
        ci_low=low,
        ci_high=high,
        mean_length=float(np.mean([r.length for r in results])),
        behaviours=dict(sorted(collections.Counter(r.behaviour for r in results if r.behaviour).items())),
        failed_seeds=[r.seed for r in results if not r.success],
        seconds=time.perf_counter() - start,
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if "model name" in ln]
        if names:
            cpu = f"{names[0]} ({len(names)} logical cores)"
    return f"{platform.system()} {platform.release()}, {cpu}, Python {platform.python_version()}"


def markdown(rows: list[ExpertMeasurement], missing: list[str], command: str) -> str:
    import mujoco
    import robosuite

    lines = [
        "# Scripted experts",
        "",
        "Success rate of each task's scripted expert (`robomosaic.sim.experts.<task>`), one episode",
        "per seed; success is robosuite's `_check_success` before the task's step limit.",
        "The interval is the Wilson 95% score interval.",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- robosuite {robosuite.__version__}, mujoco {mujoco.__version__}",
        "",
        "| task | episodes | success | 95% interval | mean length (steps) | behaviours | failed seeds "
        "| wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        behaviours = ", ".join(f"{k}: {v}" for k, v in r.behaviours.items()) or "-"
        failed = ", ".join(map(str, r.failed_seeds[:10])) + (" ..." if len(r.failed_seeds) > 10 else "")
        lines.append(
            f"| {r.task} | {r.episodes} | {r.rate:.0%} ({r.successes}/{r.episodes}) "
            f"| {r.ci_low:.0%} - {r.ci_high:.0%} | {r.mean_length:.1f} | {behaviours} | {failed or '-'} "
            f"| {r.seconds:.0f} s |"
        )
    for task in missing:
        lines.append(f"| {task} | - | missing: no module robomosaic.sim.experts.{task} | | | | | |")
    return "\n".join(lines) + "\n"


@console_script("robomosaic-experts")
def main(argv: list[str]) -> None:
    from robomosaic.conf import compose
    from robomosaic.sim.tasks import TASKS

    cfg = compose("experts", argv)
    tasks = [str(t) for t in cfg.tasks]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"robomosaic-experts: unknown tasks {unknown}; registered: {sorted(TASKS)}")
    if cfg.seeds < 1 or cfg.workers < 1:
        raise SystemExit(
            f"robomosaic-experts: seeds and workers must be >= 1, got {cfg.seeds}, {cfg.workers}"
        )
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.seeds)
    rows, missing = [], []
    for task in tasks:
        if not has_expert(task):
            print(f"{task}: no scripted expert (robomosaic.sim.experts.{task}), skipped")
            missing.append(task)
            continue
        row = measure(task, seeds, cfg.workers, progress=cfg.progress)
        rows.append(row)
        print(
            f"{task}: success {row.rate:.0%} ({row.successes}/{row.episodes}), "
            f"95% CI [{row.ci_low:.2f}, {row.ci_high:.2f}], mean length {row.mean_length:.1f}, "
            f"behaviours {row.behaviours or '-'}, {row.seconds:.0f} s"
        )
    report = markdown(rows, missing, shlex.join(["robomosaic-experts", *argv]))
    print(report)
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
