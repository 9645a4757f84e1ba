"""robomosaic-sim-node over real DDS: the node runs in its own process, the test is a ROS 2 client.

Topics and types, the realtime rate, forward/trajectory/twist commands moving the end effector in
the commanded direction, zero motion once commands stop, seeded resets equal to
`make_task(...).reset(seed)`, and commanded stepping (one step per command, simulated /clock, images).
"""

from __future__ import annotations

import io
import subprocess
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from robomosaic.ros_nodes import processes as ros_processes

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import PoseStamped, Twist  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.parameter_client import AsyncParameterClient  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from ros_support import TopicClient  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image, JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from robomosaic.ros_nodes import messages  # noqa: E402
from robomosaic.ros_nodes.sim_node import ACTION_NAMES  # noqa: E402

DOMAIN_ID = 12  # this file's DDS domain (docs: one per test file, so parallel tests never cross-talk)
SEED = 1_000_000
DT = 0.05
ARM_JOINTS = [f"robot0_joint{i}" for i in range(1, 8)]
FINGERS = ["gripper0_right_finger_joint1", "gripper0_right_finger_joint2"]
SENSOR = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)


def start_node(module: str, *ros_args: str, stdin: int | None = None) -> subprocess.Popen:
    return ros_processes.start_node(module, *ros_args, domain=DOMAIN_ID, stdin=stdin)


class Probe(TopicClient):
    """The sim's topics, recorded with their arrival times, and its command publishers."""

    def __init__(self, sim: str = "/sim") -> None:
        topics = {
            "/joint_states": (JointState, SENSOR),
            "/eef_pose": (PoseStamped, SENSOR),
            "/object_state": (Float64MultiArray, SENSOR),
            "/objects/cube/pose": (PoseStamped, SENSOR),
            "/clock": (Clock, SENSOR),
            "/agentview/image_raw": (Image, SENSOR),
            "/agentview/image_raw/compressed": (CompressedImage, SENSOR),
        }
        super().__init__(DOMAIN_ID, "probe", topics, sim)
        self.forward = self.publisher(Float64MultiArray, "/forward_command_controller/commands", 10)
        self.trajectory = self.publisher(JointTrajectory, "/joint_trajectory_controller/joint_trajectory", 10)
        self.twist = self.publisher(Twist, "/cmd_vel", 10)
        self.parameters = AsyncParameterClient(self.node, sim)

    def eef(self) -> np.ndarray:
        pose = self.messages("/eef_pose")[-1].pose.position
        return np.array([pose.x, pose.y, pose.z])

    def set_parameter(self, name: str, value: object) -> None:
        assert self.parameters.wait_for_services(timeout_sec=30)
        future = self.parameters.set_parameters([Parameter(name, value=value)])
        result = self.wait_for(lambda: future.done() and future.result(), 30, f"setting {name}")
        assert result.results[0].successful

    def publish_for(self, seconds: float, publish: Callable[[], None], rate: float = 20.0) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            publish()
            time.sleep(1.0 / rate)

    def publish_steps(self, steps: int, publish: Callable[[], None], timeout: float = 15.0) -> None:
        """Publish at 20 Hz until the sim has taken `steps` more steps (the realtime sim steps slower
        than 20 Hz on a loaded machine, so a fixed duration would move it less)."""
        target = self.status()["step"] + steps
        end = time.monotonic() + timeout
        while self.status()["step"] < target:
            assert time.monotonic() < end, f"the sim took fewer than {steps} steps in {timeout} s"
            publish()
            time.sleep(0.05)


# First, before the module's realtime sim node starts (it would also take the commands).
def test_commanded_mode_steps_once_per_command_with_simulated_clock_images_and_episode_end() -> None:
    process = start_node(
        "sim_node", "-r", "__node:=sim_commanded", "-p", "step_mode:=commanded", "-p", f"seed:={SEED}",
        "-p", "cameras:=['agentview']", "-p", "image_size:=32", "-p", "max_steps:=5",
    )  # fmt: skip
    probe = Probe("/sim_commanded")
    try:
        first = probe.wait_for(probe.status, 60, "the sim node's first episode status")
        probe.wait_for(lambda: probe.messages("/clock"), 10, "/clock")
        time.sleep(1.0)
        assert probe.status()["step"] == 0  # no command, no step
        t0 = first["time"]
        for k in range(1, 6):
            probe.forward.publish(messages.float64_array_msg([0.0, 0.0, 0.5, 0, 0, 0, 0]))
            probe.wait_for(lambda k=k: probe.status()["step"] == k, 30, f"step {k}")
        status = probe.status()
        assert status["time"] == pytest.approx(t0 + 5 * DT, abs=1e-6)
        clock = probe.wait_for(lambda: [m for m in probe.messages("/clock")
                                        if abs(m.clock.sec + 1e-9 * m.clock.nanosec - status["time"]) < 1e-6],
                               10, "/clock at the last step")  # fmt: skip
        assert clock
        image = probe.messages("/agentview/image_raw")[-1]
        assert (image.height, image.width, image.encoding) == (32, 32, "rgb8")
        assert len(image.data) == 32 * 32 * 3
        from PIL import Image as PILImage

        compressed = probe.messages("/agentview/image_raw/compressed")[-1]
        assert PILImage.open(io.BytesIO(bytes(compressed.data))).size == (32, 32)
        # max_steps reached: done, and commands no longer step until the next reset.
        assert status["done"] and status["truncated"] and not status["success"]
        probe.forward.publish(messages.float64_array_msg([0.0] * 7))
        time.sleep(1.0)
        assert probe.status()["step"] == 5
        reply = probe.reset()
        assert reply["seed"] == SEED + 1
        probe.wait_for(lambda: probe.status()["episode"] == reply["episode"], 10, "the next episode")
        status = probe.status()
        assert status["step"] == 0 and not status["done"]
        assert status["time"] == pytest.approx(t0 + 6 * DT, abs=1e-6)  # a reset takes one period
    finally:
        probe.close()
        print(ros_processes.stop_node(process)[-3000:])


@pytest.fixture(scope="module")
def realtime() -> Iterator[Probe]:
    process = start_node(
        "sim_node", "-r", "__node:=sim", "-p", "task:=lift", "-p", f"seed:={SEED}", "-p", "max_steps:=100000"
    )
    probe = Probe()
    try:
        probe.wait_for(probe.status, 60, "the sim node's first episode status")
        yield probe
    finally:
        probe.close()
        output = ros_processes.stop_node(process)
        print(output[-3000:])


def forward(probe: Probe, action: list[float]) -> Callable[[], None]:
    return lambda: probe.forward.publish(messages.float64_array_msg(action))


def test_topics_types_shapes_and_rate(realtime: Probe) -> None:
    start = time.monotonic()
    realtime.publish_for(3.0, forward(realtime, [0.0] * 7))  # zero motion: the episode steps
    joints = realtime.messages("/joint_states", start)
    assert joints, "no /joint_states"
    assert list(joints[-1].name) == ARM_JOINTS + FINGERS
    assert len(joints[-1].position) == len(joints[-1].velocity) == 9
    assert len(realtime.messages("/object_state", start)[-1].data) == 10  # lift: cube pos, quat, to-eef
    assert realtime.messages("/eef_pose", start)[-1].header.frame_id == "world"
    quat = realtime.messages("/objects/cube/pose", start)[-1].pose.orientation
    assert abs(np.linalg.norm([quat.x, quat.y, quat.z, quat.w]) - 1) < 1e-6
    status = realtime.status()
    assert status["seed"] == SEED and status["step"] > 0 and not status["done"]
    # About the control rate: never faster than 20 Hz; slower only by what a loaded CPU costs.
    periods = np.diff([t for t, _ in realtime.timed("/clock", start + 0.5)])
    print(f"realtime /clock period: median {1000 * np.median(periods):.1f} ms, "
          f"p99 |error| {1000 * np.percentile(np.abs(periods - DT), 99):.1f} ms")  # fmt: skip
    assert 0.045 <= np.median(periods) <= 0.15
    assert not realtime.messages("/agentview/image_raw")  # no cameras configured: nothing rendered


def test_forward_command_moves_the_end_effector_and_stopping_stops_it(realtime: Probe) -> None:
    before = realtime.eef()
    realtime.publish_steps(30, forward(realtime, [0.0, 0.0, 0.6, 0.0, 0.0, 0.0, 0.0]))  # up
    up = realtime.eef()
    assert up[2] - before[2] > 0.05, (before, up)
    assert np.all(np.abs(up[:2] - before[:2]) < 0.02), (before, up)
    realtime.publish_steps(30, forward(realtime, [0.0, -0.6, 0.0, 0.0, 0.0, 0.0, 0.0]))  # -y
    side = realtime.eef()
    assert up[1] - side[1] > 0.05, (up, side)
    # Commands stop: after command_timeout (0.2 s) the arm holds still.
    time.sleep(0.8)
    still = time.monotonic()
    steps = realtime.status()["step"]
    time.sleep(1.0)
    poses = np.array([[m.pose.position.x, m.pose.position.y, m.pose.position.z]
                      for m in realtime.messages("/eef_pose", still)])  # fmt: skip
    assert realtime.status()["step"] > steps  # still stepping, with zero motion
    assert np.ptp(poses, axis=0).max() < 0.005, np.ptp(poses, axis=0)


def test_trajectory_and_twist_commands(realtime: Probe) -> None:
    before = realtime.eef()
    chunk = np.zeros((20, 7))
    chunk[:, 0] = 0.6  # +x for one second, then the chunk is exhausted: zero motion
    realtime.trajectory.publish(messages.joint_trajectory_msg(chunk, ACTION_NAMES, DT, 0.0))
    time.sleep(2.0)
    after = realtime.eef()
    assert after[0] - before[0] > 0.05, (before, after)
    moved = realtime.eef()
    time.sleep(0.5)
    assert np.abs(realtime.eef() - moved).max() < 0.005  # exhausted chunk: zero motion
    down = Twist()
    down.linear.z = -0.5  # m/s
    realtime.publish_steps(20, lambda: realtime.twist.publish(down))
    assert moved[2] - realtime.eef()[2] > 0.05


def test_reset_gives_the_seeds_initial_state(realtime: Probe) -> None:
    from robomosaic.sim.tasks import make_task

    realtime.set_parameter("seed", SEED + 3)  # the next reset uses exactly this seed (robomosaic-ros-eval)
    reply = realtime.reset()
    assert reply["seed"] == SEED + 3
    first = realtime.reset()
    assert first["seed"] == SEED + 4 and first["episode"] == reply["episode"] + 1
    realtime.wait_for(lambda: realtime.status()["episode"] == first["episode"], 10, "the new episode")
    time.sleep(0.5)  # a new episode stands still until the first command: every message is its state
    status = realtime.status()
    assert status["step"] == 0 and status["seed"] == SEED + 4
    task = make_task("lift")
    try:
        expected = task.reset(SEED + 4)
    finally:
        task.close()
    obj = np.array(realtime.messages("/object_state")[-1].data)
    np.testing.assert_allclose(obj, expected["object"], atol=1e-9)
    np.testing.assert_allclose(realtime.eef(), expected["robot0_eef_pos"], atol=1e-9)
    fingers = np.array(realtime.messages("/joint_states")[-1].position[7:])
    np.testing.assert_allclose(fingers, expected["robot0_gripper_qpos"], atol=1e-9)
