"""robomosaic-record-node over real DDS: the recorder and the simulated robot (robomosaic-sim-node)
run in their own processes, the test is the teleoperator (a Twist and a gripper publisher) calling
the recorder's services.

Episodes recorded while the Twist drives the end effector are read back with SequenceSampler:
lengths match the control rate, keys and shapes match the parameters, the recorded action is the
Twist mapped as the sim maps it, and the recorded end effector moved the commanded way. A recorder
killed with SIGKILL mid-episode leaves every finished episode intact, and the store takes new
episodes, here recorded from robomosaic-teleop's keyboard in a pseudo terminal.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from robomosaic.ros_nodes import processes as ros_processes
from robomosaic.ros_nodes.common import BackgroundSpin

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import Twist  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from std_msgs.msg import Float64, Float64MultiArray, String  # noqa: E402
from std_srvs.srv import SetBool, Trigger  # noqa: E402

from robomosaic.data.sampler import SequenceSampler  # noqa: E402
from robomosaic.data.store import EpisodeStore  # noqa: E402

DOMAIN_ID = 13  # this file's DDS domain (one per test file, so parallel tests never cross-talk)
HZ = 20.0
FINGERS = ["gripper0_right_finger_joint1", "gripper0_right_finger_joint2"]
OBS_KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object", "operator"]
PAUSE = 1.5
MAX_AGE = 0.3  # lenient: the machine running the tests is shared and loaded
OPERATOR_HZ = 40.0  # /operator_state: a counter from this process, to test the stale-topic policy
PARAMS = f"""\
/**:
  ros__parameters:
    task: lift
    control_hz: {HZ}
    reset_service: /sim/reset
    max_obs_age: {MAX_AGE}
    observations:
      robot0_eef_pos: {{topic: /eef_pose, type: PoseStamped, field: position}}
      robot0_eef_quat: {{topic: /eef_pose, type: PoseStamped, field: orientation}}
      robot0_gripper_qpos: {{topic: /joint_states, type: JointState, names: {FINGERS}}}
      object: {{topic: /object_state, type: Float64MultiArray, units: "m, quaternion xyzw", frame: world}}
      operator: {{topic: /operator_state, type: Float64MultiArray, frame: operator}}
"""
LATCHED = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)


def start_node(module: str, *ros_args: str, stdin: int | None = None) -> subprocess.Popen:
    return ros_processes.start_node(module, *ros_args, domain=DOMAIN_ID, stdin=stdin)


class Teleop:
    """The operator: publishes a Twist at the control rate and the gripper, calls the recorder."""

    def __init__(self) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=DOMAIN_ID)
        self.node = rclpy.create_node("teleop", context=self.context)
        self.twist_pub = self.node.create_publisher(Twist, "/cmd_vel", 10)
        self.gripper_pub = self.node.create_publisher(Float64, "/gripper_command", 10)
        self.clients = {
            name: self.node.create_client(kind, f"/recorder/{name}")
            for name, kind in (("start", Trigger), ("stop", SetBool), ("discard", Trigger))
        }
        self.status: dict = {}
        self.watch: list[subprocess.Popen] = []  # node processes whose death fails a call at once
        self.node.create_subscription(String, "/recorder/status", self._on_status, LATCHED)
        self.last_moving_twist = 0.0  # monotonic time of the last non-zero Twist seen on /cmd_vel
        self.node.create_subscription(Twist, "/cmd_vel", self._on_twist, 10)
        self.velocity = np.zeros(6)
        self.node.create_timer(1.0 / HZ, self._publish_twist)
        self.operator_pub = self.node.create_publisher(Float64MultiArray, "/operator_state", 10)
        self.operator_count = 0
        self.operator_paused = False
        self.last_before_pause = 0  # the counter value /operator_state stopped at
        self.node.create_timer(1.0 / OPERATOR_HZ, self._publish_operator)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.spinner = BackgroundSpin(self.executor)

    def _on_status(self, msg: String) -> None:
        self.status = json.loads(msg.data)

    def _on_twist(self, msg: Twist) -> None:
        if any((msg.linear.x, msg.linear.y, msg.linear.z, msg.angular.x, msg.angular.y, msg.angular.z)):
            self.last_moving_twist = time.monotonic()

    def _publish_twist(self) -> None:
        if self.velocity is None:  # the keyboard teleop drives
            return
        v = [float(x) for x in self.velocity]
        msg = Twist()
        msg.linear.x, msg.linear.y, msg.linear.z = v[:3]
        msg.angular.x, msg.angular.y, msg.angular.z = v[3:]
        self.twist_pub.publish(msg)

    def _publish_operator(self) -> None:
        if not self.operator_paused:
            self.operator_count += 1
            self.operator_pub.publish(Float64MultiArray(data=[float(self.operator_count)]))

    def set_sim_seed(self, seed: int) -> None:
        """Restart the sim's seed sequence, as a relaunched sim node does (its `seed` parameter)."""
        from rclpy.parameter import Parameter
        from rclpy.parameter_client import AsyncParameterClient

        client = AsyncParameterClient(self.node, "/sim")
        assert client.wait_for_services(timeout_sec=20.0), "/sim parameter services not available"
        future = client.set_parameters([Parameter("seed", value=seed)])
        end = time.monotonic() + 20.0
        while not future.done() and time.monotonic() < end:
            time.sleep(0.01)
        assert future.done() and all(r.successful for r in future.result().results)

    def gripper(self, value: float) -> None:
        self.gripper_pub.publish(Float64(data=value))

    def call(self, name: str, data: bool | None = None, timeout: float = 20.0):
        client = self.clients[name]
        end = time.monotonic() + timeout
        while not client.wait_for_service(timeout_sec=0.2):
            dead = [p for p in self.watch if p.poll() is not None]
            assert not dead, f"a node exited:\n{ros_processes.node_output(dead[0])}"
            assert time.monotonic() < end, f"/recorder/{name} not available"
        request = client.srv_type.Request()
        if data is not None:
            request.data = data
        future = client.call_async(request)
        while not future.done() and time.monotonic() < end:
            time.sleep(0.01)
        assert future.done(), f"/recorder/{name} did not answer within {timeout} s"
        return future.result()

    def wait_status(self, condition: Callable[[dict], bool], timeout: float = 30.0) -> None:
        """Until the recorder's status satisfies `condition`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.status and condition(self.status):
                return
            time.sleep(0.01)
        raise AssertionError(
            f"the recorder's status did not change as expected in {timeout} s: {self.status}"
        )

    def close(self) -> None:
        self.spinner.close()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Teleop, Path, Path, list]]:
    """The sim node, the recorder (its params file; the store is not created yet) and the teleop."""
    tmp = tmp_path_factory.mktemp("record")
    params = tmp / "record.yaml"
    params.write_text(PARAMS)
    store = tmp / "teleop.zarr"
    sim = start_node("sim_node", "-r", "__node:=sim", "-p", "task:=lift", "-p", "seed:=0")
    processes = [sim]
    teleop = Teleop()
    teleop.watch = processes
    try:
        processes.append(record_node(params, store))
        yield teleop, params, store, processes
    finally:
        teleop.close()
        for process in processes:
            out = ros_processes.stop_node(process)
            if process.returncode not in (0, -signal.SIGINT, -signal.SIGKILL):
                print(out)


def record_node(params: Path, store: Path) -> subprocess.Popen:
    return start_node(
        "record_node", "-r", "__node:=recorder", "--params-file", str(params), "-p", f"store:={store}"
    )


def record_episode(
    teleop: Teleop, velocity: list[float], gripper: float, seconds: float, pause: float = 0.0
) -> float:
    """Start (the sim resets), drive for `seconds` once recording, with /operator_state silent for
    `pause` seconds in the middle; the wall time recorded."""
    teleop.velocity = np.zeros(6)
    end = time.monotonic() + 60.0  # robosuite takes a while to start on a loaded machine
    answer = teleop.call("start", timeout=60.0)
    while not answer.success and "no message" in answer.message and time.monotonic() < end:
        time.sleep(0.2)  # the nodes are still starting
        answer = teleop.call("start")
    assert answer.success, answer.message
    teleop.wait_status(lambda status: status["recording"])  # the sim has reset
    started = time.monotonic()
    teleop.gripper(gripper)
    teleop.velocity = np.asarray(velocity, dtype=np.float64)
    time.sleep((seconds - pause) / 2)
    teleop.operator_paused = True
    teleop.last_before_pause = teleop.operator_count
    time.sleep(pause)
    teleop.operator_paused = False
    time.sleep((seconds - pause) / 2)
    return time.monotonic() - started


def test_records_teleop_episodes_and_survives_sigkill(graph) -> None:
    teleop, params, store_path, processes = graph
    answer = teleop.call("stop", data=True)
    assert not answer.success and "not recording" in answer.message

    # Three episodes: +x with the gripper closing; +z opening, with /operator_state silent for
    # PAUSE s (those ticks must be skipped, not filled with the old counter); one discarded.
    plans = [([0.5, 0, 0, 0, 0, 0], 1.0, True, 0.0), ([0, 0, 0.4, 0, 0, 0], -1.0, False, PAUSE)]
    durations, held = [], []
    for velocity, gripper, success, pause in plans:
        durations.append(record_episode(teleop, velocity, gripper, seconds=2.0 + pause, pause=pause))
        held.append(teleop.last_before_pause)
        answer = teleop.call("stop", data=success)
        assert answer.success, answer.message
        print(answer.message)
        assert "saved episode" in answer.message
        if pause:
            assert "no message on /operator_state within" in answer.message, answer.message
    record_episode(teleop, [0, 0.5, 0, 0, 0, 0], 1.0, seconds=0.5)
    answer = teleop.call("discard")
    assert answer.success and "discarded" in answer.message, answer.message

    store = EpisodeStore.open(store_path)
    assert store.n_episodes == 2
    assert set(store.spec.keys) == {*OBS_KEYS, "action"}
    assert store.spec.control_hz == HZ and store.spec.task == "lift"
    assert store.spec.keys["object"].frame == "world"
    metas = [store.episode_meta(i) for i in range(2)]
    assert [m["success"] for m in metas] == [True, False]
    assert [m["seed"] for m in metas] == [1, 2]  # the sim's seeds after its start seed 0
    assert all(m["task"] == "lift" and m["behaviour"] == "teleop" for m in metas)

    sampler = SequenceSampler(store, obs_keys=OBS_KEYS, horizon=4, n_obs_steps=2)
    lengths = np.diff(store.episode_ends, prepend=0)
    assert len(sampler) == lengths.sum()
    batch = sampler.sample_batch(np.arange(len(sampler)))
    assert batch["action"].shape == (lengths.sum(), 4, 7)
    assert batch["robot0_eef_pos"].shape == (lengths.sum(), 2, 3)
    assert batch["object"].shape[:2] == (lengths.sum(), 2)

    for i, ((velocity, gripper, _, pause), recorded) in enumerate(zip(plans, durations, strict=True)):
        ep = store.episode(i)
        n = len(ep["action"])
        print(f"episode {i}: {n} steps for {recorded:.2f} s of driving, {pause} s of it stale")
        # The control rate: at most one step per period of the driving time (plus the wait for the
        # first step); loose from below, as a loaded machine delays the timer and the sim's messages
        # (the recorder's answer above reports both).
        assert 0.25 * (recorded - pause) * HZ <= n <= (recorded - pause + 1.0) * HZ + 2
        # Every step holds a fresh /operator_state: while it was silent, its last value was recorded
        # only until it grew MAX_AGE old (about MAX_AGE * HZ steps; holding it through the silence
        # would take PAUSE * HZ), then ticks were skipped and the counter jumps across the gap.
        counter = ep["operator"][:, 0]
        assert np.all(np.diff(counter) >= 0), counter
        if pause:
            stuck = int(np.sum(counter == held[i]))
            print(f"  steps holding the silent topic's last value: {stuck}")
            assert stuck <= MAX_AGE * HZ + 2, counter
            assert counter.min() < held[i] < counter.max(), counter
        # The recorded action is the Twist scaled as the sim scales it (1 m/s full scale), with the
        # gripper, after the operator's first command reached the recorder.
        expected = np.append(np.asarray(velocity) / 1.0, gripper).astype(np.float32)
        driving = np.all(ep["action"] == expected, axis=1)
        assert driving.mean() > 0.7, ep["action"][:5]
        assert np.all(ep["action"][:, 1:6][driving] == expected[1:6])
        # The robot went the commanded way (OSC does not track the delta exactly).
        moved = ep["robot0_eef_pos"][-1] - ep["robot0_eef_pos"][0]
        axis = int(np.argmax(np.abs(velocity[:3])))
        assert moved[axis] > 0.02, moved
        assert abs(moved[axis]) > 2 * np.abs(np.delete(moved, axis)).max(), moved
        # (How often the end effector repeats between steps measures the sim's throughput: printed.)
        repeated = np.all(np.diff(ep["robot0_eef_pos"], axis=0) == 0, axis=1)
        print(f"  repeated end-effector samples: {repeated.mean():.0%}")
        assert np.allclose(np.linalg.norm(ep["robot0_eef_quat"], axis=1), 1.0, atol=1e-6)
    closed = store.episode(0)["robot0_gripper_qpos"]
    assert closed[-1, 0] < closed[0, 0]  # finger 1 closes toward 0 with gripper +1

    before = {i: store.episode(i) for i in range(store.n_episodes)}
    # SIGKILL mid-episode: every finished episode stays intact and readable.
    recorder = processes[1]
    record_episode(teleop, [0.3, 0, 0, 0, 0, 0], 0.0, seconds=1.0)
    recorder.send_signal(signal.SIGKILL)
    recorder.wait(timeout=5)
    processes.remove(recorder)
    store = EpisodeStore.open(store_path)
    assert store.n_episodes == 2
    for i, data in before.items():
        for key, value in store.episode(i).items():
            np.testing.assert_array_equal(value, data[key], err_msg=f"episode {i} key {key}")

    # A new recorder appends to the same store after the crash, driven from robomosaic-teleop's
    # keyboard (in a pseudo terminal): 1 starts, w held moves +x, space closes, 2 stops (success).
    # The sim's seeds start again at 1 as after a relaunch: the recorder must not store seed 1 twice.
    teleop.set_sim_seed(1)  # its next reset uses seed 1, as the first reset after a start with seed:=0
    teleop.status = {}
    teleop.velocity = None
    processes.append(record_node(params, store_path))
    master, slave = pty.openpty()
    keyboard = start_node("teleop", "-p", "linear_speed:=0.5", stdin=slave)
    processes.append(keyboard)
    os.close(slave)
    try:
        teleop.wait_status(lambda status: status.get("episodes") is None)  # the new recorder is up
        end = time.monotonic() + 30.0
        while not teleop.status.get("recording"):  # until the keyboard node finds the service
            assert time.monotonic() < end and keyboard.poll() is None, teleop.status
            os.write(master, b"1")
            time.sleep(1.0)
        os.write(master, b" ")
        for _ in range(20):  # a held key repeats
            os.write(master, b"w")
            time.sleep(0.1)
        # released: the teleop sends zero velocity (once it has read every repeated key: on a loaded
        # machine it may lag behind the pseudo terminal)
        end = time.monotonic() + 20.0
        while time.monotonic() - teleop.last_moving_twist < 1.0:
            assert time.monotonic() < end, "the keyboard teleop kept sending motion"
            time.sleep(0.1)
        os.write(master, b"2")
        teleop.wait_status(lambda status: not status["recording"])
        os.write(master, b"q")
        assert keyboard.wait(timeout=10) == 0
    finally:
        os.close(master)
    store = EpisodeStore.open(store_path)
    assert store.n_episodes == 3
    meta, ep = store.episode_meta(2), store.episode(2)
    # seeds 1 and 2 are stored (3 was discarded, 4 killed): the recorder restarted the sim at 3
    assert meta["success"] and meta["seed"] == 3, meta
    action = ep["action"]
    moving = action[:, 0] > 0
    print(f"keyboard episode: {len(action)} steps, {moving.sum()} moving +x")
    assert np.all(action[moving, 0] == 0.5) and np.all(action[:, 1:6] == 0)
    assert moving.sum() >= 0.4 * 2.0 * HZ and not moving[-5:].any()  # held ~2 s, then released
    assert action[-1, 6] == 1.0  # the gripper was toggled closed
