"""Denoiser networks: forward(x (batch, horizon, action_dim), noise (batch,), cond) -> same shape as x.

`noise` is whatever scalar the caller's noise process feeds the network (DDPM timestep, flow
time, EDM c_noise); the networks only embed it (see `embedding`).
"""

from robomosaic.policies.networks.base import NETWORKS, DenoiserNetwork, build_network, register_network
from robomosaic.policies.networks.embedding import NoiseEmbedding, SinusoidalEmbedding
from robomosaic.policies.networks.mode import ModeDenoiser, MoEFeedForward, load_balancing_loss
from robomosaic.policies.networks.transformer import ChunkTransformer, FeedForward, TransformerDenoiser
from robomosaic.policies.networks.unet1d import ConditionalUnet1D

__all__ = [
    "NETWORKS",
    "ChunkTransformer",
    "ConditionalUnet1D",
    "DenoiserNetwork",
    "FeedForward",
    "MoEFeedForward",
    "ModeDenoiser",
    "NoiseEmbedding",
    "SinusoidalEmbedding",
    "TransformerDenoiser",
    "build_network",
    "load_balancing_loss",
    "register_network",
]
