"""mp4 videos of rollouts, encoded by the ffmpeg binary that imageio-ffmpeg bundles."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np


def write_mp4(path: str | Path, frames: Iterable[np.ndarray] | np.ndarray, fps: float = 20) -> Path:
    """Write RGB frames (uint8, H x W x 3, all the same size) to an H.264 mp4; returns the path.

    H.264 in the yuv420p pixel format (what every player reads) needs even frame sides.
    """
    import imageio.v2 as imageio

    path = Path(path)
    if fps <= 0:
        raise ValueError(f"write_mp4({path}): fps must be positive, got {fps}")
    frames = list(frames)
    if not frames:
        raise ValueError(f"write_mp4({path}): no frames")
    first = np.asarray(frames[0])
    for i, frame in enumerate(frames):
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or frame.shape != first.shape:
            raise ValueError(
                f"write_mp4({path}): frame {i} has dtype {frame.dtype} and shape {frame.shape}; "
                f"expected uint8 frames of shape (H, W, 3) all like frame 0 {first.shape}"
            )
    if first.shape[0] % 2 or first.shape[1] % 2:
        raise ValueError(f"write_mp4({path}): frame sides must be even for H.264, got {first.shape[:2]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(
        path, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=2
    ) as writer:
        for frame in frames:
            writer.append_data(np.asarray(frame))
    return path
