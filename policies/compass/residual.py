"""COMPASS stage 2: a residual PPO specialist for one embodiment on top of the frozen base.

    run = train_residual(ResidualConfig(embodiment="kaya"), base="runs/mobility/base/best",
                         out="runs/compass/residual/kaya/s0")
    specialist = load_specialist("runs/compass/residual/kaya/s0")   # .policy(n_worlds) is a `Policy`

The command is base + residual. The residual actor reads the navigation observation, the base's
command and its features (`residual_env`), and its output layer starts at zero, so that before
any update the specialist is the base, exactly (COMPASS initialises its residual head the same way;
our base is a denoiser, not an MLP head to copy, so the residual is an MLP of its own). The
Gaussian's initial std is 0.1 (COMPASS's). PPO is rsl-rl-lib's (Isaac Lab's, COMPASS's own), with
its adaptive-KL learning rate, clipped surrogate, GAE and rollout storage; this module only runs the
rollout/update loop, because rsl-rl's runner saves pickled checkpoints and we never unpickle:
`out/` holds `residual.safetensors` + `residual.json` (the specialist) and
`training_state.safetensors` (optimizer, normalizer, counters) to resume, `metrics.jsonl` and
TensorBoard curves under `tb/`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rsl_rl.algorithms import PPO
from rsl_rl.models import MLPModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tensordict import TensorDict

from robomosaic.conf import check_known_keys
from robomosaic.conf.console import RobomosaicError
from robomosaic.policies.checkpoint import spec_digest
from robomosaic.policies.compass.base import FrozenBase
from robomosaic.policies.compass.residual_env import ResidualNavEnv, residual_obs
from robomosaic.policies.evaluate import load_checkpoint
from robomosaic.policies.train import load_optimizer_tensors, optimizer_tensors
from robomosaic.sim.mobility.embodiments import load_embodiment

SPECIALIST_WEIGHTS, SPECIALIST_JSON = "residual.safetensors", "residual.json"
TRAINING_STATE = "training_state.safetensors"
Obs = dict[str, np.ndarray]


class ResidualError(RobomosaicError, ValueError):
    """A specialist folder or configuration that cannot be used."""


@dataclass
class ResidualConfig:
    embodiment: str = "kaya"
    worlds: int = 64  # MobilityEnv worlds stepped together
    iterations: int = 150  # PPO iterations (rollout + update)
    steps_per_env: int = 32  # rollout length per world and iteration
    hidden_dims: list[int] = field(default_factory=lambda: [256, 128])
    init_std: float = 0.1
    learning_rate: float = 1e-4
    desired_kl: float = 0.01
    clip_param: float = 0.2
    epochs: int = 5
    mini_batches: int = 4
    gamma: float = 0.99
    lam: float = 0.95
    entropy_coef: float = 0.0
    reward_scale: float = 0.01
    save_every: int = 10  # iterations between training-state saves
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> ResidualConfig:
        try:
            check_known_keys(values, cls, where)
        except KeyError as e:
            raise ResidualError(e.args[0]) from None
        return cls(**values)


class ResidualActor(MLPModel):
    """rsl-rl's MLP actor with its output layer zeroed: the residual starts at exactly 0."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        last = [m for m in self.mlp.modules() if isinstance(m, torch.nn.Linear)][-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)


def ppo_config(cfg: ResidualConfig) -> dict[str, Any]:
    """rsl-rl's configuration of the PPO learner (COMPASS's settings; see the module docstring)."""
    model = {"hidden_dims": list(cfg.hidden_dims), "activation": "elu", "obs_normalization": True}
    return {
        "num_steps_per_env": cfg.steps_per_env,
        "obs_groups": {"actor": ["policy"], "critic": ["policy"]},
        "multi_gpu": None,
        "algorithm": {
            "class_name": PPO,
            "num_learning_epochs": cfg.epochs,
            "num_mini_batches": cfg.mini_batches,
            "clip_param": cfg.clip_param,
            "gamma": cfg.gamma,
            "lam": cfg.lam,
            "entropy_coef": cfg.entropy_coef,
            "learning_rate": cfg.learning_rate,
            "schedule": "adaptive",
            "desired_kl": cfg.desired_kl,
        },
        "actor": {
            "class_name": ResidualActor,
            **model,
            "distribution_cfg": {"class_name": "GaussianDistribution", "init_std": cfg.init_std},
        },
        "critic": {"class_name": MLPModel, **model},
    }


def _save_specialist(out: Path, ppo: PPO, cfg: ResidualConfig, base: Path, obs_dim: int, it: int) -> None:
    tensors = {f"actor/{k}": v for k, v in ppo.actor.state_dict().items()}
    tensors |= {f"critic/{k}": v for k, v in ppo.critic.state_dict().items()}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / SPECIALIST_WEIGHTS))
    meta = {
        "config": asdict(cfg),
        "base": {"path": os.path.relpath(base.resolve(), out.resolve()), "spec_sha256": spec_digest(base)},
        "obs_dim": obs_dim,
        "iterations_done": it,
    }
    (out / SPECIALIST_JSON).write_text(json.dumps(meta, indent=1))


def _save_training_state(out: Path, ppo: PPO, it: int, next_seed: int) -> None:
    tensors, groups = optimizer_tensors(ppo.optimizer)
    meta = {"iteration": it, "learning_rate": ppo.learning_rate, "param_groups": groups}
    meta["next_seed"] = next_seed
    tmp = out / (TRAINING_STATE + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), {"meta": json.dumps(meta)})
    tmp.replace(out / TRAINING_STATE)


def _load_training_state(out: Path, ppo: PPO) -> dict[str, Any]:
    with safe_open(str(out / TRAINING_STATE), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    load_optimizer_tensors(ppo.optimizer, load_file(str(out / TRAINING_STATE)), meta["param_groups"])
    ppo.learning_rate = float(meta["learning_rate"])
    return meta


def _load_models(folder: Path, actor: torch.nn.Module, critic: torch.nn.Module | None) -> None:
    tensors = load_file(str(folder / SPECIALIST_WEIGHTS))
    actor.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("actor/")})
    if critic is not None:
        critic.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("critic/")})


def train_residual(
    cfg: ResidualConfig, base: str | Path, out: str | Path, resume: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Train (or resume) one specialist into `out`; returns the last iteration's metrics."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    if load_embodiment(cfg.embodiment).held_out:
        raise ResidualError(
            f"embodiment {cfg.embodiment!r} is held out for evaluation; no specialist trains on it"
        )
    base, out = Path(base), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    policy, _ = load_checkpoint(base)
    env = ResidualNavEnv(policy, cfg.embodiment, cfg.worlds, seed=cfg.seed, reward_scale=cfg.reward_scale)
    obs = env.get_observations()
    ppo = PPO.construct_algorithm(obs, env, ppo_config(cfg), "cpu")
    start = 0
    if resume and (out / TRAINING_STATE).is_file():
        saved = json.loads((out / SPECIALIST_JSON).read_text())
        if saved["config"] != asdict(cfg) | {"iterations": saved["config"]["iterations"]}:
            raise ResidualError(f"{out}: was trained with other settings {saved['config']}; use a new out")
        _load_models(out, ppo.actor, ppo.critic)
        meta = _load_training_state(out, ppo)
        start, env._next_seed = int(meta["iteration"]), int(meta["next_seed"])
        obs = env.reset_all()
    writer = SummaryWriter(str(out / "tb"), purge_step=start)
    metrics: dict[str, Any] = {}
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, disable=not progress,
               desc=f"residual {cfg.embodiment}")  # fmt: skip
    ppo.train_mode()
    with (out / "metrics.jsonl").open("a") as log:
        for it in bar:
            t0 = time.perf_counter()
            successes, collisions, returns = [], [], []
            running = torch.zeros(cfg.worlds)
            with torch.inference_mode():
                for _ in range(cfg.steps_per_env):
                    actions = ppo.act(obs)
                    obs, rewards, dones, extras = env.step(actions)
                    ppo.process_env_step(obs, rewards, dones, extras)
                    running += rewards
                    done = dones.bool()
                    returns += running[done].tolist()
                    running[done] = 0
                    if "log" in extras:
                        successes += extras["log"]["/episode/success"].tolist()
                        collisions += extras["log"]["/episode/collision"].tolist()
                ppo.compute_returns(obs)
            collect = time.perf_counter() - t0
            losses = ppo.update()
            metrics = {
                "iteration": it + 1,
                "env_steps": (it + 1) * cfg.steps_per_env * cfg.worlds,
                "episodes": len(successes),
                "success": float(np.mean(successes)) if successes else None,
                "collision": float(np.mean(collisions)) if collisions else None,
                "return": float(np.mean(returns)) if returns else None,
                "learning_rate": ppo.learning_rate,
                "action_std": ppo.get_policy().output_std.mean().item(),
                "collect_s": collect,
                "update_s": time.perf_counter() - t0 - collect,
                **{f"loss_{k}": float(v) for k, v in losses.items()},
            }
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            for key, value in metrics.items():
                if isinstance(value, float):
                    writer.add_scalar(key, value, it + 1)
            bar.set_postfix(success=metrics["success"], collision=metrics["collision"])
            if (it + 1) % cfg.save_every == 0 or it + 1 == cfg.iterations:
                _save_specialist(out, ppo, cfg, base, int(obs["policy"].shape[1]), it + 1)
                _save_training_state(out, ppo, it + 1, env._next_seed)
    writer.close()
    if start >= cfg.iterations and not (out / SPECIALIST_WEIGHTS).is_file():
        _save_specialist(out, ppo, cfg, base, int(obs["policy"].shape[1]), start)
    return metrics


@dataclass
class Specialist:
    """A trained specialist: the base policy, the residual actor and its settings."""

    base: Any
    actor: MLPModel
    config: ResidualConfig
    folder: Path

    def policy(self, n_worlds: int) -> SpecialistPolicy:
        return SpecialistPolicy(self.base, self.actor, n_worlds)


class SpecialistPolicy:
    """Base + the residual's mean (no exploration noise) over `n` worlds, as a `Policy`."""

    def __init__(self, base_policy: Any, actor: MLPModel, n: int) -> None:
        self.base = FrozenBase(base_policy, n)
        self.actor = actor.eval()

    def reset(self, env_index: int, obs: Obs, seed: int) -> None:
        self.base.reset(env_index, obs, seed)

    @torch.no_grad()
    def act(self, obs: list[Obs], env_indices: list[int]) -> np.ndarray:
        batch = {k: np.stack([o[k] for o in obs]) for k in obs[0]}
        base_action = self.base.act_batch(batch, env_indices)
        x = residual_obs(batch, base_action, self.base.features[np.asarray(env_indices, dtype=int)])
        tensors = TensorDict({"policy": torch.from_numpy(x)}, batch_size=[len(x)])
        return base_action + self.actor(tensors).numpy().astype(np.float64)


def load_specialist(folder: str | Path) -> Specialist:
    """A specialist folder written by `train_residual`; its base must be unchanged since."""
    folder = Path(folder)
    where = folder / SPECIALIST_JSON
    if not where.is_file():
        raise ResidualError(f"{folder}: not a residual specialist (no {SPECIALIST_JSON})")
    meta = json.loads(where.read_text())
    cfg = ResidualConfig.from_dict(meta["config"], str(where))
    base = (folder / meta["base"]["path"]).resolve()
    if not (base / "spec.json").is_file() or spec_digest(base) != meta["base"]["spec_sha256"]:
        raise ResidualError(f"{where}: its base {base} is missing or changed since training")
    policy, _ = load_checkpoint(base)
    dummy = TensorDict({"policy": torch.zeros(1, int(meta["obs_dim"]))}, batch_size=[1])
    actor_cfg = ppo_config(cfg)["actor"]
    actor_cfg.pop("class_name")
    actor = ResidualActor(dummy, {"actor": ["policy"]}, "actor", 3, **actor_cfg)
    _load_models(folder, actor, None)
    return Specialist(policy, actor, cfg, folder)
