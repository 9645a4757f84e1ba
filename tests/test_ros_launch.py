"""robomosaic-launch: the package's launch files, the XML subset, errors, and real node processes.

ROS_DOMAIN_ID 15 (see the ROS 2 test domains): the DDS test starts real nodes through a launch file
and watches their topics from this process. The domain is passed explicitly (subprocess environment,
rclpy context), not through this process's environment, which pytest shares between test modules.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from robomosaic.ros_nodes import processes as ros_processes
from robomosaic.ros_nodes.launch import Launcher, LaunchError, NodeSpec, load, run_nodes

DOMAIN = 15
ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "robomosaic.ros_nodes.launch"]
CHECKPOINT = ROOT / "tests" / "assets" / "lift_flow"


ENV = {**os.environ, "ROS_DOMAIN_ID": str(DOMAIN)}


def launch(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LAUNCH, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def commands(launcher: Launcher) -> dict[str, list[str]]:
    return {node.label: node.command for node in launcher.nodes}


def ros_args(command: list[str]) -> list[str]:
    return command[command.index("--ros-args") + 1 :]


# --------------------------------------------------------------------------------------------------
# the package's launch files


def test_sim_arm_policy_launch_file():
    launcher = load("sim_arm_policy.launch.xml", {"checkpoint": str(CHECKPOINT), "task": "lift", "seed": "7"})
    nodes = commands(launcher)
    assert set(nodes) == {"sim", "policy"}
    assert all(node.required for node in launcher.nodes)  # on_exit="shutdown": one dies, all stop
    sim, policy = ros_args(nodes["sim"]), ros_args(nodes["policy"])
    assert sim[:2] == ["-r", "__node:=sim"] and "task:=lift" in sim and "seed:=7" in sim
    assert f"checkpoint:={CHECKPOINT}" in policy and "autostart:=true" in policy
    params = Path(policy[policy.index("--params-file") + 1])
    assert params == ROOT / "config" / "sim_arm_policy.yaml"  # the source checkout's, in an editable install
    # parameter files before single parameters: rcl applies them in order, so the launch file's values win
    assert policy.index("--params-file") < policy.index(f"checkpoint:={CHECKPOINT}")


@pytest.mark.parametrize(
    ("file", "arguments", "nodes"),
    [
        ("sim_arm_policy.launch.xml", [f"checkpoint:={CHECKPOINT}", "task:=stack"], ["sim", "policy"]),
        (
            "sim_arm_record.launch.xml",
            ["store:=/tmp/x.zarr", "teleop_topic:=/joy_twist"],
            ["sim", "recorder"],
        ),
        (
            "quadrotor_sim.launch.xml",
            ["control_hz:=200.0", "vehicle:=crazyflie"],
            ["quadrotor_sim", "quadrotor_controller"],
        ),
        ("policy_robot.launch.xml", [f"checkpoint:={CHECKPOINT}", "namespace:=arm1"], ["policy"]),
        (
            "mobility_sim_policy.launch.xml",
            [f"checkpoint:={ROOT / 'tests' / 'assets' / 'nav_flow'}", "embodiment:=spot"],
            ["sim", "policy"],
        ),
    ],
)
def test_every_launch_file_prints_its_commands(file, arguments, nodes):
    """`--print` resolves every file (arguments, parameter files, executables) without running anything."""
    out = launch(file, *arguments, "--print")
    assert out.returncode == 0, out.stderr
    labels = re.findall(r"^\[([\w-]+)\]", out.stdout, flags=re.M)
    assert labels == nodes
    for argument in arguments:  # every override reaches a node's command line
        value = argument.split(":=")[1]
        assert value in out.stdout, argument
    shown = launch(file, "--show-args")
    assert shown.returncode == 0 and "Arguments" in shown.stdout
    for argument in arguments:
        assert f"'{argument.split(':=')[0]}'" in shown.stdout


def test_missing_required_argument_names_file_and_line():
    out = launch("sim_arm_policy.launch.xml", "--print")
    assert out.returncode != 0
    assert re.search(
        r"sim_arm_policy\.launch\.xml:\d+: <arg>: launch argument 'checkpoint' is required", out.stderr
    )


# --------------------------------------------------------------------------------------------------
# the XML subset, on launch files written here (exec robomosaic-launch: a robomosaic executable that
# always exists)


def test_include_group_params_and_substitutions(tmp_path, monkeypatch):
    monkeypatch.setenv("H5_TEST_RATE", "42")
    write(
        tmp_path / "inner.launch.xml",
        """
        <launch>
          <arg name="who" description="set by the including file"/>
          <arg name="rate" default="$(env H5_TEST_RATE)"/>
          <node pkg="robomosaic" exec="robomosaic-launch" name="$(var who)" namespace="inner" args="x --flag">
            <param name="rate" value="$(var rate)"/>
            <param name="observations">
              <param name="eef"><param name="topic" value="/eef_pose"/></param>
            </param>
            <param from="$(dirname)/params.yaml"/>
            <remap from="/cmd_vel" to="/teleop/cmd_vel"/>
            <env name="H5_CHILD" value="$(var who)"/>
          </node>
        </launch>
        """,
    )
    write(tmp_path / "params.yaml", "/**:\n  ros__parameters:\n    a: 1\n")
    outer = write(
        tmp_path / "outer.launch.xml",
        """
        <launch>
          <arg name="use_second" default="false"/>
          <let name="prefix" value="robot"/>
          <group>
            <push-ros-namespace namespace="$(var prefix)"/>
            <include file="inner.launch.xml"><arg name="who" value="first"/></include>
          </group>
          <include file="$(dirname)/inner.launch.xml" if="$(var use_second)">
            <arg name="who" value="second"/><arg name="rate" value="7"/>
          </include>
          <node pkg="robomosaic" exec="robomosaic-launch" unless="true"/>
        </launch>
        """,
    )
    launcher = Launcher({"use_second": "true"})
    launcher.run_file(outer)
    first, second = launcher.nodes
    assert (first.label, second.label) == ("first", "second")
    assert first.command[: first.command.index("--ros-args")][-2:] == ["x", "--flag"]
    assert ros_args(first.command) == [
        "-r", "__node:=first",
        "-r", "__ns:=/robot/inner",  # the group's pushed namespace + the node's relative one
        "--params-file", str(tmp_path / "params.yaml"),
        "-p", "rate:=42",
        "-p", "observations.eef.topic:=/eef_pose",
        "-r", "/cmd_vel:=/teleop/cmd_vel",
    ]  # fmt: skip
    assert "-r" in ros_args(second.command) and "__ns:=/inner" in ros_args(second.command)
    assert "rate:=7" in ros_args(second.command)
    assert first.env == {"H5_CHILD": "first"}
    launcher = Launcher({})
    launcher.run_file(outer)
    assert [n.label for n in launcher.nodes] == ["first"]


NODE = '<node pkg="robomosaic" exec="robomosaic-launch"'
BAD_FILES = [
    (f'{NODE}/>\n<rosparam file="x"/>', r":3: <rosparam>: unsupported element"),
    (f'{NODE} respawn="true"/>', r":2: <node>: unsupported attribute\(s\) respawn"),
    ('<node pkg="robomosaic" exec="robomosaic-nope"/>', r":2: <node>: no executable 'robomosaic-nope'"),
    (
        '<node pkg="robomosaic" exec="$(var nothing)"/>',
        r":2: <node>: undefined launch argument \$\(var nothing\)",
    ),
    ('<arg name="x"/>', r":2: <arg>: launch argument 'x' is required: pass x:=<value>"),
    (
        f'{NODE}><param from="missing.yaml"/></node>',
        r":2: <param>: parameter file .*missing.yaml does not exist",
    ),
    ('<include file="nowhere.launch.xml"/>', r":2: <include>: included file .*nowhere.launch.xml does not"),
    ('<node pkg="robomosaic" exec="$(eval 1+1)"/>', r":2: <node>: unsupported substitution \$\(eval\)"),
    (f'{NODE} on_exit="restart"/>', r":2: <node>: on_exit='restart': only 'shutdown' is supported"),
    (NODE, r":\d+: not well-formed XML"),
]


@pytest.mark.parametrize(("body", "message"), BAD_FILES)
def test_errors_name_file_line_and_element(tmp_path, body, message):
    path = write(tmp_path / "bad.launch.xml", "<launch>\n" + body + "\n</launch>\n")
    with pytest.raises(LaunchError, match=re.escape(str(path)) + message):
        Launcher({}).run_file(path)
    out = launch(path, "--print")  # the command line reports it as an error, exit status 1
    assert out.returncode == 1 and str(path) in out.stderr and "Traceback" not in out.stderr


def test_launch_file_not_found_lists_the_available_ones():
    out = launch("no_such.launch.xml")
    assert out.returncode == 1 and "sim_arm_policy.launch.xml" in out.stderr


# --------------------------------------------------------------------------------------------------
# supervision of the child processes (plain Python children: what is tested is the supervisor)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_required_node_exit_stops_the_others(capfd):
    sleeper = python("import time\nprint('up', flush=True)\ntime.sleep(60)")
    failing = python("import sys, time\ntime.sleep(0.5)\nsys.exit(3)")
    start = time.monotonic()
    status = run_nodes(
        [NodeSpec("sleeper", sleeper, {}, False, "t"), NodeSpec("failing", failing, {}, True, "t")]
    )
    assert status == 3 and time.monotonic() - start < 10
    out = capfd.readouterr().out
    assert (
        "[sleeper] up" in out and "failing has on_exit=shutdown" in out and "sending SIGINT to sleeper" in out
    )


def test_stubborn_child_is_escalated_to_sigkill(capfd):
    """A child that ignores SIGINT and SIGTERM is killed after the two timeouts; the status says so."""
    stubborn = python(
        """
        import signal, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print('ready', flush=True)
        time.sleep(60)
        """
    )
    quitter = python("import time\ntime.sleep(1.0)")
    status = run_nodes(
        [NodeSpec("stubborn", stubborn, {}, False, "t"), NodeSpec("quitter", quitter, {}, True, "t")],
        sigterm_timeout=0.5,
        sigkill_timeout=0.5,
    )
    out = capfd.readouterr().out
    assert status == 1
    assert "sending SIGTERM to stubborn" in out and "stubborn did not stop: SIGKILL" in out


# --------------------------------------------------------------------------------------------------
# real nodes over DDS


@pytest.fixture
def ros_node():
    """An rclpy node of this test in its own context on DOMAIN."""
    import rclpy

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN)
    node = rclpy.create_node("launch_test_observer", context=context)
    executor = rclpy.executors.SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        yield node, executor
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


def raptor_student() -> Path:
    """The shipped RAPTOR student; before it is shipped, the lead's distillation run (read-only)."""
    from robomosaic.policies.raptor import PRETRAINED_STUDENT

    for path in (PRETRAINED_STUDENT, ROOT / "runs/raptor/distill/student/final"):
        if (path / "spec.json").is_file():
            return path
    pytest.skip("no RAPTOR student: neither the packaged one nor runs/raptor/distill/student/final")


def test_launched_nodes_talk_over_dds_and_sigint_stops_them(ros_node, tmp_path):
    """quadrotor_sim.launch.xml through robomosaic-launch: the simulator's odometry reaches the
    controller (its motor commands leave the failsafe zeros it sends without odometry), and SIGINT to
    robomosaic-launch stops both node processes, with exit status 0."""
    from nav_msgs.msg import Odometry
    from std_msgs.msg import Float32MultiArray

    from robomosaic.ros_nodes.common import command_qos, sensor_qos

    params = tmp_path / "controller.yaml"  # the launch file's parameter file, with a checkpoint set
    params.write_text(
        (ROOT / "config" / "quadrotor.yaml").read_text() + f"    checkpoint: {raptor_student()}\n"
    )
    node, executor = ros_node
    odometry, commands = [], []
    node.create_subscription(Odometry, "/odom", odometry.append, sensor_qos())
    node.create_subscription(Float32MultiArray, "/motor_commands", commands.append, command_qos())
    process = ros_processes.start_process(
        [*LAUNCH, "quadrotor_sim.launch.xml", "control_hz:=50.0", f"controller_params:={params}"], DOMAIN
    )
    try:
        deadline = time.monotonic() + 60
        flying = lambda: any(np.isfinite(m.data).all() and max(m.data) > 0.05 for m in commands)  # noqa: E731
        while time.monotonic() < deadline and not (odometry and flying()):
            assert process.poll() is None, ros_processes.node_output(process)
            executor.spin_once(timeout_sec=0.1)
        assert odometry, "no /odom from the launched simulator"
        assert flying(), f"the controller never answered the odometry ({len(commands)} commands)"
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        output = ros_processes.node_output(process)
    assert process.returncode == 0, output
    pids = [int(p) for p in re.findall(r"started \S+ \[pid (\d+)\]", output)]
    assert len(pids) == 2 and "sending SIGINT to quadrotor_controller" in output
    for pid in pids:  # reaped by robomosaic-launch: gone
        assert not Path(f"/proc/{pid}").exists(), pid
    assert "[quadrotor_sim]" in output and "[quadrotor_controller]" in output


def call_until(node, executor, service_type, name: str, request, timeout: float = 60.0):
    """Call a service until it answers with success (or the deadline passes); the last answer.

    A request can go unanswered when it is sent while discovery is still matching the reply's
    reader, so a call is repeated after 5 s without an answer as well as after a refusal."""
    client = node.create_client(service_type, name)
    deadline = time.monotonic() + timeout
    answer = None
    while time.monotonic() < deadline and not (answer is not None and answer.success):
        if not client.service_is_ready():
            executor.spin_once(timeout_sec=0.1)
            continue
        future = client.call_async(request)
        executor.spin_until_future_complete(future, timeout_sec=5.0)
        answer = future.result() if future.done() else answer
        if not (answer is not None and answer.success):
            time.sleep(0.5)
    node.destroy_client(client)
    assert answer is not None, f"{name} never answered"
    return answer


def test_sim_arm_record_launch_records_an_episode(ros_node, tmp_path):
    """sim_arm_record.launch.xml as shipped (config/sim_arm_policy.yaml's mapping): ~/start resets the
    simulated robot through /sim/reset, teleoperation moves it, ~/stop appends the episode to the store."""
    from geometry_msgs.msg import Twist
    from std_srvs.srv import SetBool, Trigger

    from robomosaic.data.store import EpisodeStore

    node, executor = ros_node
    store = tmp_path / "teleop.zarr"
    teleop = node.create_publisher(Twist, "/teleop/cmd_vel", 10)
    process = ros_processes.start_process(
        [*LAUNCH, "sim_arm_record.launch.xml", f"store:={store}", "teleop_topic:=/teleop/cmd_vel", "seed:=5"],
        DOMAIN,
    )
    try:
        # ~/start is refused until the simulated robot publishes (robosuite takes seconds to start)
        answer = call_until(node, executor, Trigger, "/recorder/start", Trigger.Request())
        assert answer.success, answer.message
        up = Twist()
        up.linear.z = 0.5
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            teleop.publish(up)
            executor.spin_once(timeout_sec=0.05)
        answer = call_until(node, executor, SetBool, "/recorder/stop", SetBool.Request(data=False))
        assert answer.success, answer.message
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        output = ros_processes.node_output(process)
    assert process.returncode == 0, output
    recorded = EpisodeStore.open(store)
    # the sim starts in seed 5's state; the reset at ~/start moves on to the next seed
    assert recorded.n_episodes == 1 and recorded.episode_meta(0)["seed"] == 6
    episode = recorded.episode(0)
    assert len(episode["action"]) >= 10
    assert (episode["action"][:, 2] > 0.4).any()  # the teleoperated upward motion was recorded
    assert episode["robot0_eef_pos"][-1, 2] > episode["robot0_eef_pos"][0, 2] + 0.02  # and the arm moved
