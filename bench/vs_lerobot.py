"""LeRobot 0.4.4's DiffusionPolicy against our DenoisingPolicy on the CPU, timed side by side in one run.

    .venv/bin/python bench/vs_lerobot.py [--lerobot-venv .cache/lerobot] [--train-one-thread]
    .venv/bin/python bench/vs_lerobot.py --quick --sizes small --results /tmp/vs.md   # a smoke run

Writes docs/results/vs_lerobot.md (or --results).

LeRobot pins another torch, so each system runs in its own venv and process
(bench/vs_lerobot_worker.py; LeRobot's venv is created on first use as in bench/lerobot_roundtrip.py)
and this script sends both the same requests, alternating them round by round so that load changes
on the shared machine hit both alike. The configuration is equal on both sides (the worker's
docstring lists it) and the run stops if the two parameter counts differ.

What is timed per chunk (batch 1, eval mode, torch.no_grad, after 2 warm-up calls):
  - LeRobot: `postprocessor(policy.diffusion.generate_actions(preprocessor(obs)))`. In 0.4.4 the
    normalization lives in the processor pipelines, and `predict_action_chunk` reads the history from
    the queues that `select_action` fills, so `generate_actions` on a batch of histories, between the
    pipelines, is the chunk prediction a user's `select_action` pays once per chunk: normalize,
    concatenate the states, 10 DDIM steps, unnormalize.
  - ours: `policy.sample_actions(obs)`: normalize, encode (the same concatenation), 10 DDIM steps,
    unnormalize; with `use_backend("auto")` (our fast path) and, as a third column, "eager".
Training throughput: samples/s of one optimizer step (forward loss, backward, clipping, step) after
2 warm-up steps, each side as its trainer does it. Physical floors of this machine (read bandwidth,
matmul peak) are measured in this process in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from lerobot_roundtrip import lerobot_python
from report import publish

from robomosaic.policies.precision import bf16_supported
from robomosaic.sim.measure_experts import machine

ROOT = Path(__file__).parents[1]
WORKER = ROOT / "bench" / "vs_lerobot_worker.py"
SIZES = {"small": (32, 64, 128), "medium": (64, 128, 256), "large": (256, 512, 1024)}
THREADS = (1, 2)
# (size, batch, threads) of the training rows; --train-one-thread adds the medium net at 1 thread
TRAINING = (("medium", 256, 2), ("large", 64, 2))
INFERENCE_STEPS = 10  # denoiser calls per chunk
L3_BYTES = 32 * 2**20  # this machine's L3: weights under it are not read from DRAM at every call
READ_BYTES = 256 * 2**20
MAX_REPEATS = 50
LEROBOT, OURS, EAGER = "LeRobot", "ours", "ours eager"


@dataclass(frozen=True)
class Effort:
    rounds: int
    request_s: float  # wall time of one infer request (k chunks) per system
    train_steps: int  # timed steps per train request
    matmul_n: int
    floor_repeats: int


FULL = Effort(rounds=5, request_s=0.6, train_steps=5, matmul_n=4096, floor_repeats=3)
QUICK = Effort(rounds=1, request_s=0.15, train_steps=1, matmul_n=2048, floor_repeats=2)


class WorkerError(RuntimeError):
    pass


class Worker:
    """One worker process (bench/vs_lerobot_worker.py) speaking JSON lines."""

    def __init__(self, name: str, python: Path, system: str, backend: str) -> None:
        self.name, self.backend = name, backend
        self.built: dict[str, Any] = {}  # the last build's answer
        command = [str(python), str(WORKER), "--system", system]
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )

    def request(self, cmd: str, **fields: Any) -> dict[str, Any]:
        request = {"cmd": cmd, **fields}
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise WorkerError(
                f"the {self.name} worker exited (code {self.proc.poll()}) on request {request}; "
                "its traceback is on stderr above"
            )
        answer = json.loads(line)
        if "error" in answer:
            raise WorkerError(f"the {self.name} worker failed on request {request}: {answer['error']}")
        return answer

    def build(self, dims: Sequence[int], threads: int) -> dict[str, Any]:
        self.built = self.request("build", down_dims=list(dims), threads=threads, backend=self.backend)
        return self.built

    def close(self) -> None:
        """Ask the worker to exit; kill it if it does not within 5 s (e.g. stuck in a request)."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- physical floors, measured in this process ---------------------------------------------------
def median_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(threads: int, repeats: int) -> float:
    """Bytes/s of a torch sum over a 256 MB fp32 tensor."""
    torch.set_num_threads(threads)
    x = torch.ones(READ_BYTES // 4)
    return READ_BYTES / median_s(x.sum, repeats)


def matmul_peak(threads: int, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of an n x n matrix product."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / median_s(lambda: a @ b, repeats)


@dataclass
class Floors:
    bandwidth: dict[int, float]  # threads -> bytes/s
    matmul: dict[tuple[str, int], float]  # (dtype, threads) -> FLOP/s
    matmul_n: int

    def chunk_ms(self, params: int, flops: int, threads: int) -> float:
        """fp32 floor of one chunk: weight reads (if they spill the L3) or arithmetic, whichever binds."""
        compute = INFERENCE_STEPS * flops / self.matmul["fp32", threads]
        weights = 4 * params
        memory = INFERENCE_STEPS * weights / self.bandwidth[threads] if weights > L3_BYTES else 0.0
        return 1e3 * max(compute, memory)


def measure_floors(effort: Effort) -> Floors:
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if bf16_supported("cpu") else {})}
    floors = Floors({}, {}, effort.matmul_n)
    for threads in THREADS:
        floors.bandwidth[threads] = read_bandwidth(threads, effort.floor_repeats)
        line = f"floors at {threads} thread(s): read {floors.bandwidth[threads] / 1e9:.1f} GB/s"
        for name, dtype in dtypes.items():
            floors.matmul[name, threads] = matmul_peak(threads, dtype, effort.matmul_n, effort.floor_repeats)
            line += f", {name} matmul {floors.matmul[name, threads] / 1e9:.0f} GFLOP/s"
        print(line, flush=True)
    return floors


# -- measurements -------------------------------------------------------------------------------
def context() -> str:
    """What to read beside every table: the load now, the machine and its bf16 units."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    units = f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}"
    return f"load average (1/5/15 min) {load}; {machine()}; {units}"


def build_all(workers: Sequence[Worker], size: str, threads: int) -> dict[str, dict[str, Any]]:
    """Builds every worker's policy; stops the run unless LeRobot's and ours have equal parameters."""
    builds = {w.name: w.build(SIZES[size], threads) for w in workers}
    theirs, ours = builds[LEROBOT], builds[OURS]
    if theirs["params"] != ours["params"]:
        raise SystemExit(
            f"U-Net {list(SIZES[size])}: parameter counts differ, LeRobot {theirs['params']:,} vs ours "
            f"{ours['params']:,}; the configurations are not equal, not timing"
        )
    if theirs["flops"] != ours["flops"]:
        print(f"  warning: FLOPs per call differ, LeRobot {theirs['flops']:,} vs ours {ours['flops']:,}")
    return builds


def interleaved(
    workers: Sequence[Worker], rounds: int, request: Callable[[Worker], list[float]], unit: str
) -> dict[str, list[float]]:
    """Rounds of one request per worker, the order reversed every other round; prints the running medians."""
    values: dict[str, list[float]] = {w.name: [] for w in workers}
    for r in range(rounds):
        for worker in workers if r % 2 == 0 else list(reversed(workers)):
            values[worker.name] += request(worker)
        medians = ", ".join(f"{name} {statistics.median(v):.1f}" for name, v in values.items())
        print(f"  round {r + 1}/{rounds}: {medians} {unit}", flush=True)
    return values


@dataclass
class InferRow:
    size: str
    threads: int
    params: int
    flops: int
    ms: dict[str, list[float]]
    floor_ms: float

    def median(self, name: str) -> float:
        return statistics.median(self.ms[name])


def infer_row(workers: Sequence[Worker], size: str, threads: int, effort: Effort, floors: Floors) -> InferRow:
    builds = build_all(workers, size, threads)
    repeats = {
        name: max(1, min(MAX_REPEATS, int(1e3 * effort.request_s / b["warmup_ms"])))
        for name, b in builds.items()
    }
    print(
        f"U-Net {list(SIZES[size])}, {threads} thread(s), {builds[OURS]['params']:,} parameters", flush=True
    )
    ms = interleaved(
        workers, effort.rounds, lambda w: w.request("infer", repeats=repeats[w.name])["ms"], "ms"
    )
    params, flops = builds[OURS]["params"], builds[OURS]["flops"]
    row = InferRow(size, threads, params, flops, ms, floors.chunk_ms(params, flops, threads))
    ours = row.median(OURS)
    print(
        f"  LeRobot / ours {row.median(LEROBOT) / ours:.2f}x, LeRobot / ours eager "
        f"{row.median(LEROBOT) / row.median(EAGER):.2f}x, ours vs fp32 floor {ours / row.floor_ms:.1f}x",
        flush=True,
    )
    return row


@dataclass
class TrainRow:
    size: str
    batch: int
    threads: int
    params: int
    rates: dict[str, list[float]]
    precision: dict[str, str]

    def median(self, name: str) -> float:
        return statistics.median(self.rates[name])


def train_row(workers: Sequence[Worker], size: str, batch: int, threads: int, effort: Effort) -> TrainRow:
    builds = build_all(workers, size, threads)
    print(f"training U-Net {list(SIZES[size])}, batch {batch}, {threads} thread(s)", flush=True)
    rates = interleaved(
        workers,
        effort.rounds,
        lambda w: w.request("train", batch=batch, steps=effort.train_steps)["samples_per_s"],
        "samples/s",
    )
    row = TrainRow(
        size, batch, threads, builds[OURS]["params"], rates, {n: b["precision"] for n, b in builds.items()}
    )
    print(f"  ours / LeRobot {row.median(OURS) / row.median(LEROBOT):.2f}x", flush=True)
    return row


# -- report -------------------------------------------------------------------------------------
def floors_table(floors: Floors) -> str:
    dtypes = sorted({d for d, _ in floors.matmul}, reverse=True)  # fp32 first
    lines = [
        "| threads | read GB/s | " + " | ".join(f"{d} matmul GFLOP/s" for d in dtypes) + " |",
        "|---:|---:|" + "---:|" * len(dtypes),
    ]
    for t in THREADS:
        peaks = " | ".join(f"{floors.matmul[d, t] / 1e9:.0f}" for d in dtypes)
        lines.append(f"| {t} | {floors.bandwidth[t] / 1e9:.1f} | {peaks} |")
    return "\n".join(lines)


def infer_table(rows: Sequence[InferRow]) -> str:
    lines = [
        "| U-Net down_dims | params | GFLOP/call | threads | LeRobot ms | ours ms | ours eager ms "
        "| LeRobot / ours | LeRobot / eager | fp32 floor ms | ours vs floor | chunks per system |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        theirs, ours, eager = r.median(LEROBOT), r.median(OURS), r.median(EAGER)
        calls = ", ".join(str(len(v)) for v in r.ms.values())
        lines.append(
            f"| {list(SIZES[r.size])} | {r.params / 1e6:.2f}M | {r.flops / 1e9:.3f} | {r.threads} "
            f"| {theirs:.1f} | {ours:.1f} | {eager:.1f} | {theirs / ours:.2f}x | {theirs / eager:.2f}x "
            f"| {r.floor_ms:.2f} | {ours / r.floor_ms:.1f}x | {calls} |"
        )
    return "\n".join(lines)


def train_table(rows: Sequence[TrainRow]) -> str:
    lines = [
        "| U-Net down_dims | params | batch | threads | LeRobot samples/s | ours samples/s | ours / LeRobot "
        "| precision (LeRobot / ours) | steps per system |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        theirs, ours = r.median(LEROBOT), r.median(OURS)
        lines.append(
            f"| {list(SIZES[r.size])} | {r.params / 1e6:.2f}M | {r.batch} | {r.threads} | {theirs:.0f} "
            f"| {ours:.0f} | {ours / theirs:.2f}x | {r.precision[LEROBOT]} / {r.precision[OURS]} "
            f"| {len(r.rates[OURS])} |"
        )
    return "\n".join(lines)


@dataclass
class Run:
    command: str
    started: datetime
    load_before: tuple[float, ...]
    load_after: tuple[float, ...]
    elapsed_s: float
    versions: str
    floors: Floors
    infer: list[InferRow]
    train: list[TrainRow]
    contexts: dict[str, str]  # table -> context() when it was done


def report(run: Run) -> str:
    load = " ".join(f"{x:.2f}" for x in run.load_before), " ".join(f"{x:.2f}" for x in run.load_after)
    sections = [
        f"""# LeRobot DiffusionPolicy vs our DenoisingPolicy (CPU, side by side)

- command: `{run.command}` ({run.elapsed_s:.0f} s)
- date: {run.started:%Y-%m-%d %H:%M} UTC
- machine: {machine()}
- load average (1/5/15 min) before: {load[0]}, after: {load[1]}
- {run.versions}

Each system runs in its own venv and process (`bench/vs_lerobot_worker.py`); the requests alternate
round by round (the order reversed every other round), so load changes hit both. Equal configuration:
state-only observations (9 + 10 dims, 2 steps, concatenated raw as the conditioning), action 7,
horizon 16, n_action_steps 8, DDIM 10 steps over 100 training steps, U-Net kernel 5, GroupNorm 8,
step embedding 128, FiLM scale + bias, min/max normalization; the parameter counts are checked equal
(the run stops otherwise) and GFLOP/call is torch's FlopCounterMode on one denoiser call.

## Floors of this machine (measured in this run)

{floors_table(run.floors)}

Read = a torch sum over a 256 MB fp32 tensor; matmul = {run.floors.matmul_n}x{run.floors.matmul_n}.
{run.contexts["floors"]}
"""
    ]
    if run.infer:
        sections.append(f"""## Chunk latency, batch 1 (median ms)

{infer_table(run.infer)}

{run.contexts["inference"]}

- LeRobot: `postprocessor(policy.diffusion.generate_actions(preprocessor(obs)))`: normalize,
  concatenate the states, 10 DDIM steps (diffusers' `DDIMScheduler`), unnormalize the 8 executed
  actions. `predict_action_chunk` would read the history from the queues that `select_action` fills,
  so its body, `generate_actions`, is timed on the batch directly.
- ours: `policy.sample_actions(obs)`: normalize, encode, 10 DDIM steps, unnormalize all 16 actions;
  "ours" with `use_backend("auto")` (our fast path), "ours eager" with `use_backend("eager")`.
- Ratios > 1: ours is faster. "fp32 floor" = max(fp32 weight bytes x 10 calls / read bandwidth, FLOPs
  per chunk / fp32 matmul peak) at the row's thread count; the bandwidth term counts only for weights
  over the 32 MB L3 (the 63.5M net), so smaller nets get the arithmetic floor alone. Per-op overhead,
  not arithmetic, sets the latency of the small nets at batch 1, so their "vs floor" is large.
- Chunks per system: the number of timed chunks of each (LeRobot, ours, ours eager), over all rounds.
""")
    if run.train:
        sections.append(f"""## Training throughput (median samples/s)

{train_table(run.train)}

{run.contexts["training"]}

- LeRobot, as lerobot-train's loop on CPU: `preprocessor(batch)` (normalization), `policy.forward`
  -> loss, backward, `clip_grad_norm_` 10, the diffusion preset's optimizer (`AdamConfig`: torch Adam,
  lr 1e-4, betas 0.95/0.999, weight decay 1e-6) step, zero_grad; fp32 (`use_amp` off by default).
  The LR scheduler step is left out on both sides.
- ours: `policies.train.training_step` (forward under `resolve_precision("auto", "cpu")`, backward,
  clipping 1.0, `AdamW(fused=True)` step); normalization is inside our forward. Where the precision
  column says bf16 the ratio includes what bf16 autocast buys on this CPU.
- Random batches, fixed per row; 2 warm-up steps per side before the timed steps.
""")
    sections.append(
        "Timings are from a shared 2-core machine (see the load averages): treat differences under ~20% "
        "as noise, and rows with few chunks or steps (a --quick run) as smoke checks only.\n"
    )
    return "\n".join(sections)


def versions(workers: Sequence[Worker]) -> str:
    theirs, ours = workers[0].built, workers[1].built
    return (
        f"LeRobot {theirs['lerobot']} on torch {theirs['torch']}; robomosaic on torch {ours['torch']} "
        f"(our backend call: {ours['backend']}); LeRobot worker python {workers[0].proc.args[0]}"
    )


def start_workers(stack: contextlib.ExitStack, lerobot: Path) -> list[Worker]:
    """LeRobot, ours (backend auto) and ours eager; each closed (or killed) when `stack` closes."""
    workers = []
    for name, python, system, backend in (
        (LEROBOT, lerobot, "lerobot", "auto"),
        (OURS, Path(sys.executable), "robomosaic", "auto"),
        (EAGER, Path(sys.executable), "robomosaic", "eager"),
    ):
        workers.append(Worker(name, python, system, backend))
        stack.callback(workers[-1].close)
    return workers


def measure(
    args: argparse.Namespace, effort: Effort, floors: Floors, contexts: dict[str, str]
) -> tuple[list[InferRow], list[TrainRow], str]:
    """The inference rows, the training rows and the versions line; fills `contexts` per table."""
    training = [*TRAINING, *((("medium", 256, 1),) if args.train_one_thread else ())]
    with contextlib.ExitStack() as stack:
        workers = start_workers(stack, lerobot_python(args.lerobot_venv))
        infer = [infer_row(workers, s, t, effort, floors) for s in args.sizes for t in THREADS]
        contexts["inference"] = context()
        print(f"\n{contexts['inference']}\n{infer_table(infer)}\n", flush=True)
        train = [train_row(workers[:2], s, b, t, effort) for s, b, t in training if s in args.sizes]
        contexts["training"] = context()
        if train:
            print(f"\n{contexts['training']}\n{train_table(train)}\n", flush=True)
        return infer, train, versions(workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lerobot-venv", type=Path, default=ROOT / ".cache" / "lerobot")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "vs_lerobot.md")
    parser.add_argument("--quick", action="store_true", help="1 round, short requests: a smoke run")
    parser.add_argument("--rounds", type=int, help="rounds per row (default 5, --quick 1)")
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES), help="U-Nets to run")
    parser.add_argument(
        "--train-one-thread", action="store_true", help="also train the medium net at 1 thread"
    )
    args = parser.parse_args()
    effort = QUICK if args.quick else FULL
    if args.rounds:
        effort = dataclasses.replace(effort, rounds=args.rounds)
    started, t0, load_before = datetime.now(timezone.utc), time.perf_counter(), os.getloadavg()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}", flush=True)
    floors = measure_floors(effort)
    contexts = {"floors": context()}
    print(contexts["floors"], flush=True)
    try:
        infer, train, version_line = measure(args, effort, floors, contexts)
    except WorkerError as error:
        raise SystemExit(f"stopped: {error}") from None
    load_after = os.getloadavg()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}", flush=True)
    command = shlex.join([".venv/bin/python", *sys.argv])
    run = Run(command, started, load_before, load_after, time.perf_counter() - t0, version_line, floors,
              infer, train, contexts)  # fmt: skip
    publish(report(run), args.results)


if __name__ == "__main__":
    main()
