"""A composed (GPC) checkpoint drives the simulated arm over real DDS: sim_arm_policy.launch.xml
through robomosaic-launch, the sim node and the policy node in their own processes, the policy
node loading a `ComposedPolicy` of the two shipped GPC lift parents (tests/assets/gpc_lift).

The arm starts about 17 cm above the cube; the test passes when the end effector, as the sim node
publishes it on /eef_pose, has come down by more than 5 cm toward it under the policy's commands.
ROS_DOMAIN_ID 18.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")

from robomosaic.policies.checkpoint import load_policy
from robomosaic.policies.composition import ComposedPolicy
from robomosaic.ros_nodes import processes as ros_processes

DOMAIN = 18
ASSETS = Path(__file__).parent / "assets" / "gpc_lift"


@pytest.fixture
def observer():
    import rclpy

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN)
    node = rclpy.create_node("composed_test_observer", context=context)
    executor = rclpy.executors.SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        yield node, executor
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


def test_composed_checkpoint_drives_the_sim_arm_through_the_launch_file(observer, tmp_path):
    from geometry_msgs.msg import PoseStamped
    from trajectory_msgs.msg import JointTrajectory

    from robomosaic.ros_nodes.common import command_qos, sensor_qos

    parents = [load_policy(ASSETS / "unet"), load_policy(ASSETS / "transformer")]
    checkpoint = ComposedPolicy(parents, [0.5, 0.5], names=["unet", "transformer"]).save(
        tmp_path / "composed", [ASSETS / "unet", ASSETS / "transformer"], task="lift"
    )
    node, executor = observer
    heights, commands = [], []
    node.create_subscription(
        PoseStamped, "/eef_pose", lambda m: heights.append(m.pose.position.z), sensor_qos()
    )
    node.create_subscription(
        JointTrajectory, "/joint_trajectory_controller/joint_trajectory", commands.append, command_qos()
    )
    process = ros_processes.start_process(
        [sys.executable, "-m", "robomosaic.ros_nodes.launch", "sim_arm_policy.launch.xml",
         f"checkpoint:={checkpoint}", "task:=lift"], DOMAIN,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        descended = lambda: heights and max(heights[:20]) - min(heights) > 0.05  # noqa: E731
        while time.monotonic() < deadline and not (commands and descended()):
            assert process.poll() is None, ros_processes.node_output(process)[-4000:]
            executor.spin_once(timeout_sec=0.1)
        output = ros_processes.node_output(process)
        assert heights, f"no /eef_pose from the simulated arm:\n{output[-4000:]}"
        assert commands, f"no trajectory commands from the policy node:\n{output[-4000:]}"
        assert descended(), (
            f"the arm did not come down toward the cube: z {heights[0]:.3f} -> {min(heights):.3f}"
        )
        assert all(np.isfinite(p.positions).all() for c in commands for p in c.points)
        assert "ComposedPolicy" in output
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, ros_processes.node_output(process)[-4000:]
