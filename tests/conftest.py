"""Test-wide settings: headless rendering, and one torch thread per process.

Several tests run simulation workers beside torch; with torch's default of one thread per core they
oversubscribe a small machine and every test slows down.
"""

import os

os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import torch

torch.set_num_threads(1)
