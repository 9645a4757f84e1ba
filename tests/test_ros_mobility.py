"""The mobile base over real DDS: robomosaic-mobility-sim-node and the policy node's navigation
binding, each node in its own process, this test process a ROS 2 client. ROS_DOMAIN_ID 19.

- without DDS: what the sim node publishes, serialized as on the wire and observed through the policy
  node's `NavigationObservation`, equals `MobilityEnv.observe()` for every embodiment, for a
  single-embodiment policy and, with the parameter `embodiment`, for a cross-embodiment one (whose
  checkpoint is refused without that parameter or with an unknown base);
- the sim node: /odom, /scan and /plan with their types, frames and sizes, observed as in process; a
  goal inside an obstacle refused naming the goal and the world (the old goal kept), a free one
  accepted; /cmd_vel moving the base as in process (commanded), and stopping it once commands stop
  (realtime);
- the policy node (the shipped navigation base, tests/assets/nav_flow): a zero Twist within two
  control periods of /odom going stale or of a non-finite /scan;
- mobility_sim_policy.launch.xml through robomosaic-launch: that base reaches its goals on carter in
  lock step over DDS, as it does in process on the same seeds; so does COMPASS's cross-embodiment
  generalist (tests/assets/compass) on carter and on kaya, switched only by `embodiment:=`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from robomosaic.ros_nodes import processes as ros_processes

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import PoseStamped, Twist  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from nav_msgs.msg import Path as PathMsg  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from ros_support import TopicClient  # noqa: E402
from sensor_msgs.msg import LaserScan  # noqa: E402

from robomosaic.ros_nodes import messages  # noqa: E402
from robomosaic.ros_nodes.common import command_qos, seconds_to_stamp, sensor_qos  # noqa: E402
from robomosaic.ros_nodes.mobility_sim_node import state_messages  # noqa: E402
from robomosaic.ros_nodes.policy_node import ConfigurationError, NavigationObservation, parse_bindings  # noqa: E402
from robomosaic.sim.mobility.env import EMBODIMENT_KEY, EMBODIMENT_SPEC, OBS_SPEC, MobilityEnv  # noqa: E402

DOMAIN_ID = 19  # this file's DDS domain, passed explicitly (ros_processes, every rclpy context)
ROOT = Path(__file__).resolve().parents[1]
POLICY_PARAMS = ROOT / "config" / "mobility_policy.yaml"
CHECKPOINT = ROOT / "tests" / "assets" / "nav_flow"  # the navigation imitation base, carter (README there)
SEED = 1_000_000
CONTROL_HZ = 10.0
PERIOD = 1.0 / CONTROL_HZ
MAX_OBS_AGE = 0.2  # config/mobility_policy.yaml
EMBODIMENTS = ("carter", "kaya", "h1", "spot", "g1")


CROSS_SPEC = {**OBS_SPEC, EMBODIMENT_KEY: EMBODIMENT_SPEC}  # a cross-embodiment policy's observation


def navigation_observation(
    obs_spec: dict = OBS_SPEC, embodiment: str = ""
) -> tuple[NavigationObservation, dict]:
    """The policy node's adapter with the bindings of config/mobility_policy.yaml."""
    observations = yaml.safe_load(POLICY_PARAMS.read_text())["policy"]["ros__parameters"]["observations"]
    bindings = parse_bindings({f"{k}.{a}": v for k, entry in observations.items() for a, v in entry.items()})
    return NavigationObservation(bindings, dict(obs_spec), embodiment), bindings


def observe_messages(
    odom: object, scan: object, plan: object, obs_spec: dict = OBS_SPEC, embodiment: str = ""
) -> dict[str, np.ndarray]:
    """What the policy node observes from one /odom, /scan and /plan message."""
    adapter, bindings = navigation_observation(obs_spec, embodiment)
    values = {
        key: adapter.value(bindings[key], msg, messages.message_to_array(msg, bindings[key]))
        for key, msg in (("odom", odom), ("scan", scan), ("plan", plan))
    }
    return adapter.observe(values)


def assert_same_observation(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """`got` (one world) equals world 0 of `expected` on every key `got` has: all of OBS_SPEC's."""
    assert set(OBS_SPEC) <= set(got) <= set(expected)
    for key in got:
        np.testing.assert_array_equal(got[key], expected[key][0], err_msg=key)


# -- without DDS --------------------------------------------------------------------------------
@pytest.mark.parametrize("embodiment", EMBODIMENTS)
def test_the_node_observes_what_the_simulator_observes(embodiment: str) -> None:
    """Bit for bit, also for kaya and spot, whose 360-degree scans put rays exactly on the pooled
    sectors' boundaries (LaserScan's float32 angles alone would move them to the next sector)."""
    env = MobilityEnv([embodiment])
    env.reset([SEED])
    rng = np.random.default_rng(0)
    for _ in range(5):
        odom, scan, plan, _ = state_messages(env, 12.5)
        wire = [deserialize_message(serialize_message(m), type(m)) for m in (odom, scan, plan)]
        assert_same_observation(observe_messages(*wire), env.observe())
        cross = observe_messages(*wire, obs_spec=CROSS_SPEC, embodiment=embodiment)
        assert set(cross) == set(CROSS_SPEC)
        assert_same_observation(cross, env.observe())
        env.step(rng.uniform(-0.3, 0.3, (1, 3)))


def test_a_cross_embodiment_policy_needs_a_known_embodiment() -> None:
    with pytest.raises(ConfigurationError, match="set the parameter embodiment"):
        navigation_observation(CROSS_SPEC)
    with pytest.raises(ConfigurationError, match="parameter embodiment: unknown embodiment 'rover'"):
        navigation_observation(CROSS_SPEC, "rover")


def test_twist_takes_a_mobile_base_action() -> None:
    np.testing.assert_array_equal(
        messages.twist_to_array(messages.twist_msg([0.5, 0.2])), [0.5, 0, 0, 0, 0, 0.2]
    )
    np.testing.assert_array_equal(
        messages.twist_to_array(messages.twist_msg([0.5, -0.1, 0.2])), [0.5, -0.1, 0, 0, 0, 0.2]
    )
    with pytest.raises(ValueError, match="Twist needs 6 values, got 4"):
        messages.twist_msg(np.zeros(4))


# -- a ROS 2 client in this process ---------------------------------------------------------------
class Client(TopicClient):
    """Records every message of the base's topics with its arrival time; publishes commands."""

    def __init__(self, sim: str = "/sim") -> None:
        topics = {
            "/odom": (Odometry, sensor_qos()),
            "/scan": (LaserScan, sensor_qos()),
            "/plan": (PathMsg, sensor_qos()),
            "/cmd_vel": (Twist, command_qos()),
        }
        super().__init__(DOMAIN_ID, "mobility_probe", topics, sim)


def start_node(module: str, *ros_args: str) -> subprocess.Popen:
    return ros_processes.start_node(module, *ros_args, domain=DOMAIN_ID)


def latest(client: Client, topic: str, since: float) -> object:
    return client.wait_for(lambda: client.messages(topic, since)[-1:], 10, topic)[0]


def plan_goal(plan: object) -> np.ndarray:
    return np.array([plan.poses[-1].pose.position.x, plan.poses[-1].pose.position.y])


def odom_pose(odom: object) -> np.ndarray:
    return messages.message_to_array(odom, messages.TopicBinding("odom", "/odom", "Odometry", "planar"))[:3]


# -- the sim node ---------------------------------------------------------------------------------
def test_sim_node_topics_goals_and_commands() -> None:
    """kaya (holonomic, a 360-degree scan of 72 rays) in commanded stepping: one step per /cmd_vel,
    so the state is published once per step and reset (each reset here starts world SEED again)."""
    process = start_node(
        "mobility_sim_node", "-r", "__node:=sim", "-p", "embodiment:=kaya", "-p", "step_mode:=commanded",
        "-p", f"seeds:=[{SEED}]",
    )  # fmt: skip
    client = Client()
    env = MobilityEnv(["kaya"])
    expected = env.reset([SEED])
    try:
        client.wait_for(client.status, 60, "the sim node's first episode status")
        for _ in range(5):  # until the best-effort sensor topics have matched this client
            reset = time.monotonic()
            episode = client.reset()["episode"]
            time.sleep(0.3)
            if client.messages("/odom", reset) and client.messages("/plan", reset):
                break
        odom = latest(client, "/odom", reset)
        scan = latest(client, "/scan", reset)
        plan = latest(client, "/plan", reset)
        assert (odom.header.frame_id, odom.child_frame_id) == ("odom", "base_link")
        assert scan.header.frame_id == "base_link" and len(scan.ranges) == 72
        assert scan.angle_min == pytest.approx(-np.pi) and scan.angle_increment == pytest.approx(
            2 * np.pi / 72
        )
        assert scan.range_max == pytest.approx(6.0)
        assert plan.header.frame_id == "odom" and len(plan.poses) == 5  # 4 route waypoints, then the goal
        np.testing.assert_allclose(plan_goal(plan), env.worlds[0].goal)
        assert_same_observation(observe_messages(odom, scan, plan), expected)

        # a goal inside an obstacle: refused, the goal and the world named, the old goal kept
        goals = client.publisher(PoseStamped, "/goal_pose", command_qos())
        inside = env.worlds[0].boxes[4, :2]
        goals.publish(messages.pose_stamped_msg([*inside, 0.0], [0, 0, 0, 1], "odom"))
        refusal = f"/goal_pose ({inside[0]:.2f}, {inside[1]:.2f}) in world {SEED}: refused"
        client.wait_for(lambda: refusal in ros_processes.node_output(process), 10, "the refusal")
        assert "inside or within 0.22 m of an obstacle" in ros_processes.node_output(process)

        # /cmd_vel moves the base exactly as the simulator does in process
        twist = client.publisher(Twist, "/cmd_vel", command_qos())
        command = np.array([0.3, 0.15, 0.4])
        for step in range(1, 11):
            twist.publish(messages.twist_msg(command))
            client.wait_for(lambda s=step: client.status()["step"] == s, 10, f"step {step}")
            expected, *_ = env.step(command[None])
        status = client.status()
        assert not status["done"] and not status["collision"]
        since = time.monotonic() - 0.5
        odom = latest(client, "/odom", since)
        np.testing.assert_allclose(odom_pose(odom), env.pose[0], atol=1e-9)
        assert np.linalg.norm(env.pose[0, :2] - env.worlds[0].start[:2]) > 0.1
        plan = latest(client, "/plan", since)
        np.testing.assert_allclose(plan_goal(plan), env.worlds[0].goal)  # still the old goal
        assert_same_observation(observe_messages(odom, latest(client, "/scan", since), plan), expected)

        # a free goal: a new episode from where the base stands, replanned at once
        clear = np.argwhere(env.worlds[0].clearance > 1.0)
        free = (clear[len(clear) // 2][::-1] + 0.5) * 0.1  # (row, column) cell -> x, y
        asked = time.monotonic()
        goals.publish(messages.pose_stamped_msg([*free, 0.0], [0, 0, 0, 1], "odom"))
        client.wait_for(lambda: client.status()["episode"] == episode + 1, 10, "the new goal's episode")
        assert client.status()["step"] == 0 and client.status()["seed"] == SEED
        np.testing.assert_allclose(plan_goal(latest(client, "/plan", asked)), free)
        np.testing.assert_allclose(odom_pose(latest(client, "/odom", asked)), env.pose[0], atol=1e-9)
        env.set_goal(0, free)
        np.testing.assert_allclose(
            [[p.pose.position.x, p.pose.position.y] for p in latest(client, "/plan", asked).poses[:4]],
            env.route(0),
        )
        assert client.reset() == {"seed": SEED, "episode": episode + 2}
    finally:
        client.close()
        print(ros_processes.stop_node(process)[-3000:])


def test_realtime_sim_node_stops_the_base_once_commands_stop() -> None:
    process = start_node(
        "mobility_sim_node", "-r", "__node:=sim", "-p", "embodiment:=carter", "-p", f"seed:={SEED}"
    )
    client = Client()
    try:
        client.wait_for(client.status, 60, "the sim node's first episode status")
        twist = client.publisher(Twist, "/cmd_vel", command_qos())
        start = time.monotonic()
        while time.monotonic() < start + 1.0:
            twist.publish(messages.twist_msg([0.4, 0.0, 0.0]))
            time.sleep(0.05)
        stopped = time.monotonic()
        moving = latest(client, "/odom", stopped - 0.2).twist.twist.linear.x
        assert moving == pytest.approx(0.4, abs=0.05)
        time.sleep(1.0)  # command_timeout 0.2 s, then carter's lag and deceleration (2 m/s^2)
        odom = client.timed("/odom", start)
        assert abs(odom[-1][1].twist.twist.linear.x) < 1e-3 and client.status()["step"] > 10
        periods = np.diff([t for t, _ in odom])
        print(f"realtime /odom period: median {1000 * np.median(periods):.1f} ms")
        assert 0.09 <= np.median(periods) <= 0.2
    finally:
        client.close()
        print(ros_processes.stop_node(process)[-3000:])


# -- the policy node ------------------------------------------------------------------------------
class Sensors:
    """Publishes a base's /odom, /scan and /plan at 10 Hz, stamped now; each can be paused or spoilt."""

    def __init__(self, client: Client) -> None:
        env = MobilityEnv(["carter"])
        env.reset([SEED])
        self.odom, self.scan, self.plan, _ = state_messages(env, 0.0)
        self.publishers = {
            "odom": client.publisher(Odometry, "/odom", sensor_qos()),
            "scan": client.publisher(LaserScan, "/scan", sensor_qos()),
            "plan": client.publisher(PathMsg, "/plan", sensor_qos()),
        }
        self.paused: set[str] = set()
        self.last: dict[str, float] = {}
        self.bad_range: float | None = None
        self.first_bad: float | None = None  # when the first scan with `bad_range` went out
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(PERIOD):
            now = time.time()
            stamp = seconds_to_stamp(now)
            for key, msg in (("odom", self.odom), ("scan", self.scan), ("plan", self.plan)):
                if key in self.paused:
                    continue
                msg.header.stamp = stamp
                if key == "scan":
                    bad = self.bad_range
                    msg.ranges[10] = bad if bad is not None else msg.ranges[11]
                    self.first_bad = (self.first_bad or now) if bad is not None else None
                self.publishers[key].publish(msg)
                self.last[key] = now

    def close(self) -> None:
        self._stop.set()
        self.thread.join()


def is_zero(twist: Twist) -> bool:
    return bool(np.all(messages.twist_to_array(twist) == 0.0))


def commands_since(client: Client, t: float) -> list[tuple[float, Twist]]:
    """/cmd_vel messages received after wall time `t` (arrival times on the wall clock)."""
    offset = time.time() - time.monotonic()
    return [(r + offset, m) for r, m in client.timed("/cmd_vel") if r + offset >= t]


def wait_moving(client: Client, since: float) -> None:
    client.wait_for(
        lambda: any(not is_zero(m) for _, m in commands_since(client, since)), 20, "a moving command"
    )


def first_zero_after(client: Client, t: float, settle: float) -> float:
    """When the first zero Twist after `t` arrived; asserts that nothing moved from `settle` on."""
    time.sleep(max(0.0, settle - time.time()) + 0.5)
    after = commands_since(client, t)
    zeros = [r for r, m in after if is_zero(m)]
    assert zeros, "no zero Twist"
    assert all(is_zero(m) for r, m in after if r > settle), "moved after the limit"
    return zeros[0]


def test_policy_node_holds_on_stale_odometry_and_non_finite_scans() -> None:
    process = start_node(
        "policy_node", "-r", "__node:=policy", "--params-file", str(POLICY_PARAMS),
        "-p", f"checkpoint:={CHECKPOINT}", "-p", "inference:=threaded", "-p", "autostart:=true",
    )  # fmt: skip
    client = Client()
    sensors = Sensors(client)
    try:
        wait_moving(client, 0.0)
        twist = commands_since(client, 0.0)[-1][1]
        assert twist.linear.z == twist.angular.x == twist.angular.y == 0.0  # a base's 3-d action

        sensors.paused.add("odom")  # /odom stops: stale after max_obs_age
        time.sleep(0.05)
        last_odom = sensors.last["odom"]
        limit = last_odom + MAX_OBS_AGE + 2 * PERIOD
        held = first_zero_after(client, last_odom, limit)
        print(f"\nstale /odom: first zero Twist {1000 * (held - last_odom):.0f} ms after the last odometry")
        assert held <= limit

        for bad in (np.nan, np.inf):
            sensors.paused.clear()
            wait_moving(client, time.time())
            sensors.bad_range = bad
            spoilt = client.wait_for(lambda: sensors.first_bad, 5, "a spoilt scan")
            limit = spoilt + 2 * PERIOD
            held = first_zero_after(client, spoilt, limit)
            print(f"/scan with a range {bad}: first zero Twist {1000 * (held - spoilt):.0f} ms after it")
            assert held <= limit
            sensors.bad_range = None
        assert "rejected" not in ros_processes.node_output(process)  # a non-finite scan is not malformed
    finally:
        sensors.close()
        client.close()
        print(ros_processes.stop_node(process)[-3000:])


# -- through the launch file ----------------------------------------------------------------------
def launch_and_evaluate(
    checkpoint: Path, embodiment: str, episodes: int, tmp_path: Path
) -> tuple[dict, list, str]:
    """mobility_sim_policy.launch.xml in lock step (commanded sim, the policy on its clock, chunks
    inside the control tick), driven seed by seed by robomosaic-ros-eval, and in-process episodes of
    the same seeds meanwhile; returns the ROS report, the in-process episodes and the launch output."""
    from robomosaic.policies.checkpoint import load_policy
    from robomosaic.policies.rollout import ExecutorPolicy
    from robomosaic.sim.mobility.rollout import run_navigation

    launch = ros_processes.start_process(
        [sys.executable, "-m", "robomosaic.ros_nodes.launch", "mobility_sim_policy.launch.xml",
         f"checkpoint:={checkpoint}", f"embodiment:={embodiment}", f"seed:={SEED}", "step_mode:=commanded",
         "use_sim_time:=true", "inference:=simulated"], DOMAIN_ID,
    )  # fmt: skip
    report = tmp_path / f"ros_eval_{embodiment}.json"
    try:
        driver = ros_processes.start_process(
            [sys.executable, "-m", "robomosaic.ros_nodes.ros_eval", "--ros-args",
             "-p", f"episodes:={episodes}", "-p", f"seed_offset:={SEED}", "-p", f"out:={report}",
             "-p", "episode_timeout:=60.0"], DOMAIN_ID,
        )  # fmt: skip
        env = MobilityEnv([embodiment] * 2)  # in process meanwhile: lock step does not mind the load
        policy = ExecutorPolicy(load_policy(checkpoint), env.spec, gripper_dims=())
        local = list(run_navigation(env, range(SEED, SEED + episodes), policy))
        driver.wait(timeout=600)
        driver_out = ros_processes.stop_node(driver)
    finally:
        launch_out = ros_processes.stop_node(launch)
    assert driver.returncode == 0, f"{driver_out[-3000:]}\nlaunch:\n{launch_out[-4000:]}"
    ros = json.loads(report.read_text())
    print(f"{checkpoint.name} on {embodiment} over ROS: {ros['successes']}/{episodes} in "
          f"{ros['wall_time_s']:.0f} s (steps {[e['steps'] for e in ros['per_episode']]}); in process: "
          f"{sum(e.success for e in local)}/{episodes} "
          f"(steps {[e.steps for e in sorted(local, key=lambda e: e.seed)]})")  # fmt: skip
    return ros, local, launch_out


def test_launch_file_base_policy_reaches_goals_on_carter(tmp_path: Path) -> None:
    ros, local, launch_out = launch_and_evaluate(CHECKPOINT, "carter", 10, tmp_path)
    assert ros["success_rate"] >= 0.4, launch_out[-4000:]  # 5/10 here; the base: 75 % over 200 seeds
    assert abs(ros["successes"] - sum(e.success for e in local)) <= 2


# Goals of 20 the generalist must reach over ROS: it reached 14 (carter) and 11 (kaya), the same as in
# process on these seeds; the imitation base reaches 0 % on kaya (docs/results/compass.md).
GENERALIST_GOALS = {"carter": 10, "kaya": 8}
GENERALIST = ROOT / "tests" / "assets" / "compass" / "distill" / "s0" / "policy" / "best"  # README there


@pytest.mark.parametrize("embodiment", ["carter", "kaya"])
def test_launch_file_generalist_drives_two_embodiments(tmp_path: Path, embodiment: str) -> None:
    """One cross-embodiment checkpoint, two sim nodes, switched only by the launch argument
    `embodiment:=`, which also tells the policy node the embodiment one-hot."""
    episodes = 20
    ros, local, launch_out = launch_and_evaluate(GENERALIST, embodiment, episodes, tmp_path)
    assert ros["successes"] >= GENERALIST_GOALS[embodiment], launch_out[-4000:]
    assert abs(ros["successes"] - sum(e.success for e in local)) <= 3
