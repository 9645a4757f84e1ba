"""Microseconds per control step of the RAPTOR student: torch, numpy, onnxruntime and C side by side.

One step is batch 1: one observation (22) and the hidden state (16) in, one action (4) and the new
hidden state out, the hidden state fed back into the next step. Measured in one run:

    torch        RaptorStudent.step under inference_mode, 1 thread
    numpy        NumpyStudent.step (float32)
    onnxruntime  the export_onnx step graph, CPU provider, 1 intra-op thread
    C (ctypes)   the export_c file as a shared library (gcc -O2), called from Python
    C (loop)     the same file linked into a small C driver timing a loop of raptor_step calls
                 (clock_gettime): the per-step cost a flight controller pays, without Python

Each figure is the median over repeats of the mean time per step in a block of steps (the best
repeat is shown too), as wall time and as this process's CPU time (which leaves out the time other
jobs on a shared machine hold the core); ratios are relative to the C loop. Latency does not
depend on training, so a randomly initialised student is used unless --checkpoint names one. Run:

    nice -n 10 .venv/bin/python bench/raptor_step.py --results docs/results/raptor_step.md
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from robomosaic.policies.raptor.export import NumpyStudent, export_c, export_onnx
from robomosaic.policies.raptor.student import ACTION_DIM, OBS_DIM, RaptorStudent
from robomosaic.sim.measure_experts import machine

GCC = ["gcc", "-O2", "-std=c99", "-Wall", "-Werror"]
DRIVER = r"""
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "raptor_policy.h"

#define BANK 256

/* argv: steps per repeat, repeats; prints wall and CPU nanoseconds per step for each repeat */
int main(int argc, char **argv) {
    static float obs[BANK][RAPTOR_OBS_DIM];
    float hidden[RAPTOR_HIDDEN_DIM], action[RAPTOR_ACTION_DIM];
    long steps = argc > 1 ? atol(argv[1]) : 200000, s;
    int repeats = argc > 2 ? atoi(argv[2]) : 7, r, i, j;
    unsigned int state = 12345u;
    double checksum = 0.0;
    for (i = 0; i < BANK; ++i) {
        for (j = 0; j < RAPTOR_OBS_DIM; ++j) {
            state = state * 1664525u + 1013904223u;
            obs[i][j] = (float)(state >> 8) / 16777216.0f * 4.0f - 2.0f;
        }
    }
    raptor_reset(hidden);
    for (r = 0; r < repeats; ++r) {
        struct timespec w0, w1, c0, c1;
        clock_gettime(CLOCK_MONOTONIC, &w0);
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
        for (s = 0; s < steps; ++s) {
            raptor_step(obs[s % BANK], hidden, action);
            checksum += action[0];
        }
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
        clock_gettime(CLOCK_MONOTONIC, &w1);
        printf("%.3f %.3f\n", ((w1.tv_sec - w0.tv_sec) * 1e9 + (w1.tv_nsec - w0.tv_nsec)) / steps,
               ((c1.tv_sec - c0.tv_sec) * 1e9 + (c1.tv_nsec - c0.tv_nsec)) / steps);
    }
    fprintf(stderr, "checksum %f\n", checksum); /* keeps the loop from being optimised away */
    return 0;
}
"""


@dataclass
class Timing:
    name: str
    wall: list[float]  # µs per step, one per repeat
    cpu: list[float]  # process CPU µs per step, one per repeat
    max_diff: float | None  # max |action - torch action| over the check trajectory


def time_steps(
    step: Callable[[np.ndarray], np.ndarray], obs: np.ndarray, repeats: int
) -> tuple[list[float], list[float]]:
    """Wall and CPU microseconds per step for each repeat of a pass over `obs` (one step per row)."""
    for row in obs[:200]:  # warm-up
        step(row)
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for row in obs:
            step(row)
        c1, w1 = time.process_time(), time.perf_counter()
        wall.append((w1 - w0) / len(obs) * 1e6)
        cpu.append((c1 - c0) / len(obs) * 1e6)
    return wall, cpu


def torch_stepper(student: RaptorStudent) -> Callable[[np.ndarray], np.ndarray]:
    hidden = student.initial_state(1)

    def step(obs: np.ndarray) -> np.ndarray:
        nonlocal hidden
        with torch.inference_mode():
            action, hidden = student.step(torch.from_numpy(obs).unsqueeze(0), hidden)
        return action[0].numpy()

    return step


def numpy_stepper(student: RaptorStudent) -> Callable[[np.ndarray], np.ndarray]:
    policy = NumpyStudent.from_student(student)
    hidden = policy.initial_state(1)[0]

    def step(obs: np.ndarray) -> np.ndarray:
        nonlocal hidden
        action, hidden = policy.step(obs, hidden)
        return action

    return step


def onnx_stepper(model: Path, initial_hidden: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    hidden = initial_hidden[None].copy()

    def step(obs: np.ndarray) -> np.ndarray:
        nonlocal hidden
        action, hidden = session.run(["action", "hidden_out"], {"obs": obs[None], "hidden": hidden})
        return action[0]

    return step


def ctypes_stepper(library: Path, hidden_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    lib = ctypes.CDLL(str(library))
    floats = ctypes.POINTER(ctypes.c_float)
    lib.raptor_step.argtypes = [floats, floats, floats]
    lib.raptor_step.restype = None
    lib.raptor_reset.argtypes = [floats]
    hidden = np.zeros(hidden_dim, np.float32)
    action = np.zeros(ACTION_DIM, np.float32)
    hidden_p, action_p = hidden.ctypes.data_as(floats), action.ctypes.data_as(floats)
    lib.raptor_reset(hidden_p)
    raptor_step = lib.raptor_step

    def step(obs: np.ndarray) -> np.ndarray:
        raptor_step(obs.ctypes.data_as(floats), hidden_p, action_p)
        return action.copy()

    return step


def build_c(student: RaptorStudent, workdir: Path) -> tuple[Path, Path]:
    """The export as a shared library and linked into the timing driver."""
    path_c = export_c(student, workdir / "raptor_policy.c", workdir / "raptor_policy.h")
    library, driver = workdir / "libraptor_policy.so", workdir / "raptor_driver"
    (workdir / "driver.c").write_text(DRIVER)
    subprocess.run([*GCC, "-shared", "-fPIC", str(path_c), "-o", str(library), "-lm"], check=True)
    subprocess.run([*GCC, str(workdir / "driver.c"), str(path_c), "-o", str(driver), "-lm"], check=True)
    return library, driver


def gcc_version() -> str:
    return subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def max_action_diff(step: Callable[[np.ndarray], np.ndarray], obs: np.ndarray, ref: np.ndarray) -> float:
    return float(max(np.abs(step(row) - ref_row).max() for row, ref_row in zip(obs, ref, strict=True)))


def table(timings: list[Timing]) -> str:
    c_wall, c_cpu = statistics.median(timings[-1].wall), statistics.median(timings[-1].cpu)
    lines = [
        "| implementation | wall µs/step (median) | wall, best repeat | CPU µs/step (median) "
        "| × C loop (wall) | × C loop (CPU) | max \\|action − torch\\| |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in timings:
        wall, cpu = statistics.median(t.wall), statistics.median(t.cpu)
        diff = "—" if t.max_diff is None else f"{t.max_diff:.1e}"
        lines.append(
            f"| {t.name} | {wall:.2f} | {min(t.wall):.2f} | {cpu:.2f} "
            f"| {wall / c_wall:.0f} | {cpu / c_cpu:.0f} | {diff} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="RaptorStudent checkpoint (default: random init)")
    parser.add_argument("--steps", type=int, default=2000, help="steps per repeat for the Python callers")
    parser.add_argument("--c-steps", type=int, default=200000, help="steps per repeat for the C loop")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results", default="docs/results/raptor_step.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = (RaptorStudent.load(args.checkpoint) if args.checkpoint else RaptorStudent()).eval()
    obs = np.random.default_rng(0).normal(size=(args.steps, OBS_DIM)).astype(np.float32)
    load_before = os.getloadavg()
    start = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        library, driver = build_c(student, workdir)
        model = export_onnx(student, workdir / "raptor.onnx")
        initial = student.initial_hidden.detach().numpy()
        factories: list[tuple[str, Callable[[], Callable[[np.ndarray], np.ndarray]]]] = [
            ("torch (nn.GRU, inference_mode)", lambda: torch_stepper(student)),
            ("numpy", lambda: numpy_stepper(student)),
            ("onnxruntime", lambda: onnx_stepper(model, initial)),
            ("C via ctypes", lambda: ctypes_stepper(library, student.hidden_dim)),
        ]
        check = obs[:300]
        reference_step = torch_stepper(student)
        ref = np.array([reference_step(row) for row in check])
        timings = []
        for name, make in factories:
            # each form starts from the initial hidden state for the accuracy check
            diff = max_action_diff(make(), check, ref)
            wall, cpu = time_steps(make(), obs, args.repeats)
            timings.append(Timing(name, wall, cpu, diff))
            print(f"{name}: {statistics.median(wall):.2f} us per step", flush=True)
        run = subprocess.run(
            [str(driver), str(args.c_steps), str(args.repeats)], capture_output=True, text=True, check=True
        )
        ns = np.array([line.split() for line in run.stdout.splitlines()], dtype=float)
        timings.append(Timing("C loop (no Python)", list(ns[:, 0] / 1e3), list(ns[:, 1] / 1e3), None))
        print(f"C loop: {statistics.median(timings[-1].wall):.3f} us per step", flush=True)

    c_wall, c_cpu = statistics.median(timings[-1].wall), statistics.median(timings[-1].cpu)
    result = table(timings)
    print(result)
    load_after = os.getloadavg()
    command = shlex.join(
        ["nice", "-n", "10", ".venv/bin/python", "bench/raptor_step.py", *(argv or sys.argv[1:])]
    )
    n_params = sum(p.numel() for p in student.parameters())
    verdict = "meets" if c_wall < 5.0 else "misses"
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    weights = (
        f"`{args.checkpoint}`" if args.checkpoint else "random weights; latency does not depend on training"
    )
    load = " ".join(f"{x:.2f}" for x in load_before), " ".join(f"{x:.2f}" for x in load_after)
    lines = [
        "# RAPTOR student: time per control step",
        "",
        "One control step at batch 1 (observation 22 + hidden state 16 in, action 4 + hidden state out,",
        f"hidden state fed back) of the {n_params}-parameter student ({weights}), in each of its forms",
        f"(`robomosaic.policies.raptor.export`). Median over {args.repeats} repeats of the mean over",
        f"{args.steps} steps ({args.c_steps} for the C loop), as wall time and as this process's CPU time",
        "(which leaves out the time other jobs held the core); ratios are to the C loop.",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- load average (1/5/15 min) before: {load[0]}; after: {load[1]}. The machine was shared with",
        "  training jobs and the benchmark ran under `nice -n 10`: upper bounds for an idle core",
        f"- command: `{command}` ({time.perf_counter() - start:.0f} s)",
        f"- torch {torch.__version__} (1 thread), numpy {np.__version__}, onnxruntime {ort.__version__}"
        f" (1 thread), {gcc_version()} with `{' '.join(GCC)}`",
        "",
        result,
        "",
        f"The C loop {verdict} the issue's target of under 5 µs per step ({c_wall:.2f} µs wall,",
        f"{c_cpu:.2f} µs CPU). The accuracy column is over the first 300 steps from the initial hidden",
        "state; the tests hold every form to 1e-5 over 500 steps.",
        "The Python rows are dominated by per-call overhead (tensor/array creation, ctypes marshalling,",
        "session.run), not by the ~2k multiply-adds of the network.",
    ]
    results.write_text("\n".join(lines) + "\n")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
