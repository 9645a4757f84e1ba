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

Stepping, episodes, `~/reset`, `~/episode` and `/clock` are what this node shares with
robomosaic-mobility-sim-node (robomosaic.ros_nodes.stepped_sim).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from robomosaic.ros_nodes.common import run_node
from robomosaic.ros_nodes.stepped_sim import stepped_sim_node_class

ACTION_NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
GRIPPER = ACTION_NAMES.index("gripper")
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


def _make_node_class():  # rclpy is imported only when a node is built
    base = stepped_sim_node_class()  # first: it says how to get rclpy if it is missing
    from geometry_msgs.msg import PoseStamped, Twist
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import CompressedImage, Image, JointState
    from std_msgs.msg import Float64, Float64MultiArray
    from trajectory_msgs.msg import JointTrajectory

    from robomosaic.ros_nodes import messages
    from robomosaic.ros_nodes.common import command_qos, sensor_qos
    from robomosaic.sim.tasks import TASKS, make_task

    class SimNode(base):
        def __init__(self, name: str = "sim") -> None:
            parameters = {
                "task": "lift",
                "cameras": Parameter.Type.STRING_ARRAY,  # typed, unset: no cameras
                "image_size": 84,
                "publish_compressed": True,
                "max_steps": 0,
                "frame_id": "world",
                "cmd_vel_linear_full_scale": MAX_DELTA_POS * 20.0,
                "cmd_vel_angular_full_scale": MAX_DELTA_ROT * 20.0,
            }
            super().__init__(name, "robomosaic-sim-node", parameters)

        def _setup(self, p: dict[str, Any]) -> float:
            if p["task"] not in TASKS:
                raise ValueError(f"parameter task={p['task']!r} is not a registered task: {sorted(TASKS)}")
            for key in ("cmd_vel_linear_full_scale", "cmd_vel_angular_full_scale"):
                if p[key] <= 0:
                    raise ValueError(f"parameter {key}={p[key]} must be positive")
            self.frame_id = p["frame_id"]
            self.linear_scale = p["cmd_vel_linear_full_scale"]
            self.angular_scale = p["cmd_vel_angular_full_scale"]
            self.cameras = tuple(c for c in p["cameras"] if c)
            self.task = make_task(
                p["task"], cameras=self.cameras, image_size=p["image_size"], max_steps=p["max_steps"] or None
            )
            dt = 1.0 / self.task.spec.control_hz
            self.commands = CommandBuffer(p["command_timeout"], dt)
            robot = self.task.env.robots[0]
            self.arm_joints = list(robot.robot_joints)
            self.finger_joints = [j for joints in robot.gripper_joints.values() for j in joints]
            sim = self.task.env.sim
            self._qpos = [sim.model.get_joint_qpos_addr(j) for j in self.arm_joints]
            self._qvel = [sim.model.get_joint_qvel_addr(j) for j in self.arm_joints + self.finger_joints]

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
                for cam in (self.cameras if p["publish_compressed"] else ())
            }

            commands, group = command_qos(), self.command_group
            self.create_subscription(
                Float64MultiArray, "/forward_command_controller/commands", self._on_forward, commands,
                callback_group=group,
            )  # fmt: skip
            self.create_subscription(
                JointTrajectory, "/joint_trajectory_controller/joint_trajectory", self._on_trajectory,
                commands, callback_group=group,
            )  # fmt: skip
            self.create_subscription(Twist, "/cmd_vel", self._on_twist, commands, callback_group=group)
            self.create_subscription(
                Float64, "/gripper_command", self._on_gripper, commands, callback_group=group
            )
            return dt

        def _describe(self) -> str:
            hz = 1 / self.dt
            return f"task {self.task.name} ({self.step_mode}, {hz:g} Hz, cameras {list(self.cameras)})"

        # -- episodes and steps -------------------------------------------------------------------
        def _reset_world(self, seed: int) -> None:
            self.obs = self.task.reset(seed)

        def _new_episode(self) -> None:
            super()._new_episode()
            self.steps, self.success, self.truncated = 0, False, False
            self.commands.clear()

        def _step_world(self, action: np.ndarray) -> None:
            self.obs, _, self.success, self.truncated, _ = self.task.step(action)
            self.steps += 1
            self.done = self.success or self.truncated

        # -- commands -----------------------------------------------------------------------------
        def _apply_command(self, command: tuple[str, Any], received: float) -> None:
            kind, payload = command
            if kind == "trajectory":
                start, relative, dt, chunk = payload
                start += received if relative else 0.0  # a zero header stamp means "on receipt"
                self.commands.set_trajectory(start + dt * np.arange(len(chunk)), chunk, received)
            else:
                self.commands.set_action(payload, received, kind)

        def _action_at(self, now: float, fresh: bool) -> np.ndarray:
            return self.commands.action_at(now, fresh)[0]

        def _on_forward(self, msg) -> None:
            action = np.asarray(msg.data, dtype=np.float64)
            if action.shape != (len(ACTION_NAMES),) or not np.all(np.isfinite(action)):
                self.get_logger().warning(
                    f"/forward_command_controller/commands: ignored {action.tolist()} "
                    f"(need {len(ACTION_NAMES)} finite values {ACTION_NAMES})",
                    throttle_duration_sec=1.0,
                )
                return
            self._command(("forward", action))

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
            self._command(("trajectory", (float(start), relative, float(dt), chunk)))

        def _on_twist(self, msg) -> None:
            velocity = np.asarray(messages.twist_to_array(msg), dtype=np.float64)
            if not np.all(np.isfinite(velocity)):
                self.get_logger().warning("/cmd_vel: ignored a non-finite twist", throttle_duration_sec=1.0)
                return
            action = twist_to_action(velocity, self.commands.gripper, self.linear_scale, self.angular_scale)
            self._command(("twist", action))

        def _on_gripper(self, msg) -> None:
            if np.isfinite(msg.data):
                self.commands.set_gripper(float(np.clip(msg.data, -1.0, 1.0)))

        # -- publishing ---------------------------------------------------------------------------
        def _publish_state(self, stamp: Any) -> None:
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

        def _status(self) -> dict[str, Any]:
            return {
                "step": self.steps,
                "success": self.success,
                "done": self.done,
                "truncated": self.truncated,
            }

    return SimNode


def main(argv: Sequence[str] | None = None) -> None:
    """robomosaic-sim-node (standard ROS arguments: --ros-args -p task:=lift ...)."""
    run_node("robomosaic-sim-node", lambda: _make_node_class()(), argv)


if __name__ == "__main__":
    main()
