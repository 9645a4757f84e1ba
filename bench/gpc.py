"""Latency per composed chunk (GPC) at batch 1 against its parents', side by side in one run.

For each pair of parent checkpoints: `predict_chunk` of parent A alone, parent B alone, and the
composition with weights (0.5, 0.5) under each operator (convex, AND, OR) on the lead parent's
schedule, from one real observation history (the first window of the given store). The variants
are timed in turn (round robin, so that load changes hit them alike), one torch thread, median of
`--reps` calls per variant per run; the round robin is repeated `--runs` times and each ratio is the
median of its per-run values. The ratio that matters is composed / (A + B): the composition
evaluates both parents at every step, so it cannot be cheaper than their sum by much, and should
not be dearer (its overhead is a weighted sum per step). OR evaluates, per row, only the chosen
parent: at batch 1 one parent per chunk. For parents of one architecture it also times one network
evaluation of both in turn against one `torch.func.vmap` call over their stacked weights (the
ablation behind evaluating parents in turn; docs/design.md). Run on an idle machine:

    .venv/bin/python bench/gpc.py --pair lift tests/assets/gpc_lift/unet tests/assets/gpc_lift/transformer \
        --store runs/gpc/lift_heldout.zarr --results docs/results/gpc_latency.md
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from report import publish
from torch.func import functional_call, stack_module_state, vmap

from robomosaic.data.sampler import SequenceSampler
from robomosaic.data.store import EpisodeStore
from robomosaic.policies.checkpoint import load_policy
from robomosaic.policies.composition import ComposedPolicy
from robomosaic.policies.inference import history_batch
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


def network_step_times(a: Any, b: Any, h: dict[str, np.ndarray], reps: int) -> tuple[float, float] | None:
    """One network evaluation of both parents, in turn against as one `torch.func.vmap` call over
    their stacked weights (ms, median of `reps`), for parents of one architecture (else None).

    This is the ablation behind evaluating parents in turn: on the CPU at batch 1 the vmapped call
    is not faster (batched-weight convolutions and matmuls lose to two small dense ones)."""
    kind = a.config["network"]
    if kind != b.config["network"] or a.config[kind] != b.config[kind]:
        return None
    params, buffers = stack_module_state([a.network, b.network])
    skeleton = copy.deepcopy(a.network).to("meta")
    with torch.no_grad():
        obs = history_batch(h, list(a.obs_spec), a.n_obs_steps, torch.device("cpu"))
        cond_a, cond_b = a.encode(obs), b.encode(obs)
        conds = torch.stack([cond_a, cond_b])
        x, t = torch.randn(1, a.horizon, a.action_dim), torch.tensor([5.0])
        batched = vmap(lambda p, bu, c: functional_call(skeleton, (p, bu), (x, t, c)))
        calls = {
            "in turn": lambda: (a.network(x, t, cond_a), b.network(x, t, cond_b)),
            "vmap": lambda: batched(params, buffers, conds),
        }
        time_round_robin(calls, 10)
        times = time_round_robin(calls, reps)
    return times["in turn"], times["vmap"]


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
        rows.append((name, Path(path_a), Path(path_b), med, ratio, spread, network_step_times(a, b, h, 100)))
    load_after = os.getloadavg()

    lines = [
        "| pair | A (ms) | B (ms) | A + B | convex (ms) | convex / (A+B) | AND (ms) | AND / (A+B) "
        "| OR (ms) | OR / (A+B) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, pa, pb, med, ratio, spread, _ in rows:
        label = f"{name}: {pa.parent.name}/{pa.name} + {pb.parent.name}/{pb.name}"
        cells = [label, f"{med['A']:.1f}", f"{med['B']:.1f}", f"{med['A'] + med['B']:.1f}"]
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
    batching = [
        "",
        "Parents of one architecture evaluated as one batch (`torch.func.vmap` over their stacked weights) "
        "against in turn, one network evaluation of both parents (ms, median of 100, same run):",
        "",
        "| pair | in turn (ms) | vmap (ms) | vmap / in turn |",
        "|---|---|---|---|",
    ]
    for name, *_, step in rows:
        if step is None:
            batching.append(f"| {name} | - | - | different architectures: cannot be batched |")
        else:
            batching.append(f"| {name} | {step[0]:.2f} | {step[1]:.2f} | **{step[1] / step[0]:.2f}** |")
    text = "\n".join(header + lines + batching) + "\n"
    publish(text, args.results)


if __name__ == "__main__":
    main()
