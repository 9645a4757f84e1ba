"""One side of bench/vs_lerobot.py: LeRobot's DiffusionPolicy or our DenoisingPolicy, in this process.

    <venv>/bin/python bench/vs_lerobot_worker.py --system lerobot|robomosaic

Started by bench/vs_lerobot.py with the python of the system's own venv (LeRobot pins another
torch). Reads one JSON request per line on stdin and answers one JSON line per request on stdout;
everything else (logs, warnings, library prints) goes to stderr. A failed request is answered with
{"error": "..."}. Requests:

    {"cmd": "build", "down_dims": [...], "threads": n, "backend": "auto"|"eager"}
        -> {"params", "flops", "precision", "torch", "backend", "warmup_ms"}
    {"cmd": "infer", "repeats": k}         -> {"ms": [k floats]}       batch-1 chunk latency
    {"cmd": "train", "batch": b, "steps": s} -> {"samples_per_s": [s floats], "precision"}
    {"cmd": "exit"}

Both policies are built at one configuration: state-only observations 9 + 10 dims, action 7,
horizon 16, n_obs_steps 2, n_action_steps 8, DDIM with 10 inference steps over 100 training steps,
U-Net with the given down_dims, kernel 5, GroupNorm 8 groups, step embedding 128, FiLM scale and
bias, the raw states concatenated as the conditioning (no observation MLP), min/max normalization.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, ClassVar, TextIO

import torch
from torch.utils.flop_counter import FlopCounterMode

HORIZON, N_OBS, N_ACTION, ACTION_DIM = 16, 2, 8, 7
STATE_DIM, ENV_DIM = 9, 10
INFERENCE_STEPS, TRAIN_TIMESTEPS = 10, 100
KERNEL, GROUPS, STEP_EMBED = 5, 8, 128
WARMUP = 2


def random_obs(keys: dict[str, int], batch: int) -> dict[str, torch.Tensor]:
    """Fixed observation histories {key: (batch, N_OBS, dim)} in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    return {k: torch.rand(batch, N_OBS, d, generator=g) * 2 - 1 for k, d in keys.items()}


def random_actions(batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(batch, HORIZON, ACTION_DIM, generator=g) * 2 - 1


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def call_flops(call: Callable[[], Any]) -> int:
    """FLOPs torch's FlopCounterMode counts (convolutions and matrix products) in one call."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        call()
    return int(counter.get_total_flops())


def timed_ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


class LeRobotSide:
    """LeRobot 0.4.4: `DiffusionPolicy` with the pre/post-processor pipelines that normalize."""

    keys: ClassVar[dict[str, int]] = {
        "observation.state": STATE_DIM,
        "observation.environment_state": ENV_DIM,
    }
    precision = "fp32"  # lerobot-train's Accelerator autocasts only with policy.use_amp (default off)

    def build(self, down_dims: list[int], backend: str) -> dict[str, Any]:
        del backend  # LeRobot has one path
        from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
        from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
        from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
        from lerobot.policies.diffusion.processor_diffusion import make_diffusion_pre_post_processors

        minmax = NormalizationMode.MIN_MAX
        config = DiffusionConfig(
            input_features={
                "observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,)),
                "observation.environment_state": PolicyFeature(FeatureType.ENV, (ENV_DIM,)),
            },
            output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
            # ENV is not in the default mapping (it would pass unnormalized); ours normalizes it
            normalization_mapping={"STATE": minmax, "ENV": minmax, "ACTION": minmax},
            device="cpu",
            horizon=HORIZON,
            n_obs_steps=N_OBS,
            n_action_steps=N_ACTION,
            down_dims=tuple(down_dims),
            kernel_size=KERNEL,
            n_groups=GROUPS,
            diffusion_step_embed_dim=STEP_EMBED,
            use_film_scale_modulation=True,
            noise_scheduler_type="DDIM",
            num_inference_steps=INFERENCE_STEPS,
            num_train_timesteps=TRAIN_TIMESTEPS,
        )
        dims = {**self.keys, "action": ACTION_DIM}
        stats = {k: {"min": -torch.ones(d), "max": torch.ones(d)} for k, d in dims.items()}
        self.preset = config.get_optimizer_preset()
        self.policy = DiffusionPolicy(config)
        self.preprocess, self.postprocess = make_diffusion_pre_post_processors(config, stats)
        cond = torch.zeros(1, N_OBS * (STATE_DIM + ENV_DIM))
        flops = call_flops(
            lambda: self.policy.diffusion.unet(
                torch.zeros(1, HORIZON, ACTION_DIM), torch.tensor([50]), global_cond=cond
            )
        )
        import lerobot

        return {"params": n_params(self.policy), "flops": flops, "lerobot": lerobot.__version__}

    def chunk(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalize, concatenate the states, 10 DDIM steps, unnormalize (the first 8 actions)."""
        return self.postprocess(self.policy.diffusion.generate_actions(self.preprocess(obs)))

    def train_batch(self, batch: int) -> dict[str, torch.Tensor]:
        return {
            **random_obs(self.keys, batch),
            "action": random_actions(batch),
            "action_is_pad": torch.zeros(batch, HORIZON, dtype=torch.bool),
        }

    def optimizer(self) -> torch.optim.Optimizer:
        """The diffusion preset's optimizer (an `AdamConfig`: torch Adam, weight decay 1e-6)."""
        return self.preset.build(self.policy.get_optim_params())

    def train_step(self, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        """lerobot-train's loop body on CPU: preprocessor, then `update_policy` (its Accelerator
        without mixed precision is plain backward and clip_grad_norm_); the LR scheduler is left out."""
        loss, _ = self.policy.forward(self.preprocess(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.preset.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad()


class OursSide:
    """robomosaic: `DenoisingPolicy`, which normalizes inside `sample_actions` and `forward`."""

    keys: ClassVar[dict[str, int]] = {"robot_state": STATE_DIM, "object": ENV_DIM}

    def build(self, down_dims: list[int], backend: str) -> dict[str, Any]:
        import numpy as np

        from robomosaic.data.normalizer import Normalizer
        from robomosaic.data.spec import KeySpec
        from robomosaic.policies.denoising_policy import DenoisingPolicy
        from robomosaic.policies.precision import resolve_precision

        obs_spec = {k: KeySpec((d,), "float32") for k, d in self.keys.items()}
        action_spec = KeySpec((ACTION_DIM,), "float32")
        specs = {**obs_spec, "action": action_spec}
        stats = {k: {"min": -np.ones(s.shape), "max": np.ones(s.shape)} for k, s in specs.items()}
        config = {
            "horizon": HORIZON,
            "n_obs_steps": N_OBS,
            "n_action_steps": N_ACTION,
            "network": "unet",
            "unet": {
                "down_dims": list(down_dims),
                "kernel_size": KERNEL,
                "n_groups": GROUPS,
                "noise_embed_dim": STEP_EMBED,
            },
            "encoder": {"state_feature_dim": None},  # the raw states concatenated, as LeRobot does
            "process": {"name": "ddpm"},
            "sampler": "ddim",
            "steps": INFERENCE_STEPS,
        }
        normalizer = Normalizer({k: "minmax" for k in stats}, stats)
        self.policy = DenoisingPolicy(config, obs_spec, action_spec, normalizer)
        self.precision = resolve_precision("auto", "cpu")
        cond = torch.zeros(1, self.policy.encoder.out_dim)
        flops = call_flops(
            lambda: self.policy.network(torch.zeros(1, HORIZON, ACTION_DIM), torch.tensor([50.0]), cond)
        )
        has_backend = hasattr(self.policy, "use_backend")
        if has_backend:
            self.policy.use_backend(backend)
        return {
            "params": n_params(self.policy),
            "flops": flops,
            "backend": backend if has_backend else "none (no DenoisingPolicy.use_backend yet)",
        }

    def chunk(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalize, encode, 10 DDIM steps, unnormalize (all 16 actions)."""
        return self.policy.sample_actions(obs)

    def train_batch(self, batch: int) -> dict[str, Any]:
        return {"obs": random_obs(self.keys, batch), "action": random_actions(batch)}

    def optimizer(self) -> torch.optim.Optimizer:
        """As our trainer builds it (policies/train.py)."""
        return torch.optim.AdamW(self.policy.parameters(), lr=1e-4, fused=True)

    def train_step(self, batch: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        from robomosaic.policies.train import training_step

        training_step(self.policy, batch, optimizer, grad_clip=1.0, precision=self.precision)


Side = LeRobotSide | OursSide


class Worker:
    """Serves the requests for one side; the training state lives until the next build."""

    def __init__(self, side: Side) -> None:
        self.side = side
        self.obs: dict[str, torch.Tensor] = {}
        self.training: tuple[int, Any, torch.optim.Optimizer] | None = None  # batch size, batch, optimizer

    def build(self, down_dims: list[int], threads: int, backend: str) -> dict[str, Any]:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        answer = {**self.side.build(down_dims, backend), "precision": self.side.precision}
        self.training = None
        self.obs = random_obs(self.side.keys, 1)
        warmup = self.infer(WARMUP)["ms"]
        return {**answer, "torch": torch.__version__, "threads": threads, "warmup_ms": warmup[-1]}

    def infer(self, repeats: int) -> dict[str, list[float]]:
        self.side.policy.eval()
        with torch.no_grad():
            return {"ms": [timed_ms(lambda: self.side.chunk(self.obs)) for _ in range(repeats)]}

    def train(self, batch: int, steps: int) -> dict[str, Any]:
        self.side.policy.train()
        if self.training is None or self.training[0] != batch:
            self.training = (batch, self.side.train_batch(batch), self.side.optimizer())
            for _ in range(WARMUP):
                self.side.train_step(*self.training[1:])
        data, optimizer = self.training[1:]
        times = [timed_ms(lambda: self.side.train_step(data, optimizer)) for _ in range(steps)]
        return {"samples_per_s": [1e3 * batch / ms for ms in times], "precision": self.side.precision}

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request["cmd"]
        if cmd in ("infer", "train") and not self.obs:
            raise ValueError(f"{cmd} before build")
        if cmd == "build":
            return self.build(request["down_dims"], request["threads"], request["backend"])
        if cmd == "infer":
            return self.infer(request["repeats"])
        if cmd == "train":
            return self.train(request["batch"], request["steps"])
        raise ValueError(f"unknown cmd {cmd!r}")


def serve(worker: Worker, requests: TextIO, out: TextIO) -> None:
    for line in requests:
        request = json.loads(line)
        if request.get("cmd") == "exit":
            return
        try:
            answer = worker.answer(request)
        except Exception as error:  # answered to the orchestrator, which stops with this message
            traceback.print_exc(file=sys.stderr)
            answer = {"error": f"{type(error).__name__}: {error}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=("lerobot", "robomosaic"), required=True)
    args = parser.parse_args()
    # The answers own stdout; prints of Python or native code go to stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    side: Side = LeRobotSide() if args.system == "lerobot" else OursSide()
    serve(Worker(side), sys.stdin, out)


if __name__ == "__main__":
    main()
