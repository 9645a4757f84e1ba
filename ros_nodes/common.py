"""What every robomosaic ROS 2 node shares: the rclpy check, QoS profiles, spinning, time stamps.

Importing this module never needs rclpy (the package `robomosaic.ros_nodes` must import without
it); rclpy is imported inside the functions that need it.

    SENSOR_QOS / sensor_qos()    best effort, keep last 1, volatile: the newest sensor sample only
    COMMAND_QOS / command_qos()  reliable, keep last 10: commands are never silently dropped
    spin_node(node)              spin until SIGINT/SIGTERM, then send the node's safe command
    run_node(script, make, argv) a console script's main: init, build the node (one-line errors), spin
    BackgroundSpin(executor)     spin in a thread of its own until close()
"""

from __future__ import annotations

import faulthandler
import math
import signal
import threading
from typing import Any

RCLPY_MISSING = (
    "robomosaic ROS nodes need rclpy: on a ROS 2 machine source /opt/ros/<distro>/setup.bash; "
    "elsewhere pip install 'robomosaic[ros]'"
)


def require_rclpy() -> None:
    """Raise an ImportError that says how to get rclpy when it cannot be imported."""
    try:
        import rclpy  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{RCLPY_MISSING} ({e})") from e


def sensor_qos() -> Any:
    """Best effort, keep last 1, volatile: a late sensor sample is worthless, the newest one counts."""
    require_rclpy()
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=1,
        reliability=ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.VOLATILE,
    )


def command_qos() -> Any:
    """Reliable, keep last 10, volatile: commands reach the controller or the publisher knows."""
    require_rclpy()
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=10,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.VOLATILE,
    )


def __getattr__(name: str) -> Any:
    # SENSOR_QOS and COMMAND_QOS are built on first access so that importing this module needs no rclpy.
    if name == "SENSOR_QOS":
        return sensor_qos()
    if name == "COMMAND_QOS":
        return command_qos()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SHUTDOWN_WATCHDOG = 4.0  # s from SIGINT/SIGTERM to a forced exit (robomosaic-launch sends SIGTERM at 5 s)


def spin_node(node: Any) -> None:
    """Spin `node` on a SingleThreadedExecutor until SIGINT/SIGTERM or an rclpy shutdown, then stop it
    safely: a lifecycle node takes its `shutdown` transition (its on_shutdown sends the safe
    command), any other node's `on_shutdown()` is called if it has one, while the context is still
    up so that the safe command is actually published; then the node is destroyed and rclpy shut
    down.

    rclpy's own signal handler would shut the context down first, after which nothing can be
    published any more, so SIGINT and SIGTERM are taken over here.

    Why single-threaded: with rclpy's MultiThreadedExecutor in this loop, the quadrotor node on an
    idle 2-core machine stalled for up to 2 s at a time in 4 of 6 twenty-second runs (138 control
    steps instead of 2000; bench/ros_loop.py), and never did in 4 runs with a SingleThreadedExecutor.
    Our callbacks are short; the long work runs on the nodes' own threads (inference, the 100 Hz
    control loop), which do not need the executor.
    """
    require_rclpy()
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()
        # A shutdown must end: if it has not within SHUTDOWN_WATCHDOG seconds, print every thread's
        # stack (to find what hung) and exit, before the launcher has to escalate to SIGKILL.
        faulthandler.dump_traceback_later(SHUTDOWN_WATCHDOG, exit=True)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        # Short waits so the main thread returns to Python and runs the signal handler promptly.
        while not stop.is_set() and rclpy.ok(context=node.context):
            executor.spin_once(timeout_sec=0.05)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        try:
            if rclpy.ok(context=node.context):
                _stop_safely(node)
        finally:
            executor.shutdown(timeout_sec=1.0)
            node.destroy_node()
            rclpy.try_shutdown(context=node.context)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            faulthandler.cancel_dump_traceback_later()


def run_node(
    script: str,
    make_node: Any,
    argv: Any = None,
    errors: tuple[type[BaseException], ...] = (ValueError, KeyError),
) -> None:
    """`main` of a node's console script: rclpy.init with the ROS arguments, `make_node()`, whose
    `errors` (bad parameters) exit with one line naming the script, then `spin_node`."""
    import sys

    require_rclpy()
    import rclpy

    rclpy.init(args=list(sys.argv if argv is None else [script, *argv]))
    try:
        node = make_node()
    except errors as e:
        rclpy.try_shutdown()
        raise SystemExit(f"{script}: {e}") from None
    spin_node(node)


class BackgroundSpin:
    """Spin `executor` in a daemon thread until `close()`, which ends the thread, then shuts the
    executor down.

    Not `Thread(target=executor.spin)` followed by `executor.shutdown()`: shutdown destroys the
    executor's guard condition while the spinning thread may still be inside rcl's wait on it, and a
    thread left there at interpreter exit aborted robomosaic-ros-eval ("terminate called without an
    active exception", exit -6) after its report was written.
    """

    def __init__(self, executor: Any, name: str = "ros-spin") -> None:
        self.executor = executor
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._spin, name=name, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            while not self._stop.is_set() and self.executor.context.ok():
                self.executor.spin_once(timeout_sec=0.05)
        except ExternalShutdownException:
            pass

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5.0)
        self.executor.shutdown()


def _stop_safely(node: Any) -> None:
    if hasattr(node, "trigger_shutdown"):  # rclpy.lifecycle.LifecycleNode
        # trigger_shutdown raises outside unconfigured/inactive/active (e.g. already finalized).
        if node._state_machine.current_state[1] in ("unconfigured", "inactive", "active"):
            node.trigger_shutdown()
    elif callable(getattr(node, "on_shutdown", None)):
        node.on_shutdown()


def stamp_to_seconds(stamp: Any) -> float:
    """A builtin_interfaces/Time (or anything with sec and nanosec) in seconds."""
    return float(stamp.sec) + 1e-9 * float(stamp.nanosec)


def seconds_to_stamp(t: float) -> Any:
    """Seconds as a builtin_interfaces/Time (nanoseconds rounded, never 1e9)."""
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"a ROS time stamp must be finite and >= 0 seconds, got {t}")
    return nanoseconds_to_stamp(round(t * 1e9))


def nanoseconds_to_stamp(ns: int) -> Any:
    """Integer nanoseconds (>= 0) as a builtin_interfaces/Time, exactly."""
    require_rclpy()
    from builtin_interfaces.msg import Time

    if ns < 0:
        raise ValueError(f"a ROS time stamp must be >= 0 nanoseconds, got {ns}")
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)
