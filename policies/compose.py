"""robomosaic-compose: compose trained policies at test time (GPC) and choose the weights by rollouts.

    robomosaic-compose 'checkpoints=[runs/a/best,runs/b/best]' weights=search out=runs/ab \
        heldout=demos/heldout.zarr

With `weights=search` every point of a weight grid (0.1 steps for two parents, the simplex grid of
that step for three or more) is scored by `selection_episodes` rollouts on the selection seeds; the
best point (ties: the lower held-out denoising error, then the more even weights) is saved as the
composed checkpoint `out/composed`, and it and every parent are evaluated on `report_episodes`
rollouts on the report seeds, a range disjoint from the selection seeds (both recorded in the json).
The reference GPC code chooses and reports weights on the same seeds, which overstates the gain.

`out/compose.json` holds every finished evaluation and is written after each one: a run that is
stopped continues where it was with the same command (`out/compose.md`: the same as tables).
`out/compose.png` plots success against the weight with Wilson intervals and, given
`heldout=<store>`, the held-out denoising error of the composed denoiser against the weight (the
paper's argument: the error is convex in the weights, so a mixture of two parents can denoise
better than either).
"""

from __future__ import annotations

import itertools
import json
import math
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from robomosaic.conf.console import console_script
from robomosaic.data.sampler import SequenceSampler
from robomosaic.data.store import EpisodeStore
from robomosaic.policies.checkpoint import load_policy
from robomosaic.policies.composition import ComposedPolicy
from robomosaic.policies.evaluate import evaluate
from robomosaic.policies.inference import CompositionError, shared_schedule
from robomosaic.sim.measure_experts import machine


def weight_grid(n: int, step: float) -> list[tuple[float, ...]]:
    """Every weight vector of `n` non-negative multiples of `step` summing to 1, first parent's
    weight descending ((1, 0) first for two parents)."""
    parts = round(1 / step)
    if n < 2 or parts < 1 or not math.isclose(parts * step, 1.0):
        raise CompositionError(f"grid_step={step} must divide 1, for n >= 2 parents (got {n})")
    grid = [c for c in itertools.product(range(parts, -1, -1), repeat=n) if sum(c) == parts]
    return [tuple(round(k / parts, 10) for k in c) for c in grid]


def two_proportion_test(k1: int, n1: int, k2: int, n2: int) -> dict[str, float]:
    """Pooled two-proportion z-test of p1 > p2: z, one-sided and two-sided p-values."""
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    z = 0.0 if se == 0 else (k1 / n1 - k2 / n2) / se
    return {
        "z": z,
        "p_one_sided": 0.5 * math.erfc(z / math.sqrt(2)),
        "p_two_sided": math.erfc(abs(z) / math.sqrt(2)),
    }


@torch.no_grad()
def heldout_errors(
    parents: Sequence[Any],
    grid: Sequence[Sequence[float]],
    operator: str,
    store_path: str | Path,
    windows: int,
    seed: int = 0,
) -> list[float]:
    """Mean squared error in normalized action units of the composed x0_hat on held-out windows,
    for each weight vector of `grid`, at the noise levels of the shared schedule (fixed noise)."""
    uniform = ComposedPolicy(parents, [1 / len(parents)] * len(parents))
    store = EpisodeStore.open(store_path, mode="r", in_memory=True)
    sampler = SequenceSampler(
        store, list(uniform.obs_spec), ("action",), uniform.horizon, uniform.n_obs_steps
    )
    rng = np.random.default_rng(seed)
    index = rng.choice(len(sampler), size=min(windows, len(sampler)), replace=False)
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sampler.sample_batch(index).items()}
    obs = {k: batch[k] for k in uniform.obs_spec}
    bound, _ = uniform.bind_parents(obs)
    a = bound[0].action_space.normalize(batch["action"].float())
    sigmas = shared_schedule([b.process for b in bound], bound[0].process, bound[0].steps)[:-1]
    generator = torch.Generator().manual_seed(seed)
    errors = np.zeros(len(grid))
    for sigma in sigmas:
        x = a + float(sigma) * torch.randn(a.shape, generator=generator)
        s = torch.full((a.shape[0],), float(sigma))
        x0 = torch.stack([b(x, s) for b in bound])  # (N, B, H, D)
        for g, w in enumerate(grid):
            wt = torch.tensor(w, dtype=x0.dtype).reshape(-1, 1, 1, 1)
            if operator == "or":  # the mixture's expected error: each row follows one parent
                errors[g] += float((wt * ((x0 - a) ** 2).mean((1, 2, 3), keepdim=True)).sum())
                continue
            combined = (wt * x0).sum(0)
            if operator == "and":
                combined = combined + (1 - sum(w)) * x
            errors[g] += float(((combined - a) ** 2).mean())
    return (errors / len(sigmas)).tolist()


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["search"]
    names = result["parents"]
    two = len(names) == 2
    x = [p["weights"][1] if two else i for i, p in enumerate(points)]
    rate = np.array([p["success_rate"] for p in points])
    low = rate - np.array([p["ci95"][0] for p in points])
    high = np.array([p["ci95"][1] for p in points]) - rate
    panels = 2 if result.get("heldout_error") else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    ax.errorbar(x, rate, yerr=[low, high], fmt="o-", capsize=3, label="selection seeds")
    report = result.get("report", {})
    if two and report:  # the parents sit at weight 0 and 1, the composition at its chosen weight
        where = {names[0]: 0.0, names[1]: 1.0, "composed": result["chosen_weights"][1]}
        arms = [n for n in where if n in report]
        r = np.array([report[n]["success_rate"] for n in arms])
        ci = np.array([report[n]["ci95"] for n in arms])
        ax.errorbar(
            [where[n] for n in arms], r, yerr=[r - ci[:, 0], ci[:, 1] - r], fmt="D", color="tab:orange",
            capsize=3, label=f"report seeds ({result['settings']['report']['episodes']} each)",
        )  # fmt: skip
        ax.legend(loc="lower center")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(f"success rate (Wilson 95 %; {result['settings']['selection']['episodes']} per grid point)")
    xlabel = f"weight of {names[1]} (1 - weight of {names[0]})" if two else "grid point (see compose.json)"
    ax.set_xlabel(xlabel)
    ax.set_title(f"{result['task']}: {result['operator']} composition")
    if panels == 2:
        ax = axes[0, 1]
        ax.plot(x, result["heldout_error"]["mse"], "s-", color="tab:red")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out denoising MSE (normalized actions)")
        ax.set_title(f"{result['heldout_error']['windows']} held-out windows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    """The report as a markdown table: every arm on the report seeds, with the test against it."""
    settings = result["settings"]
    rep, sel = settings["report"], settings["selection"]
    lines = [
        f"`{result['command']}`",
        "",
        f"{result['task']}, operator {result['operator']}, chosen weights {result['chosen_weights']}"
        + (f" on {sel['episodes']} selection seeds from {sel['seed_offset']}" if result["search"] else "")
        + f"; report seeds {rep['seed_offset']}..{rep['seed_offset'] + rep['episodes'] - 1}; "
        + result["machine"],
        "",
        "| arm | success | 95 % interval | behaviours | ms per chunk (median) | composed - arm: z "
        "| p (one-sided) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["report"].items():
        t = result["tests"].get(name)
        behaviours = ", ".join(f"{k} {v}" for k, v in r["behaviours"].items()) or "-"
        latency = f"{r['inference_ms']['median']:.1f}" if r.get("inference_ms") else "-"
        lines.append(
            f"| {name} | {r['successes']}/{rep['episodes']} ({r['success_rate']:.1%}) | "
            f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} | {behaviours} | {latency} | "
            + (f"{t['z']:.2f} | {t['p_one_sided']:.3g} |" if t else "| |")
        )
    if result["search"]:
        mse = result.get("heldout_error", {}).get("mse")
        lines += ["", "| weights | selection success | held-out denoising MSE |", "|---|---|---|"]
        for i, point in enumerate(result["search"]):
            lines.append(
                f"| {point['weights']} | {point['successes']}/{sel['episodes']} | "
                + (f"{mse[i]:.4f} |" if mse else "- |")
            )
    return "\n".join(lines) + "\n"


@console_script("robomosaic-compose")
def main(argv: list[str]) -> None:
    from robomosaic.conf import compose

    cfg = compose("compose", argv)
    run(cfg, shlex.join(["robomosaic-compose", *argv]))


def run(cfg: Any, command: str) -> dict[str, Any]:
    paths = [Path(p) for p in cfg.checkpoints]
    if len(paths) < 2:
        raise CompositionError(f"checkpoints={list(cfg.checkpoints)}: compose needs at least two")
    parents = [load_policy(p) for p in paths]
    names = [f"{p.parent.name}/{p.name}" for p in paths]
    task = cfg.task or json.loads((paths[0] / "spec.json").read_text()).get("task")
    if not task:
        raise CompositionError(f"{paths[0] / 'spec.json'} names no task: pass task=<name>")
    search = isinstance(cfg.weights, str)
    if search and cfg.weights != "search":
        raise CompositionError(f"weights={cfg.weights!r}: 'search' or a list of {len(paths)} numbers")
    grid = weight_grid(len(paths), float(cfg.grid_step)) if search else [tuple(float(w) for w in cfg.weights)]
    ComposedPolicy(parents, grid[0], cfg.operator, int(cfg.corrector_steps), names)  # refuse early
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "compose.json"
    settings = {
        "checkpoints": [str(p) for p in paths],
        "operator": cfg.operator,
        "corrector_steps": int(cfg.corrector_steps),
        "task": task,
        "seed": int(cfg.seed),
        "grid": [list(w) for w in grid],
        "selection": {"episodes": int(cfg.selection_episodes), "seed_offset": int(cfg.selection_seed_offset)},
        "report": {"episodes": int(cfg.report_episodes), "seed_offset": int(cfg.report_seed_offset)},
        "max_steps": cfg.max_steps,
    }
    result: dict[str, Any] = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if result and result.get("settings") != settings:
        raise CompositionError(
            f"{state_file} was written by a run with other settings ({result.get('settings')}); "
            "use another out= or delete the file"
        )
    result.update(
        command=command, settings=settings, task=task, operator=cfg.operator, parents=names, machine=machine()
    )
    result.setdefault("search", [])
    sel = cfg.selection_seed_offset, cfg.selection_seed_offset + cfg.selection_episodes
    rep = cfg.report_seed_offset, cfg.report_seed_offset + cfg.report_episodes
    if search and max(sel[0], rep[0]) < min(sel[1], rep[1]):
        raise CompositionError(f"selection seeds {sel} and report seeds {rep} overlap")

    def save() -> None:
        state_file.write_text(json.dumps(result, indent=2) + "\n")

    def score(policy: Any, episodes: int, seed_offset: int) -> dict[str, Any]:
        r = evaluate(
            policy, task=task, episodes=episodes, seed_offset=seed_offset, workers=int(cfg.workers),
            seed=int(cfg.seed), max_steps=cfg.max_steps, progress=False,
        )  # fmt: skip
        keep = ("successes", "success_rate", "ci95", "mean_length", "behaviours", "wall_time_s")
        return {**{k: r[k] for k in keep}, "inference_ms": r["executor"]["inference_ms"]}

    def composed(weights: Sequence[float]) -> ComposedPolicy:
        return ComposedPolicy(parents, weights, cfg.operator, int(cfg.corrector_steps), names)

    if cfg.heldout and "heldout_error" not in result:
        mse = heldout_errors(
            parents, grid, cfg.operator, cfg.heldout, int(cfg.heldout_windows), int(cfg.seed)
        )
        result["heldout_error"] = {"store": str(cfg.heldout), "windows": int(cfg.heldout_windows), "mse": mse}
        save()
    done = {tuple(p["weights"]) for p in result["search"]}
    if search:
        todo = [w for w in grid if w not in done]
        for w in tqdm(
            todo, desc="compose: weight grid", disable=not cfg.progress, initial=len(done), total=len(grid)
        ):
            scored = score(composed(w), int(cfg.selection_episodes), int(cfg.selection_seed_offset))
            result["search"].append({"weights": list(w), **scored})
            save()
        result["search"].sort(key=lambda p: grid.index(tuple(p["weights"])))
        mse = result.get("heldout_error", {}).get("mse", [0.0] * len(grid))
        best = max(
            range(len(grid)), key=lambda i: (result["search"][i]["success_rate"], -mse[i], min(grid[i]))
        )
        chosen = list(grid[best])
    else:
        chosen = list(grid[0])
    result["chosen_weights"] = chosen
    policy = composed(chosen)
    policy.save(out / "composed", paths, task=task)
    arms = [("composed", policy)] + (
        [(n, p) for n, p in zip(names, parents, strict=True)] if cfg.report_parents else []
    )
    result.setdefault("report", {})
    if result["report"].get("composed", {}).get("weights", chosen) != chosen:
        result["report"] = {}  # another choice than the one reported before: report again
    for name, arm in tqdm(arms, desc="compose: report", disable=not cfg.progress):
        if name not in result["report"]:
            result["report"][name] = {**score(arm, int(cfg.report_episodes), int(cfg.report_seed_offset)),
                                      **({"weights": chosen} if name == "composed" else {})}  # fmt: skip
            save()
    c = result["report"]["composed"]
    result["tests"] = {
        name: two_proportion_test(c["successes"], cfg.report_episodes, r["successes"], cfg.report_episodes)
        for name, r in result["report"].items()
        if name != "composed"
    }
    save()
    (out / "compose.md").write_text(markdown(result))
    if search:
        plot(out / "compose.png", result)
    for name, r in result["report"].items():
        p = result["tests"].get(name)
        print(
            f"{name:>24}: {r['successes']}/{cfg.report_episodes} ({r['success_rate']:.0%}, "
            f"95% [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}])"
            + (f"  composed - this: z={p['z']:.2f}, p(one-sided)={p['p_one_sided']:.3g}" if p else "")
        )
    print(f"chosen weights {chosen}; wrote {out / 'composed'} and {state_file}")
    return result


if __name__ == "__main__":
    main()
