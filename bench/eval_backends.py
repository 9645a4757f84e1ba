"""Lift evaluation wall time and success with the fast inference path against eager PyTorch.

    .venv/bin/python bench/eval_backends.py [--checkpoint tests/assets/lift_flow] [--episodes 50]

Runs `robomosaic.policies.evaluate.evaluate` on the same checkpoint and the same 50 report seeds
(1000000+) with backend=eager and backend=auto (ONNX Runtime), in alternating order over
`--rounds`, 2 simulator workers, and reports wall time, time spent in chunk prediction, success
with its 95 % interval and how many episodes ended differently. Writes docs/results/eval_speed.md.
Run on an idle machine: the table prints the load average beside it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from report import publish

from robomosaic.policies.evaluate import evaluate
from robomosaic.sim.measure_experts import machine, wilson_interval

ROOT = Path(__file__).parents[1]
BACKENDS = ("eager", "auto")


def run(checkpoint: Path, episodes: int, backend: str) -> dict:
    started = time.perf_counter()
    result = evaluate(checkpoint, episodes=episodes, workers=2, backend=backend, progress=False)
    result["bench_wall_s"] = time.perf_counter() - started
    return result


def inference_seconds(result: dict) -> float:
    latency = result["executor"]["inference_ms"]
    return latency["mean"] * result["executor"]["chunks"] / 1e3 if latency else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "tests/assets/lift_flow")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", type=Path, default=ROOT / "docs/results/eval_speed.md")
    args = parser.parse_args()
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {b: [] for b in BACKENDS}
    for r in range(args.rounds):
        for backend in BACKENDS if r % 2 == 0 else BACKENDS[::-1]:
            result = run(args.checkpoint, args.episodes, backend)
            runs[backend].append(result)
            print(
                f"round {r} {backend:5s}: wall {result['bench_wall_s']:.1f} s, inference "
                f"{inference_seconds(result):.1f} s, success {result['success_rate']:.2f}",
                flush=True,
            )
    load_after = os.getloadavg()
    rows, outcomes = [], {}
    for backend, results in runs.items():
        wall = statistics.median(r["bench_wall_s"] for r in results)
        infer = statistics.median(inference_seconds(r) for r in results)
        successes = round(results[0]["success_rate"] * args.episodes)
        lo, hi = wilson_interval(successes, args.episodes)
        outcomes[backend] = {e["seed"]: e["success"] for e in results[0]["per_episode"]}
        rows.append((backend, wall, infer, successes, lo, hi))
    eager, fast = rows
    differ = sum(outcomes["eager"][s] != outcomes["auto"][s] for s in outcomes["eager"])
    table = "\n".join(
        [
            "| backend | wall s (median) | chunk prediction s | success | 95 % interval |",
            "|---|---:|---:|---:|---|",
            *(
                f"| {b} | {w:.1f} | {i:.1f} | {s}/{args.episodes} | {lo:.2f}-{hi:.2f} |"
                for b, w, i, s, lo, hi in rows
            ),
        ]
    )
    summary = (
        f"wall time eager / fast: {eager[1] / fast[1]:.2f}x; chunk prediction {eager[2] / fast[2]:.2f}x; "
        f"{differ} of {args.episodes} episodes ended differently"
    )
    text = f"""# Lift evaluation: fast inference path vs eager PyTorch

- date: {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- machine: {machine()}
- load average before: {" ".join(f"{x:.2f}" for x in load_before)}, after: \
{" ".join(f"{x:.2f}" for x in load_after)}
- command: `{shlex.join([".venv/bin/python", *sys.argv])}`
- checkpoint: `{args.checkpoint}`, \
{args.episodes} report seeds (1000000+), 2 simulator workers, blend none, {args.rounds} rounds alternating

{table}

{summary}. "chunk prediction" sums the wall time of every `predict_chunk` call (inference runs in
the evaluating process while the simulator workers wait for actions, so it adds to the wall time).
"""
    publish(text, args.results)


if __name__ == "__main__":
    main()
