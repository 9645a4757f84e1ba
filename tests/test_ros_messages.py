"""numpy <-> ROS 2 message conversions of robomosaic.ros_nodes.messages (no DDS traffic needed)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("rclpy")

from robomosaic.ros_nodes import messages as m
from robomosaic.ros_nodes.common import (
    command_qos,
    seconds_to_stamp,
    sensor_qos,
    stamp_to_seconds,
)

RNG = np.random.default_rng(0)
ARM = ["robot0_joint1", "robot0_joint2", "gripper0_right_finger_joint1", "gripper0_right_finger_joint2"]


def test_ros_nodes_package_imports_without_rclpy() -> None:
    code = (
        "import sys; sys.modules['rclpy'] = None\n"
        "import robomosaic.ros_nodes.common as c, robomosaic.ros_nodes.messages as m\n"
        "b = m.TopicBinding('q', '/joint_states', 'JointState', names=['a', 'b']); assert b.shape == (2,)\n"
        "try:\n    c.require_rclpy()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "robomosaic ROS nodes need rclpy" in out.stdout and "pip install 'robomosaic[ros]'" in out.stdout


def test_qos_profiles() -> None:
    from rclpy.qos import HistoryPolicy, ReliabilityPolicy

    from robomosaic.ros_nodes import common

    sensor, command = sensor_qos(), command_qos()
    assert (sensor.reliability, sensor.history, sensor.depth) == (
        ReliabilityPolicy.BEST_EFFORT,
        HistoryPolicy.KEEP_LAST,
        1,
    )
    assert (command.reliability, command.depth) == (ReliabilityPolicy.RELIABLE, 10)
    assert sensor == common.SENSOR_QOS and command == common.COMMAND_QOS


@pytest.mark.parametrize("t", [0.0, 1.5, 1763800000.123456789, 2.999999999])
def test_stamp_round_trip(t: float) -> None:
    stamp = seconds_to_stamp(t)
    assert 0 <= stamp.nanosec < 1_000_000_000
    assert stamp_to_seconds(stamp) == pytest.approx(t, abs=1e-6)
    with pytest.raises(ValueError, match="finite"):
        seconds_to_stamp(float("nan"))


def test_joint_state_round_trip_by_names_and_fields() -> None:
    position, velocity = RNG.normal(size=4), RNG.normal(size=4)
    msg = m.joint_state_msg(ARM, position, velocity, 12.25)
    assert m.message_stamp(msg) == pytest.approx(12.25)
    fingers = m.TopicBinding("robot0_gripper_qpos", "/joint_states", "JointState", names=ARM[:1:-1])
    assert fingers.field == "position" and fingers.shape == (2,)
    np.testing.assert_array_equal(m.message_to_array(msg, fingers), position[[3, 2]])
    vel = m.TopicBinding("qd", "/joint_states", "JointState", field="velocity")
    assert vel.shape is None
    np.testing.assert_array_equal(m.message_to_array(msg, vel), velocity)
    missing = m.TopicBinding("q", "/joint_states", "JointState", names=["robot0_joint1", "nope"])
    with pytest.raises(ValueError, match=r"joint\(s\) \['nope'\] not in the message"):
        m.message_to_array(msg, missing)
    no_effort = m.TopicBinding("q", "/joint_states", "JointState", field="effort", names=ARM[:2])
    with pytest.raises(ValueError, match="4 joint names but 0 effort values"):
        m.message_to_array(msg, no_effort)


def test_pose_stamped_round_trip() -> None:
    xyz, quat = RNG.normal(size=3), RNG.normal(size=4)
    msg = m.pose_stamped_msg(xyz, quat, "base", seconds_to_stamp(3.0))
    assert msg.header.frame_id == "base" and m.message_stamp(msg) == 3.0
    for field, expected in (("pose", np.r_[xyz, quat]), ("position", xyz), ("orientation", quat)):
        binding = m.TopicBinding("k", "/eef_pose", "geometry_msgs/msg/PoseStamped", field)
        assert binding.type == "PoseStamped" and binding.shape == expected.shape
        np.testing.assert_array_equal(m.message_to_array(msg, binding), expected)


def test_odometry_round_trip() -> None:
    xyz, quat, lin, ang = (RNG.normal(size=n) for n in (3, 4, 3, 3))
    msg = m.odometry_msg(xyz, quat, lin, ang, "odom", "base_link", 7.5)
    assert (msg.header.frame_id, msg.child_frame_id, m.message_stamp(msg)) == ("odom", "base_link", 7.5)
    cases = {
        "pose": np.r_[xyz, quat],
        "position": xyz,
        "orientation": quat,
        "twist": np.r_[lin, ang],
        "linear": lin,
        "angular": ang,
    }
    for field, expected in cases.items():
        binding = m.TopicBinding("k", "/odom", "Odometry", field)
        assert binding.shape == expected.shape
        np.testing.assert_array_equal(m.message_to_array(msg, binding), expected)
    assert m.TopicBinding("k", "/odom", "Odometry").field == "pose"


def test_image_round_trip_and_encodings() -> None:
    rgb = RNG.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    binding = m.TopicBinding("agentview_image", "/agentview/image_raw", "Image")
    assert binding.is_image and binding.shape is None and binding.field is None
    msg = m.image_msg(rgb, "agentview", 1.0)
    assert (msg.encoding, msg.height, msg.width, msg.step) == ("rgb8", 6, 5, 15)
    out = m.message_to_array(msg, binding)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)
    # bgra8 with row padding, as some camera drivers send
    bgra = np.concatenate([rgb[:, :, ::-1], np.full((6, 5, 1), 255, np.uint8)], axis=2)
    padded = np.zeros((6, 24), np.uint8)
    padded[:, :20] = bgra.reshape(6, 20)
    msg.encoding, msg.step, msg.data = "bgra8", 24, padded.tobytes()
    np.testing.assert_array_equal(m.message_to_array(msg, binding), rgb)
    msg.encoding = "16UC1"
    with pytest.raises(ValueError, match="'agentview_image'.*encoding '16UC1' unsupported"):
        m.message_to_array(msg, binding)
    msg.encoding, msg.step, msg.data = "rgb8", 15, rgb.tobytes()[:-3]
    with pytest.raises(ValueError, match="needs 90 bytes, the message has 87"):
        m.message_to_array(msg, binding)
    with pytest.raises(ValueError, match="uint8"):
        m.image_msg(rgb.astype(np.float32), "cam")


def test_compressed_image_round_trip() -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:8] = (200, 30, 10)
    binding = m.TopicBinding("agentview_image", "/agentview/image_raw/compressed", "CompressedImage")
    png = m.compressed_image_msg(rgb, "cam", 2.0, format="png")
    np.testing.assert_array_equal(m.message_to_array(png, binding), rgb)
    jpeg = m.compressed_image_msg(rgb, "cam", 2.0)
    assert jpeg.format == "jpeg"
    decoded = m.message_to_array(jpeg, binding)
    assert decoded.shape == rgb.shape and np.abs(decoded.astype(int) - rgb).mean() < 3  # lossy
    jpeg.data = b"not an image"
    with pytest.raises(ValueError, match="cannot decode"):
        m.message_to_array(jpeg, binding)


def test_string_and_float64_array() -> None:
    from std_msgs.msg import String

    text = m.TopicBinding("task", "/task", "String")
    assert m.message_to_array(String(data="lift"), text) == "lift"
    assert m.message_stamp(String(data="lift")) is None
    values = RNG.normal(size=10)
    msg = m.float64_array_msg(values)
    np.testing.assert_array_equal(
        m.message_to_array(msg, m.TopicBinding("object", "/o", "Float64MultiArray")), values
    )


def test_binding_errors_name_key_topic_and_choices() -> None:
    with pytest.raises(
        ValueError, match=r"'q' \(topic '/js'\): unknown message type 'JointStates'; allowed: JointState"
    ):
        m.TopicBinding("q", "/js", "JointStates")
    with pytest.raises(
        ValueError, match="field 'orientation' is not one of JointState's fields: position, velocity"
    ):
        m.TopicBinding("q", "/js", "JointState", "orientation")
    with pytest.raises(ValueError, match="Image has no field"):
        m.TopicBinding("img", "/cam", "Image", "pose")
    with pytest.raises(ValueError, match="applies only to JointState"):
        m.TopicBinding("p", "/eef", "PoseStamped", names=["a"])
    with pytest.raises(ValueError, match="repeats a joint"):
        m.TopicBinding("q", "/js", "JointState", names=["a", "a"])
    with pytest.raises(ValueError, match="no topic"):
        m.TopicBinding("q", "", "JointState")
    with pytest.raises(ValueError, match="unknown message type 'Foo'"):
        m.message_type("Foo")
    from sensor_msgs.msg import JointState

    assert (
        m.message_type("JointState") is JointState
        and m.message_type("sensor_msgs/msg/JointState") is JointState
    )


def test_joint_trajectory_round_trip() -> None:
    names = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
    chunk = RNG.uniform(-1, 1, size=(16, 7))
    msg = m.joint_trajectory_msg(chunk, names, 0.05, 100.0, start_index=3)
    assert len(msg.points) == 13
    assert stamp_to_seconds(msg.points[0].time_from_start) == 0.0
    assert stamp_to_seconds(msg.points[-1].time_from_start) == pytest.approx(12 * 0.05)
    t0, dt, out, out_names = m.joint_trajectory_to_chunk(msg)
    assert (t0, out_names) == (100.0, names) and dt == pytest.approx(0.05)
    np.testing.assert_array_equal(out, chunk[3:])
    # a zero stamp means "on receipt": t0 is the first point's offset, here 0
    t0, _, _, _ = m.joint_trajectory_to_chunk(m.joint_trajectory_msg(chunk, names, 0.05, 0.0))
    assert t0 == 0.0
    with pytest.raises(ValueError, match=r"must be \(horizon, 7\)"):
        m.joint_trajectory_msg(chunk[:, :6], names, 0.05)
    with pytest.raises(ValueError, match="start_index 16 out of range"):
        m.joint_trajectory_msg(chunk, names, 0.05, start_index=16)
    uneven = m.joint_trajectory_msg(chunk[:3], names, 0.05)
    uneven.points[2].time_from_start.nanosec = 200_000_000
    with pytest.raises(ValueError, match="evenly spaced"):
        m.joint_trajectory_to_chunk(uneven)
    short = m.joint_trajectory_msg(chunk[:2], names, 0.05)
    short.points[1].positions = [0.0]
    with pytest.raises(ValueError, match="point 1 has 1 positions for 7 joint names"):
        m.joint_trajectory_to_chunk(short)


def test_twist_round_trip() -> None:
    values = RNG.normal(size=6)
    np.testing.assert_array_equal(m.twist_to_array(m.twist_msg(values)), values)
    with pytest.raises(ValueError, match="needs 6 values, got 7"):
        m.twist_msg(np.zeros(7))


def test_messages_survive_serialization() -> None:
    """What goes over DDS: every builder's message serializes and deserializes to an equal message."""
    from rclpy.serialization import deserialize_message, serialize_message

    built = [
        m.joint_state_msg(ARM, np.zeros(4), np.ones(4), 1.0),
        m.pose_stamped_msg(np.zeros(3), [0, 0, 0, 1], "base", 1.0),
        m.odometry_msg(np.zeros(3), [0, 0, 0, 1], np.ones(3), np.ones(3), "odom", "base_link", 1.0),
        m.image_msg(np.zeros((2, 3, 3), np.uint8), "cam", 1.0),
        m.compressed_image_msg(np.zeros((8, 8, 3), np.uint8), "cam", 1.0),
        m.float64_array_msg([1.0, 2.0]),
        m.joint_trajectory_msg(np.zeros((4, 7)), list("abcdefg"), 0.05, 1.0),
        m.twist_msg(np.arange(6.0)),
    ]
    for msg in built:
        assert deserialize_message(serialize_message(msg), type(msg)) == msg


def test_keyboard_teleop_releasing_a_key_stops_its_axis_only() -> None:
    from robomosaic.ros_nodes.teleop import KeyboardState

    keys = KeyboardState(linear_speed=0.5, angular_speed=5.0, key_timeout=0.6)
    assert keys.press("w", 0.0) and keys.press("a", 0.4)  # +x, then +y while x still moves
    assert np.allclose(keys.velocity(0.5), [0.5, 0.5, 0, 0, 0, 0])
    assert keys.press("a", 0.8)  # only the y key is held (repeats): x stops at 0.6
    assert np.allclose(keys.velocity(0.9), [0, 0.5, 0, 0, 0, 0])
    assert np.allclose(keys.velocity(2.0), 0.0)  # everything released
    assert keys.press(" ", 2.0) and keys.gripper == 1.0  # space closes the gripper
    assert not keys.press("z", 2.0)
