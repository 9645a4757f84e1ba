"""`robomosaic-train`: train a DenoisingPolicy on a zarr dataset, select checkpoints in simulation.

    robomosaic-train task=lift policy=unet flow=ddpm dataset=demos/lift.zarr out=runs/lift
    torchrun --nproc_per_node 2 -m robomosaic.policies.train ...      # the same, data-parallel

One readable loop: AdamW with warm-up + cosine decay (diffusers' scheduler), gradient clipping, an
EMA of the weights (diffusers' EMAModel) that is what gets evaluated and saved, TensorBoard scalars,
and every `eval_every` steps a rollout evaluation of the EMA policy in simulation whose success rate
keeps the top-k checkpoints (validation loss is a poor selector for these policies). `out/last`
holds everything needed to resume (`resume=true`), as safetensors and json.

Output folder:

    out/config.yaml                 the resolved config
    out/checkpoints/step_XXXXXXX/   top-k policy checkpoints by success rate (load_policy works)
    out/best/                       a copy of the best of them
    out/last/                       the latest policy + training_state.safetensors (for resume)
    out/metrics.jsonl, out/tb/      losses, learning rate, evaluations
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from robomosaic.conf.console import RobomosaicError, console_script
from robomosaic.data.multitask import TASK_ID, TaskSet
from robomosaic.data.normalizer import Normalizer
from robomosaic.data.sampler import SequenceDataset, SequenceSampler, make_dataloader, split_episodes
from robomosaic.data.spec import KeySpec
from robomosaic.data.store import META_FIELDS, EpisodeStore
from robomosaic.policies.denoising_policy import DenoisingPolicy
from robomosaic.policies.precision import autocast, resolve_precision
from robomosaic.sim.tasks import PROPRIO_KEYS

# Rollouts used to *select* checkpoints start at this seed; final evaluation (robomosaic-eval)
# uses 1_000_000 and up and data collection small seeds from 0, so the three never overlap.
SELECTION_SEED_OFFSET = 500_000


class TrainingError(RobomosaicError, ValueError):
    """A dataset or config that cannot be trained on; raised before any training step."""


# -- set-up --------------------------------------------------------------------------------------


def policy_config(cfg: DictConfig, task_set: TaskSet | None = None) -> dict[str, Any]:
    """The DenoisingPolicy config: the `policy` group plus the `flow` group's process/sampler; a
    multitask dataset's task set sizes the task-id embedding."""
    merged = {
        **OmegaConf.to_container(cfg.policy, resolve=True),
        **OmegaConf.to_container(cfg.flow, resolve=True),
    }
    if task_set is not None:
        merged["encoder"] = {**merged.get("encoder", {}), "num_tasks": len(task_set.tasks)}
    return merged


def dataset_task_set(store: EpisodeStore) -> TaskSet | None:
    """The task set of a multitask store written by robomosaic-merge (None for one task)."""
    task_set = store.spec.extra.get("task_set")
    return TaskSet.from_dict(task_set) if task_set else None


def observation_keys(cfg: DictConfig, store: EpisodeStore) -> list[str]:
    """`obs_keys` if given, else the task config's (navigation); else proprioception plus the
    configured cameras, or plus the object state when no camera is configured (an image policy must
    find the object in its images)."""
    if cfg.obs_keys or cfg.task.get("obs_keys"):
        keys = list(cfg.obs_keys or cfg.task.obs_keys)
    elif cfg.task.cameras:
        keys = [*PROPRIO_KEYS, *(f"{cam}_image" for cam in cfg.task.cameras)]
    else:
        keys = [*PROPRIO_KEYS, "object"]
    if dataset_task_set(store) and TASK_ID not in keys:
        keys.append(TASK_ID)
    missing = [k for k in [*keys, "action"] if k not in store.spec.keys]
    if missing:
        raise TrainingError(
            f"{store.path}: dataset lacks key(s) {missing} needed for training "
            f"(it has {sorted(store.spec.keys)}); set obs_keys=[...] or task.cameras=[...]"
        )
    return keys


def load_dataset(cfg: DictConfig) -> tuple[EpisodeStore, np.ndarray, np.ndarray]:
    """Open (and validate) the store; split episodes into train and validation."""
    path = Path(cfg.dataset)
    if not path.exists():
        raise TrainingError(f"dataset {path} does not exist (collect one with robomosaic-collect)")
    store = EpisodeStore.open(path, mode="r", in_memory=bool(cfg.train.in_memory))
    ranges = store.check_values(float(cfg.data_limit))
    print(f"{path}: value ranges " + ", ".join(f"{k} [{lo:.3g}, {hi:.3g}]" for k, (lo, hi) in ranges.items()))
    if store.n_episodes < 2:
        raise TrainingError(f"{path}: {store.n_episodes} episode(s); need at least 2 to train")
    if store.spec.task and store.spec.task != cfg.task.name:
        raise TrainingError(
            f"{path}: dataset was recorded on task {store.spec.task!r}, config says {cfg.task.name!r}"
        )
    refuse_held_out(store)
    chosen = selected_episodes(store, cfg.episodes)
    train_pos, val_pos = split_episodes(len(chosen), float(cfg.val_ratio), int(cfg.seed))
    return store, chosen[train_pos], chosen[val_pos]


def refuse_held_out(store: EpisodeStore) -> None:
    """A navigation store recorded on an embodiment kept for evaluation only is not trained on."""
    from robomosaic.sim.mobility.embodiments import load_embodiment

    for name in store.spec.extra.get("embodiments", []):
        if load_embodiment(name).held_out:
            raise TrainingError(
                f"{store.path}: recorded on the held-out embodiment {name}, which is for evaluation only"
            )


def selected_episodes(store: EpisodeStore, where: Mapping[str, Any] | None) -> np.ndarray:
    """Indices of the episodes whose metadata matches `where` ({field: [allowed values]}, e.g.
    {behaviour: [red, green]}); every episode when None."""
    if not where:
        return np.arange(store.n_episodes)
    keep = np.ones(store.n_episodes, dtype=bool)
    for field, allowed in where.items():
        if field not in META_FIELDS:
            raise TrainingError(f"episodes.{field}: no such episode field (fields: {list(META_FIELDS)})")
        values = store.meta_array(field)
        keep &= np.isin(values.astype(str) if values.dtype.kind in "OUT" else values, list(allowed))
    chosen = np.flatnonzero(keep)
    if len(chosen) < 2:
        raise TrainingError(
            f"{store.path}: episodes={dict(where)} selects {len(chosen)} episode(s); need at least 2"
        )
    return chosen


def reuse_action_normalization(normalizer: Normalizer, checkpoint: str | Path, action: KeySpec) -> Normalizer:
    """`normalizer` with the action statistics of another checkpoint, so that the two policies
    denoise in one normalized action space and can be composed (GPC)."""
    from robomosaic.policies.checkpoint import CheckpointError, read_checkpoint

    try:
        ckpt = read_checkpoint(checkpoint)
    except CheckpointError as e:
        raise TrainingError(f"normalizer_from={checkpoint}: {e}") from None
    mode = ckpt.spec.get("normalizer_modes", {}).get("action")
    stats = {
        name.removeprefix("action/"): t.numpy()
        for name, t in ckpt.parts.get("normalizer", {}).items()
        if name.startswith("action/")
    }
    if mode is None:
        raise TrainingError(f"normalizer_from={checkpoint}: its spec.json has no action normalization")
    theirs = tuple(ckpt.spec.get("action", {}).get("shape", ()))
    if theirs != tuple(action.shape):
        raise TrainingError(
            f"normalizer_from={checkpoint}: its actions have shape {theirs}, "
            f"this dataset's {tuple(action.shape)}"
        )
    return Normalizer({**normalizer.modes, "action": mode}, {**normalizer.stats, "action": stats})


def make_loader(
    store: EpisodeStore,
    obs_keys: Sequence[str],
    policy: DenoisingPolicy,
    episodes: np.ndarray,
    cfg: DictConfig,
) -> DataLoader:
    sampler = SequenceSampler(
        store, obs_keys, ("action",), policy.horizon, policy.n_obs_steps, episodes=episodes
    )
    dataset = SequenceDataset(sampler)
    if len(dataset) < cfg.train.batch_size:
        raise TrainingError(
            f"{store.path}: {len(dataset)} training windows, fewer than batch_size={cfg.train.batch_size}"
        )
    if dist.is_initialized():
        order = DistributedSampler(dataset, shuffle=True, seed=int(cfg.seed), drop_last=True)
        return DataLoader(
            dataset,
            sampler=BatchSampler(order, cfg.train.batch_size // dist.get_world_size(), drop_last=True),
            batch_size=None,
            num_workers=int(cfg.train.num_workers),
        )
    return make_dataloader(
        dataset, cfg.train.batch_size, num_workers=int(cfg.train.num_workers), seed=int(cfg.seed)
    )


def forever(loader: DataLoader) -> Iterator[dict[str, Any]]:
    epoch = 0
    while True:
        # Batches come from a BatchSampler passed as the loader's sampler (batch_size=None).
        order = getattr(loader.sampler, "sampler", None)
        if isinstance(order, DistributedSampler):
            order.set_epoch(epoch)
        yield from loader
        epoch += 1


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: to_device(v, device) if isinstance(v, Mapping) else v.to(device) for k, v in batch.items()}


# -- resumable training state, never pickled --------------------------------------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's state as flat tensors `optimizer/<param index>/<name>` and its param groups
    (json-safe), so that it is saved with safetensors, never pickled."""
    opt = optimizer.state_dict()
    tensors = {
        f"optimizer/{idx}/{name}": torch.as_tensor(value).detach().cpu()
        for idx, state in opt["state"].items()
        for name, value in state.items()
    }
    return tensors, opt["param_groups"]


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], param_groups: list[dict]
) -> None:
    """The inverse of `optimizer_tensors` (other keys of `tensors` are ignored)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_training_state(path: Path, step: int, model: torch.nn.Module, optimizer, scheduler, ema) -> None:
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    for i, p in enumerate(ema.shadow_params):
        tensors[f"ema/{i}"] = p
    optimizer_state, param_groups = optimizer_tensors(optimizer)
    tensors.update(optimizer_state)
    ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    meta = {
        "step": step,
        "param_groups": param_groups,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},  # functions
        "ema": ema_meta,
    }
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), {"meta": json.dumps(meta)}
    )


def load_training_state(path: Path, model: torch.nn.Module, optimizer, scheduler, ema) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    tensors = load_file(str(path))
    model.load_state_dict({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")})
    load_optimizer_tensors(optimizer, tensors, meta["param_groups"])
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    shadow = [tensors[f"ema/{i}"] for i in range(len(ema.shadow_params))]
    ema.load_state_dict({**meta["ema"], "shadow_params": shadow})
    return int(meta["step"])


# -- checkpoints ranked by success ------------------------------------------------------------------


class TopK:
    """Keeps the k best checkpoints by success rate (ties: the later step) and a copy of the best."""

    def __init__(self, out: Path, k: int) -> None:
        self.out, self.k = out, k
        self.index_file = out / "checkpoints" / "index.json"
        self.entries: list[dict[str, Any]] = (
            json.loads(self.index_file.read_text()) if self.index_file.exists() else []
        )

    def offer(self, policy: DenoisingPolicy, step: int, score: float, extra_spec: dict[str, Any]) -> bool:
        ranked = sorted(self.entries, key=lambda e: (e["score"], e["step"]), reverse=True)
        if len(ranked) >= self.k and (score, step) <= (ranked[-1]["score"], ranked[-1]["step"]):
            return False
        path = self.out / "checkpoints" / f"step_{step:07d}"
        policy.save(path, {**extra_spec, "selection_success_rate": score})
        ranked.append({"step": step, "score": score, "path": str(path.relative_to(self.out))})
        ranked.sort(key=lambda e: (e["score"], e["step"]), reverse=True)
        for dropped in ranked[self.k :]:
            shutil.rmtree(self.out / dropped["path"], ignore_errors=True)
        self.entries = ranked[: self.k]
        self.index_file.write_text(json.dumps(self.entries, indent=2))
        best = self.out / "best"
        shutil.rmtree(best, ignore_errors=True)
        shutil.copytree(self.out / self.entries[0]["path"], best)
        return True


# -- the loop ----------------------------------------------------------------------------------------


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if dist.is_initialized() else 0), world, device


def training_step(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor]:
    """One optimizer step on `batch`: the loss forward under `precision` ('fp32' or 'bf16', see
    `precision.resolve_precision`), backward, gradient clipping; returns (loss, gradient norm)."""
    with autocast(precision, next(model.parameters()).device):
        loss = model(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach(), grad_norm


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run training as configured; returns a summary (best score, steps, wall time)."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    rank, world, device = setup_distributed()
    if cfg.train.batch_size % world:
        raise TrainingError(f"train.batch_size={cfg.train.batch_size} is not divisible by {world} processes")
    torch.manual_seed(int(cfg.seed) + rank)
    np.random.seed(int(cfg.seed) + rank)
    out = Path(cfg.out)
    store, train_eps, val_eps = load_dataset(cfg)
    obs_keys = observation_keys(cfg, store)
    normalizer = Normalizer.fit(
        store,
        [*obs_keys, "action"],
        mode=dict(cfg.normalizer) if cfg.normalizer else "minmax",
        episodes=train_eps,
    )
    if cfg.normalizer_from:
        normalizer = reuse_action_normalization(normalizer, cfg.normalizer_from, store.spec.keys["action"])
    obs_spec = {k: store.spec.keys[k] for k in obs_keys}
    task_set = dataset_task_set(store)
    config = policy_config(cfg, task_set)
    policy = DenoisingPolicy(config, obs_spec, store.spec.keys["action"], normalizer).to(device)
    loader = make_loader(store, obs_keys, policy, train_eps, cfg)
    model = torch.nn.parallel.DistributedDataParallel(policy) if world > 1 else policy
    opt_cfg = cfg.optimizer
    optimizer = torch.optim.AdamW(
        policy.parameters(),
        lr=opt_cfg.lr,
        betas=tuple(opt_cfg.betas),
        weight_decay=opt_cfg.weight_decay,
        fused=True,  # one kernel for all parameters: the per-tensor loop costs more than the math here
    )
    steps = int(cfg.train.steps)
    scheduler = get_scheduler(
        opt_cfg.schedule, optimizer, num_warmup_steps=int(opt_cfg.warmup_steps), num_training_steps=steps
    )
    ema = EMAModel(
        policy.parameters(), power=float(cfg.train.ema.power), decay=float(cfg.train.ema.max_decay)
    )
    ema_policy = DenoisingPolicy(config, obs_spec, store.spec.keys["action"], normalizer).to(device)
    precision = resolve_precision(str(cfg.train.precision), device)

    step = 0
    if cfg.resume and (out / "last" / "training_state.safetensors").exists():
        step = load_training_state(
            out / "last" / "training_state.safetensors", policy, optimizer, scheduler, ema
        )
        ema.to(device)
    elif (out / "last").exists() and not cfg.resume:
        raise TrainingError(
            f"{out} already holds a run; pass resume=true to continue it or choose another out="
        )
    is_main = rank == 0
    extra_spec = {
        "task": cfg.task.name,
        "control_hz": store.spec.control_hz,
        "dataset": str(Path(cfg.dataset).resolve()),
        "dataset_episodes": int(store.n_episodes),
        "train_episodes": [int(i) for i in train_eps],
        **({"normalizer_from": str(cfg.normalizer_from)} if cfg.normalizer_from else {}),
    }
    if task_set is not None:
        extra_spec["task_set"] = task_set.to_dict()
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        writer = SummaryWriter(str(out / "tb"))
        metrics = open(out / "metrics.jsonl", "a")  # noqa: SIM115  (closed at the end of training)
        print(
            f"robomosaic-train: {cfg.task.name} {config['network']}/{cfg.flow.process.name}, "
            f"{sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters, "
            f"{store.n_episodes} episodes ({len(train_eps)} train / {len(val_eps)} val), "
            f"{len(loader.dataset)} windows, device {device} ({precision}), {world} process(es)"
        )
    topk = TopK(out, int(cfg.train.top_k)) if is_main else None
    batches = forever(loader)
    started = time.perf_counter()
    bar = tqdm(
        total=steps, initial=step, desc="train", disable=not is_main or not cfg.progress, dynamic_ncols=True
    )
    best = max((e["score"] for e in topk.entries), default=float("nan")) if topk else float("nan")
    while step < steps:
        policy.train()
        batch = to_device(next(batches), device)
        loss, grad_norm = training_step(model, batch, optimizer, float(cfg.train.grad_clip), precision)
        scheduler.step()
        ema.step(policy.parameters())
        step += 1
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower optimizer.lr")
        if is_main:
            bar.update(1)
            if step % int(cfg.train.log_every) == 0 or step == steps:
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}", best=f"{best:.2f}")
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
                metrics.write(json.dumps({"step": step, "loss": loss.item(), "lr": lr}) + "\n")
                metrics.flush()
        evaluate_now = int(cfg.train.eval_every) > 0 and (
            step % int(cfg.train.eval_every) == 0 or step == steps
        )
        if is_main and (evaluate_now or step % int(cfg.train.checkpoint_every) == 0 or step == steps):
            ema.copy_to(ema_policy.parameters())
            ema_policy.eval().use_backend("auto")  # new weights: the fast path is exported again
            if evaluate_now:
                val_loss = validation_loss(ema_policy, store, obs_keys, val_eps, cfg, device)
                score = rollout_success(ema_policy, cfg, task_set)
                best = score if math.isnan(best) else max(best, score)
                kept = topk.offer(ema_policy, step, score, {**extra_spec, "train_step": step})
                writer.add_scalar("eval/success_rate", score, step)
                writer.add_scalar("eval/val_loss", val_loss, step)
                record = {"step": step, "success_rate": score, "val_loss": val_loss, "kept": kept}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                tqdm.write(
                    f"step {step}: success {score:.2f} on {cfg.train.eval_episodes} selection seeds, "
                    f"val loss {val_loss:.4f}{' (kept)' if kept else ''}"
                )
            ema_policy.save(out / "last", {**extra_spec, "train_step": step})
            save_training_state(
                out / "last" / "training_state.safetensors", step, policy, optimizer, scheduler, ema
            )
        if dist.is_initialized() and (evaluate_now or step % int(cfg.train.checkpoint_every) == 0):
            dist.barrier()
    bar.close()
    if is_main and not topk.entries:  # no rollout evaluation configured: the last policy is the best
        shutil.rmtree(out / "best", ignore_errors=True)
        shutil.copytree(out / "last", out / "best", ignore=shutil.ignore_patterns("training_state.*"))
    elapsed = time.perf_counter() - started
    summary = {"steps": step, "seconds": elapsed, "best_success_rate": best, "out": str(out)}
    if is_main:
        writer.close()
        metrics.close()
        print(
            f"robomosaic-train: done in {elapsed / 60:.1f} min; "
            f"best selection success {best:.2f}; {out / 'best'}"
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


@torch.no_grad()
def validation_loss(
    policy: DenoisingPolicy,
    store: EpisodeStore,
    obs_keys: Sequence[str],
    episodes: np.ndarray,
    cfg: DictConfig,
    device,
) -> float:
    """Mean denoising loss on held-out episodes (fixed noise, so comparable across evaluations)."""
    if len(episodes) == 0:
        return float("nan")
    sampler = SequenceSampler(
        store, obs_keys, ("action",), policy.horizon, policy.n_obs_steps, episodes=episodes
    )
    loader = make_dataloader(SequenceDataset(sampler), min(256, len(sampler)), shuffle=False, drop_last=False)
    generator = torch.Generator(device=device).manual_seed(0)
    losses = [policy(to_device(b, device), generator=generator).item() for b in loader]
    return float(np.mean(losses))


def rollout_success(policy: DenoisingPolicy, cfg: DictConfig, task_set: TaskSet | None) -> float:
    """Success of the EMA policy on the selection seeds through the shared chunk executor (a
    multitask policy: the mean over its tasks, `train.eval_episodes` each)."""
    from robomosaic.policies.evaluate import evaluate

    tasks = task_set.tasks if task_set else (cfg.task.name,)
    rates = [
        evaluate(
            policy,
            task=task,
            episodes=int(cfg.train.eval_episodes),
            seed_offset=SELECTION_SEED_OFFSET,
            workers=int(cfg.train.eval_workers),
            progress=False,
            task_set=task_set,
        )["success_rate"]
        for task in tasks
    ]
    return float(np.mean(rates))


@console_script("robomosaic-train")
def run(argv: list[str]) -> dict[str, Any]:
    """robomosaic-train's work: compose the config from `argv`, train, return the summary."""
    from robomosaic.conf import compose

    cfg = compose("train", argv)
    missing = [k for k in ("dataset", "out") if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise SystemExit(f"robomosaic-train: set {' and '.join(f'{k}=...' for k in missing)}")
    return train(cfg)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script (returns None: a returned value would become the exit status)."""
    run(argv)


if __name__ == "__main__":
    main()
