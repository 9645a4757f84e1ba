"""rosbag2 (MCAP) in and out of stores: store -> bag -> store round trips on every mapped key, the
converter's alignment and episode rules on bags written message by message, and bad input refused
by name with nothing written. Real files on disk, read back by rosbags and robomosaic's reader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from robomosaic.data.collect import main as collect
from robomosaic.data.convert import main as convert_main
from robomosaic.data.export import main as export_main
from robomosaic.data.rosbag import BagError, _MessageBuilder, _typestore, convert_bags, export_bag
from robomosaic.data.store import EpisodeStore

MAPPING = Path(__file__).parents[1] / "config" / "sim_arm_policy.yaml"
ACTION_TOPIC = "/forward_command_controller/commands"
ARRAY = "std_msgs/msg/Float64MultiArray"
KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object", "action"]


def mapping_file(path: Path, **convert) -> Path:
    """The sim arm's parameter file with forward commands as the action, plus a convert section."""
    doc = yaml.safe_load(MAPPING.read_text())
    doc["recorder"]["ros__parameters"].update(action_topic=ACTION_TOPIC, action_type="Float64MultiArray")
    doc["convert"] = {"ros__parameters": convert}
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def lift_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bag") / "lift.zarr"
    collect(["task=lift", "workers=1", "keep_failed=true", "task.max_steps=15", "episodes=3", f"out={out}"])
    return out


def test_store_to_bag_to_store_is_equal_on_every_mapped_key(lift_store, tmp_path, capsys):
    mapping = mapping_file(tmp_path / "map.yaml", episode_topic="/episode")
    export_main([f"store={lift_store}", f"out={tmp_path / 'lift_bag'}", f"mapping={mapping}"])
    bag = tmp_path / "lift_bag"
    assert (bag / "metadata.yaml").is_file() and (bag / "lift_bag.mcap").is_file()
    assert not (tmp_path / "lift_bag.partial").exists()
    convert_main([f"input={bag}", f"out={tmp_path / 'back.zarr'}", f"mapping={mapping}"])
    printed = capsys.readouterr().out
    assert "converted 3 episodes" in printed
    a, b = EpisodeStore.open(lift_store), EpisodeStore.open(tmp_path / "back.zarr")
    assert b.n_episodes == a.n_episodes == 3
    for i in range(3):
        ea, eb = a.episode(i, KEYS), b.episode(i, KEYS)
        for key in KEYS:
            np.testing.assert_allclose(eb[key], ea[key], rtol=0, atol=1e-12, err_msg=f"episode {i} {key}")
        ma, mb = a.episode_meta(i), b.episode_meta(i)
        assert {k: mb[k] for k in ("seed", "success", "task", "behaviour")} == {
            k: ma[k] for k in ("seed", "success", "task", "behaviour")
        }
    assert b.spec.keys["robot0_eef_pos"] == a.spec.keys["robot0_eef_pos"]
    assert b.spec.control_hz == a.spec.control_hz
    # the cube's pose, computed from the stored MuJoCo states as the sim node publishes it, is the
    # first 7 entries of lift's `object` observation, up to the observation's lag of one physics
    # substep behind the state (sim/tasks.py `observe`: measured 5.6e-4 while the cube settles)
    doc = yaml.safe_load(mapping.read_text())
    doc["/**"]["ros__parameters"]["observations"]["cube_pose"] = {
        "topic": "/objects/cube/pose", "type": "PoseStamped", "field": "pose"
    }  # fmt: skip
    mapping.write_text(yaml.safe_dump(doc))
    poses = convert_bags(bag, tmp_path / "poses.zarr", mapping, progress=False)
    assert poses.episodes == 3
    with_poses = EpisodeStore.open(tmp_path / "poses.zarr")
    for i in range(3):
        np.testing.assert_allclose(
            with_poses.episode(i)["cube_pose"], a.episode(i)["object"][:, :7], atol=2e-3
        )


class BagBuilder:
    """A bag written message by message with chosen receipt times."""

    def __init__(self, path: Path) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.ts = _typestore()
        self.build = _MessageBuilder(self.ts)
        self.writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
        self.writer.open()
        self.connections: dict[str, object] = {}

    def write(self, topic: str, msgtype: str, t: float, msg: object) -> None:
        if topic not in self.connections:
            self.connections[topic] = self.writer.add_connection(topic, msgtype, typestore=self.ts)
        self.writer.write(self.connections[topic], round(t * 1e9), self.ts.serialize_cdr(msg, msgtype))

    def arm_state(self, t: float, x: float) -> None:
        """All the sim arm's observation topics at time t, the eef x position = x."""
        T = self.ts.types
        pose = self.build.topic_message(
            "PoseStamped",
            [(_b("robot0_eef_pos", "position"), np.array([x, 0, 1.0]))],
            t,
            "world",
        )
        self.write("/eef_pose", "geometry_msgs/msg/PoseStamped", t, pose)
        joints = T["sensor_msgs/msg/JointState"](
            header=self.build.header(t, ""),
            name=["robot0_joint1", "gripper0_right_finger_joint2", "gripper0_right_finger_joint1"],
            position=np.array([0.3, -x, x]),
            velocity=np.zeros(3),
            effort=np.zeros(0),
        )
        self.write("/joint_states", "sensor_msgs/msg/JointState", t, joints)
        self.write("/object_state", ARRAY, t, self.build.float64_array(np.full(10, x)))

    def action(self, t: float, value: float) -> None:
        self.write(ACTION_TOPIC, ARRAY, t, self.build.float64_array(np.full(7, value)))

    def status(self, t: float, episode: int, done: bool = False, success: bool = False) -> None:
        text = json.dumps({"episode": episode, "seed": 100 + episode, "done": done, "success": success})
        self.write("/sim/episode", "std_msgs/msg/String", t, self.build.string(text))

    def close(self) -> None:
        self.writer.close()


def _b(key: str, field: str):
    from robomosaic.ros_nodes.messages import TopicBinding

    return TopicBinding(key=key, topic="/eef_pose", type="PoseStamped", field=field)


def test_action_steps_take_the_latest_observation_before_each_command(tmp_path):
    """Episodes split by the status topic; a command after `done` and one before any observation of
    the new episode are not steps, the reset state published just before the new episode's status
    is its first observation; joint states are selected by name, in the mapping's order."""
    bag = BagBuilder(tmp_path / "bag")
    bag.status(0.0, 0)
    for step in range(4):  # episode 0: observation at t, command at t + 0.02
        t = 0.1 * step
        bag.arm_state(t, float(step))
        bag.action(t + 0.02, float(step))
    bag.status(0.39, 0, done=True, success=True)
    bag.action(0.40, 9.0)  # the episode is done: the robot ignores it
    bag.status(0.50, 1)  # episode 1 announced, but no state published since episode 0 ended
    bag.action(0.51, 8.0)
    for step in range(2):
        bag.arm_state(1.0 + 0.1 * step, 10.0 + step)
        bag.action(1.02 + 0.1 * step, 10.0 + step)
    bag.status(1.15, 1, done=True)
    bag.arm_state(2.0, 20.0)  # the reset state goes out just before the status of the new episode
    bag.status(2.01, 2)
    bag.action(2.02, 20.0)
    bag.write("/unmapped", "std_msgs/msg/String", 1.5, bag.build.string("x"))
    bag.close()
    summary = convert_bags(
        tmp_path / "bag", tmp_path / "s.zarr", mapping_file(tmp_path / "m.yaml", episode_topic="/sim/episode")
    )
    assert (summary.episodes, summary.steps) == (3, 7)
    skipped = dict(summary.skipped_ticks)
    assert skipped.pop("episode done") == 1
    assert list(skipped.values()) == [1] and re.fullmatch(r"no \w+ message in the episode yet", *skipped)
    assert summary.skipped_topics == ["/unmapped (std_msgs/msg/String)"]
    store = EpisodeStore.open(tmp_path / "s.zarr")
    e0, e1 = store.episode(0), store.episode(1)
    np.testing.assert_array_equal(e0["robot0_eef_pos"][:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(e0["action"][:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(e0["robot0_gripper_qpos"][1], [1.0, -1.0])  # finger 1, then finger 2
    np.testing.assert_array_equal(e1["action"][:, 0], [10, 11])
    assert store.episode_meta(0)["seed"] == 100 and store.episode_meta(0)["success"]
    assert store.episode_meta(1)["seed"] == 101 and not store.episode_meta(1)["success"]
    np.testing.assert_array_equal(store.episode(2)["robot0_eef_pos"][:, 0], [20])


def test_rate_steps_interpolate_joint_states_and_split_at_gaps(tmp_path):
    bag = BagBuilder(tmp_path / "bag")
    for k in range(5):  # observations and commands every 0.1 s, then a 2 s pause, then 3 more
        t = 0.1 * k if k < 3 else 2.0 + 0.1 * k
        bag.arm_state(t, float(k))
        bag.action(t, float(k))
    bag.close()
    mapping = mapping_file(
        tmp_path / "m.yaml", steps="rate", episode_gap=0.5, interpolate=["robot0_gripper_qpos"]
    )
    doc = yaml.safe_load(mapping.read_text())
    doc["/**"]["ros__parameters"]["control_hz"] = 20.0
    mapping.write_text(yaml.safe_dump(doc))
    summary = convert_bags(tmp_path / "bag", tmp_path / "s.zarr", mapping)
    store = EpisodeStore.open(tmp_path / "s.zarr")
    assert summary.episodes == 2
    e0 = store.episode(0)
    # ticks every 0.05 s from 0: joint states halfway between messages are interpolated, poses are not
    np.testing.assert_allclose(e0["robot0_gripper_qpos"][:5, 0], [0, 0.5, 1, 1.5, 2])
    np.testing.assert_array_equal(e0["robot0_eef_pos"][:5, 0], [0, 0, 1, 1, 2])


@pytest.mark.parametrize("fault", ["missing_topic", "bad_field", "truncated", "wrong_type"])
def test_bad_bags_and_mappings_are_refused_by_name_and_write_nothing(lift_store, tmp_path, fault):
    mapping = mapping_file(tmp_path / "map.yaml", episode_topic="/episode")
    bag = tmp_path / "bag"
    export_bag(lift_store, bag, mapping, progress=False)
    mcap = bag / "bag.mcap"
    doc = yaml.safe_load(mapping.read_text())
    obs = doc["/**"]["ros__parameters"]["observations"]
    if fault == "missing_topic":
        obs["wrist"] = {"topic": "/wrist/image_raw", "type": "Image"}
        expected = "topic(s) ['/wrist/image_raw'] of the mapping are not in the bag"
    elif fault == "bad_field":
        obs["robot0_eef_pos"]["field"] = "velocity"
        expected = "field 'velocity' is not one of PoseStamped's fields"
    elif fault == "wrong_type":
        obs["object"]["type"] = "JointState"
        expected = "topic /object_state holds std_msgs/msg/Float64MultiArray, the mapping expects JointState"
    else:
        data = mcap.read_bytes()
        mcap.write_bytes(data[: len(data) // 2])
        expected = "cannot read the bag"
    mapping.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out.zarr"
    with pytest.raises(BagError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        convert_bags(mcap if fault == "truncated" else bag, out, mapping, progress=False)
    assert not out.exists()


def test_export_refuses_an_existing_bag_and_a_mapping_key_the_store_lacks(lift_store, tmp_path):
    mapping = mapping_file(tmp_path / "map.yaml")
    export_bag(lift_store, tmp_path / "bag", mapping, episodes=[0], progress=False)
    with pytest.raises(BagError, match="already exists"):
        export_bag(lift_store, tmp_path / "bag", mapping, progress=False)
    doc = yaml.safe_load(mapping.read_text())
    doc["/**"]["ros__parameters"]["observations"]["agentview_image"] = {"topic": "/cam", "type": "Image"}
    mapping.write_text(yaml.safe_dump(doc))
    with pytest.raises(BagError, match=r"keys \['agentview_image'\] are not in the store"):
        export_bag(lift_store, tmp_path / "bag2", mapping, progress=False)
    assert not (tmp_path / "bag2").exists()


def test_twist_commands_become_the_recorders_action_with_timeout_and_sticky_gripper(tmp_path):
    """Twist + gripper at a fixed rate, mapped as the record node maps them: velocity / full scale,
    zero motion once the newest Twist is older than command_timeout, the gripper kept."""
    bag = BagBuilder(tmp_path / "bag")
    T = bag.ts.types
    twist = T["geometry_msgs/msg/Twist"](
        linear=T["geometry_msgs/msg/Vector3"](x=0.5, y=0.0, z=-2.0),
        angular=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=5.0),
    )
    for k in range(10):
        bag.arm_state(0.05 * k, float(k))
    bag.write("/cmd_vel", "geometry_msgs/msg/Twist", 0.0, twist)
    bag.write("/gripper_command", "std_msgs/msg/Float64", 0.0, T["std_msgs/msg/Float64"](data=1.0))
    bag.close()
    mapping = mapping_file(tmp_path / "m.yaml", steps="rate")
    doc = yaml.safe_load(mapping.read_text())
    doc["recorder"]["ros__parameters"].update(action_topic="/cmd_vel", action_type="Twist")
    mapping.write_text(yaml.safe_dump(doc))
    convert_bags(tmp_path / "bag", tmp_path / "s.zarr", mapping, progress=False)
    action = EpisodeStore.open(tmp_path / "s.zarr").episode(0)["action"]
    # full scales 1 m/s and 10 rad/s; command_timeout 0.2 s: ticks at 0..0.2 s move, later ones do not
    np.testing.assert_allclose(action[0], [0.5, 0, -1.0, 0, 0, 0.5, 1.0])
    assert np.all(action[:5, :6] == action[0, :6])
    np.testing.assert_array_equal(action[5:, :6], 0.0)
    np.testing.assert_array_equal(action[:, 6], 1.0)


def test_camera_images_round_trip_and_one_bag_per_episode(tmp_path):
    """A store with camera images -> two bags of one episode each (sensor_msgs/Image) -> one store:
    without a status topic or a gap, each bag of a folder is one episode."""
    store_path = tmp_path / "cam.zarr"
    collect(["task=lift", "workers=1", "keep_failed=true", "task.max_steps=6", "episodes=2",
             "task.cameras=[agentview]", "task.image_size=16", f"out={store_path}"])  # fmt: skip
    mapping = mapping_file(tmp_path / "map.yaml")
    doc = yaml.safe_load(mapping.read_text())
    doc["/**"]["ros__parameters"]["observations"]["agentview_image"] = {
        "topic": "/agentview/image_raw", "type": "Image"
    }  # fmt: skip
    mapping.write_text(yaml.safe_dump(doc))
    bags = tmp_path / "bags"
    bags.mkdir()
    for i in range(2):
        export_bag(store_path, bags / f"episode_{i}", mapping, episodes=[i], progress=False)
    summary = convert_bags(bags, tmp_path / "back.zarr", mapping, progress=False)
    assert (summary.bags, summary.episodes) == (2, 2)
    a, b = EpisodeStore.open(store_path), EpisodeStore.open(tmp_path / "back.zarr")
    assert b.spec.keys["agentview_image"].dtype == "uint8"
    for i in range(2):
        for key in [*KEYS, "agentview_image"]:
            np.testing.assert_array_equal(b.episode(i, [key])[key], a.episode(i, [key])[key], err_msg=key)


def test_eval_record_mcap_writes_the_rollouts_as_a_store_and_a_bag_that_converts_back(tmp_path):
    from robomosaic.policies.evaluate import main as eval_main

    checkpoint = Path(__file__).parent / "assets" / "lift_flow"
    out = tmp_path / "eval.json"
    eval_main([f"checkpoint={checkpoint}", "episodes=2", "workers=1", "videos=0", f"out={out}",
               "record_mcap=true", "progress=false"])  # fmt: skip
    report = json.loads(out.read_text())
    store = EpisodeStore.open(report["recorded"]["store"])
    ran = report["per_episode"]
    assert [store.episode_meta(i)["success"] for i in range(2)] == [e["success"] for e in ran]
    assert [len(store.episode(i, ["action"])["action"]) for i in range(2)] == [e["length"] for e in ran]
    convert_bags(report["recorded"]["mcap"], tmp_path / "back.zarr", MAPPING, progress=False)
    back = EpisodeStore.open(tmp_path / "back.zarr")
    for i in range(2):
        for key in KEYS:
            np.testing.assert_array_equal(back.episode(i, [key])[key], store.episode(i, [key])[key])
