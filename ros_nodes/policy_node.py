"""robomosaic-policy-node: a trained chunk policy driving a robot over ROS 2 (a lifecycle node).

    robomosaic-policy-node --ros-args --params-file my_robot.yaml -p checkpoint:=runs/lift_flow/best \
        -p autostart:=true
    python -m robomosaic.ros_nodes.policy_node --ros-args -r __node:=policy --params-file ...

Lifecycle (lifecycle_msgs/srv/ChangeState on `~/change_state`, or `autostart`):
- configure: loads the checkpoint, binds observation topics, and checks them against the
  checkpoint's observation spec (every key bound, shapes equal) and the command settings against
  its action spec; any mismatch fails the transition with an error naming the key, topic or
  parameter (logged, and in the diagnostics message). Runs one warm-up inference.
- activate: starts control at `control_hz` (a fresh observation history and sampling stream).
- deactivate / cleanup / shutdown (also on SIGINT/SIGTERM): sends the safe command and stops.

Parameters (a user's YAML file sets them; see config/policy_node.example.yaml):
- `checkpoint` (folder), `device` (cpu, cuda, ...), `torch_threads` (0: torch's default)
- `observations.<key>.topic|type|field|names`: one entry per policy observation key;
  type JointState | Image | CompressedImage | PoseStamped | Odometry | Float64MultiArray, fields as in
  robomosaic.ros_nodes.messages. A multitask checkpoint's `task_id` is either the parameter `task`
  (a task name of the checkpoint's task set) or `observations.task_id` bound to a std_msgs/String topic.
- `observation_adapter` ("": every observation key bound to a topic) | navigation: the observation
  of a robomosaic.sim.mobility policy (scan, velocity, goal, route) computed from three bindings,
  `observations.scan` (LaserScan), `observations.odom` (Odometry, field planar) and
  `observations.plan` (Path: the route's waypoints, then the goal, in the frame of /odom's pose),
  by the simulator's own functions (`NavigationObservation`), so that the node observes as
  `MobilityEnv` does (see config/mobility_policy.yaml); `embodiment` (default ""): the base driven,
  required by a cross-embodiment checkpoint (one that also observes `embodiment`, the one-hot of
  robomosaic.sim.mobility.embodiments.embodiment_embedding; a held-out base gets its nearest known).
- `command_type` trajectory | forward | twist, `command_topic` (default per type:
  /joint_trajectory_controller/joint_trajectory, /forward_command_controller/commands, /cmd_vel);
  twist takes 6-d actions (linear xyz, angular xyz) or a mobile base's 3-d (vx, vy, yaw rate) or
  2-d (vx, yaw rate),
  `trajectory_joint_names` (one per action dimension; default for 7-d arm actions:
  dx dy dz droll dpitch dyaw gripper)
- `control_hz` (default: the checkpoint's), `n_action_steps` (default: the checkpoint's), `blend`
  none | ensemble | rtc, `deadline` (s, default one replan period: slower inference is counted as a
  deadline miss; the node holds only when no planned action is left), `max_obs_age` (s, default 0.2)
- `inference` process (default: a child process computes the chunks, so inference shares no GIL
  with the executor; the control tick never waits) | threaded (a background thread of the node) |
  simulated (the chunk is computed inside the control tick and released `inference_delay` seconds
  of node time later, as robomosaic-eval does: with a commanded simulator on `use_sim_time`,
  results do not depend on how loaded the machine is)
- `inference_restarts` (3): how often a dead inference process is restarted per configuration
  (see Faults); beyond that, or with 0, the node goes through the lifecycle error state
- `realtime_priority` (0: normal scheduling; 2-99, with `inference: process`): the node's threads
  (the control thread and the middleware's, which deliver the observations) run under SCHED_FIFO
  at this priority, as ros2_control's controller manager runs its update loop, and the inference
  process one below, so that no other process on the robot's computer preempts a chunk and
  control ticks still preempt inference. Needs an rtprio limit or
  CAP_SYS_NICE; without it a warning is logged and both run at normal priority.
- `action_min`, `action_max`, `max_delta` (one value per action dimension, or one for all;
  defaults: [-1, 1] for actions whose spec says "normalized [-1, 1]", no rate limit),
  `gripper_dims` (dimensions that keep their last value in the safe command; default: the last
  dimension when the action spec mentions a gripper)
- `seed` (sampling noise: episode k samples from a stream seeded by (seed, k)), `autostart`

Outputs: the command topic (reliable) every control period while active and enabled, and
`/diagnostics` diagnostic_msgs/DiagnosticArray at 1 Hz: OK, WARN when the node held, missed a deadline or
rejected an observation since the last report, ERROR naming a fault (see Faults) or a failed
configure. Sensor subscriptions are best effort, depth 1.
Services (std_srvs/Trigger): `~/enable`, `~/disable` (sends the safe command once and stops
publishing commands, so that another source may drive the robot), `~/reset_history` (a new episode:
forget the observation history and plans, next sampling stream).

Faults: observations older than `max_obs_age` (the newest sample of the oldest key; header stamps,
or the receipt time for messages without one), a non-finite observation (rejected, counted; never
used; the node holds until a finite one arrives), no planned action left, or a failed inference
all give the safe command in that control period: zero motion with the gripper dimensions keeping
their last command (Twist: all zeros). A stale hold also drops the plan: control resumes with a new
chunk. A message stamped more than `max_obs_age` in the future is rejected (it could never go
stale: the robot's clocks are not synchronised). Commands are clamped to the limits and
rate-limited by `max_delta`; the safe command is never rate-limited.

A dead inference process (killed, out of memory, crashed) is seen as it dies (a thread waits on
its sentinel; the control tick checks it too): the node holds (the safe command at once and every
period), and `/diagnostics` says ERROR naming the process, its pid and its signal or exit code at
once, not at the next 1 Hz report. A new process is then started
on a background thread while the node keeps holding; once it answers, control resumes from a fresh
history and the diagnostics return to OK. After `inference_restarts` restarts (or when a restart
fails) the node goes through the lifecycle error state (ErrorProcessing, then unconfigured, with the
reason kept in the diagnostics): configure and activate it again to resume.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_ready
from typing import Any

import numpy as np

from robomosaic.conf.console import RobomosaicError
from robomosaic.ros_nodes.common import require_rclpy

require_rclpy()

import rclpy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue  # noqa: E402
from geometry_msgs.msg import Twist  # noqa: E402
from rcl_interfaces.msg import ParameterDescriptor  # noqa: E402
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup  # noqa: E402
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn  # noqa: E402
from rclpy.publisher import Publisher  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from robomosaic.data.multitask import TASK_ID, TaskSet  # noqa: E402
from robomosaic.data.spec import KeySpec  # noqa: E402
from robomosaic.ros_nodes import messages  # noqa: E402
from robomosaic.ros_nodes.common import command_qos, seconds_to_stamp, sensor_qos, spin_node  # noqa: E402
from robomosaic.ros_nodes.safety import SafetyFilter  # noqa: E402

COMMAND_TYPES = {
    "trajectory": (JointTrajectory, "/joint_trajectory_controller/joint_trajectory"),
    "forward": (Float64MultiArray, "/forward_command_controller/commands"),
    "twist": (Twist, "/cmd_vel"),
}
# The arm's OSC delta action as the simulated robot (robomosaic-sim-node) names its dimensions.
ARM_ACTION_NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
BINDING_ATTRIBUTES = ("topic", "type", "field", "names")
# Parameters and their defaults; None: derived from the checkpoint at configure.
PARAMETERS: dict[str, Any] = {
    "checkpoint": "",
    "device": "cpu",
    "torch_threads": 0,
    "command_type": "trajectory",
    "command_topic": None,
    "trajectory_joint_names": None,
    "control_hz": None,
    "n_action_steps": None,
    "blend": "none",
    "inference": "process",
    "inference_delay": 0.0,
    "inference_restarts": 3,
    "realtime_priority": 0,
    "deadline": None,
    "max_obs_age": 0.2,
    "action_min": None,
    "action_max": None,
    "max_delta": None,
    "gripper_dims": None,
    "task": "",
    "observation_adapter": "",
    "embodiment": "",
    "seed": 0,
    "autostart": False,
}
# observation_adapter navigation: its bindings, key -> (message type, field)
NAVIGATION_INPUTS = {
    "scan": ("LaserScan", "ranges"),
    "odom": ("Odometry", "planar"),
    "plan": ("Path", "positions"),
}
LATENCY_WINDOW = 200  # chunks over which the diagnostics' latency percentiles are taken


class ConfigurationError(RobomosaicError, ValueError):
    """The parameters do not fit the checkpoint; the message names the key, topic or parameter."""


@dataclass
class Sample:
    value: np.ndarray
    stamp: float


def parse_bindings(params: dict[str, Any]) -> dict[str, messages.TopicBinding]:
    """`observations.<key>.<attribute>` parameter values (prefix removed) -> one binding per key."""
    entries: dict[str, dict[str, Any]] = {}
    for name, value in params.items():
        key, _, attribute = name.rpartition(".")
        if not key or attribute not in BINDING_ATTRIBUTES:
            raise ConfigurationError(
                f"parameter observations.{name}: expected observations.<key>.<{'|'.join(BINDING_ATTRIBUTES)}>"
            )
        entries.setdefault(key, {})[attribute] = value
    bindings = {}
    for key, entry in entries.items():
        for required in ("topic", "type"):
            if not entry.get(required):
                raise ConfigurationError(
                    f"observation {key!r}: parameter observations.{key}.{required} is not set"
                )
        try:
            bindings[key] = messages.TopicBinding(key, **entry)
        except ValueError as e:
            raise ConfigurationError(str(e)) from None
    return bindings


def check_bindings(
    bindings: dict[str, messages.TopicBinding],
    obs_spec: dict[str, KeySpec],
    task_set: TaskSet | None,
    task: str,
) -> None:
    """Every observation key of the checkpoint is bound, with the shape the checkpoint expects;
    raises ConfigurationError naming the first mismatch. Shapes a binding does not fix (images,
    Float64MultiArray, JointState without names) are checked on every message."""
    spec_keys = sorted(obs_spec)
    for key, binding in bindings.items():
        where = f"observation {key!r} (topic {binding.topic!r})"
        if key not in obs_spec:
            raise ConfigurationError(
                f"{where} is not an observation of the checkpoint; its keys are {spec_keys}"
            )
        if binding.type == "String":
            if key != TASK_ID or task_set is None:
                raise ConfigurationError(
                    f"{where}: a String topic can only select the task ({TASK_ID!r}) "
                    "of a multitask checkpoint"
                )
            continue
        spec = obs_spec[key]
        if spec.is_image != binding.is_image:
            expected = f"an image {spec.shape}" if spec.is_image else f"a vector {spec.shape}"
            raise ConfigurationError(
                f"{where}: the checkpoint expects {expected}, a {binding.type} topic cannot give it"
            )
        if binding.shape is not None and binding.shape != spec_shape(key, spec, task_set):
            raise ConfigurationError(
                f"{where}: the binding gives shape {binding.shape} ({binding.type} {binding.field}"
                f"{f' of joints {binding.names}' if binding.names else ''}), "
                f"the checkpoint expects {spec.shape}"
            )
    if task_set is not None and TASK_ID not in bindings:
        if not task:
            raise ConfigurationError(
                f"multitask checkpoint (tasks {list(task_set.tasks)}): set parameter task or bind "
                f"observations.{TASK_ID} to a std_msgs/String topic"
            )
        if task not in task_set.tasks:
            raise ConfigurationError(
                f"parameter task: {task!r} is not one of the checkpoint's tasks {list(task_set.tasks)}"
            )
    for key in spec_keys:
        if key not in bindings and not (key == TASK_ID and task_set is not None):
            raise ConfigurationError(
                f"observation {key!r} {tuple(obs_spec[key].shape)} of the checkpoint is not bound "
                f"to a topic: "
                f"set observations.{key}.topic and observations.{key}.type"
            )


def spec_shape(key: str, spec: KeySpec, task_set: TaskSet | None) -> tuple[int, ...] | None:
    """The shape a topic must give for `key`; None where the multitask padding accepts any shorter one."""
    if task_set is not None and key == "object":
        return None
    return tuple(spec.shape)


class NavigationObservation:
    """`observation_adapter: navigation`: a robomosaic.sim.mobility policy's observation (scan,
    velocity, goal, route) from a LaserScan, an Odometry (its planar pose and velocity) and a Path
    (the route's waypoints, then the goal), with the simulator's `scan_sectors`, `pool_scan` and
    `navigation_obs`: the node observes exactly as `MobilityEnv` does.

    A non-finite range (NaN, or an infinity, which REP 117 allows for "no return"; the simulated
    scanners report range_max) or a non-finite pose makes the observation non-finite: the executor
    rejects it and the node holds, as it does for any other key.
    """

    def __init__(
        self, bindings: dict[str, messages.TopicBinding], obs_spec: dict[str, KeySpec], embodiment: str = ""
    ) -> None:
        """`embodiment`: the base the node drives, told to a cross-embodiment policy (one whose
        checkpoint observes `embodiment` too) as `embodiment_embedding`; unused otherwise."""
        from robomosaic.sim.mobility.embodiments import EmbodimentError, embodiment_embedding
        from robomosaic.sim.mobility.env import EMBODIMENT_KEY, EMBODIMENT_SPEC, OBS_SPEC

        for key, (type_, field) in NAVIGATION_INPUTS.items():
            binding = bindings.get(key)
            if binding is None or (binding.type, binding.field) != (type_, field):
                got = f"it is bound to a {binding.type} {binding.field}" if binding else "it is not bound"
                raise ConfigurationError(
                    f"observation_adapter navigation: bind observations.{key} to a {type_} topic with "
                    f"field {field} ({got})"
                )
        extra = sorted(set(bindings) - set(NAVIGATION_INPUTS))
        if extra:
            raise ConfigurationError(
                f"observation_adapter navigation: observations {extra} are not among its inputs "
                f"{list(NAVIGATION_INPUTS)}"
            )
        expected = {k: tuple(s.shape) for k, s in OBS_SPEC.items()}
        cross = {**expected, EMBODIMENT_KEY: tuple(EMBODIMENT_SPEC.shape)}
        got = {k: tuple(s.shape) for k, s in obs_spec.items()}
        if got not in (expected, cross):
            raise ConfigurationError(
                f"observation_adapter navigation: the checkpoint observes {got}, not a navigation "
                f"policy's {expected} (or, across embodiments, {cross})"
            )
        self.embedding: np.ndarray | None = None
        if got == cross:
            if not embodiment:
                raise ConfigurationError(
                    f"the checkpoint is a cross-embodiment policy (it observes {EMBODIMENT_KEY!r}, "
                    f"{EMBODIMENT_SPEC.description}): set the parameter embodiment to the base it "
                    "drives (launch argument embodiment:=...)"
                )
            try:
                self.embedding = embodiment_embedding(embodiment)
            except EmbodimentError as e:
                raise ConfigurationError(f"parameter embodiment: {e}") from None
        self.hops = expected["route"][0] // 2

    def value(self, binding: messages.TopicBinding, msg: Any, value: np.ndarray) -> np.ndarray:
        """One input from its message (`value` is `message_to_array`'s); ValueError names what is wrong."""
        from robomosaic.sim.mobility.env import pool_scan, scan_sectors

        if binding.key == "scan":
            ranges = np.where(np.isfinite(value), value, np.nan)
            with np.errstate(invalid="ignore"):  # a NaN range pools into a NaN sector
                return pool_scan(ranges, scan_sectors(self.scan_angles(msg)))
        if binding.key == "plan" and len(value) != self.hops + 1:
            raise ValueError(
                f"observation 'route' (topic {binding.topic!r}): the plan has {len(value)} poses; the "
                f"policy needs its route's {self.hops} waypoints and the goal"
            )
        return value

    @staticmethod
    def scan_angles(msg: Any) -> np.ndarray:
        """The scan's ray angles. LaserScan carries them in float32, and rays of the simulated
        scanners lie exactly on sector boundaries (kaya: every second one), where float32's rounding
        would move them into the neighbouring sector; so when the angles are those of a scanner
        config (`ScanConfig.angles`, field of view at 0.001 deg), they are taken from it in float64."""
        from robomosaic.sim.mobility.embodiments import ScanConfig

        angles = messages.laser_scan_angles(msg)
        n = len(angles)
        if n < 2:
            return angles
        full = abs(n * float(msg.angle_increment) - 2 * np.pi) < 1e-5
        fov = 360.0 if full else round(float(np.rad2deg(angles[-1] - angles[0])), 3)
        config = ScanConfig(fov_deg=fov, rays=n).angles()
        return config if np.allclose(config, angles, rtol=0.0, atol=1e-5) else angles

    def observe(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The policy observation from the newest value of every input."""
        from robomosaic.sim.mobility.env import EMBODIMENT_KEY, navigation_obs

        odom, plan = values["odom"], values["plan"]
        obs = navigation_obs(
            values["scan"][None], odom[None, 3:], plan[None, -1], plan[None, :-1], odom[None, :3]
        )
        obs = {key: value[0] for key, value in obs.items()}
        if self.embedding is not None:
            obs[EMBODIMENT_KEY] = self.embedding.copy()
        return obs


def _float_list(name: str, value: Any) -> list[float] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, (int, float)) else list(value)
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigurationError(f"parameter {name}: expected numbers, got {value!r}") from None


def _percentile_ms(values: Sequence[float], q: float) -> str:
    return f"{1000 * float(np.percentile(values, q)):.2f}" if len(values) else "nan"


class PolicyNode(LifecycleNode):
    """See the module docstring."""

    def __init__(self, node_name: str = "policy", **kwargs: Any) -> None:
        super().__init__(
            node_name,
            allow_undeclared_parameters=True,
            automatically_declare_parameters_from_overrides=True,
            **kwargs,
        )
        for name, default in PARAMETERS.items():
            if not self.has_parameter(name):
                self.declare_parameter(name, default, ParameterDescriptor(dynamic_typing=True))
        self._lock = threading.RLock()  # control tick vs lifecycle transitions and services
        self._data_lock = threading.Lock()  # sensor callbacks vs the control tick
        self._entities: list[Any] = []  # subscriptions and publishers made at configure
        self._latest: dict[str, Sample] = {}  # newest sample per observation key
        self._fresh = False  # a sample arrived since the executor last observed
        self._control_timer = None
        self.policy = None  # for the in-process runners
        self.interface = None  # the checkpoint's ChunkInterface, once configured
        self.active = False
        self.enabled = False
        self.episode = 0
        self.last_error = ""
        self._start_runner: Any = None  # makes a new inference process (inference "process")
        self._restart: _Restart | None = None  # a new inference process being started
        self._restarts = 0
        self._failing = ""  # why the node is going to the lifecycle error state
        self._tick_times: list[float] = []
        self._counts = {"bad_messages": 0, "inference_errors": 0}
        self._faults_reported = 0  # holds, deadline misses and rejected observations at the last report
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0, self._publish_diagnostics, MutuallyExclusiveCallbackGroup())
        services = MutuallyExclusiveCallbackGroup()
        self.create_service(Trigger, "~/enable", self._on_enable, callback_group=services)
        self.create_service(Trigger, "~/disable", self._on_disable, callback_group=services)
        self.create_service(Trigger, "~/reset_history", self._on_reset_history, callback_group=services)

    # -- parameters -----------------------------------------------------------------------------
    def _param(self, name: str) -> Any:
        value = self.get_parameter(name).value
        return PARAMETERS.get(name) if value is None else value

    # -- lifecycle ------------------------------------------------------------------------------
    def on_configure(self, state: Any) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as e:  # every failure must end in FAILURE with its reason logged
            self.last_error = f"configure failed: {e}"
            self.get_logger().error(self.last_error)
            self._destroy_entities()
            self._release_runner()
            self.policy = self.interface = None
            return TransitionCallbackReturn.FAILURE
        self.last_error = ""
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        from robomosaic.policies.checkpoint import (
            CheckpointError,
            ChunkInterface,
            load_policy,
            read_checkpoint,
        )
        from robomosaic.policies.executor import (
            ChunkExecutor,
            DelayedInference,
            ExecutorConfig,
            ThreadedInference,
        )
        from robomosaic.policies.process_inference import ProcessInference
        from robomosaic.policies.realtime import freeze_startup_objects, set_realtime_priority

        path = str(self._param("checkpoint"))
        if not path:
            raise ConfigurationError("parameter checkpoint is not set (the folder of a trained policy)")
        spec_json = read_checkpoint(path, load_parts=False).spec
        try:
            interface = ChunkInterface.from_spec(path, spec_json)
        except CheckpointError as e:
            raise ConfigurationError(f"checkpoint {path}: not a chunk-predicting policy: {e}") from None
        inference, delay = str(self._param("inference")), float(self._param("inference_delay"))
        threads = int(self._param("torch_threads"))
        # With inference "process" the child process loads the model and this one only reads the
        # spec: no second copy of the weights (nor a second CUDA context) on the robot's computer.
        policy = None if inference == "process" else self._load_in_process(load_policy(path), threads)
        self.task_set = TaskSet.from_dict(spec_json["task_set"]) if spec_json.get("task_set") else None
        self.task: str | None = str(self._param("task")) or None
        self.obs_spec: dict[str, KeySpec] = dict(interface.obs_spec)
        self.bindings = parse_bindings(
            {name: p.value for name, p in self.get_parameters_by_prefix("observations").items()}
        )
        adapter = str(self._param("observation_adapter"))
        if adapter == "navigation":
            self.adapter: NavigationObservation | None = NavigationObservation(
                self.bindings, self.obs_spec, str(self._param("embodiment"))
            )
        elif adapter:
            raise ConfigurationError(
                f"parameter observation_adapter: {adapter!r} is not '' (topics bound per key) or 'navigation'"
            )
        else:
            self.adapter = None
            check_bindings(self.bindings, self.obs_spec, self.task_set, self.task or "")

        action_spec: KeySpec = interface.action_spec
        self.action_dim = int(np.prod(action_spec.shape))
        self.command_type = str(self._param("command_type"))
        if self.command_type not in COMMAND_TYPES:
            raise ConfigurationError(
                f"parameter command_type: {self.command_type!r} is not one of {', '.join(COMMAND_TYPES)}"
            )
        if self.command_type == "twist" and self.action_dim not in messages.TWIST_SIZES:
            raise ConfigurationError(
                f"parameter command_type: twist needs a 6-d action (linear, angular), a 3-d (vx, vy, "
                f"yaw rate) or a 2-d (vx, yaw rate); the checkpoint's action has {self.action_dim}"
            )
        self.joint_names = self._param("trajectory_joint_names")
        if self.joint_names is None:
            self.joint_names = ARM_ACTION_NAMES if self.action_dim == len(ARM_ACTION_NAMES) else []
        self.joint_names = [str(n) for n in self.joint_names]
        if self.command_type == "trajectory" and len(self.joint_names) != self.action_dim:
            raise ConfigurationError(
                f"parameter trajectory_joint_names: {len(self.joint_names)} names {self.joint_names} "
                f"for the checkpoint's {self.action_dim}-d action"
            )
        self.control_hz = float(self._param("control_hz") or spec_json.get("control_hz") or 0)
        if not self.control_hz > 0:
            raise ConfigurationError("parameter control_hz: must be positive (the checkpoint records none)")
        max_obs_age = float(self._param("max_obs_age"))
        if not (np.isfinite(max_obs_age) and max_obs_age > 0):
            raise ConfigurationError(f"parameter max_obs_age: must be positive seconds, got {max_obs_age}")
        self.max_obs_age = max_obs_age
        n_action_steps = int(self._param("n_action_steps") or interface.n_action_steps)
        usable = interface.horizon - interface.n_obs_steps + 1
        if not 1 <= n_action_steps <= usable:
            raise ConfigurationError(
                f"parameter n_action_steps: {n_action_steps} not in [1, horizon - n_obs_steps + 1 = {usable}]"
            )
        deadline = self._param("deadline")
        try:
            config = ExecutorConfig(
                control_hz=self.control_hz,
                n_obs_steps=interface.n_obs_steps,
                n_action_steps=n_action_steps,
                blend=str(self._param("blend")),
                max_obs_age=max_obs_age,
                deadline=None if deadline is None else float(deadline),
            )
        except ValueError as e:
            raise ConfigurationError(f"parameter blend/control_hz/n_action_steps: {e}") from None
        normalized = "[-1, 1]" in (action_spec.units or "")
        gripper_dims = self._param("gripper_dims")
        if gripper_dims is None:
            mentions_gripper = "gripper" in (action_spec.description or "").lower()
            gripper_dims = [self.action_dim - 1] if mentions_gripper and self.command_type != "twist" else []
        limits = {}
        for name, default in (("action_min", -1.0), ("action_max", 1.0), ("max_delta", None)):
            value = self._param(name)
            limits[name] = _float_list(
                name, value if value is not None else (default if normalized else None)
            )
        try:
            self.safety = SafetyFilter(self.action_dim, gripper_dims=[int(d) for d in gripper_dims], **limits)
        except ValueError as e:
            raise ConfigurationError(f"parameter action_min/action_max/max_delta/gripper_dims: {e}") from None

        self.seed = int(self._param("seed"))
        priority = int(self._param("realtime_priority"))
        if priority != 0 and (inference != "process" or not 2 <= priority <= 99):
            raise ConfigurationError(
                f"parameter realtime_priority: {priority} needs inference 'process' (got {inference!r}) "
                "and a value in 2-99 (0: normal scheduling)"
            )
        self._start_runner, self._restarts, self._failing = None, 0, ""
        if inference == "process":
            device = str(self._param("device"))
            self._start_runner = lambda: ProcessInference(path, device, threads, max(priority - 1, 0))
            runner = self._start_runner()
            self._watch(runner)
            if priority:  # configure runs in a callback: this thread spins the executor and runs the
                # control timer; the middleware's threads deliver the observations: all real-time
                warning = set_realtime_priority(priority, "the node's threads", threads="process")
                for message in (warning, runner.warning):
                    if message:
                        self.get_logger().warning(message)
        elif inference == "threaded":
            runner = ThreadedInference(self._predict)
        elif inference == "simulated" and delay >= 0:
            runner = DelayedInference(self._predict, delay)
        else:
            raise ConfigurationError(
                f"parameter inference: {inference!r} (inference_delay {delay}) is not 'process', "
                "'threaded' or 'simulated' with inference_delay >= 0"
            )
        self.chunk_executor = ChunkExecutor(
            runner,
            config,
            self.action_dim,
            hold=lambda last: self.safety.safe_command(),
        )
        self.policy = policy  # the threaded and simulated runners call it (None with "process")
        self._warm_up(runner)
        self._make_entities()
        freeze_startup_objects()  # the model is loaded: no collector pause of tens of ms in control
        self.interface = interface  # last: the diagnostics and services read it as "configured"
        self.get_logger().info(
            f"configured {path}: {interface.policy_class}, observations "
            + ", ".join(
                f"{k} <- {b.topic} ({b.type}{f' {b.field}' if b.field else ''})"
                for k, b in self.bindings.items()
            )
            + f"; {self.command_type} commands on {self.command_topic} at {self.control_hz:g} Hz"
        )

    def _load_in_process(self, policy: Any, threads: int) -> Any:
        """The policy for the threaded and simulated runners, which compute in this process."""
        import torch

        if not callable(getattr(policy, "predict_chunk", None)):
            raise ConfigurationError(f"a {type(policy).__name__} is not a chunk-predicting policy")
        if threads > 0:
            torch.set_num_threads(threads)
        try:
            return policy.to(torch.device(str(self._param("device"))))
        except (RuntimeError, AssertionError) as e:
            raise ConfigurationError(
                f"parameter device: {self._param('device')!r} is not usable: {e}"
            ) from None

    def _warm_up(self, runner: Any) -> None:
        """One inference on a zero history where inference runs, so that the first real chunk is not
        slowed by lazy setup, and a check of the chunk's shape. The inference process has done it on
        its own already; the other runners compute in this process."""
        if hasattr(runner, "warm_up"):  # ProcessInference
            shape, seconds = runner.warm_up
        else:
            from robomosaic.policies.rollout import warm_up

            start = time.perf_counter()
            shape = warm_up(self.policy).shape
            seconds = time.perf_counter() - start
        if shape[1] != self.action_dim:
            raise ConfigurationError(
                f"the policy returns chunks of shape {shape}, expected (*, {self.action_dim})"
            )
        self.get_logger().info(f"warm-up inference: {1000 * seconds:.0f} ms")

    def _make_entities(self) -> None:
        message_type, default_topic = COMMAND_TYPES[self.command_type]
        self.command_topic = str(self._param("command_topic") or default_topic)
        self._command_pub = self.create_publisher(message_type, self.command_topic, command_qos())
        self._entities.append(self._command_pub)
        with self._data_lock:
            self._latest.clear()
            self._fresh = False
        by_topic: dict[str, list[messages.TopicBinding]] = {}
        for binding in self.bindings.values():
            by_topic.setdefault(binding.topic, []).append(binding)
        group = MutuallyExclusiveCallbackGroup()
        for topic, bindings in by_topic.items():
            types = {b.type for b in bindings}
            if len(types) > 1:
                raise ConfigurationError(f"topic {topic!r} is bound with different types {sorted(types)}")
            callback = self._make_callback(bindings)
            qos = sensor_qos()
            self._entities.append(
                self.create_subscription(
                    messages.message_type(bindings[0].type), topic, callback, qos, callback_group=group
                )
            )

    def _destroy_entities(self) -> None:
        for entity in self._entities:
            if isinstance(entity, Publisher):
                self.destroy_publisher(entity)
            else:
                self.destroy_subscription(entity)
        self._entities = []

    def on_activate(self, state: Any) -> TransitionCallbackReturn:
        with self._lock:
            self._new_episode()
            self.active = self.enabled = True
            self._control_timer = self.create_timer(
                1.0 / self.control_hz, self._tick, MutuallyExclusiveCallbackGroup()
            )
        self.get_logger().info(f"active: {self.command_type} commands on {self.command_topic}")
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: Any) -> TransitionCallbackReturn:
        self._stop("deactivated")
        # ERROR sends the state machine through ErrorProcessing (on_error)
        return TransitionCallbackReturn.ERROR if self._failing else TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: Any) -> TransitionCallbackReturn:
        self._stop("cleaned up")
        self._destroy_entities()
        self._release_runner()
        self.policy = self.interface = None
        gc.unfreeze()  # configure froze the model's objects; its reference cycles can be freed now
        return TransitionCallbackReturn.SUCCESS

    def _release_runner(self) -> None:
        """End the inference process, if the runner has one."""
        executor = getattr(self, "chunk_executor", None)
        if executor is not None and hasattr(executor.runner, "shutdown"):
            executor.runner.shutdown()
        self.chunk_executor = None
        restart, self._restart = self._restart, None
        if restart is not None:  # a process being started must not outlive the configuration
            restart.thread.join()
            if restart.runner is not None:
                restart.runner.shutdown()

    def on_shutdown(self, state: Any) -> TransitionCallbackReturn:
        self._stop("shut down")
        self._release_runner()
        return TransitionCallbackReturn.SUCCESS

    def destroy_node(self) -> None:
        """A node destroyed without the shutdown transition still ends control and its inference
        process (otherwise the process outlives the node and its death is reported as a fault)."""
        self._stop("destroyed")
        self._release_runner()
        super().destroy_node()

    def on_error(self, state: Any) -> TransitionCallbackReturn:
        # error processing ends in "unconfigured": leave nothing of the configuration behind (the
        # reason stays in last_error, so the diagnostics keep saying ERROR until a new configure)
        self.get_logger().error(f"error processing: {self._failing or self.last_error}")
        return self.on_cleanup(state)

    def _stop(self, why: str) -> None:
        """Stop the control loop and send the safe command once (if control was running)."""
        with self._lock:
            if self._control_timer is not None:
                self.destroy_timer(self._control_timer)
                self._control_timer = None
            was_active, was_enabled = self.active, self.enabled
            self.active = self.enabled = False
            if was_active:
                if was_enabled:  # after ~/disable another source may be driving the robot
                    self._send_safe_command()
                self.chunk_executor.close()
                sent = "sent the safe command, " if was_enabled else ""
                self.get_logger().info(f"{why}: {sent}control stopped")

    def _new_episode(self) -> None:
        from robomosaic.policies.rollout import episode_generator

        self.chunk_executor.reset()
        self.safety.reset()
        self._faults_reported = 0  # the executor's counts start again
        self.episode += 1
        self._generator = episode_generator(self.seed, self.episode)
        if hasattr(self.chunk_executor.runner, "set_stream"):  # ProcessInference: the same stream
            self.chunk_executor.runner.set_stream(self.seed, self.episode)
        with self._data_lock:  # the new episode starts from samples that arrive from now on
            self._latest.clear()
            self._fresh = False

    # -- services -------------------------------------------------------------------------------
    def _on_enable(self, request: Any, response: Any) -> Any:
        with self._lock:
            if not self.active:
                response.success, response.message = (
                    False,
                    f"not active (lifecycle state {self._state_label()})",
                )
            elif self.enabled:
                response.success, response.message = True, "already enabled"
            else:
                self._new_episode()  # the old plan and history are stale after a pause
                self.enabled = True
                response.success, response.message = True, "enabled: control resumes from a fresh history"
        return response

    def _on_disable(self, request: Any, response: Any) -> Any:
        with self._lock:
            if not self.active:
                response.success, response.message = (
                    False,
                    f"not active (lifecycle state {self._state_label()})",
                )
            else:
                if self.enabled:
                    self._send_safe_command()
                self.enabled = False
                response.success, response.message = True, "disabled: safe command sent, no more commands"
        return response

    def _on_reset_history(self, request: Any, response: Any) -> Any:
        with self._lock:
            if self.interface is None:
                response.success, response.message = (
                    False,
                    f"not configured (lifecycle state {self._state_label()})",
                )
            else:
                self._new_episode()
                response.success, response.message = True, f"history reset; episode {self.episode}"
        return response

    def _state_label(self) -> str:
        return self._state_machine.current_state[1]

    # -- observations ---------------------------------------------------------------------------
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _make_callback(self, bindings: list[messages.TopicBinding]):
        def callback(msg: Any) -> None:
            now = self._now()
            stamp = messages.message_stamp(msg) or now
            if stamp > now + self.max_obs_age:  # it would never count as stale: refuse it
                self._counts["bad_messages"] += 1
                self.get_logger().error(
                    f"rejected a message on {bindings[0].topic}: stamped {stamp - now:.3f} s in the future "
                    "(synchronise the clocks of the robot's computers)",
                    throttle_duration_sec=2.0,
                )
                return
            for binding in bindings:
                try:
                    value = messages.message_to_array(msg, binding)
                    value = (
                        self.adapter.value(binding, msg, value)
                        if self.adapter
                        else self._checked(binding, value)
                    )
                except ValueError as e:
                    self._counts["bad_messages"] += 1
                    self.get_logger().error(f"rejected a message: {e}", throttle_duration_sec=2.0)
                    continue
                with self._data_lock:
                    if binding.type == "String":
                        self.task = value
                    else:
                        self._latest[binding.key] = Sample(value, stamp)
                    self._fresh = True

        return callback

    def _checked(self, binding: messages.TopicBinding, value: Any) -> Any:
        where = f"observation {binding.key!r} (topic {binding.topic!r})"
        if binding.type == "String":
            if value not in self.task_set.tasks:
                raise ValueError(
                    f"{where}: task {value!r} is not one of the checkpoint's {list(self.task_set.tasks)}"
                )
            return value
        spec = self.obs_spec[binding.key]
        value = np.asarray(value, dtype=np.dtype(spec.dtype))
        expected = spec_shape(binding.key, spec, self.task_set)
        if expected is None:
            if value.ndim != 1 or value.shape[0] > spec.shape[0]:
                raise ValueError(f"{where}: got shape {value.shape}, the checkpoint pads up to {spec.shape}")
        elif value.shape != expected:
            raise ValueError(f"{where}: got shape {value.shape}, the checkpoint expects {expected}")
        return value

    def _observe(self) -> None:
        """Offer the newest sample of every key to the executor once something new arrived."""
        with self._data_lock:
            if not self._fresh or (self.task_set is not None and self.task is None):
                return
            keys = [k for k in self.bindings if self.bindings[k].type != "String"]
            if any(k not in self._latest for k in keys):
                return
            self._fresh = False
            samples = {k: self._latest[k] for k in keys}
            task = self.task
        obs = {k: s.value for k, s in samples.items()}
        if self.adapter is not None:
            obs = self.adapter.observe(obs)
        if self.task_set is not None:
            obs = self.task_set.adapt(obs, task)
        self.chunk_executor.observe(obs, min(s.stamp for s in samples.values()))

    def newest_obs_age(self) -> float | None:
        with self._data_lock:
            if not self._latest:
                return None
            return self._now() - min(s.stamp for s in self._latest.values())

    # -- control --------------------------------------------------------------------------------
    def _predict(self, history: dict[str, np.ndarray], committed: np.ndarray | None) -> np.ndarray:
        return self.policy.predict_chunk(history, committed, generator=self._generator)

    def _tick(self) -> None:
        with self._lock:
            if not self.active:
                return
            now = self._now()
            self._tick_times.append(time.monotonic())
            del self._tick_times[: -10 * int(self.control_hz) - 1]
            if self._inference_down():
                if self.enabled:
                    self._send_safe_command()
                return
            try:
                self._observe()
                if not self.enabled:
                    return
                action, status = self.chunk_executor.act(now)
            except Exception as e:  # inference failed or returned a wrong shape: never end the node
                self._counts["inference_errors"] += 1
                self.get_logger().error(
                    f"control step: {e!r} ({e.__cause__!r}); sending the safe command",
                    throttle_duration_sec=1.0,
                )
                if self.enabled:
                    self._send_safe_command()
                return
            command, _ = self.safety(action, hold=status != "ok")
            self._publish(command, plan=status == "ok", now=now)

    def _inference_down(self) -> bool:
        """Whether the inference process is dead or being restarted (module docstring, Faults)."""
        if self._failing:
            return True
        restart = self._restart
        if restart is not None:
            if restart.thread.is_alive():
                return True
            self._restart = None
            if restart.runner is None:
                self._fail(f"{self.last_error}; the restart failed: {restart.error}")
                return True
            self.chunk_executor.runner = restart.runner
            self._watch(restart.runner)
            self._new_episode()
            self.last_error = ""
            self.get_logger().info(
                f"inference process restarted (pid {restart.runner.pid}); control resumes from a "
                "fresh history"
            )
            self._publish_diagnostics()
            return False
        death = getattr(self.chunk_executor.runner, "death", lambda: None)()
        if death is None:
            return False
        limit = int(self._param("inference_restarts"))
        if self._restarts >= limit:
            self._fail(f"{death}; restart limit inference_restarts={limit} reached")
        else:
            self._restarts += 1
            self.last_error = f"{death}; holding while it restarts ({self._restarts} of {limit})"
            self.get_logger().error(self.last_error)
            self._restart = _Restart(self._start_runner)
        self._publish_diagnostics()  # now, not at the next 1 Hz report
        return True

    def _watch(self, runner: Any) -> None:
        """Report the death of the runner's process as it happens (ERROR and the safe command at
        once), not only at the next control tick: a thread waits on the process's sentinel."""

        def watch() -> None:
            wait_ready([runner.sentinel])
            if not self.context.ok():  # the process ends with the interpreter: nothing to report
                return
            with self._lock:  # an intended shutdown stops control first: nothing to report then
                current = self.active and getattr(self.chunk_executor, "runner", None) is runner
                if current and self._inference_down() and self.enabled:
                    self._send_safe_command()

        threading.Thread(target=watch, name="inference-watch", daemon=True).start()

    def _fail(self, why: str) -> None:
        """Hold, report, and go through the lifecycle error state (from a timer of its own: the
        transition destroys the control timer, which must not happen inside its callback)."""
        self._failing = self.last_error = f"{why}: going to the lifecycle error state"
        self.get_logger().error(self.last_error)

        def transition() -> None:
            self.destroy_timer(timer)
            self.trigger_deactivate()

        timer = self.create_timer(0.0, transition, MutuallyExclusiveCallbackGroup())

    def _send_safe_command(self) -> None:
        command, _ = self.safety(np.zeros(self.action_dim), hold=True)
        self._publish(command, plan=False, now=self._now())

    def _publish(self, command: np.ndarray, plan: bool, now: float) -> None:
        if self.command_type == "forward":
            self._command_pub.publish(messages.float64_array_msg(command))
        elif self.command_type == "twist":
            self._command_pub.publish(messages.twist_msg(command))
        else:
            points = command[None]
            if plan and self.chunk_executor.chunks:
                # The rest of the current plan, so a trajectory controller can run on between messages
                # (with blend=ensemble this is the newest chunk's plan, not the blend).
                chunk = self.chunk_executor.chunks[-1]
                future = chunk.actions[chunk.index_at(now, self.chunk_executor.config.dt) + 1 :]
                points = np.vstack([points, self.safety.limit_chunk(future, command)])
            msg = messages.joint_trajectory_msg(
                points, self.joint_names, 1.0 / self.control_hz, seconds_to_stamp(now)
            )
            self._command_pub.publish(msg)

    # -- diagnostics ----------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        with self._lock:
            values = {
                "lifecycle_state": self._state_label(),
                "enabled": str(self.enabled),
                "episode": str(self.episode),
                "inference_restarts": str(self._restarts),
            }
            level, message = DiagnosticStatus.OK, "controlling" if self.active and self.enabled else "idle"
            if self.interface is not None:
                stats = self.chunk_executor.stats
                latencies = stats.latencies[-LATENCY_WINDOW:]
                age = self.newest_obs_age()
                periods = np.diff(self._tick_times)
                values.update(
                    {
                        "inference_latency_p50_ms": _percentile_ms(latencies, 50),
                        "inference_latency_p99_ms": _percentile_ms(latencies, 99),
                        "deadline_misses": str(stats.deadline_misses),
                        "newest_obs_age_ms": "nan" if age is None else f"{1000 * age:.1f}",
                        "rejected_obs": str(stats.rejected_obs),
                        "rejected_chunks": str(stats.rejected_chunks),
                        "dropped_actions": str(stats.dropped_actions),
                        "chunks": str(stats.chunks),
                        "control_steps": str(stats.steps),
                        "control_period_p99_ms": _percentile_ms(periods, 99),
                        "task": str(self.task or ""),
                        "inference_pid": str(getattr(self.chunk_executor.runner, "pid", "")),
                        **{f"holds_{reason}": str(n) for reason, n in sorted(stats.held.items())},
                        **{f"safety_{k}": str(v) for k, v in sorted(self.safety.stats.by_status.items())},
                        **{k: str(v) for k, v in self._counts.items()},
                    }
                )
                # WARN while it happens (since the last report), not for the rest of the episode
                faults = stats.deadline_misses + sum(stats.held.values()) + stats.rejected_obs
                recent, self._faults_reported = faults - self._faults_reported, faults
                if self.active and self.enabled and recent > 0:
                    level, message = DiagnosticStatus.WARN, "holding or rejecting observations (see values)"
            if self.last_error:
                level, message = DiagnosticStatus.ERROR, self.last_error
        status = DiagnosticStatus(
            level=level,
            name=f"robomosaic policy: {self.get_fully_qualified_name()}",
            message=message,
            hardware_id=str(self._param("checkpoint")),
            values=[KeyValue(key=k, value=v) for k, v in values.items()],
        )
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics.publish(array)


class _Restart:
    """A new inference process started on a thread of its own (loading takes seconds, and the
    control tick must keep sending the safe command meanwhile)."""

    def __init__(self, start: Any) -> None:
        self.runner: Any = None
        self.error = ""
        self.thread = threading.Thread(target=self._run, args=(start,), name="inference-restart", daemon=True)
        self.thread.start()

    def _run(self, start: Any) -> None:
        try:
            self.runner = start()
        except Exception as e:  # reported by the control tick, which then fails the node
            self.error = f"{type(e).__name__}: {e}"


def main(argv: list[str] | None = None) -> None:
    """robomosaic-policy-node (standard ROS arguments: --ros-args -p checkpoint:=... --params-file f.yaml)."""
    rclpy.init(args=list(sys.argv if argv is None else ["robomosaic-policy-node", *argv]))
    node = PolicyNode()
    if node.get_parameter("autostart").value and (
        node.trigger_configure() != TransitionCallbackReturn.SUCCESS
        or node.trigger_activate() != TransitionCallbackReturn.SUCCESS
    ):
        node.destroy_node()
        rclpy.try_shutdown()
        raise SystemExit(f"robomosaic-policy-node: autostart: {node.last_error or 'activate failed'}")
    spin_node(node)


if __name__ == "__main__":
    main()
