"""RAPTOR's RL teachers: one PPO actor-critic per sampled quadrotor, K of them trained in one loop.

The paper (and rl-tools' ``src/foundation_policy/pre_training``) trains 1000 SAC teachers, one per
vehicle, each for 1M steps. Here the K teachers are a batched ensemble: every weight has a leading K
axis and one ``torch.baddbmm`` evaluates all teachers, each on the M environments that fly its own
vehicle (envs are laid out teacher-major: env ``k * M + m`` is teacher k's m-th copy). One
``QuadrotorBatch`` of K x M environments steps all of them together.

Why PPO and not SAC: on this CPU the simulator is the cost (about 10 us per env step in batches of
thousands), and on-policy PPO turns those batched steps into updates with a handful of large batched
matmuls per iteration and no replay buffer; SAC's one-gradient-step-per-env-step schedule would
make the network updates (not the simulator) the bottleneck at thousands of parallel envs.

Why a model-based prior under the policy (``prior="lqr"``, the default): measured here, PPO from
scratch (``prior="none"``) needs far more than this CPU's budget: 32 teachers at 250k steps each
still survived only 8% of their (curriculum-eased) episodes. Each teacher therefore acts as
``hover + offset - K e + MLP(obs)``: ``K`` is the discrete LQR gain of its own vehicle linearised at
hover (``lqr.lqr_prior``; e is position error, attitude error, velocity error, body rates and motor
states, all read from the privileged observation), ``offset`` the feedforward that holds position
against its constant disturbance force, and the MLP a residual that PPO trains with the paper's
reward (residual RL, as in COMPASS). The teacher is still a function of the 26-d observation and its
index only, which is all the distillation needs. The prior alone already survives RAPTOR's
90-degree starts; PPO optimises the paper's reward for the exploring (noisy) policy. Measured here
(32 teachers, 1M steps each, 21 min): both keep 99.95% of 64 random starts per vehicle alive, but the
deterministic hover RMSE is 0.021 m median for the prior (``total_steps=0``) and 0.097 m after PPO,
so at this budget the residual does not yet pay off for hover.

Design choices (all per teacher, never shared between teachers):
- observation: the privileged 26-d observation (``dynamics.observe(..., params=...)``), normalised
  for the MLPs with running mean / variance statistics per teacher (fitted on a first rollout,
  frozen within an iteration, stored in the checkpoint, used by ``act``);
- action: a Gaussian with state-independent log-std per teacher; the environment clips samples to
  [-1, 1] (CleanRL's continuous PPO), the deterministic action is the clipped mean. The exploration
  noise is small (std 0.05): with std 0.1, PPO measurably traded the deterministic policy's hover
  accuracy for robustness to its own noise (stochastic return up, deterministic return down);
- reward: ``dynamics.raptor_reward`` (-100 on termination), scaled by ``reward_scale`` for learning;
  500-step episodes whose truncation bootstraps from the value of the last observation;
- starts: ``sample_initial_state`` with a curriculum that grows tilt, velocities and the constant
  disturbance force from ``curriculum_start`` of their final size (90 degrees, 1 m/s, 1 rad/s, the
  vehicle's own force) to full over the first ``curriculum_fraction`` of training;
- references: a fraction of episodes hovers at a fixed target, the rest track a slow random
  per-axis sinusoid (amplitude up to ``reference_amplitude`` m, period at least
  ``reference_min_period`` s; RAPTOR's figure-eight is one of these), with its velocity as target
  velocity;
- training terminates tighter than evaluation (``training_termination``: a 3 m box around the target,
  5 m/s), so that teachers learn to stay close; evaluation uses the default 5 m box;
- losses are summed over teachers (each teacher's loss is its own mean), Adam is elementwise, and
  gradient norms are clipped per teacher, so teachers do not influence each other's updates.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from robomosaic.conf import check_known_keys
from robomosaic.policies.raptor.lqr import ERROR_DIM, error_state, lqr_prior
from robomosaic.policies.raptor.student import ACTION_DIM
from robomosaic.sim.quadrotor.dynamics import (
    POSITION,
    PRIVILEGED_OBS_DIM,
    QuadrotorBatch,
    hover_action,
    hover_state,
    raptor_reward,
)
from robomosaic.sim.quadrotor.params import QuadrotorParams, sample_params

ENSEMBLE_WEIGHTS = "teachers.safetensors"
ENSEMBLE_JSON = "teachers.json"
TRAINING_STATE = "training_state.safetensors"
TRAINING_JSON = "training_state.json"
METRICS = "metrics.jsonl"
PRIORS = ("lqr", "none")


@dataclass
class TeacherConfig:
    n_teachers: int = 32
    envs_per_teacher: int = 64
    total_steps: int = 1_000_000  # environment steps per teacher (0: no RL, the prior only)
    hidden: int = 64
    layers: int = 2  # hidden layers in actor and critic
    seed: int = 0
    # PPO (CleanRL's continuous-action defaults where not noted)
    rollout_steps: int = 64
    epochs: int = 4
    minibatches: int = 4
    learning_rate: float = 3e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    max_grad_norm: float = 0.5  # per teacher
    initial_log_std: float = -3.0  # std 0.05; see the module docstring
    reward_scale: float = 0.1
    obs_clip: float = 5.0
    # environment
    episode_steps: int = 500
    curriculum_start: float = 0.1
    curriculum_fraction: float = 0.1
    hover_fraction: float = 0.5
    reference_amplitude: float = 1.0
    reference_min_period: float = 10.0
    training_termination: dict[str, float] = field(
        default_factory=lambda: {"position_limit": 1.5, "max_speed": 5.0, "max_angular_speed": 35.0}
    )
    checkpoint_every: int = 20  # iterations
    # model-based prior under the learned policy: "lqr" (see lqr_gains) or "none" (hover command only)
    prior: str = "lqr"
    # LQR state weights (position, attitude, velocity, body rate) and action weight
    lqr_weights: tuple[float, float, float, float, float] = (1.0, 1.0, 0.1, 0.01, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "TeacherConfig") -> TeacherConfig:
        check_known_keys(values, cls, source)
        values = dict(values)
        if "lqr_weights" in values:  # json gives a list
            values["lqr_weights"] = tuple(values["lqr_weights"])
        return cls(**values)

    def validate(self) -> None:
        if self.total_steps < 0:
            raise ValueError(f"TeacherConfig.total_steps must be >= 0, got {self.total_steps}")
        for name in ("n_teachers", "envs_per_teacher", "hidden", "layers", "rollout_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TeacherConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.prior not in PRIORS:
            raise ValueError(f"TeacherConfig.prior must be one of {PRIORS}, got {self.prior!r}")
        if (self.rollout_steps * self.envs_per_teacher) % self.minibatches:
            raise ValueError(
                "TeacherConfig: rollout_steps x envs_per_teacher "
                f"({self.rollout_steps * self.envs_per_teacher}) must be divisible by minibatches "
                f"({self.minibatches})"
            )

    @property
    def steps_per_iteration(self) -> int:
        """Environment steps per teacher per PPO iteration."""
        return self.rollout_steps * self.envs_per_teacher


class EnsembleLinear(nn.Module):
    """K independent linear layers: weight (K, in, out), bias (K, 1, out)."""

    def __init__(self, k: int, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(k, 1, n_out))

    def init_orthogonal(self, gain: float, generator: torch.Generator) -> None:
        """CleanRL's layer_init per teacher (orthogonal with ``gain``, zero bias)."""
        with torch.no_grad():
            for k in range(self.weight.shape[0]):  # initialisation only, never in the training loop
                w = torch.randn(self.weight.shape[2], self.weight.shape[1], generator=generator)
                q, r = torch.linalg.qr(w if w.shape[0] >= w.shape[1] else w.T)
                q = q * torch.sign(torch.diagonal(r))
                q = q if w.shape[0] >= w.shape[1] else q.T
                self.weight[k] = gain * q.T
            self.bias.zero_()

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (K, B, in) -> (K, B, out); or, with ``index`` (N,) naming each row's teacher,
        ``x`` (N, in) -> (N, out)."""
        if index is None:
            return torch.baddbmm(self.bias, x, self.weight)
        return torch.bmm(x[:, None], self.weight[index])[:, 0] + self.bias[index, 0]


class EnsembleMLP(nn.Module):
    def __init__(self, k: int, n_in: int, n_out: int, hidden: int, layers: int):
        super().__init__()
        sizes = [n_in] + [hidden] * layers + [n_out]
        self.layers = nn.ModuleList(EnsembleLinear(k, a, b) for a, b in itertools.pairwise(sizes))

    def init_orthogonal(self, last_gain: float, generator: torch.Generator) -> None:
        for layer in self.layers[:-1]:
            layer.init_orthogonal(math.sqrt(2), generator)
        self.layers[-1].init_orthogonal(last_gain, generator)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x, index))
        return self.layers[-1](x, index)


class TeacherEnsemble(nn.Module):
    """K actor-critic teachers; teacher k flies vehicle k of ``params``."""

    def __init__(self, config: TeacherConfig, params: QuadrotorParams, initialize: bool = True):
        super().__init__()
        if len(params) != config.n_teachers:
            raise ValueError(f"TeacherEnsemble: {len(params)} vehicles for n_teachers = {config.n_teachers}")
        self.config = config
        self.params = params.to(dtype=torch.float32)
        k = config.n_teachers
        self.actor = EnsembleMLP(k, PRIVILEGED_OBS_DIM, ACTION_DIM, config.hidden, config.layers)
        self.critic = EnsembleMLP(k, PRIVILEGED_OBS_DIM, 1, config.hidden, config.layers)
        self.log_std = nn.Parameter(torch.full((k, 1, ACTION_DIM), config.initial_log_std))
        # per-teacher observation statistics (running, Chan et al.'s parallel update)
        self.register_buffer("obs_mean", torch.zeros(k, 1, PRIVILEGED_OBS_DIM))
        self.register_buffer("obs_var", torch.ones(k, 1, PRIVILEGED_OBS_DIM))
        self.register_buffer("obs_count", torch.full((k,), 1e-4))
        # the prior: every teacher's own hover command and LQR gain (zero without a prior)
        self.register_buffer("hover", hover_action(self.params))
        self.register_buffer("prior_gain", torch.zeros(k, ACTION_DIM, ERROR_DIM))
        self.register_buffer("prior_offset", torch.zeros(k, ACTION_DIM))
        if initialize:  # (load skips this: the checkpoint holds all of it)
            generator = torch.Generator().manual_seed(config.seed)
            self.actor.init_orthogonal(0.01, generator)
            self.critic.init_orthogonal(1.0, generator)
            if config.prior == "lqr":
                gain, offset = lqr_prior(self.params, config.lqr_weights)
                self.prior_gain.copy_(gain)
                self.prior_offset.copy_(offset)

    @property
    def n_teachers(self) -> int:
        return self.config.n_teachers

    def normalize(self, obs: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Obs (K, B, 26), or (N, 26) with ``index``, -> normalised and clipped per teacher."""
        if index is None:
            mean, var = self.obs_mean, self.obs_var
        else:
            mean, var = self.obs_mean[index, 0], self.obs_var[index, 0]
        clip = self.config.obs_clip
        # variance floor 1e-2: quantities that barely vary at hover are not blown up into noise
        return ((obs - mean) / torch.sqrt(var + 1e-2)).clamp(-clip, clip)

    @torch.no_grad()
    def update_obs_statistics(self, obs: torch.Tensor) -> None:
        """Merge a batch of raw observations shaped (K, B, 26) into the running statistics."""
        batch_mean = obs.mean(dim=1, keepdim=True)
        batch_var = obs.var(dim=1, unbiased=False, keepdim=True)
        n = float(obs.shape[1])
        count = self.obs_count[:, None, None]
        total = count + n
        delta = batch_mean - self.obs_mean
        self.obs_mean += delta * n / total
        self.obs_var.copy_((self.obs_var * count + batch_var * n + delta**2 * count * n / total) / total)
        self.obs_count += n

    @torch.no_grad()
    def act(self, obs: torch.Tensor, teacher_index: torch.Tensor) -> torch.Tensor:
        """Deterministic actions (N, 4) in [-1, 1] for privileged observations (N, 26), row i
        answered by teacher ``teacher_index[i]``."""
        if obs.dim() != 2 or obs.shape[1] != PRIVILEGED_OBS_DIM:
            raise ValueError(
                f"TeacherEnsemble.act: obs must be (N, {PRIVILEGED_OBS_DIM}), got {tuple(obs.shape)}"
            )
        if teacher_index.shape != obs.shape[:1]:
            raise ValueError(
                f"TeacherEnsemble.act: teacher_index must be ({obs.shape[0]},), "
                f"got {tuple(teacher_index.shape)}"
            )
        if len(teacher_index) and (teacher_index.min() < 0 or teacher_index.max() >= self.n_teachers):
            raise ValueError(f"TeacherEnsemble.act: teacher_index outside [0, {self.n_teachers})")
        return self.mean(obs.float(), teacher_index.long()).clamp(-1, 1).to(obs.dtype)

    def mean(self, obs: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Unclipped mean action: the prior (hover - K e) plus the learned MLP on normalised
        observations. ``obs`` (K, B, 26), or (N, 26) with ``index``."""
        if index is None:
            hover, offset, gain = self.hover[:, None, :], self.prior_offset[:, None, :], self.prior_gain
            feedback = torch.bmm(error_state(obs, hover), gain.transpose(1, 2))
        else:
            hover, offset, gain = self.hover[index], self.prior_offset[index], self.prior_gain[index]
            feedback = torch.bmm(gain, error_state(obs, hover)[:, :, None])[:, :, 0]
        return hover + offset - feedback + self.actor(self.normalize(obs, index), index)

    def distribution(self, obs: torch.Tensor) -> torch.distributions.Normal:
        """Policy over (K, B, 4) for raw privileged observations (K, B, 26)."""
        mean = self.mean(obs)
        return torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """(K, B) values of raw privileged observations (K, B, 26)."""
        return self.critic(self.normalize(obs))[..., 0]

    # ---- files ------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """``teachers.safetensors`` (weights and observation statistics) + ``teachers.json``
        (config and vehicles)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        _atomic_save(tensors, directory / ENSEMBLE_WEIGHTS)
        meta = {
            "format": "robomosaic.raptor.teachers/1",
            "config": self.config.to_dict(),
            "vehicles": self.params.to_dicts(),
        }
        _atomic_write(directory / ENSEMBLE_JSON, json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> TeacherEnsemble:
        directory = Path(directory)
        meta_path, weights_path = directory / ENSEMBLE_JSON, directory / ENSEMBLE_WEIGHTS
        for path in (meta_path, weights_path):
            if not path.exists():
                raise FileNotFoundError(f"TeacherEnsemble.load: {path} does not exist")
        meta = json.loads(meta_path.read_text())
        for key in ("config", "vehicles"):
            if key not in meta:
                raise KeyError(f"{meta_path}: missing key {key!r}")
        config = TeacherConfig.from_dict(meta["config"], source=str(meta_path))
        params = QuadrotorParams.from_dicts(meta["vehicles"], source=str(meta_path))
        ensemble = cls(config, params, initialize=False)
        state = load_file(weights_path)
        expected = ensemble.state_dict()
        if set(state) != set(expected) or any(state[n].shape != expected[n].shape for n in expected):
            raise ValueError(f"{weights_path}: tensors do not match the config in {meta_path}")
        ensemble.load_state_dict(state)
        return ensemble


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, tmp)
    tmp.replace(path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def initial_state_ranges(difficulty: float) -> dict[str, float]:
    """``sample_initial_state`` keywords: RAPTOR's 90 degrees, 1 m/s, 1 rad/s scaled by ``difficulty``
    (position always within 0.5 m)."""
    return {
        "max_angle": difficulty * math.pi / 2,
        "max_velocity": difficulty * 1.0,
        "max_angular_velocity": difficulty * 1.0,
    }


# ---- environment wrapper ----------------------------------------------------------------------
class TeacherEnvironments:
    """K x M ``QuadrotorBatch`` environments (teacher-major) with per-episode random references,
    the paper's reward, automatic resets and per-episode statistics."""

    def __init__(self, config: TeacherConfig, params: QuadrotorParams, generator: torch.Generator):
        self.config = config
        self.k, self.m = config.n_teachers, config.envs_per_teacher
        self.generator = generator
        vehicles = params.to(dtype=torch.float32).select(torch.arange(self.k).repeat_interleave(self.m))
        self.env = QuadrotorBatch(
            vehicles, generator, max_steps=config.episode_steps, termination=config.training_termination
        )
        self.full_disturbance = vehicles.disturbance_force.clone()
        n = self.k * self.m
        self.amplitude = torch.zeros(n, 3)
        self.omega = torch.zeros(n, 3)
        self.phase = torch.zeros(n, 3)
        self.episode_return = torch.zeros(n)
        self.set_difficulty(1.0)
        self.reset(torch.ones(n, dtype=torch.bool))

    def set_difficulty(self, fraction: float) -> None:
        """Scale of the initial-state distribution (1 = RAPTOR's 90 degrees, 1 m/s, 1 rad/s) and of
        each vehicle's constant disturbance force (up to half the weight for some sampled vehicles:
        at full size it drifts a vehicle holding its hover command out of the box within a second)."""
        self.env.params = self.env.params.replace(disturbance_force=fraction * self.full_disturbance)
        self.env.initial_state = initial_state_ranges(fraction)

    def _uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator)

    def reset(self, mask: torch.Tensor) -> None:
        n = int(mask.sum())
        if n == 0:
            return
        self.env.reset(mask)
        moving = (self._uniform(n) >= self.config.hover_fraction).float()[:, None]
        max_omega = 2 * math.pi / self.config.reference_min_period
        self.amplitude[mask] = moving * self._uniform(n, 3) * self.config.reference_amplitude
        self.omega[mask] = self._uniform(n, 3) * max_omega
        self.phase[mask] = self._uniform(n, 3) * 2 * math.pi
        self.episode_return[mask] = 0.0
        self._set_reference()
        # the reference starts at the origin; place the sampled start around it
        self.env.state[mask, POSITION] += self.env.target_position[mask]

    def _set_reference(self) -> None:
        t = self.env.steps.float()[:, None] * self.env.dt
        angle = self.omega * t + self.phase
        self.env.target_position = self.amplitude * (torch.sin(angle) - torch.sin(self.phase))
        self.env.target_velocity = self.amplitude * self.omega * torch.cos(angle)

    def observe(self) -> torch.Tensor:
        """Privileged observations shaped (K, M, 26)."""
        return self.env.observe(privileged=True).view(self.k, self.m, -1)

    def step(self, action: torch.Tensor) -> dict[str, torch.Tensor]:
        """Step with actions (K, M, 4); resets finished episodes. Returns (K, M) tensors ``reward``,
        ``terminated``, ``truncated``, ``final_obs`` (K, M, 26, before the reset) and per finished
        episode ``episode_return`` / ``episode_survived`` (flat, with ``episode_teacher``)."""
        flat = action.reshape(-1, ACTION_DIM)
        state, previous, target = self.env.state, self.env.previous_action, self.env.target_position
        _, terminated, truncated = self.env.step(flat)
        reward = raptor_reward(state, flat, previous, terminated, target)
        truncated = truncated & ~terminated
        self.episode_return += reward
        self._set_reference()
        final_obs = self.observe().clone()
        done = terminated | truncated
        info = {
            "reward": reward.view(self.k, self.m),
            "terminated": terminated.view(self.k, self.m),
            "truncated": truncated.view(self.k, self.m),
            "final_obs": final_obs,
            "episode_return": self.episode_return[done].clone(),
            "episode_survived": truncated[done],
            "episode_teacher": torch.nonzero(done).flatten() // self.m,
        }
        self.reset(done)
        return info


# ---- training ---------------------------------------------------------------------------------
def _clip_grad_norm_per_teacher(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale each teacher's gradient (the slice k of every parameter) to norm <= ``max_norm``."""
    squared = sum(p.grad.flatten(1).pow(2).sum(dim=1) for p in parameters)
    norms = squared.sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in parameters:
        p.grad.mul_(scale.view(-1, *([1] * (p.grad.dim() - 1))))
    return norms


def _save_training_state(
    out: Path,
    ensemble: TeacherEnsemble,
    optimizer: torch.optim.Adam,
    progress: dict[str, Any],
    generator: torch.Generator,
) -> None:
    """Ensemble plus optimizer moments, generator state and counters (no pickle)."""
    ensemble.save(out)
    tensors = {"generator_state": generator.get_state()}
    names = {id(p): n for n, p in ensemble.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"{names[id(p)]}.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
    _atomic_save(tensors, out / TRAINING_STATE)
    _atomic_write(out / TRAINING_JSON, json.dumps(progress, indent=1))


def _load_training_state(
    out: Path, ensemble: TeacherEnsemble, optimizer: torch.optim.Adam, generator: torch.Generator
) -> dict[str, Any]:
    tensors = load_file(out / TRAINING_STATE)
    generator.set_state(tensors.pop("generator_state"))
    for name, p in ensemble.named_parameters():
        state = {
            key: tensors[f"{name}.{key}"]
            for key in ("step", "exp_avg", "exp_avg_sq")
            if f"{name}.{key}" in tensors
        }
        if state:
            optimizer.state[p] = state
    return json.loads((out / TRAINING_JSON).read_text())


def _check_resumable(out: Path, config: TeacherConfig) -> None:
    """A checkpoint may be resumed with a different ``total_steps`` (train longer), nothing else."""
    path = out / ENSEMBLE_JSON
    saved = TeacherConfig.from_dict(json.loads(path.read_text())["config"], source=str(path)).to_dict()
    differs = {
        k: (saved.get(k), v) for k, v in config.to_dict().items() if k != "total_steps" and saved.get(k) != v
    }
    if differs:
        raise ValueError(
            f"{out / ENSEMBLE_JSON}: checkpoint was trained with a different TeacherConfig "
            f"(saved, requested): {differs}; use another output directory or resume=False"
        )


@torch.no_grad()
def _fit_obs_statistics(ensemble: TeacherEnsemble, envs: TeacherEnvironments, config: TeacherConfig) -> None:
    """Before the first update: fit the observation statistics on one rollout of the initial policy
    at the starting difficulty (otherwise the first update would see the inputs jump from the
    placeholder statistics to real ones, and the critic would start from wrong values)."""
    envs.set_difficulty(config.curriculum_start if config.curriculum_fraction > 0 else 1.0)
    observations = []
    for _ in range(config.rollout_steps):
        obs = envs.observe()
        observations.append(obs)
        dist = ensemble.distribution(obs)
        envs.step(dist.sample())
    ensemble.update_obs_statistics(torch.cat(observations, dim=1))
    envs.reset(torch.ones(len(envs.env), dtype=torch.bool))


def train_teachers(
    config: TeacherConfig,
    out: str | Path,
    params: QuadrotorParams | None = None,
    progress: bool = True,
    resume: bool = True,
) -> TeacherEnsemble:
    """Train K PPO teachers together; checkpoints (every ``checkpoint_every`` iterations and at the
    end) and ``metrics.jsonl`` go to ``out``; with ``resume`` an existing checkpoint there is
    continued from its step. ``params`` None samples ``config.n_teachers`` vehicles from ``config.seed``."""
    from tqdm.auto import tqdm

    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(config.seed)
    resuming = resume and (out / TRAINING_JSON).exists()
    if resuming:
        _check_resumable(out, config)
        ensemble = TeacherEnsemble.load(out)
        ensemble.config = config
    else:
        if params is None:
            params = sample_params(config.n_teachers, torch.Generator().manual_seed(config.seed))
        ensemble = TeacherEnsemble(config, params)
        (out / METRICS).unlink(missing_ok=True)
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=config.learning_rate, eps=1e-5)
    state = {"iteration": 0, "step": 0, "wall_time": 0.0}
    if resuming:
        state = _load_training_state(out, ensemble, optimizer, generator)

    k, m, t_len = config.n_teachers, config.envs_per_teacher, config.rollout_steps
    n_iterations = math.ceil(config.total_steps / config.steps_per_iteration)
    envs = TeacherEnvironments(config, ensemble.params, generator)
    if state["iteration"] == 0:
        _fit_obs_statistics(ensemble, envs, config)
    parameters = list(ensemble.parameters())
    recent_returns: list[torch.Tensor] = []
    recent_survived: list[torch.Tensor] = []
    recent_teacher: list[torch.Tensor] = []

    bar = tqdm(
        total=n_iterations, initial=state["iteration"], disable=not progress, desc="teachers", unit="it"
    )
    while state["iteration"] < n_iterations:
        start = time.perf_counter()
        fraction_done = state["iteration"] / n_iterations
        curriculum = (
            min(1.0, fraction_done / config.curriculum_fraction) if config.curriculum_fraction > 0 else 1.0
        )
        envs.set_difficulty(config.curriculum_start + (1 - config.curriculum_start) * curriculum)
        if config.anneal_lr:
            optimizer.param_groups[0]["lr"] = config.learning_rate * (1 - fraction_done)

        # ---- rollout ----
        # raw observations: normalisation statistics change only after the update
        obs_buf = torch.zeros(t_len, k, m, PRIVILEGED_OBS_DIM)
        actions = torch.zeros(t_len, k, m, ACTION_DIM)
        logprobs = torch.zeros(t_len, k, m)
        rewards = torch.zeros(t_len, k, m)
        dones = torch.zeros(t_len, k, m)
        values = torch.zeros(t_len, k, m)
        with torch.no_grad():
            obs = envs.observe()
            for t in range(t_len):
                obs_buf[t] = obs
                dist = ensemble.distribution(obs_buf[t])
                action = dist.sample()
                actions[t], logprobs[t] = action, dist.log_prob(action).sum(-1)
                values[t] = ensemble.value(obs_buf[t])
                info = envs.step(action)
                reward = info["reward"] * config.reward_scale
                # a time limit is not a terminal state: bootstrap from the last observation's value
                truncated = info["truncated"]
                if truncated.any():
                    final_value = ensemble.value(info["final_obs"].nan_to_num(0.0))
                    reward = torch.where(truncated, reward + config.gamma * final_value, reward)
                rewards[t] = reward
                dones[t] = (info["terminated"] | truncated).float()
                obs = envs.observe()
                recent_returns.append(info["episode_return"])
                recent_survived.append(info["episode_survived"])
                recent_teacher.append(info["episode_teacher"])
            next_value = ensemble.value(obs)
            advantages = torch.zeros_like(rewards)
            last = torch.zeros(k, m)
            for t in reversed(range(t_len)):
                following = next_value if t == t_len - 1 else values[t + 1]
                nonterminal = 1.0 - dones[t]
                delta = rewards[t] + config.gamma * following * nonterminal - values[t]
                last = delta + config.gamma * config.gae_lambda * nonterminal * last
                advantages[t] = last
            returns = advantages + values

        # ---- PPO update: minibatches hold the same number of samples of every teacher ----
        def per_teacher(x: torch.Tensor) -> torch.Tensor:  # (T, K, M, ...) -> (K, T*M, ...)
            return x.transpose(0, 1).reshape(k, t_len * m, *x.shape[3:])

        b_obs, b_actions, b_logprobs = per_teacher(obs_buf), per_teacher(actions), per_teacher(logprobs)
        b_advantages, b_returns = per_teacher(advantages), per_teacher(returns)
        batch = t_len * m
        minibatch = batch // config.minibatches
        clip_fractions = []
        for _ in range(config.epochs):
            order = torch.argsort(torch.rand(k, batch, generator=generator), dim=1)
            for start_index in range(0, batch, minibatch):
                idx = order[:, start_index : start_index + minibatch]

                def take(x: torch.Tensor, idx: torch.Tensor = idx) -> torch.Tensor:
                    return torch.gather(
                        x, 1, idx.view(k, -1, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
                    )

                mb_adv = take(b_advantages)
                mb_adv = (mb_adv - mb_adv.mean(1, keepdim=True)) / (mb_adv.std(1, keepdim=True) + 1e-8)
                dist = ensemble.distribution(take(b_obs))
                new_logprob = dist.log_prob(take(b_actions)).sum(-1)
                ratio = (new_logprob - take(b_logprobs)).exp()
                policy_loss = torch.max(
                    -mb_adv * ratio, -mb_adv * ratio.clamp(1 - config.clip_coef, 1 + config.clip_coef)
                ).mean(1)
                new_value = ensemble.value(take(b_obs))
                # no value clipping: returns span about -10..15 here, and clipping each update's value
                # change to clip_coef (CleanRL's clip_vloss, meant for unit-scale returns) starves the critic
                value_loss = 0.5 * ((new_value - take(b_returns)) ** 2).mean(1)
                entropy = dist.entropy().sum(-1).mean(1)
                loss = (policy_loss + config.value_coef * value_loss - config.entropy_coef * entropy).sum()
                optimizer.zero_grad()
                loss.backward()
                _clip_grad_norm_per_teacher(parameters, config.max_grad_norm)
                optimizer.step()
                clip_fractions.append(((ratio - 1).abs() > config.clip_coef).float().mean().item())
        ensemble.update_obs_statistics(per_teacher(obs_buf))

        # ---- bookkeeping ----
        state["iteration"] += 1
        state["step"] += config.steps_per_iteration
        state["wall_time"] += time.perf_counter() - start
        returns_done = torch.cat(recent_returns)
        if len(returns_done) >= k or state["iteration"] == n_iterations:
            survived = torch.cat(recent_survived).float()
            teacher = torch.cat(recent_teacher)
            counts = torch.bincount(teacher, minlength=k)
            survivals = torch.bincount(teacher, weights=survived, minlength=k) / counts.clamp(min=1)
            survivals = survivals[counts > 0]  # only teachers with finished episodes
            record = {
                "iteration": state["iteration"],
                "step": state["step"],
                "wall_time": round(state["wall_time"], 2),
                "episodes": len(returns_done),
                "mean_return": returns_done.mean().item() if len(returns_done) else float("nan"),
                "survival": survived.mean().item() if len(survived) else float("nan"),
                "min_teacher_survival": survivals.min().item() if len(survivals) else float("nan"),
                "difficulty": envs.env.initial_state["max_angle"] / (math.pi / 2),
                "policy_loss": policy_loss.mean().item(),
                "value_loss": value_loss.mean().item(),
                "std": ensemble.log_std.exp().mean().item(),
                "clip_fraction": sum(clip_fractions) / len(clip_fractions),
            }
            with open(out / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(
                ret=f"{record['mean_return']:.0f}",
                surv=f"{record['survival']:.2f}",
                diff=f"{record['difficulty']:.2f}",
            )
            recent_returns.clear()
            recent_survived.clear()
            recent_teacher.clear()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_teachers: non-finite loss at iteration {state['iteration']}")
        bar.update(1)
        if state["iteration"] % config.checkpoint_every == 0 or state["iteration"] == n_iterations:
            _save_training_state(out, ensemble, optimizer, state, generator)
    bar.close()
    if n_iterations == 0:  # total_steps 0: the prior alone (plus the untrained residual)
        _save_training_state(out, ensemble, optimizer, state, generator)
    return ensemble


# ---- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_teachers(
    ensemble: TeacherEnsemble,
    episodes_per_teacher: int = 64,
    steps: int = 500,
    seed: int = 0,
    settle_steps: int = 200,
    difficulty: float = 1.0,
    stochastic: bool = False,
    termination: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Hover at the origin from RAPTOR's random starts (90 degrees, 1 m/s, 1 rad/s, all scaled by
    ``difficulty``), every teacher flying its own vehicle (with its full disturbance force), with the
    default termination (5 m box, crash-like speeds) unless ``termination`` (``dynamics.terminated``
    keywords) is given; deterministic actions unless ``stochastic``.
    Returns per teacher (K,) ``survival``, ``hover_rmse``: position RMSE in m over steps >=
    ``settle_steps`` of the episodes that survived (nan for a teacher without a surviving episode),
    and ``mean_return`` (the paper's reward)."""
    k, m = ensemble.n_teachers, episodes_per_teacher
    index = torch.arange(k).repeat_interleave(m)
    env = QuadrotorBatch(
        ensemble.params.select(index),
        torch.Generator().manual_seed(seed),
        max_steps=steps,
        initial_state=initial_state_ranges(difficulty),
        termination=termination,
    )
    noise_generator = torch.Generator().manual_seed(seed + 1)
    alive = torch.ones(k * m, dtype=torch.bool)
    squared_error = torch.zeros(k * m)
    total_return = torch.zeros(k * m)
    for t in range(steps):
        state, previous = env.state, env.previous_action
        obs = env.observe(privileged=True)
        action = ensemble.act(obs, index)
        if stochastic:  # the exploring policy PPO optimises (seeded like the starts)
            mean = ensemble.mean(obs, index)
            noise = torch.randn(mean.shape, generator=noise_generator)
            action = (mean + ensemble.log_std[index, 0].exp() * noise).clamp(-1, 1)
        _, terminated, _ = env.step(action)
        total_return += torch.where(alive, raptor_reward(state, action, previous, terminated), 0.0)
        alive &= ~terminated
        if t >= settle_steps:
            squared_error += env.state[:, POSITION].pow(2).sum(dim=1).nan_to_num(0.0)
        # crashed vehicles are parked at hover so that they cannot produce non-finite numbers
        env.state = torch.where(alive[:, None], env.state, hover_state(env.params))
    alive, squared_error, total_return = alive.view(k, m), squared_error.view(k, m), total_return.view(k, m)
    survivors = alive.sum(dim=1)
    mse = (squared_error * alive).sum(dim=1) / (survivors * (steps - settle_steps)).clamp(min=1)
    rmse = torch.where(survivors > 0, mse.sqrt(), torch.full_like(mse, float("nan")))
    return {
        "survival": alive.float().mean(dim=1),
        "hover_rmse": rmse,
        "mean_return": total_return.mean(dim=1),
    }
