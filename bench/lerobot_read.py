"""Read a LeRobot dataset with LeRobot's own `LeRobotDataset` (run in the LeRobot venv) and write
what it sees to an .npz: actions, episode indices, fps, the number of episodes and frames, and the
decoded first and last frame of every camera. Used by bench/lerobot_roundtrip.py."""

import sys

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

root, out = sys.argv[1], sys.argv[2]
ds = LeRobotDataset("robomosaic/check", root=root, video_backend="pyav")
first, last = ds[0], ds[len(ds) - 1]
cameras = sorted(k for k in first if k.startswith("observation.images."))
np.savez(
    out,
    action=np.stack([np.asarray(a, dtype=np.float32) for a in ds.hf_dataset["action"]]),
    episode_index=np.asarray(ds.hf_dataset["episode_index"]),
    fps=ds.fps,
    episodes=ds.num_episodes,
    frames=ds.num_frames,
    tasks=np.asarray([first["task"], last["task"]]),
    **{f"first/{k}": (first[k].numpy() * 255).round().astype(np.uint8) for k in cameras},
    **{f"last/{k}": (last[k].numpy() * 255).round().astype(np.uint8) for k in cameras},
)
print(f"LeRobotDataset read {root}: {ds.num_episodes} episodes, {ds.num_frames} frames, fps {ds.fps}")
