"""MoDE on four tasks, side by side: success per task, and expert usage against the noise level.

Three policies trained on one multitask store (robomosaic-merge of lift, stack, door and pick_one,
100 scripted demonstrations each) with the same flow (EDM, DDIM in 10 steps), data and steps:

    MoDE          policy=mode: 4 SwiGLU experts of width 256 per layer, top-2 routed on the noise level
    dense         the same network with one SwiGLU of width 512: MoDE's active parameters per step
    token router  policy=mode policy.mode.router=token: the route chosen per token (the ablation)

Each is evaluated by robomosaic-eval on 50 seeds per task (1000000-1000049, disjoint from the
demonstrations). This script reads those reports, prints the table with MoDE's difference to each
variant in points, draws the router's top-k weights of every MoDE layer against sigma, and writes
docs/results/mode.md and mode_experts.png. The runs, as made for the results file:

    robomosaic-merge inputs=[demos/lift.zarr,demos/stack.zarr,demos/door.zarr,demos/pick_one.zarr] \\
        out=demos/multitask.zarr
    C="task=multitask flow=edm dataset=demos/multitask.zarr train.steps=5000 train.eval_every=0"
    robomosaic-train $C policy=mode out=runs/mt_mode
    robomosaic-train $C policy=mode out=runs/mt_dense policy.mode.num_experts=1 policy.mode.top_k=1 \\
        policy.mode.expert_hidden=512
    robomosaic-train $C policy=mode out=runs/mt_token policy.mode.router=token
    robomosaic-eval checkpoint=runs/mt_mode/last episodes=50 out=docs/results/eval_mt_mode.json  # etc.
    python bench/mode_multitask.py
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from robomosaic.policies.checkpoint import load_policy
from robomosaic.policies.networks import ModeDenoiser, MoEFeedForward

VARIANTS = {"mode": "MoDE (noise router)", "dense": "dense, equal active", "token": "token router"}
# policy.mode overrides of each variant (the training commands above)
OVERRIDES: dict[str, dict[str, Any]] = {
    "mode": {},
    "dense": {"num_experts": 1, "top_k": 1, "expert_hidden": 512},
    "token": {"router": "token"},
}


def load_reports(evals: dict[str, Path]) -> dict[str, dict[str, Any]]:
    reports = {}
    for name, path in evals.items():
        if not path.is_file():
            raise SystemExit(f"mode_multitask: {path} is missing: run robomosaic-eval for {name} first")
        report = json.loads(path.read_text())
        if "tasks" not in report:
            raise SystemExit(f"mode_multitask: {path} is not a multitask report (no 'tasks')")
        reports[name] = report
    tasks = [list(r["tasks"]) for r in reports.values()]
    if any(t != tasks[0] for t in tasks):
        raise SystemExit(f"mode_multitask: the reports cover different tasks: {tasks}")
    return reports


def variant(mode: Any, name: str, checkpoint: Path) -> Any:
    """The variant's policy: its checkpoint, or (for parameter counts only, when the checkpoint is
    gone) an untrained network built from MoDE's config with the variant's overrides."""
    if name == "mode":
        return mode
    if (checkpoint / "spec.json").is_file():
        return load_policy(checkpoint)
    print(f"{checkpoint} is missing: counting {name}'s parameters on an untrained network")
    config = {**mode.config, "mode": {**mode.config["mode"], **OVERRIDES[name]}}
    return type(mode)(config, mode.obs_spec, mode.action_spec, mode.normalizer)


def parameter_counts(policy: Any) -> tuple[int, int]:
    """(total, active per denoising step) parameters of the denoising network."""
    network = policy.network
    total = sum(p.numel() for p in network.parameters())
    inactive = 0
    for module in network.modules():
        if isinstance(module, MoEFeedForward):
            per_expert = module.w_in[0].numel() + module.w_out[0].numel()
            inactive += (module.num_experts - module.top_k) * per_expert
    return total, total - inactive


@torch.no_grad()
def expert_usage(policy: Any, sigmas: np.ndarray) -> np.ndarray:
    """Routing weights (layers, len(sigmas), experts) of a noise-routed MoDE network.

    The noise router reads only the noise embedding, so any chunk and observation give the same
    route; the uncached path records the weights it used in each layer's `last_combine`.
    """
    network: ModeDenoiser = policy.network
    if not network.is_sparse or network.router != "noise":
        raise ValueError("expert usage against sigma needs a sparse network with router='noise'")
    network.eval()
    cached, network.cache_enabled = network.cache_enabled, False
    sigma = torch.as_tensor(sigmas, dtype=torch.float32)
    x = torch.zeros(len(sigma), policy.horizon, policy.action_dim)
    cond = torch.zeros(len(sigma), network.cond_dim)
    policy.denoise(x, sigma, cond)
    network.cache_enabled = cached
    return np.stack([block.ffn.last_combine.numpy() for block in network.blocks])


def plot_usage(usage: np.ndarray, sigmas: np.ndarray, inference_sigmas: np.ndarray, path: Path) -> None:
    layers, _, experts = usage.shape
    fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3.0), sharey=True)
    colors = plt.get_cmap("tab10").colors
    for layer, ax in enumerate(np.atleast_1d(axes)):
        ax.stackplot(
            sigmas, usage[layer].T, colors=colors[:experts], labels=[f"expert {e}" for e in range(experts)]
        )
        for s in inference_sigmas:
            ax.axvline(s, color="k", lw=0.5, alpha=0.4)
        ax.set_xscale("log")
        ax.set_xlim(sigmas[0], sigmas[-1])
        ax.set_ylim(0, 1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("sigma")
    np.atleast_1d(axes)[0].set_ylabel("routing weight")
    np.atleast_1d(axes)[-1].legend(loc="upper right", fontsize=7)
    fig.suptitle("MoDE: top-2 routing weights against the noise level (lines: the 10 DDIM sigmas)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def route_changes(layer_usage: np.ndarray) -> int:
    """How often the set of selected experts changes along the sigma grid."""
    sets = [frozenset(np.flatnonzero(weights > 0)) for weights in layer_usage]
    return sum(a != b for a, b in itertools.pairwise(sets))


def percent(rate: float) -> str:
    return f"{100 * rate:.0f}%"


def table(reports: dict[str, dict[str, Any]], params: dict[str, tuple[int, int]]) -> list[str]:
    names = list(reports)
    tasks = list(reports[names[0]]["tasks"])
    header = "| task | " + " | ".join(VARIANTS[n] for n in names) + " | MoDE − dense | MoDE − token |"
    lines = [header, "|---" * (len(names) + 3) + "|"]

    def cell(result: dict[str, Any]) -> str:
        low, high = result["ci95"]
        return f"{result['successes']}/{len(result['per_episode'])} ({percent(low)}–{percent(high)})"

    def diff(a: float, b: float) -> str:
        return f"{100 * (a - b):+.0f}"

    for task in tasks:
        rates = {n: reports[n]["tasks"][task]["success_rate"] for n in names}
        cells = [cell(reports[n]["tasks"][task]) for n in names]
        lines.append(
            f"| {task} | " + " | ".join(cells) + f" | {diff(rates['mode'], rates['dense'])} "
            f"| {diff(rates['mode'], rates['token'])} |"
        )
    means = {n: reports[n]["mean_success_rate"] for n in names}
    lines.append(
        "| **mean** | "
        + " | ".join(f"**{100 * means[n]:.1f}%**" for n in names)
        + f" | **{100 * (means['mode'] - means['dense']):+.1f}** "
        f"| **{100 * (means['mode'] - means['token']):+.1f}** |"
    )
    lines.append(
        "| parameters, total / active (M) | "
        + " | ".join(f"{params[n][0] / 1e6:.2f} / {params[n][1] / 1e6:.2f}" for n in names)
        + " | | |"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, run in (("mode", "mt_mode"), ("dense", "mt_dense"), ("token", "mt_token")):
        parser.add_argument(f"--{name}", type=Path, default=Path(f"runs/{run}/last"), help="checkpoint")
        parser.add_argument(
            f"--{name}-eval", type=Path, default=Path(f"docs/results/eval_{run}.json"), help="eval report"
        )
    parser.add_argument(
        "--repeat-eval",
        type=Path,
        default=Path("docs/results/eval_mt_mode_first_run.json"),
        help="optional: the report of another MoDE run with the same command (run-to-run spread)",
    )
    parser.add_argument("--results", type=Path, default=Path("docs/results/mode.md"))
    args = parser.parse_args()
    reports = load_reports({n: getattr(args, f"{n}_eval") for n in VARIANTS})
    mode = load_policy(args.mode)
    params = {n: parameter_counts(variant(mode, n, getattr(args, n))) for n in VARIANTS}
    lines = table(reports, params)
    print("\n".join(lines))

    sigma_min, sigma_max = mode.process.sigma_min, mode.process.sigma_max
    sigmas = np.geomspace(sigma_min, sigma_max, 200)
    usage = expert_usage(mode, sigmas)
    inference = mode.process.sigmas(int(mode.config["steps"])).numpy()
    inference = inference[inference > 0]
    plot = args.results.with_name("mode_experts.png")
    plot_usage(usage, sigmas, inference, plot)
    # which experts each layer uses at the 10 inference sigmas, highest noise first
    routes = expert_usage(mode, inference)
    route_lines = [
        f"| {layer} | "
        + " | ".join(
            "+".join(str(e) for e in np.flatnonzero(routes[layer, i] > 0)) for i in range(len(inference))
        )
        + " |"
        for layer in range(routes.shape[0])
    ]
    sigma_header = " | ".join(f"{s:.3g}" for s in inference)
    switches = [route_changes(layer_usage) for layer_usage in usage]

    command_lines = [f"- {VARIANTS[n]}: `{reports[n]['command']}`" for n in VARIANTS]
    if args.repeat_eval.is_file():
        repeat = load_reports({"repeat": args.repeat_eval})["repeat"]
        per_task = ", ".join(f"{t} {percent(r['success_rate'])}" for t, r in repeat["tasks"].items())
        command_lines.append(
            f"- another MoDE run with the same command ({args.repeat_eval.name}; its checkpoint is "
            f"not kept): mean {percent(repeat['mean_success_rate'])} ({per_task}): the run-to-run "
            "spread of training on this CPU"
        )
    text = [
        "# MoDE on four tasks",
        "",
        "Written by `bench/mode_multitask.py` from the robomosaic-eval reports of three policies trained",
        "on one store of 400 scripted demonstrations (lift, stack, door, pick_one; 100 each; object state",
        "padded to 30 numbers and the task id as an observation). Same flow (EDM, DDIM-10), data, batch 128",
        "and 5000 steps for all three; 50 evaluation seeds per task (1000000–1000049); Wilson 95% intervals.",
        "",
        *lines,
        "",
        "Latency is not compared here: the evaluations ran at different times under different machine",
        "load. [mode_bench.md](mode_bench.md) times the variants side by side.",
        "",
        "Evaluations:",
        *command_lines,
        "",
        f"## Expert usage against the noise level ({plot.name})",
        "",
        f"![expert usage]({plot.name})",
        "",
        "The experts each layer uses at the 10 DDIM sigmas of inference (highest noise first):",
        "",
        f"| layer | {sigma_header} |",
        "|---" * (len(inference) + 1) + "|",
        *route_lines,
        "",
        "Changes of the top-2 set along 200 sigmas from "
        f"{sigma_min:g} to {sigma_max:g}, per layer: {switches}.",
        "",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(text) + "\n")
    print(f"wrote {args.results} and {plot}")


if __name__ == "__main__":
    main()
