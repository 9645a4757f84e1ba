"""What every denoiser network offers the policy, and the registry that builds them by name.

A network is registered under the name that a policy config's `network:` entry gives; its config
section has the same name. The builder receives the shapes the policy knows (action dimension,
conditioning width, horizon, the noise-input scale of the process) and the section's entries:

    @register_network("unet", defaults={"down_dims": [64, 128, 256], ...})
    def build_unet(action_dim, cond_dim, horizon, noise_scale, **section) -> DenoiserNetwork: ...

A new network (in a module of its own, or a user's) registers itself this way; nothing in the
policy lists the networks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


class DenoiserNetwork(nn.Module):
    """Base of the denoiser networks: the two hooks the policy calls, with neutral defaults."""

    # Whether the forward traces into a static graph for the fast inference path (fast_network);
    # a network whose forward branches on data (MoDE's routing and expert cache) says False.
    onnx_exportable = True

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Wraps one sampling run (every denoising step of a chunk). A network may use it to
        prepare per-run state: MoDE validates its expert cache once here."""
        yield

    def auxiliary_loss(self) -> Tensor | float:
        """Added to the denoising loss after each training forward (MoDE: load balancing)."""
        return 0.0


Builder = Callable[..., DenoiserNetwork]


@dataclass(frozen=True)
class NetworkEntry:
    build: Builder
    defaults: Mapping[str, Any] = field(default_factory=dict)


NETWORKS: dict[str, NetworkEntry] = {}


def register_network(name: str, defaults: Mapping[str, Any] | None = None) -> Callable[[Builder], Builder]:
    """Register `build(action_dim, cond_dim, horizon, noise_scale, **section)` under `name`."""

    def wrap(build: Builder) -> Builder:
        NETWORKS[name] = NetworkEntry(build, dict(defaults or {}))
        return build

    return wrap


def build_network(
    name: str, action_dim: int, cond_dim: int, horizon: int, noise_scale: float, section: Mapping[str, Any]
) -> DenoiserNetwork:
    if name not in NETWORKS:
        raise ValueError(f"network {name!r} is not registered (known: {sorted(NETWORKS)})")
    return NETWORKS[name].build(action_dim, cond_dim, horizon, noise_scale, **section)
