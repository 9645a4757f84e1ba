"""An inference runner that computes chunks in a child process (the ChunkExecutor's runner protocol).

Why a process and not a thread: in the ROS 2 policy node the inference thread shares the GIL with
the executor thread (sensor callbacks, the control timer, message building). Measured with
bench/ros_loop.py on 2 cores, that made the lift policy's chunk inference 7-22 ms slower at p99 than
in-process. A child process has its own interpreter; only the history and the chunk cross a pipe
(pickled numpy arrays between our own two processes, never a file).

The child loads the checkpoint itself and keeps the sampling noise stream of the current episode,
(seed, episode), so results match `ThreadedInference` with the same stream.

`priority` > 0 runs the child under SCHED_FIFO at that priority, as ros2_control's controller
manager runs its update loop: then nothing at normal priority (a simulator, a logger, a compile job)
can preempt a chunk half-way. The policy node puts its own threads one priority above, so that
control ticks still preempt inference. It needs the right to real-time priorities (root,
CAP_SYS_NICE or an `rtprio` limit in /etc/security/limits.conf); without it the child stays at
normal priority and `warning` says why.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NamedTuple

import numpy as np

from robomosaic.policies.realtime import check_priority, freeze_startup_objects, set_realtime_priority

Obs = dict[str, np.ndarray]
STARTUP_TIMEOUT = 120.0  # s for the child to import torch and load the checkpoint


class WarmUp(NamedTuple):
    """The child's first inference, on a zero history."""

    chunk_shape: tuple[int, ...]
    seconds: float


def _serve(conn: Connection, checkpoint: str, device: str, threads: int, priority: int) -> None:
    """The child: load the policy, then answer (history, committed, stream) with a chunk."""
    import torch

    from robomosaic.policies.checkpoint import load_policy
    from robomosaic.policies.rollout import episode_generator, warm_up

    try:
        if threads > 0:
            torch.set_num_threads(threads)
        policy = load_policy(checkpoint).to(torch.device(device))
        # one inference on a zero history here, where inference runs, so that the first real chunk
        # is not slowed by lazy setup; its shape and time go to the parent (the node checks and logs them)
        start = time.perf_counter()
        chunk = warm_up(policy)
        warmed = WarmUp(tuple(np.shape(chunk)), time.perf_counter() - start)
        freeze_startup_objects()  # no collector pause of tens of ms inside a later chunk
    except Exception as e:  # reported to the parent, which raises it at construction
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", (warmed, set_realtime_priority(priority, "inference") if priority > 0 else None)))
    stream, generator = None, None
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent went away
            return
        if request is None:
            return
        number, history, committed, key = request
        if key != stream:
            stream, generator = key, episode_generator(*key)
        try:
            chunk = np.asarray(policy.predict_chunk(history, committed, generator=generator))
            conn.send((number, "ok", chunk, time.monotonic()))
        except Exception as e:
            conn.send((number, "error", f"{type(e).__name__}: {e}", time.monotonic()))


class ProcessInference:
    """Runs `predict_chunk` of the checkpoint in a child process; see the module docstring."""

    def __init__(
        self, checkpoint: str | Path, device: str = "cpu", threads: int = 0, priority: int = 0
    ) -> None:
        check_priority(int(priority), "inference")  # here, before the child starts
        context = mp.get_context("spawn")  # never fork a process that runs DDS threads
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, str(checkpoint), device, int(threads), int(priority)), daemon=True
        )
        self._process.start()
        child.close()
        if not self._conn.poll(STARTUP_TIMEOUT):
            self.shutdown()
            raise RuntimeError(f"inference process: no answer within {STARTUP_TIMEOUT:g} s")
        kind, message = self._conn.recv()
        if kind != "ready":
            self.shutdown()
            raise RuntimeError(f"inference process could not load {checkpoint}: {message}")
        self.warm_up: WarmUp = message[0]
        self.warning: str | None = message[1]  # e.g. the real-time priority was not granted
        self.stream = (0, 0)
        self._requests = 0  # answers to earlier (discarded) requests are recognised by number
        self._pending: tuple[float, float] | None = None  # (request time, wall-clock start)

    def set_stream(self, seed: int, episode: int) -> None:
        """The sampling noise stream of the next requests (one per episode)."""
        self.stream = (int(seed), int(episode))

    @property
    def pid(self) -> int:
        return int(self._process.pid)

    @property
    def sentinel(self) -> int:
        """A descriptor that becomes ready the moment the child ends (`multiprocessing.connection.wait`)."""
        return int(self._process.sentinel)

    def death(self) -> str | None:
        """None while the child runs; otherwise what ended it (a cheap non-blocking check)."""
        if self._process.is_alive():
            return None
        code = self._process.exitcode
        how = (
            f"killed by {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"exit code {code}"
        )
        return f"the inference process (pid {self.pid}) died ({how})"

    def submit(self, history: Obs, committed: np.ndarray | None, now: float) -> None:
        if self.busy:
            raise RuntimeError("inference is already running; wait for its result before submitting")
        if death := self.death():
            raise RuntimeError(death)
        self._requests += 1
        self._conn.send((self._requests, history, committed, self.stream))
        self._pending = (now, time.monotonic())

    def poll(self, now: float) -> tuple[np.ndarray, float, float] | None:
        while self._pending is not None and self._conn.poll():
            number, kind, value, done = self._conn.recv()
            if number == self._requests:
                break
        else:  # nothing pending, or no answer yet
            if self._pending is not None and (death := self.death()):
                self._pending = None
                raise RuntimeError(death)
            return None
        requested, started = self._pending
        self._pending = None
        if kind != "ok":
            raise RuntimeError(f"policy inference failed: {value}")
        # the latency ends when the child finished (CLOCK_MONOTONIC is shared by all processes on
        # Linux), not when the control loop polled
        return value, requested, done - started

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def close(self) -> None:
        """Discard a pending result (a new episode); the process stays up for the next one, and a
        late answer to the discarded request is skipped by its number."""
        self._pending = None

    def shutdown(self) -> None:
        """End the child process."""
        with contextlib.suppress(BrokenPipeError, OSError):
            self._conn.send(None)
        self._process.join(timeout=5.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
