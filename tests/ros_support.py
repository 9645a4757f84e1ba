"""The ROS 2 tests' client: a node in the test process that talks over DDS to nodes running in their
own processes (tests/test_ros_sim_node.py, tests/test_ros_mobility.py). Import it after
`pytest.importorskip("rclpy")`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String
from std_srvs.srv import Trigger

from robomosaic.ros_nodes.common import BackgroundSpin

# A sim node's ~/episode (robomosaic.ros_nodes.stepped_sim).
LATCHED = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)


class TopicClient:
    """A node of its own context on DDS domain `domain_id`, spinning in the background: records every
    message of `topics` ({topic: (type, QoS)}) and of the sim node `sim`'s ~/episode with its arrival
    time (time.monotonic), and calls the sim's ~/reset."""

    def __init__(
        self, domain_id: int, name: str, topics: dict[str, tuple[type, Any]], sim: str = "/sim"
    ) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self.lock = threading.Lock()
        self.received: dict[str, list[tuple[float, object]]] = {}
        self.episode_topic = f"{sim}/episode"
        for topic, (msg_type, qos) in {**topics, self.episode_topic: (String, LATCHED)}.items():
            self.node.create_subscription(msg_type, topic, self._recorder(topic), qos)
        self.reset_client = self.node.create_client(Trigger, f"{sim}/reset")
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.spinner = BackgroundSpin(self.executor)

    def _recorder(self, topic: str) -> Callable[[object], None]:
        def record(msg: object) -> None:
            with self.lock:
                self.received.setdefault(topic, []).append((time.monotonic(), msg))

        return record

    def publisher(self, msg_type: type, topic: str, qos: object) -> Any:
        return self.node.create_publisher(msg_type, topic, qos)

    def messages(self, topic: str, since: float = 0.0) -> list[object]:
        with self.lock:
            return [m for t, m in self.received.get(topic, []) if t >= since]

    def timed(self, topic: str, since: float = 0.0) -> list[tuple[float, object]]:
        """(arrival time, message) pairs."""
        with self.lock:
            return [(t, m) for t, m in self.received.get(topic, []) if t >= since]

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str) -> Any:
        """The first truthy value of `predicate()`, polled until `timeout` s (then AssertionError)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.01)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def status(self) -> dict | None:
        """The sim's latest ~/episode status, None before the first."""
        msgs = self.messages(self.episode_topic)
        return json.loads(msgs[-1].data) if msgs else None

    def reset(self) -> dict:
        """Call the sim's ~/reset: its reply, {"seed", "episode"}."""
        assert self.reset_client.wait_for_service(timeout_sec=30)
        future = self.reset_client.call_async(Trigger.Request())
        response = self.wait_for(lambda: future.done() and future.result(), 30, "the reset service")
        assert response.success, response.message
        return json.loads(response.message)

    def close(self) -> None:
        self.spinner.close()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
