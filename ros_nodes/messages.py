"""Conversions between numpy arrays and the ROS 2 messages robomosaic nodes use (pure functions).

Observations: a `TopicBinding` says which topic, message type and field feed one policy
observation key, and `message_to_array(msg, binding)` extracts it:

    type               field (default first)                        value
    JointState         position | velocity | effort                 float64 (len(names),) in `names` order,
                                                                    or the whole field without `names`
    PoseStamped        pose (7: xyz + quat xyzw) | position (3) | orientation (4, xyzw)
    Odometry           pose | position | orientation | twist (6: linear, angular) | linear | angular
                       | planar (6: x, y, yaw, vx, vy, yaw rate; a mobile base)
    LaserScan          ranges                                       float64 (rays,) at laser_scan_angles(msg)
    Path               positions                                    float64 (poses, 2): x, y of every pose
    Image              -                                            uint8 (H, W, 3) rgb
    CompressedImage    -                                            uint8 (H, W, 3) rgb (decoded by PIL)
    String             -                                            the text (a task name for the policy node)
    Float64MultiArray  -                                            float64 (N,)

Builders turn arrays into messages for the simulated robots, the recorder and the quadrotor nodes;
commands go out as JointTrajectory (a chunk), Float64MultiArray (one action) or Twist (6 values, or a
mobile base's 3 or 2).
Stamps may be given as seconds (float) or as a builtin_interfaces/Time; 0.0 is ROS's "no stamp".

rclpy and the message packages are imported when a function needs them, so `TopicBinding` and
its validation work without ROS.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from robomosaic.ros_nodes.common import require_rclpy, seconds_to_stamp, stamp_to_seconds

# Observation message types: short name -> (ROS package, allowed fields; the first is the default).
OBSERVATION_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "JointState": ("sensor_msgs", ("position", "velocity", "effort")),
    "Image": ("sensor_msgs", ()),
    "CompressedImage": ("sensor_msgs", ()),
    "PoseStamped": ("geometry_msgs", ("pose", "position", "orientation")),
    "Odometry": ("nav_msgs", ("pose", "position", "orientation", "twist", "linear", "angular", "planar")),
    "LaserScan": ("sensor_msgs", ("ranges",)),
    "Path": ("nav_msgs", ("positions",)),
    "String": ("std_msgs", ()),
    "Float64MultiArray": ("std_msgs", ()),
}
FIELD_SIZES = {"pose": 7, "position": 3, "orientation": 4, "twist": 6, "linear": 3, "angular": 3, "planar": 6}
IMAGE_TYPES = ("Image", "CompressedImage")
# For each accepted action size, the action index of each Twist component (linear xyz, angular
# xyz); -1 is the 0 appended to the action.
TWIST_SIZES = {6: [0, 1, 2, 3, 4, 5], 3: [0, 1, -1, -1, -1, 2], 2: [0, -1, -1, -1, -1, 1]}


def _short_type(type_name: str) -> str:
    """`sensor_msgs/msg/JointState` and `sensor_msgs/JointState` are accepted for `JointState`."""
    return type_name.rsplit("/", 1)[-1]


@dataclass
class TopicBinding:
    """One policy observation key fed by one field of one topic (see the module docstring)."""

    key: str
    topic: str
    type: str
    field: str | None = None
    names: list[str] | None = None

    def __post_init__(self) -> None:
        where = f"observation {self.key!r} (topic {self.topic!r})"
        if not self.topic:
            raise ValueError(f"{where}: no topic given")
        self.type = _short_type(self.type)
        if self.type not in OBSERVATION_TYPES:
            raise ValueError(
                f"{where}: unknown message type {self.type!r}; allowed: {', '.join(OBSERVATION_TYPES)}"
            )
        fields = OBSERVATION_TYPES[self.type][1]
        if self.field in (None, ""):
            self.field = fields[0] if fields else None
        elif self.field not in fields:
            allowed = ", ".join(fields) if fields else f"none ({self.type} has no field to choose)"
            raise ValueError(f"{where}: field {self.field!r} is not one of {self.type}'s fields: {allowed}")
        if self.names is not None:
            self.names = [str(n) for n in self.names]
            if self.type != "JointState":
                raise ValueError(
                    f"{where}: `names` selects joints and applies only to JointState, not {self.type}"
                )
            if not self.names:
                raise ValueError(f"{where}: `names` is empty; give the joint names or leave it out")
            if len(set(self.names)) != len(self.names):
                raise ValueError(f"{where}: `names` repeats a joint: {self.names}")

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The value's shape when the binding alone determines it, else None (known at the first message)."""
        if self.type == "JointState":
            return (len(self.names),) if self.names else None
        if self.field in FIELD_SIZES:
            return (FIELD_SIZES[self.field],)
        return None

    @property
    def is_image(self) -> bool:
        return self.type in IMAGE_TYPES


def message_type(type_name: str) -> type:
    """The ROS message class of an observation type name (`JointState`, `sensor_msgs/msg/JointState`)."""
    short = _short_type(type_name)
    if short not in OBSERVATION_TYPES:
        raise ValueError(f"unknown message type {type_name!r}; allowed: {', '.join(OBSERVATION_TYPES)}")
    require_rclpy()
    import importlib

    return getattr(importlib.import_module(f"{OBSERVATION_TYPES[short][0]}.msg"), short)


def message_stamp(msg: Any) -> float | None:
    """The header stamp in seconds; None for messages without a header or with a zero stamp."""
    header = getattr(msg, "header", None)
    if header is None:
        return None
    t = stamp_to_seconds(header.stamp)
    return t if t > 0 else None


def message_to_array(msg: Any, binding: TopicBinding) -> np.ndarray | str:
    """The value `binding` selects from `msg` (see the module docstring); ValueError names what is wrong."""
    where = f"observation {binding.key!r} (topic {binding.topic!r}, {binding.type})"
    kind = binding.type
    if kind == "JointState":
        values = np.asarray(getattr(msg, binding.field), dtype=np.float64)
        if binding.names is None:
            return values
        if len(values) != len(msg.name):
            raise ValueError(
                f"{where}: the message has {len(msg.name)} joint names "
                f"but {len(values)} {binding.field} values"
            )
        index = {name: i for i, name in enumerate(msg.name)}
        missing = [n for n in binding.names if n not in index]
        if missing:
            raise ValueError(f"{where}: joint(s) {missing} not in the message; it has {list(msg.name)}")
        return values[[index[n] for n in binding.names]]
    if kind in ("PoseStamped", "Odometry"):
        pose = msg.pose if kind == "PoseStamped" else msg.pose.pose
        if binding.field == "planar":
            lin, ang = msg.twist.twist.linear, msg.twist.twist.angular
            p, q = pose.position, pose.orientation
            yaw = quaternion_yaw([q.x, q.y, q.z, q.w])
            return np.array([p.x, p.y, yaw, lin.x, lin.y, ang.z], dtype=np.float64)
        if binding.field in ("pose", "position", "orientation"):
            p, q = pose.position, pose.orientation
            xyz, xyzw = [p.x, p.y, p.z], [q.x, q.y, q.z, q.w]
            parts = {"pose": xyz + xyzw, "position": xyz, "orientation": xyzw}
        else:
            lin, ang = msg.twist.twist.linear, msg.twist.twist.angular
            linear, angular = [lin.x, lin.y, lin.z], [ang.x, ang.y, ang.z]
            parts = {"twist": linear + angular, "linear": linear, "angular": angular}
        return np.asarray(parts[binding.field], dtype=np.float64)
    if kind == "Image":
        return image_to_rgb(msg, where)
    if kind == "CompressedImage":
        return compressed_image_to_rgb(msg, where)
    if kind == "LaserScan":
        return np.asarray(msg.ranges, dtype=np.float64)
    if kind == "Path":
        xy = [[p.pose.position.x, p.pose.position.y] for p in msg.poses]
        return np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if kind == "String":
        return str(msg.data)
    return np.asarray(msg.data, dtype=np.float64)  # Float64MultiArray


def laser_scan_angles(msg: Any) -> np.ndarray:
    """The ray angles of a sensor_msgs/LaserScan (rad, float64): angle_min + i * angle_increment."""
    return float(msg.angle_min) + float(msg.angle_increment) * np.arange(len(msg.ranges))


def yaw_quaternion(yaw: float) -> list[float]:
    """The xyzw quaternion of a rotation by `yaw` about z."""
    return [0.0, 0.0, float(np.sin(yaw / 2)), float(np.cos(yaw / 2))]


def quaternion_yaw(quat_xyzw: Any) -> float:
    """The rotation about z of an xyzw quaternion (its heading, for a planar pose)."""
    x, y, z, w = (float(v) for v in quat_xyzw)
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


# Channel order of the encodings we read, as indices into the message's channels.
_ENCODINGS = {
    "rgb8": (3, [0, 1, 2]),
    "bgr8": (3, [2, 1, 0]),
    "rgba8": (4, [0, 1, 2]),
    "bgra8": (4, [2, 1, 0]),
}


def image_to_rgb(msg: Any, where: str = "image") -> np.ndarray:
    """A sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8 or mono8) as uint8 (H, W, 3) rgb."""
    enc = msg.encoding.lower()
    if enc not in _ENCODINGS and enc != "mono8":
        raise ValueError(
            f"{where}: image encoding {msg.encoding!r} unsupported; use rgb8, bgr8, rgba8, bgra8 or mono8"
        )
    channels, order = _ENCODINGS.get(enc, (1, [0, 0, 0]))
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    raw = np.frombuffer(msg.data, dtype=np.uint8)
    if step < w * channels or raw.size < h * step:
        raise ValueError(
            f"{where}: {h}x{w} {enc} image with step {step} needs {h * step} bytes, "
            f"the message has {raw.size}"
        )
    rows = raw[: h * step].reshape(h, step)[:, : w * channels].reshape(h, w, channels)
    return np.ascontiguousarray(rows[:, :, order])


def compressed_image_to_rgb(msg: Any, where: str = "image") -> np.ndarray:
    """A sensor_msgs/CompressedImage (jpeg, png: anything PIL reads) as uint8 (H, W, 3) rgb."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(bytes(msg.data))) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"{where}: cannot decode the {msg.format!r} compressed image: {e}") from None


# -- builders ------------------------------------------------------------------------------------
def _stamp(stamp: Any) -> Any:
    if stamp is None:
        return seconds_to_stamp(0.0)
    if hasattr(stamp, "sec") and hasattr(stamp, "nanosec"):
        return stamp
    return seconds_to_stamp(float(stamp))


def _header(frame_id: str, stamp: Any) -> Any:
    from std_msgs.msg import Header

    return Header(frame_id=str(frame_id), stamp=_stamp(stamp))


def _floats(values: Any, n: int | None, what: str) -> list[float]:
    out = np.asarray(values, dtype=np.float64).reshape(-1)
    if n is not None and out.size != n:
        raise ValueError(f"{what} needs {n} values, got {out.size}")
    return out.tolist()


def joint_state_msg(
    names: Sequence[str],
    position: Any,
    velocity: Any | None = None,
    stamp: Any = None,
    effort: Any | None = None,
) -> Any:
    """sensor_msgs/JointState; velocity and effort are optional (left empty)."""
    require_rclpy()
    from sensor_msgs.msg import JointState

    n = len(names)
    return JointState(
        header=_header("", stamp),
        name=[str(x) for x in names],
        position=_floats(position, n, "JointState position"),
        velocity=[] if velocity is None else _floats(velocity, n, "JointState velocity"),
        effort=[] if effort is None else _floats(effort, n, "JointState effort"),
    )


def _pose(xyz: Any, quat_xyzw: Any) -> Any:
    from geometry_msgs.msg import Point, Pose, Quaternion

    x, y, z = _floats(xyz, 3, "position")
    qx, qy, qz, qw = _floats(quat_xyzw, 4, "orientation (xyzw)")
    return Pose(position=Point(x=x, y=y, z=z), orientation=Quaternion(x=qx, y=qy, z=qz, w=qw))


def pose_stamped_msg(xyz: Any, quat_xyzw: Any, frame_id: str, stamp: Any = None) -> Any:
    """geometry_msgs/PoseStamped from a position and an xyzw quaternion."""
    require_rclpy()
    from geometry_msgs.msg import PoseStamped

    return PoseStamped(header=_header(frame_id, stamp), pose=_pose(xyz, quat_xyzw))


def odometry_msg(
    xyz: Any,
    quat_xyzw: Any,
    linear: Any,
    angular: Any,
    frame_id: str,
    child_frame_id: str,
    stamp: Any = None,
) -> Any:
    """nav_msgs/Odometry: pose in `frame_id`, twist as given (ROS says child frame; the caller decides)."""
    require_rclpy()
    from geometry_msgs.msg import PoseWithCovariance, TwistWithCovariance
    from nav_msgs.msg import Odometry

    return Odometry(
        header=_header(frame_id, stamp),
        child_frame_id=str(child_frame_id),
        pose=PoseWithCovariance(pose=_pose(xyz, quat_xyzw)),
        twist=TwistWithCovariance(
            twist=twist_msg(np.r_[_floats(linear, 3, "linear"), _floats(angular, 3, "angular")])
        ),
    )


def transform_stamped_msg(
    xyz: Any, quat_xyzw: Any, frame_id: str, child_frame_id: str, stamp: Any = None
) -> Any:
    """geometry_msgs/TransformStamped: the pose of `child_frame_id` in `frame_id` (for tf2_msgs/TFMessage)."""
    require_rclpy()
    from geometry_msgs.msg import Quaternion, Transform, TransformStamped, Vector3

    x, y, z = _floats(xyz, 3, "translation")
    qx, qy, qz, qw = _floats(quat_xyzw, 4, "rotation (xyzw)")
    return TransformStamped(
        header=_header(frame_id, stamp),
        child_frame_id=str(child_frame_id),
        transform=Transform(translation=Vector3(x=x, y=y, z=z), rotation=Quaternion(x=qx, y=qy, z=qz, w=qw)),
    )


def laser_scan_msg(
    ranges: Any, angles: Any, range_max: float, frame_id: str, stamp: Any = None, scan_time: float = 0.0
) -> Any:
    """sensor_msgs/LaserScan of `ranges` (m) at evenly spaced `angles` (rad, counter-clockwise from
    the frame's x axis), range_min 0."""
    require_rclpy()
    from sensor_msgs.msg import LaserScan

    angles = np.asarray(angles, dtype=np.float64).reshape(-1)
    values = _floats(ranges, len(angles), "LaserScan ranges (one per angle)")
    increment = float(angles[1] - angles[0]) if len(angles) > 1 else 0.0
    if len(angles) > 2 and np.max(np.abs(np.diff(angles) - increment)) > 1e-9:
        raise ValueError("LaserScan angles must be evenly spaced")
    return LaserScan(
        header=_header(frame_id, stamp),
        angle_min=float(angles[0]),
        angle_max=float(angles[-1]),
        angle_increment=increment,
        scan_time=float(scan_time),
        range_min=0.0,
        range_max=float(range_max),
        ranges=values,
    )


def path_msg(xy: Any, frame_id: str, stamp: Any = None) -> Any:
    """nav_msgs/Path through the positions `xy` (N, 2) at z 0, every pose unrotated and stamped `stamp`."""
    require_rclpy()
    from nav_msgs.msg import Path

    points = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    poses = [pose_stamped_msg([x, y, 0.0], [0.0, 0.0, 0.0, 1.0], frame_id, stamp) for x, y in points]
    return Path(header=_header(frame_id, stamp), poses=poses)


def _rgb(rgb: Any) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"an rgb image must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def image_msg(rgb: Any, frame_id: str, stamp: Any = None) -> Any:
    """sensor_msgs/Image rgb8 from a uint8 (H, W, 3) array."""
    require_rclpy()
    from sensor_msgs.msg import Image

    arr = _rgb(rgb)
    h, w, _ = arr.shape
    return Image(
        header=_header(frame_id, stamp),
        height=h,
        width=w,
        encoding="rgb8",
        is_bigendian=0,
        step=3 * w,
        data=arr.tobytes(),
    )


def compressed_image_msg(rgb: Any, frame_id: str, stamp: Any = None, format: str = "jpeg") -> Any:
    """sensor_msgs/CompressedImage (jpeg or png, encoded by PIL) from a uint8 (H, W, 3) array."""
    require_rclpy()
    from PIL import Image as PILImage
    from sensor_msgs.msg import CompressedImage

    if format not in ("jpeg", "png"):
        raise ValueError(f"compressed image format must be jpeg or png, got {format!r}")
    buffer = io.BytesIO()
    PILImage.fromarray(_rgb(rgb)).save(
        buffer, format=format.upper(), **({"quality": 95} if format == "jpeg" else {})
    )
    return CompressedImage(header=_header(frame_id, stamp), format=format, data=buffer.getvalue())


def float64_array_msg(values: Any) -> Any:
    """std_msgs/Float64MultiArray with `values` flattened into data (no layout)."""
    require_rclpy()
    from std_msgs.msg import Float64MultiArray

    return Float64MultiArray(data=_floats(values, None, "Float64MultiArray"))


def _duration(seconds: float) -> Any:
    from builtin_interfaces.msg import Duration

    ns = round(seconds * 1e9)
    return Duration(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def joint_trajectory_msg(
    chunk: Any, names: Sequence[str], dt: float, stamp: Any = None, start_index: int = 0
) -> Any:
    """trajectory_msgs/JointTrajectory of the chunk's rows from `start_index` on: row i is a point
    with positions = chunk[i] at time_from_start = (i - start_index) * dt after header.stamp
    (a zero stamp means "on receipt", as a JointTrajectoryController reads it)."""
    require_rclpy()
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    actions = np.asarray(chunk, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[1] != len(names):
        raise ValueError(
            f"a trajectory chunk must be (horizon, {len(names)}) for names {list(names)}, got {actions.shape}"
        )
    if not 0 <= start_index < len(actions):
        raise ValueError(f"start_index {start_index} out of range for a chunk of {len(actions)} points")
    if not dt > 0:
        raise ValueError(f"trajectory point spacing dt must be positive, got {dt}")
    points = [
        JointTrajectoryPoint(positions=row.tolist(), time_from_start=_duration((i - start_index) * dt))
        for i, row in enumerate(actions)
        if i >= start_index
    ]
    return JointTrajectory(header=_header("", stamp), joint_names=[str(n) for n in names], points=points)


def joint_trajectory_to_chunk(msg: Any) -> tuple[float, float, np.ndarray, list[str]]:
    """(t0, dt, chunk (N, D), joint names) of a JointTrajectory with evenly spaced points.

    t0 is when point 0 is due: header.stamp + its time_from_start in seconds. With a zero
    header.stamp the times are relative to receipt, so t0 = 0.0 means "at once". dt is the spacing
    of the points (0.0 for a single point). Uneven spacing or a point whose positions do not match
    the joint names raises ValueError.
    """
    names = list(msg.joint_names)
    if not msg.points:
        raise ValueError("the trajectory has no points")
    times = np.array([stamp_to_seconds(p.time_from_start) for p in msg.points])
    for i, p in enumerate(msg.points):
        if len(p.positions) != len(names):
            raise ValueError(
                f"trajectory point {i} has {len(p.positions)} positions for {len(names)} joint names"
            )
    steps = np.diff(times)
    dt = float(steps[0]) if steps.size else 0.0
    if steps.size and (dt <= 0 or np.max(np.abs(steps - dt)) > 1e-6):
        raise ValueError(f"trajectory points must be evenly spaced in time_from_start, got {times.tolist()}")
    chunk = np.array([list(p.positions) for p in msg.points], dtype=np.float64)
    return stamp_to_seconds(msg.header.stamp) + float(times[0]), dt, chunk, names


def twist_msg(action: Any) -> Any:
    """geometry_msgs/Twist from 6 values (linear xyz, angular xyz), or a mobile base's 3 (vx, vy,
    yaw rate) or 2 (a differential drive's vx, yaw rate); the other components are 0."""
    require_rclpy()
    from geometry_msgs.msg import Twist, Vector3

    values = _floats(action, None, "Twist")
    if len(values) not in TWIST_SIZES:
        raise ValueError(
            f"Twist needs 6 values, got {len(values)} (linear xyz, angular xyz; "
            "a mobile base's 3, vx vy yaw rate, or 2, vx yaw rate)"
        )
    lx, ly, lz, ax, ay, az = np.append(values, 0.0)[TWIST_SIZES[len(values)]].tolist()
    return Twist(linear=Vector3(x=lx, y=ly, z=lz), angular=Vector3(x=ax, y=ay, z=az))


def twist_to_array(msg: Any) -> np.ndarray:
    """The 6 values of a geometry_msgs/Twist: linear xyz, angular xyz."""
    lin, ang = msg.linear, msg.angular
    return np.array([lin.x, lin.y, lin.z, ang.x, ang.y, ang.z], dtype=np.float64)
