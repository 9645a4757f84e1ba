"""Write a small LeRobot v3 dataset with LeRobot's own API (run in a venv with lerobot installed):

    python -m venv .cache/lerobot && .cache/lerobot/bin/pip install lerobot==0.4.4
    .cache/lerobot/bin/python bench/lerobot_fixture.py tests/assets/lerobot_v3

3 episodes of 6-8 frames at 20 fps, `observation.state` (9), `action` (7), one 32x24 rgb video
`observation.images.front`, two task strings; values are a function of (episode, frame) so that a
reader can check every one (tests/test_lerobot.py). LeRobot is not a dependency of robomosaic: it
pins another torch, so it lives in a venv of its own and only this script imports it.
"""

import shutil
import sys
from pathlib import Path

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

LENGTHS = (6, 8, 7)
TASKS = ("lift the red cube", "lift the red cube", "open the door")


def values(episode: int, frame: int) -> dict[str, np.ndarray]:
    state = np.arange(9, dtype=np.float32) + 10 * episode + 0.5 * frame
    action = np.linspace(-1, 1, 7, dtype=np.float32) * (frame + 1) / 10 + episode
    image = np.zeros((24, 32, 3), dtype=np.uint8)
    image[:, : 4 * (frame + 1)] = (60 * episode + 40) % 256  # a bar that grows with the frame
    return {"observation.state": state, "action": action, "observation.images.front": image}


def main(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    features = {
        "observation.state": {"dtype": "float32", "shape": (9,), "names": [f"s{i}" for i in range(9)]},
        "action": {"dtype": "float32", "shape": (7,), "names": [f"a{i}" for i in range(7)]},
        "observation.images.front": {
            "dtype": "video",
            "shape": (24, 32, 3),
            "names": ["height", "width", "channels"],
        },
    }
    ds = LeRobotDataset.create("robomosaic/fixture", fps=20, features=features, root=out, robot_type="panda")
    for e, n in enumerate(LENGTHS):
        for f in range(n):
            ds.add_frame({**values(e, f), "task": TASKS[e]})
        ds.save_episode()
    ds.finalize()
    back = LeRobotDataset("robomosaic/fixture", root=out)
    print(f"wrote {out}: {back.num_episodes} episodes, {back.num_frames} frames, fps {back.fps}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
