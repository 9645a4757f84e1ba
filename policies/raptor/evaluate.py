"""Evaluate RAPTOR controllers on held-out quadrotors in two simulators; the hidden-state probe; the report.

Vehicles: ``n`` quadrotors from ``sample_params`` with a seed disjoint from the teachers' (reported
evaluations start at 1,000,000, docs/design.md) plus both presets, all without the sampler's random
disturbance force (wind is its own metric). Simulators: the batched torch RK4 simulator, and MuJoCo
(``MujocoQuadrotor``, an independent integrator) stepped one vehicle at a time.

Metrics (a vehicle "terminates" as in dynamics.terminated: leaves the 5 m box around its reference,
goes faster than 10 m/s or spins faster than 35 rad/s, or its state goes non-finite):

- survival: fraction of episodes from random initial states (RAPTOR's init_90_deg: tilt up to 90
  degrees, velocity and body rates up to 1 m/s / 1 rad/s, position within 0.5 m of the target)
  that never terminate in ``hover_seconds``;
- hover RMSE: root mean square distance to the target over the last ``hover_seconds -
  settle_seconds`` of those episodes that survived (pooled over steps and episodes);
- figure-eight RMSE: x = A sin(w t), y = B sin(2 w t), A = 1 m, B = 0.5 m, period 20 s, starting at
  rest on the curve (the origin), over one period; pooled over the runs that survived;
- wind RMSE: a constant world-frame force of ``wind_fraction`` x weight along +x, starting at rest at
  the target; RMSE over the same settled window as hover, over runs that survived.

Every RMSE is reported with how many runs it covers when some terminated.

Controllers (``standard_controllers``): the student; the student before its hover trim (the
ablation, when distillation trimmed it); the MLP student; one nominal teacher flying every
vehicle (the teacher whose vehicle is closest to the median teacher vehicle in log thrust-to-weight,
log mass and log torque-to-inertia); and each vehicle's own teacher, the upper bound. Held-out
vehicles have no teacher of their own, so that baseline needs an ensemble trained on exactly the
evaluation vehicles (``own_teachers``; the CLI trains it with ``eval.own_teachers=true``).

Linear probe (the paper's "emergent system identification"): ridge regression from the student's
GRU hidden state, sampled while it flies from random initial states, to the vehicle's
thrust-to-weight ratio; fitted on one set of vehicles (the teachers'), R^2 reported on another (the
held-out ones).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from robomosaic.conf import check_known_keys
from robomosaic.policies.raptor.distill import (
    Controller,
    Lissajous,
    Policy,
    PolicyController,
    Rollout,
    Simulator,
    Teacher,
    TeacherController,
    TorchSimulator,
    rollout,
)
from robomosaic.sim.quadrotor import dynamics
from robomosaic.sim.quadrotor.mujoco_model import MujocoQuadrotor
from robomosaic.sim.quadrotor.params import PRESETS, QuadrotorParams, preset, sample_params

EVAL_SEED = 1_000_000
OWN_TEACHER = "own teacher (upper bound)"  # the display name of the upper-bound baseline
METRICS = ("survival", "hover_rmse", "figure_eight_rmse", "wind_rmse")
ControllerFactory = Callable[[torch.Tensor], Controller]  # vehicle index (N,) into the eval set -> controller


class MujocoSimulator:
    """Vehicles in MuJoCo, one ``MujocoQuadrotor`` each, stepped one after the other."""

    def __init__(self, params: QuadrotorParams, dt: float = dynamics.DEFAULT_DT, substeps: int = 10) -> None:
        self.params = params
        self.dt = dt
        self.vehicles = [
            MujocoQuadrotor(params.select(i), dt=dt, substeps=substeps) for i in range(len(params))
        ]

    def reset(self, state: torch.Tensor) -> None:
        for vehicle, row in zip(self.vehicles, state.double().numpy(), strict=True):
            vehicle.reset(row)

    def advance(self, state: torch.Tensor, action: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        rows = state.clone()
        actions = action.double().numpy()
        for i in torch.nonzero(active).flatten().tolist():
            rows[i] = torch.from_numpy(self.vehicles[i].step(actions[i])).to(rows.dtype)
        return rows


SIMULATORS: dict[str, Callable[..., Simulator]] = {"torch": TorchSimulator, "mujoco": MujocoSimulator}


@dataclass
class EvalConfig:
    n_vehicles: int = 50  # held-out sampled vehicles (plus both presets)
    seed: int = EVAL_SEED
    simulators: tuple[str, ...] = ("torch", "mujoco")
    survival_episodes: int = 4  # random initial states per vehicle in torch
    mujoco_survival_episodes: int = 1  # the first of those in MuJoCo (keeps MuJoCo affordable)
    hover_seconds: float = 5.0
    settle_seconds: float = 3.0  # RMSE over [settle_seconds, hover_seconds]
    figure_eight: dict[str, float] = field(default_factory=lambda: {"a": 1.0, "b": 0.5, "period": 20.0})
    wind_fraction: float = 0.1  # constant force along +x, as a fraction of the vehicle's weight
    mujoco_substeps: int = 10
    probe_start_seconds: float = 1.0  # hidden states from this time on (the transient is identified first)
    probe_stride: int = 10
    probe_alpha: float = 1e-2

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvalConfig:
        check_known_keys(values, cls, "eval config")
        values = dict(values)
        if "simulators" in values:
            values["simulators"] = tuple(values["simulators"])
            bad = sorted(set(values["simulators"]) - set(SIMULATORS))
            if bad:
                raise KeyError(f"eval config: unknown simulators {bad}; known: {sorted(SIMULATORS)}")
        return cls(**values)

    @property
    def hover_steps(self) -> int:
        return round(self.hover_seconds / dynamics.DEFAULT_DT)

    @property
    def settle_step(self) -> int:
        return round(self.settle_seconds / dynamics.DEFAULT_DT)


# ---- vehicles and controllers ------------------------------------------------------------------
def eval_vehicles(
    n: int, seed: int = EVAL_SEED
) -> tuple[QuadrotorParams, list[str], dict[str, torch.Tensor]]:
    """``n`` sampled vehicles then the presets, without disturbance; names and group masks
    ("held-out", one per preset)."""
    sampled = sample_params(n, torch.Generator().manual_seed(seed))
    params = QuadrotorParams.cat([sampled, *(preset(name) for name in PRESETS)])
    params = params.replace(disturbance_force=[0.0, 0.0, 0.0])
    names = [f"sampled_{i}" for i in range(n)] + list(PRESETS)
    groups = {"held-out": torch.arange(len(params)) < n}
    for name in PRESETS:
        groups[name] = torch.tensor([v == name for v in names])
    return params, names, groups


def nominal_teacher_index(params: QuadrotorParams) -> int:
    """The vehicle closest to the median vehicle in standardized log T/W, log mass, log torque/inertia."""
    features = torch.stack(
        [params.thrust_to_weight.log(), params.mass.log(), params.torque_to_inertia.log()], dim=1
    ).double()
    z = (features - features.median(dim=0).values) / features.std(dim=0).clamp(min=1e-9)
    return int(z.norm(dim=1).argmin())


def standard_controllers(
    student: Policy,
    mlp: Policy | None = None,
    teachers: Teacher | None = None,
    own_teachers: Teacher | None = None,
    eval_params: QuadrotorParams | None = None,
    imitation_student: Policy | None = None,
) -> dict[str, ControllerFactory]:
    """The controllers of the report, by display name. ``own_teachers`` must fly exactly the
    evaluation vehicles (``eval_params``), teacher i on vehicle i. ``imitation_student`` is the
    student before the hover trim (the ablation)."""
    controllers: dict[str, ControllerFactory] = {"student (GRU)": lambda index: PolicyController(student)}
    if imitation_student is not None:
        controllers["student, imitation only"] = lambda index: PolicyController(imitation_student)
    if mlp is not None:
        controllers["MLP student"] = lambda index: PolicyController(mlp)
    if teachers is not None:
        k = nominal_teacher_index(teachers.params)
        controllers[f"nominal teacher (#{k})"] = lambda index: TeacherController(
            teachers, torch.full_like(index, k)
        )
    if own_teachers is not None:
        if eval_params is None or not _same_vehicles(own_teachers.params, eval_params):
            raise ValueError("own_teachers: its teachers' vehicles are not the evaluation vehicles")
        controllers[OWN_TEACHER] = lambda index: TeacherController(own_teachers, index)
    return controllers


def _same_vehicles(a: QuadrotorParams, b: QuadrotorParams) -> bool:
    if len(a) != len(b):
        return False
    return all(
        torch.allclose(getattr(a, f).double(), getattr(b, f).double(), rtol=1e-5, atol=1e-8)
        for f in ("mass", "inertia", "thrust_curve", "rotor_positions", "motor_time_constant_rising")
    )


# ---- metrics -----------------------------------------------------------------------------------
def pooled_rmse(error: torch.Tensor, keep: torch.Tensor) -> float:
    """RMS of ``error`` (E, T) over the episodes where ``keep`` (E,) is true (nan if none)."""
    if not keep.any():
        return math.nan
    return float(error[keep].double().pow(2).mean().sqrt())


@dataclass
class Flights:
    """The three experiments of one controller in one simulator (each a Rollout over its runs)."""

    hover: Rollout
    hover_vehicle: torch.Tensor  # (E,) vehicle index of each hover episode
    figure_eight: Rollout
    wind: Rollout


def fly_experiments(
    make_controller: ControllerFactory,
    params: QuadrotorParams,
    config: EvalConfig,
    simulator: str = "torch",
    episodes: int | None = None,
) -> Flights:
    """Random-start hover (``episodes`` per vehicle), the figure eight and the wind test."""
    n = len(params)
    episodes = config.survival_episodes if episodes is None else episodes
    make_sim = SIMULATORS[simulator]
    kwargs = {"substeps": config.mujoco_substeps} if simulator == "mujoco" else {}
    # Initial states depend only on the seed and vehicles, so every simulator and controller sees
    # the same ones; MuJoCo's fewer episodes are the first of torch's.
    vehicle = torch.arange(n).repeat(config.survival_episodes)
    initial = dynamics.sample_initial_state(
        params.select(vehicle), torch.Generator().manual_seed(config.seed + 1)
    )
    vehicle, initial = vehicle[: n * episodes], initial[: n * episodes]
    hover_params = params.select(vehicle)
    hover = rollout(
        make_sim(hover_params, **kwargs),
        make_controller(vehicle),
        initial,
        Lissajous.hover(len(vehicle), params.dtype),
        config.hover_steps,
    )
    index = torch.arange(n)
    eight = Lissajous.figure_eight(n, dtype=params.dtype, **config.figure_eight)
    figure_eight = rollout(
        make_sim(params, **kwargs),
        make_controller(index),
        dynamics.hover_state(params),
        eight,
        round(config.figure_eight["period"] / dynamics.DEFAULT_DT),
    )
    wind_force = torch.zeros(n, 3, dtype=params.dtype)
    wind_force[:, 0] = config.wind_fraction * params.weight
    windy = params.replace(disturbance_force=wind_force)
    wind = rollout(
        make_sim(windy, **kwargs),
        make_controller(index),
        dynamics.hover_state(windy),
        Lissajous.hover(n, params.dtype),
        config.hover_steps,
    )
    return Flights(hover, vehicle, figure_eight, wind)


def summarize(flights: Flights, config: EvalConfig, vehicles: torch.Tensor) -> dict[str, Any]:
    """Metrics over the vehicles where the bool mask ``vehicles`` (N,) is true."""
    settle = config.settle_step
    in_group = vehicles[flights.hover_vehicle]
    hover_ok = flights.hover.survived & in_group
    eight_ok = flights.figure_eight.survived & vehicles
    wind_ok = flights.wind.survived & vehicles
    return {
        "vehicles": int(vehicles.sum()),
        "episodes": int(in_group.sum()),
        "survival": float(flights.hover.survived[in_group].float().mean()),
        "hover_rmse": pooled_rmse(flights.hover.position_error()[:, settle:], hover_ok),
        "hover_runs": [int(hover_ok.sum()), int(in_group.sum())],
        "figure_eight_rmse": pooled_rmse(flights.figure_eight.position_error(), eight_ok),
        "figure_eight_runs": [int(eight_ok.sum()), int(vehicles.sum())],
        "wind_rmse": pooled_rmse(flights.wind.position_error()[:, settle:], wind_ok),
        "wind_runs": [int(wind_ok.sum()), int(vehicles.sum())],
    }


@dataclass
class EvalResult:
    config: EvalConfig
    vehicle_names: list[str]
    # metrics[controller][simulator][group] -> summarize(...)
    metrics: dict[str, dict[str, dict[str, dict[str, Any]]]]
    flights: dict[str, dict[str, Flights]]  # [controller][simulator]
    probe: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "vehicles": self.vehicle_names,
            "metrics": self.metrics,
            "probe": self.probe,
        }


def evaluate(
    controllers: dict[str, ControllerFactory],
    params: QuadrotorParams,
    groups: dict[str, torch.Tensor],
    config: EvalConfig,
    vehicle_names: list[str] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Every controller in every configured simulator; metrics per vehicle group."""
    metrics: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    flights: dict[str, dict[str, Flights]] = {}
    jobs = [(c, s) for c in controllers for s in config.simulators]
    for name, simulator in tqdm(jobs, desc="raptor eval", disable=not progress):
        episodes = config.mujoco_survival_episodes if simulator == "mujoco" else config.survival_episodes
        flown = fly_experiments(controllers[name], params, config, simulator, episodes)
        flights.setdefault(name, {})[simulator] = flown
        metrics.setdefault(name, {})[simulator] = {
            group: summarize(flown, config, mask) for group, mask in groups.items()
        }
    names = vehicle_names or [f"vehicle_{i}" for i in range(len(params))]
    return EvalResult(config, names, metrics, flights)


# ---- linear probe ------------------------------------------------------------------------------
def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Ridge regression on standardized features, in closed form (a 16-d problem: no library needed).
    Returns weights and intercept in the original feature units."""
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-8
    z = (x - mean) / std
    y_mean = float(y.mean())
    w = np.linalg.solve(z.T @ z + alpha * len(z) * np.eye(z.shape[1]), z.T @ (y - y_mean))
    weights = w / std
    return weights, y_mean - float(mean @ weights)


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination; nan when ``y`` does not vary (nothing to explain)."""
    total = float(((y - y.mean()) ** 2).sum())
    return math.nan if total == 0 else 1.0 - float(((y - predicted) ** 2).sum()) / total


def collect_hidden(
    student: Policy, params: QuadrotorParams, config: EvalConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states (M, H) of the student flying every vehicle from a random start, sampled every
    ``probe_stride`` steps after ``probe_start_seconds`` while alive, with the vehicle's T/W (M,)."""
    controller = PolicyController(student)
    initial = dynamics.sample_initial_state(params, torch.Generator().manual_seed(seed))
    flown = rollout(
        TorchSimulator(params), controller, initial, Lissajous.hover(len(params)), config.hover_steps
    )
    if flown.hidden is None:
        raise ValueError("collect_hidden: the policy has no hidden state (an MLP student?)")
    start = round(config.probe_start_seconds / dynamics.DEFAULT_DT)
    hidden = flown.hidden[:, start :: config.probe_stride]
    mask = flown.mask[:, start :: config.probe_stride]
    target = params.thrust_to_weight[:, None].expand(mask.shape)
    return hidden[mask].double().numpy(), target[mask].double().numpy()


def linear_probe(
    student: Policy, fit_params: QuadrotorParams, test_params: QuadrotorParams, config: EvalConfig
) -> dict[str, float]:
    """Ridge from hidden state to thrust-to-weight, fitted on flights of ``fit_params``; R^2 on
    flights of ``test_params``."""
    x_fit, y_fit = collect_hidden(student, fit_params, config, config.seed + 2)
    x_test, y_test = collect_hidden(student, test_params, config, config.seed + 3)
    if len(x_fit) < 2 or len(x_test) < 2:
        raise ValueError("linear_probe: too few surviving flights to fit or test the probe")
    weights, intercept = fit_ridge(x_fit, y_fit, config.probe_alpha)
    return {
        "r2_test": r_squared(y_test, x_test @ weights + intercept),
        "r2_fit": r_squared(y_fit, x_fit @ weights + intercept),
        "samples_fit": len(y_fit),
        "samples_test": len(y_test),
        "vehicles_fit": len(fit_params),
        "vehicles_test": len(test_params),
    }


# ---- report ------------------------------------------------------------------------------------
def _cell(summary: dict[str, Any], metric: str) -> str:
    if metric == "survival":
        return f"{100 * summary['survival']:.1f}%"
    value = summary[metric]
    ok, total = summary[metric.replace("_rmse", "_runs")]
    text = "—" if math.isnan(value) else f"{value:.3f}"
    return text if ok == total else f"{text} ({ok}/{total})"


def results_table(result: EvalResult, group: str) -> str:
    header = "| controller | simulator | survival | hover RMSE [m] | figure-eight RMSE [m] | wind RMSE [m] |"
    lines = [header, "|---|---|---|---|---|---|"]
    for controller, by_sim in result.metrics.items():
        for simulator, by_group in by_sim.items():
            cells = " | ".join(_cell(by_group[group], m) for m in METRICS)
            lines.append(f"| {controller} | {simulator} | {cells} |")
    return "\n".join(lines)


def target_lines(result: EvalResult, student: str) -> list[str]:
    """The issue's targets, read off the tables: survival >= 95 %, hover RMSE within 1.5x of the own
    teachers' (a section of the report; empty without own teachers)."""
    if OWN_TEACHER not in result.metrics:
        return []
    lines = ["## Targets: student survival >= 95 %, hover RMSE <= 1.5x own teacher", ""]
    lines += ["| group | simulator | survival | hover RMSE / own teacher's |", "|---|---|---|---|"]
    for simulator, by_group in result.metrics[student].items():
        for group, summary in by_group.items():
            own = result.metrics[OWN_TEACHER][simulator][group]["hover_rmse"]
            ratio = summary["hover_rmse"] / own if own > 0 else math.nan
            lines.append(f"| {group} | {simulator} | {100 * summary['survival']:.1f}% | {ratio:.2f}x |")
    return [*lines, ""]


def plot_figure_eight(result: EvalResult, controller: str, vehicles: list[int], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flights = result.flights[controller]
    fig, axes = plt.subplots(1, len(vehicles), figsize=(4 * len(vehicles), 3.2), squeeze=False)
    for ax, v in zip(axes[0], vehicles, strict=True):
        reference = next(iter(flights.values())).figure_eight.targets[v]
        ax.plot(reference[:, 0], reference[:, 1], "k--", lw=1, label="reference")
        for simulator, flown in flights.items():
            xy = flown.figure_eight.states[v, :, :2]
            style = "-" if simulator == "torch" else ":"  # the two simulators often overlap exactly
            ax.plot(xy[:, 0], xy[:, 1], style, lw=1.6, label=f"{controller}, {simulator}")
        ax.set_title(result.vehicle_names[v])
        ax.set_xlabel("x [m]")
        ax.set_ylabel("y [m]")
        ax.set_aspect("equal", adjustable="datalim")
    axes[0][0].legend(fontsize=7)
    return _save_figure(fig, path)


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_hover_recovery(result: EvalResult, vehicles: list[int], path: Path) -> Path:
    """Distance to the target and altitude vs time from the first random start, every controller
    (in torch when it was evaluated there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(vehicles), figsize=(4 * len(vehicles), 5), squeeze=False, sharex=True)
    for column, v in enumerate(vehicles):
        for controller, by_simulator in result.flights.items():
            flights = by_simulator.get("torch") or next(iter(by_simulator.values()))
            flown = flights.hover
            episode = int(torch.nonzero(flights.hover_vehicle == v)[0])
            time = np.arange(flown.states.shape[1]) * dynamics.DEFAULT_DT
            alive = np.r_[True, flown.mask[episode].numpy()]
            error = flown.position_error()[episode].numpy()
            altitude = flown.states[episode, :, 2].numpy()
            axes[0][column].plot(time[alive], error[alive], lw=1, label=controller)
            axes[1][column].plot(time[alive], altitude[alive], lw=1, label=controller)
        axes[0][column].set_title(result.vehicle_names[v])
        axes[0][column].set_ylabel("distance to target [m]")
        axes[1][column].set_ylabel("altitude [m]")
        axes[1][column].set_xlabel("time [s]")
    axes[0][0].legend(fontsize=7)
    return _save_figure(fig, path)


def write_report(result: EvalResult, out_dir: str | Path, command: str = "", notes: str = "") -> Path:
    """``out_dir/raptor.md`` (tables per vehicle group, the probe, definitions), ``raptor.json`` and
    the trajectory plots ``raptor_figure_eight.png``, ``raptor_hover_recovery.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    student = next(iter(result.metrics))
    n = len(result.vehicle_names)
    shown = sorted({0, 1, n - 2, n - 1} & set(range(n)))  # two held-out vehicles and both presets
    eight_png = plot_figure_eight(result, student, shown, out_dir / "raptor_figure_eight.png")
    hover_png = plot_hover_recovery(result, shown, out_dir / "raptor_hover_recovery.png")
    (out_dir / "raptor.json").write_text(json.dumps(result.to_dict(), indent=1))
    groups = next(iter(next(iter(result.metrics.values())).values()))
    cfg = result.config
    sections = [
        "# RAPTOR: foundation policy vs baselines",
        "",
        f"Produced by `{command}`." if command else "",
        "",
        f"Held-out: {groups['held-out']['vehicles']} sampled quadrotors (seed {cfg.seed}, disjoint from the "
        "teachers'), no random disturbance; presets crazyflie and x500. Survival from random starts "
        f"({cfg.survival_episodes} per vehicle in torch, {cfg.mujoco_survival_episodes} in MuJoCo; tilt up "
        f"to 90 deg, speed up to 1 m/s); hover and wind RMSE over the last "
        f"{cfg.hover_seconds - cfg.settle_seconds:g} s of {cfg.hover_seconds:g} s "
        f"(wind: {cfg.wind_fraction:g} x weight along +x); figure eight "
        f"A = {cfg.figure_eight['a']:g} m, B = {cfg.figure_eight['b']:g} m, "
        f"period {cfg.figure_eight['period']:g} s, one period from rest on the curve. RMSEs pool the runs "
        "that did not terminate; (k/n) says how many when some did.",
        "",
    ]
    for group in groups:
        sections += [f"## {group}", "", results_table(result, group), ""]
    sections += target_lines(result, student)
    if result.probe is not None:
        p = result.probe
        sections += [
            "## Linear probe: GRU hidden state -> thrust-to-weight",
            "",
            f"Ridge (alpha {cfg.probe_alpha:g}) fitted on {p['samples_fit']} hidden states from "
            f"{p['vehicles_fit']} vehicles, tested on {p['samples_test']} from {p['vehicles_test']} others: "
            f"R^2 = {p['r2_test']:.3f} held-out (fit R^2 = {p['r2_fit']:.3f}).",
            "",
        ]
    sections += [
        "## Trajectories",
        "",
        f"![figure eight]({eight_png.name})",
        "",
        f"![hover recovery]({hover_png.name})",
        "",
    ]
    if notes:
        sections += [notes, ""]
    path = out_dir / "raptor.md"
    path.write_text("\n".join(sections))
    return path
