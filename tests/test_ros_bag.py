"""A recording over real DDS into a rosbag2 MCAP bag, converted into a store: the sim node
(commanded stepping) driven by the policy node (the trained lift checkpoint) seed by seed by
robomosaic-ros-eval, recorded by robomosaic-bag-record in its own process. The converted store must
hold exactly the episodes robomosaic-ros-eval reports (seeds, lengths, success), and its steps the
observation each command was computed from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("rclpy")

from robomosaic.data.rosbag import convert_bags
from robomosaic.data.store import EpisodeStore
from robomosaic.ros_nodes.processes import node_output, start_lockstep_lift, start_node, stop_node

ROOT = Path(__file__).parents[1]
CHECKPOINT = ROOT / "tests" / "assets" / "lift_flow"
DOMAIN_ID = 23
EPISODES = 3
SEED_OFFSET = 1_000_000
COMMANDS = "/forward_command_controller/commands"
TOPICS = ["/eef_pose", "/joint_states", "/object_state", COMMANDS, "/sim/episode"]


def mapping(path: Path) -> Path:
    """config/sim_arm_policy.yaml with forward commands (policy node and action) and the sim's
    episode status: one file for the policy node and the converter."""
    doc = yaml.safe_load((ROOT / "config" / "sim_arm_policy.yaml").read_text())
    doc["policy"]["ros__parameters"].update(command_type="forward", command_topic=COMMANDS)
    doc["convert"]["ros__parameters"]["task"] = "lift"  # it converts forward commands and /sim/episode
    path.write_text(yaml.safe_dump(doc))
    return path


def wait_for(process: subprocess.Popen, text: str, count: int, timeout: float, *others) -> None:
    end = time.monotonic() + timeout
    while node_output(process).count(text) < count:
        logs = "\n".join(node_output(p)[-2000:] for p in (process, *others))
        assert process.poll() is None and time.monotonic() < end, logs
        time.sleep(0.1)


def test_bag_recorded_over_dds_converts_into_the_episodes_that_ran(tmp_path: Path) -> None:
    params = mapping(tmp_path / "mapping.yaml")
    sim, policy = start_lockstep_lift(params, CHECKPOINT, SEED_OFFSET, DOMAIN_ID)
    bag = tmp_path / "run"
    recorder = start_node(
        "bag_record", "-p", f"out:={bag}", "-p", f"topics:={json.dumps(TOPICS)}", domain=DOMAIN_ID
    )
    report = tmp_path / "ros_eval.json"
    try:
        wait_for(recorder, "subscribed", len(TOPICS), 90, policy, sim)
        driver = subprocess.run(
            [sys.executable, "-m", "robomosaic.ros_nodes.ros_eval", "--ros-args",
             "-p", f"episodes:={EPISODES}", "-p", f"seed_offset:={SEED_OFFSET}", "-p", f"out:={report}"],
            env={**os.environ, "ROS_DOMAIN_ID": str(DOMAIN_ID), "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert driver.returncode == 0, driver.stdout[-2000:] + driver.stderr[-2000:]
    finally:
        recorder_out = stop_node(recorder)
        stop_node(policy), stop_node(sim)
    assert "closed" in recorder_out, recorder_out[-2000:]
    ran = json.loads(report.read_text())["per_episode"]

    summary = convert_bags(bag, tmp_path / "store.zarr", params, progress=False)
    store = EpisodeStore.open(tmp_path / "store.zarr")
    # The policy node, active from its start, may step the sim's start-up episode before
    # robomosaic-ros-eval's first reset: the bag then holds that episode too, before the driven ones.
    assert EPISODES <= summary.episodes <= EPISODES + 1, (summary, ran)
    first = summary.episodes - EPISODES
    converted = [store.episode_meta(first + i) for i in range(EPISODES)]
    assert [m["seed"] for m in converted] == [r["seed"] for r in ran]
    assert [m["success"] for m in converted] == [r["success"] for r in ran]
    lengths = [len(store.episode(first + i, ["action"])["action"]) for i in range(EPISODES)]
    assert lengths == [r["steps"] for r in ran]
    assert any(r["success"] for r in ran), ran  # the checkpoint lifts (50/50 in process)
    from robomosaic.sim.tasks import make_task

    task = make_task("lift")
    for i, r in enumerate(ran):
        e = store.episode(first + i)
        assert np.all(np.isfinite(e["action"])) and np.abs(e["action"]).max() <= 1.0
        reset = task.reset(seed=r["seed"])  # the first step holds the seed's reset state
        for key in ("robot0_eef_pos", "robot0_gripper_qpos", "object"):
            np.testing.assert_allclose(e[key][0], reset[key], atol=1e-9, err_msg=key)
    print(f"bag over DDS: {summary}; ros-eval: {ran}")
