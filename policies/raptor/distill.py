"""RAPTOR meta-imitation: distil K RL teachers (one per quadrotor) into one recurrent student.

Two stages as in the paper (rl-tools `src/foundation_policy/post_training`), then one of ours:

1. Behaviour cloning. Every teacher flies its own quadrotor from random initial states (tilt up to
   90 degrees) towards a reference (hover at the origin, or a random Lissajous path); the student's
   22-d observations and the teacher's actions are recorded, all K vehicles in one batched simulation.
2. DAgger. The student flies every teacher's quadrotor with its own hidden state; the teacher labels
   every visited state (its action on the privileged observation there); the data is aggregated
   and the student retrained. A few iterations.

Because the observation holds the previous action and teacher actions are smooth, plain behaviour
cloning learns to repeat its previous action, which in closed loop repeats its own mistakes (the
"copycat" problem). Two standard counter-measures are used while collecting data, both leaving the
labels clean: Gaussian noise on the executed actions (`action_noise`, as in DART, Laskey et al.
2017), and DAgger's mixture (Ross et al. 2011) that executes the teacher's action instead of the
student's with probability beta, from `dagger_teacher_probability` at the first iteration linearly
down towards 0.

Training is backpropagation through time over whole episodes (no truncation): the loss is the mean
squared error between the student's unclamped output (`clip=False`) and the teacher's action, over
the steps before the vehicle terminated (`mask`). The paper uses Adam at 1e-4 for many more epochs on
1000 teachers; at the scale of this CPU (32 teachers, tens of minutes) Adam at 3e-3 with a cosine
decay to 1/20 within each stage, batches of 64 episodes, is what lowered the loss in the time
available (see `DistillConfig`).

3. Hover trim (our addition, trim.py): a short fine-tune through the differentiable simulator on the
   settled position error, anchored by the imitation loss on the aggregated data; it removes the
   steady hover offset imitation leaves. The policy before it is kept as `<policy>/imitation`.

A memoryless baseline, `MlpStudent` (22 -> 32 -> 32 -> 4, 1,924 parameters), goes through the same
stages on the same behaviour-cloning data and flies its own DAgger rollouts.

Output folder (every stage is saved when done; `resume=True` loads finished stages instead):

    bc_data.safetensors                 teacher rollouts (obs, actions, mask, teacher_index)
    <policy>/bc/                        checkpoint after behaviour cloning (policy: student | mlp)
    <policy>/dagger_<i>_data.safetensors, <policy>/dagger_<i>/   each DAgger iteration's data and checkpoint
    <policy>/imitation/                 the policy after the last imitation stage (before the trim)
    <policy>/trim/                      after the hover trim
    <policy>/final/                     the last stage's checkpoint
    metrics.jsonl                       per-epoch losses, per-iteration DAgger flight statistics
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from robomosaic.conf import check_known_keys
from robomosaic.policies.checkpoint import (
    CheckpointError,
    check_spec_fields,
    check_state_dict,
    read_checkpoint,
    save_checkpoint,
)
from robomosaic.policies.raptor.student import ACTION_DIM, OBS_DIM, RaptorStudent
from robomosaic.policies.raptor.trim import TrimConfig, trim
from robomosaic.sim.quadrotor import dynamics
from robomosaic.sim.quadrotor.params import QuadrotorParams


class Teacher(Protocol):
    """What distillation and evaluation need from a teacher ensemble (teachers.TeacherEnsemble)."""

    params: QuadrotorParams  # K vehicles: teacher k flies vehicle k

    def act(self, obs: torch.Tensor, teacher_index: torch.Tensor) -> torch.Tensor:
        """obs (N, 26) privileged, teacher_index (N,) long -> deterministic actions (N, 4) in [-1, 1]."""
        ...


class MlpStudent(nn.Module):
    """The memoryless baseline: Dense(22->32, ReLU) -> Dense(32->32, ReLU) -> Dense(32->4), 1,924
    parameters, with the recurrent student's call signature (the hidden state is always None)."""

    policy_class = "RaptorMlpStudent"

    def __init__(self, hidden_dims: tuple[int, ...] | list[int] = (32, 32)) -> None:
        super().__init__()
        self.hidden_dims = [int(d) for d in hidden_dims]
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"MlpStudent: hidden_dims must be positive ints, got {hidden_dims!r}")
        layers: list[nn.Module] = []
        width = OBS_DIM
        for dim in self.hidden_dims:
            layers += [nn.Linear(width, dim), nn.ReLU()]
            width = dim
        layers.append(nn.Linear(width, ACTION_DIM))
        self.net = nn.Sequential(*layers)
        self.checkpoint_path: str | None = None

    def forward(
        self, obs_seq: torch.Tensor, hidden: None = None, clip: bool = True
    ) -> tuple[torch.Tensor, None]:
        """obs_seq (B, T, 22) -> actions (B, T, 4), None."""
        actions = self.net(obs_seq)
        return (actions.clamp(-1.0, 1.0) if clip else actions), None

    def step(self, obs: torch.Tensor, hidden: None = None, clip: bool = True) -> tuple[torch.Tensor, None]:
        return self.forward(obs, None, clip)

    def save(self, path: str | Path) -> Path:
        spec = {"obs_dim": OBS_DIM, "action_dim": ACTION_DIM}
        return save_checkpoint(
            path, self.policy_class, {"hidden_dims": self.hidden_dims}, {"model": self.state_dict()}, spec
        )

    @classmethod
    def load(cls, path: str | Path) -> MlpStudent:
        ckpt = read_checkpoint(path)
        if ckpt.spec.get("policy_class") != cls.policy_class:
            raise CheckpointError(
                f"{ckpt.path}: policy class is {ckpt.spec.get('policy_class')!r}, not {cls.policy_class!r}"
            )
        mlp = cls(**ckpt.config)
        check_state_dict(str(ckpt.path / "model.safetensors"), mlp.state_dict(), ckpt.parts["model"])
        check_spec_fields(ckpt.path, ckpt.spec, {"obs_dim": OBS_DIM, "action_dim": ACTION_DIM})
        mlp.load_state_dict(ckpt.parts["model"])
        mlp.checkpoint_path = str(ckpt.path)
        return mlp.eval()


Policy = RaptorStudent | MlpStudent
POLICY_TYPES: dict[str, type[RaptorStudent] | type[MlpStudent]] = {
    "student": RaptorStudent,
    "mlp": MlpStudent,
}


# ---- references -------------------------------------------------------------------------------
@dataclass
class Lissajous:
    """Per-vehicle reference p(t) = centre + amplitude * sin(omega t), each (N, 3); amplitude 0 is hover."""

    amplitude: torch.Tensor
    omega: torch.Tensor
    centre: torch.Tensor | None = None

    def at(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Target position and velocity at time ``t`` seconds, each (N, 3)."""
        position = self.amplitude * torch.sin(self.omega * t)
        if self.centre is not None:
            position = position + self.centre
        return position, self.amplitude * self.omega * torch.cos(self.omega * t)

    @classmethod
    def hover(cls, n: int, dtype: torch.dtype = torch.float32) -> Lissajous:
        return cls(torch.zeros(n, 3, dtype=dtype), torch.zeros(n, 3, dtype=dtype))

    @classmethod
    def figure_eight(
        cls, n: int, a: float = 1.0, b: float = 0.5, period: float = 20.0, dtype: torch.dtype = torch.float32
    ) -> Lissajous:
        """RAPTOR's figure eight: x = A sin(w t), y = B sin(2 w t), w = 2 pi / period, from the origin."""
        w = 2 * math.pi / period
        return cls(
            torch.tensor([a, b, 0.0], dtype=dtype).expand(n, 3).clone(),
            torch.tensor([w, 2 * w, 0.0], dtype=dtype).expand(n, 3).clone(),
        )


def random_references(
    n: int,
    generator: torch.Generator,
    trajectory_fraction: float,
    max_amplitude: tuple[float, float, float] = (1.5, 1.5, 0.5),
    period: tuple[float, float] = (4.0, 20.0),
    dtype: torch.dtype = torch.float32,
) -> Lissajous:
    """Hover references, and for a ``trajectory_fraction`` of the vehicles random Lissajous paths
    through the origin (amplitude per axis uniform up to ``max_amplitude``, period uniform in ``period``)."""
    moving = (torch.rand(n, 1, generator=generator) < trajectory_fraction).to(dtype)
    amplitude = torch.rand(n, 3, generator=generator) * torch.tensor(max_amplitude) * moving
    periods = period[0] + (period[1] - period[0]) * torch.rand(n, 3, generator=generator)
    return Lissajous(amplitude.to(dtype), (2 * math.pi / periods).to(dtype))


# ---- controllers and rollouts -----------------------------------------------------------------
class Controller(Protocol):
    def reset(self, n: int) -> None: ...

    def __call__(self, obs: torch.Tensor, privileged: torch.Tensor) -> torch.Tensor:
        """Student obs (N, 22) and privileged obs (N, 26) -> actions (N, 4)."""
        ...


class PolicyController:
    """A student (recurrent or MLP) flying: keeps the hidden state between steps (``self.hidden``)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.hidden: torch.Tensor | None = None

    def reset(self, n: int) -> None:
        self.hidden = None

    @torch.no_grad()
    def __call__(self, obs: torch.Tensor, privileged: torch.Tensor) -> torch.Tensor:
        action, self.hidden = self.policy.step(obs.float(), self.hidden)
        return action


class TeacherController:
    """Teacher ``index[i]`` flies vehicle i (its own vehicle, or another one's: the nominal baseline)."""

    def __init__(self, teacher: Teacher, index: torch.Tensor) -> None:
        self.teacher = teacher
        self.index = index.long()

    def reset(self, n: int) -> None:
        if n != len(self.index):
            raise ValueError(f"TeacherController: {len(self.index)} teacher indices for {n} vehicles")

    @torch.no_grad()
    def __call__(self, obs: torch.Tensor, privileged: torch.Tensor) -> torch.Tensor:
        return self.teacher.act(privileged.float(), self.index)


class Simulator(Protocol):
    params: QuadrotorParams
    dt: float

    def reset(self, state: torch.Tensor) -> None:
        """Start every vehicle from ``state`` (N, 17)."""
        ...

    def advance(self, state: torch.Tensor, action: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Next (N, 17) states; vehicles with ``active`` false keep their state."""
        ...


class TorchSimulator:
    """The batched RK4 simulator (dynamics.step) over all vehicles at once."""

    def __init__(self, params: QuadrotorParams, dt: float = dynamics.DEFAULT_DT) -> None:
        self.params = params
        self.dt = dt

    def reset(self, state: torch.Tensor) -> None:
        pass  # stateless: the state lives in the rollout loop

    def advance(self, state: torch.Tensor, action: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        next_state = dynamics.step(state, action, self.params, self.dt)
        return torch.where(active[:, None], next_state, state)


@dataclass
class Rollout:
    """N episodes of T steps. ``obs``/``privileged``/``actions``/``labels``/``hidden`` are indexed by
    step (N, T, .); ``states``/``targets`` include the final state (N, T + 1, .); ``mask`` (N, T) is
    true for the steps taken before termination; ``survived`` (N,) never terminated."""

    obs: torch.Tensor
    privileged: torch.Tensor
    actions: torch.Tensor
    labels: torch.Tensor | None
    hidden: torch.Tensor | None
    states: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    @property
    def survived(self) -> torch.Tensor:
        return self.mask.all(dim=1)

    def position_error(self) -> torch.Tensor:
        """(N, T + 1) distance from the reference, metres."""
        return (self.states[..., dynamics.POSITION] - self.targets).norm(dim=-1)


@torch.no_grad()
def rollout(
    simulator: Simulator,
    controller: Controller,
    initial_state: torch.Tensor,
    reference: Lissajous,
    steps: int,
    labeller: Controller | None = None,
    termination: dict[str, float] | None = None,
    labeller_probability: float = 0.0,
    action_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Fly ``controller`` for ``steps`` steps; ``labeller`` (a teacher) labels every visited state.

    Observations are relative to the reference at the current time; a vehicle that terminates
    (dynamics.terminated: 5 m box, speed, spin, non-finite) is frozen and masked from then on.
    For data collection, each step executes the labeller's action instead with probability
    ``labeller_probability`` (DAgger's beta mixture) and adds Gaussian ``action_noise`` to what is
    executed (DART-style: the labels stay clean and show how to recover).
    """
    params = simulator.params
    n = len(params)
    state = initial_state.to(params.dtype)
    simulator.reset(state)
    previous_action = dynamics.hover_action(params)
    controller.reset(n)
    if labeller is not None:
        labeller.reset(n)
    alive = torch.ones(n, dtype=torch.bool)
    target, target_velocity = reference.at(0.0)
    record: dict[str, list[torch.Tensor]] = {k: [] for k in ("obs", "priv", "act", "label", "hidden", "mask")}
    states, targets = [state], [target]
    for t in range(steps):
        privileged = dynamics.observe(state, previous_action, params, target, target_velocity)
        obs = privileged[:, : dynamics.OBS_DIM]  # the student's 22 are the first of the teacher's 26
        action = controller(obs, privileged).to(params.dtype)
        if labeller is not None:
            label = labeller(obs, privileged).to(params.dtype)
            record["label"].append(label)
            if labeller_probability > 0:
                use_label = torch.rand(n, 1, generator=generator) < labeller_probability
                action = torch.where(use_label, label, action)
        if action_noise > 0:
            action = action + action_noise * torch.randn(n, 4, generator=generator, dtype=params.dtype)
        action = torch.where(alive[:, None], action.clamp(-1, 1), previous_action)
        hidden = getattr(controller, "hidden", None)
        if hidden is not None:
            record["hidden"].append(hidden.detach().clone())
        record["obs"].append(obs)
        record["priv"].append(privileged)
        record["act"].append(action)
        record["mask"].append(alive.clone())
        state = simulator.advance(state, action, alive)
        previous_action = action
        target, target_velocity = reference.at((t + 1) * simulator.dt)
        alive = alive & ~dynamics.terminated(state, target, **(termination or {}))
        states.append(state)
        targets.append(target)
        if not alive.any():  # everyone terminated: the rest of the episode is frozen, fill it in
            _pad(record, states, targets, previous_action, params, reference, simulator.dt, steps)
            break

    def stack(key: str) -> torch.Tensor | None:
        return torch.stack(record[key], dim=1) if record[key] else None

    return Rollout(
        obs=stack("obs"),
        privileged=stack("priv"),
        actions=stack("act"),
        labels=stack("label"),
        hidden=stack("hidden"),
        states=torch.stack(states, dim=1),
        targets=torch.stack(targets, dim=1),
        mask=stack("mask"),
    )


def _pad(
    record: dict[str, list[torch.Tensor]],
    states: list[torch.Tensor],
    targets: list[torch.Tensor],
    previous_action: torch.Tensor,
    params: QuadrotorParams,
    reference: Lissajous,
    dt: float,
    steps: int,
) -> None:
    """Complete a rollout whose vehicles have all terminated: frozen states that keep repeating
    their last action, observed against the moving reference, every step masked."""
    state = states[-1]
    for t in range(len(states) - 1, steps):
        target, target_velocity = reference.at(t * dt)
        privileged = dynamics.observe(state, previous_action, params, target, target_velocity)
        record["obs"].append(privileged[:, : dynamics.OBS_DIM])
        record["priv"].append(privileged)
        record["act"].append(previous_action)
        record["mask"].append(torch.zeros_like(record["mask"][-1]))
        for key in ("label", "hidden"):
            if record[key]:
                record[key].append(record[key][-1])
        states.append(state)
        targets.append(reference.at((t + 1) * dt)[0])


# ---- imitation data and training ---------------------------------------------------------------
@dataclass
class ImitationData:
    """Episodes for BPTT: obs (E, T, 22) float32, actions (E, T, 4) teacher labels, mask (E, T) bool,
    teacher_index (E,) long."""

    obs: torch.Tensor
    actions: torch.Tensor
    mask: torch.Tensor
    teacher_index: torch.Tensor

    def __len__(self) -> int:
        return self.obs.shape[0]

    @classmethod
    def from_rollout(cls, rollout: Rollout, teacher_index: torch.Tensor) -> ImitationData:
        if rollout.labels is None:
            raise ValueError("ImitationData.from_rollout: the rollout has no teacher labels")
        return cls(rollout.obs.float(), rollout.labels.float(), rollout.mask, teacher_index.long())

    def __add__(self, other: ImitationData) -> ImitationData:
        return ImitationData(
            *(
                torch.cat([getattr(self, k), getattr(other, k)])
                for k in ("obs", "actions", "mask", "teacher_index")
            )
        )

    def save(self, path: Path) -> None:
        tensors = {k: v.contiguous() for k, v in asdict(self).items()}
        tensors["mask"] = tensors["mask"].to(torch.uint8)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ImitationData:
        tensors = load_file(str(path))
        missing = {"obs", "actions", "mask", "teacher_index"} - set(tensors)
        if missing:
            raise KeyError(f"{path}: missing tensors {sorted(missing)}")
        return cls(tensors["obs"], tensors["actions"], tensors["mask"].bool(), tensors["teacher_index"])


def imitation_loss(
    policy: Policy, obs: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Masked MSE of the unclamped output over whole episodes (full backpropagation through time)."""
    predicted, _ = policy(obs, None, clip=False)
    squared = ((predicted - actions) ** 2).mean(dim=-1)
    return (squared * mask).sum() / mask.sum().clamp(min=1)


def fit(
    policy: Policy,
    data: ImitationData,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    grad_clip: float = 1.0,
    progress: bool = False,
    description: str = "fit",
) -> Iterator[dict[str, float]]:
    """Adam with a cosine learning-rate decay over shuffled batches of whole episodes; yields
    {"epoch", "loss", "lr"} after every epoch."""
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    batches = math.ceil(len(data) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(epochs * batches, 1), eta_min=lr / 20
    )
    policy.train()
    bar = tqdm(range(epochs), desc=description, disable=not progress, leave=False)
    for epoch in bar:
        order = torch.randperm(len(data), generator=generator)
        total, weight = 0.0, 0
        for start in range(0, len(data), batch_size):
            batch = order[start : start + batch_size]
            loss = imitation_loss(policy, data.obs[batch], data.actions[batch], data.mask[batch])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
            optimizer.step()
            schedule.step()
            steps = int(data.mask[batch].sum())
            total, weight = total + loss.item() * steps, weight + steps
        metrics = {"epoch": epoch + 1, "loss": total / max(weight, 1), "lr": schedule.get_last_lr()[0]}
        bar.set_postfix(loss=f"{metrics['loss']:.4g}")
        yield metrics
    policy.eval()


# ---- the two stages ----------------------------------------------------------------------------
@dataclass
class DistillConfig:
    episodes_per_teacher: int = 16  # behaviour-cloning episodes per teacher
    episode_steps: int = 500  # 5 s at 100 Hz, the paper's episode length
    trajectory_fraction: float = 0.5  # episodes with a random Lissajous reference (others: hover)
    bc_epochs: int = 100
    bc_lr: float = 3e-3
    dagger_iterations: int = 4
    dagger_episodes_per_teacher: int = 8
    dagger_epochs: int = 30
    dagger_lr: float = 3e-3
    batch_size: int = 64  # episodes per BPTT batch
    grad_clip: float = 1.0
    mlp_hidden_dims: tuple[int, ...] = (32, 32)
    initial_state: dict[str, float] = field(default_factory=dict)  # sample_initial_state overrides
    action_noise: float = 0.1  # std of the noise added to executed actions while collecting data
    dagger_teacher_probability: float = 0.5  # beta at the first DAgger iteration, linearly down to 0
    trim: TrimConfig = field(default_factory=TrimConfig)  # trim.py; iterations 0 skips the stage
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DistillConfig:
        check_known_keys(values, cls, "distill config")
        values = dict(values)
        if "mlp_hidden_dims" in values:
            values["mlp_hidden_dims"] = tuple(values["mlp_hidden_dims"])
        return cls(**values)

    def __post_init__(self) -> None:
        if isinstance(self.trim, dict):  # as read from yaml or json: checked before any work
            self.trim = TrimConfig.from_dict(self.trim)


def fly_episodes(
    teacher: Teacher,
    episodes_per_teacher: int,
    steps: int,
    seed: int,
    trajectory_fraction: float,
    policy: Policy | None = None,
    initial_state: dict[str, float] | None = None,
    teacher_probability: float = 0.0,
    action_noise: float = 0.0,
) -> tuple[Rollout, torch.Tensor]:
    """``episodes_per_teacher`` episodes on every teacher's vehicle, all in one batch, flown by the
    teachers (``policy`` None: behaviour-cloning data) or by ``policy`` (DAgger), labelled by the
    teachers. ``initial_state`` overrides sample_initial_state's ranges (default: RAPTOR's 90 degrees);
    ``teacher_probability`` and ``action_noise`` as in ``rollout``. Returns the rollout and each
    episode's teacher index."""
    k = len(teacher.params)
    index = torch.arange(k).repeat(episodes_per_teacher)
    params = teacher.params.select(index)
    generator = torch.Generator().manual_seed(seed)
    reference = random_references(len(index), generator, trajectory_fraction, dtype=params.dtype)
    labeller = TeacherController(teacher, index)
    controller = labeller if policy is None else PolicyController(policy)
    initial = dynamics.sample_initial_state(
        params, torch.Generator().manual_seed(seed + 1), **(initial_state or {})
    )
    result = rollout(
        TorchSimulator(params),
        controller,
        initial,
        reference,
        steps,
        labeller,
        labeller_probability=teacher_probability if policy is not None else 0.0,
        action_noise=action_noise,
        generator=generator,
    )
    return result, index


def _new_policy(kind: str, config: DistillConfig) -> Policy:
    return RaptorStudent() if kind == "student" else MlpStudent(config.mlp_hidden_dims)


def _log(out: Path, record: dict[str, Any]) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _stage_done(path: Path) -> bool:
    return (path / "spec.json").is_file()


def distill(
    teacher: Teacher,
    config: DistillConfig,
    out: str | Path,
    kinds: tuple[str, ...] = ("student", "mlp"),
    progress: bool = True,
    resume: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Policy]:
    """Behaviour cloning then DAgger for each policy kind ("student": RaptorStudent, "mlp":
    MlpStudent); returns the final policies (also saved to ``out/<kind>/final``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        if kind not in POLICY_TYPES:
            raise KeyError(f"distill: unknown policy kind {kind!r}; kinds: {sorted(POLICY_TYPES)}")
    torch.manual_seed(config.seed)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1))

    bc_path = out / "bc_data.safetensors"
    if resume and bc_path.is_file():
        bc_data = ImitationData.load(bc_path)
    else:
        log(
            f"distill: recording {config.episodes_per_teacher} teacher episodes on each of "
            f"{len(teacher.params)} vehicles"
        )
        flown, index = fly_episodes(
            teacher,
            config.episodes_per_teacher,
            config.episode_steps,
            config.seed,
            config.trajectory_fraction,
            initial_state=config.initial_state,
            action_noise=config.action_noise,
        )
        bc_data = ImitationData.from_rollout(flown, index)
        bc_data.save(bc_path)
        _log(
            out,
            {
                "stage": "record",
                "episodes": len(bc_data),
                "teacher_survival": float(flown.survived.float().mean()),
            },
        )

    results = {}
    for kind in kinds:
        folder = out / kind
        folder.mkdir(exist_ok=True)
        policy_type = POLICY_TYPES[kind]
        torch.manual_seed(config.seed)
        policy = _new_policy(kind, config)
        data = bc_data
        stages = [("bc", None)] + [(f"dagger_{i}", i) for i in range(1, config.dagger_iterations + 1)]
        for name, iteration in tqdm(stages, desc=f"distill {kind}", disable=not progress):
            path = folder / name
            data_path = folder / f"{name}_data.safetensors"
            if iteration is not None:
                if resume and data_path.is_file():
                    data = data + ImitationData.load(data_path)
                else:
                    seed = config.seed + 1000 * iteration
                    flown, index = fly_episodes(
                        teacher,
                        config.dagger_episodes_per_teacher,
                        config.episode_steps,
                        seed,
                        config.trajectory_fraction,
                        policy,
                        config.initial_state,
                        teacher_probability=config.dagger_teacher_probability
                        * (1 - (iteration - 1) / config.dagger_iterations),
                        action_noise=config.action_noise,
                    )
                    new = ImitationData.from_rollout(flown, index)
                    new.save(data_path)
                    data = data + new
                    survival = float(flown.survived.float().mean())
                    _log(
                        out,
                        {"stage": name, "policy": kind, "flown_survival": survival, "episodes": len(data)},
                    )
                    log(f"distill {kind} {name}: the {kind} survived {survival:.1%} of its flights")
            if resume and _stage_done(path):
                policy = policy_type.load(path)
                continue
            epochs, lr = (
                (config.bc_epochs, config.bc_lr)
                if iteration is None
                else (config.dagger_epochs, config.dagger_lr)
            )
            generator = torch.Generator().manual_seed(config.seed + 7 + (iteration or 0))
            for metrics in fit(
                policy,
                data,
                epochs,
                lr,
                config.batch_size,
                generator,
                config.grad_clip,
                progress,
                f"{kind} {name}",
            ):
                _log(out, {"stage": name, "policy": kind, **metrics})
            policy.save(path)
        _replace_checkpoint(policy, folder / "imitation")
        policy = _trim_stage(
            policy, policy_type, data, config.trim, folder / "trim", out, kind, progress, resume
        )
        _replace_checkpoint(policy, folder / "final")
        results[kind] = policy.eval()
    return results


def _replace_checkpoint(policy: Policy, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    policy.save(path)


def _trim_stage(
    policy: Policy,
    policy_type: type[RaptorStudent] | type[MlpStudent],
    data: ImitationData,
    config: TrimConfig,
    path: Path,
    out: Path,
    kind: str,
    progress: bool,
    resume: bool,
) -> Policy:
    """The hover trim of ``policy`` (a no-op for ``config.iterations == 0``), saved to ``path``."""
    if config.iterations == 0:
        return policy
    if resume and _stage_done(path):
        return policy_type.load(path)

    def anchor(generator: torch.Generator) -> torch.Tensor:
        batch = torch.randint(len(data), (config.imitation_batch,), generator=generator)
        return imitation_loss(policy, data.obs[batch], data.actions[batch], data.mask[batch])

    for metrics in trim(policy, anchor, config, progress, f"{kind} trim"):
        _log(out, {"stage": "trim", "policy": kind, **metrics})
    policy.save(path)
    return policy


def load_distilled(out: str | Path, kind: str = "student") -> Policy:
    """The final policy of a distillation run (``out/<kind>/final``)."""
    if kind not in POLICY_TYPES:
        raise KeyError(f"unknown policy kind {kind!r}; kinds: {sorted(POLICY_TYPES)}")
    return POLICY_TYPES[kind].load(Path(out) / kind / "final")
