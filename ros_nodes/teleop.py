"""robomosaic-teleop: drive the end effector from a terminal keyboard and control the recorder.

    robomosaic-teleop --ros-args -p linear_speed:=0.5 -p recorder:=/recorder

For machines without teleop_twist_keyboard (rclpy from pip), and because recording needs more keys
than it has: the gripper and the recorder's services. Publishes, at `rate` Hz (default 20):
- `/cmd_vel` geometry_msgs/Twist: end-effector velocity in m/s and rad/s (robomosaic-sim-node and
  robomosaic-record-node map it to the 7-d OSC delta action, 1 m/s and 10 rad/s being full scale).
- `/gripper_command` std_msgs/Float64: +1 closes, -1 opens (on each toggle, and with every Twist).

Keys (as printed at start):
    w/s  +x/-x      a/d  +y/-y      r/f  +z/-z           (linear_speed m/s, default 0.5)
    i/k  +roll/-    j/l  +pitch/-   u/o  +yaw/-          (angular_speed rad/s, default 5.0)
    space  toggle the gripper       1 start recording    2 stop: success    3 stop: failure
    0  discard the episode          q or Ctrl-C  quit
A motion key moves for `key_timeout` seconds (default 0.6 s, longer than the terminal's key-repeat
delay), so holding a key moves continuously and releasing it stops; zero velocity is published
between key presses, so the robot holds still rather than timing out. Reading the keyboard needs a
terminal (stdin a tty): the keys are read raw, without Enter, and the terminal is restored at exit.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Sequence
from typing import Any

import numpy as np

from robomosaic.ros_nodes.common import require_rclpy

# key -> (twist index, sign): linear x y z, angular x y z
MOTION_KEYS: dict[str, tuple[int, float]] = {
    "w": (0, 1.0), "s": (0, -1.0), "a": (1, 1.0), "d": (1, -1.0), "r": (2, 1.0), "f": (2, -1.0),
    "i": (3, 1.0), "k": (3, -1.0), "j": (4, 1.0), "l": (4, -1.0), "u": (5, 1.0), "o": (5, -1.0),
}  # fmt: skip
# key -> (recorder service, SetBool data or None for Trigger)
RECORDER_KEYS: dict[str, tuple[str, bool | None]] = {
    "1": ("start", None),
    "2": ("stop", True),
    "3": ("stop", False),
    "0": ("discard", None),
}
GRIPPER_KEY = " "
QUIT_KEYS = ("q", "\x03")  # q, Ctrl-C (raw mode delivers it as a character)
HELP = __doc__.split("Keys (as printed at start):\n", 1)[1].split("A motion key", 1)[0]


class KeyboardState:
    """The velocity and gripper the keys pressed so far command (no ROS, no terminal)."""

    def __init__(self, linear_speed: float, angular_speed: float, key_timeout: float) -> None:
        self.speeds = np.array([linear_speed] * 3 + [angular_speed] * 3)
        self.key_timeout = key_timeout
        self.gripper = -1.0  # open
        self._direction = np.zeros(6)
        self._until = np.full(6, -np.inf)  # per axis: a released key stops its own axis only

    def press(self, key: str, now: float) -> bool:
        """Apply a motion or gripper key; False for any other key."""
        if key in MOTION_KEYS:
            index, sign = MOTION_KEYS[key]
            self._direction[index] = sign
            self._until[index] = now + self.key_timeout
            return True
        if key == GRIPPER_KEY:
            self.gripper = -self.gripper
            return True
        return False

    def velocity(self, now: float) -> np.ndarray:
        """linear xyz (m/s), angular xyz (rad/s): the held keys' directions at their speeds."""
        return np.where(now <= self._until, self._direction * self.speeds, 0.0)


def _make_node_class():  # rclpy is imported only when a node is built
    require_rclpy()
    from geometry_msgs.msg import Twist
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.node import Node
    from std_msgs.msg import Float64
    from std_srvs.srv import SetBool, Trigger

    from robomosaic.ros_nodes import messages
    from robomosaic.ros_nodes.common import command_qos

    class TeleopNode(Node):
        def __init__(self, name: str = "teleop") -> None:
            super().__init__(name)
            p = {
                # dynamic typing: linear_speed:=1 is as good as 1.0
                key: self.declare_parameter(key, default, ParameterDescriptor(dynamic_typing=True)).value
                for key, default in {
                    "linear_speed": 0.5,
                    "angular_speed": 5.0,
                    "key_timeout": 0.6,
                    "rate": 20.0,
                    "recorder": "/recorder",
                }.items()
            }
            for key in ("linear_speed", "angular_speed", "key_timeout", "rate"):
                if not float(p[key]) > 0:
                    raise ValueError(f"parameter {key}={p[key]} must be positive")
            self.keys = KeyboardState(
                float(p["linear_speed"]), float(p["angular_speed"]), float(p["key_timeout"])
            )
            self.pub_twist = self.create_publisher(Twist, "/cmd_vel", command_qos())
            self.pub_gripper = self.create_publisher(Float64, "/gripper_command", command_qos())
            recorder = p["recorder"].rstrip("/")
            self.recorder_clients = {
                "start": self.create_client(Trigger, f"{recorder}/start"),
                "stop": self.create_client(SetBool, f"{recorder}/stop"),
                "discard": self.create_client(Trigger, f"{recorder}/discard"),
            }
            self.create_timer(1.0 / float(p["rate"]), self._publish)

        def key(self, key: str) -> None:
            now = time.monotonic()
            if self.keys.press(key, now):
                if key == GRIPPER_KEY:
                    self.get_logger().info("gripper " + ("closing" if self.keys.gripper > 0 else "opening"))
                    self.pub_gripper.publish(Float64(data=self.keys.gripper))
            elif key in RECORDER_KEYS:
                self._call(*RECORDER_KEYS[key])

        def _publish(self) -> None:
            self.pub_twist.publish(messages.twist_msg(self.keys.velocity(time.monotonic())))
            self.pub_gripper.publish(Float64(data=self.keys.gripper))

        def _call(self, service: str, data: bool | None) -> None:
            client = self.recorder_clients[service]
            if not client.service_is_ready():
                self.get_logger().warning(f"{client.srv_name} is not available (is the recorder running?)")
                return
            request = client.srv_type.Request()
            if data is not None:
                request.data = data
            client.call_async(request).add_done_callback(self._answered)

        def _answered(self, future: Any) -> None:
            answer = future.result()
            if answer.success:
                self.get_logger().info(answer.message)
            else:
                self.get_logger().warning(answer.message)

        def on_shutdown(self) -> None:
            self.pub_twist.publish(messages.twist_msg([0.0] * 6))

    return TeleopNode


def read_keys(node: Any, executor: Any) -> None:
    """Spin `node` while feeding it the keys typed on stdin (raw mode), until q or Ctrl-C."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        while True:
            executor.spin_once(timeout_sec=0.0)
            ready, _, _ = select.select([fd], [], [], 0.01)
            if not ready:
                continue
            key = os.read(fd, 1).decode(errors="ignore").lower()
            if key in QUIT_KEYS:
                return
            node.key(key)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def main(argv: Sequence[str] | None = None) -> None:
    """robomosaic-teleop (standard ROS arguments: --ros-args -p linear_speed:=0.5 ...)."""
    require_rclpy()
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    if not sys.stdin.isatty():
        raise SystemExit("robomosaic-teleop: reads the keyboard, so stdin must be a terminal")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds, so the terminal is restored
    rclpy.init(args=list(sys.argv if argv is None else ["robomosaic-teleop", *argv]))
    try:
        node = _make_node_class()()
    except ValueError as e:
        rclpy.try_shutdown()
        raise SystemExit(f"robomosaic-teleop: {e}") from None
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    print(HELP.replace("\n", "\r\n"), end="", flush=True)
    try:
        read_keys(node, executor)
    finally:
        node.on_shutdown()
        executor.spin_once(timeout_sec=0.1)
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
