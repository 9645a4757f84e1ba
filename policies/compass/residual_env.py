"""The environment a COMPASS residual specialist learns in: `MobilityEnv` worlds of one embodiment,
driven by the frozen base plus the residual, as an rsl-rl `VecEnv`.

    env = ResidualNavEnv(base_policy, "kaya", n_worlds=64, seed=0)
    obs = env.get_observations()         # TensorDict {"policy": (N, OBS + 3 + F)}
    obs, reward, done, extras = env.step(residual)      # residual (N, 3); command = base + residual

The residual's observation is the navigation observation (flattened in `OBS_SPEC` order), the base's
command for this step and the base's features (`FrozenBase.features`). Finished worlds start the
next episode at once, on seeds `TRAIN_SEEDS + seed * SEEDS_PER_RUN + k` (k counting episodes), so
that training never meets the evaluation seeds (1_000_000 + k).
Reward: COMPASS's terms (-distance to the goal per step, +2000 on arrival, -1000 on collision)
times `reward_scale`, so that returns stay near unit scale for the critic.
"""

from __future__ import annotations

import numpy as np
import torch
from rsl_rl.env import VecEnv
from tensordict import TensorDict

from robomosaic.policies.compass.base import FrozenBase
from robomosaic.policies.denoising_policy import DenoisingPolicy
from robomosaic.sim.mobility.env import MAX_STEPS, OBS_SPEC, MobilityEnv

TRAIN_SEEDS = 50_000_000  # training episodes' seeds start here (evaluation uses 1_000_000 + k)
SEEDS_PER_RUN = 1_000_000  # a training seed's own range of episode seeds


def flat_obs(obs: dict[str, np.ndarray]) -> np.ndarray:
    """(N, OBS) the navigation observation's keys concatenated in `OBS_SPEC` order."""
    parts = [np.asarray(obs[k], dtype=np.float32).reshape(len(obs[k]), -1) for k in OBS_SPEC]
    return np.concatenate(parts, axis=1)


def residual_obs(obs: dict[str, np.ndarray], base_action: np.ndarray, features: np.ndarray) -> np.ndarray:
    """(N, OBS + 3 + F) what the residual actor and critic read."""
    return np.concatenate([flat_obs(obs), base_action.astype(np.float32), features.astype(np.float32)], 1)


class ResidualNavEnv(VecEnv):
    def __init__(
        self,
        base_policy: DenoisingPolicy,
        embodiment: str,
        n_worlds: int,
        seed: int = 0,
        reward_scale: float = 0.01,
        max_steps: int = MAX_STEPS,
    ) -> None:
        self.env = MobilityEnv([embodiment] * n_worlds, max_steps=max_steps)
        self.base = FrozenBase(base_policy, n_worlds)
        self.num_envs = n_worlds
        self.num_actions = 3
        self.max_episode_length = max_steps
        self.device = "cpu"
        self.cfg = {"embodiment": embodiment, "n_worlds": n_worlds, "seed": seed}
        self.reward_scale = float(reward_scale)
        self.episode_length_buf = torch.zeros(n_worlds, dtype=torch.long)
        self._next_seed = TRAIN_SEEDS + int(seed) * SEEDS_PER_RUN
        self._obs = self._start(list(range(n_worlds)))
        self._base_action = self._act_base()

    def _start(self, worlds: list[int]) -> dict[str, np.ndarray]:
        seeds = list(range(self._next_seed, self._next_seed + len(worlds)))
        self._next_seed += len(worlds)
        obs = self.env.reset_worlds(worlds, seeds)
        for i, s in zip(worlds, seeds, strict=True):
            self.base.reset(i, {k: v[i] for k, v in obs.items()}, s)
        return obs

    def reset_all(self) -> TensorDict:
        """Every world starts its next episode (a resumed run starts from fresh episodes)."""
        self._obs = self._start(list(range(self.num_envs)))
        self._base_action = self._act_base()
        self.episode_length_buf[:] = 0
        return self.get_observations()

    def _act_base(self) -> np.ndarray:
        return self.base.act_batch(self._obs, range(self.num_envs))

    def get_observations(self) -> TensorDict:
        x = residual_obs(self._obs, self._base_action, self.base.features)
        return TensorDict({"policy": torch.from_numpy(x)}, batch_size=[self.num_envs])

    def step(self, actions: torch.Tensor) -> tuple[TensorDict, torch.Tensor, torch.Tensor, dict]:
        command = self._base_action + actions.detach().cpu().numpy().astype(np.float64)
        self._obs, reward, terminated, truncated, info = self.env.step(command)
        done = terminated | truncated
        self.episode_length_buf += 1
        extras: dict = {"time_outs": torch.from_numpy(truncated.astype(np.float32))}
        finished = np.flatnonzero(done)
        if len(finished):
            extras["log"] = {
                "/episode/success": torch.from_numpy(info["success"][finished].astype(np.float32)),
                "/episode/collision": torch.from_numpy(info["collision"][finished].astype(np.float32)),
            }
            self._obs = self._start(finished.tolist())
            self.episode_length_buf[finished] = 0
        self._base_action = self._act_base()
        rewards = torch.from_numpy((reward * self.reward_scale).astype(np.float32))
        return self.get_observations(), rewards, torch.from_numpy(done.astype(np.float32)), extras
