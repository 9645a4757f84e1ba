"""Quadrotors for RAPTOR: batched "learning to fly" dynamics in torch (dynamics.py), vehicle
parameters, presets and the paper's randomization (params.py), and the same vehicles as MuJoCo
models, a second simulator to evaluate policies in (mujoco_model.py)."""
