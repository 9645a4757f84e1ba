"""RAPTOR evaluation: references, metrics on known controllers, torch vs MuJoCo, the probe, the CLI."""

import math

import numpy as np
import pytest
import torch
from test_raptor_distill import CascadedPDTeacher  # the test-only teacher (tests/ is on sys.path)

from robomosaic.policies.raptor import cli
from robomosaic.policies.raptor import evaluate as ev
from robomosaic.policies.raptor.distill import Lissajous, MlpStudent, TeacherController
from robomosaic.policies.raptor.export import NumpyStudent
from robomosaic.policies.raptor.student import RaptorStudent
from robomosaic.sim.quadrotor import dynamics
from robomosaic.sim.quadrotor.params import QuadrotorParams, preset

# short experiments: 3 s hover/wind (RMSE over the last 1 s), a small 5 s figure eight
FAST = ev.EvalConfig(
    n_vehicles=2,
    survival_episodes=2,
    hover_seconds=3.0,
    settle_seconds=2.0,
    figure_eight={"a": 0.5, "b": 0.25, "period": 5.0},
    mujoco_substeps=4,
)


class ZeroThrust:
    """A deliberately bad controller: all motors off."""

    def reset(self, n):
        pass

    def __call__(self, obs, privileged):
        return -torch.ones(obs.shape[0], 4)


def pd_factory(params: QuadrotorParams):
    teacher = CascadedPDTeacher(params)
    return lambda index: TeacherController(teacher, index)


def test_figure_eight_reference_shape_and_period():
    eight = Lissajous.figure_eight(1)
    for t, expected in [
        (0.0, (0, 0)),
        (5.0, (1.0, 0.0)),
        (10.0, (0, 0)),
        (15.0, (-1.0, 0.0)),
        (20.0, (0, 0)),
    ]:
        position, _ = eight.at(t)
        assert torch.allclose(position[0, :2], torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    times = torch.linspace(0, 20, 2001)
    path = torch.stack([eight.at(float(t))[0][0] for t in times])
    assert path[:, 0].abs().max() == pytest.approx(1.0, abs=1e-4)
    assert path[:, 1].abs().max() == pytest.approx(0.5, abs=1e-4)
    assert path[:, 2].abs().max() == 0
    # y goes through two periods while x goes through one (frequencies 1:2): a figure eight
    assert position[0, 1] == pytest.approx(0.0, abs=1e-5)
    assert [round(float(path[i, 1]), 3) for i in (250, 750, 1250, 1750)] == [0.5, -0.5, 0.5, -0.5]
    # the velocity is the derivative of the position
    _, velocity = eight.at(3.0)
    numeric = (eight.at(3.0 + 1e-3)[0] - eight.at(3.0 - 1e-3)[0]) / 2e-3
    assert torch.allclose(velocity, numeric, atol=1e-3)


def test_pooled_rmse():
    error = torch.tensor([[0.3, 0.3, 0.3], [3.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
    assert ev.pooled_rmse(error, torch.tensor([True, False, False])) == pytest.approx(0.3)
    assert ev.pooled_rmse(error, torch.tensor([True, False, True])) == pytest.approx(
        math.sqrt((0.27 + 3) / 6)
    )
    assert math.isnan(ev.pooled_rmse(error, torch.tensor([False, False, False])))


def test_metrics_on_a_good_and_a_bad_controller():
    params, _, groups = ev.eval_vehicles(2)
    gentle = ev.EvalConfig(**{**FAST.__dict__, "simulators": ("torch",)})
    good = ev.fly_experiments(pd_factory(params), params, gentle)
    summary = ev.summarize(good, gentle, torch.ones(len(params), dtype=torch.bool))
    assert summary["vehicles"] == 4 and summary["episodes"] == 8
    assert summary["survival"] == 1.0
    assert summary["hover_rmse"] < 0.1
    assert summary["figure_eight_runs"] == [4, 4]
    # RMSEs are against the reference: recompute the figure eight's from the raw trajectories
    reference = Lissajous.figure_eight(len(params), **gentle.figure_eight)
    targets = torch.stack([reference.at(t * dynamics.DEFAULT_DT)[0] for t in range(501)], dim=1)
    assert torch.allclose(good.figure_eight.targets, targets, atol=1e-5)
    manual = (good.figure_eight.states[..., :3] - targets).pow(2).sum(-1).mean().sqrt()
    assert summary["figure_eight_rmse"] == pytest.approx(float(manual), rel=1e-4)
    staying_put = targets.pow(2).sum(-1).mean().sqrt()  # the RMSE of hovering at the start instead
    assert summary["figure_eight_rmse"] < 0.8 * float(staying_put)
    # the wind pushes: this PD loop (no integral action, not told about the wind) settles downwind
    # at x = force / (mass w_p^2) = 0.1 g / 2^2 = 0.245 m, which the wind RMSE measures
    assert torch.allclose(good.wind.states[:, -1, 0], torch.tensor(0.1 * 9.81 / 4), rtol=0.1)
    assert summary["wind_rmse"] == pytest.approx(0.245, rel=0.1)
    # per-group summaries count only their vehicles
    preset_summary = ev.summarize(good, gentle, groups["x500"])
    assert preset_summary["vehicles"] == 1 and preset_summary["episodes"] == 2

    bad = ev.fly_experiments(lambda index: ZeroThrust(), params, gentle)
    crashed = ev.summarize(bad, gentle, torch.ones(len(params), dtype=torch.bool))
    assert (
        crashed["survival"] == 0.0 and math.isnan(crashed["hover_rmse"]) and crashed["hover_runs"] == [0, 8]
    )
    assert crashed["figure_eight_runs"] == [0, 4]


def test_mujoco_and_torch_evaluations_agree():
    params = preset("x500")
    config = ev.EvalConfig(**{**FAST.__dict__, "survival_episodes": 1, "mujoco_substeps": 10})
    results = {
        sim: ev.summarize(
            ev.fly_experiments(pd_factory(params), params, config, sim),
            config,
            torch.ones(1, dtype=torch.bool),
        )
        for sim in ("torch", "mujoco")
    }
    for metric in ("hover_rmse", "figure_eight_rmse", "wind_rmse"):
        a, b = results["torch"][metric], results["mujoco"][metric]
        assert abs(a - b) <= 0.002 + 0.05 * a, (metric, a, b)
    assert results["torch"]["survival"] == results["mujoco"]["survival"] == 1.0


def test_ridge_probe_recovers_a_linear_relation():
    rng = np.random.default_rng(0)
    w = rng.normal(size=16)
    x = rng.normal(size=(600, 16)) * rng.uniform(0.1, 10, size=16)
    y = x @ w + 2.5 + rng.normal(scale=0.01, size=600)
    weights, intercept = ev.fit_ridge(x[:400], y[:400], alpha=1e-6)
    assert ev.r_squared(y[400:], x[400:] @ weights + intercept) > 0.999
    assert ev.r_squared(y[400:], np.full(200, y[:400].mean())) < 0.01  # a constant explains nothing


def test_linear_probe_and_report(tmp_path):
    torch.manual_seed(0)
    params, names, groups = ev.eval_vehicles(1)
    # tiny experiments (1 s each): this test is about the bookkeeping, the tests above about the metrics
    tiny = {"hover_seconds": 1.0, "settle_seconds": 0.5, "figure_eight": {"a": 0.2, "b": 0.1, "period": 1.0}}
    config = ev.EvalConfig(
        **{
            **FAST.__dict__,
            "n_vehicles": 1,
            "survival_episodes": 1,
            "probe_start_seconds": 0.0,
            "probe_stride": 1,
            **tiny,
        }
    )
    teachers = CascadedPDTeacher(QuadrotorParams.cat([preset("crazyflie"), preset("x500")]))
    controllers = ev.standard_controllers(
        RaptorStudent(), MlpStudent(), teachers, CascadedPDTeacher(params), params
    )
    assert list(controllers) == [
        "student (GRU)",
        "MLP student",
        "nominal teacher (#0)",
        "own teacher (upper bound)",
    ]
    with pytest.raises(ValueError, match="own_teachers"):
        ev.standard_controllers(RaptorStudent(), None, None, teachers, params)
    result = ev.evaluate(controllers, params, groups, config, names, progress=False)
    own = result.metrics["own teacher (upper bound)"]
    assert own["torch"]["held-out"]["survival"] == own["mujoco"]["x500"]["survival"] == 1.0
    # the probe runs on a real (here untrained) student; with the vehicles' T/W it has something to fit
    fit = QuadrotorParams.cat([preset("crazyflie", 2), preset("x500", 2)])
    result.probe = ev.linear_probe(RaptorStudent(), fit, params, config)
    assert result.probe["vehicles_fit"] == 4 and result.probe["samples_test"] > 0
    path = ev.write_report(result, tmp_path, command="pytest")
    text = path.read_text()
    assert "| own teacher (upper bound) | mujoco |" in text and "## x500" in text and "R^2" in text
    # the targets section divides the student's hover RMSE by its own teacher's, per group and simulator
    student = result.metrics["student (GRU)"]["torch"]
    own = result.metrics["own teacher (upper bound)"]["torch"]
    ratio = student["x500"]["hover_rmse"] / own["x500"]["hover_rmse"]
    assert f"| x500 | torch | {100 * student['x500']['survival']:.1f}% | {ratio:.2f}x |" in text
    assert (tmp_path / "raptor_figure_eight.png").stat().st_size > 1000
    assert (tmp_path / "raptor_hover_recovery.png").stat().st_size > 1000
    assert (tmp_path / "raptor.json").is_file()


def test_cli_stages_say_what_to_run_first(tmp_path):
    out = tmp_path / "run"
    for stage, producer in [("distill", "train-teachers"), ("eval", "distill"), ("export", "distill")]:
        with pytest.raises(SystemExit, match=f"run `robomosaic-raptor {producer} out={out}` first"):
            cli.main([stage, f"out={out}", "progress=false"])
    with pytest.raises(SystemExit, match="unknown stage"):
        cli.main(["fly", f"out={out}"])


def test_cli_export(tmp_path):
    torch.manual_seed(0)
    student = RaptorStudent()
    student.save(tmp_path / "distill" / "student" / "final")
    cli.main(["export", f"out={tmp_path}"])
    folder = tmp_path / "export"
    for name in ("raptor_student.onnx", "raptor_policy.c", "raptor_policy.h"):
        assert (folder / name).stat().st_size > 0
    weights = dict(np.load(folder / "raptor_student_weights.npz", allow_pickle=False))
    obs = torch.randn(3, 22)
    expected, _ = student.step(obs)
    action, _ = NumpyStudent(weights).step(obs.numpy())
    np.testing.assert_allclose(action, expected.detach().numpy(), atol=1e-5)


@pytest.mark.slow
def test_cli_pipeline_end_to_end(tmp_path):
    pytest.importorskip(
        "robomosaic.policies.raptor.teachers",
        reason="the RL teachers (policies/raptor/teachers.py) are not on main yet",
    )
    out = tmp_path / "run"
    toy_teachers = [
        "teachers.config.envs_per_teacher=4",
        "teachers.config.total_steps=128",
        "+teachers.config.rollout_steps=16",
        "+teachers.config.minibatches=2",
        "+teachers.config.hidden=8",
    ]
    common = [f"out={out}", "progress=false"]
    toy_distill = ["distill.episodes_per_teacher=2", "distill.episode_steps=50", "distill.bc_epochs=1"]
    toy_distill += [
        "distill.dagger_iterations=1",
        "distill.dagger_episodes_per_teacher=1",
        "distill.dagger_epochs=1",
        "distill.trim.iterations=1",
        "distill.trim.vehicles=2",
        "distill.trim.episode_steps=20",
        "distill.trim.settle_steps=10",
    ]
    cli.main(["train-teachers", "teachers.n=2", *toy_teachers, *common])
    cli.main(["distill", *common, *toy_distill, "distill.batch_size=4"])
    tiny_eval = [
        "eval.n_vehicles=1",
        "eval.survival_episodes=1",
        "eval.hover_seconds=0.5",
        "eval.settle_seconds=0.2",
    ]
    tiny_eval += ["eval.figure_eight.period=0.5", "eval.probe_start_seconds=0", "eval.probe_stride=1"]
    cli.main(
        [
            "eval",
            *common,
            *toy_teachers,
            *tiny_eval,
            "eval.mujoco_substeps=2",
            f"report_dir={tmp_path / 'results'}",
        ]
    )
    cli.main(["export", *common])
    report = (tmp_path / "results" / "raptor.md").read_text()
    for controller in (
        "student (GRU)",
        "student, imitation only",
        "MLP student",
        "nominal teacher",
        "own teacher (upper bound)",
    ):
        assert f"| {controller}" in report
    assert (out / "eval_teachers").is_dir() and (out / "eval" / "raptor.json").is_file()
    assert (out / "export" / "raptor_policy.c").is_file()
    # a finished stage resumes instead of redoing its work
    before = (out / "distill" / "student" / "final" / "model.safetensors").read_bytes()
    cli.main(["distill", *common, *toy_distill, "distill.batch_size=4"])
    assert (out / "distill" / "student" / "final" / "model.safetensors").read_bytes() == before
