"""Quadrotors: batched "learning to fly" dynamics in torch, parameter sampling, and the same vehicles as MuJoCo models."""
