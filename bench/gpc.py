"""Latency per composed chunk (GPC) at batch 1 against its parents', side by side in one run.

For each pair of parent checkpoints: `predict_chunk` of parent A alone, parent B alone, and the
composition with weights (0.5, 0.5) under each operator (convex, AND, OR) on the lead parent's
schedule, from one real observation history (the first window of the given store). The variants
are timed in turn (round robin, so that load changes hit them alike), one torch thread, median of
`--reps` calls per variant per run; the round robin is repeated `--runs` times and each ratio is the
median of its per-run values. The ratio that matters is composed / (A + B): the composition
evaluates both parents at every step, so it cannot be cheaper than their sum by much, and should
not be dearer (its overhead is a weighted sum per step). OR evaluates, per row, only the chosen
parent: at batch 1 one parent per chunk. Run on an idle machine:

    .venv/bin/python bench/gpc.py --pair lift runs/gpc/lift_unet500/best runs/gpc/lift_tf500/best \
        --store runs/gpc/lift_heldout.zarr --results docs/results/gpc_latency.md
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from robomosaic.data.sampler import SequenceSampler
from robomosaic.data.store import EpisodeStore
from robomosaic.policies.checkpoint import load_policy
from robomosaic.policies.composition import ComposedPolicy
from robomosaic.sim.measure_experts import machine


def history(policy: ComposedPolicy, store: Path) -> dict[str, np.ndarray]:
    sampler = SequenceSampler(
        EpisodeStore.open(store, mode="r"),
        list(policy.obs_spec),
        ("action",),
        policy.horizon,
        policy.n_obs_steps,
    )
    window = sampler.sample(0)
    return {k: window[k][: policy.n_obs_steps] for k in policy.obs_spec}


def time_round_robin(variants: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, call in variants.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=3, action="append", metavar=("NAME", "A", "B"), required=True)
    parser.add_argument("--store", action="append", required=True, help="one store per --pair, in order")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    if len(args.store) != len(args.pair):
        raise SystemExit(f"got {len(args.store)} --store for {len(args.pair)} --pair")
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    rows = []
    for (name, path_a, path_b), store in zip(args.pair, args.store, strict=True):
        a, b = load_policy(path_a), load_policy(path_b)
        composed = {op: ComposedPolicy([a, b], [0.5, 0.5], op) for op in ("convex", "and", "or")}
        h = history(composed["convex"], Path(store))
        h_a = {k: h[k][-a.n_obs_steps :] for k in a.obs_spec}
        h_b = {k: h[k][-b.n_obs_steps :] for k in b.obs_spec}
        g = torch.Generator().manual_seed(0)
        variants = {"A": (a, h_a), "B": (b, h_b), **{op: (p, h) for op, p in composed.items()}}
        calls: dict[str, Callable[[], object]] = {
            k: functools.partial(p.predict_chunk, obs, generator=g) for k, (p, obs) in variants.items()
        }
        time_round_robin(calls, 3)  # warm-up
        runs = [time_round_robin(calls, args.reps) for _ in range(args.runs)]
        med = {k: statistics.median(r[k] for r in runs) for k in variants}
        ratio = {op: statistics.median(r[op] / (r["A"] + r["B"]) for r in runs) for op in composed}
        spread = {}
        for op in composed:
            values = [r[op] / (r["A"] + r["B"]) for r in runs]
            spread[op] = (min(values), max(values))
        rows.append((name, Path(path_a), Path(path_b), med, ratio, spread))
    load_after = os.getloadavg()

    lines = [
        "| pair | A (ms) | B (ms) | A + B | convex (ms) | convex / (A+B) | AND (ms) | AND / (A+B) "
        "| OR (ms) | OR / (A+B) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, pa, pb, med, ratio, spread in rows:
        cells = [f"{name}: {pa.parent.name} + {pb.parent.name}", f"{med['A']:.1f}", f"{med['B']:.1f}",
                 f"{med['A'] + med['B']:.1f}"]  # fmt: skip
        for op in ("convex", "and", "or"):
            lo, hi = spread[op]
            cells += [f"{med[op]:.1f}", f"**{ratio[op]:.2f}** ({lo:.2f}-{hi:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    header = [
        "# GPC: latency per composed chunk at batch 1",
        "",
        f"`{shlex.join(['.venv/bin/python', 'bench/gpc.py', *sys.argv[1:]])}`",
        "",
        f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, torch {torch.__version__}, "
        "1 thread",
        f"- load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, "
        f"after: {' '.join(f'{x:.2f}' for x in load_after)}",
        f"- median of {args.reps} `predict_chunk` calls per variant per run, {args.runs} round-robin runs; "
        "ratios: median over runs (range); weights (0.5, 0.5), on the lead parent's schedule",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text)
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
