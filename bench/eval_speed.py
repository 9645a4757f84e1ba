"""Wall time of a 50-episode lift evaluation: the code before the performance work against today's,
and today's with each speed-up turned off (eager inference, lock-step rollouts).

    .venv/bin/python bench/eval_speed.py [--checkpoint tests/assets/lift_flow] [--rounds 2] [--before e312781]

Every configuration is one fresh `python -m robomosaic.policies.evaluate checkpoint=... workers=2
videos=0` process, as a user runs it, timed from start to exit; the rounds alternate their order.
"before" runs the same command on the code of git ref `--before` (checked out once as a worktree
under .cache/eval_speed/ and put first on PYTHONPATH). Episodes are compared seed by seed with the
first configuration's: the speed-ups must not change any of them. Writes docs/results/eval_speed.md;
run on an idle machine (the load average is printed beside the table).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from report import publish

from robomosaic.sim.measure_experts import machine, wilson_interval

ROOT = Path(__file__).parents[1]
PACKAGES = ("policies", "sim", "data", "ros_nodes", "conf")  # pyproject's package-dir
# name -> (overrides, uses the code of --before)
CONFIGS = {
    "before": ((), True),
    "eager, lock step": (("backend=eager", "asynchronous=false"), False),
    "eager, threads": (("backend=eager",), False),
    "fast, lock step": (("asynchronous=false",), False),
    "fast, threads (default)": ((), False),
}


def before_pythonpath(ref: str) -> str:
    """A folder whose robomosaic.* packages are those of git `ref`."""
    cache = ROOT / ".cache/eval_speed"
    tree, shim = cache / ref, cache / f"{ref}-path"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True)
    (shim / "robomosaic").mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        link = shim / "robomosaic" / package
        if not link.exists():
            link.symlink_to(tree / package)
    return str(shim)


def run(checkpoint: Path, episodes: int, overrides: tuple[str, ...], path: str | None, out: Path) -> dict:
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "osmesa")}
    if path:
        env["PYTHONPATH"] = path
    settings = [f"checkpoint={checkpoint}", f"episodes={episodes}", "workers=2", "videos=0", "progress=false"]
    command = [sys.executable, "-m", "robomosaic.policies.evaluate", *settings, f"out={out}", *overrides]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    report = json.loads(out.read_text())
    report["process_s"] = time.perf_counter() - started
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "tests/assets/lift_flow")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", default="e312781", help="git ref of the code to compare against")
    parser.add_argument("--results", type=Path, default=ROOT / "docs/results/eval_speed.md")
    args = parser.parse_args()
    checkpoint = args.checkpoint.resolve()
    shim = before_pythonpath(args.before)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in list(CONFIGS) if r % 2 == 0 else list(CONFIGS)[::-1]:
                overrides, before = CONFIGS[name]
                out = Path(tmp) / f"{r}_{list(CONFIGS).index(name)}.json"
                report = run(checkpoint, args.episodes, overrides, shim if before else None, out)
                runs[name].append(report)
                print(
                    f"round {r} {name:24s}: {report['process_s']:.1f} s, success {report['successes']}",
                    flush=True,
                )
    load_after = os.getloadavg()
    reference = {e["seed"]: (e["success"], e["length"]) for e in runs["before"][0]["per_episode"]}
    base = statistics.median(r["process_s"] for r in runs["before"])
    rows = []
    for name, reports in runs.items():
        wall = statistics.median(r["process_s"] for r in reports)
        first = reports[0]
        successes = first["successes"]
        lo, hi = wilson_interval(successes, args.episodes)
        differ = sum(reference[e["seed"]] != (e["success"], e["length"]) for e in first["per_episode"])
        latency = first["executor"]["inference_ms"]
        rows.append(
            f"| {name} | {wall:.1f} | {base / wall:.2f}x | {latency['mean']:.1f} | "
            f"{successes}/{args.episodes} | {lo:.2f}-{hi:.2f} | {differ} |"
        )
    command = shlex.join([".venv/bin/python", *sys.argv])
    text = f"""# Lift evaluation wall time: before the performance work and now

- command: `{command}`
- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC
- machine: {machine()}
- load average (1/5/15 min) before: {" ".join(f"{x:.2f}" for x in load_before)}, \
after: {" ".join(f"{x:.2f}" for x in load_after)}
- checkpoint: `{args.checkpoint}` (flow matching, U-Net, 10 Euler steps), {args.episodes} report seeds \
(1000000+), 2 simulator workers, blend none, no videos; {args.rounds} rounds, order alternating
- "before": the same command on the code of `{args.before}` (eager PyTorch, lock step, spawned workers)

| configuration | process s (median) | before / this | chunk ms | success | 95 % interval | not as before |
|---|---:|---:|---:|---:|---|---:|
{chr(10).join(rows)}

"process s" is one `python -m robomosaic.policies.evaluate ...` process from start to exit
(imports, checkpoint, workers, 50 episodes, report). "chunk ms" is the mean wall time an environment
waited for its chunk, beside the simulator workers on the same 2 cores. "not as before" counts the
episodes whose success or length differs from the "before" run's.
"""
    publish(text, args.results)


if __name__ == "__main__":
    main()
