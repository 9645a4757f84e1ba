"""COMPASS stages 2 and 3: the frozen base, the residual specialist's start and its training loop;
the teachers' rollouts, the distilled generalist and its agreement with them; the stages' command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from robomosaic.data.store import EpisodeStore
from robomosaic.policies.compass.base import FrozenBase
from robomosaic.policies.compass.distill import GENERALIST_OBS_KEYS, agreement, record_teachers, teacher_seeds
from robomosaic.policies.compass.residual import (
    ResidualConfig,
    ResidualError,
    SpecialistPolicy,
    load_specialist,
    train_residual,
)
from robomosaic.policies.evaluate import load_checkpoint
from robomosaic.sim.mobility.embodiments import embodiment_embedding
from robomosaic.sim.mobility.env import MobilityEnv
from robomosaic.sim.mobility.rollout import RouteExpertPolicy, run_navigation

ROOT = Path(__file__).resolve().parents[1]
NAV_CHECKPOINT = ROOT / "tests" / "assets" / "nav_flow"
SEEDS = range(1_000_000, 1_000_006)


def _trajectories(policy_factory, embodiment: str) -> dict[int, dict[str, np.ndarray]]:
    env = MobilityEnv([embodiment] * 3, max_steps=60)
    return {e.seed: e.trajectory for e in run_navigation(env, SEEDS, policy_factory(3), record=True)}


def test_the_frozen_base_is_deterministic_whatever_the_number_of_worlds():
    policy, _ = load_checkpoint(NAV_CHECKPOINT)
    one = {e.seed: e.trajectory for e in run_navigation(MobilityEnv(["kaya"], max_steps=60), SEEDS,
                                                         FrozenBase(policy, 1), record=True)}  # fmt: skip
    three = _trajectories(lambda n: FrozenBase(policy, n), "kaya")
    for seed in SEEDS:
        np.testing.assert_allclose(one[seed]["action"], three[seed]["action"], atol=1e-5)


def test_the_residual_at_initialisation_reproduces_the_base_exactly(tmp_path):
    cfg = ResidualConfig(embodiment="kaya", worlds=4, iterations=0)
    train_residual(cfg, NAV_CHECKPOINT, tmp_path / "s0", progress=False)
    specialist = load_specialist(tmp_path / "s0")
    base = _trajectories(lambda n: FrozenBase(specialist.base, n), "kaya")
    composed = _trajectories(lambda n: SpecialistPolicy(specialist.base, specialist.actor, n), "kaya")
    for seed in SEEDS:
        assert np.array_equal(base[seed]["action"], composed[seed]["action"]), seed


def test_residual_training_logs_saves_and_resumes(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(NAV_CHECKPOINT, base)
    out = tmp_path / "kaya"
    cfg = ResidualConfig(embodiment="kaya", worlds=8, iterations=2, steps_per_env=16, save_every=1)
    train_residual(cfg, base, out, progress=False)
    first = load_specialist(out)
    assert json.loads((out / "residual.json").read_text())["iterations_done"] == 2
    assert list((out / "tb").iterdir()), "no TensorBoard events"
    # the updates moved the residual off zero
    assert any(p.abs().sum() > 0 for n, p in first.actor.mlp.named_parameters() if n.startswith("4."))

    cfg.iterations = 3  # resume: train one more iteration
    train_residual(cfg, base, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss_value"]) for r in rows)

    with pytest.raises(ResidualError, match="held out"):
        train_residual(ResidualConfig(embodiment="g1", worlds=2), base, tmp_path / "g1", progress=False)
    with pytest.raises(ResidualError, match="other settings"):
        train_residual(ResidualConfig(embodiment="kaya", worlds=4, iterations=4), base, out, progress=False)

    spec = json.loads((base / "spec.json").read_text())
    spec["provenance"]["host"] = "elsewhere"
    (base / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ResidualError, match="changed since training"):
        load_specialist(out)


def test_teachers_rollouts_are_recorded_per_embodiment_with_its_one_hot_and_resumed(tmp_path):
    teachers = {"carter": RouteExpertPolicy, "kaya": RouteExpertPolicy}
    store_path = tmp_path / "rollouts.zarr"
    first = record_teachers(teachers, store_path, episodes=2, worlds=2, seed=1, progress=False)
    assert {e: r["episodes"] for e, r in first.items()} == {"carter": 2, "kaya": 2}
    store = EpisodeStore.open(store_path)
    assert store.n_episodes == 4 and all(store.meta_array("success"))
    seeds = store.meta_array("seed")
    for k, name in enumerate(teachers):
        own = teacher_seeds(1, k, 2)
        episodes = [i for i, s in enumerate(seeds) if s in own]
        assert len(episodes) == 2
        for i in episodes:
            np.testing.assert_array_equal(store.episode(i)["embodiment"][0], embodiment_embedding(name))
    again = record_teachers(teachers, store_path, episodes=3, worlds=2, seed=1, progress=False)
    assert {e: (r["episodes"], r["recorded"]) for e, r in again.items()} == {"carter": (3, 1), "kaya": (3, 1)}
    assert EpisodeStore.open(store_path).n_episodes == 6


def test_the_compass_command_trains_distills_and_evaluates(tmp_path, capsys):
    """Toy sizes, the real stages: a specialist on carter (the nav_flow base reaches its goals
    there, so its rollouts can be recorded), the generalist trained on them, the evaluation."""
    from robomosaic.policies.compass.cli import main

    common = [
        f"out={tmp_path}",
        f"base.checkpoint={NAV_CHECKPOINT}",
        "residual.embodiments=[carter]",
        "progress=false",
    ]
    main(["residual", *common, "residual.config.worlds=4", "residual.config.iterations=1",
          "residual.config.steps_per_env=8"])  # fmt: skip
    assert (tmp_path / "residual" / "carter" / "s0" / "residual.safetensors").is_file()
    tiny = "distill.train=['policy=unet','flow=flow','policy.horizon=8','policy.n_action_steps=2'," \
        "'train.steps=20','train.eval_every=0','train.batch_size=16']"  # fmt: skip
    distill = [*common, "distill.episodes=3", "distill.worlds=3", "distill.agreement_episodes=2", tiny]
    main(["distill", *distill])
    folder = tmp_path / "distill" / "s0"
    _, spec = load_checkpoint(folder / "policy" / "best")
    assert list(spec["obs"]) == GENERALIST_OBS_KEYS
    agreement_report = json.loads((folder / "agreement.json").read_text())
    assert (
        agreement_report["carter"]["episodes"] == 2 and len(agreement_report["carter"]["abs_error_mean"]) == 3
    )
    main(["distill", *distill])  # done: nothing recorded or trained again
    assert EpisodeStore.open(folder / "rollouts.zarr").n_episodes == 3
    main(["eval", *common, "eval.episodes=3", "eval.worlds=3", "eval.embodiments=[carter,kaya]"])
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert sorted(report["arms"]) == ["base", "generalist s0", "specialist carter s0"]
    assert sorted(report["arms"]["generalist s0"]) == ["carter", "kaya"]
    assert report["arms"]["specialist carter s0"]["carter"]["episodes"] == 3
    kept = sorted(p.name for p in (tmp_path / "eval" / "arms").iterdir())
    assert kept == ["base.json", "generalist_s0.json", "specialist_carter_s0.json"]
    with pytest.raises(SystemExit, match="no imitation base"):
        main(["residual", f"out={tmp_path / 'empty'}"])


COMPASS_ASSETS = ROOT / "tests" / "assets" / "compass"  # base, two specialists, the generalist (README there)
AGREEMENT_SEEDS = range(2_000_000, 2_000_006)  # the distill stage's agreement seeds
AGREEMENT_TOLERANCE = 0.1  # m/s and rad/s: the mean |generalist - specialist| of any command dimension


@pytest.mark.parametrize("embodiment", ["kaya", "spot"])
def test_the_generalist_follows_each_specialist_on_its_own_episodes(embodiment):
    """The specialist drives; the distilled generalist, told the embodiment, sees the same
    observations. Its commands stay within AGREEMENT_TOLERANCE of the specialist's on average, and
    far closer than the imitation base's (which the specialist corrects)."""
    from robomosaic.policies.compass.cli import executor, specialist_runner

    specialist = specialist_runner(COMPASS_ASSETS / "residual" / embodiment / "s0")
    generalist, _ = load_checkpoint(COMPASS_ASSETS / "distill" / "s0" / "policy" / "best")
    base, _ = load_checkpoint(COMPASS_ASSETS / "base" / "policy" / "best")
    ours = agreement(specialist, executor(generalist), embodiment, AGREEMENT_SEEDS, worlds=6)
    reference = agreement(specialist, executor(base), embodiment, AGREEMENT_SEEDS, worlds=6)
    print(embodiment, "generalist", ours["abs_error_mean"], "base", reference["abs_error_mean"])
    assert ours["teacher_success_rate"] >= 0.5
    assert max(ours["abs_error_mean"]) <= AGREEMENT_TOLERANCE
    assert np.mean(ours["abs_error_mean"]) <= 0.5 * np.mean(reference["abs_error_mean"])
