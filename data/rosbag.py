"""rosbag2 recordings (MCAP storage) in and out of episode stores, without a ROS install.

    robomosaic-convert input=<bag folder | .mcap | folder of bags> out=<store> mapping=<yaml>
    robomosaic-export store=<store> out=<bag folder> mapping=<yaml>

Reading and writing go through `rosbags` (pure Python: rosbag2 bag folders with metadata.yaml and
MCAP or sqlite3 storage, CDR serialization from its typestore of the ROS 2 message definitions,
and the message definitions stored in a bag for types it does not know). A bag written here plays
with `ros2 bag play` and opens in Foxglove.

The mapping is the record node's parameter file (config/sim_arm_policy.yaml is one): section `/**`
(and the node sections `recorder` and `convert`, later ones overriding, so that `convert` can name
another action source than the teleop recorder's) under `ros__parameters`:
`observations.<key>.topic|type|field|names` as the policy node and the recorder bind them,
`action_topic` with `action_type` Float64MultiArray (a 7-d action) or Twist (+ `gripper_topic` and
the full scales, mapped as the recorder maps them), `task`, `robot`, `controller`, `control_hz`.
The `convert` section adds what only a recording needs:

- `steps` ("action"): how messages become steps. "action": one step per action message, its
  observations the newest message of each topic received before it (latest-before): a commanded
  robot, or a teleop stream sampled by its sender. "rate": ticks at `control_hz` from the first time
  every topic has a message, each topic's newest message at or before the tick, the action the
  newest command within `command_timeout` (zero motion after that, the gripper sticky); bindings
  listed in `interpolate` (joint states) are interpolated linearly between the messages around the
  tick instead.
- Episodes: `episode_topic` (a std_msgs/String of JSON, as robomosaic-sim-node's `~/episode`): a
  new episode starts when its `episode_field` ("episode") changes, its "seed" and "success" go into
  the episode's metadata, and ticks while the last status says `done` are not steps (the robot did
  not move); when the status counts the robot's steps (`step`), commands beyond that count at the
  end of an episode are dropped (they reached the recorder before the status saying the episode
  was done, and the robot ignored them). An episode's observations are those received after the
  previous episode's last status (the sim node publishes the reset state just before the status
  announcing the new episode).
  Without a status topic, `episode_gap` (s) splits at a pause of the command stream longer than
  that; without either, each bag is one episode (give a folder of bags).
- `max_obs_age` (0: off): a tick whose newest message of some topic is older than this is skipped.

Time is each message's receipt time in the bag (its log time), as the recorder uses receipt time,
so clock offsets between the robot's computers do not matter.

Export writes, per step at `1/control_hz`, each observation topic (several keys of one topic, as
position and orientation of a PoseStamped, go into one message), each task object's pose on
`/objects/<name>/pose` as the sim node publishes it (computed from the stored MuJoCo state, when the
store has one and its task is registered), then the action, and the episode
status on `episode_topic` ("/episode" by default) before each step and once more when the episode
ends, so that converting the bag back gives the same store.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from robomosaic.conf.console import RobomosaicError
from robomosaic.data.spec import DatasetSpec

DEFAULT_EPISODE_TOPIC = "/episode"
CONVERT_PARAMETERS: dict[str, Any] = {
    "steps": "action",
    "episode_topic": "",
    "episode_field": "episode",
    "episode_gap": 0.0,
    "max_obs_age": 0.0,
    "interpolate": [],
}
STEP_MODES = ("action", "rate")
GAP_BETWEEN_EPISODES = 1.0  # s of bag time between exported episodes


class BagError(RobomosaicError, ValueError):
    """A bag or mapping that cannot be converted; the message names the file, topic or field."""


def sim_arm_mapping() -> Path:
    """config/sim_arm_policy.yaml of the robomosaic package share (as `ros2 launch` finds it)."""
    from robomosaic.ros_nodes.launch import PACKAGE, package_share

    path = package_share(PACKAGE) / "config" / "sim_arm_policy.yaml"
    if not path.is_file():
        raise BagError(f"{path} is not installed: pass a mapping file")
    return path


def _typestore() -> Any:
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


# -- the mapping -------------------------------------------------------------------------------
@dataclass
class BagMapping:
    """What a mapping file says: observation keys, the action source, how to cut steps and episodes."""

    path: str
    keys: dict[str, Any]  # key -> record_node.RecordedKey
    recorder: dict[str, Any]  # record_node.PARAMETERS' values
    convert: dict[str, Any] = field(default_factory=lambda: dict(CONVERT_PARAMETERS))

    @property
    def topics(self) -> dict[str, str]:
        """Every topic the mapping reads -> its short message type."""
        topics = {rk.binding.topic: rk.binding.type for rk in self.keys.values()}
        topics[self.recorder["action_topic"]] = self.recorder["action_type"]
        if self.recorder["action_type"] == "Twist":
            topics[self.recorder["gripper_topic"]] = "Float64"
        if self.convert["episode_topic"]:
            topics[self.convert["episode_topic"]] = "String"
        return topics


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def load_mapping(path: str | Path) -> BagMapping:
    """Read a mapping file (see the module docstring); BagError names the file and parameter."""
    from robomosaic.ros_nodes.record_node import PARAMETERS, observation_keys

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise BagError(f"mapping={path}: cannot read it ({e})") from None
    if not isinstance(doc, dict):
        raise BagError(f"mapping={path}: expected sections such as '/**: ros__parameters: ...'")
    recorder, convert, observations = dict(PARAMETERS), dict(CONVERT_PARAMETERS), {}
    for section in ("/**", "recorder", "convert"):
        params = (doc.get(section) or {}).get("ros__parameters") or {}
        observations.update(params.get("observations") or {})
        for name, value in params.items():
            if name == "observations":
                continue
            if section == "convert" and name not in CONVERT_PARAMETERS and name not in PARAMETERS:
                raise BagError(
                    f"mapping={path}: convert.{name} is neither a converter parameter "
                    f"({', '.join(CONVERT_PARAMETERS)}) nor a recorder parameter"
                )
            target = convert if name in CONVERT_PARAMETERS else recorder
            if name in target:
                target[name] = value
    try:
        keys = observation_keys(_flatten("", observations))
    except ValueError as e:
        raise BagError(f"mapping={path}: {e}") from None
    if recorder["action_type"] not in ("Float64MultiArray", "Twist"):
        raise BagError(
            f"mapping={path}: action_type {recorder['action_type']!r}: use Float64MultiArray or Twist"
        )
    if convert["steps"] not in STEP_MODES:
        raise BagError(f"mapping={path}: convert.steps={convert['steps']!r}: expected one of {STEP_MODES}")
    unknown = sorted(set(convert["interpolate"]) - set(keys))
    if unknown:
        raise BagError(f"mapping={path}: convert.interpolate names {unknown}, which are not observation keys")
    return BagMapping(str(path), keys, recorder, convert)


# -- reading -----------------------------------------------------------------------------------
@dataclass
class Stream:
    """Every message of one topic: receipt times (s) and the deserialized messages."""

    topic: str
    times: np.ndarray
    messages: list[Any]

    def latest(self, t: float, strict: bool) -> int:
        """Index of the newest message received before `t` (at or before, unless strict); -1 if none."""
        return int(np.searchsorted(self.times, t, side="left" if strict else "right")) - 1


def _is_one_bag(p: Path) -> bool:
    return p.suffix == ".mcap" or (p / "metadata.yaml").is_file()


def is_bag(path: str | Path) -> bool:
    """A rosbag2 folder, an .mcap file, or a folder of them."""
    p = Path(path)
    return _is_one_bag(p) or (p.is_dir() and any(_is_one_bag(q) for q in p.iterdir()))


def bag_paths(input: str | Path) -> list[Path]:
    """The bags `input` names: a bag folder, one .mcap, or a folder holding several of either."""
    p = Path(input)
    if not p.exists():
        raise BagError(f"input={p}: no such file or folder")
    if p.is_file() or (p / "metadata.yaml").is_file():
        return [p]
    bags = sorted(q for q in p.iterdir() if _is_one_bag(q))
    if not bags:
        raise BagError(
            f"input={p}: neither a rosbag2 folder (metadata.yaml) nor a folder of bags or .mcap files"
        )
    return bags


def read_streams(bag: Path, topics: Mapping[str, str]) -> tuple[dict[str, Stream], list[str]]:
    """The mapped topics of one bag, and the topics (with types) it skipped. BagError names a topic
    the bag lacks, a type that differs from the mapping's, or a file that cannot be read."""
    from rosbags.highlevel import AnyReader

    try:
        with AnyReader([bag], default_typestore=_typestore()) as reader:
            present = {c.topic: c.msgtype for c in reader.connections}
            missing = [t for t in topics if t not in present]
            if missing:
                have = ", ".join(f"{t} ({m})" for t, m in sorted(present.items())) or "no topics"
                raise BagError(f"{bag}: topic(s) {missing} of the mapping are not in the bag; it has {have}")
            for topic, short in topics.items():
                if present[topic].rsplit("/", 1)[-1] != short:
                    raise BagError(
                        f"{bag}: topic {topic} holds {present[topic]}, the mapping expects {short}"
                    )
            times: dict[str, list[float]] = {t: [] for t in topics}
            messages: dict[str, list[Any]] = {t: [] for t in topics}
            connections = [c for c in reader.connections if c.topic in topics]
            for connection, stamp, raw in reader.messages(connections=connections):
                times[connection.topic].append(stamp * 1e-9)
                messages[connection.topic].append(reader.deserialize(raw, connection.msgtype))
    except BagError:
        raise
    except Exception as e:  # rosbags raises its own, struct, zstd and lz4 errors on damaged files
        raise BagError(f"{bag}: cannot read the bag ({type(e).__name__}: {e})") from None
    streams = {}
    for t in topics:
        order = np.argsort(np.asarray(times[t]), kind="stable")
        streams[t] = Stream(t, np.asarray(times[t])[order], [messages[t][i] for i in order])
    skipped = sorted(f"{t} ({m})" for t, m in present.items() if t not in topics)
    return streams, skipped


def _status(msg: Any, where: str) -> dict[str, Any]:
    try:
        status = json.loads(msg.data)
    except json.JSONDecodeError:
        raise BagError(f"{where}: not JSON: {msg.data[:80]!r}") from None
    if not isinstance(status, dict):
        raise BagError(f"{where}: expected a JSON object, got {msg.data[:80]!r}")
    return status


class _Extractor:
    """The mapped values of one bag at given times."""

    def __init__(self, mapping: BagMapping, streams: Mapping[str, Stream], bag: Path) -> None:
        self.mapping, self.streams, self.bag = mapping, streams, bag
        self.skipped: dict[str, int] = {}

    def _value(self, key: str, i: int) -> np.ndarray:
        from robomosaic.ros_nodes.messages import message_to_array

        binding = self.mapping.keys[key].binding
        try:
            return np.asarray(message_to_array(self.streams[binding.topic].messages[i], binding))
        except (ValueError, AttributeError, TypeError) as e:
            raise BagError(f"{self.bag}: {binding.topic} message {i}: {e}") from None

    def observation(self, key: str, t: float, strict: bool) -> tuple[np.ndarray, float] | None:
        """(value, receipt time of the newest message used), or None before the first message."""
        stream = self.streams[self.mapping.keys[key].binding.topic]
        i = stream.latest(t, strict)
        if i < 0:
            return None
        value = self._value(key, i)
        if key in self.mapping.convert["interpolate"] and i + 1 < len(stream.times) and stream.times[i] < t:
            t0, t1 = stream.times[i], stream.times[i + 1]
            w = (t - t0) / (t1 - t0)
            value = (1 - w) * value + w * self._value(key, i + 1)
        return value, float(stream.times[i])

    def action(self, t: float, index: int | None) -> np.ndarray:
        from robomosaic.ros_nodes.messages import twist_to_array
        from robomosaic.ros_nodes.sim_node import twist_to_action

        r = self.mapping.recorder
        stream = self.streams[r["action_topic"]]
        i = stream.latest(t, strict=False) if index is None else index
        if r["action_type"] == "Float64MultiArray":
            value = np.asarray(stream.messages[i].data, dtype=np.float64)
            if value.shape != (7,):
                raise BagError(
                    f"{self.bag}: {r['action_topic']} message {i} holds {value.shape[0]} values, not 7"
                )
            return value
        gripper_stream = self.streams[r["gripper_topic"]]
        g = gripper_stream.latest(t, strict=False)
        gripper = float(gripper_stream.messages[g].data) if g >= 0 else 0.0
        fresh = i >= 0 and t - stream.times[i] <= r["command_timeout"]
        velocity = twist_to_array(stream.messages[i]) if fresh else np.zeros(6)
        return twist_to_action(
            velocity, gripper, r["cmd_vel_linear_full_scale"], r["cmd_vel_angular_full_scale"]
        )

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _ticks(mapping: BagMapping, streams: Mapping[str, Stream]) -> tuple[np.ndarray, list[int | None]]:
    """Step times, and for action stepping the index of each step's action message."""
    action = streams[mapping.recorder["action_topic"]]
    if mapping.convert["steps"] == "action":
        return action.times, list(range(len(action.times)))
    first = [streams[rk.binding.topic].times[:1] for rk in mapping.keys.values()]
    if any(len(f) == 0 for f in first) or len(action.times) == 0:
        return np.zeros(0), []
    start = max(float(f[0]) for f in first)
    end = max(float(s.times[-1]) for s in streams.values() if len(s.times))
    ticks = np.arange(start, end + 1e-9, 1.0 / mapping.recorder["control_hz"])
    return ticks, [None] * len(ticks)


def bag_episodes(
    bag: Path, mapping: BagMapping, streams: Mapping[str, Stream]
) -> tuple[list[tuple[dict[str, np.ndarray], dict[str, Any]]], dict[str, int]]:
    """Episodes (data, meta) of one bag, and the count of skipped ticks per reason."""
    c = mapping.convert
    ex = _Extractor(mapping, streams, bag)
    strict = c["steps"] == "action"
    ticks, action_index = _ticks(mapping, streams)
    statuses: list[dict[str, Any]] = []
    # episode id -> when its observations begin: the last status of the episode before it (a robot
    # publishes the reset state before the status that announces the new episode, as the sim node does)
    first_seen: dict[Any, float] = {}
    last_status: dict[Any, dict[str, Any]] = {}  # episode id -> its final status
    status_times = np.zeros(0)
    if c["episode_topic"]:
        stream = streams[c["episode_topic"]]
        status_times = stream.times
        for s, msg in enumerate(stream.messages):
            status = _status(msg, f"{bag}: {c['episode_topic']} message {s}")
            if c["episode_field"] not in status:
                raise BagError(
                    f"{bag}: {c['episode_topic']} message {s} has no field {c['episode_field']!r}: {status}"
                )
            if statuses and status[c["episode_field"]] not in first_seen:
                first_seen[status[c["episode_field"]]] = float(stream.times[s - 1])
            first_seen.setdefault(status[c["episode_field"]], -np.inf)
            last_status[status[c["episode_field"]]] = status
            statuses.append(status)
    episodes: list[tuple[list[dict[str, np.ndarray]], dict[str, Any]]] = []
    current_id: Any = object()
    last_tick = -np.inf
    action_stream = streams[mapping.recorder["action_topic"]]
    for t, ai in zip(ticks, action_index, strict=True):
        newest = action_stream.latest(t, strict=False)
        episode_start = -np.inf
        if newest < 0:
            ex.skip("no command yet")
            continue
        if statuses:
            s = int(np.searchsorted(status_times, t, side="left" if strict else "right")) - 1
            if s < 0:
                ex.skip("before the first episode status")
                continue
            if statuses[s].get("done"):
                ex.skip("episode done")
                continue
            episode_id = statuses[s][c["episode_field"]]
            episode_start = first_seen[episode_id]
        elif c["episode_gap"] > 0:
            if t - action_stream.times[newest] > c["episode_gap"]:
                ex.skip("a pause longer than episode_gap")
                continue
            episode_id = current_id if t - last_tick <= c["episode_gap"] else object()
        else:
            episode_id = 0
        step: dict[str, np.ndarray] = {}
        problem = None
        for key in mapping.keys:
            got = ex.observation(key, t, strict)
            if got is None or got[1] < episode_start:
                problem = f"no {key} message in the episode yet"
                break
            if c["max_obs_age"] > 0 and t - got[1] > c["max_obs_age"]:
                problem = f"{key} older than max_obs_age"
                break
            step[key] = got[0]
        if problem:
            ex.skip(problem)
            continue
        step["action"] = ex.action(t, ai)
        if not episodes or episode_id != current_id:
            episodes.append(([], {"id": episode_id}))
            current_id = episode_id
        episodes[-1][0].append(step)
        last_tick = t
    out = []
    for steps, info in episodes:
        final = last_status.get(info["id"])
        taken = final.get("step") if final else None
        if isinstance(taken, int) and len(steps) > taken:
            # The robot counts its steps: a command that reached the recorder before the status saying
            # the episode was done was ignored by the robot (the sim node: 11 of 100 episodes).
            for _ in range(len(steps) - taken):
                ex.skip("after the robot's last step (its status counts fewer)")
            steps = steps[:taken]
        meta = {"seed": -1, "success": False, "task": mapping.recorder["task"], "behaviour": "converted",
                "duration": len(steps) / mapping.recorder["control_hz"]}  # fmt: skip
        if final:
            meta["seed"] = int(final.get("seed", -1))
            meta["success"] = bool(final.get("success", False))
            meta["behaviour"] = str(final.get("behaviour", meta["behaviour"]))
            meta["task"] = str(final.get("task", meta["task"]))
        data = {k: np.stack([s[k] for s in steps]) for k in steps[0]}
        out.append((data, meta))
    return out, ex.skipped


def _spec(mapping: BagMapping, data: Mapping[str, np.ndarray], streams: Mapping[str, Stream]) -> DatasetSpec:
    from robomosaic.ros_nodes.record_node import key_spec
    from robomosaic.sim.tasks import ACTION_SPEC

    keys = {}
    for key, rk in mapping.keys.items():
        msg = streams[rk.binding.topic].messages[0]
        frame = getattr(getattr(msg, "header", None), "frame_id", "")
        keys[key] = key_spec(key, rk, data[key][0], frame)
        if data[key].shape[1:] != keys[key].shape:
            raise BagError(
                f"mapping={mapping.path}: observations.{key}: the messages give shape {data[key].shape[1:]}, "
                f"{key} has {keys[key].shape}"
            )
    keys["action"] = ACTION_SPEC
    r = mapping.recorder
    return DatasetSpec(
        keys=keys,
        control_hz=float(r["control_hz"]),
        robot=r["robot"],
        controller=r["controller"],
        task=r["task"],
        extra={"converter": "robomosaic-convert (rosbag2)", "mapping": mapping.path},
    )


@dataclass
class BagSummary:
    bags: int
    episodes: int
    steps: int
    skipped_ticks: dict[str, int]
    skipped_topics: list[str]


def convert_bags(
    input: str | Path,
    out: str | Path,
    mapping_path: str | Path,
    overwrite: bool = False,
    progress: bool = True,
) -> BagSummary:
    """Convert rosbag2 recordings into the store at `out` (appending). Every bag is read and every
    episode built before the first write, so a bag that cannot be converted writes nothing."""
    from tqdm import tqdm

    from robomosaic.data.store import EpisodeStore

    mapping = load_mapping(mapping_path)
    bags = bag_paths(input)
    episodes: list[tuple[dict[str, np.ndarray], dict[str, Any]]] = []
    skipped_ticks: dict[str, int] = {}
    skipped_topics: set[str] = set()
    spec = None
    for bag in tqdm(bags, desc="read bags", disable=not progress or len(bags) < 2):
        streams, skipped = read_streams(bag, mapping.topics)
        skipped_topics.update(skipped)
        found, ticks = bag_episodes(bag, mapping, streams)
        if not found:
            raise BagError(f"{bag}: no step could be built from it (skipped ticks: {ticks or 'none'})")
        for reason, n in ticks.items():
            skipped_ticks[reason] = skipped_ticks.get(reason, 0) + n
        spec = spec or _spec(mapping, found[0][0], streams)
        episodes.extend(found)
    store = (
        EpisodeStore.create(out, spec, overwrite=True)
        if overwrite
        else EpisodeStore.open_or_create(out, spec)
    )
    for data, meta in tqdm(episodes, desc="append episodes", disable=not progress):
        store.append_episode(data, meta)
    steps = sum(len(d["action"]) for d, _ in episodes)
    return BagSummary(len(bags), len(episodes), steps, skipped_ticks, sorted(skipped_topics))


# -- writing -----------------------------------------------------------------------------------
def _stamp(ts: Any, t: float) -> Any:
    sec = int(np.floor(t))
    return ts.types["builtin_interfaces/msg/Time"](sec=sec, nanosec=round((t - sec) * 1e9) % 1_000_000_000)


class _MessageBuilder:
    """ROS 2 messages of the rosbags typestore from store values (the inverse of message_to_array)."""

    def __init__(self, ts: Any) -> None:
        self.ts, self.T = ts, ts.types

    def header(self, t: float, frame: str) -> Any:
        return self.T["std_msgs/msg/Header"](stamp=_stamp(self.ts, t), frame_id=frame)

    def topic_message(
        self, type_: str, values: Sequence[tuple[Any, np.ndarray]], t: float, frame: str
    ) -> Any:
        """One message of `type_` holding every binding's value of one topic."""
        T = self.T
        if type_ == "PoseStamped":
            pose = np.array([0, 0, 0, 0, 0, 0, 1.0])
            for binding, v in values:
                pose[
                    {"pose": slice(0, 7), "position": slice(0, 3), "orientation": slice(3, 7)}[binding.field]
                ] = v
            return T["geometry_msgs/msg/PoseStamped"](
                header=self.header(t, frame),
                pose=T["geometry_msgs/msg/Pose"](
                    position=T["geometry_msgs/msg/Point"](x=pose[0], y=pose[1], z=pose[2]),
                    orientation=T["geometry_msgs/msg/Quaternion"](x=pose[3], y=pose[4], z=pose[5], w=pose[6]),
                ),
            )
        if type_ == "JointState":
            names: list[str] = []
            fields: dict[str, list[float]] = {"position": [], "velocity": [], "effort": []}
            for binding, v in values:
                names += binding.names or [f"{binding.key}_{i}" for i in range(len(v))]
                for f in fields:
                    fields[f] += list(v) if f == binding.field else [0.0] * len(v)
            return T["sensor_msgs/msg/JointState"](
                header=self.header(t, frame),
                name=names,
                **{f: np.asarray(x, dtype=np.float64) for f, x in fields.items()},
            )
        ((_, value),) = values
        if type_ == "Float64MultiArray":
            return self.float64_array(value)
        if type_ == "Image":
            rgb = np.ascontiguousarray(value, dtype=np.uint8)
            h, w = rgb.shape[:2]
            return T["sensor_msgs/msg/Image"](
                header=self.header(t, frame),
                height=h,
                width=w,
                encoding="rgb8",
                is_bigendian=0,
                step=3 * w,
                data=rgb.reshape(-1),
            )
        raise BagError(f"export: {type_} observations cannot be written (use Float64MultiArray, PoseStamped, "
                       "JointState or Image)")  # fmt: skip

    def float64_array(self, value: np.ndarray) -> Any:
        T = self.T
        return T["std_msgs/msg/Float64MultiArray"](
            layout=T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0),
            data=np.asarray(value, dtype=np.float64).reshape(-1),
        )

    def string(self, text: str) -> Any:
        return self.T["std_msgs/msg/String"](data=text)


def _object_pose_task(store: Any) -> Any:
    """The store's task, to compute object poses from its stored MuJoCo states (None: no states, or
    a task this install does not know)."""
    from robomosaic.sim.tasks import TASKS, make_task

    if "state" not in store.spec.keys or store.spec.task not in TASKS:
        return None
    return make_task(store.spec.task)


def _topic_groups(mapping: BagMapping) -> dict[str, tuple[str, list[Any]]]:
    groups: dict[str, tuple[str, list[Any]]] = {}
    for rk in mapping.keys.values():
        b = rk.binding
        type_, bindings = groups.setdefault(b.topic, (b.type, []))
        if type_ != b.type:
            raise BagError(f"mapping={mapping.path}: topic {b.topic} is bound as both {type_} and {b.type}")
        bindings.append(b)
    return groups


def _export_messages(
    store: Any, mapping: BagMapping, episodes: Sequence[int], start: float
) -> Iterator[tuple[str, str, float, Any]]:
    """(topic, full type, time, message) in time order for the given episodes of `store`."""
    from robomosaic.ros_nodes.messages import OBSERVATION_TYPES, TopicBinding

    if mapping.recorder["action_type"] != "Float64MultiArray":
        raise BagError(
            f"mapping={mapping.path}: export writes the action as Float64MultiArray; set action_type"
        )
    build = _MessageBuilder(_typestore())
    groups = _topic_groups(mapping)
    missing = [k for k in [*mapping.keys, "action"] if k not in store.spec.keys]
    if missing:
        raise BagError(f"mapping={mapping.path}: keys {missing} are not in the store {store.path}")
    dt = 1.0 / store.spec.control_hz
    sim_task = _object_pose_task(store)
    pose = TopicBinding(key="pose", topic="/objects", type="PoseStamped", field="pose")
    status_topic = mapping.convert["episode_topic"] or DEFAULT_EPISODE_TOPIC
    action_topic = mapping.recorder["action_topic"]
    t = start
    for i in episodes:
        data, meta = store.episode(i, [*mapping.keys, "action"]), store.episode_meta(i)
        states = store.episode(i, ["state"])["state"] if sim_task is not None else None
        n = len(data["action"])
        for step in range(n + 1):
            status = {"seed": int(meta.get("seed", -1)), "episode": int(i), "step": step,
                      "success": bool(meta.get("success", False)) and step == n, "done": step == n,
                      "task": meta.get("task", ""), "behaviour": meta.get("behaviour", "")}  # fmt: skip
            yield status_topic, "std_msgs/msg/String", t, build.string(json.dumps(status))
            if step == n:
                break
            for topic, (type_, bindings) in groups.items():
                frame = mapping.keys[bindings[0].key].frame or store.spec.keys[bindings[0].key].frame
                values = [(b, data[b.key][step]) for b in bindings]
                full = f"{OBSERVATION_TYPES[type_][0]}/msg/{type_}"
                yield topic, full, t + 0.1 * dt, build.topic_message(type_, values, t, frame)
            if sim_task is not None:
                sim_task.set_state(states[step])
                for name, (xyz, xyzw) in sim_task.object_poses().items():
                    msg = build.topic_message(
                        "PoseStamped", [(pose, np.concatenate([xyz, xyzw]))], t, "world"
                    )
                    yield f"/objects/{name}/pose", "geometry_msgs/msg/PoseStamped", t + 0.1 * dt, msg
            yield (
                action_topic,
                "std_msgs/msg/Float64MultiArray",
                t + 0.5 * dt,
                build.float64_array(data["action"][step]),
            )
            t += dt
        t += GAP_BETWEEN_EPISODES


def export_bag(
    store_path: str | Path,
    out: str | Path,
    mapping_path: str | Path,
    episodes: Sequence[int] | None = None,
    start: float = 1.0,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[int, int]:
    """Write episodes of a store as a rosbag2 folder with MCAP storage at `out`; (episodes, messages)."""
    import shutil

    from rosbags.rosbag2 import StoragePlugin, Writer
    from tqdm import tqdm

    from robomosaic.data.store import EpisodeStore

    store = EpisodeStore.open(store_path)
    mapping = load_mapping(mapping_path)
    chosen = list(range(store.n_episodes)) if episodes is None else list(episodes)
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise BagError(f"out={out}: already exists (overwrite=true replaces it)")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    ts = _typestore()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    count = 0
    with Writer(tmp, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connections: dict[str, Any] = {}
        messages = _export_messages(store, mapping, chosen, start)
        for topic, type_, t, msg in tqdm(
            messages, desc=f"export {len(chosen)} episodes", disable=not progress
        ):
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, type_, typestore=ts)
            writer.write(connections[topic], round(t * 1e9), ts.serialize_cdr(msg, type_))
            count += 1
    # rosbags names the storage file after the folder: rename both so the bag is complete or absent
    (tmp / f"{tmp.name}.mcap").rename(tmp / f"{out.name}.mcap")
    meta = tmp / "metadata.yaml"
    meta.write_text(meta.read_text().replace(f"{tmp.name}.mcap", f"{out.name}.mcap"))
    tmp.rename(out)
    return len(chosen), count
