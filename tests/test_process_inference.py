"""ProcessInference: the chunk computed in a child process equals the one computed in-process with
the same noise stream; answers to discarded requests are skipped; load failures name the checkpoint;
real-time priority for the child and (policies/realtime.py) for every thread of a process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from robomosaic.policies.checkpoint import load_policy
from robomosaic.policies.process_inference import ProcessInference
from robomosaic.policies.realtime import set_realtime_priority
from robomosaic.policies.rollout import episode_generator

CHECKPOINT = Path(__file__).parent / "assets" / "lift_flow"


def wait(runner: ProcessInference, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while (result := runner.poll(time.monotonic())) is None:
        assert time.monotonic() < deadline, "no chunk from the inference process"
        time.sleep(0.005)
    return result


def test_process_chunk_equals_in_process_chunk_and_stale_answers_are_skipped() -> None:
    policy = load_policy(CHECKPOINT)
    rng = np.random.default_rng(0)
    history = {
        k: rng.normal(size=(policy.n_obs_steps, *s.shape)).astype(s.dtype) for k, s in policy.obs_spec.items()
    }
    expected = policy.predict_chunk(history, None, generator=episode_generator(3, 7))
    runner = ProcessInference(CHECKPOINT)
    try:
        runner.set_stream(3, 7)
        runner.submit(history, None, now=1.0)
        assert runner.busy
        with pytest.raises(RuntimeError, match="already running"):
            runner.submit(history, None, now=1.0)
        chunk, requested, latency = wait(runner)
        assert requested == 1.0 and 0 < latency < 60 and not runner.busy
        np.testing.assert_allclose(chunk, expected, atol=1e-6)
        # a discarded request's answer never comes back as the answer to the next one
        runner.set_stream(3, 8)
        runner.submit(history, None, now=2.0)
        runner.close()
        runner.set_stream(3, 7)
        runner.submit(history, None, now=3.0)
        chunk, requested, _ = wait(runner)
        assert requested == 3.0
        np.testing.assert_allclose(chunk, expected, atol=1e-6)
    finally:
        runner.shutdown()
    assert not runner._process.is_alive()


def test_a_checkpoint_that_does_not_load_is_named(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=rf"could not load {tmp_path}"):
        ProcessInference(tmp_path)


def test_realtime_priority_is_applied_or_the_warning_says_why() -> None:
    with pytest.raises(ValueError, match="1-99"):
        ProcessInference(CHECKPOINT, priority=100)
    runner = ProcessInference(CHECKPOINT, priority=10)
    try:
        pid = runner._process.pid
        if runner.warning is None:  # permitted (root, CAP_SYS_NICE or an rtprio limit)
            assert os.sched_getscheduler(pid) == os.SCHED_FIFO
            assert os.sched_getparam(pid).sched_priority == 10
        else:
            assert "real-time priority 10" in runner.warning and "rtprio" in runner.warning
            assert os.sched_getscheduler(pid) == os.SCHED_OTHER
        runner.submit(_zero_history(), None, now=0.0)
        assert wait(runner)[0].ndim == 2  # and it still computes chunks
    finally:
        runner.shutdown()


def _zero_history() -> dict[str, np.ndarray]:
    policy = load_policy(CHECKPOINT)
    return {k: np.zeros((policy.n_obs_steps, *s.shape), dtype=s.dtype) for k, s in policy.obs_spec.items()}


REALTIME_SCRIPT = """
import os, threading
from robomosaic.policies.realtime import set_realtime_priority
stop = threading.Event()
threading.Thread(target=stop.wait).start()  # stands in for a middleware thread started earlier
def policies():
    return sorted({(os.sched_getscheduler(t), os.sched_getparam(t).sched_priority)
                   for t in map(int, os.listdir("/proc/self/task"))})
print(repr(set_realtime_priority(10, "the test", threads="process")), policies())
print(repr(set_realtime_priority(0, "the test", threads="process")), policies())
stop.set()
"""


def test_set_realtime_priority_reaches_every_thread_and_back() -> None:
    with pytest.raises(ValueError, match="for the test: SCHED_FIFO priorities are 1-99"):
        set_realtime_priority(100, "the test")
    # in a child process: this one (pytest) must keep its scheduling
    out = subprocess.run([sys.executable, "-c", REALTIME_SCRIPT], capture_output=True, text=True, check=True)
    raised, restored = out.stdout.splitlines()
    if raised.startswith("None"):  # permitted: both threads real-time, then both normal again
        assert raised == f"None [({os.SCHED_FIFO}, 10)]"
        assert restored == f"None [({os.SCHED_OTHER}, 0)]"
    else:
        assert "rtprio" in raised and raised.endswith(f"[({os.SCHED_OTHER}, 0)]")
