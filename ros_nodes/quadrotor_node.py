"""robomosaic-quadrotor-node: the RAPTOR student flying a quadrotor through ROS 2, at 100 Hz or faster.

The 2,084-parameter recurrent student (policies/raptor) runs in plain numpy (``NumpyStudent``: torch
is only imported to read a checkpoint folder at startup, never in the loop) and keeps its GRU hidden
state from one control step to the next.

Topics (names are defaults; remap them):

- ``/odom`` nav_msgs/Odometry in (sensor QoS: best effort, depth 1). Frame ``odom`` is the world,
  ENU-like (z up, gravity along -z); ``child_frame_id`` ``base_link`` is the body, FLU (x forward,
  y left, z up). ``pose`` is the body pose in the world. ``twist.angular`` are body rates (rad/s, body
  frame). ``twist.linear`` is the velocity in the WORLD frame by our convention (parameter
  ``twist_frame: world``); REP-105 sources (MAVROS, most VIO/EKF nodes) give it in the child frame:
  set ``twist_frame: child`` and the node rotates it into the world.
- ``/setpoint`` geometry_msgs/PoseStamped in: the position to hold, in the odometry's frame (the
  orientation is ignored: the student controls position; its yaw is whatever it settles at). A
  setpoint whose non-empty ``frame_id`` differs from the odometry's is rejected with a warning.
  Before any setpoint arrives the node holds the parameter ``setpoint`` ([x, y, z]) or, when that is
  empty, the position where control started.
- ``/setpoint_velocity`` geometry_msgs/TwistStamped in (optional): the reference velocity (world
  frame, ``twist.linear``) for trajectory tracking, streamed together with ``/setpoint``; older than
  ``setpoint_velocity_timeout`` it counts as zero.
- ``/motor_commands`` std_msgs/Float32MultiArray out (command QoS: reliable, depth 10), following PX4's
  ActuatorMotors convention: ``data[i]`` is the normalized command of PX4 motor ``i + 1`` in [0, 1]
  (0 = minimum, 1 = maximum), NaN = disarmed (motor stopped), 4 values in PX4's quad-X order
  ``layout.dim[0]`` (label ``"motors"``, size 4, stride 4):

      data[0] = motor 1 = front-right (FR), spins counter-clockwise seen from above
      data[1] = motor 2 = back-left   (BL), counter-clockwise
      data[2] = motor 3 = front-left  (FL), clockwise
      data[3] = motor 4 = back-right  (BR), clockwise

  The student's action ``a`` is in our (L2F) order [FR, BR, BL, FL] in [-1, 1]; the mapping is
  ``data = (a[PX4_FROM_OURS] + 1) / 2`` with ``PX4_FROM_OURS = (0, 2, 3, 1)``, and back
  ``a = 2 data[OURS_FROM_PX4] - 1`` with ``OURS_FROM_PX4 = (0, 3, 1, 2)``. The spin directions of
  both layouts agree (L2F's FR and BL turn counter-clockwise), so no motor changes sense. The value
  is the motor's commanded state on the simulator's linear scale (the L2F "motor state", about
  proportional to rpm; thrust is quadratic in it), so on PX4 set ``THR_MDL_FAC = 0`` (the command
  goes to the ESC linearly) rather than letting PX4 linearize thrust a second time.
- ``/diagnostics`` diagnostic_msgs/DiagnosticArray at 1 Hz: control-period jitter (p50, p99, max),
  compute time (odometry to command, p50, p99), deadline misses, odometry age, failsafe and
  rejected-odometry counts, the failsafe latency (from the moment the odometry became too old to
  the failsafe command, last and max), armed state.
- service ``~/arm`` std_srvs/SetBool: true arms (control starts from the student's learned initial
  hidden state), false disarms (NaN commands, motors stopped).

Parameters:

- ``checkpoint``: a RaptorStudent checkpoint folder, or the weights ``.npz`` that ``robomosaic-raptor
  export`` writes; default the student shipped with the package,
  ``robomosaic/policies/raptor/pretrained/student``
- ``control_hz`` (100.0)
- ``trigger``: ``timer`` (default: a dedicated thread on the wall clock at ``control_hz``) or ``odom``
  (one step per odometry message, for estimators publishing at a fixed rate; the thread then only
  sends the failsafe when odometry stops)
- ``max_odom_age`` (0.05 s); ``failsafe``: ``zero`` (default) | ``hover_throttle``; ``hover_throttle``
  (-1: the running mean, over about 1 s, of the commands sent while flying; zeros before it has flown)
- ``armed`` (false); ``setpoint`` ([] or [x, y, z]); ``setpoint_velocity_timeout`` (0.1 s)
- ``twist_frame``: ``world`` (default) | ``child``
- ``initial_action`` (0.0): the "previous action" the student sees at its first step after arming,
  in [-1, 1]; training started it at the vehicle's hover action, so set ``2 x hover command - 1`` when
  the hover command is known (-1, motors off, is out of distribution and can make a weak vehicle diverge)
- ``realtime_priority`` (0: off; 1-99 runs all the node's threads under SCHED_FIFO: the control
  thread, the executor thread, which runs the control step with ``trigger: odom``, and the
  middleware's threads, which deliver the odometry; needs an rtprio limit or CAP_SYS_NICE,
  else a warning and normal priority)

Faults. Odometry older than ``max_odom_age`` (measured from its arrival, so sensor and node clocks
need not agree) or never received -> the failsafe command at every control step, within one period
of the limit: ``zero`` (the default) sends 0.0 to every motor (minimum thrust: the vehicle drops, but
predictably; on a vehicle standing on the ground this is the only safe choice), ``hover_throttle``
holds every motor at the hover command for an open-loop descent on a vehicle whose hover command
is well known (it drifts: without a pose nothing can hold it). Odometry with a non-finite value or a
degenerate quaternion is rejected (counted in the diagnostics) and so ages like a missing message.
When fresh odometry returns, control resumes from the learned initial hidden state (the student's
memory of the vehicle may no longer match) and with the student's own last action as its "previous
action", not the failsafe command: -1 on every motor is far from anything it saw in training, and
in-process it made recovery after 0.1 s of zeros overshoot by 1-2.3 m (crazyflie, x500, a sampled
vehicle) where its own last action kept it within 0.15-0.23 m.
SIGINT/SIGTERM: the failsafe command is sent before the node exits.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robomosaic.policies.raptor import PRETRAINED_STUDENT
from robomosaic.policies.raptor.export import NumpyStudent
from robomosaic.policies.realtime import freeze_startup_objects, set_realtime_priority
from robomosaic.ros_nodes.common import require_rclpy

require_rclpy()

import rclpy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue  # noqa: E402
from geometry_msgs.msg import PoseStamped, TwistStamped  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from rcl_interfaces.msg import ParameterDescriptor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from std_msgs.msg import Float32MultiArray, MultiArrayDimension  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402

from robomosaic.ros_nodes.common import command_qos, sensor_qos, spin_node  # noqa: E402

# PX4 quad-X motor i (0-based) is our motor PX4_FROM_OURS[i]; ours j is PX4's OURS_FROM_PX4[j].
PX4_FROM_OURS = (0, 2, 3, 1)  # PX4 [FR, BL, FL, BR] <- ours [FR, BR, BL, FL]
OURS_FROM_PX4 = (0, 3, 1, 2)
FAILSAFES = ("zero", "hover_throttle")
TRIGGERS = ("timer", "odom")
TWIST_FRAMES = ("world", "child")


# ---- pure conversions (no ROS) ------------------------------------------------------------------
def actions_to_px4(action: np.ndarray) -> np.ndarray:
    """Our [FR, BR, BL, FL] actions in [-1, 1] (clipped) -> PX4 quad-X normalized commands in [0, 1]."""
    action = np.clip(np.asarray(action, dtype=np.float32).reshape(4), -1.0, 1.0)
    return ((action[list(PX4_FROM_OURS)] + 1.0) / 2.0).astype(np.float32)


def px4_to_actions(control: np.ndarray) -> np.ndarray:
    """PX4 quad-X commands in [0, 1] (clipped; NaN = disarmed -> motor stopped, action -1) -> our
    [FR, BR, BL, FL] actions in [-1, 1]."""
    control = np.asarray(control, dtype=np.float64).reshape(-1)
    if control.shape != (4,):
        raise ValueError(f"motor command: expected 4 values (PX4 quad-X), got {control.shape[0]}")
    control = np.where(np.isnan(control), 0.0, np.clip(control, 0.0, 1.0))
    return 2.0 * control[list(OURS_FROM_PX4)] - 1.0


def rotation_matrix(quat_xyzw: np.ndarray) -> np.ndarray:
    """Body-to-world rotation (3, 3) of a ROS quaternion (x, y, z, w), normalised here; the same
    matrix as sim.quadrotor.dynamics.quaternion_to_rotation_matrix (which takes w first)."""
    x, y, z, w = np.asarray(quat_xyzw, dtype=np.float64) / np.linalg.norm(quat_xyzw)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def raptor_observation(
    position: np.ndarray,
    rotation: np.ndarray,
    velocity_world: np.ndarray,
    body_rates: np.ndarray,
    target_position: np.ndarray,
    target_velocity: np.ndarray,
    previous_action: np.ndarray,
) -> np.ndarray:
    """The student's 22-d observation (policies/raptor/student.py OBS_LAYOUT, as dynamics.observe
    builds it): position - target, body-to-world rotation row-major, velocity - target velocity
    (world), body rates, previous action."""
    return np.concatenate(
        [
            position - target_position,
            rotation.reshape(9),
            velocity_world - target_velocity,
            body_rates,
            previous_action,
        ]
    ).astype(np.float32)


@dataclass(frozen=True)
class OdometrySample:
    """One accepted odometry message: world position, body-to-world rotation, world velocity, body
    rates, its frame and its arrival time (time.monotonic())."""

    position: np.ndarray
    rotation: np.ndarray
    velocity: np.ndarray
    body_rates: np.ndarray
    frame_id: str
    received: float


def odometry_sample(msg: Odometry, received: float, twist_frame: str = "world") -> OdometrySample | None:
    """Parse nav_msgs/Odometry; None when a value is non-finite or the quaternion degenerate."""
    p, q = msg.pose.pose.position, msg.pose.pose.orientation
    v, w = msg.twist.twist.linear, msg.twist.twist.angular
    values = np.array([p.x, p.y, p.z, q.x, q.y, q.z, q.w, v.x, v.y, v.z, w.x, w.y, w.z])
    if not np.isfinite(values).all() or not 0.5 < np.linalg.norm(values[3:7]) < 2.0:
        return None
    rotation = rotation_matrix(values[3:7])
    velocity = values[7:10] if twist_frame == "world" else rotation @ values[7:10]
    return OdometrySample(values[:3], rotation, velocity, values[10:13], msg.header.frame_id, received)


def load_student(path: str | Path) -> NumpyStudent:
    """A RaptorStudent checkpoint folder (verified by policies/checkpoint.py, read with torch once) or
    the weights ``.npz`` of ``robomosaic-raptor export`` (numpy only) as a ``NumpyStudent``."""
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as weights:
            return NumpyStudent({name: weights[name] for name in weights.files})
    if not (path / "spec.json").is_file():
        raise FileNotFoundError(
            f"checkpoint {path}: not a RaptorStudent checkpoint folder (no spec.json) or an exported .npz; "
            "set the parameter checkpoint to runs/raptor/distill/student/final or to the .npz that "
            "`robomosaic-raptor export` writes"
        )
    from robomosaic.policies.raptor.student import RaptorStudent

    return NumpyStudent.from_student(RaptorStudent.load(path))


class QuadrotorController:
    """The control law without ROS: odometry + setpoint -> PX4 motor commands, keeping the student's
    hidden state and previous action; the node and the benchmark's in-process baseline share it."""

    def __init__(self, student: NumpyStudent, initial_action: float = 0.0) -> None:
        self.student = student
        self.initial_action = np.full(4, initial_action, dtype=np.float32)
        self.hidden: np.ndarray | None = None
        self.previous_action = self.initial_action.copy()

    def reset(self, previous_action: np.ndarray | None = None) -> None:
        """Start over from the learned initial hidden state; ``previous_action`` is what the motors
        were last told (our order, [-1, 1]; default ``initial_action``)."""
        self.hidden = None
        usable = previous_action is not None and np.all(np.isfinite(previous_action))
        self.previous_action = previous_action.astype(np.float32) if usable else self.initial_action.copy()

    def step(
        self, odom: OdometrySample, target_position: np.ndarray, target_velocity: np.ndarray
    ) -> np.ndarray:
        """One control step -> PX4 commands (4,) in [0, 1]."""
        obs = raptor_observation(
            odom.position,
            odom.rotation,
            odom.velocity,
            odom.body_rates,
            target_position,
            target_velocity,
            self.previous_action,
        )
        action, self.hidden = self.student.step(obs, self.hidden)
        self.previous_action = action
        return actions_to_px4(action)


# ---- timing -------------------------------------------------------------------------------------
class PeriodicThread:
    """Calls ``tick(scheduled_time)`` every ``period`` seconds on absolute monotonic deadlines in its
    own thread. Used instead of an rclpy timer because the executor adds its own wake-up latency and
    shares its threads with the subscriptions; here only the GIL is shared. A tick that starts a
    whole period late skips the missed deadlines instead of bursting (counted by ``tick`` itself)."""

    def __init__(
        self,
        period: float,
        tick: Callable[[float], None],
        name: str,
        priority: int = 0,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.period = period
        self.tick = tick
        self.priority = priority
        self.on_error = on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.priority_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.period + 1.0)

    def _run(self) -> None:
        if self.priority > 0:
            self.priority_error = set_realtime_priority(self.priority, "the control thread")
        deadline = time.monotonic()
        while not self._stop.is_set():
            try:
                self.tick(deadline)
            except Exception as e:  # a failing step must not end the control loop silently
                if self.on_error is None:
                    raise
                self.on_error(e)
            deadline += self.period
            now = time.monotonic()
            if now > deadline + self.period:  # fell behind by more than a period: skip, don't burst
                deadline += math.floor((now - deadline) / self.period) * self.period
            if deadline > now:
                time.sleep(deadline - now)


def percentiles_ms(
    values: deque[float] | list[float], quantiles: tuple[float, ...] = (50, 99)
) -> list[float]:
    if not values:
        return [math.nan] * len(quantiles)
    return [float(v) * 1e3 for v in np.percentile(np.asarray(values), quantiles)]


class LoopStats:
    """Rolling control-loop timing for the diagnostics: period jitter |actual - nominal period|,
    compute time, deadline misses (a step finished after the next step's deadline)."""

    def __init__(self, period: float, window: int = 1000) -> None:
        self.period = period
        self.jitter: deque[float] = deque(maxlen=window)
        self.compute: deque[float] = deque(maxlen=window)
        self.deadline_misses = 0
        self.ticks = 0
        self._last_start: float | None = None

    def record(self, scheduled: float, started: float, finished: float) -> None:
        if self._last_start is not None:
            self.jitter.append(abs(started - self._last_start - self.period))
        self._last_start = started
        self.compute.append(finished - started)
        self.ticks += 1
        if finished > scheduled + self.period:
            self.deadline_misses += 1


# ---- the node -----------------------------------------------------------------------------------
PARAMETERS: dict[str, Any] = {
    "checkpoint": "",
    "control_hz": 100.0,
    "trigger": "timer",
    "max_odom_age": 0.05,
    "failsafe": "zero",
    "hover_throttle": -1.0,
    "armed": False,
    "setpoint": None,  # [x, y, z]
    "setpoint_velocity_timeout": 0.1,
    "twist_frame": "world",
    "initial_action": 0.0,
    "realtime_priority": 0,
}


class QuadrotorNode(Node):
    def __init__(self) -> None:
        super().__init__("quadrotor_node")
        # dynamic typing: `control_hz:=200` (an integer) is as good as 200.0; values are converted below
        for name, default in PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(dynamic_typing=True))
        get = self.get_parameter
        self.control_hz = float(get("control_hz").value)
        if not self.control_hz > 0:
            raise ValueError(f"parameter control_hz must be > 0, got {self.control_hz}")
        self.period = 1.0 / self.control_hz
        self.trigger = self._choice("trigger", TRIGGERS)
        self.failsafe = self._choice("failsafe", FAILSAFES)
        self.twist_frame = self._choice("twist_frame", TWIST_FRAMES)
        self.max_odom_age = float(get("max_odom_age").value)
        self.velocity_timeout = float(get("setpoint_velocity_timeout").value)
        for name, value in (
            ("max_odom_age", self.max_odom_age),
            ("setpoint_velocity_timeout", self.velocity_timeout),
        ):
            if not (math.isfinite(value) and value > 0):  # NaN or inf would disable the failsafe
                raise ValueError(f"parameter {name} must be a finite number of seconds > 0, got {value}")
        self.hover_throttle = float(get("hover_throttle").value)
        setpoint = list(get("setpoint").value or [])
        if setpoint and (len(setpoint) != 3 or not np.isfinite(np.asarray(setpoint, dtype=float)).all()):
            raise ValueError(f"parameter setpoint must be [] or 3 finite numbers [x, y, z], got {setpoint}")
        initial_action = float(get("initial_action").value)
        if not -1.0 <= initial_action <= 1.0:
            raise ValueError(f"parameter initial_action must be in [-1, 1], got {initial_action}")
        checkpoint = get("checkpoint").value or str(PRETRAINED_STUDENT)

        self.controller = QuadrotorController(load_student(checkpoint), initial_action)
        self.get_logger().info(f"RAPTOR student from {checkpoint}")
        self._lock = threading.Lock()
        self._odom: OdometrySample | None = None
        self._setpoint: np.ndarray | None = np.asarray(setpoint, dtype=np.float64) if setpoint else None
        self._velocity = np.zeros(3)
        self._velocity_received = -math.inf
        self._armed = bool(get("armed").value)
        self._healthy = False  # False: the next good step resets the student first
        self._throttle_mean = math.nan
        self.stats = LoopStats(self.period)
        self.failsafe_ticks = 0
        self.failsafe_latency = self.failsafe_latency_max = math.nan  # s from stale odometry to failsafe
        self.rejected_odometry = 0
        self.rejected_setpoints = 0
        self.loop_errors = 0

        self.command_pub = self.create_publisher(Float32MultiArray, "/motor_commands", command_qos())
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_subscription(Odometry, "/odom", self._on_odom, sensor_qos())
        self.create_subscription(PoseStamped, "/setpoint", self._on_setpoint, command_qos())
        self.create_subscription(TwistStamped, "/setpoint_velocity", self._on_velocity, command_qos())
        self.create_service(SetBool, "~/arm", self._on_arm)
        self.create_timer(1.0, self._publish_diagnostics)
        self._message = Float32MultiArray()
        self._message.layout.dim = [MultiArrayDimension(label="motors", size=4, stride=4)]
        # trigger "odom": the same thread only watches for stale odometry (and sends NaNs disarmed)
        tick = self._tick if self.trigger == "timer" else self._watch
        priority = int(get("realtime_priority").value)
        self.realtime_error: str | None = None
        if priority > 0:  # this thread spins the executor (with trigger "odom" it runs the control
            # step); the middleware's threads deliver the odometry: all real-time. The control
            # thread started below inherits the policy of this one.
            self.realtime_error = set_realtime_priority(priority, "the node's threads", threads="process")
            if self.realtime_error:
                self.get_logger().warning(self.realtime_error)
        freeze_startup_objects()  # before the loop starts: no collector pause of tens of ms in flight
        self.loop = PeriodicThread(self.period, tick, "raptor-control", on_error=self._on_loop_error)
        self.loop.start()
        how = f"{self.control_hz:g} Hz on a wall-clock thread" if tick == self._tick else "on every odometry"
        armed = "armed" if self._armed else "disarmed (call ~/arm)"
        self.get_logger().info(f"{armed}, {how}, failsafe {self.failsafe}")

    def _choice(self, name: str, allowed: tuple[str, ...]) -> str:
        value = str(self.get_parameter(name).value)
        if value not in allowed:
            raise ValueError(f"parameter {name} must be one of {list(allowed)}, got {value!r}")
        return value

    # -- inputs ---------------------------------------------------------------------------------
    def _on_odom(self, msg: Odometry) -> None:
        received = time.monotonic()
        sample = odometry_sample(msg, received, self.twist_frame)
        if sample is None:
            self.rejected_odometry += 1
            if self.rejected_odometry == 1 or self.rejected_odometry % 100 == 0:
                self.get_logger().warning(
                    f"rejected odometry with non-finite values or a degenerate quaternion "
                    f"({self.rejected_odometry} so far)"
                )
            return
        with self._lock:
            self._odom = sample
        if self.trigger == "odom" and self._armed:
            try:
                self._tick(received)
            except Exception as e:  # as on the timer thread: the failsafe, and the node goes on
                self._on_loop_error(e)

    def _on_setpoint(self, msg: PoseStamped) -> None:
        p = msg.pose.position
        target = np.array([p.x, p.y, p.z])
        odom = self._odom
        frame = msg.header.frame_id
        if not np.isfinite(target).all() or (frame and odom is not None and frame != odom.frame_id):
            self.rejected_setpoints += 1
            self.get_logger().warning(
                f"rejected setpoint {target.tolist()} in frame {frame!r} (odometry frame "
                f"{odom.frame_id if odom else '?'!r}; values must be finite)"
            )
            return
        with self._lock:
            self._setpoint = target

    def _on_velocity(self, msg: TwistStamped) -> None:
        v = msg.twist.linear
        velocity = np.array([v.x, v.y, v.z])
        if not np.isfinite(velocity).all():
            self.rejected_setpoints += 1
            return
        with self._lock:
            self._velocity = velocity
            self._velocity_received = time.monotonic()

    def _on_arm(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        with self._lock:
            self._armed = bool(request.data)
            self._healthy = False
            if self._armed:
                self.controller.reset()
        response.success = True
        response.message = "armed" if request.data else "disarmed: motors stopped"
        self.get_logger().info(response.message)
        return response

    # -- control --------------------------------------------------------------------------------
    def failsafe_command(self) -> np.ndarray:
        if self.failsafe == "hover_throttle":
            throttle = self.hover_throttle if self.hover_throttle >= 0 else self._throttle_mean
            if math.isfinite(throttle):
                return np.full(4, min(throttle, 1.0), dtype=np.float32)
        return np.zeros(4, dtype=np.float32)

    def _on_loop_error(self, error: BaseException) -> None:
        """A control step raised: the failsafe command (NaN while disarmed), and the loop goes on."""
        self.loop_errors += 1
        self.get_logger().error(f"control step failed: {error!r}", throttle_duration_sec=1.0)
        with self._lock:
            self._healthy = False
        self._publish(self.failsafe_command() if self._armed else np.full(4, np.nan, dtype=np.float32))

    def _watch(self, scheduled: float) -> None:
        """Trigger "odom": the periodic thread steps in only when odometry has gone stale (or to keep
        sending NaNs while disarmed); control steps run in the odometry callback."""
        odom = self._odom
        if not self._armed or odom is None or time.monotonic() - odom.received > self.max_odom_age:
            self._tick(scheduled, record=False)

    def _tick(self, scheduled: float, record: bool = True) -> None:
        started = time.monotonic()
        stale_since: float | None = None
        with self._lock:
            odom = self._odom
            if not self._armed:
                command = np.full(4, np.nan, dtype=np.float32)
            elif odom is None or started - odom.received > self.max_odom_age:
                command = self.failsafe_command()
                self.failsafe_ticks += 1
                if self._healthy and odom is not None:  # flying -> failsafe: timed after publishing
                    stale_since = odom.received + self.max_odom_age
                self._healthy = False
            else:
                if not self._healthy:
                    self.controller.reset(self.controller.previous_action)  # see "Faults" above
                    if self._setpoint is None:
                        self._setpoint = odom.position.copy()
                    self._healthy = True
                fresh = started - self._velocity_received <= self.velocity_timeout
                command = self.controller.step(odom, self._setpoint, self._velocity if fresh else np.zeros(3))
                if not np.all(np.isfinite(command)):  # NaN would mean "motor stopped" mid-flight
                    raise FloatingPointError(f"the student returned {command}")
                mean = float(command.mean())  # time constant ~1 s at any control rate
                alpha = min(1.0, self.period)
                self._throttle_mean = (
                    mean
                    if math.isnan(self._throttle_mean)
                    else ((1 - alpha) * self._throttle_mean + alpha * mean)
                )
            self._publish(command)
            if stale_since is not None:
                self.failsafe_latency = time.monotonic() - stale_since
                self.failsafe_latency_max = float(np.fmax(self.failsafe_latency_max, self.failsafe_latency))
        if record:
            self.stats.record(scheduled, started, time.monotonic())

    def _publish(self, command: np.ndarray) -> None:
        self._message.data = command.tolist()
        self.command_pub.publish(self._message)

    # -- diagnostics ----------------------------------------------------------------------------
    def diagnostics_values(self) -> Mapping[str, str]:
        jitter = percentiles_ms(self.stats.jitter, (50, 99, 100))
        compute = percentiles_ms(self.stats.compute)
        odom = self._odom
        age = (time.monotonic() - odom.received) * 1e3 if odom else math.nan
        return {
            "armed": str(self._armed),
            "state": self.state,
            "control_hz": f"{self.control_hz:g}",
            "trigger": self.trigger,
            "period_jitter_p50_ms": f"{jitter[0]:.3f}",
            "period_jitter_p99_ms": f"{jitter[1]:.3f}",
            "period_jitter_max_ms": f"{jitter[2]:.3f}",
            "compute_p50_ms": f"{compute[0]:.3f}",
            "compute_p99_ms": f"{compute[1]:.3f}",
            "deadline_misses": str(self.stats.deadline_misses),
            "ticks": str(self.stats.ticks),
            "odom_age_ms": f"{age:.1f}",
            "failsafe_ticks": str(self.failsafe_ticks),
            "control_errors": str(self.loop_errors),
            "realtime_priority_error": self.realtime_error or "",
            "failsafe_latency_ms": f"{self.failsafe_latency * 1e3:.2f}",
            "failsafe_latency_max_ms": f"{self.failsafe_latency_max * 1e3:.2f}",
            "rejected_odometry": str(self.rejected_odometry),
            "rejected_setpoints": str(self.rejected_setpoints),
            "setpoint": str(None if self._setpoint is None else self._setpoint.round(3).tolist()),
        }

    @property
    def state(self) -> str:
        if not self._armed:
            return "disarmed"
        return "flying" if self._healthy else f"failsafe ({self.failsafe})"

    def _publish_diagnostics(self) -> None:
        state = self.state
        level = DiagnosticStatus.OK if state in ("flying", "disarmed") else DiagnosticStatus.ERROR
        status = DiagnosticStatus(
            level=level,
            name=f"{self.get_fully_qualified_name()}: RAPTOR control loop",
            message=state,
            hardware_id="quadrotor",
            values=[KeyValue(key=k, value=v) for k, v in self.diagnostics_values().items()],
        )
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_pub.publish(array)

    def on_shutdown(self) -> None:
        """Stop the loop and send the failsafe command (spin_node calls this before destroying)."""
        self.loop.stop()
        with self._lock:
            self._publish(self.failsafe_command() if self._armed else np.full(4, np.nan, dtype=np.float32))


def main(argv: list[str] | None = None) -> None:
    rclpy.init(args=argv)
    spin_node(QuadrotorNode())


if __name__ == "__main__":
    main()
