"""Per-chunk inference latency and training throughput of `DenoisingPolicy` on the CPU.

Builds policies with random weights (latency does not depend on training) for the lift task's
state observations (robot0_eef_pos 3, robot0_eef_quat 4, robot0_gripper_qpos 2, object 10;
action 7; horizon 16, n_obs_steps 2) and measures, side by side in one run at batch 1:

    networks   U-Net [32,64,128] (our CPU default), U-Net [256,512,1024] (diffusion_policy's),
               transformer d_model 128 depth 4, transformer d_model 256 depth 6
    schedules  DDPM-100 (ddpm process, deterministic ddim sampler over all 100 steps),
               DDIM-10 (ddpm process, 10 steps), flow-10 (flow process, euler, 10 steps)

the median latency per chunk over repeated calls after warm-up, against
  - the memory-bandwidth floor: network weight bytes read per chunk / measured copy bandwidth
    (models under ~8M fp32 parameters stay in the 32 MB L3 cache, so this floor does not bind them);
  - a naive loop that re-encodes the observations inside every denoising step.
Then training throughput (samples/s of forward + backward + AdamW step at batch 128). Run:

    .venv/bin/python bench/inference.py --results docs/results/inference.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robomosaic.data.normalizer import Normalizer
from robomosaic.data.spec import KeySpec
from robomosaic.policies.denoising_policy import DenoisingPolicy
from robomosaic.policies.samplers import sample

OBS = {
    "robot0_eef_pos": KeySpec((3,), "float64"),
    "robot0_eef_quat": KeySpec((4,), "float64"),
    "robot0_gripper_qpos": KeySpec((2,), "float64"),
    "object": KeySpec((10,), "float64"),
}
ACTION = KeySpec((7,), "float32")
HORIZON, N_OBS = 16, 2
L3_BYTES = 32 * 2**20

NETWORKS: dict[str, dict[str, Any]] = {
    "U-Net [32,64,128]": {"network": "unet", "unet": {"down_dims": [32, 64, 128]}},
    "U-Net [256,512,1024]": {"network": "unet", "unet": {"down_dims": [256, 512, 1024]}},
    "transformer 128x4": {
        "network": "transformer",
        "transformer": {"d_model": 128, "depth": 4, "n_heads": 4},
    },
    "transformer 256x6": {
        "network": "transformer",
        "transformer": {"d_model": 256, "depth": 6, "n_heads": 8},
    },
}
# name -> (process, sampler, steps); each step is one network evaluation
SCHEDULES = {
    "DDPM-100": ("ddpm", "ddim", 100),
    "DDIM-10": ("ddpm", "ddim", 10),
    "flow-10": ("flow", "euler", 10),
}
# (network, batch): the CPU defaults at our training batch, the 64M U-Net at LeRobot's anchor batch
TRAINING = (("U-Net [32,64,128]", 128), ("transformer 128x4", 128), ("U-Net [256,512,1024]", 64))


def normalizer() -> Normalizer:
    stats = {
        k: {"min": -np.ones(s.shape), "max": np.ones(s.shape)} for k, s in {**OBS, "action": ACTION}.items()
    }
    return Normalizer({k: "minmax" for k in stats}, stats)


def build(network: str, process: str = "ddpm", sampler: str = "ddim") -> DenoisingPolicy:
    config = {"horizon": HORIZON, "n_obs_steps": N_OBS, **NETWORKS[network], "process": {"name": process}}
    config["sampler"] = sampler
    torch.manual_seed(0)
    return DenoisingPolicy(config, OBS, ACTION, normalizer()).eval()


def observations(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.rand(batch, N_OBS, *s.shape, generator=g) * 2 - 1 for k, s in OBS.items()}


def naive_sample(
    policy: DenoisingPolicy, obs: Mapping[str, torch.Tensor], steps: int, sampler: str
) -> torch.Tensor:
    """The same chunk, but encoding the observations again inside every denoising step."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, _cond: Any) -> torch.Tensor:
        return policy.denoise(x, sigma, policy.encode(obs))

    with torch.no_grad():
        x = sample(denoise, (1, HORIZON, ACTION.shape[0]), None, steps, policy.process, sampler)
        return policy.normalizer.unnormalize(x, "action")


def interleaved_median_ms(
    fns: tuple[Callable[[], Any], ...], budget_s: float, max_repeats: int = 30
) -> tuple[list[float], int]:
    """Median wall times (ms) of several functions timed in turn (so load changes hit all alike)
    after one warm-up call each. Repeats fit in `budget_s`: at least 3 unless one call takes > 5 s."""
    warm = 0.0
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        warm = max(warm, time.perf_counter() - t0)
    repeats = 1 if warm > 5.0 else max(3, min(max_repeats, int(budget_s / (len(fns) * warm))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(ts) for ts in times], repeats


def copy_bandwidth(n_bytes: int = 512 * 2**20) -> float:
    """Bytes read + written per second of a large torch copy (median of 5)."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n_bytes / statistics.median(times)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Row:
    network: str
    schedule: str
    threads: int
    params: int
    ms: float
    repeats: int
    floor_ms: float
    naive_ms: float
    fast_ms: float

    @property
    def cached(self) -> bool:
        return 4 * self.params < L3_BYTES  # ~8M fp32 parameters


def measure(network: str, schedule: str, bandwidth: float, budget_s: float, threads: int) -> Row:
    process, sampler, steps = SCHEDULES[schedule]
    torch.set_num_threads(threads)
    policy = build(network, process, sampler)
    fast = build(network, process, sampler).use_backend("auto")  # the same weights (seeded)
    obs = observations(1)
    (ms, naive, fast_ms), repeats = interleaved_median_ms(
        (
            lambda: policy.sample_actions(obs, steps=steps, sampler=sampler),
            lambda: naive_sample(policy, obs, steps, sampler),
            lambda: fast.sample_actions(obs, steps=steps, sampler=sampler),
        ),
        budget_s,
    )
    params = n_params(policy.network)
    floor = 1e3 * params * 4 * steps / bandwidth
    return Row(network, schedule, threads, params, ms, repeats, floor, naive, fast_ms)


def train_throughput(network: str, batch: int = 128, warmup: int = 2, steps: int = 5) -> tuple[int, float]:
    policy = build(network).train()
    data = {"obs": observations(batch), "action": torch.rand(batch, HORIZON, ACTION.shape[0]) * 2 - 1}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = policy(data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return n_params(policy), batch / statistics.median(times)


def table(rows: list[Row]) -> str:
    lines = [
        "| network | params | schedule | threads | eager ms/chunk | repeats | DRAM floor ms | eager vs floor "
        "| naive ms | eager vs naive | fast ms/chunk | eager / fast |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs_floor = f"{r.ms / r.floor_ms:.1f}x" + (" (in L3)" if r.cached else "")
        lines.append(
            f"| {r.network} | {r.params / 1e6:.2f}M | {r.schedule} | {r.threads} | {r.ms:.1f} "
            f"| {r.repeats} | {r.floor_ms:.2f} | {vs_floor} | {r.naive_ms:.1f} | {r.naive_ms / r.ms:.2f}x "
            f"| {r.fast_ms:.1f} | {r.ms / r.fast_ms:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="write the markdown report here")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed calls per measurement")
    parser.add_argument("--skip-large-ddpm100", action="store_true", help="skip the 64M U-Net at DDPM-100")
    args = parser.parse_args()
    load_before = os.getloadavg()
    started = time.perf_counter()
    torch.set_num_threads(1)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (1 thread, read+write): {bandwidth / 1e9:.1f} GB/s", flush=True)
    policy, obs = build("U-Net [32,64,128]"), observations(1)
    with torch.no_grad():
        (encode_ms,), _ = interleaved_median_ms((lambda: policy.encode(obs),), 0.5)
    print(f"encode (batch 1, the same encoder for every network): {encode_ms:.2f} ms", flush=True)
    rows: list[Row] = []
    for network in NETWORKS:
        for schedule in SCHEDULES:
            if args.skip_large_ddpm100 and network == "U-Net [256,512,1024]" and schedule == "DDPM-100":
                continue
            rows.append(measure(network, schedule, bandwidth, args.budget, threads=1))
            r = rows[-1]
            print(
                f"{network:22s} {schedule:8s} {r.ms:9.1f} ms  (x{r.repeats})  floor {r.floor_ms:7.2f} ms  "
                f"naive {r.naive_ms:9.1f} ms  fast {r.fast_ms:9.1f} ms  eager / fast {r.ms / r.fast_ms:.2f}x",
                flush=True,
            )
    rows.append(measure("U-Net [256,512,1024]", "DDIM-10", bandwidth, args.budget, threads=2))
    r = rows[-1]
    print(f"2 threads: U-Net [256,512,1024] DDIM-10 {r.ms:.1f} ms, fast {r.fast_ms:.1f} ms", flush=True)
    torch.set_num_threads(1)
    training = {}
    for network, batch in TRAINING:
        training[network, batch] = train_throughput(network, batch)
        print(f"training {network}: {training[network, batch][1]:.0f} samples/s (batch {batch})", flush=True)
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - started
    print()
    print(table(rows))
    if args.results:
        write_report(args.results, rows, training, bandwidth, encode_ms, load_before, load_after, elapsed)
        print(f"wrote {args.results}")


def write_report(
    path: Path,
    rows: list[Row],
    training: dict[tuple[str, int], tuple[int, float]],
    bandwidth: float,
    encode_ms: float,
    load_before: tuple[float, ...],
    load_after: tuple[float, ...],
    elapsed: float,
) -> None:
    large = {(r.schedule, r.threads): r for r in rows if r.network == "U-Net [256,512,1024]"}
    train_lines = "\n".join(
        f"| {name} | {params / 1e6:.2f}M | {batch} | {rate:.0f} |"
        for (name, batch), (params, rate) in training.items()
    )
    anchors = []
    for schedule, ref in (("DDIM-10", "475 ms"), ("DDPM-100", "4.9 s")):
        for threads in (1, 2):
            if (schedule, threads) in large:
                ours = large[schedule, threads].ms
                anchors.append(f"{schedule} {ours:.0f} ms at {threads} thread(s) vs LeRobot {ref}")
    one, two = large.get(("DDIM-10", 1)), large.get(("DDIM-10", 2))
    two_vs_one = f"{two.ms / one.ms:.2f}x the time at" if one and two else "no comparison with"
    text = f"""# Inference latency and training throughput (CPU)

- date: {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()} \
{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}
- load average (1/5/15 min) before: {" ".join(f"{x:.2f}" for x in load_before)}, \
after: {" ".join(f"{x:.2f}" for x in load_after)}
- command: `{shlex.join([".venv/bin/python", *sys.argv])}` ({elapsed:.0f} s)
- copy bandwidth (torch copy of 512 MB, bytes read + written, 1 thread): {bandwidth / 1e9:.1f} GB/s

Batch 1, random weights, lift state observations (19 numbers x 2 steps), action chunk 16 x 7.
Median wall time per chunk of `DenoisingPolicy.sample_actions` after one warm-up call: "eager" on
plain PyTorch, "fast" on the fast inference path (the denoiser network in ONNX Runtime, the default
for loaded checkpoints; same weights), "naive" the eager sampler with `policy.encode(obs)` called
inside every denoising step instead of once per chunk; the three are timed in turn. "DRAM floor" =
network parameters x 4 bytes x network evaluations / copy bandwidth; networks under ~8M parameters
(32 MB) stay in the L3 cache, so that floor does not bind them ("in L3").

{table(rows)}

Training throughput (forward + backward + AdamW step of `policy(batch)`, 1 thread, median of 5
steps after 2 warm-up steps):

| network | params (policy) | batch | samples/s |
|---|---:|---:|---:|
{train_lines}

## Notes

- Anchors (../shared/REFERENCES.md, LeRobot 0.4.4 DiffusionPolicy, state-only, horizon 16, batch 1):
  U-Net [256,512,1024] 63.5M, DDIM-10 475 ms per chunk, DDPM-100 4.9 s; training (63.5M, batch 64)
  67 samples/s. Our eager U-Net of the same widths: {"; ".join(anchors)}. These anchors come from
  another session's machine; docs/results/vs_lerobot.md times LeRobot side by side in one run.
- DDPM-100 here is the ddpm process sampled deterministically (ddim sampler, eta 0) over all 100
  training steps: the same number of network evaluations as DDPM's ancestral sampling.
- Encoding once per chunk: one `encode` of these state observations took {encode_ms:.2f} ms at batch
  1 in this run, small against one denoiser evaluation, so "eager vs naive" is close to 1 (values
  below 1 are noise). The saving grows with image encoders, which cost far more than a denoiser call.
- The eager networks under ~8M parameters are far above the DRAM floor: their weights sit in cache
  and a batch-1 call is a few hundred small ops (the U-Net's conv1d runs torch's im2col path on this
  CPU), so their latency is per-op overhead, not weight traffic; that overhead is what the fast path
  removes. At 2 threads the 64M U-Net's DDIM-10 took {two_vs_one} 1 thread.
- Treat differences under ~10% as noise even on an idle machine (see the load averages).
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
