"""robomosaic-bag-record: record ROS 2 topics into a rosbag2 bag with MCAP storage.

    robomosaic-bag-record --ros-args -p out:=bags/run1 \\
        -p topics:="['/eef_pose', '/joint_states', '/object_state', '/forward_command_controller/commands']"

What `ros2 bag record -s mcap <topics>` does, for machines where rosbag2 is not installed (it is not
on PyPI; on a ROS 2 machine from apt, `ros2 bag record` writes the same kind of bag). Messages are
taken serialized (`raw=True`) and written as they arrived, stamped with their receipt time, so
nothing is decoded or re-encoded; robomosaic-convert reads the bag with a mapping file.

Each topic is subscribed once it appears on the graph, with the publishers' reliability and
durability (a reliable subscription would receive nothing from a best-effort sensor publisher).
`~/status` (std_msgs/String JSON, 1 Hz): {"out", "messages": {topic: count}, "waiting": [topics]}.
SIGINT or SIGTERM closes the bag (writes metadata.yaml); after a SIGKILL the .mcap holds what was
flushed and metadata.yaml is missing: robomosaic-convert can still read the .mcap on its own.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Sequence
from typing import Any

from robomosaic.ros_nodes.common import run_node


def message_class(type_name: str) -> type:
    """`std_msgs/msg/String` -> the rclpy message class."""
    package, _, name = type_name.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


def _make_node_class():  # rclpy is imported only when a node is built
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rosbags.rosbag2 import StoragePlugin, Writer
    from std_msgs.msg import String

    from robomosaic.data.rosbag import _typestore

    class BagRecorder(Node):
        def __init__(self, name: str = "bag_record") -> None:
            super().__init__(name)
            self.out = self.declare_parameter("out", "").value
            self.wanted = list(self.declare_parameter("topics", [""]).value)
            if not self.out or not [t for t in self.wanted if t]:
                raise ValueError("parameters out:=<bag folder> and topics:=\"['/a', '/b']\" are required")
            self.wanted = [t for t in self.wanted if t]
            self.typestore = _typestore()
            self.writer = Writer(self.out, version=9, storage_plugin=StoragePlugin.MCAP)
            self.writer.open()
            self.connections: dict[str, Any] = {}
            self.counts = {t: 0 for t in self.wanted}
            self.subscriptions_: dict[str, Any] = {}
            self.status = self.create_publisher(String, "~/status", 10)
            self.create_timer(0.05, self._discover)
            self.create_timer(1.0, self._publish_status)
            self.get_logger().info(f"recording {', '.join(self.wanted)} into {self.out}")

        def _qos(self, topic: str) -> QoSProfile:
            publishers = self.get_publishers_info_by_topic(topic)
            reliable = all(p.qos_profile.reliability == ReliabilityPolicy.RELIABLE for p in publishers)
            latched = all(p.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for p in publishers)
            return QoSProfile(
                history=HistoryPolicy.KEEP_LAST,
                depth=100,
                reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
            )

        def _discover(self) -> None:
            types = dict(self.get_topic_names_and_types())
            for topic in self.wanted:
                if topic in self.subscriptions_ or topic not in types:
                    continue
                if not self.get_publishers_info_by_topic(topic):  # only subscribers so far: no QoS to match
                    continue
                type_name = types[topic][0]
                self.connections[topic] = self.writer.add_connection(
                    topic, type_name, typestore=self.typestore
                )
                self.subscriptions_[topic] = self.create_subscription(
                    message_class(type_name), topic, self._receiver(topic), self._qos(topic), raw=True
                )
                self.get_logger().info(f"subscribed {topic} ({type_name})")

        def _receiver(self, topic: str):
            def receive(data: bytes) -> None:
                self.writer.write(self.connections[topic], time.time_ns(), data)
                self.counts[topic] += 1

            return receive

        def _publish_status(self) -> None:
            waiting = [t for t in self.wanted if t not in self.subscriptions_]
            status = {"out": self.out, "messages": self.counts, "waiting": waiting}
            self.status.publish(String(data=json.dumps(status)))

        def on_shutdown(self) -> None:
            self.writer.close()
            self.get_logger().info(f"closed {self.out}: {sum(self.counts.values())} messages {self.counts}")

    return BagRecorder


def main(argv: Sequence[str] | None = None) -> None:
    """robomosaic-bag-record (standard ROS arguments: --ros-args -p out:=<bag> -p topics:=[...])."""
    from rosbags.rosbag2 import WriterError

    run_node(
        "robomosaic-bag-record", lambda: _make_node_class()(), argv, errors=(ValueError, OSError, WriterError)
    )


if __name__ == "__main__":
    main()
