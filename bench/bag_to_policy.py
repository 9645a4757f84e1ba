"""From a rosbag2 MCAP recording over DDS to a policy that lifts: the interop acceptance run.

    python bench/bag_to_policy.py [--episodes 100] [--train-steps 2000] [--out runs/bag_to_policy]

1. robomosaic-sim-node (lift, commanded stepping) is driven by robomosaic-policy-node running the
   shipped lift checkpoint (tests/assets/lift_flow) as the operator, seed by seed through
   robomosaic-ros-eval (demonstration seeds 0..N-1), and robomosaic-bag-record writes every topic the
   mapping names into one MCAP bag, each process on its own over FastDDS.
2. robomosaic-convert turns the bag into a store with the mapping file (the same file configures
   the policy node), and the store is exported again to MCAP and converted back: every mapped key
   must be equal.
3. robomosaic-train trains a fresh U-Net flow policy on the converted store (the demo's settings) and
   robomosaic-eval evaluates it on 50 held-out seeds.
Writes docs/results/interop.md with the commands, counts, timings and the success rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).parents[1]

from robomosaic.data.rosbag import convert_bags, export_bag  # noqa: E402
from robomosaic.data.store import EpisodeStore  # noqa: E402
from robomosaic.ros_nodes.processes import node_output, start_lockstep_lift, start_node, stop_node  # noqa: E402
from robomosaic.sim.measure_experts import machine  # noqa: E402

DOMAIN = 41
COMMANDS = "/forward_command_controller/commands"
TOPICS = ["/eef_pose", "/joint_states", "/object_state", COMMANDS, "/sim/episode"]
BIN = Path(sys.executable).parent


def mapping(path: Path) -> Path:
    doc = yaml.safe_load((ROOT / "config" / "sim_arm_policy.yaml").read_text())
    doc["policy"]["ros__parameters"].update(command_type="forward", command_topic=COMMANDS)
    doc["convert"]["ros__parameters"]["task"] = "lift"  # it converts forward commands and /sim/episode
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(args: list[str], log: Path) -> float:
    print("$", " ".join(args), flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.call(args, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{args[0]} failed ({code}); see {log}")
    return time.perf_counter() - start


def record(out: Path, params: Path, episodes: int) -> tuple[Path, float]:
    bag = out / "bag"
    sim, policy = start_lockstep_lift(params, ROOT / "tests/assets/lift_flow", 0, DOMAIN)
    topics = f"topics:={json.dumps(TOPICS)}"
    recorder = start_node("bag_record", "-p", f"out:={bag}", "-p", topics, domain=DOMAIN)
    try:
        end = time.monotonic() + 120
        while node_output(recorder).count("subscribed") < len(TOPICS):
            if time.monotonic() > end:
                raise SystemExit(node_output(recorder) + node_output(policy))
            time.sleep(0.2)
        start = time.perf_counter()
        env = {**os.environ, "ROS_DOMAIN_ID": str(DOMAIN)}
        print(f"$ robomosaic-ros-eval episodes:={episodes} seed_offset:=0 (recording)", flush=True)
        subprocess.run(
            [str(BIN / "robomosaic-ros-eval"), "--ros-args", "-p", f"episodes:={episodes}",
             "-p", "seed_offset:=0", "-p", "allow_training_seeds:=true",
             "-p", f"out:={out / 'recording_eval.json'}"],
            env=env, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    finally:
        stop_node(recorder), stop_node(policy), stop_node(sim)
    return bag, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bag_to_policy")
    a = ap.parse_args()
    out = a.out
    if out.exists():
        raise SystemExit(f"{out} exists; remove it first")
    out.mkdir(parents=True)
    params = mapping(out / "mapping.yaml")
    started = time.perf_counter()
    bag, record_s = record(out, params, a.episodes)
    recorded = json.loads((out / "recording_eval.json").read_text())
    mcap_mb = sum(f.stat().st_size for f in bag.iterdir()) / 1e6

    t = time.perf_counter()
    summary = convert_bags(bag, out / "store.zarr", params)
    convert_s = time.perf_counter() - t
    store = EpisodeStore.open(out / "store.zarr")
    # the round trip store -> MCAP -> store on every mapped key
    export_bag(out / "store.zarr", out / "export", params)
    convert_bags(out / "export", out / "roundtrip.zarr", params)
    back = EpisodeStore.open(out / "roundtrip.zarr")
    keys = [*yaml.safe_load(params.read_text())["/**"]["ros__parameters"]["observations"], "action"]
    worst = max(
        float(np.abs(store.episode(i, [k])[k] - back.episode(i, [k])[k]).max())
        for i in range(store.n_episodes) for k in keys
    )  # fmt: skip
    assert back.n_episodes == store.n_episodes

    train_s = run(
        [str(BIN / "robomosaic-train"), "task=lift", "policy=unet", "flow=flow",
         f"dataset={out / 'store.zarr'}", f"out={out / 'policy'}", f"train.steps={a.train_steps}",
         "train.batch_size=128", "train.eval_every=500", "train.eval_episodes=10", "train.eval_workers=2",
         f"train.checkpoint_every={a.train_steps}", "optimizer.warmup_steps=200"],
        out / "train.log",
    )  # fmt: skip
    eval_s = run(
        [str(BIN / "robomosaic-eval"), f"checkpoint={out / 'policy' / 'best'}", f"episodes={a.eval_episodes}",
         "workers=2", "videos=0", f"out={out / 'eval.json'}"],
        out / "eval.log",
    )  # fmt: skip
    result = json.loads((out / "eval.json").read_text())
    lo, hi = result["ci95"]
    load = os.getloadavg()
    command = (
        f"python bench/bag_to_policy.py --episodes {a.episodes} --train-steps {a.train_steps} "
        f"--eval-episodes {a.eval_episodes}"
    )
    rows = [
        ("record over DDS (sim, policy, recorder, driver: 4 processes)",
         f"{a.episodes} episodes driven, {recorded['successes']} lifted; bag {mcap_mb:.1f} MB",
         f"{record_s:.0f} s"),
        ("convert the bag",
         f"{summary.episodes} episodes, {summary.steps} steps; ticks that were not steps: "
         f"{summary.skipped_ticks or 'none'}; topics skipped: {summary.skipped_topics or 'none'}",
         f"{convert_s:.1f} s"),
        ("store -> MCAP -> store",
         f"{back.n_episodes} episodes; largest difference on any mapped key ({', '.join(keys)}): "
         f"{worst:.1e}", ""),
        ("train a U-Net flow policy on the converted store", f"{a.train_steps} steps",
         f"{train_s / 60:.1f} min"),
        (f"evaluate on {a.eval_episodes} held-out seeds (from 1,000,000)",
         f"**{result['successes']}/{a.eval_episodes} ({result['success_rate']:.0%}), "
         f"95 % interval {lo:.2f}-{hi:.2f}**", f"{eval_s:.0f} s"),
    ]  # fmt: skip
    table = "\n".join(f"| {stage} | {what} | {wall} |" for stage, what, wall in rows)
    text = f"""# Interop: a rosbag2 MCAP recording over DDS trains a policy that lifts

Run {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} on {machine()}, load average at the end
{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, total {(time.perf_counter() - started) / 60:.1f} min:

```bash
{command}
```

The script runs the commands below; the mapping file is `config/sim_arm_policy.yaml` with forward
commands for the policy node and as the action, and a `convert` section naming the sim's episode
status topic (written to `{out.name}/mapping.yaml`).

```bash
robomosaic-sim-node --ros-args -r __node:=sim -p task:=lift -p step_mode:=commanded -p seed:=0
robomosaic-policy-node --ros-args -r __node:=policy --params-file mapping.yaml \\
    -p checkpoint:=tests/assets/lift_flow -p autostart:=true -p use_sim_time:=true -p inference:=simulated
robomosaic-bag-record --ros-args -p out:=bag -p topics:="{json.dumps(TOPICS)}"
robomosaic-ros-eval --ros-args -p episodes:={a.episodes} -p seed_offset:=0 -p allow_training_seeds:=true
robomosaic-convert input=bag out=store.zarr mapping=mapping.yaml
robomosaic-export store=store.zarr out=export mapping=mapping.yaml      # and converted back
robomosaic-train task=lift policy=unet flow=flow dataset=store.zarr train.steps={a.train_steps} ...
robomosaic-eval checkpoint=policy/best episodes={a.eval_episodes}
```

| stage | result | wall time |
|---|---|---|
{table}

The operator here is a trained policy rather than a person, so that the run needs nobody at a
keyboard; the path from the topics to the store is the one a teleoperated robot's bag takes.
Reading the table: the bag can hold one episode more than the driver ran: the policy node, active
from its start, steps the sim's start-up episode until the driver's first reset, and that episode
is in the recording too. "episode done" ticks are commands sent after the sim reported an episode
done (it ignores them); "after the robot's last step" are commands that reached the recorder before
the status saying the episode was done, dropped because the sim's status counts its steps. After
both rules every driven episode's length in the store equals the sim's own step count
(`tests/test_ros_bag.py` asserts it over DDS).
"""
    path = ROOT / "docs" / "results" / "interop.md"
    path.write_text(text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
