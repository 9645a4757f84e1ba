"""`ComposedPolicy`: several trained policies sampled as one (GPC, Cao et al. 2025).

    policy = ComposedPolicy([load_policy("runs/a/best"), load_policy("runs/b/best")], [0.3, 0.7])
    chunk = policy.predict_chunk(history)            # like any chunk policy
    policy.save("runs/ab", parent_paths=["runs/a/best", "runs/b/best"], task="lift")
    policy = load_policy("runs/ab")                  # robomosaic-eval, the ROS 2 policy node, ...

Each parent encodes its own observations (its own keys, its own history length) and denoises in
the one normalized action space they share; `inference.sample_chunk` combines them by `operator`
("convex": the paper's weighted score sum; "and": the product of densities; "or": the mixture;
docs/design.md). The composed policy observes the union of the parents' keys over the longest
history and executes the first parent's chunk layout (horizon and n_action_steps).

Its checkpoint folder holds no weights: config.yaml names the parents by path relative to the folder
with the sha256 of each parent's spec.json (which itself hashes every file of the parent), so a
parent that was retrained or modified is refused by name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from robomosaic.data.spec import KeySpec
from robomosaic.policies.checkpoint import (
    Checkpoint,
    CheckpointError,
    ChunkInterface,
    check_spec_fields,
    load_policy,
    save_checkpoint,
    spec_digest,
)
from robomosaic.policies.inference import (
    CompositionError,
    check_same_action_space,
    check_weights,
    history_batch,
    sample_chunk,
)


class ComposedPolicy(nn.Module):
    """N parents (`DenoisingPolicy` or anything with `bind`, `action_space`, `encoder.obs_keys`,
    `obs_spec`, `n_obs_steps`) composed by `operator` with `weights` (see the module docstring)."""

    policy_class = "ComposedPolicy"

    def __init__(
        self,
        parents: Sequence[nn.Module],
        weights: Sequence[float],
        operator: str = "convex",
        corrector_steps: int = 0,
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if len(parents) < 2:
            raise CompositionError(f"a composed policy needs at least 2 parents, got {len(parents)}")
        self.names = list(names or [f"parent {i}" for i in range(len(parents))])
        self.operator = operator
        self.weights = check_weights(operator, weights, len(parents))
        if corrector_steps < 0:
            raise CompositionError(f"corrector_steps={corrector_steps} must be >= 0")
        self.corrector_steps = int(corrector_steps)
        self.parents = nn.ModuleList(parents)
        check_same_action_space([p.action_space for p in parents], self.names)
        lead = parents[0]
        for p, name in zip(parents[1:], self.names[1:], strict=True):
            if tuple(p.action_spec.shape) != tuple(lead.action_spec.shape):
                raise CompositionError(
                    f"{name} outputs actions of shape {p.action_spec.shape}, "
                    f"{self.names[0]} {lead.action_spec.shape}"
                )
        self.obs_spec: dict[str, KeySpec] = {}
        for p, name in zip(parents, self.names, strict=True):
            for key, spec in p.obs_spec.items():
                if key in self.obs_spec and tuple(self.obs_spec[key].shape) != tuple(spec.shape):
                    raise CompositionError(
                        f"observation {key!r}: {name} reads shape {tuple(spec.shape)}, another parent "
                        f"{tuple(self.obs_spec[key].shape)}"
                    )
                self.obs_spec.setdefault(key, spec)
        self.action_spec = lead.action_spec
        self.horizon, self.n_action_steps = lead.horizon, lead.n_action_steps
        self.n_obs_steps = max(p.n_obs_steps for p in parents)
        self.config: dict[str, Any] = {}  # filled by `save`/`from_checkpoint`: the parents' paths

    def use_backend(self, backend: str) -> ComposedPolicy:
        """Every parent's inference backend (`DenoisingPolicy.use_backend`)."""
        for parent in self.parents:
            parent.use_backend(backend)
        return self

    def bind_parents(self, obs: Mapping[str, Tensor]) -> tuple[list, list[float]]:
        """The parents of positive weight bound to their own keys and history length of `obs`
        ({key: (B, T >= n_obs_steps, ...)}), and their weights; zero-weight parents do no work."""
        bound, weights = [], []
        for p, w, name in zip(self.parents, self.weights, self.names, strict=True):
            if w == 0:
                continue
            own = {k: obs[k][:, obs[k].shape[1] - p.n_obs_steps :] for k in p.encoder.obs_keys}
            bound.append(p.bind(own, name))
            weights.append(w)
        return bound, weights

    @torch.no_grad()
    def sample_actions(
        self,
        obs: Mapping[str, Tensor],
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        committed: Tensor | None = None,
        steps: int | None = None,
        sampler: str | None = None,
    ) -> Tensor:
        """Composed chunks (B, horizon, action_dim) in robot units; see `DenoisingPolicy.sample_actions`."""
        bound, weights = self.bind_parents(obs)
        return sample_chunk(
            bound,
            weights=weights,
            operator=self.operator,
            committed=committed,
            corrector_steps=self.corrector_steps,
            steps=steps,
            sampler=sampler,
            generator=generator,
            noise=noise,
        )

    def predict_chunk(
        self,
        history: Mapping[str, np.ndarray],
        committed: np.ndarray | None = None,
        generator: torch.Generator | None = None,
    ) -> np.ndarray:
        """One chunk (horizon, action_dim) in robot units from one history {key: (n_obs_steps, ...)}."""
        device = next(self.parameters()).device
        obs = history_batch(history, list(self.obs_spec), self.n_obs_steps, device)
        c = None
        if committed is not None:
            c = torch.as_tensor(np.asarray(committed, dtype=np.float32), device=device)[None]
        self.eval()
        return self.sample_actions(obs, generator=generator, committed=c)[0].cpu().numpy().astype(np.float64)

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, path: str | Path, parent_paths: Sequence[str | Path], task: str | None = None) -> Path:
        """A checkpoint folder that references the parents' folders (see the module docstring)."""
        path = Path(path)
        if len(parent_paths) != len(self.parents):
            raise CompositionError(f"got {len(parent_paths)} parent paths for {len(self.parents)} parents")
        parents, rates = [], {}
        for parent, name in zip(parent_paths, self.names, strict=True):
            parent = Path(parent)
            if not (parent / "spec.json").is_file():
                raise CheckpointError(f"parent {name}: {parent} is not a checkpoint folder (no spec.json)")
            rel = os.path.relpath(parent.resolve(), path.resolve())
            parents.append({"name": name, "path": rel, "spec_sha256": spec_digest(parent)})
            if (hz := json.loads((parent / "spec.json").read_text()).get("control_hz")) is not None:
                rates[name] = float(hz)
        if len(set(rates.values())) > 1:
            raise CompositionError(f"parents were trained at different control rates (Hz): {rates}")
        path.mkdir(parents=True, exist_ok=True)
        self.config = {
            "operator": self.operator,
            "weights": self.weights,
            "corrector_steps": self.corrector_steps,
            "parents": parents,
        }
        spec = {
            "obs": {k: v.to_dict() for k, v in self.obs_spec.items()},
            "action": self.action_spec.to_dict(),
            "horizon": self.horizon,
            "n_obs_steps": self.n_obs_steps,
            "n_action_steps": self.n_action_steps,
            **({"control_hz": next(iter(rates.values()))} if rates else {}),
            **({"task": task} if task else {}),
        }
        return save_checkpoint(path, self.policy_class, self.config, {}, spec)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> ComposedPolicy:
        ChunkInterface.from_spec(ckpt.path, ckpt.spec)
        cfg = ckpt.config
        where = ckpt.path / "config.yaml"
        if not isinstance(cfg.get("parents"), list) or not cfg["parents"]:
            raise CheckpointError(f"{where}: missing or empty 'parents' list")
        parents, names = [], []
        for i, entry in enumerate(cfg["parents"]):
            try:
                rel, digest, name = entry["path"], entry["spec_sha256"], entry.get("name", f"parent {i}")
            except (KeyError, TypeError):
                raise CheckpointError(f"{where}: parents[{i}] needs 'path' and 'spec_sha256'") from None
            folder = (ckpt.path / rel).resolve()
            if not (folder / "spec.json").is_file():
                raise CheckpointError(f"{where}: parent {name} ({rel}) not found at {folder}")
            if spec_digest(folder) != digest:
                raise CheckpointError(
                    f"{where}: parent {name} at {folder} changed since the composition was saved "
                    "(its spec.json no longer matches spec_sha256); compose it again"
                )
            parents.append(load_policy(folder))
            names.append(str(name))
        try:
            policy = cls(
                parents,
                cfg["weights"],
                cfg.get("operator", "convex"),
                int(cfg.get("corrector_steps", 0)),
                names,
            )
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{where}: {e}") from None
        if sorted(ckpt.spec["obs"]) != sorted(policy.obs_spec):
            raise CheckpointError(
                f"{ckpt.path / 'spec.json'}: obs lists {sorted(ckpt.spec['obs'])}, but the parents "
                f"observe {sorted(policy.obs_spec)}"
            )
        fields: dict[str | tuple[str, ...], Any] = {
            **{("obs", k, "shape"): list(v.shape) for k, v in policy.obs_spec.items()},
            ("action", "shape"): list(policy.action_spec.shape),
            "horizon": policy.horizon,
            "n_obs_steps": policy.n_obs_steps,
            "n_action_steps": policy.n_action_steps,
        }
        if "control_hz" in ckpt.spec:
            lead = (ckpt.path / cfg["parents"][0]["path"]).resolve() / "spec.json"
            fields["control_hz"] = json.loads(lead.read_text()).get("control_hz")
        check_spec_fields(ckpt.path, ckpt.spec, fields)
        policy.config = dict(cfg)
        return policy.eval()
