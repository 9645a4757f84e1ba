"""Node processes for the ROS 2 tests and benchmarks: one way to start a node in its own process on
a given DDS domain (passed explicitly: pytest imports every test module into one process, so
os.environ cannot isolate them), read what it printed, and stop it as a launcher would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile


def start_node(module: str, *ros_args: str, domain: int, stdin: int | None = None) -> subprocess.Popen:
    """`python -m robomosaic.ros_nodes.<module> --ros-args ...` on DDS domain `domain`."""
    return start_process(
        [sys.executable, "-m", f"robomosaic.ros_nodes.{module}", "--ros-args", *ros_args], domain, stdin
    )


def start_lockstep_lift(
    params: str | os.PathLike, checkpoint: str | os.PathLike, seed: int, domain: int
) -> tuple[subprocess.Popen, subprocess.Popen]:
    """The sim node (lift, commanded stepping, seeds from `seed`) and the policy node (`checkpoint`,
    parameter file `params`) on the sim's clock with inference inside its tick: a loop over DDS that
    gives the same steps on a loaded machine as on an idle one (tests/test_ros_lift_e2e.py says why)."""
    sim = start_node(
        "sim_node", "-r", "__node:=sim", "-p", "task:=lift", "-p", "step_mode:=commanded",
        "-p", f"seed:={seed}", domain=domain,
    )  # fmt: skip
    policy = start_node(
        "policy_node", "-r", "__node:=policy", "--params-file", str(params),
        "-p", f"checkpoint:={checkpoint}", "-p", "autostart:=true", "-p", "use_sim_time:=true",
        "-p", "inference:=simulated", domain=domain,
    )  # fmt: skip
    return sim, policy


def start_process(args: list[str], domain: int, stdin: int | None = None) -> subprocess.Popen:
    """`args` on DDS domain `domain`, its output in `process.log`.

    The output goes to a temporary file, not a pipe: a pipe nobody reads until the end fills up
    (64 KiB of log lines on a loaded machine) and then blocks the node mid-run."""
    env = {**os.environ, "ROS_DOMAIN_ID": str(domain), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by stop_node)
    process = subprocess.Popen(args, env=env, stdin=stdin, stdout=log, stderr=subprocess.STDOUT, text=True)
    process.log = log  # type: ignore[attr-defined]
    return process


def node_output(process: subprocess.Popen) -> str:
    """What the node has printed so far."""
    process.log.flush()  # type: ignore[attr-defined]
    process.log.seek(0)  # type: ignore[attr-defined]
    return process.log.read()  # type: ignore[attr-defined]


def stop_node(process: subprocess.Popen) -> str:
    """SIGINT, then SIGKILL after 5 s; the node's output (for failure messages)."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    out = node_output(process)
    process.log.close()  # type: ignore[attr-defined]
    return out
