"""robomosaic-record-node: record teleoperated episodes from ROS 2 topics into a zarr episode store.

    robomosaic-record-node --ros-args --params-file config/sim_arm_policy.yaml -p store:=demos/teleop.zarr
    ros2 service call /recorder/start std_srvs/srv/Trigger
    ros2 service call /recorder/stop std_srvs/srv/SetBool "{data: true}"     # true: the task succeeded
    ros2 service call /recorder/discard std_srvs/srv/Trigger                 # drop the episode in progress

Parameters (the policy node's observation scheme, so one YAML file describes the robot for both):
- `observations.<key>.topic|type|field|names`: what is recorded under data key `<key>` (types and
  fields as `robomosaic.ros_nodes.messages.TopicBinding`; String topics cannot be recorded), plus
  optional `observations.<key>.units|frame|description` for the store's key description. Keys the
  arm tasks know (`robot0_eef_pos`, `robot0_eef_quat`, `robot0_gripper_qpos`) take the task's
  description (units, frame, float64); others take their shape from the first message, dtype uint8
  for images and float64 otherwise, and the message's header frame_id when no frame is given.
- `store` (required): the zarr store; created at the first `~/start`, or appended to when it exists
  (its schema must match). `task`, `robot` ("Panda"), `controller` ("OSC_POSE"), `control_hz` (20.0):
  written into the dataset spec; `behaviour` ("teleop") into every episode's metadata.
- `max_obs_age` (s, default two control periods): freshness limit of the observation topics.
- Action source: `action_topic` ("/cmd_vel") of `action_type` "Twist" (teleop_twist_keyboard,
  teleop_twist_joy) or "Float64MultiArray" (a 7-d action as the sim's forward command topic), and
  `gripper_topic` ("/gripper_command", std_msgs/Float64, +1 closes, -1 opens, sticky).
- `command_timeout` (0.2 s), `cmd_vel_linear_full_scale` (1.0 m/s), `cmd_vel_angular_full_scale`
  (10.0 rad/s): the same parameters, defaults and mapping as robomosaic-sim-node's, so that the
  recorded action is the action the simulated robot applies (see "Action" below).
- `reset_service` (""): a std_srvs/Trigger service called at every `~/start` before recording,
  e.g. "/sim/reset" of robomosaic-sim-node; the seed in its JSON answer goes into the episode's
  metadata (otherwise the seed is -1). A seed the store already holds (the sim was relaunched and
  started its seeds again) is never recorded twice: the recorder sets the sim's `seed` parameter
  (on the node that serves `reset_service`) to the first seed after it that the store does not
  hold, as robomosaic-collect continues, and resets again.

Action (key `action`, 7-d OSC_POSE delta in [-1, 1]: dx, dy, dz, droll, dpitch, dyaw, gripper).
A Twist is an end-effector velocity: linear m/s and angular rad/s are divided by the full scales and
clipped to [-1, 1] (`sim_node.twist_to_action`; with the defaults an action of 1 is the controller's
0.05 m / 0.5 rad per 1/20 s step). The gripper entry is the last `gripper_topic` value (0 until the
first one, and again after a `reset_service` call, as the sim resets it). A motion command older than
`command_timeout` is zero motion, as in the sim (teleop_twist_keyboard publishes only on key
presses). The recorder and the sim each read the newest command at their own tick, so at a change
of command the sim may apply it up to one control period before or after the recorded step.

Time alignment and stale topics. A timer at `control_hz` (on the node's clock: the wall clock, or
/clock with use_sim_time) takes the newest message of every topic; each step stores the observations
and the action commanded at that tick. A step is written only when every observation topic has a
message received after the episode started (after the reset answered, with `reset_service`) and at
most `max_obs_age` seconds ago; otherwise the tick is skipped (counted per topic, logged, and
reported when the episode is saved), so the dataset never holds old observations paired with a new
action. Freshness uses the receipt time, not the header stamp, so clock offsets between machines do
not matter. Non-finite observations are skipped the same way.

Services: `~/start` (std_srvs/Trigger; fails when already recording, when the store cannot be
opened, or when an observation topic has no fresh message: the answer names them), `~/stop`
(std_srvs/SetBool, data = whether the episode succeeded: appends the episode to the store),
`~/discard` (std_srvs/Trigger). `~/status` (std_msgs/String JSON, reliable, transient local):
{"recording", "episode_steps", "episodes", "skipped", "last_saved"} at every change and each second.

Crash safety: an episode is kept in memory and appended at `~/stop` with `EpisodeStore.append_episode`,
which commits atomically; a killed recorder loses at most the episode in progress. Ctrl-C (SIGINT or
SIGTERM) discards an episode in progress (its success is unknown) with a warning naming its length.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from robomosaic.data.collect import free_seeds
from robomosaic.data.spec import DatasetSpec, KeySpec
from robomosaic.ros_nodes.common import require_rclpy, run_node
from robomosaic.ros_nodes.sim_node import MAX_DELTA_POS, MAX_DELTA_ROT, twist_to_action
from robomosaic.sim.tasks import ACTION_SPEC, CONTROL_HZ, CONTROLLER, PROPRIO_KEYS, ROBOT

ACTION_KEY = "action"
ACTION_TYPES = ("Twist", "Float64MultiArray")
BINDING_FIELDS = ("topic", "type", "field", "names")
DESCRIPTION_FIELDS = ("units", "frame", "description")
ROS_PARAMETERS = ("use_sim_time", "start_type_description_service")  # every rclpy node has these
PARAMETERS: dict[str, Any] = {
    "store": "",
    "task": "",
    "robot": ROBOT,
    "controller": CONTROLLER,
    "control_hz": CONTROL_HZ,
    "behaviour": "teleop",
    "max_obs_age": 0.0,  # 0: two control periods
    "action_topic": "/cmd_vel",
    "action_type": "Twist",
    "gripper_topic": "/gripper_command",
    "command_timeout": 0.2,
    "cmd_vel_linear_full_scale": MAX_DELTA_POS * CONTROL_HZ,
    "cmd_vel_angular_full_scale": MAX_DELTA_ROT * CONTROL_HZ,
    "reset_service": "",
}


@dataclass
class RecordedKey:
    """One observation key: where it comes from and how the store describes it."""

    binding: Any  # messages.TopicBinding
    units: str = ""
    frame: str | None = None  # None: the message's header frame_id
    description: str = ""


def observation_keys(params: Mapping[str, Any]) -> dict[str, RecordedKey]:
    """Parse the `observations.<key>.<field>` parameters (given without the `observations.` prefix)."""
    from robomosaic.ros_nodes.messages import TopicBinding

    fields: dict[str, dict[str, Any]] = {}
    for name, value in params.items():
        key, _, field = name.partition(".")
        if field not in BINDING_FIELDS + DESCRIPTION_FIELDS:
            raise ValueError(
                f"parameter observations.{name}: unknown field {field!r} "
                f"(known: {', '.join(BINDING_FIELDS + DESCRIPTION_FIELDS)})"
            )
        fields.setdefault(key, {})[field] = value
    if not fields:
        raise ValueError("no observations.<key>.topic parameters: nothing to record")
    keys = {}
    for key, f in fields.items():
        if key == ACTION_KEY:
            raise ValueError(f"parameter observations.{key}: '{ACTION_KEY}' is the recorded command's key")
        for required in ("topic", "type"):
            if not f.get(required):
                raise ValueError(f"parameter observations.{key}.{required} is missing")
        if f["type"] == "String":
            raise ValueError(f"parameter observations.{key}.type: String topics cannot be recorded as arrays")
        binding = TopicBinding(
            key=key,
            topic=f["topic"],
            type=f["type"],
            field=f.get("field") or None,
            names=f.get("names") or None,
        )
        keys[key] = RecordedKey(binding, f.get("units", ""), f.get("frame") or None, f.get("description", ""))
    return keys


def reseed(store: Any, seed: int) -> int | None:
    """None if the sim's `seed` is new to `store` (or unknown, -1); otherwise the first seed after it
    that the store does not hold, where the sim's seeds must restart (as robomosaic-collect does)."""
    if seed < 0:
        return None
    taken = {int(s) for s in store.meta_array("seed")}
    return next(free_seeds(seed, taken)) if seed in taken else None


def key_spec(key: str, recorded: RecordedKey, value: np.ndarray, frame_id: str) -> KeySpec:
    """How the store describes `key`, given its first value and the message's header frame_id."""
    if key in PROPRIO_KEYS:
        return PROPRIO_KEYS[key]
    b = recorded.binding
    dtype = "uint8" if value.dtype == np.uint8 else "float64"
    units = recorded.units or ("RGB" if dtype == "uint8" else "")
    return KeySpec(
        value.shape,
        dtype,
        units,
        recorded.frame if recorded.frame is not None else frame_id,
        recorded.description or f"{b.topic} ({b.type}{'.' + b.field if b.field else ''})",
    )


class Episode:
    """Steps of the episode in progress, kept in memory until it is stopped."""

    def __init__(self, seed: int, started: float) -> None:
        self.seed, self.started = seed, started
        self.steps: dict[str, list[np.ndarray]] = {}
        self.length = 0
        self.skipped = 0  # ticks skipped after the first step
        self.problems: dict[str, int] = {}  # why -> ticks it made skip
        self.waiting: list[str] = []  # why the first step is not written yet
        self.ticks: list[float] = []  # monotonic times of the timer's ticks

    def add(self, step: Mapping[str, np.ndarray]) -> None:
        for k, v in step.items():
            self.steps.setdefault(k, []).append(v)
        self.length += 1

    def skip(self, problems: Sequence[str]) -> None:
        """A tick without a step: before the first step that is waiting, later a gap."""
        if not self.length:
            self.waiting = list(problems)
            return
        self.skipped += 1
        for why in problems:
            self.problems[why] = self.problems.get(why, 0) + 1

    def timing_text(self, period: float) -> str:
        """How well the timer kept the control rate (a loaded machine delays it)."""
        gaps = np.diff(self.ticks)
        if not len(gaps):
            return ""
        late = int(np.sum(gaps > 1.5 * period))
        return (
            f"; timer period mean {1000 * gaps.mean():.1f} ms, max {1000 * gaps.max():.0f} ms, "
            f"{late} of {len(gaps)} periods over 1.5x"
        )

    def skipped_text(self) -> str:
        if not self.length:
            return f" (waiting for: {'; '.join(self.waiting) or 'the first tick'})"
        if not self.skipped:
            return ""
        counts = ", ".join(f"{why} ({n} ticks)" for why, n in self.problems.items())
        return f" ({self.skipped} ticks skipped: {counts})"

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.stack(v) for k, v in self.steps.items()}


def _make_node_class():  # rclpy is imported only when a node is built
    require_rclpy()
    from geometry_msgs.msg import Twist
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from std_msgs.msg import Float64, Float64MultiArray, String
    from std_srvs.srv import SetBool, Trigger

    from robomosaic.data.store import EpisodeStore, StoreError
    from robomosaic.ros_nodes import messages
    from robomosaic.ros_nodes.common import command_qos, sensor_qos

    class RecordNode(Node):
        def __init__(self, name: str = "recorder") -> None:
            super().__init__(name, automatically_declare_parameters_from_overrides=True)
            p = self._read_parameters()
            self.keys = observation_keys(
                {k: v.value for k, v in self.get_parameters_by_prefix("observations").items()}
            )
            self.control_hz = float(p["control_hz"])
            for key in (
                "control_hz",
                "command_timeout",
                "cmd_vel_linear_full_scale",
                "cmd_vel_angular_full_scale",
            ):
                if not float(p[key]) > 0:
                    raise ValueError(f"parameter {key}={p[key]} must be positive")
            if not p["store"]:
                raise ValueError("parameter store is required: the zarr store episodes are appended to")
            if p["action_type"] not in ACTION_TYPES:
                raise ValueError(f"parameter action_type={p['action_type']!r} must be one of {ACTION_TYPES}")
            self.p = p
            self.max_obs_age = float(p["max_obs_age"]) or 2.0 / self.control_hz
            self.store: EpisodeStore | None = None
            self.spec: DatasetSpec | None = None
            self.episode: Episode | None = None
            self.pending_reset = False  # ~/start called the reset service, no answer yet
            self.last_saved: dict[str, Any] | None = None

            # Newest message of every topic with its receipt time (node clock, seconds). Callbacks
            # only replace a tuple, which is atomic, so the timer reads them without a lock.
            self.latest: dict[str, tuple[Any, float]] = {}
            topics: dict[str, str] = {}
            for key, rk in self.keys.items():
                b = rk.binding
                if topics.setdefault(b.topic, b.type) != b.type:
                    raise ValueError(
                        f"parameter observations.{key}.type={b.type!r}: topic {b.topic} is already "
                        f"recorded as {topics[b.topic]}"
                    )
            sub_group = MutuallyExclusiveCallbackGroup()
            for topic, type_name in topics.items():
                self.create_subscription(
                    messages.message_type(type_name), topic, self._receiver(topic), sensor_qos(),
                    callback_group=sub_group,
                )  # fmt: skip
            action_msg = Twist if p["action_type"] == "Twist" else Float64MultiArray
            self.command: tuple[np.ndarray, float] | None = None  # (7-d action, receipt time)
            self.gripper = 0.0
            self.create_subscription(
                action_msg, p["action_topic"], self._on_command, command_qos(), callback_group=sub_group
            )
            self.create_subscription(
                Float64, p["gripper_topic"], self._on_gripper, command_qos(), callback_group=sub_group
            )

            # Ticks and services never overlap: they share one mutually exclusive group.
            group = MutuallyExclusiveCallbackGroup()
            self.create_service(Trigger, "~/start", self._on_start, callback_group=group)
            self.create_service(SetBool, "~/stop", self._on_stop, callback_group=group)
            self.create_service(Trigger, "~/discard", self._on_discard, callback_group=group)
            self.reset_client = (
                self.create_client(
                    Trigger, p["reset_service"], callback_group=MutuallyExclusiveCallbackGroup()
                )
                if p["reset_service"]
                else None
            )
            self.sim_name = p["reset_service"].rsplit("/", 1)[0] or "/"
            self.seed_client = AsyncParameterClient(self, self.sim_name) if p["reset_service"] else None
            latched = QoSProfile(
                depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
            )
            self.pub_status = self.create_publisher(String, "~/status", latched)
            self.create_timer(1.0 / self.control_hz, self._on_tick, callback_group=group)
            self.create_timer(1.0, self._publish_status, callback_group=group)
            self._publish_status()
            self.get_logger().info(
                f"recording {sorted(self.keys)} + {ACTION_KEY} ({p['action_type']} on {p['action_topic']}, "
                f"gripper on {p['gripper_topic']}) at {self.control_hz:g} Hz into {p['store']}; "
                f"call ~/start, then ~/stop (data: success) or ~/discard"
            )

        def _read_parameters(self) -> dict[str, Any]:
            values = {}
            for name, default in PARAMETERS.items():
                if self.has_parameter(name):  # given on the command line or in a params file
                    value = self.get_parameter(name).value
                    if isinstance(default, float) and isinstance(value, int):
                        value = float(value)
                    if type(value) is not type(default):
                        raise ValueError(f"parameter {name}={value!r} must be a {type(default).__name__}")
                else:
                    value = self.declare_parameter(name, default).value
                values[name] = value
            unused = sorted(
                name
                for name in self.list_parameters([], 0).names
                if name not in PARAMETERS
                and name not in ROS_PARAMETERS
                and not name.startswith("observations.")
            )
            if unused:  # a typo, or a parameter file shared with the policy node
                self.get_logger().warning(f"parameters not used by the recorder: {', '.join(unused)}")
            return values

        def now(self) -> float:
            return self.get_clock().now().nanoseconds * 1e-9

        # -- inputs -------------------------------------------------------------------------------
        def _receiver(self, topic: str):
            def receive(msg) -> None:
                self.latest[topic] = (msg, self.now())

            return receive

        def _on_command(self, msg) -> None:
            if self.p["action_type"] == "Float64MultiArray":  # a whole action, gripper included
                action = np.asarray(msg.data, dtype=np.float64)
                if action.shape != ACTION_SPEC.shape:
                    self.get_logger().warning(
                        f"{self.p['action_topic']}: ignored a command of {action.size} values "
                        f"(need {ACTION_SPEC.shape[0]})",
                        throttle_duration_sec=1.0,
                    )
                    return
            else:
                velocity = np.asarray(messages.twist_to_array(msg), dtype=np.float64)
                action = twist_to_action(
                    velocity, 0.0, self.p["cmd_vel_linear_full_scale"], self.p["cmd_vel_angular_full_scale"]
                )
            if not np.all(np.isfinite(action)):
                self.get_logger().warning(
                    f"{self.p['action_topic']}: ignored a non-finite command", throttle_duration_sec=1.0
                )
                return
            if self.p["action_type"] == "Float64MultiArray":
                self.gripper = float(np.clip(action[-1], -1.0, 1.0))
            self.command = (action, self.now())

        def _on_gripper(self, msg) -> None:
            if np.isfinite(msg.data):
                self.gripper = float(np.clip(msg.data, -1.0, 1.0))

        def action(self, now: float) -> np.ndarray:
            """The action the sim applies now: the newest command, zero motion once it is stale."""
            action = np.zeros(ACTION_SPEC.shape)
            command = self.command
            if command is not None and now - command[1] <= self.p["command_timeout"] + 1e-9:
                action[:] = command[0]
            action[-1] = self.gripper
            return action.astype(ACTION_SPEC.dtype)

        def observe(
            self, since: float, now: float
        ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
            """The newest value of every key, the header frame of each, and why not (problems)."""
            latest = dict(self.latest)  # one snapshot: keys from one topic come from one message
            stale = sorted(
                {
                    rk.binding.topic
                    for rk in self.keys.values()
                    if (got := latest.get(rk.binding.topic)) is None
                    or got[1] < since
                    or now - got[1] > self.max_obs_age
                }
            )
            if stale:
                return {}, {}, [f"no message on {t} within max_obs_age={self.max_obs_age:g} s" for t in stale]
            values, frames = {}, {}
            for key, rk in self.keys.items():
                msg = latest[rk.binding.topic][0]
                try:
                    value = np.asarray(messages.message_to_array(msg, rk.binding))
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    return {}, {}, [f"bad message on {rk.binding.topic} for {key}: {e}"]
                if value.dtype.kind not in "biuf":
                    return {}, {}, [f"{key} on {rk.binding.topic} is not numeric ({value.dtype})"]
                if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                    return {}, {}, [f"non-finite {key} on {rk.binding.topic}"]
                values[key] = value
                header = getattr(msg, "header", None)
                frames[key] = header.frame_id if header is not None else ""
            if error := self.spec and self._shape_error(values):
                return {}, {}, [error]
            return values, frames, []

        # -- services -----------------------------------------------------------------------------
        def _on_start(self, request, response):
            response.success, response.message = self._start()
            self._report(response.success, response.message)
            self._publish_status()
            return response

        def _report(self, ok: bool, message: str) -> None:
            # rclpy refuses one call site logging at two severities, hence two calls.
            if ok:
                self.get_logger().info(message)
            else:
                self.get_logger().warning(message)

        def _start(self) -> tuple[bool, str]:
            if self.episode is not None or self.pending_reset:
                return False, "already recording: call ~/stop or ~/discard first"
            now = self.now()
            values, frames, problems = self.observe(-np.inf, now)
            if problems:
                return False, f"cannot start: {'; '.join(problems)}"
            if self.store is None:
                try:
                    self._open_store(values, frames)
                except StoreError as e:
                    return False, f"cannot start: {e}"
            if self.reset_client is None:
                self.episode = Episode(seed=-1, started=now)
                return True, f"recording episode {self.store.n_episodes}"
            if not self.reset_client.service_is_ready():
                return False, f"cannot start: reset service {self.p['reset_service']} is not available"
            self.pending_reset = True
            self.reset_client.call_async(Trigger.Request()).add_done_callback(self._on_reset_done)
            return (
                True,
                f"resetting through {self.p['reset_service']}, "
                f"then recording episode {self.store.n_episodes}",
            )

        def _on_reset_done(self, future) -> None:
            if not self.pending_reset:  # ~/discard cancelled the start
                return
            self.pending_reset = False
            try:
                answer = future.result()
            except Exception as e:  # the service died or the call was cancelled
                self.get_logger().error(f"reset service {self.p['reset_service']} failed: {e}; not recording")
                return
            if not answer.success:
                self.get_logger().error(f"reset service {self.p['reset_service']} refused: {answer.message}")
                return
            try:
                seed = int(json.loads(answer.message)["seed"])
            except (ValueError, KeyError, TypeError):
                seed = -1
            restart = reseed(self.store, seed)
            if restart is not None:
                self._restart_sim_seeds(seed, restart)
                return
            self.gripper, self.command = 0.0, None  # the sim clears its commands at a reset
            self.episode = Episode(seed=seed, started=self.now())
            self.get_logger().info(f"recording episode {self.store.n_episodes} (seed {seed})")
            self._publish_status()

        def _restart_sim_seeds(self, taken: int, restart: int) -> None:
            """Set the sim's seed sequence to start at `restart` (`taken` is in the store), then reset."""
            self.get_logger().warning(
                f"the sim's seed {taken} is already in {self.p['store']} (was the sim relaunched?); "
                f"setting {self.sim_name} seed:={restart} and resetting again"
            )
            self.pending_reset = True

            def on_set(future) -> None:
                if not self.pending_reset:  # ~/discard cancelled the start
                    return
                try:
                    ok = all(result.successful for result in future.result().results)
                except Exception:  # the parameter service is gone
                    ok = False
                if not ok:
                    self.pending_reset = False
                    self.get_logger().error(
                        f"cannot set {self.sim_name} seed:={restart}; not recording, so that seed {taken} "
                        "is not stored twice"
                    )
                    return
                self.reset_client.call_async(Trigger.Request()).add_done_callback(self._on_reset_done)

            self.seed_client.set_parameters([Parameter("seed", value=restart)], callback=on_set)

        def _open_store(self, values: Mapping[str, np.ndarray], frames: Mapping[str, str]) -> None:
            keys = {k: key_spec(k, self.keys[k], values[k], frames[k]) for k in self.keys}
            for key, ks in keys.items():
                if values[key].shape != ks.shape:
                    raise StoreError(
                        f"observations.{key}: the message gives shape {values[key].shape}, "
                        f"{key} has {ks.shape}"
                    )
            keys[ACTION_KEY] = ACTION_SPEC
            p = self.p
            spec = DatasetSpec(
                keys=keys,
                control_hz=self.control_hz,
                robot=p["robot"],
                controller=p["controller"],
                task=p["task"],
                extra={
                    "recorder": "robomosaic-record-node",
                    "observations": {
                        k: {f: getattr(rk.binding, f) for f in BINDING_FIELDS} for k, rk in self.keys.items()
                    },
                    "action": {
                        k: p[k]
                        for k in ("action_topic", "action_type", "gripper_topic", "command_timeout",
                                  "cmd_vel_linear_full_scale", "cmd_vel_angular_full_scale")
                    },
                    "max_obs_age": self.max_obs_age,
                },
            )  # fmt: skip
            self.store = EpisodeStore.open_or_create(p["store"], spec)
            self.spec = self.store.spec
            self.get_logger().info(f"store {p['store']}: {self.store.n_episodes} episodes")

        def _on_stop(self, request, response):
            response.success, response.message = self._stop(bool(request.data))
            self._report(response.success, response.message)
            self._publish_status()
            return response

        def _stop(self, success: bool) -> tuple[bool, str]:
            episode, self.episode = self.episode, None
            if episode is None:
                return False, "not recording: nothing to stop"
            skipped = episode.skipped_text()
            if episode.length == 0:
                return False, f"episode discarded: no step was recorded{skipped}"
            meta = {
                "seed": episode.seed,
                "success": success,
                "task": self.p["task"],
                "behaviour": self.p["behaviour"],
                "duration": episode.length / self.control_hz,
            }
            start = time.perf_counter()
            try:
                index = self.store.append_episode(episode.arrays(), meta)
            except Exception as e:  # disk full, permissions, schema: keep the episode for another try
                self.episode = episode
                return False, (
                    f"episode of {episode.length} steps NOT saved ({e!r}); it is kept: fix the cause and "
                    "call ~/stop again, or ~/discard"
                )
            self.last_saved = {"episode": index, "steps": episode.length, "success": success}
            return True, (
                f"saved episode {index} ({'success' if success else 'failure'}, seed {episode.seed}): "
                f"{episode.length} steps, {episode.length / self.control_hz:.2f} s, appended in "
                f"{time.perf_counter() - start:.3f} s{skipped}{episode.timing_text(1.0 / self.control_hz)}; "
                f"the store holds {self.store.n_episodes} episodes"
            )

        def _on_discard(self, request, response):
            episode, self.episode = self.episode, None
            if self.pending_reset:
                self.pending_reset = False
                response.success, response.message = True, "start cancelled (the reset had not answered yet)"
            elif episode is None:
                response.success, response.message = False, "not recording: nothing to discard"
            else:
                response.success = True
                response.message = f"discarded an episode of {episode.length} steps{episode.skipped_text()}"
            self.get_logger().info(response.message)
            self._publish_status()
            return response

        def _shape_error(self, values: Mapping[str, np.ndarray]) -> str | None:
            for key, value in values.items():
                if value.shape != self.spec.keys[key].shape:
                    return f"{key} has shape {value.shape}, the store has {self.spec.keys[key].shape}"
            return None

        # -- the control-rate tick ----------------------------------------------------------------
        def _on_tick(self) -> None:
            episode = self.episode
            if episode is None:
                return
            episode.ticks.append(time.monotonic())
            now = self.now()
            values, _, problems = self.observe(episode.started, now)
            if problems:
                if episode.length:  # before the first step, waiting for fresh messages is normal
                    self.get_logger().warning(
                        f"tick skipped: {'; '.join(problems)}", throttle_duration_sec=1.0
                    )
                episode.skip(problems)
                return
            values[ACTION_KEY] = self.action(now)
            episode.add(values)

        def _publish_status(self) -> None:
            episode = self.episode
            status = {
                "recording": episode is not None,
                "episode_steps": episode.length if episode else 0,
                "episodes": self.store.n_episodes if self.store else None,
                "skipped": episode.skipped if episode else 0,
                "last_saved": self.last_saved,
            }
            self.pub_status.publish(String(data=json.dumps(status)))

        def on_shutdown(self) -> None:
            if self.episode is not None and self.episode.length:
                self.get_logger().warning(
                    f"shutting down while recording: the episode in progress ({self.episode.length} steps) "
                    "is discarded (call ~/stop to save an episode)"
                )
            self.episode = None

    return RecordNode


def main(argv: Sequence[str] | None = None) -> None:
    """robomosaic-record-node (standard ROS arguments: --ros-args -p store:=demos/x.zarr ...)."""
    run_node("robomosaic-record-node", lambda: _make_node_class()(), argv)


if __name__ == "__main__":
    main()
