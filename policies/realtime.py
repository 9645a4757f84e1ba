"""Real-time behaviour for the control loops (the inference process, the policy node and the
quadrotor node): SCHED_FIFO scheduling and keeping the garbage collector's pauses short.

The standard library's ``os.sched_setscheduler`` does the work; what is ours is the choice of threads.
``threads="process"`` covers every thread the process has at the time of the call, including the
ones the middleware started (FastDDS's receive and event threads deliver the observations a
control step waits for, so a node whose control thread alone is real-time still waits behind
normal-priority work), as ``chrt --all-tasks`` does. Threads started later inherit the policy of the
thread that starts them.
"""

from __future__ import annotations

import gc
import os
from typing import Literal

_HOW_TO_ALLOW = "Allow it with an rtprio limit (/etc/security/limits.conf) or CAP_SYS_NICE."


def _thread_ids() -> list[int]:
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: the calling thread only
        return [0]


def check_priority(priority: int, what: str) -> None:
    """A ValueError naming ``what`` unless ``priority`` is 0 (normal scheduling) or 1-99 (SCHED_FIFO)."""
    if not 0 <= priority <= 99:
        raise ValueError(
            f"real-time priority {priority} for {what}: SCHED_FIFO priorities are 1-99 (0: normal)"
        )


def set_realtime_priority(
    priority: int, what: str, threads: Literal["caller", "process"] = "caller"
) -> str | None:
    """SCHED_FIFO at ``priority`` (1-99) for the calling thread or all of this process's threads;
    ``priority`` 0 returns them to normal scheduling. Returns None, or a warning naming ``what`` when
    the system does not permit it (the threads then keep their scheduling)."""
    check_priority(priority, what)
    policy = os.SCHED_FIFO if priority > 0 else os.SCHED_OTHER
    try:
        for tid in _thread_ids() if threads == "process" else [0]:
            try:
                os.sched_setscheduler(tid, policy, os.sched_param(priority))
            except ProcessLookupError:  # the thread ended since we listed it
                continue
    except (PermissionError, OSError, AttributeError) as e:
        return (
            f"could not run {what} at real-time priority {priority} ({e}); it runs at normal "
            f"priority. {_HOW_TO_ALLOW}"
        )
    return None


def freeze_startup_objects() -> None:
    """Collect, then move every object alive now (modules, the model, the middleware's) out of the
    garbage collector's reach (``gc.freeze``); call it when start-up is done.

    Why: a full collection scans every tracked object. With torch imported that is about 180,000
    objects and took 58 ms here, a stall that a 100 Hz loop sees as late or dropped messages (in
    some runs of bench/ros_loop.py, 2 of 2,001 odometry answers came a period late, exactly 1,000
    messages apart). Afterwards a full collection scans only what was created since (under 1 ms).
    Reference counting still frees frozen objects; reference cycles among them wait for
    ``gc.unfreeze()``."""
    gc.collect()
    gc.freeze()
