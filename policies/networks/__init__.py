"""Denoiser networks: forward(x (batch, horizon, action_dim), noise (batch,), cond) -> same shape as x.

`noise` is whatever scalar the caller's noise process feeds the network (DDPM timestep, flow
time, EDM c_noise); the networks only embed it (see `embedding`).
"""

from robomosaic.policies.networks.embedding import NoiseEmbedding, SinusoidalEmbedding
from robomosaic.policies.networks.transformer import FeedForward, TransformerDenoiser
from robomosaic.policies.networks.unet1d import ConditionalUnet1D

__all__ = [
    "ConditionalUnet1D",
    "FeedForward",
    "NoiseEmbedding",
    "SinusoidalEmbedding",
    "TransformerDenoiser",
]
