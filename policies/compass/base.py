"""The frozen imitation base of COMPASS's stage 2: a navigation chunk policy run deterministically
over a batch of worlds, exposing its features beside its actions.

    base = FrozenBase(policy)                       # a DenoisingPolicy trained with task=nav
    base.reset(i, obs_i, seed)                      # world i starts an episode (a `Policy`)
    actions = base.act(rows, worlds)                # (len(worlds), 3) vx, vy, yaw rate
    base.features[worlds]                           # (len(worlds), F) the encoder's condition

The residual learner needs a base that is a fixed function of what it sees, so that the residual's
environment is stationary: every chunk is sampled from one fixed noise draw (the same for every
world and every replan), and chunks are executed as in evaluation, `n_action_steps` actions each
from index `n_obs_steps - 1` on (`executor.py`'s convention), replanned for all worlds whose chunk is
used up in one batched sampling run. The features are the condition the base's denoiser was
given for the chunk now executing (the observation encoder's output).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from robomosaic.policies.denoising_policy import DenoisingPolicy
from robomosaic.policies.inference import sample_chunk

Obs = dict[str, np.ndarray]
NOISE_SEED = 0  # the one noise draw every chunk is sampled from


class FrozenBase:
    """`policy` (frozen, inference mode) over `n` worlds, as a `robomosaic.sim.vector.Policy`."""

    def __init__(self, policy: DenoisingPolicy, n: int, n_action_steps: int | None = None) -> None:
        self.policy = policy.eval().requires_grad_(False)
        self.n = int(n)
        self.obs_keys = list(policy.encoder.obs_keys)
        self.n_obs_steps = int(policy.n_obs_steps)
        self.n_action_steps = int(n_action_steps or policy.n_action_steps)
        usable = policy.horizon - self.n_obs_steps + 1
        if not 1 <= self.n_action_steps <= usable:
            raise ValueError(f"n_action_steps={self.n_action_steps} must be in [1, {usable}]")
        generator = torch.Generator().manual_seed(NOISE_SEED)
        self.noise = torch.randn((1, policy.horizon, policy.action_dim), generator=generator)
        self.feature_dim = int(self.policy.encoder.out_dim)
        self.features = np.zeros((self.n, self.feature_dim), dtype=np.float32)
        self._history: dict[str, np.ndarray] = {}  # key -> (n, n_obs_steps, ...)
        self._chunk = np.zeros((self.n, self.n_action_steps, policy.action_dim))
        self._used = np.full(self.n, self.n_action_steps)  # actions of the current chunk executed

    def reset(self, env_index: int, obs: Obs, seed: int) -> None:
        """World `env_index` starts an episode with `obs`: its history is `obs` repeated (as the
        chunk executor pads), and its next step plans a new chunk. `seed` is unused: no noise."""
        for key in self.obs_keys:
            value = np.asarray(obs[key], dtype=np.float32)
            if key not in self._history:
                self._history[key] = np.zeros((self.n, self.n_obs_steps, *value.shape), dtype=np.float32)
            self._history[key][env_index] = value
        self._used[env_index] = self.n_action_steps

    def act(self, obs: Sequence[Obs], env_indices: Sequence[int]) -> np.ndarray:
        """The base's commands (len(obs), action_dim) for the worlds `env_indices` seeing `obs`."""
        return self.act_batch({k: np.stack([o[k] for o in obs]) for k in self.obs_keys}, env_indices)

    def act_batch(self, obs: Obs, env_indices: Sequence[int]) -> np.ndarray:
        """`act` for observations already batched: {key: (len(env_indices), ...)}."""
        worlds = np.asarray(env_indices, dtype=int)
        for key in self.obs_keys:
            history = self._history[key]
            history[worlds, :-1] = history[worlds, 1:]
            history[worlds, -1] = obs[key]
        replan = worlds[self._used[worlds] >= self.n_action_steps]
        if len(replan):
            self._plan(replan)
        actions = self._chunk[worlds, self._used[worlds]]
        self._used[worlds] += 1
        return actions

    @torch.no_grad()
    def _plan(self, worlds: np.ndarray) -> None:
        batch = {k: torch.from_numpy(self._history[k][worlds]) for k in self.obs_keys}
        cond = self.policy.encode(batch)
        noise = self.noise.expand(len(worlds), -1, -1)
        chunk = sample_chunk(self.policy.bind_encoded(cond), noise=noise).numpy()
        start = self.n_obs_steps - 1
        self._chunk[worlds] = chunk[:, start : start + self.n_action_steps]
        self.features[worlds] = cond.numpy()
        self._used[worlds] = 0
