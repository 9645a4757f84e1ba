"""robomosaic-eval: success rate of a trained policy in simulation, run through the chunk executor.

    robomosaic-eval checkpoint=runs/lift/best episodes=50 workers=2 blend=none inference_delay=0.0 videos=2
    result = evaluate("runs/lift/best", episodes=50)          # the same from Python (train.py uses it)

Arguments are Hydra overrides of `conf/eval.yaml`. The json report (default
docs/results/eval_<name>.json) holds the command, the checkpoint's provenance, date, machine, the
success rate with its Wilson 95% interval, episode lengths, behaviour counts and executor statistics;
mp4s of the first `videos` episodes go next to it.

Seeds: episode i uses seed `seed_offset + i`. Demonstrations are collected from small consecutive
seeds starting at 0 (robomosaic-collect seed=0), so evaluation starts at 1,000,000 by default and
refuses offsets below MIN_SEED_OFFSET = 100,000 unless `allow_training_seeds`: a policy must not be
scored on the initial states it was trained on.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import json
import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from robomosaic.conf.console import RobomosaicError, console_script
from robomosaic.data.multitask import TaskSet
from robomosaic.data.spec import KeySpec
from robomosaic.policies.checkpoint import CheckpointError, load_policy
from robomosaic.policies.executor import Blend
from robomosaic.policies.rollout import ChunkPolicy, ExecutorPolicy, warm_up
from robomosaic.sim.measure_experts import machine, wilson_interval
from robomosaic.sim.tasks import TASKS, TaskSpec, make_task
from robomosaic.sim.vector import EpisodeResult, VectorTask, episodes_on
from robomosaic.sim.video import write_mp4

MIN_SEED_OFFSET = 100_000
VIDEO_CAMERA = "agentview"


class EvaluationError(RobomosaicError, ValueError):
    """Evaluation cannot start: the message names the parameter, checkpoint or observation key."""


def load_checkpoint(path: str | Path, backend: str = "auto") -> tuple[ChunkPolicy, dict[str, Any]]:
    """The policy of a checkpoint folder, on inference `backend` ("auto": the fast path; "eager"),
    and its spec.json (task, provenance, ...)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    policy = load_policy(path)  # verifies every file against the hashes in spec.json
    if hasattr(policy, "use_backend"):  # the denoising policies and compositions of them
        policy.use_backend(backend)
    return policy, json.loads((path / "spec.json").read_text())


def cameras_of(obs_spec: Mapping[str, KeySpec]) -> tuple[tuple[str, ...], int]:
    """The cameras (and their square image size) that a policy's `<camera>_image` keys need."""
    images = {k: v for k, v in obs_spec.items() if v.is_image and k.endswith("_image")}
    sizes = {v.shape[0] for v in images.values()}
    if len(sizes) > 1:
        raise EvaluationError(f"the policy's image keys have different sizes: {images}")
    return tuple(k.removesuffix("_image") for k in images), sizes.pop() if sizes else 84


@functools.lru_cache(maxsize=8)
def task_spec(task: str, cameras: tuple[str, ...], image_size: int) -> TaskSpec:
    """A task's spec, from a task built once per process (train.py evaluates many times)."""
    built = make_task(task, cameras=cameras, image_size=image_size)
    try:
        return built.spec
    finally:
        built.close()


def check_spec(policy: ChunkPolicy, spec: TaskSpec) -> None:
    """Every observation key the policy reads exists in the task with the same shape; same action."""
    for key, expected in policy.obs_spec.items():
        if key not in spec.obs:
            raise EvaluationError(
                f"the policy observes {key!r}, which task {spec.name!r} does not provide "
                f"(it provides {sorted(spec.obs)})"
            )
        if tuple(spec.obs[key].shape) != tuple(expected.shape):
            raise EvaluationError(
                f"observation {key!r}: the policy expects shape {tuple(expected.shape)}, "
                f"task {spec.name!r} provides {tuple(spec.obs[key].shape)}"
            )
    action = getattr(policy, "action_spec", None)
    if action is not None and tuple(action.shape) != tuple(spec.action.shape):
        raise EvaluationError(
            f"action: the policy outputs shape {tuple(action.shape)}, task {spec.name!r} takes "
            f"{tuple(spec.action.shape)}"
        )


def evaluate(
    policy_or_checkpoint: ChunkPolicy | str | Path,
    task: str | None = None,
    episodes: int = 50,
    seed_offset: int = 1_000_000,
    workers: int = 2,
    blend: Blend = "none",
    n_action_steps: int | None = None,
    inference_delay: float = 0.0,
    video_episodes: int = 0,
    video_dir: str | Path | None = None,
    video_size: int = 128,
    max_steps: int | None = None,
    seed: int = 0,
    allow_training_seeds: bool = False,
    torch_threads: int | None = 1,
    progress: bool = True,
    task_set: TaskSet | None = None,
    record_store: str | Path | None = None,
    backend: str = "auto",
    asynchronous: bool = True,
) -> dict[str, Any]:
    """Run `episodes` episodes (seeds seed_offset + i) through `ExecutorPolicy`; a json-ready summary.

    A checkpoint path names its task in spec.json ("task"); a policy object needs `task=`. A
    multitask policy (its checkpoint's "task_set", or `task_set=` for a policy object) sees the
    task's observation adapted by its task set, and needs `task=` one of its tasks.
    `record_store`: also write every episode (observations, actions, rewards, states) into a new store
    there, as robomosaic-collect records demonstrations. `backend` is a checkpoint's inference
    backend ("auto": the fast path, docs/design.md; "eager": plain PyTorch). `asynchronous`: the
    policy works while other environments step (`sim.vector.iter_episodes`; False: lock step).
    `seed` seeds the policy's sampling noise (with each episode's seed). `torch_threads` is torch's
    thread count during the rollouts (restored afterwards; None leaves it): batch-1 inference beside
    simulator workers loses more to contention than it gains from threads (on a 2-core machine
    27 ms per chunk with 1 thread, 161 ms with 2).
    """
    start = time.perf_counter()
    checkpoint: dict[str, Any] | None = None
    if isinstance(policy_or_checkpoint, (str, Path)):
        policy, spec_json = load_checkpoint(policy_or_checkpoint, backend)
        checkpoint = {
            "path": str(policy_or_checkpoint),
            "policy_class": spec_json.get("policy_class"),
            "task": spec_json.get("task"),
            "provenance": spec_json.get("provenance"),
        }
        task = task or spec_json.get("task")
        if task_set is None and spec_json.get("task_set"):
            task_set = TaskSet.from_dict(spec_json["task_set"])
        if task is None:
            raise EvaluationError(
                f"{Path(policy_or_checkpoint) / 'spec.json'} names no task: pass task=<name>"
            )
    else:
        policy = policy_or_checkpoint
        if task is None:
            raise EvaluationError("evaluate: a policy object needs task=<name>")
    if task_set is not None and task not in task_set.tasks:
        raise EvaluationError(f"a multitask policy needs task= one of {list(task_set.tasks)}, got {task!r}")
    if task not in TASKS:
        raise EvaluationError(f"unknown task {task!r}; registered tasks: {sorted(TASKS)}")
    if episodes < 1 or workers < 1:
        raise EvaluationError(f"episodes and workers must be >= 1, got {episodes}, {workers}")
    if seed_offset < MIN_SEED_OFFSET and not allow_training_seeds:
        raise EvaluationError(
            f"seed_offset={seed_offset} may overlap the seeds demonstrations were collected with "
            f"(0, 1, 2, ...); use seed_offset >= {MIN_SEED_OFFSET} or allow_training_seeds=True"
        )
    video_episodes = min(int(video_episodes), episodes)
    if video_episodes > 0 and video_dir is None:
        raise EvaluationError("video_episodes > 0 needs a video_dir")

    cameras, image_size = cameras_of(policy.obs_spec)
    seeds = [seed_offset + i for i in range(episodes)]
    threads = torch.get_num_threads()
    # The workers build their tasks (a second or two each) while this process warms the policy up.
    vec = VectorTask(task, min(workers, episodes), cameras, image_size, max_steps)
    try:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        warm_up(policy)
        spec = vec.spec
        adapter = None
        if task_set is not None:
            spec = dataclasses.replace(spec, obs=task_set.adapt_spec(spec.obs))
            adapter = functools.partial(task_set.adapt, task=task)
        check_spec(policy, spec)  # before any episode starts
        try:
            runner = ExecutorPolicy(
                policy,
                spec,
                blend=blend,
                n_action_steps=n_action_steps,
                inference_delay=inference_delay,
                seed=seed,
                obs_adapter=adapter,
            )
        except ValueError as e:  # blend, n_action_steps or inference_delay out of range
            raise EvaluationError(str(e)) from None
        common = {"record": record_store is not None, "progress": progress, "asynchronous": asynchronous}
        results: list[EpisodeResult] = []
        if video_episodes:
            results += episodes_on(
                vec,
                seeds[:video_episodes],
                runner,
                video_camera=VIDEO_CAMERA,
                video_size=video_size,
                **common,
            )
        if episodes > video_episodes:
            results += episodes_on(vec, seeds[video_episodes:], runner, **common)
    finally:
        vec.close()
        torch.set_num_threads(threads)
    check_some_chunk_finite(
        results, runner, f"{checkpoint['path'] if checkpoint else 'the policy'} on {task}"
    )
    if record_store is not None:
        _store_rollouts(record_store, task, cameras, image_size, results, spec.control_hz)
    videos = [
        str(write_mp4(Path(video_dir) / f"{task}_seed{r.seed}.mp4", r.frames, fps=spec.control_hz))
        for r in results[:video_episodes]
    ]
    summary = summarize(results, runner)
    return {
        "task": task,
        "checkpoint": checkpoint,
        "settings": {
            "episodes": episodes,
            "seed_offset": seed_offset,
            "seed": seed,
            "workers": workers,
            "blend": blend,
            "n_action_steps": runner.config.n_action_steps,
            "inference_delay": float(inference_delay),
            "max_steps": max_steps or TASKS[task].max_steps,
            "cameras": list(cameras),
            "torch_threads": torch.get_num_threads() if torch_threads is None else torch_threads,
            "backend": backend,
            "asynchronous": asynchronous,
        },
        **summary,
        "videos": videos,
        "wall_time_s": time.perf_counter() - start,
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "machine": machine(),
    }


def _store_rollouts(
    path: str | Path,
    task: str,
    cameras: Sequence[str],
    image_size: int,
    results: Sequence[EpisodeResult],
    hz: float,
) -> None:
    from robomosaic.data.collect import dataset_spec
    from robomosaic.data.store import EpisodeStore
    from robomosaic.sim.tasks import make_task

    store = EpisodeStore.create(path, dataset_spec(make_task(task, cameras=cameras, image_size=image_size)))
    for r in results:
        meta = {
            "seed": r.seed,
            "success": r.success,
            "task": task,
            "behaviour": "policy",
            "duration": r.length / hz,
        }
        store.append_episode(r.trajectory, meta)


def check_some_chunk_finite(results: Sequence[EpisodeResult], runner: ExecutorPolicy, what: str) -> None:
    """A policy that never produced a finite chunk was never evaluated (the executor held safely in
    every step): an EvaluationError, not a success rate of 0."""
    stats = [runner.episode_stats[r.seed].executor for r in results]
    if sum(s.chunks for s in stats) == 0:
        raise EvaluationError(
            f"{what}: no finite action chunk in {len(results)} episode(s): "
            f"{sum(s.rejected_chunks for s in stats)} chunk(s) held NaN or inf and were refused, "
            "the executor held in every step"
        )


def summarize(results: Sequence[EpisodeResult], runner: ExecutorPolicy) -> dict[str, Any]:
    """Success rate with its Wilson interval, lengths, behaviours, executor statistics."""
    n = len(results)
    successes = sum(r.success for r in results)
    low, high = wilson_interval(successes, n)
    lengths = [r.length for r in results]
    stats = [runner.episode_stats[r.seed] for r in results]
    held: collections.Counter[str] = collections.Counter()
    for s in stats:
        held.update(s.executor.held)
    latencies = 1000 * np.array([t for s in stats for t in s.inference_seconds])
    return {
        "successes": successes,
        "success_rate": successes / n,
        "ci95": [low, high],
        "mean_length": float(np.mean(lengths)),
        "median_length": float(np.median(lengths)),
        "behaviours": dict(sorted(collections.Counter(r.behaviour for r in results if r.behaviour).items())),
        "failed_seeds": [r.seed for r in results if not r.success],
        "executor": {
            "held": dict(sorted(held.items())),
            "rejected_chunks": sum(s.executor.rejected_chunks for s in stats),
            "dropped_actions": sum(s.executor.dropped_actions for s in stats),
            "deadline_misses": sum(s.executor.deadline_misses for s in stats),
            "chunks": sum(s.executor.chunks for s in stats),
            "inference_ms": {
                "mean": float(latencies.mean()),
                "median": float(np.median(latencies)),
                "p95": float(np.percentile(latencies, 95)),
                "max": float(latencies.max()),
            }
            if latencies.size
            else None,
        },
        "per_episode": [
            {
                "seed": r.seed,
                "success": r.success,
                "length": r.length,
                "behaviour": r.behaviour,
                **s.to_dict(),
            }
            for r, s in zip(results, stats, strict=True)
        ],
    }


def summary_table(result: Mapping[str, Any]) -> str:
    s, ex = result["settings"], result["executor"]
    latency = ex["inference_ms"]
    rows = [
        ("task", result["task"]),
        ("episodes", f"{s['episodes']} (seeds {s['seed_offset']}..{s['seed_offset'] + s['episodes'] - 1})"),
        (
            "success",
            f"{result['success_rate']:.0%} ({result['successes']}/{s['episodes']}), "
            f"95% CI [{result['ci95'][0]:.2f}, {result['ci95'][1]:.2f}]",
        ),
        ("length", f"mean {result['mean_length']:.1f}, median {result['median_length']:.0f} steps"),
        ("behaviours", ", ".join(f"{k}: {v}" for k, v in result["behaviours"].items()) or "-"),
        (
            "executor",
            f"blend={s['blend']}, n_action_steps={s['n_action_steps']}, delay={s['inference_delay']} s",
        ),
        (
            "holds / dropped / misses",
            f"{sum(ex['held'].values())} {ex['held'] or ''}".strip() + f" / {ex['dropped_actions']} "
            f"/ {ex['deadline_misses']}",
        ),
        (
            "inference",
            f"{ex['chunks']} chunks, {latency['mean']:.1f} ms mean, {latency['p95']:.1f} ms p95"
            if latency
            else "-",
        ),
        ("wall time", f"{result['wall_time_s']:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def default_name(checkpoint: Path) -> str:
    """runs/lift/best -> lift_best: the run folder and the checkpoint name."""
    parts = checkpoint.resolve().parts[-2:]
    return "_".join(parts)


def checkpoint_task_set(checkpoint: Path) -> TaskSet | None:
    """The task set a multitask checkpoint was trained on (None for a single-task one)."""
    try:
        spec_json = json.loads((checkpoint / "spec.json").read_text())
    except (OSError, ValueError):
        return None  # load_checkpoint reports what is wrong with the folder
    return TaskSet.from_dict(spec_json["task_set"]) if spec_json.get("task_set") else None


def checkpoint_task(checkpoint: Path, cfg: DictConfig) -> str | None:
    """task= if given, else the task named in the checkpoint's spec.json (None if unreadable)."""
    if cfg.get("task"):
        return str(cfg.task.name)
    try:
        return json.loads((checkpoint / "spec.json").read_text()).get("task")
    except (OSError, ValueError):
        return None  # evaluate() reports the unreadable checkpoint with its own message


def _evaluate_navigation(cfg: DictConfig, checkpoint: Path, out: Path, argv: list[str]) -> None:
    """robomosaic-eval of a navigation checkpoint: each embodiment of `embodiments` (default the
    task config's embodiment), `workers` worlds stepped together."""
    from robomosaic.policies.evaluate_navigation import evaluate_navigation, summary_lines

    embodiments = (
        list(cfg.embodiments)
        if cfg.embodiments
        else [str(cfg.task.embodiment) if cfg.get("task") else "carter"]
    )
    report = evaluate_navigation(
        checkpoint,
        embodiments,
        episodes=int(cfg.episodes),
        seed_offset=int(cfg.seed_offset),
        worlds=int(cfg.workers),
        seed=int(cfg.seed),
        n_action_steps=cfg.n_action_steps,
        backend=cfg.backend,
        torch_threads=cfg.torch_threads,
        progress=cfg.progress,
    )
    print("\n".join(summary_lines(report)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": shlex.join(["robomosaic-eval", *argv]), **report}, indent=2) + "\n")
    print(f"wrote {out}")


@console_script("robomosaic-eval")
def main(argv: list[str]) -> None:
    """robomosaic-eval; a multitask checkpoint without task= is evaluated on each of its tasks."""
    from robomosaic.conf import compose

    cfg = compose("eval", argv)
    checkpoint = Path(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else Path("docs/results") / f"eval_{default_name(checkpoint)}.json"
    if checkpoint_task(checkpoint, cfg) == "nav":
        return _evaluate_navigation(cfg, checkpoint, out, argv)
    video_dir = Path(cfg.video_dir) if cfg.video_dir else out.with_name(f"{out.stem}_videos")
    task = cfg.task.name if cfg.get("task") else None
    max_steps = cfg.max_steps if cfg.max_steps is not None else (cfg.task.max_steps if task else None)
    task_set = checkpoint_task_set(checkpoint) if task in (None, "multitask") else None
    tasks = list(task_set.tasks) if task_set else [task]
    results = {}
    for name in tasks:
        recorded = out.with_name(f"{out.stem}_{name}_episodes.zarr") if cfg.record_mcap else None
        results[name] = evaluate(
            checkpoint,
            task=name,
            episodes=cfg.episodes,
            seed_offset=cfg.seed_offset,
            workers=cfg.workers,
            blend=cfg.blend,
            n_action_steps=cfg.n_action_steps,
            inference_delay=cfg.inference_delay,
            video_episodes=cfg.videos,
            video_dir=video_dir,
            video_size=cfg.video_size,
            max_steps=max_steps,
            seed=cfg.seed,
            allow_training_seeds=cfg.allow_training_seeds,
            torch_threads=cfg.torch_threads,
            progress=cfg.progress,
            record_store=recorded,
            backend=cfg.backend,
            asynchronous=cfg.asynchronous,
        )
        print(summary_table(results[name]))
        if recorded is not None:
            from robomosaic.data.rosbag import export_bag, sim_arm_mapping

            bag = out.with_name(f"{out.stem}_{name}_mcap")
            mapping = cfg.record_mapping or sim_arm_mapping()
            export_bag(recorded, bag, mapping, progress=cfg.progress)
            results[name]["recorded"] = {"store": str(recorded), "mcap": str(bag), "mapping": str(mapping)}
            print(f"wrote the episodes to {recorded} and {bag} (MCAP, mapping {mapping})")
    command = shlex.join(["robomosaic-eval", *argv])
    if task_set:
        mean = float(np.mean([r["success_rate"] for r in results.values()]))
        report = {
            "command": command,
            "task_set": task_set.to_dict(),
            "mean_success_rate": mean,
            "tasks": results,
        }
        print(f"mean success over {len(tasks)} tasks: {mean:.1%}")
    else:
        report = {"command": command, **results[tasks[0]]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for result in results.values():
        for video in result["videos"]:
            print(f"wrote {video}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
