"""LeRobot v3 datasets in and out, checked by LeRobot's own code: the interop acceptance for LeRobot.

    python bench/lerobot_roundtrip.py [--lerobot-venv .cache/lerobot] [--store runs/bag_to_policy/store.zarr]

LeRobot pins another torch, so it lives in a venv of its own (created on first use with
`pip install lerobot==0.4.4`; never by `make test`). Three checks:
1. a dataset written by LeRobot's API (bench/lerobot_fixture.py, run in that venv) converts: frame
   counts, fps and actions equal to what `LeRobotDataset` reads from it;
2. that store exported again (`robomosaic-export format=lerobot`, with its AV1 video) loads in
   `LeRobotDataset` with equal actions, frame counts and fps, and frames close to ours;
3. a lift store (the bag-to-policy run's, 100 episodes) exported loads with equal actions.
Writes docs/results/lerobot.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from robomosaic.data.lerobot import convert_lerobot, export_lerobot
from robomosaic.data.store import EpisodeStore
from robomosaic.sim.measure_experts import machine

ROOT = Path(__file__).parents[1]


def lerobot_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with lerobot==0.4.4 (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "lerobot==0.4.4"], check=True)
    return python


def read_with_lerobot(python: Path, root: Path, out: Path) -> dict[str, np.ndarray]:
    subprocess.run([str(python), str(ROOT / "bench" / "lerobot_read.py"), str(root), str(out)], check=True,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    return dict(np.load(out))


def store_actions(store: EpisodeStore) -> np.ndarray:
    return np.concatenate([store.episode(i, ["action"])["action"] for i in range(store.n_episodes)])


def compare(store: EpisodeStore, seen: dict[str, np.ndarray]) -> dict[str, str]:
    actions = store_actions(store)
    lengths = [len(store.episode(i, ["action"])["action"]) for i in range(store.n_episodes)]
    same_frames = int(seen["frames"]) == len(actions) and np.array_equal(
        np.bincount(seen["episode_index"], minlength=store.n_episodes), lengths
    )
    error = np.abs(seen["action"].astype(np.float64) - actions.astype(np.float32).astype(np.float64)).max()
    row = {
        "episodes": f"{int(seen['episodes'])} / {store.n_episodes}",
        "frames": f"{int(seen['frames'])} / {len(actions)} ("
        + ("equal per episode)" if same_frames else "DIFFER per episode)"),
        "fps": f"{float(seen['fps']):g} / {store.spec.control_hz:g}",
        "actions": f"max abs difference {error:.1e} (float32)",
    }
    cameras = [k for k in store.spec.keys if store.spec.keys[k].is_image]
    if cameras:
        first = store.episode(0, cameras)
        key = f"first/observation.images.{cameras[0][: -len('_image')]}"
        ours = first[cameras[0]][0].astype(int)
        theirs = np.transpose(seen[key], (1, 2, 0)).astype(int)
        row["frames decoded"] = f"first frame mean abs difference {np.abs(ours - theirs).mean():.2f} levels"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lerobot-venv", type=Path, default=ROOT / ".cache" / "lerobot")
    ap.add_argument("--store", type=Path, default=ROOT / "runs" / "bag_to_policy" / "store.zarr")
    a = ap.parse_args()
    python = lerobot_python(a.lerobot_venv)
    rows: list[tuple[str, dict[str, str]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        written = tmp / "by_lerobot"
        subprocess.run([str(python), str(ROOT / "bench" / "lerobot_fixture.py"), str(written)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        t = time.perf_counter()
        convert_lerobot(written, tmp / "converted.zarr", progress=False)
        seconds = time.perf_counter() - t
        converted = EpisodeStore.open(tmp / "converted.zarr")
        seen = read_with_lerobot(python, written, tmp / "a.npz")
        rows.append(
            (f"LeRobot-written dataset -> robomosaic-convert ({seconds:.2f} s)", compare(converted, seen))
        )
        export_lerobot(tmp / "converted.zarr", tmp / "exported", progress=False)
        seen = read_with_lerobot(python, tmp / "exported", tmp / "b.npz")
        rows.append(
            ("that store -> robomosaic-export format=lerobot -> LeRobotDataset", compare(converted, seen))
        )
        if a.store.exists():
            lift = EpisodeStore.open(a.store)
            t = time.perf_counter()
            export_lerobot(a.store, tmp / "lift", progress=False)
            seconds = time.perf_counter() - t
            seen = read_with_lerobot(python, tmp / "lift", tmp / "c.npz")
            name = (
                f"{a.store.relative_to(ROOT)} ({lift.n_episodes} lift episodes) -> export ({seconds:.1f} s)"
            )
            rows.append((f"{name} -> LeRobotDataset", compare(lift, seen)))
    version = subprocess.run([str(python), "-c", "import lerobot; print(lerobot.__version__)"],
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    lines = [
        "# LeRobot v3 datasets in and out, checked by LeRobot's own `LeRobotDataset`",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}; LeRobot {version} in a "
        "venv of its own (it pins another torch); robomosaic reads and writes the format with pyarrow and "
        "PyAV only.",
        "",
        "```bash",
        "python bench/lerobot_roundtrip.py",
        "```",
        "",
        "Each row: what LeRobot reads / what the robomosaic store holds.",
        "",
        "| check | episodes | frames | fps | actions | video |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['episodes']} | {r['frames']} | {r['fps']} | {r['actions']} | "
                     f"{r.get('frames decoded', '-')} |")  # fmt: skip
    lines += [
        "",
        "The fixture (`bench/lerobot_fixture.py`, kept as `tests/assets/lerobot_v3` for the tests) has 3",
        "episodes of 6-8 frames, a 9-d `observation.state`, a 7-d action, one 32x24 AV1 video and two task",
        "strings. Video frames are lossy both ways (AV1, yuv420p, as LeRobot encodes them).",
        "",
    ]
    path = ROOT / "docs" / "results" / "lerobot.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
