"""robomosaic-mobility-sim-node: a navigation world of robomosaic.sim.mobility exposed as a mobile
base with Nav2's topic names and types.

    robomosaic-mobility-sim-node --ros-args -p embodiment:=carter -p seed:=1000000
    python -m robomosaic.ros_nodes.mobility_sim_node --ros-args -p embodiment:=kaya -p step_mode:=commanded

One `MobilityEnv` world: a room drawn from the seed, the embodiment's dynamics, footprint and range
scanner (`embodiment`: carter, kaya, h1, spot, g1). Frames: `odom` is the simulator's world frame
(the room, origin at a corner; an episode starts at the world's start pose, not at the origin),
`base_link` the base (x forward, scans from its axis).

Published (stamped with the time of the state they describe, as robomosaic-sim-node does):
- `/odom` nav_msgs/Odometry: the base's pose in `odom` (z 0, yaw as a quaternion), child frame
  `base_link`, and as twist the measured body-frame velocity (linear x, y; angular z).
- `/scan` sensor_msgs/LaserScan, frame `base_link`: the scan as the embodiment's scanner produces it
  (`MobilityEnv.raw_scan`: its field of view and ray count, range noise, range_max where no ray hits).
- `/plan` nav_msgs/Path in `odom`: the planner's route from where the base is (`MobilityEnv.route`:
  waypoints about 0.5, 1, 1.5 and 2 m along the shortest path), then the goal; replanned every step.
- `/tf` tf2_msgs/TFMessage odom -> base_link where tf2_msgs is installed (on a ROS 2 install; it is
  not on PyPI: with rclpy from pip the transform is in /odom only, and the node says so at start).
- `/clock` rosgraph_msgs/Clock (`publish_clock`), `~/episode` std_msgs/String JSON after every step,
  goal and reset: {"seed", "episode", "step", "success", "collision", "done", "truncated", "time"}
  (reliable, transient local).

Commands:
- `/cmd_vel` geometry_msgs/Twist: linear.x, linear.y (a differential drive ignores it) and
  angular.z, the body-frame velocity command, which the embodiment's dynamics clip to its limits.
  A command older than `command_timeout` (default 0.2 s) commands zero velocity (the base then
  slows down at its acceleration limits).
- `/goal_pose` geometry_msgs/PoseStamped (frame `odom`, or empty; the orientation is not used): a new
  goal in the current world, reached from where the base stands: a new episode on the same seed.
  A goal outside the room, or inside or too near an obstacle for the footprint, is refused with an
  error naming the goal and the world (`World.check_free`), and the previous goal stays.

Stepping (`step_mode`), episodes, `~/reset`, `~/episode` and `/clock` as robomosaic-sim-node's
(both are robomosaic.ros_nodes.stepped_sim's): `realtime` steps at the control rate (10 Hz) on the
steady wall clock, a new episode standing still until the first command; `commanded` takes one
step per /cmd_vel message, on simulated time that starts at the node's start and advances one
period per step and per reset (followers use `use_sim_time:=true`).

Episodes: the node starts in the first seed's world. `~/reset` (std_srvs/Trigger; the reply's message
is JSON {"seed", "episode"}) starts the next seed: `seeds` when given, otherwise `seed`, `seed`+1, ...;
setting `seed` at run time restarts that sequence. An episode ends at success (within GOAL_RADIUS of
the goal), at the first collision, or after `max_steps` steps (default 500: 50 s); a finished
episode takes no more steps until a reset or a new goal. The read-only parameter `task` (nav) names
the task for robomosaic-ros-eval, which drives episodes through `seed`, `~/reset` and `~/episode`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from robomosaic.ros_nodes import messages
from robomosaic.ros_nodes.common import run_node
from robomosaic.ros_nodes.stepped_sim import stepped_sim_node_class
from robomosaic.sim.mobility.env import CONTROL_HZ

ODOM_FRAME, BASE_FRAME = "odom", "base_link"


def state_messages(env: Any, stamp: Any) -> tuple[Any, Any, Any, Any]:
    """The /odom, /scan and /plan messages of world 0 of the MobilityEnv `env` (see the module
    docstring) and its odom -> base_link TransformStamped, all stamped `stamp`."""
    x, y, yaw = env.pose[0]
    quat = messages.yaw_quaternion(yaw)
    vx, vy, wz = env.velocity[0]
    odom = messages.odometry_msg(
        [x, y, 0.0], quat, [vx, vy, 0.0], [0.0, 0.0, wz], ODOM_FRAME, BASE_FRAME, stamp
    )
    scanner = env.embodiments[0].scan
    scan = messages.laser_scan_msg(
        env.raw_scan(0), scanner.angles(), scanner.range, BASE_FRAME, stamp, 1.0 / CONTROL_HZ
    )
    plan = messages.path_msg(np.vstack([env.route(0), env.worlds[0].goal]), ODOM_FRAME, stamp)
    transform = messages.transform_stamped_msg([x, y, 0.0], quat, ODOM_FRAME, BASE_FRAME, stamp)
    return odom, scan, plan, transform


class VelocityCommand:
    """The newest /cmd_vel (vx, vy, yaw rate) and when it arrived; thread-safe."""

    def __init__(self, timeout: float) -> None:
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._velocity, self._received = np.zeros(3), -np.inf

    def set(self, velocity: np.ndarray, received: float) -> None:
        with self._lock:
            self._velocity, self._received = np.asarray(velocity, dtype=np.float64), received

    def at(self, now: float) -> np.ndarray:
        """The command to apply at `now`: zero once it is older than the timeout."""
        with self._lock:
            fresh = now - self._received <= self.timeout + 1e-9
            return self._velocity.copy() if fresh else np.zeros(3)


def _make_node_class():  # rclpy is imported only when a node is built
    base = stepped_sim_node_class()  # first: it says how to get rclpy if it is missing
    from geometry_msgs.msg import PoseStamped, Twist
    from nav_msgs.msg import Odometry, Path
    from rcl_interfaces.msg import ParameterDescriptor
    from sensor_msgs.msg import LaserScan

    from robomosaic.ros_nodes.common import command_qos, sensor_qos
    from robomosaic.sim.mobility.embodiments import embodiment_names, load_embodiment
    from robomosaic.sim.mobility.env import MAX_STEPS, MobilityEnv
    from robomosaic.sim.mobility.worlds import WorldError

    try:
        from tf2_msgs.msg import TFMessage
    except ImportError:  # not on PyPI (see the module docstring)
        TFMessage = None

    class MobilitySimNode(base):
        def __init__(self, name: str = "mobility_sim") -> None:
            parameters = {"embodiment": "carter", "max_steps": 0}
            super().__init__(name, "robomosaic-mobility-sim-node", parameters)

        def _setup(self, p: dict[str, Any]) -> float:
            if p["embodiment"] not in embodiment_names():
                raise ValueError(
                    f"parameter embodiment={p['embodiment']!r} is not one of {embodiment_names()}"
                )
            if p["max_steps"] < 0:
                raise ValueError(f"parameter max_steps={p['max_steps']} must be >= 0 (0: {MAX_STEPS})")
            self.declare_parameter(
                "task", "nav", ParameterDescriptor(read_only=True)
            )  # for robomosaic-ros-eval
            self.embodiment = load_embodiment(p["embodiment"])
            self.env = MobilityEnv([self.embodiment], max_steps=p["max_steps"] or MAX_STEPS)
            self.command = VelocityCommand(p["command_timeout"])

            sensor = sensor_qos()
            self.pub_odom = self.create_publisher(Odometry, "/odom", sensor)
            self.pub_scan = self.create_publisher(LaserScan, "/scan", sensor)
            self.pub_plan = self.create_publisher(Path, "/plan", sensor)
            self.pub_tf = self.create_publisher(TFMessage, "/tf", 10) if TFMessage is not None else None

            commands = command_qos()
            self.create_subscription(
                Twist, "/cmd_vel", self._on_twist, commands, callback_group=self.command_group
            )
            # A goal starts an episode: it runs with the steps and resets.
            self.create_subscription(
                PoseStamped, "/goal_pose", self._on_goal, commands, callback_group=self.step_group
            )
            return 1.0 / CONTROL_HZ

        def _describe(self) -> str:
            tf = "/tf" if TFMessage is not None else "no /tf (tf2_msgs is not installed; /odom has the pose)"
            return (
                f"embodiment {self.embodiment.name} ({self.embodiment.drive}, {self.step_mode}, "
                f"{CONTROL_HZ:g} Hz, {self.embodiment.scan.rays} scan rays, {tf})"
            )

        # -- episodes and steps -------------------------------------------------------------------
        def _reset_world(self, seed: int) -> None:
            self.env.reset([seed])

        def _new_episode(self) -> None:
            super()._new_episode()
            self.success = self.collision = self.truncated = False
            self.command.clear()

        def _on_goal(self, msg) -> None:
            goal = np.array([msg.pose.position.x, msg.pose.position.y])
            where = f"/goal_pose ({goal[0]:.2f}, {goal[1]:.2f}) in world {self.seed}"
            if msg.header.frame_id not in ("", ODOM_FRAME):
                self.get_logger().error(
                    f"{where}: refused, frame {msg.header.frame_id!r} (goals are in {ODOM_FRAME!r})"
                )
                return
            try:
                self.env.set_goal(0, goal)
            except WorldError as e:
                old = self.env.worlds[0].goal
                self.get_logger().error(
                    f"{where}: refused ({e}); keeping the goal ({old[0]:.2f}, {old[1]:.2f})"
                )
                return
            self._new_episode()
            self.get_logger().info(f"{where}: new goal, episode {self.episode}")
            self._publish()

        def _step_world(self, velocity: np.ndarray) -> None:
            _, _, _, truncated, info = self.env.step(velocity[None])
            self.success, self.collision = bool(info["success"][0]), bool(info["collision"][0])
            self.truncated = bool(truncated[0])
            self.done = self.success or self.collision or self.truncated

        # -- commands -----------------------------------------------------------------------------
        def _on_twist(self, msg) -> None:
            velocity = messages.twist_to_array(msg)[[0, 1, 5]]  # linear x, y; angular z
            if not np.all(np.isfinite(velocity)):
                self.get_logger().warning("/cmd_vel: ignored a non-finite twist", throttle_duration_sec=1.0)
                return
            self._command(velocity)

        def _apply_command(self, velocity: np.ndarray, received: float) -> None:
            self.command.set(velocity, received)

        def _action_at(self, now: float, fresh: bool) -> np.ndarray:
            return self.command.at(now)  # a command applied at `now` is fresh

        # -- publishing ---------------------------------------------------------------------------
        def _publish_state(self, stamp: Any) -> None:
            odom, scan, plan, transform = state_messages(self.env, stamp)
            self.pub_odom.publish(odom)
            self.pub_scan.publish(scan)
            self.pub_plan.publish(plan)
            if self.pub_tf is not None:
                self.pub_tf.publish(TFMessage(transforms=[transform]))

        def _status(self) -> dict[str, Any]:
            return {
                "step": int(self.env.steps[0]),
                "success": self.success,
                "collision": self.collision,
                "done": self.done,
                "truncated": self.truncated,
            }

    return MobilitySimNode


def main(argv: Sequence[str] | None = None) -> None:
    """robomosaic-mobility-sim-node (standard ROS arguments: --ros-args -p embodiment:=carter ...)."""
    run_node("robomosaic-mobility-sim-node", lambda: _make_node_class()(), argv)


if __name__ == "__main__":
    main()
