"""robomosaic-policy-node over real DDS: the node runs in its own process, this test process is the
robot (publishes observations, listens to commands and diagnostics) and the operator (lifecycle
transitions, parameters, services). Plus the safety filter and the binding checks without DDS.

One node process serves every DDS test (starting it imports torch and loads the checkpoint, the
bulk of the time); the tests run in file order and each leaves the node in a known state.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from robomosaic.ros_nodes import processes as ros_processes

pytest.importorskip("rclpy")

from robomosaic.data.multitask import TaskSet
from robomosaic.data.spec import KeySpec
from robomosaic.policies.raptor import PRETRAINED_STUDENT
from robomosaic.ros_nodes import messages
from robomosaic.ros_nodes.common import BackgroundSpin, command_qos, seconds_to_stamp, sensor_qos
from robomosaic.ros_nodes.safety import SafetyFilter

# This file's own DDS domain, passed explicitly (to the node's environment and to every rclpy context):
# os.environ is shared by every test module pytest imports.
DOMAIN = 11
CHECKPOINT = Path(__file__).parent / "assets" / "lift_flow"  # trained lift policy (read-only)
NODE = "policy_under_test"
CONTROL_HZ = 20.0
PERIOD = 1.0 / CONTROL_HZ
MAX_OBS_AGE = 0.2
MAX_DELTA = [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 2.0]
ACTION_MIN = [-0.5, -0.5, -0.5, -0.3, -0.3, -0.3, -1.0]
ACTION_MAX = [0.5, 0.5, 0.5, 0.3, 0.3, 0.3, 1.0]
FINGERS = ["gripper0_right_finger_joint1", "gripper0_right_finger_joint2"]
JOINTS = [f"robot0_joint{i}" for i in range(1, 8)] + FINGERS


# -- without DDS --------------------------------------------------------------------------------
def test_safety_filter_clamps_rate_limits_and_holds() -> None:
    safety = SafetyFilter(
        3, action_min=[-1, -1, -1], action_max=[1, 1, 0.5], max_delta=0.25, gripper_dims=[2]
    )
    command, status = safety(np.array([0.1, -0.1, 0.1]))
    assert status == "ok" and np.allclose(command, [0.1, -0.1, 0.1])
    command, status = safety(np.array([2.0, -0.2, 0.4]))  # x clamped to 1, then limited to 0.1 + 0.25
    assert status == "clamped+rate_limited" and np.allclose(command, [0.35, -0.2, 0.35])
    command, status = safety(np.array([np.nan, 0.0, 0.0]))  # non-finite: the safe command, gripper kept
    assert status == "nonfinite" and np.allclose(command, [0.0, 0.0, 0.35])
    command, status = safety(np.array([0.9, 0.9, 0.9]), hold=True)  # holds ignore the action
    assert status == "hold" and np.allclose(command, [0.0, 0.0, 0.35])
    command, _ = safety(np.array([0.9, 0.9, 0.9]))  # resumes from the hold, rate-limited
    assert np.allclose(command, [0.25, 0.25, 0.5])
    planned = safety.limit_chunk(np.array([[1.0, -1.0, 0.5], [1.0, -1.0, 0.5], [np.inf, 0, 0]]), command)
    assert np.allclose(planned, [[0.5, 0.0, 0.5], [0.75, -0.25, 0.5]])
    assert safety.stats.nonfinite == 1 and safety.stats.holds == 1 and safety.stats.rate_limited == 2
    safety.reset()  # a new episode: zero motion, the gripper keeps its last command
    assert np.allclose(safety.safe_command(), [0.0, 0.0, 0.5])
    # limits that exclude the safe command's 0: the rate limit never pulls a command out of them
    offset = SafetyFilter(1, action_min=[0.5], action_max=[1.0], max_delta=0.1)
    command, _ = offset(np.array([0.9]))
    assert 0.5 <= command[0] <= 1.0
    with pytest.raises(ValueError, match="max_delta needs 3 values"):
        SafetyFilter(3, max_delta=[0.1, 0.1])
    with pytest.raises(ValueError, match=r"action_min > action_max in dimension\(s\) \[1\]"):
        SafetyFilter(2, action_min=[0, 1], action_max=[1, 0])
    with pytest.raises(ValueError, match="gripper_dims"):
        SafetyFilter(2, gripper_dims=[2])


def test_binding_checks_name_the_mismatch() -> None:
    from robomosaic.ros_nodes.policy_node import ConfigurationError, check_bindings, parse_bindings

    spec = {
        "robot0_gripper_qpos": KeySpec((2,), "float64"),
        "object": KeySpec((14,), "float64"),
        "agentview_image": KeySpec((84, 84, 3), "uint8"),
        "task_id": KeySpec((), "int64"),
    }
    task_set = TaskSet(("lift", "door"), 14)
    params = {
        "robot0_gripper_qpos.topic": "/joint_states",
        "robot0_gripper_qpos.type": "JointState",
        "robot0_gripper_qpos.names": FINGERS,
        "object.topic": "/object_state",
        "object.type": "Float64MultiArray",
        "agentview_image.topic": "/agentview/image_raw",
        "agentview_image.type": "Image",
    }
    bindings = parse_bindings(params)
    check_bindings(bindings, spec, task_set, "door")  # all bound, task from the parameter
    with pytest.raises(ConfigurationError, match=r"set parameter task or bind observations.task_id"):
        check_bindings(bindings, spec, task_set, "")
    with pytest.raises(
        ConfigurationError, match=r"parameter task: 'stack' is not one of .*\['lift', 'door'\]"
    ):
        check_bindings(bindings, spec, task_set, "stack")
    with_topic = parse_bindings({**params, "task_id.topic": "/task", "task_id.type": "String"})
    check_bindings(with_topic, spec, task_set, "")
    bad = parse_bindings({**params, "robot0_gripper_qpos.names": [*FINGERS, "robot0_joint1"]})
    with pytest.raises(
        ConfigurationError, match=r"'robot0_gripper_qpos' \(topic '/joint_states'\).*shape \(3,\)"
    ):
        check_bindings(bad, spec, task_set, "door")
    image_as_vector = parse_bindings({**params, "agentview_image.type": "Float64MultiArray"})
    with pytest.raises(ConfigurationError, match=r"'agentview_image'.*expects an image \(84, 84, 3\)"):
        check_bindings(image_as_vector, spec, task_set, "door")
    missing = parse_bindings({k: v for k, v in params.items() if not k.startswith("object.")})
    with pytest.raises(
        ConfigurationError, match=r"observation 'object' \(14,\) of the checkpoint is not bound"
    ):
        check_bindings(missing, spec, task_set, "door")
    typo = parse_bindings({**params, "objekt.topic": "/o", "objekt.type": "Float64MultiArray"})
    with pytest.raises(ConfigurationError, match=r"'objekt' .* is not an observation of the checkpoint"):
        check_bindings(typo, spec, task_set, "door")
    with pytest.raises(ConfigurationError, match=r"observations.object.type is not set"):
        parse_bindings({"object.topic": "/o"})
    with pytest.raises(ConfigurationError, match=r"observations.object.frame: expected"):
        parse_bindings({**params, "object.frame": "world"})


# -- over DDS -----------------------------------------------------------------------------------
def observation_means() -> dict[str, np.ndarray]:
    """Observations inside the training distribution: the normalizer's means."""
    from safetensors.numpy import load_file

    stats = load_file(str(CHECKPOINT / "normalizer.safetensors"))
    keys = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
    return {k: stats[f"{k}/mean"].astype(np.float64) for k in keys}


def write_params(path: Path) -> Path:
    """The policy node's parameter file, with the gripper bound to three joints (a mismatch)."""
    path.write_text(
        f"""/**:
  ros__parameters:
    checkpoint: {CHECKPOINT}
    observations:
      robot0_eef_pos: {{topic: /eef_pose, type: PoseStamped, field: position}}
      robot0_eef_quat: {{topic: /eef_pose, type: PoseStamped, field: orientation}}
      robot0_gripper_qpos:
        topic: /joint_states
        type: JointState
        names: [{", ".join(FINGERS)}, robot0_joint7]
      object: {{topic: /object_state, type: Float64MultiArray}}
    command_type: forward
    control_hz: {CONTROL_HZ}
    max_obs_age: {MAX_OBS_AGE}
    action_min: {ACTION_MIN}
    action_max: {ACTION_MAX}
    max_delta: {MAX_DELTA}
    seed: 3
"""
    )
    return path


class Robot:
    """The test's participant: publishes observations at 20 Hz, records commands and diagnostics."""

    def __init__(self) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseStamped
        from lifecycle_msgs.msg import TransitionEvent
        from lifecycle_msgs.srv import ChangeState, GetState
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.parameter_client import AsyncParameterClient
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float64MultiArray
        from std_srvs.srv import Trigger
        from trajectory_msgs.msg import JointTrajectory

        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=DOMAIN)
        self.node = rclpy.create_node("robot_probe", context=self.context)
        self.lock = threading.Lock()
        self.forward: list[tuple[float, np.ndarray]] = []
        self.trajectories: list[tuple[float, object]] = []
        self.diagnostics: list[dict[str, str]] = []
        node = self.node
        self.pose_pub = node.create_publisher(PoseStamped, "/eef_pose", sensor_qos())
        self.joint_pub = node.create_publisher(JointState, "/joint_states", sensor_qos())
        self.object_pub = node.create_publisher(Float64MultiArray, "/object_state", sensor_qos())
        node.create_subscription(
            Float64MultiArray, "/forward_command_controller/commands", self._on_forward, command_qos()
        )
        node.create_subscription(
            JointTrajectory,
            "/joint_trajectory_controller/joint_trajectory",
            self._on_trajectory,
            command_qos(),
        )
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.change_state = node.create_client(ChangeState, f"/{NODE}/change_state")
        self.get_state = node.create_client(GetState, f"/{NODE}/get_state")
        self.triggers = {
            name: node.create_client(Trigger, f"/{NODE}/{name}")
            for name in ("enable", "disable", "reset_history")
        }
        self.params = AsyncParameterClient(node, NODE)
        self.transitions: list[tuple[float, str]] = []  # (receipt time, goal state) of the node's
        node.create_subscription(TransitionEvent, f"/{NODE}/transition_event", self._on_transition, 10)
        self.obs = observation_means()
        self.object_value: np.ndarray = self.obs["object"]
        self.publishing = False
        self.last_publish = 0.0
        node.create_timer(PERIOD, self._publish)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(node)
        self.spinner = BackgroundSpin(self.executor)

    def close(self) -> None:
        self.spinner.close()
        self.node.destroy_node()
        self.context.try_shutdown()

    # -- callbacks (executor thread) --
    def _publish(self) -> None:
        if not self.publishing:
            return
        now = time.time()
        stamp = seconds_to_stamp(now)
        o = self.obs
        self.pose_pub.publish(
            messages.pose_stamped_msg(o["robot0_eef_pos"], o["robot0_eef_quat"], "world", stamp)
        )
        position = np.r_[np.zeros(7), o["robot0_gripper_qpos"]]
        self.joint_pub.publish(messages.joint_state_msg(JOINTS, position, np.zeros(9), stamp))
        self.object_pub.publish(messages.float64_array_msg(self.object_value))
        self.last_publish = now

    def _on_forward(self, msg) -> None:
        with self.lock:
            self.forward.append((time.time(), np.asarray(msg.data, dtype=np.float64)))

    def _on_trajectory(self, msg) -> None:
        with self.lock:
            self.trajectories.append((time.time(), msg))

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            if NODE in status.name:
                with self.lock:
                    self.diagnostics.append(
                        {
                            "received": time.time(),
                            "level": int.from_bytes(status.level, "little")
                            if isinstance(status.level, bytes)
                            else int(status.level),
                            "message": status.message,
                            **{kv.key: kv.value for kv in status.values},
                        }
                    )

    def _on_transition(self, msg) -> None:
        with self.lock:
            self.transitions.append((time.time(), msg.goal_state.label))

    # -- operator --
    def call(self, client, request, timeout: float = 60.0):
        assert client.wait_for_service(timeout_sec=timeout), f"service {client.srv_name} not available"
        future = client.call_async(request)
        deadline = time.time() + timeout
        while not future.done():
            assert time.time() < deadline, f"{client.srv_name}: no response in {timeout} s"
            time.sleep(0.01)
        return future.result()

    def transition(self, label: str) -> bool:
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        ids = {
            "configure": Transition.TRANSITION_CONFIGURE,
            "activate": Transition.TRANSITION_ACTIVATE,
            "deactivate": Transition.TRANSITION_DEACTIVATE,
            "cleanup": Transition.TRANSITION_CLEANUP,
        }
        return self.call(self.change_state, ChangeState.Request(transition=Transition(id=ids[label]))).success

    def state(self) -> str:
        from lifecycle_msgs.srv import GetState

        return self.call(self.get_state, GetState.Request()).current_state.label

    def trigger(self, name: str):
        from std_srvs.srv import Trigger

        return self.call(self.triggers[name], Trigger.Request())

    def set_params(self, **values) -> None:
        from rclpy.parameter import Parameter

        future = self.params.set_parameters(
            [Parameter(k.replace("__", "."), value=v) for k, v in values.items()]
        )
        deadline = time.time() + 10
        while not future.done():
            assert time.time() < deadline, "set_parameters: no response"
            time.sleep(0.01)
        assert all(r.successful for r in future.result().results), future.result()

    def commands_since(self, t: float) -> list[tuple[float, np.ndarray]]:
        with self.lock:
            return [(r, c) for r, c in self.forward if r >= t]

    def latest_diagnostics(self, after: float, timeout: float = 3.0) -> dict[str, str]:
        with self.lock:
            n = len(self.diagnostics)
        deadline = time.time() + timeout
        while time.time() < deadline:
            time.sleep(0.1)
            with self.lock:
                if len(self.diagnostics) > n:
                    return self.diagnostics[-1]
        raise AssertionError(f"no diagnostics within {timeout} s")


def is_hold(command: np.ndarray) -> bool:
    return bool(np.all(command[:6] == 0.0))


@pytest.fixture(scope="module")
def robot(tmp_path_factory):
    params = write_params(tmp_path_factory.mktemp("policy_node") / "params.yaml")
    process = ros_processes.start_node(
        "policy_node", "-r", f"__node:={NODE}", "--params-file", str(params), domain=DOMAIN
    )
    probe = Robot()
    probe.process = process
    try:
        yield probe
    finally:
        probe.publishing = False
        ros_processes.stop_node(process)
        probe.close()


def node_log(robot: Robot) -> str:
    return ros_processes.node_output(robot.process)


def test_configure_fails_naming_the_mismatch(robot: Robot) -> None:
    assert robot.state() == "unconfigured"
    assert not robot.transition("configure")
    expected = (
        "configure failed: observation 'robot0_gripper_qpos' (topic '/joint_states'): the binding gives "
        "shape (3,) (JointState position of joints ['gripper0_right_finger_joint1', "
        "'gripper0_right_finger_joint2', 'robot0_joint7']), the checkpoint expects (2,)"
    )
    assert expected in node_log(robot)
    assert robot.state() == "unconfigured"
    # the action side: a trajectory controller needs one joint name per action dimension
    robot.set_params(observations__robot0_gripper_qpos__names=FINGERS)
    robot.set_params(command_type="trajectory", trajectory_joint_names=["x", "y", "z"])
    assert not robot.transition("configure")
    assert (
        "parameter trajectory_joint_names: 3 names ['x', 'y', 'z'] for the checkpoint's 7-d action"
        in node_log(robot)
    )
    diagnostics = robot.latest_diagnostics(0.0)
    assert "trajectory_joint_names" in diagnostics["message"]
    # real-time scheduling: 1 would leave no lower priority for the inference process
    robot.set_params(command_type="forward", realtime_priority=1)
    assert not robot.transition("configure")
    assert "parameter realtime_priority: 1 needs inference 'process'" in node_log(robot)
    robot.set_params(realtime_priority=0)
    # a checkpoint that predicts no chunks (the RAPTOR student), told from its spec.json alone
    robot.set_params(checkpoint=str(PRETRAINED_STUDENT))
    assert not robot.transition("configure")
    assert f"{PRETRAINED_STUDENT / 'spec.json'}: missing or malformed entry 'obs'" in node_log(robot)
    robot.set_params(checkpoint=str(CHECKPOINT))


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def moving_commands(robot: Robot, since: float) -> int:
    return sum(not is_hold(c) for _, c in robot.commands_since(since))


def test_normal_path_gives_finite_commands_within_limits(robot: Robot) -> None:
    robot.set_params(command_type="forward")
    assert robot.transition("configure"), node_log(robot)
    robot.publishing = True
    start = time.time()
    assert robot.transition("activate")
    # On a loaded CPU inference can be slower than a replan period: the executor then holds
    # between chunks (counted as deadline misses); wait for enough executed actions.
    wait_until(lambda: moving_commands(robot, start) >= 15, 12.0, "15 commands from policy chunks")
    elapsed = time.time() - start
    commands = robot.commands_since(start)
    diagnostics = robot.latest_diagnostics(start)
    print(f"\nnormal path: {len(commands)} commands in {elapsed:.1f} s; diagnostics {diagnostics}")
    assert len(commands) >= 0.5 * elapsed * CONTROL_HZ, f"{len(commands)} commands in {elapsed:.1f} s"
    values = np.array([c for _, c in commands])
    assert np.all(np.isfinite(values))
    assert np.all(values >= np.array(ACTION_MIN) - 1e-12) and np.all(values <= np.array(ACTION_MAX) + 1e-12)
    # no step exceeds max_delta, except into a hold (stopping is never rate-limited)
    steps = np.abs(np.diff(values, axis=0))
    into_hold = np.array([is_hold(c) for c in values[1:]])
    assert np.all(steps[~into_hold] <= np.array(MAX_DELTA) + 1e-9)
    assert float(diagnostics["inference_latency_p50_ms"]) > 0 and int(diagnostics["chunks"]) >= 2
    assert float(diagnostics["newest_obs_age_ms"]) < 1000 * MAX_OBS_AGE
    assert diagnostics["rejected_obs"] == "0"


def test_observations_stop_hold_within_two_control_periods(robot: Robot) -> None:
    # stop while the arm is moving, so that the hold is a change the test can see
    wait_until(lambda: moving_commands(robot, time.time() - 0.06) > 0, 10.0, "a moving command")
    robot.publishing = False
    time.sleep(0.02)
    last_obs = robot.last_publish
    time.sleep(MAX_OBS_AGE + 0.5)
    after = robot.commands_since(last_obs)
    before = robot.commands_since(last_obs - 1.0)
    deadline = last_obs + MAX_OBS_AGE + 2 * PERIOD
    holds = [(r, c) for r, c in after if is_hold(c)]
    assert holds, "no hold after observations stopped"
    first_hold = holds[0][0]
    print(
        f"\nwatchdog: first hold {1000 * (first_hold - last_obs):.0f} ms after the last observation was sent"
    )
    assert first_hold <= deadline, (
        f"first hold {1000 * (first_hold - last_obs - MAX_OBS_AGE):.0f} ms after the limit"
    )
    assert all(is_hold(c) for r, c in after if r > deadline), "moved after the watchdog limit"
    sent_before_hold = [c for r, c in before if r < first_hold]
    assert holds[0][1][6] == sent_before_hold[-1][6], "the gripper must keep its last command during a hold"
    diagnostics = robot.latest_diagnostics(time.time())
    assert int(diagnostics["holds_stale_observation"]) > 0
    assert float(diagnostics["newest_obs_age_ms"]) > 1000 * MAX_OBS_AGE


def test_nan_observation_rejected_and_counted(robot: Robot) -> None:
    robot.publishing = True
    resumed = time.time()
    wait_until(lambda: moving_commands(robot, resumed) > 0, 10.0, "control to resume with fresh observations")
    before = int(robot.latest_diagnostics(time.time())["rejected_obs"])
    nan_from = time.time()
    robot.object_value = np.full_like(robot.obs["object"], np.nan)
    time.sleep(MAX_OBS_AGE + 0.6)
    commands = robot.commands_since(nan_from)
    assert commands and all(np.all(np.isfinite(c)) for _, c in commands)
    # the newest observation is non-finite from the next control period on: the node holds
    assert all(is_hold(c) for r, c in commands if r > nan_from + 4 * PERIOD)
    diagnostics = robot.latest_diagnostics(time.time())
    assert int(diagnostics["rejected_obs"]) > before
    robot.object_value = robot.obs["object"]


def test_services_and_deactivate_send_the_safe_command(robot: Robot) -> None:
    time.sleep(1.0)  # valid observations again
    response = robot.trigger("disable")
    assert response.success, response.message
    disabled_at = time.time()
    time.sleep(0.4)
    after = robot.commands_since(disabled_at - 0.2)
    assert after and is_hold(after[-1][1]), "disable must end with the safe command"
    assert not robot.commands_since(disabled_at + 0.1), "no commands while disabled"
    assert robot.trigger("enable").success
    assert robot.trigger("reset_history").success
    time.sleep(1.0)
    assert robot.commands_since(time.time() - 0.5), "enable must resume commands"
    assert robot.transition("deactivate")
    stopped = time.time()
    time.sleep(0.3)
    last = robot.commands_since(stopped - 0.3)
    assert last and is_hold(last[-1][1]), "deactivate must end with the safe command"
    assert not robot.commands_since(stopped + 0.1)
    assert not robot.trigger("enable").success  # inactive
    assert robot.state() == "inactive"


OK, ERROR = 0, 2  # diagnostic_msgs/DiagnosticStatus levels


def kill_inference_process(robot: Robot, what: str) -> tuple[int, float, dict]:
    """SIGKILL the node's inference process (its pid from the diagnostics); (pid, kill time, the
    first ERROR diagnostics after it), which must name the dead process within 2 control periods."""
    import os

    wait_until(lambda: moving_commands(robot, time.time() - 0.3) > 0, 60.0, "control with a live policy")
    pid = int(robot.latest_diagnostics(time.time())["inference_pid"])
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    deadline = killed + 5.0
    while True:
        with robot.lock:
            errors = [d for d in robot.diagnostics if d["received"] >= killed and d["level"] == ERROR]
        if errors:
            break
        assert time.time() < deadline, "no ERROR diagnostics within 5 s of killing the inference process"
        time.sleep(0.005)
    error = errors[0]
    assert f"pid {pid}" in error["message"] and "SIGKILL" in error["message"], error
    reaction = error["received"] - killed
    print(f"\n{what}: ERROR after {1000 * reaction:.0f} ms ({reaction / PERIOD:.1f} periods)")
    assert reaction <= 2 * PERIOD, f"{1000 * reaction:.0f} ms"
    return pid, killed, error


def test_dead_inference_process_is_reported_and_restarted(robot: Robot) -> None:
    """ERROR naming the process within 2 control periods, holds meanwhile, then a new process."""
    robot.publishing = True
    assert robot.transition("activate")
    pid, killed, error = kill_inference_process(robot, "inference process killed")
    assert "restarts (1 of 3)" in error["message"], error
    # the new process: control resumes with a different pid, diagnostics are no longer ERROR
    wait_until(
        lambda: moving_commands(robot, max(time.time() - 0.3, error["received"])) > 0,
        90.0,
        "control after the restart",
    )
    resumed_at = next(r for r, c in robot.commands_since(error["received"]) if not is_hold(c))
    print(f"control resumed {resumed_at - killed:.2f} s after the kill")
    held = [c for r, c in robot.commands_since(killed + PERIOD) if r < resumed_at]
    assert held and all(is_hold(c) for c in held), "the node must hold while the process is down"
    assert all(np.all(np.isfinite(c)) for _, c in robot.commands_since(resumed_at))

    def ok() -> list[dict]:
        with robot.lock:
            return [d for d in robot.diagnostics if d["received"] >= resumed_at and d["level"] == OK]

    wait_until(ok, 10.0, "OK diagnostics after the restart")  # WARN only while it holds
    report = ok()[0]
    print(f"diagnostics OK {report['received'] - killed:.2f} s after the kill")
    assert int(report["inference_pid"]) != pid and report["inference_restarts"] == "1", report


def assert_error_state(robot: Robot, pid: int, killed: float, error: dict) -> None:
    """The lifecycle error state after the death: errorprocessing, then unconfigured, only the safe
    command, silence, and the ERROR still naming the process."""
    wait_until(lambda: robot.state() == "unconfigured", 10.0, "the node to end in unconfigured")
    with robot.lock:
        goals = [label for r, label in robot.transitions if r >= killed]
    assert "errorprocessing" in goals and goals[-1] == "unconfigured", goals
    after = robot.commands_since(killed)
    assert after and is_hold(after[-1][1]), "the node must end with the safe command"
    assert all(is_hold(c) for r, c in after if r > error["received"]), "only the safe command after the death"
    time.sleep(0.5)
    assert not robot.commands_since(time.time() - 0.3), "no commands once unconfigured"
    still = robot.latest_diagnostics(time.time())
    assert still["level"] == ERROR and f"pid {pid}" in still["message"], still


@pytest.mark.parametrize("restarts", [1, 0])
def test_dead_inference_process_beyond_the_restart_limit_goes_to_the_error_state(
    robot: Robot, restarts: int
) -> None:
    """restarts=1: the one restart was used above; restarts=0: no restart at all."""
    robot.set_params(inference_restarts=restarts)
    if robot.state() == "inactive":  # configured again after the previous case
        assert robot.transition("activate")
    pid, killed, error = kill_inference_process(robot, f"inference_restarts={restarts}")
    assert f"restart limit inference_restarts={restarts} reached" in error["message"], error
    assert_error_state(robot, pid, killed, error)
    robot.set_params(inference_restarts=3)
    assert robot.transition("configure"), node_log(robot)  # back in service for the next test


def test_trajectory_commands_and_sigint(robot: Robot) -> None:
    assert robot.transition("cleanup")
    robot.set_params(
        command_type="trajectory",
        trajectory_joint_names=["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"],
    )
    assert robot.transition("configure"), node_log(robot)
    start = time.time()
    assert robot.transition("activate")

    def plans() -> list:
        with robot.lock:
            return [m for r, m in robot.trajectories if r >= start and len(m.points) > 1]

    # a trajectory carries the rest of the plan when a chunk covers now (see the normal path)
    wait_until(lambda: len(plans()) >= 5, 12.0, "5 trajectories with a plan")
    with robot.lock:
        received = [r for r, _ in robot.trajectories if r >= start]
    # one message per control period (at least half of them arrive on a loaded machine)
    assert len(received) - 1 >= 0.5 * (received[-1] - received[0]) * CONTROL_HZ
    for msg in plans():
        t0, dt, chunk, names = messages.joint_trajectory_to_chunk(msg)
        assert names[0] == "dx" and dt == pytest.approx(PERIOD) and t0 > start - 1
        assert np.all(np.isfinite(chunk)) and np.all(chunk >= np.array(ACTION_MIN) - 1e-12)
        assert np.all(chunk <= np.array(ACTION_MAX) + 1e-12)
        assert np.all(np.abs(np.diff(chunk, axis=0)) <= np.array(MAX_DELTA) + 1e-9)
    robot.process.send_signal(signal.SIGINT)
    assert robot.process.wait(timeout=10) == 0
    with robot.lock:
        final = robot.trajectories[-1][1]
    _, _, chunk, _ = messages.joint_trajectory_to_chunk(final)
    assert len(chunk) == 1 and np.all(chunk[0, :6] == 0), "SIGINT must end with the safe command"
    assert "shut down: sent the safe command" in node_log(robot)


def tiny_multitask_checkpoint(path: Path) -> Path:
    """An untrained multitask policy (tasks lift, pick_one; object padded to 5) saved as a checkpoint."""
    from robomosaic.data.normalizer import Normalizer
    from robomosaic.policies.denoising_policy import DenoisingPolicy

    task_set = TaskSet(("lift", "pick_one"), 5)
    obs_spec = task_set.adapt_spec({"eef": KeySpec((3,), "float64"), "object": KeySpec((3,), "float64")})
    action = KeySpec((7,), "float32", units="normalized [-1, 1]", description="OSC delta, gripper")
    stats = {
        k: {"min": -np.ones(n), "max": np.ones(n)} for k, n in (("eef", 3), ("object", 5), ("action", 7))
    }
    modes = {"eef": "minmax", "object": "minmax", "action": "minmax", "task_id": "identity"}
    config = {
        "unet": {"down_dims": [16, 32], "noise_embed_dim": 16},
        "encoder": {"state_feature_dim": 16, "state_hidden_dims": [32], "num_tasks": 2},
        "steps": 2,
    }
    policy = DenoisingPolicy(config, obs_spec, action, Normalizer(modes, stats))
    return policy.save(path, extra_spec={"task_set": task_set.to_dict(), "control_hz": CONTROL_HZ})


def test_multitask_task_from_a_string_topic(tmp_path: Path) -> None:
    """In this process (no subprocess): the task name on a String topic selects the task id, the
    object state is zero-padded as in training, and an unknown task name is rejected."""
    import rclpy
    from geometry_msgs.msg import PoseStamped
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from std_msgs.msg import Float64MultiArray, String

    from robomosaic.ros_nodes.policy_node import PolicyNode

    checkpoint = tiny_multitask_checkpoint(tmp_path / "mt")
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN)
    overrides = {
        "checkpoint": str(checkpoint),
        "observations.eef.topic": "/mt/eef",
        "observations.eef.type": "PoseStamped",
        "observations.eef.field": "position",
        "observations.object.topic": "/mt/object",
        "observations.object.type": "Float64MultiArray",
        "observations.task_id.topic": "/mt/task",
        "observations.task_id.type": "String",
        "command_type": "forward",
        "command_topic": "/mt/commands",
    }
    node = PolicyNode(
        "mt_policy",
        context=context,
        parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()],
    )
    probe = rclpy.create_node("mt_probe", context=context)
    commands: list[np.ndarray] = []
    probe.create_subscription(
        Float64MultiArray, "/mt/commands", lambda m: commands.append(np.asarray(m.data)), command_qos()
    )
    eef = probe.create_publisher(PoseStamped, "/mt/eef", sensor_qos())
    obj = probe.create_publisher(Float64MultiArray, "/mt/object", sensor_qos())
    task = probe.create_publisher(String, "/mt/task", command_qos())
    executor = MultiThreadedExecutor(num_threads=3, context=context)
    executor.add_node(node)
    executor.add_node(probe)
    spinner = BackgroundSpin(executor)
    try:
        from rclpy.lifecycle import TransitionCallbackReturn

        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, node.last_error
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS

        def publish_for(seconds: float) -> None:
            end = time.time() + seconds
            while time.time() < end:
                eef.publish(messages.pose_stamped_msg([0.1, 0.2, 0.3], [0, 0, 0, 1], "world", time.time()))
                obj.publish(messages.float64_array_msg([0.5, -0.5, 0.25]))
                time.sleep(PERIOD)

        # the probe must be matched with the node's command publisher first (discovery can take
        # longer than 0.5 s on a loaded machine)
        wait_until(lambda: commands or publish_for(0.1), 20.0, "the first command")
        publish_for(0.5)  # no task yet: nothing is offered to the policy
        assert node.chunk_executor.stats.chunks == 0 and commands and all(is_hold(c) for c in commands)
        task.publish(String(data="pick_one"))
        wait_until(lambda: node.chunk_executor.stats.chunks > 0 or publish_for(0.2), 20.0, "a chunk")
        newest = node.chunk_executor.history[-1]
        assert newest["task_id"] == 1 and np.array_equal(newest["object"], [0.5, -0.5, 0.25, 0.0, 0.0])
        bad = node._counts["bad_messages"]
        task.publish(String(data="door"))
        wait_until(lambda: node._counts["bad_messages"] > bad, 5.0, "the unknown task to be rejected")
        assert node.task == "pick_one"
    finally:
        spinner.close()
        node.destroy_node()
        probe.destroy_node()
        context.try_shutdown()
