"""`DenoisingPolicy`: observation encoder + denoiser network + noise process + normalizer.

One class serves every generative policy of the core: the network (`unet`, `transformer` or
`mode`, the mixture-of-experts transformer of MoDE) and the noise process (`ddpm`, `flow`, `edm`)
are picked by config, and whatever the combination it exposes the same
`denoise(x, sigma, cond) -> x0_hat` contract to the samplers (docs/design.md).

Observations are encoded once per chunk (`encode`) and the embedding is reused at every denoising
step. Actions are normalized per dimension to [-1, 1]; `predict_chunk` returns robot units.

    policy = DenoisingPolicy(config, obs_spec, action_spec, normalizer)
    loss = policy(batch)                               # training (DDP wraps this forward)
    chunk = policy.predict_chunk(history)              # (horizon, action_dim), robot units
    bound = policy.bind(obs)                           # for policies.inference.sample_chunk
    policy.save("runs/lift/best"); policy = load_policy("runs/lift/best")

Inference runs the network on the fast path (`fast_network`: ONNX Runtime on the CPU) where the
backend is "auto", which `load_policy` sets; a policy built in code starts on "eager" (its weights
are about to change) until `use_backend("auto")`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from robomosaic.data.multitask import PADDED_KEY
from robomosaic.data.normalizer import MODES, Normalizer
from robomosaic.data.spec import KeySpec
from robomosaic.policies.checkpoint import (
    Checkpoint,
    CheckpointError,
    ChunkInterface,
    check_spec_fields,
    check_state_dict,
    save_checkpoint,
)
from robomosaic.policies.encoders import ObservationEncoder
from robomosaic.policies.fast_network import OnnxNetwork, build_fast_network
from robomosaic.policies.inference import ActionSpace, BoundDenoiser, history_batch, sample_chunk
from robomosaic.policies.networks import NETWORKS, build_network
from robomosaic.policies.noise import Denoiser, make_process
from robomosaic.policies.samplers import RowGenerators

# What each process feeds the network as its noise input, and the scale that spreads it over the
# range the sinusoidal embedding resolves well (DDPM timesteps are already 0..T-1).
NOISE_SCALE = {"ddpm": 1.0, "flow": 100.0, "edm": 100.0}
# The statistics each normalizer mode reads (`data.normalizer._affine`); other modes read none.
MODE_STATS = {"minmax": ("min", "max"), "meanstd": ("mean", "std")}
# "auto": the fast path (ONNX Runtime) on the CPU where the network exports, else eager PyTorch.
BACKENDS = ("auto", "eager")

DEFAULT_CONFIG: dict[str, Any] = {
    "horizon": 16,
    "n_obs_steps": 2,
    "n_action_steps": 8,
    "network": "unet",  # a name registered by networks.register_network; its section has its options
    "encoder": {"state_feature_dim": 128, "state_hidden_dims": [256]},
    "process": {"name": "ddpm"},
    "sampler": "ddim",
    "steps": 10,
    # Clamp x0_hat to the normalized action range at every step, as diffusion_policy's schedulers
    # do (clip_sample): an epsilon-network's error is multiplied by sigma at high noise levels.
    "clip_sample": True,
}


def merge_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """DEFAULT_CONFIG plus every registered network's section of defaults, updated (one level deep
    for nested sections) by `config`."""
    merged = copy.deepcopy({**DEFAULT_CONFIG, **{name: dict(e.defaults) for name, e in NETWORKS.items()}})
    for key, value in (config or {}).items():
        if key not in merged:
            raise KeyError(f"unknown policy config key {key!r} (known: {sorted(merged)})")
        if isinstance(merged[key], dict) and isinstance(value, Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


class DenoisingPolicy(nn.Module):
    """A chunked diffusion / flow policy (see the module docstring)."""

    policy_class = "DenoisingPolicy"

    def __init__(
        self,
        config: Mapping[str, Any] | None,
        obs_spec: Mapping[str, KeySpec],
        action_spec: KeySpec,
        normalizer: Normalizer,
    ) -> None:
        super().__init__()
        self.config = merge_config(config)
        cfg = self.config
        self.obs_spec = dict(obs_spec)
        self.action_spec = action_spec
        self.normalizer = normalizer
        self.horizon, self.n_obs_steps = int(cfg["horizon"]), int(cfg["n_obs_steps"])
        self.n_action_steps = int(cfg["n_action_steps"])
        if not 1 <= self.n_action_steps <= self.horizon - self.n_obs_steps + 1:
            raise ValueError(
                f"n_action_steps={self.n_action_steps} must be in [1, horizon - n_obs_steps + 1 = "
                f"{self.horizon - self.n_obs_steps + 1}]"
            )
        missing = [k for k in [*self.obs_spec, "action"] if k not in normalizer.modes]
        if missing:
            raise ValueError(f"the normalizer has no statistics for {missing}")
        self.action_dim = int(np.prod(action_spec.shape))
        encoder_cfg = dict(cfg["encoder"])
        self.encoder = ObservationEncoder(self.obs_spec, self.n_obs_steps, **encoder_cfg)
        process_cfg = dict(cfg["process"])
        process_name = process_cfg.pop("name")
        self.process = make_process(process_name, **process_cfg)
        self.network = build_network(
            cfg["network"],
            self.action_dim,
            self.encoder.out_dim,
            self.horizon,
            NOISE_SCALE[process_name],
            cfg.get(cfg["network"], {}),
        )
        self.action_space = ActionSpace(self.horizon, self.action_dim, normalizer)
        self._denoise = self.process.denoiser(self.network)
        self.backend = "eager"
        self._fast: OnnxNetwork | bool | None = None  # None: not built; False: cannot be built

    # -- the inference backend ------------------------------------------------------------------
    def use_backend(self, backend: str) -> DenoisingPolicy:
        """Run inference on `backend` ("auto": the fast path where it builds; "eager")."""
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}, expected one of {BACKENDS}")
        self.backend, self._fast = backend, None
        return self

    def _fast_denoise(self, cond: Tensor) -> Denoiser | None:
        """The process's denoise over the fast network for conditions like `cond`, or None where
        inference stays eager. Rebuilt when the thread count or the condition's shape changes."""
        if self.backend == "eager" or self.training or cond.device.type != "cpu":
            return None
        shape = tuple(cond.shape[1:])
        built = self._fast
        if built is None or (built and (built.threads, built.cond_shape) != (torch.get_num_threads(), shape)):
            self._fast = build_fast_network(self.network, self.horizon, self.action_dim, shape) or False
        return self.process.denoiser(self._fast) if self._fast else None

    # The exported graph holds a copy of the weights: drop it whenever they may change.
    def train(self, mode: bool = True) -> DenoisingPolicy:
        if mode:
            self._fast = None
        return super().train(mode)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._fast = None
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> DenoisingPolicy:
        self._fast = None
        return super()._apply(fn, recurse)

    # -- the contract ---------------------------------------------------------------------------
    def encode(self, obs: Mapping[str, Tensor]) -> Tensor:
        """Observation histories {key: (B, n_obs_steps, ...)} in robot units -> cond (B, cond_dim)."""
        return self.encoder({k: self.normalizer.normalize(obs[k], k) for k in self.encoder.obs_keys})

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        """x0_hat of a VE-noisy normalized action chunk (the core contract)."""
        return self._clip(self._denoise(x, sigma, cond))

    def _clip(self, x0_hat: Tensor) -> Tensor:
        return x0_hat.clamp(-1.0, 1.0) if self.config["clip_sample"] else x0_hat

    # -- training -------------------------------------------------------------------------------
    def forward(
        self,
        batch: Mapping[str, Any],
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        level: Tensor | None = None,
    ) -> Tensor:
        """The training loss of a `SequenceDataset` batch (forward, so that DDP can wrap it).

        `noise` and `level` (the process's own noise level per sample) are drawn when not given.
        """
        actions = self.normalizer.normalize(batch["action"].float(), "action")
        cond = self.encode(batch["obs"])
        example = self.process.training_example(actions, noise=noise, level=level, generator=generator)
        prediction = self.network(example.net_input, example.net_time, cond)
        return self.process.loss(prediction, example) + self.network.auxiliary_loss()

    # -- inference ------------------------------------------------------------------------------
    def bind(self, obs: Mapping[str, Tensor], name: str = "policy") -> BoundDenoiser:
        """This policy's denoiser with a batch of observation histories {key: (B, n_obs_steps, ...)}
        in robot units encoded once (the inference core's unit, `inference.sample_chunk`)."""
        return self.bind_encoded(self.encode(obs), name)

    def bind_encoded(self, cond: Tensor, name: str = "policy") -> BoundDenoiser:
        """`bind` for observations already encoded (`encode`), for callers that use the condition
        itself too (COMPASS's residual reads the base's features)."""
        fast = self._fast_denoise(cond)

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            if fast is None or (torch.is_grad_enabled() and x.requires_grad):  # gradients: eager
                return self.denoise(x, sigma, cond)
            return self._clip(fast(x, sigma, cond))

        return BoundDenoiser(
            denoise=denoise,
            process=self.process,
            action_space=self.action_space,
            batch=cond.shape[0],
            device=cond.device,
            steps=int(self.config["steps"]),
            sampler=str(self.config["sampler"]),
            sampling=self.network.sampling,
            name=name,
        )

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
        """Action chunks (B, horizon, action_dim) in robot units for a batch of histories.

        `committed` (B, horizon, action_dim) in robot units, NaN where free, is inpainted (real-time
        chunking: the new chunk reproduces the actions that will execute before it takes over).
        """
        return sample_chunk(
            self.bind(obs),
            committed=committed,
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
        obs = history_batch(history, self.encoder.obs_keys, self.n_obs_steps, device)
        c = None
        if committed is not None:
            c = torch.as_tensor(np.asarray(committed, dtype=np.float32), device=device)[None]
        with self._evaluating():
            chunk = self.sample_actions(obs, generator=generator, committed=c)
        return chunk[0].cpu().numpy().astype(np.float64)

    def predict_chunks(
        self,
        histories: Sequence[Mapping[str, np.ndarray]],
        committed: Sequence[np.ndarray | None],
        generators: Sequence[torch.Generator],
    ) -> list[np.ndarray]:
        """`predict_chunk` for several histories, each with its own noise stream: equal, bit for
        bit, to calling it on each one. One batched sampling run where that holds: the fast path
        (ONNX Runtime's kernels give every row the same result whatever the batch; eager
        PyTorch's do not, by ~1e-6) without committed actions (their guidance takes gradients,
        on eager). Each history is encoded on its own, which keeps the condition bit-identical.
        Otherwise one `predict_chunk` call each."""
        if len(histories) > 1 and all(c is None for c in committed):
            device = next(self.parameters()).device
            with self._evaluating(), torch.no_grad():
                rows = [history_batch(h, self.encoder.obs_keys, self.n_obs_steps, device) for h in histories]
                cond = torch.cat([self.encode(obs) for obs in rows])
                if self._fast_denoise(cond) is not None:
                    chunks = sample_chunk(self.bind_encoded(cond), generator=RowGenerators(generators))
                    return list(chunks.cpu().numpy().astype(np.float64))
        return [self.predict_chunk(h, c, g) for h, c, g in zip(histories, committed, generators, strict=True)]

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Inference mode for the duration (the training flag restored after); switching modes walks
        every submodule, so it is done only when needed."""
        was_training = self.training
        if was_training:
            self.eval()
        try:
            yield
        finally:
            if was_training:
                self.train(True)

    # -- checkpoints ----------------------------------------------------------------------------
    def spec_dict(self) -> dict[str, Any]:
        return {
            "obs": {k: v.to_dict() for k, v in self.obs_spec.items()},
            "action": self.action_spec.to_dict(),
            "horizon": self.horizon,
            "n_obs_steps": self.n_obs_steps,
            "n_action_steps": self.n_action_steps,
        }

    def save(self, path: str | Path, extra_spec: Mapping[str, Any] | None = None) -> Path:
        """Write a checkpoint folder (config.yaml, model/normalizer safetensors, spec.json)."""
        normalizer_tensors = {
            f"{k}/{n}": torch.as_tensor(v) for k, s in self.normalizer.stats.items() for n, v in s.items()
        }
        spec = {**self.spec_dict(), "normalizer_modes": self.normalizer.modes, **dict(extra_spec or {})}
        return save_checkpoint(
            path,
            self.policy_class,
            self.config,
            {"model": self.state_dict(), "normalizer": normalizer_tensors},
            spec,
        )

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> DenoisingPolicy:
        """The policy of a checkpoint whose spec.json describes what config.yaml and the weights build:
        obs and action shapes are checked against the normalizer statistics (and, through the
        encoder and network they build, the weights), horizon, n_obs_steps, n_action_steps and the
        task set against the config. Provenance, task, control_hz and dataset fields are records."""
        spec = ckpt.spec
        interface = ChunkInterface.from_spec(ckpt.path, spec)
        obs_spec, action_spec = interface.obs_spec, interface.action_spec
        if not isinstance(modes := spec.get("normalizer_modes"), dict):
            raise CheckpointError(f"{ckpt.path / 'spec.json'}: missing or malformed entry 'normalizer_modes'")
        stats: dict[str, dict[str, np.ndarray]] = {}
        for name, tensor in ckpt.parts.get("normalizer", {}).items():
            key, _, stat = name.rpartition("/")
            stats.setdefault(key, {})[stat] = tensor.numpy()
        check_normalizer(ckpt.path, {**obs_spec, "action": action_spec}, modes, stats)
        try:
            policy = cls(ckpt.config, obs_spec, action_spec, Normalizer(modes, stats))
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{ckpt.path}: config.yaml does not build a policy: {e}") from None
        weights = ckpt.parts.get("model")
        if weights is None:
            raise CheckpointError(f"{ckpt.path}: no model.safetensors")
        check_state_dict(str(ckpt.path / "model.safetensors"), policy.state_dict(), weights)
        fields: dict[str | tuple[str, ...], Any] = {
            "horizon": policy.horizon,
            "n_obs_steps": policy.n_obs_steps,
            "n_action_steps": policy.n_action_steps,
        }
        if "task_set" in spec:  # a multitask policy: one task-id embedding per task, padded object
            tasks = spec["task_set"].get("tasks", []) if isinstance(spec["task_set"], dict) else []
            embeds = policy.encoder.task.num_tasks if policy.encoder.task else None
            if embeds != len(tasks):
                raise CheckpointError(
                    f"{ckpt.path / 'spec.json'}: task_set.tasks lists {len(tasks)} task(s), but the "
                    f"policy built from config.yaml and the weights embeds {embeds} task ids"
                )
            fields["task_set", "object_dim"] = (
                obs_spec[PADDED_KEY].shape[-1] if PADDED_KEY in obs_spec else None
            )
        check_spec_fields(ckpt.path, spec, fields)
        policy.load_state_dict(weights)
        policy.eval()
        return policy.use_backend("auto")


def check_normalizer(
    path: Path,
    keys: Mapping[str, KeySpec],
    modes: Mapping[str, Any],
    stats: Mapping[str, Mapping[str, np.ndarray]],
) -> None:
    """spec.json's normalizer_modes gives every obs key and the action a known mode, and
    normalizer.safetensors holds the statistics of each mode, of the key's shape in spec.json."""
    spec_file, file = path / "spec.json", path / "normalizer.safetensors"
    for key, key_spec in keys.items():
        mode = modes.get(key)
        if mode not in MODES:
            raise CheckpointError(
                f"{spec_file}: normalizer_modes.{key} is {mode!r}, expected one of {list(MODES)}"
            )
        for stat in MODE_STATS.get(mode, ()):
            if stat not in stats.get(key, {}):
                raise CheckpointError(
                    f"{file}: no tensor '{key}/{stat}' (normalizer_modes.{key} is {mode!r})"
                )
        for stat, value in stats.get(key, {}).items():
            if tuple(value.shape) != tuple(key_spec.shape):
                field = "action" if key == "action" else f"obs.{key}"
                raise CheckpointError(
                    f"{spec_file}: {field}.shape is {list(key_spec.shape)}, but {file} holds "
                    f"'{key}/{stat}' of shape {list(value.shape)}"
                )
    unknown = sorted(set(stats) - set(modes))
    if unknown:
        raise CheckpointError(f"{file}: statistics of {unknown[0]!r}, which normalizer_modes does not list")
