"""robomosaic-quadrotor-sim-node: a simulated quadrotor behind the topics a flight controller would use.

Steps one vehicle of sim/quadrotor in real time (a wall-clock thread at ``1 / dt``, times
``real_time_factor``), in MuJoCo (``simulator: mujoco``, the default: ``MujocoQuadrotor``, ``substeps``
MuJoCo steps per control step) or in the batched torch RK4 simulator with a batch of one
(``simulator: torch``).

- subscribes ``/motor_commands`` std_msgs/Float32MultiArray: PX4 ActuatorMotors layout, 4 normalized
  commands in [0, 1] in PX4's quad-X order, NaN = motor stopped (see quadrotor_node.py for the
  mapping to the simulator's [FR, BR, BL, FL] actions in [-1, 1]). The latest command is held (zero-order
  hold) until the next; older than ``command_timeout`` every motor stops.
- publishes ``/odom`` nav_msgs/Odometry every step (frame ``odom`` ENU-like world, child ``base_link``
  FLU body; twist.linear in the world frame, or in the body frame with ``twist_frame: child``;
  twist.angular = body rates) stamped with simulated time, and ``/clock`` rosgraph_msgs/Clock
  (``publish_clock``) so that nodes with ``use_sim_time`` follow it.
- service ``~/reset`` std_srvs/Trigger: back to the initial state (and held, see below).

The vehicle (``vehicle``): a preset of sim/quadrotor/params.py (``x500``, the default: PX4's reference
frame, thrust-to-weight 3.25; ``crazyflie``: thrust-to-weight 1.47, which leaves the student little
margin to recover from a fall) or ``sampled`` (RAPTOR's randomization, drawn with ``seed``);
``disturbance_force`` [fx, fy, fz] N (world) adds constant wind. It starts at ``initial_position``,
upright at rest with its motors at hover (or from RAPTOR's random initial state around it,
``random_start``, drawn with ``seed``) and is held there, as by a hand launching it, until the first
motor command with a non-zero motor arrives (``wait_for_command``): all-zero (failsafe) and NaN
(disarmed) commands keep it held, so a controller that starts before its odometry arrives does not drop
the vehicle. (A launch pad that releases the vehicle once the thrust exceeds its weight would not do:
RAPTOR's student learned to fly from in-air starts, and one that sees a vehicle at rest at its setpoint
commands slightly less than the weight, forever.) There is no ground: a vehicle that leaves a ``bounds``
m box or whose state goes non-finite is put back at its initial state and held again (logged)."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import torch

from robomosaic.ros_nodes.common import require_rclpy
from robomosaic.sim.quadrotor import dynamics
from robomosaic.sim.quadrotor.mujoco_model import MujocoQuadrotor
from robomosaic.sim.quadrotor.params import PRESETS, QuadrotorParams, preset, sample_params

require_rclpy()

import rclpy  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from rcl_interfaces.msg import ParameterDescriptor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from std_msgs.msg import Float32MultiArray  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from robomosaic.ros_nodes.common import command_qos, seconds_to_stamp, sensor_qos, spin_node  # noqa: E402
from robomosaic.ros_nodes.messages import odometry_msg  # noqa: E402
from robomosaic.ros_nodes.quadrotor_node import TWIST_FRAMES, PeriodicThread, px4_to_actions, rotation_matrix  # noqa: E402

SIMULATORS = ("mujoco", "torch")


def vehicle_params(
    vehicle: str, seed: int = 0, disturbance_force: list[float] | None = None
) -> QuadrotorParams:
    """One vehicle (float64): a preset by name or ``sampled`` with ``seed``."""
    if vehicle == "sampled":
        params = sample_params(1, torch.Generator().manual_seed(seed), dtype=torch.float64)
    elif vehicle in PRESETS:
        params = preset(vehicle, dtype=torch.float64)
    else:
        raise ValueError(f"parameter vehicle must be one of {[*sorted(PRESETS), 'sampled']}, got {vehicle!r}")
    return params.replace(disturbance_force=disturbance_force or [0.0, 0.0, 0.0])


class QuadrotorSimulator:
    """One vehicle, ``step(action) -> state`` (17 floats, dynamics.py layout) in MuJoCo or torch."""

    def __init__(self, params: QuadrotorParams, simulator: str, dt: float, substeps: int = 10) -> None:
        if simulator not in SIMULATORS:
            raise ValueError(f"parameter simulator must be one of {list(SIMULATORS)}, got {simulator!r}")
        self.params = params
        self.dt = dt
        self.mujoco = MujocoQuadrotor(params, dt, substeps) if simulator == "mujoco" else None
        self.state = dynamics.hover_state(params)[0].numpy()

    def reset(self, state: np.ndarray) -> np.ndarray:
        self.state = self.mujoco.reset(state) if self.mujoco else np.array(state, dtype=np.float64)
        return self.state

    def step(self, action: np.ndarray) -> np.ndarray:
        if self.mujoco is not None:
            self.state = self.mujoco.step(action)
        else:
            state = torch.from_numpy(self.state)[None]
            self.state = dynamics.step(state, torch.from_numpy(action)[None], self.params, self.dt)[0].numpy()
        return self.state


class QuadrotorSimNode(Node):
    def __init__(self) -> None:
        super().__init__("quadrotor_sim")
        self.declare_parameter("simulator", "mujoco")
        self.declare_parameter("vehicle", "x500")
        self.declare_parameter("seed", 0)
        self.declare_parameter("dt", dynamics.DEFAULT_DT, ParameterDescriptor(dynamic_typing=True))
        self.declare_parameter("substeps", 10)
        self.declare_parameter("real_time_factor", 1.0, ParameterDescriptor(dynamic_typing=True))
        self.declare_parameter("initial_position", None, ParameterDescriptor(dynamic_typing=True))
        self.declare_parameter("disturbance_force", None, ParameterDescriptor(dynamic_typing=True))
        self.declare_parameter("random_start", False)
        self.declare_parameter("wait_for_command", True)
        self.declare_parameter("command_timeout", 0.1, ParameterDescriptor(dynamic_typing=True))
        self.declare_parameter("bounds", 20.0, ParameterDescriptor(dynamic_typing=True))
        self.declare_parameter("frame_id", "odom")
        self.declare_parameter("child_frame_id", "base_link")
        self.declare_parameter("twist_frame", "world")
        self.declare_parameter("publish_clock", True)
        get = self.get_parameter
        seed = int(get("seed").value)
        self.dt = float(get("dt").value)
        factor = float(get("real_time_factor").value)
        if not (self.dt > 0 and factor > 0):
            raise ValueError(f"parameters dt ({self.dt}) and real_time_factor ({factor}) must be > 0")
        position = self._vector("initial_position")
        wind = self._vector("disturbance_force")
        self.twist_frame = str(get("twist_frame").value)
        if self.twist_frame not in TWIST_FRAMES:
            raise ValueError(
                f"parameter twist_frame must be one of {list(TWIST_FRAMES)}, got {self.twist_frame!r}"
            )
        self.params = vehicle_params(str(get("vehicle").value), seed, wind.tolist())
        simulator = str(get("simulator").value)
        self.sim = QuadrotorSimulator(self.params, simulator, self.dt, int(get("substeps").value))
        start = torch.from_numpy(position)[None]
        if get("random_start").value:
            initial = dynamics.sample_initial_state(self.params, torch.Generator().manual_seed(seed))
            initial[:, dynamics.POSITION] += start
        else:
            initial = dynamics.hover_state(self.params, start)
        self.initial_state = initial[0].numpy()
        self.wait_for_command = bool(get("wait_for_command").value)
        self.command_timeout = float(get("command_timeout").value)
        self.bounds = float(get("bounds").value)
        self.frame_id = str(get("frame_id").value)
        self.child_frame_id = str(get("child_frame_id").value)
        self.publish_clock = bool(get("publish_clock").value)

        self._lock = threading.Lock()
        self._command: np.ndarray | None = None
        self._command_received = -math.inf
        self.rejected_commands = 0
        self.sim_time = 0.0
        self._reset()
        self.odom_pub = self.create_publisher(Odometry, "/odom", sensor_qos())
        self.clock_pub = self.create_publisher(Clock, "/clock", 10) if self.publish_clock else None
        self.create_subscription(Float32MultiArray, "/motor_commands", self._on_command, command_qos())
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.loop = PeriodicThread(self.dt / factor, self._tick, "quadrotor-sim")
        self.loop.start()
        mass, thrust_to_weight = float(self.params.mass[0]), float(self.params.thrust_to_weight[0])
        self.get_logger().info(
            f"{get('vehicle').value} ({mass:.3g} kg, T/W {thrust_to_weight:.2f}) "
            f"in {simulator} at {1 / self.dt:g} Hz x {factor:g} real time"
        )

    def _vector(self, name: str) -> np.ndarray:
        value = self.get_parameter(name).value
        vector = np.zeros(3) if value is None or len(value) == 0 else np.asarray(value, dtype=np.float64)
        if vector.shape != (3,) or not np.isfinite(vector).all():
            raise ValueError(f"parameter {name} must be 3 finite numbers [x, y, z], got {value}")
        return vector

    def _reset(self) -> None:
        self.sim.reset(self.initial_state)
        self.held = self.wait_for_command
        self._command = None

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._lock:
            self._reset()
        response.success = True
        response.message = "reset to the initial state" + (", held until a command" if self.held else "")
        return response

    def _on_command(self, msg: Float32MultiArray) -> None:
        try:
            action = px4_to_actions(np.asarray(msg.data, dtype=np.float64))
        except ValueError as e:
            self.rejected_commands += 1
            self.get_logger().warning(f"/motor_commands rejected: {e}", throttle_duration_sec=1.0)
            return
        with self._lock:
            self._command = action
            self._command_received = time.monotonic()
            if self.held and np.nan_to_num(np.asarray(msg.data)).any():
                self.held = False
                self.get_logger().info(f"released at t = {self.sim_time:.2f} s")

    def _tick(self, scheduled: float) -> None:
        with self._lock:
            if not self.held:
                fresh = (
                    self._command is not None
                    and time.monotonic() - self._command_received <= self.command_timeout
                )
                state = self.sim.step(self._command if fresh else -np.ones(4))
                if not np.isfinite(state).all() or np.abs(state[:3]).max() > self.bounds:
                    self.get_logger().error(
                        f"vehicle left the {self.bounds:g} m box or diverged at t = {self.sim_time:.2f} s: "
                        "back to the initial state, held until the next command"
                    )
                    self._reset()
            self.sim_time += self.dt
            state = self.sim.state
        self._publish(state)

    def _publish(self, state: np.ndarray) -> None:
        stamp = seconds_to_stamp(self.sim_time)
        velocity = state[dynamics.LINEAR_VELOCITY]
        quat_xyzw = np.r_[state[4:7], state[3]]  # dynamics.py keeps w first
        if self.twist_frame == "child":  # world -> body: v_body = R^T v_world
            velocity = rotation_matrix(quat_xyzw).T @ velocity
        self.odom_pub.publish(
            odometry_msg(
                state[dynamics.POSITION],
                quat_xyzw,
                velocity,
                state[dynamics.ANGULAR_VELOCITY],
                self.frame_id,
                self.child_frame_id,
                stamp,
            )
        )
        if self.clock_pub is not None:
            self.clock_pub.publish(Clock(clock=stamp))

    def on_shutdown(self) -> None:
        self.loop.stop()


def main(argv: list[str] | None = None) -> None:
    rclpy.init(args=argv)
    spin_node(QuadrotorSimNode())


if __name__ == "__main__":
    main()
