"""robomosaic-sim-node: a task of the registry exposed as a ROS 2 robot.

    robomosaic-sim-node --ros-args -p task:=lift -p seed:=1000000 -p step_mode:=realtime
    python -m robomosaic.ros_nodes.sim_node --ros-args -p task:=stack -p cameras:="['agentview']"

The node looks like a ros2_control arm to the policy node: it publishes sensor topics and accepts
the command topics of a forward command controller, a joint trajectory controller and a mobile base.

Published (stamped with the time of the state they describe, see "Time" below):
- `/joint_states` sensor_msgs/JointState: the 7 arm joints `robot0_joint1..7` and the 2 finger joints
  `gripper0_right_finger_joint1`, `gripper0_right_finger_joint2` (the policy observation
  `robot0_gripper_qpos` is these two by name), position and velocity.
- `/eef_pose` geometry_msgs/PoseStamped: `robot0_eef_pos` and `robot0_eef_quat` (xyzw) in frame
  `frame_id` (default `world`: robosuite reports both in the world frame).
- `/object_state` std_msgs/Float64MultiArray: the task's `object` observation (what a perception
  module would estimate); `/objects/<name>/pose` PoseStamped per task object (for visualisation).
- `/<camera>/image_raw` sensor_msgs/Image rgb8 and `/<camera>/image_raw/compressed` (jpeg) for each
  of `cameras` (nothing is rendered without cameras).
- `/clock` rosgraph_msgs/Clock (`publish_clock`), `~/episode` std_msgs/String JSON after every step and
  reset: {"seed", "episode", "step", "success", "done", "truncated", "time"} (reliable, transient local).

Observations are exactly what `Task.reset`/`Task.step` return, as in-process evaluation sees them.

Commands (the newest message of any command topic is the active command):
- `/forward_command_controller/commands` std_msgs/Float64MultiArray: one 7-d OSC delta action
  (dx, dy, dz, droll, dpitch, dyaw, gripper) in [-1, 1], applied from the next step on.
- `/joint_trajectory_controller/joint_trajectory` trajectory_msgs/JointTrajectory: a chunk, joint
  names `dx dy dz droll dpitch dyaw gripper` (any order); point i is due at header.stamp +
  time_from_start (stamp 0: on receipt); each step applies the newest point that is due.
- `/cmd_vel` geometry_msgs/Twist (teleoperation): end-effector velocity in m/s and rad/s, mapped to
  the delta action as action = velocity / full scale, clipped to [-1, 1]. The full scales default to
  what an action of 1 commands, 0.05 m and 0.5 rad per 1/20 s step: `cmd_vel_linear_full_scale`
  1.0 m/s and `cmd_vel_angular_full_scale` 10.0 rad/s. The gripper comes from `/gripper_command`.
- `/gripper_command` std_msgs/Float64: +1 closes, -1 opens; kept until the next one (no timeout).
A motion command older than `command_timeout` (default 0.2 s), or a trajectory whose last point is
past, gives zero motion; the gripper keeps its last command (0 for the Panda gripper also keeps it).

Stepping (`step_mode`):
- `realtime`: a timer on the steady wall clock steps at the task's control rate (20 Hz) with the
  active command; time is the wall clock, as on hardware. Period statistics are logged per episode.
- `commanded`: one step per received motion command (Float64MultiArray, JointTrajectory or Twist),
  as fast as commands arrive, so the sender must send one per control period (a JointTrajectory
  steps once, with its point due now: a policy sending one chunk per replan wants `forward`).
  Time is simulated: it starts at the wall-clock time of the node's start and advances
  1/control_hz per step (and per reset), so consumers run with `use_sim_time:=true` and follow
  `/clock`. The steps run on the executor (a guard condition), not in the subscription callback.

Episodes: the node starts in the first seed's initial state. `~/reset` (std_srvs/Trigger; the reply's
message is JSON {"seed", "episode"}) starts the next seed: `seeds` when given, otherwise `seed`,
`seed`+1, ...; setting the parameter `seed` at run time restarts that sequence at the new value (so
the next reset uses it). In realtime mode a new episode stands still (its state published every
period, not stepped) until the first motion command arrives, so that a policy or an operator starts
it from exactly the seed's initial state, as in-process evaluation does. An episode is done at
success or after `max_steps` steps (default: the task's); a done episode takes no more steps until
the next reset.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from robomosaic.ros_nodes.common import require_rclpy, run_node

ACTION_NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
GRIPPER = ACTION_NAMES.index("gripper")
STEP_MODES = ("realtime", "commanded")
# robosuite's OSC_POSE default output limits: an action of 1 is 0.05 m / 0.5 rad per control step.
MAX_DELTA_POS, MAX_DELTA_ROT = 0.05, 0.5


def twist_to_action(
    velocity: np.ndarray, gripper: float, linear_full_scale: float, angular_full_scale: float
) -> np.ndarray:
    """An end-effector velocity (linear m/s, angular rad/s) as the 7-d OSC delta action."""
    velocity = np.asarray(velocity, dtype=np.float64)
    scaled = np.concatenate([velocity[:3] / linear_full_scale, velocity[3:6] / angular_full_scale])
    return np.append(np.clip(scaled, -1.0, 1.0), gripper)


@dataclass
class _Trajectory:
    times: np.ndarray  # (H,) absolute due times, seconds
    actions: np.ndarray  # (H, 7)


class CommandBuffer:
    """The active motion command and the sticky gripper command; thread-safe.

    Written by hand: ros2_control's controllers interpolate joint positions, while these are delta
    actions, of which a stale one must become zero motion, not be held.
    """

    def __init__(self, timeout: float, dt: float) -> None:
        self.timeout, self.dt = float(timeout), float(dt)
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._kind: str | None = None
            self._received = -np.inf
            self._action = np.zeros(len(ACTION_NAMES))
            self._trajectory: _Trajectory | None = None
            self._gripper = 0.0

    def set_action(self, action: np.ndarray, received: float, kind: str = "forward") -> None:
        with self._lock:
            self._kind, self._received, self._action = kind, received, np.asarray(action, np.float64)
            self._gripper = float(self._action[GRIPPER])

    def set_trajectory(self, times: np.ndarray, actions: np.ndarray, received: float) -> None:
        with self._lock:
            self._kind, self._received = "trajectory", received
            self._trajectory = _Trajectory(np.asarray(times, np.float64), np.asarray(actions, np.float64))

    def set_gripper(self, value: float) -> None:
        with self._lock:
            self._gripper = float(value)

    @property
    def gripper(self) -> float:
        with self._lock:
            return self._gripper

    def action_at(self, now: float, fresh: bool = False) -> tuple[np.ndarray, str]:
        """The action to apply at `now` and where it came from (`forward`, `trajectory`, `twist`,
        `stale`, `none`). `fresh` skips the timeout (commanded mode: the command is the step)."""
        with self._lock:
            zero = np.zeros(len(ACTION_NAMES))
            zero[GRIPPER] = self._gripper
            if self._kind is None:
                return zero, "none"
            if self._kind == "trajectory":
                traj = self._trajectory
                due = np.flatnonzero(traj.times <= now + 0.5 * self.dt)  # half a step of clock jitter
                spacing = float(np.diff(traj.times)[-1]) if len(traj.times) > 1 else self.dt
                if not due.size or now > traj.times[-1] + max(spacing, self.dt) + 1e-9:
                    return zero, "stale"
                action = traj.actions[due[-1]].copy()
                self._gripper = float(action[GRIPPER])
                return action, "trajectory"
            if not fresh and now - self._received > self.timeout + 1e-9:
                return zero, "stale"
            return self._action.copy(), self._kind


class RealtimeStats:
    """Wall-clock periods between realtime ticks and the compute time of each step."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.periods: list[float] = []
        self.step_seconds: list[float] = []
        self._last: float | None = None

    def tick(self) -> None:
        now = time.monotonic()
        if self._last is not None:
            self.periods.append(now - self._last)
        self._last = now

    def summary(self) -> dict[str, float]:
        if not self.periods:
            return {}
        ms = 1000 * np.asarray(self.periods)
        error = np.abs(ms - 1000 * self.period)
        return {
            "ticks": len(ms) + 1,
            "period_ms_mean": float(ms.mean()),
            "period_error_ms_p50": float(np.percentile(error, 50)),
            "period_error_ms_p99": float(np.percentile(error, 99)),
            "period_ms_max": float(ms.max()),
            "overruns": int(np.sum(ms > 1500 * self.period)),
            "step_ms_mean": 1000 * statistics.fmean(self.step_seconds) if self.step_seconds else 0.0,
        }

    def reset(self) -> None:
        self.periods, self.step_seconds, self._last = [], [], None


def _make_node_class():  # rclpy is imported only when a node is built
    require_rclpy()
    from geometry_msgs.msg import PoseStamped, Twist
    from rcl_interfaces.msg import SetParametersResult
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from rclpy.clock import Clock, ClockType
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock as ClockMsg
    from sensor_msgs.msg import CompressedImage, Image, JointState
    from std_msgs.msg import Float64, Float64MultiArray, String
    from std_srvs.srv import Trigger
    from trajectory_msgs.msg import JointTrajectory

    from robomosaic.ros_nodes import messages
    from robomosaic.ros_nodes.common import command_qos, seconds_to_stamp, sensor_qos, stamp_to_seconds
    from robomosaic.sim.tasks import TASKS, make_task

    class SimNode(Node):
        def __init__(self, name: str = "sim") -> None:
            super().__init__(name)
            p = self._declare_parameters()
            if self.get_parameter("use_sim_time").value:
                raise ValueError(
                    "robomosaic-sim-node makes the simulated time: do not set use_sim_time on it"
                )
            if p["task"] not in TASKS:
                raise ValueError(f"parameter task={p['task']!r} is not a registered task: {sorted(TASKS)}")
            if p["step_mode"] not in STEP_MODES:
                raise ValueError(f"parameter step_mode={p['step_mode']!r} must be one of {STEP_MODES}")
            for key in ("command_timeout", "cmd_vel_linear_full_scale", "cmd_vel_angular_full_scale"):
                if p[key] <= 0:
                    raise ValueError(f"parameter {key}={p[key]} must be positive")
            self.step_mode = p["step_mode"]
            self.frame_id = p["frame_id"]
            self.linear_scale = p["cmd_vel_linear_full_scale"]
            self.angular_scale = p["cmd_vel_angular_full_scale"]
            self.cameras = tuple(c for c in p["cameras"] if c)
            self.publish_compressed = p["publish_compressed"]
            self.task = make_task(
                p["task"], cameras=self.cameras, image_size=p["image_size"], max_steps=p["max_steps"] or None
            )
            self.dt = 1.0 / self.task.spec.control_hz
            self.commands = CommandBuffer(p["command_timeout"], self.dt)
            self.stats = RealtimeStats(self.dt)
            self._seeds = [int(s) for s in p["seeds"]]
            self._first_seed = int(p["seed"])
            self._next_index = 0
            self.episode = -1
            robot = self.task.env.robots[0]
            self.arm_joints = list(robot.robot_joints)
            self.finger_joints = [j for joints in robot.gripper_joints.values() for j in joints]
            sim = self.task.env.sim
            self._qpos = [sim.model.get_joint_qpos_addr(j) for j in self.arm_joints]
            self._qvel = [sim.model.get_joint_qvel_addr(j) for j in self.arm_joints + self.finger_joints]

            # Publishers.
            sensor = sensor_qos()
            self.pub_joints = self.create_publisher(JointState, "/joint_states", sensor)
            self.pub_eef = self.create_publisher(PoseStamped, "/eef_pose", sensor)
            self.pub_object = self.create_publisher(Float64MultiArray, "/object_state", sensor)
            self.pub_objects = {
                name: self.create_publisher(PoseStamped, f"/objects/{name}/pose", sensor)
                for name in self.task.object_poses()
            }
            self.pub_images = {
                cam: self.create_publisher(Image, f"/{cam}/image_raw", sensor) for cam in self.cameras
            }
            self.pub_compressed = {
                cam: self.create_publisher(CompressedImage, f"/{cam}/image_raw/compressed", sensor)
                for cam in (self.cameras if self.publish_compressed else ())
            }
            self.pub_clock = (
                self.create_publisher(ClockMsg, "/clock", QoSProfile(depth=1)) if p["publish_clock"] else None
            )
            latched = QoSProfile(
                depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
            )
            self.pub_episode = self.create_publisher(String, "~/episode", latched)

            # Stepping and resets share one mutually exclusive group: they never overlap, so the task
            # needs no lock; command callbacks run beside them in their own group.
            self.step_group = MutuallyExclusiveCallbackGroup()
            command_group = MutuallyExclusiveCallbackGroup()
            commands = command_qos()
            self.create_subscription(
                Float64MultiArray, "/forward_command_controller/commands", self._on_forward, commands,
                callback_group=command_group,
            )  # fmt: skip
            self.create_subscription(
                JointTrajectory, "/joint_trajectory_controller/joint_trajectory", self._on_trajectory,
                commands, callback_group=command_group,
            )  # fmt: skip
            self.create_subscription(
                Twist, "/cmd_vel", self._on_twist, commands, callback_group=command_group
            )
            self.create_subscription(
                Float64, "/gripper_command", self._on_gripper, commands, callback_group=command_group
            )
            self.create_service(Trigger, "~/reset", self._on_reset, callback_group=self.step_group)
            self.add_on_set_parameters_callback(self._on_set_parameters)

            self._pending: deque[tuple[str, Any]] = deque(maxlen=10)
            self._pending_lock = threading.Lock()
            if self.step_mode == "realtime":
                self._time = self._wall_time()
                self.create_timer(
                    self.dt, self._on_tick, callback_group=self.step_group,
                    clock=Clock(clock_type=ClockType.STEADY_TIME),
                )  # fmt: skip
            else:
                self._time = self._wall_time()
                self._wake = self.create_guard_condition(self._on_commanded, callback_group=self.step_group)
            self._start_episode()
            self.get_logger().info(
                f"task {self.task.name} ({self.step_mode}, {1 / self.dt:g} Hz, "
                f"cameras {list(self.cameras)}), episode seed {self.seed}"
            )

        def _declare_parameters(self) -> dict[str, Any]:
            defaults = {
                "task": "lift",
                "cameras": Parameter.Type.STRING_ARRAY,  # typed, unset: no cameras
                "image_size": 84,
                "publish_compressed": True,
                "step_mode": "realtime",
                "seed": 0,
                "seeds": Parameter.Type.INTEGER_ARRAY,  # typed, unset: seed, seed + 1, ...
                "max_steps": 0,
                "command_timeout": 0.2,
                "publish_clock": True,
                "frame_id": "world",
                "cmd_vel_linear_full_scale": MAX_DELTA_POS * 20.0,
                "cmd_vel_angular_full_scale": MAX_DELTA_ROT * 20.0,
            }
            values = {key: self.declare_parameter(key, default).value for key, default in defaults.items()}
            values["cameras"] = values["cameras"] or []
            values["seeds"] = values["seeds"] or []
            return values

        # -- time ---------------------------------------------------------------------------------
        def _wall_time(self) -> float:
            return self.get_clock().now().nanoseconds * 1e-9

        def now(self) -> float:
            """The robot's time: the wall clock (realtime) or the simulated time (commanded)."""
            return self._wall_time() if self.step_mode == "realtime" else self._time

        # -- episodes -----------------------------------------------------------------------------
        def _start_episode(self) -> None:
            seq = self._seeds
            index = self._next_index
            self.seed = seq[index % len(seq)] if seq else self._first_seed + index
            self._next_index += 1
            self.episode += 1
            if self.step_mode == "realtime" and self.stats.periods:
                self.get_logger().info(f"realtime timing of the last episode: {self.stats.summary()}")
            self.stats.reset()
            self.obs = self.task.reset(self.seed)
            self.steps, self.success, self.truncated, self.done = 0, False, False, False
            self.started = False  # realtime: the first motion command starts the episode's steps
            self.commands.clear()
            with self._pending_lock:
                self._pending.clear()
            if self.step_mode == "commanded":
                self._time += self.dt  # a reset takes one period, so that followers' timers see time move
            self._publish(self.now())

        def _on_reset(self, request, response):
            self._start_episode()
            response.success = True
            response.message = json.dumps({"seed": self.seed, "episode": self.episode})
            return response

        def _on_set_parameters(self, params) -> SetParametersResult:
            for param in params:
                if param.name == "seed":
                    self._first_seed, self._seeds, self._next_index = int(param.value), [], 0
                elif param.name == "seeds":
                    self._seeds, self._next_index = [int(s) for s in param.value], 0
            return SetParametersResult(successful=True)

        # -- stepping -----------------------------------------------------------------------------
        def _step(self, action: np.ndarray) -> None:
            start = time.perf_counter()
            self.obs, _, self.success, self.truncated, _ = self.task.step(action)
            self.stats.step_seconds.append(time.perf_counter() - start)
            self.steps += 1
            self.done = self.success or self.truncated

        def _on_tick(self) -> None:
            self.stats.tick()
            now = self.now()
            if self.started and not self.done:
                action, _ = self.commands.action_at(now)
                self._step(action)
            self._publish(self._wall_time())

        def _on_commanded(self) -> None:
            while True:
                with self._pending_lock:
                    if not self._pending:
                        return
                    kind, payload = self._pending.popleft()
                if self.done:
                    continue  # a finished episode takes no steps until the next reset
                self._apply(kind, payload, received=self._time)
                action, _ = self.commands.action_at(self._time, fresh=True)
                self._step(action)
                self._time += self.dt
                self._publish(self._time)

        # -- commands -----------------------------------------------------------------------------
        def _command(self, kind: str, payload: Any) -> None:
            if self.step_mode == "realtime":
                self._apply(kind, payload, received=self.now())
            else:
                with self._pending_lock:
                    self._pending.append((kind, payload))
                self._wake.trigger()

        def _apply(self, kind: str, payload: Any, received: float) -> None:
            self.started = True
            if kind == "trajectory":
                start, relative, dt, chunk = payload
                start += received if relative else 0.0  # a zero header stamp means "on receipt"
                self.commands.set_trajectory(start + dt * np.arange(len(chunk)), chunk, received)
            else:
                self.commands.set_action(payload, received, kind)

        def _on_forward(self, msg) -> None:
            action = np.asarray(msg.data, dtype=np.float64)
            if action.shape != (len(ACTION_NAMES),) or not np.all(np.isfinite(action)):
                self.get_logger().warning(
                    f"/forward_command_controller/commands: ignored {action.tolist()} "
                    f"(need {len(ACTION_NAMES)} finite values {ACTION_NAMES})",
                    throttle_duration_sec=1.0,
                )
                return
            self._command("forward", action)

        def _on_trajectory(self, msg) -> None:
            try:
                start, dt, chunk, names = messages.joint_trajectory_to_chunk(msg)
                chunk = np.asarray(chunk, dtype=np.float64)
                if names and list(names) != ACTION_NAMES:
                    unknown = sorted(set(names) ^ set(ACTION_NAMES))
                    if unknown:
                        raise ValueError(f"joint names must be {ACTION_NAMES}, got {list(names)}")
                    chunk = chunk[:, [list(names).index(n) for n in ACTION_NAMES]]
                if chunk.ndim != 2 or chunk.shape[1] != len(ACTION_NAMES) or not np.all(np.isfinite(chunk)):
                    raise ValueError(f"need finite points of {len(ACTION_NAMES)} values, got {chunk.shape}")
            except ValueError as e:
                self.get_logger().warning(
                    f"/joint_trajectory_controller/joint_trajectory: ignored ({e})", throttle_duration_sec=1.0
                )
                return
            relative = msg.header.stamp.sec == 0 and msg.header.stamp.nanosec == 0
            self._command("trajectory", (float(start), relative, float(dt), chunk))

        def _on_twist(self, msg) -> None:
            velocity = np.asarray(messages.twist_to_array(msg), dtype=np.float64)
            if not np.all(np.isfinite(velocity)):
                self.get_logger().warning("/cmd_vel: ignored a non-finite twist", throttle_duration_sec=1.0)
                return
            action = twist_to_action(velocity, self.commands.gripper, self.linear_scale, self.angular_scale)
            self._command("twist", action)

        def _on_gripper(self, msg) -> None:
            if np.isfinite(msg.data):
                self.commands.set_gripper(float(np.clip(msg.data, -1.0, 1.0)))

        # -- publishing ---------------------------------------------------------------------------
        def _publish(self, t: float) -> None:
            stamp = seconds_to_stamp(t)
            obs, sim = self.obs, self.task.env.sim
            position = np.concatenate([sim.data.qpos[self._qpos], obs["robot0_gripper_qpos"]])
            self.pub_joints.publish(
                messages.joint_state_msg(
                    self.arm_joints + self.finger_joints, position, sim.data.qvel[self._qvel], stamp
                )
            )
            self.pub_eef.publish(
                messages.pose_stamped_msg(obs["robot0_eef_pos"], obs["robot0_eef_quat"], self.frame_id, stamp)
            )
            self.pub_object.publish(messages.float64_array_msg(obs["object"]))
            for name, (xyz, xyzw) in self.task.object_poses().items():
                self.pub_objects[name].publish(messages.pose_stamped_msg(xyz, xyzw, self.frame_id, stamp))
            for cam, pub in self.pub_images.items():
                pub.publish(messages.image_msg(obs[f"{cam}_image"], cam, stamp))
            for cam, pub in self.pub_compressed.items():
                pub.publish(messages.compressed_image_msg(obs[f"{cam}_image"], cam, stamp))
            if self.pub_clock is not None:
                self.pub_clock.publish(ClockMsg(clock=stamp))
            status = {
                "seed": self.seed,
                "episode": self.episode,
                "step": self.steps,
                "success": self.success,
                "done": self.done,
                "truncated": self.truncated,
                "time": stamp_to_seconds(stamp),
            }
            self.pub_episode.publish(String(data=json.dumps(status)))

        def on_shutdown(self) -> None:
            if self.step_mode == "realtime" and self.stats.periods:
                self.get_logger().info(f"realtime timing of the last episode: {self.stats.summary()}")
            # The task is not closed here: a step may still run on another executor thread; the
            # process ends next.

    return SimNode


def main(argv: Sequence[str] | None = None) -> None:
    """robomosaic-sim-node (standard ROS arguments: --ros-args -p task:=lift ...)."""
    run_node("robomosaic-sim-node", lambda: _make_node_class()(), argv)


if __name__ == "__main__":
    main()
