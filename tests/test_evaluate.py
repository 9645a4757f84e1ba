"""robomosaic-eval: a policy in real robosuite through the chunk executor, reports, videos, checks."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from robomosaic.data.normalizer import Normalizer
from robomosaic.data.spec import KeySpec
from robomosaic.policies.checkpoint import load_policy
from robomosaic.policies.denoising_policy import DenoisingPolicy
from robomosaic.policies.evaluate import (
    EvaluationError,
    evaluate,
    load_checkpoint,
    main,
    summarize,
    task_spec,
)
from robomosaic.policies.rollout import ExecutorPolicy
from robomosaic.sim.experts import make_expert
from robomosaic.sim.measure_experts import wilson_interval
from robomosaic.sim.tasks import ACTION_SPEC
from robomosaic.sim.vector import run_episodes

SEED = 1_000_000


def lift_state_obs() -> dict[str, KeySpec]:
    """The state keys of make_task("lift").spec.obs (built once per process by task_spec)."""
    spec = task_spec("lift", (), 84)
    return {k: spec.obs[k] for k in spec.state_keys}


def tiny_policy(obs_spec=None) -> DenoisingPolicy:
    """An untrained DenoisingPolicy over lift's state keys (and any image keys in `obs_spec`)."""
    obs_spec = obs_spec or lift_state_obs()
    low = {
        "robot0_eef_pos": [-0.5, -0.5, 0.7],
        "robot0_eef_quat": [-1.0] * 4,
        "robot0_gripper_qpos": [-0.05] * 2,
        "object": [-1.5] * obs_spec["object"].shape[0],
        "action": [-1.0] * 7,
    }
    stats = {k: {"min": np.array(v), "max": np.array(v) + 2.0} for k, v in low.items()}
    modes = {k: "minmax" for k in stats} | {k: "image" for k, v in obs_spec.items() if v.is_image}
    config = {
        "horizon": 8,
        "n_obs_steps": 2,
        "n_action_steps": 4,
        "unet": {"down_dims": [32, 64], "noise_embed_dim": 32},
        "encoder": {"state_feature_dim": 32, "state_hidden_dims": [64]},
        "steps": 3,
    }
    torch.manual_seed(0)
    return DenoisingPolicy(config, obs_spec, ACTION_SPEC, Normalizer(modes, stats))


def save_tiny_policy(path, obs_spec=None, task: str | None = "lift"):
    return tiny_policy(obs_spec).save(path, extra_spec={"task": task} if task else None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I (Wilson).
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_known_values(successes, n, low, high):
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-4)


def test_cli_report_videos_and_delay(checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    argv = [f"checkpoint={checkpoint}", "episodes=2", "max_steps=10", "workers=1", "videos=1"]
    argv += ["inference_delay=0.1", f"out={out}", "progress=false"]
    main(argv)
    report = json.loads(out.read_text())
    assert report["command"].startswith("robomosaic-eval checkpoint=")
    assert report["task"] == "lift"
    assert report["checkpoint"]["path"] == str(checkpoint)
    assert report["checkpoint"]["provenance"]["git_commit"] is not None
    assert report["date"] and report["machine"]
    assert report["settings"]["seed_offset"] == SEED and report["settings"]["max_steps"] == 10
    episodes = report["per_episode"]
    assert [e["seed"] for e in episodes] == [SEED, SEED + 1]
    assert report["successes"] == sum(e["success"] for e in episodes)
    low, high = report["ci95"]
    assert 0.0 <= low <= report["success_rate"] <= high <= 1.0
    assert report["mean_length"] == np.mean([e["length"] for e in episodes])
    for e in episodes:
        # A 0.1 s delay is two 20 Hz periods: the episode starts with two holds (no chunk yet), and
        # each chunk arrives two periods after its observation, so its first two actions are late.
        assert e["held"] == {"no_chunk": 2}
        assert e["chunks"] >= 1
        assert e["dropped_actions"] == 2 * e["chunks"]
    assert report["executor"]["dropped_actions"] == sum(e["dropped_actions"] for e in episodes)
    assert report["executor"]["inference_ms"]["max"] > 0
    (video,) = report["videos"]
    assert video.endswith(f"lift_seed{SEED}.mp4")
    frames = imageio.mimread(video, format="FFMPEG", memtest=False)
    assert len(frames) == episodes[0]["length"] + 1  # the first observation and one per step


def test_same_seed_same_actions(checkpoint):
    """Each episode's sampling noise is seeded from its seed: running a seed twice repeats it exactly."""
    policy = load_policy(checkpoint)
    runner = ExecutorPolicy(policy, task_spec("lift", (), 84))
    results = run_episodes("lift", [SEED, SEED], runner, max_steps=8, record=True, progress=False)
    first, second = (r.trajectory["action"] for r in results)
    assert np.abs(first).max() > 0  # the policy moved the arm: the comparison is not vacuous
    np.testing.assert_array_equal(first, second)


ASSETS = Path(__file__).parent / "assets"


def test_results_do_not_depend_on_workers_batching_or_threads():
    """One in-process environment, two driven by threads, three in lock step (whose simultaneous
    replans are batched): the same episodes, action for action, from the trained lift policy."""
    policy, _ = load_checkpoint(ASSETS / "lift_flow")
    batch_sizes = collections.Counter()
    predict_chunks = policy.predict_chunks

    def counting(histories, committed, generators):
        batch_sizes[len(histories)] += 1
        return predict_chunks(histories, committed, generators)

    policy.predict_chunks = counting
    seeds = [1_000_000 + i for i in range(6)]
    runs = {}
    for n_envs, asynchronous in [(1, False), (2, True), (3, False)]:
        runner = ExecutorPolicy(policy, task_spec("lift", (), 84))
        runs[n_envs] = run_episodes(
            "lift", seeds, runner, n_envs=n_envs, record=True, progress=False, asynchronous=asynchronous
        )
    assert max(batch_sizes) > 1  # lock step on three environments did batch
    assert sum(r.success for r in runs[1]) >= 4  # real episodes of a trained policy
    for others in (runs[2], runs[3]):
        for a, b in zip(runs[1], others, strict=True):
            assert (a.seed, a.success, a.length) == (b.seed, b.success, b.length)
            np.testing.assert_array_equal(a.trajectory["action"], b.trajectory["action"])


def test_spec_mismatch_and_bad_arguments_are_rejected(tmp_path, checkpoint):
    wrong = save_tiny_policy(tmp_path / "wrong", {**lift_state_obs(), "object": KeySpec((9,), "float64")})
    with pytest.raises(EvaluationError, match=r"'object'.*\(9,\).*\(10,\)"):
        evaluate(wrong, episodes=1, workers=1, progress=False)
    with pytest.raises(SystemExit, match=r"'object'.*\(9,\).*\(10,\)"):
        main([f"checkpoint={wrong}", "episodes=1", "workers=1", f"out={tmp_path / 'x.json'}"])
    with pytest.raises(SystemExit, match="checkpoint folder .*missing.* does not exist"):
        main([f"checkpoint={tmp_path / 'missing'}", f"out={tmp_path / 'x.json'}"])
    with pytest.raises(EvaluationError, match="blend must be one of none, ensemble, rtc; got 'smooth'"):
        evaluate(checkpoint, episodes=1, blend="smooth")
    with pytest.raises(
        EvaluationError, match=r"n_action_steps=8 must be in \[1, horizon - n_obs_steps \+ 1 = 7\]"
    ):
        evaluate(checkpoint, episodes=1, n_action_steps=8)
    with pytest.raises(EvaluationError, match="seed_offset=5 may overlap"):
        evaluate(checkpoint, episodes=1, seed_offset=5)
    no_task = save_tiny_policy(tmp_path / "no_task", task=None)
    with pytest.raises(EvaluationError, match="names no task: pass task=<name>"):
        evaluate(no_task, episodes=1)
    with pytest.raises(EvaluationError, match="a policy object needs task=<name>"):
        evaluate(load_policy(checkpoint), episodes=1)
    assert not (tmp_path / "x.json").exists()


def test_image_policy_gets_its_camera(tmp_path):
    """A policy object with an agentview_image key: the task is built with that camera and size."""
    obs_spec = {**lift_state_obs(), "agentview_image": KeySpec((64, 64, 3), "uint8")}
    result = evaluate(tiny_policy(obs_spec), task="lift", episodes=1, workers=1, max_steps=3, progress=False)
    assert result["checkpoint"] is None and result["settings"]["cameras"] == ["agentview"]
    assert result["per_episode"][0]["length"] == 3 and result["executor"]["chunks"] == 1


class ExpertChunks:
    """A task's scripted expert as a chunk predictor: its action at the newest observation, repeated."""

    horizon, n_obs_steps, n_action_steps = 4, 2, 2

    def __init__(self, task: str) -> None:
        spec = task_spec(task, (), 84)
        self.obs_spec = {k: spec.obs[k] for k in spec.state_keys}
        self.expert = make_expert(task)

    def predict_chunk(self, history, committed=None, generator=None):
        action = self.expert({k: v[-1] for k, v in history.items()})
        return np.tile(action, (self.horizon, 1))


class ExpertExecutor(ExecutorPolicy):
    def reset(self, env_index, obs, seed):
        super().reset(env_index, obs, seed)
        self.policy.expert.reset(obs, np.random.default_rng([seed, 1]))


@pytest.mark.parametrize("task", ["lift", "pick_one"])
def test_scripted_chunks_through_the_executor_complete_the_task(task):
    """The executor path can finish a task: two actions per chunk, open loop in between."""
    runner = ExpertExecutor(ExpertChunks(task), task_spec(task, (), 84))
    results = run_episodes(task, [SEED, SEED + 1], runner, progress=False)
    assert all(r.success for r in results), [(r.seed, r.length) for r in results]
    for r in results:
        stats = runner.episode_stats[r.seed]
        assert stats.executor.chunks == (r.length + 1) // 2
        assert stats.executor.held == {} and stats.executor.dropped_actions == 0
    summary = summarize(results, runner)
    assert summary["success_rate"] == 1.0 and summary["executor"]["chunks"] == sum(
        (r.length + 1) // 2 for r in results
    )
    # pick_one names the cube it lifted: each success is counted under its colour.
    expected = {} if task == "lift" else collections.Counter(r.behaviour for r in results)
    assert summary["behaviours"] == expected
    assert task == "lift" or set(expected) <= {"red", "green", "blue"}
