"""RAPTOR (Eschmann et al. 2025): a tiny recurrent quadrotor foundation policy distilled from RL teachers.

`student.RaptorStudent` is the 2,084-parameter Dense -> GRU -> Dense controller; `export` turns it
into an ONNX step graph, plain numpy inference (`NumpyStudent`) and a dependency-free C99 file.
"""

from pathlib import Path

PRETRAINED_STUDENT = Path(__file__).parent / "pretrained" / "student"  # the shipped student (package data)
