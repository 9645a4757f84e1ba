"""LeRobot v3 datasets (parquet tables + mp4 videos + meta/info.json) into episode stores.

    robomosaic-convert input=<LeRobot dataset folder> out=<store>

Read from disk with pyarrow and PyAV; LeRobot itself is not imported (it pins another torch) and
nothing is downloaded. The layout read (LeRobot's `CODEBASE_VERSION` "v3.0"):

    meta/info.json                  fps, robot_type, features, data_path and video_path templates
    meta/tasks.parquet              task strings (the pandas index) -> task_index
    meta/episodes/chunk-*/file-*.parquet   per episode: length, data file, rows, video file and times
    data/chunk-*/file-*.parquet     one row per frame: the features, timestamp, frame/episode/task index
    videos/<key>/chunk-*/file-*.mp4 several episodes per file, from_timestamp..to_timestamp each

Keys: `action` stays `action`, `observation.state` (the robot's state) becomes `robot_state` (our
`state` is the MuJoCo state that replay sets); `observation.images.<camera>` (video or image features) becomes
`<camera>_image` (uint8 HWC, our camera key convention); `observation.<name>` becomes `<name>`
(dots to underscores), other features (`next.reward`, ...) their name with dots to underscores.
The dataset's fps becomes the store's control rate, `robot_type` its robot, each episode's first
task string its task, and the last `next.success` its success (False where there is none: LeRobot
datasets rarely record it). Every file is read and every episode built before the first write.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robomosaic.conf.console import RobomosaicError
from robomosaic.data.spec import DatasetSpec, KeySpec

CODEBASE_VERSION = "v3.0"
INDEX_FEATURES = ("timestamp", "frame_index", "episode_index", "index", "task_index")
IMAGE_PREFIX = "observation.images."
# LeRobot's proprioceptive state; our `state` key is the MuJoCo state used for replay
ROBOT_STATE = ("observation.state", "robot_state")
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"


class LeRobotError(RobomosaicError, ValueError):
    """A LeRobot dataset that cannot be read; the message names the file, feature or episode."""


def is_lerobot_dataset(path: str | Path) -> bool:
    return (Path(path) / "meta" / "info.json").is_file()


def store_key(feature: str) -> str:
    """The store key of a LeRobot feature name (see the module docstring)."""
    if feature == ROBOT_STATE[0]:
        return ROBOT_STATE[1]
    if feature.startswith(IMAGE_PREFIX):
        return feature[len(IMAGE_PREFIX) :].replace(".", "_") + "_image"
    if feature.startswith("observation."):
        feature = feature[len("observation.") :]
    return feature.replace(".", "_")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LeRobotError(f"{path}: unreadable ({e})") from None


def _read_table(path: Path) -> Any:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise LeRobotError(f"{path}: missing")
    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError and others on damaged files
        raise LeRobotError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None


def _tasks(root: Path) -> dict[int, str]:
    table = _read_table(root / "meta" / "tasks.parquet")
    index_columns = (table.schema.pandas_metadata or {}).get("index_columns", [])
    text_column = next((c for c in index_columns if isinstance(c, str)), "task")
    if text_column not in table.column_names or "task_index" not in table.column_names:
        raise LeRobotError(f"{root / 'meta' / 'tasks.parquet'}: expected the task strings and 'task_index'")
    rows = table.to_pydict()
    return {int(i): str(t) for i, t in zip(rows["task_index"], rows[text_column], strict=True)}


@dataclass
class LeRobotDataset:
    """What a dataset folder holds, read and checked; `episodes()` yields (data, meta) per episode."""

    root: Path
    info: dict[str, Any]
    features: dict[str, dict[str, Any]]  # without the index features
    episodes_meta: list[dict[str, Any]]
    tasks: dict[int, str]

    @classmethod
    def open(cls, root: str | Path) -> LeRobotDataset:
        root = Path(root)
        info = _read_json(root / "meta" / "info.json")
        version = info.get("codebase_version")
        if version != CODEBASE_VERSION:
            raise LeRobotError(
                f"{root / 'meta' / 'info.json'}: codebase_version {version!r}; "
                f"only {CODEBASE_VERSION} is read "
                "(LeRobot converts older datasets with lerobot.datasets.v30.convert_dataset_v21_to_v30)"
            )
        for field in ("fps", "features", "data_path"):
            if field not in info:
                raise LeRobotError(f"{root / 'meta' / 'info.json'}: field {field!r} is missing")
        features = {k: v for k, v in info["features"].items() if k not in INDEX_FEATURES}
        if "action" not in features:
            raise LeRobotError(f"{root / 'meta' / 'info.json'}: no 'action' feature (has {list(features)})")
        keys = [store_key(k) for k in features]
        if len(set(keys)) != len(keys):
            raise LeRobotError(f"{root}: features {list(features)} map onto repeated store keys {keys}")
        files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise LeRobotError(f"{root / 'meta' / 'episodes'}: no episode metadata (chunk-*/file-*.parquet)")
        episodes = [row for f in files for row in _read_table(f).to_pylist()]
        episodes.sort(key=lambda r: r["episode_index"])
        for e in episodes:
            for feature, spec in features.items():
                if spec["dtype"] == "video":
                    path = root / info["video_path"].format(
                        video_key=feature,
                        chunk_index=e[f"videos/{feature}/chunk_index"],
                        file_index=e[f"videos/{feature}/file_index"],
                    )
                    if not path.is_file():
                        where = f"video {feature!r} of episode {e['episode_index']}"
                        raise LeRobotError(f"{path}: missing ({where})")
        return cls(root, info, features, episodes, _tasks(root))

    @property
    def fps(self) -> float:
        return float(self.info["fps"])

    def spec(self) -> DatasetSpec:
        keys = {}
        for feature, f in self.features.items():
            image = f["dtype"] in ("video", "image")
            shape = tuple(int(s) for s in f["shape"])
            dtype = "uint8" if image else ("float64" if f["dtype"].startswith("float") else f["dtype"])
            names = f.get("names")
            description = f"LeRobot feature {feature!r}"
            if names:
                description += f" ({', '.join(map(str, names))})"
            keys[store_key(feature)] = KeySpec(shape, dtype, "RGB" if image else "", "", description)
        return DatasetSpec(
            keys=keys, control_hz=self.fps, robot=str(self.info.get("robot_type") or ""),
            extra={"converter": "robomosaic-convert (LeRobot v3)", "source": str(self.root)},
        )  # fmt: skip

    def _data(self, episode: dict[str, Any], cache: dict[Path, dict[str, Any]]) -> dict[str, Any]:
        path = self.root / self.info["data_path"].format(
            chunk_index=episode["data/chunk_index"], file_index=episode["data/file_index"]
        )
        if path not in cache:
            cache.clear()  # one data file in memory at a time
            table = _read_table(path)
            missing = [k for k in (*self.features, *INDEX_FEATURES) if k not in table.column_names
                       and self.features.get(k, {}).get("dtype") != "video"]  # fmt: skip
            if missing:
                raise LeRobotError(f"{path}: column(s) {missing} of meta/info.json are missing")
            rows = table.to_pydict()
            for name in INDEX_FEATURES:  # as arrays once per file, not once per episode
                rows[name] = np.asarray(rows[name])
            cache[path] = rows
        return cache[path]

    def _frames(self, feature: str, episode: dict[str, Any], timestamps: np.ndarray) -> np.ndarray:
        import av

        path = self.root / self.info["video_path"].format(
            video_key=feature,
            chunk_index=episode[f"videos/{feature}/chunk_index"],
            file_index=episode[f"videos/{feature}/file_index"],
        )
        start = float(episode[f"videos/{feature}/from_timestamp"])
        wanted = start + timestamps
        tolerance = 0.5 / self.fps
        frames: list[np.ndarray] = []
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise LeRobotError(f"{path}: cannot decode (no video stream)")
                stream = container.streams.video[0]
                container.seek(int(start / stream.time_base), stream=stream)
                for frame in container.decode(video=0):
                    t = float(frame.time)
                    if t < wanted[len(frames)] - tolerance:
                        continue
                    if abs(t - wanted[len(frames)]) > tolerance:
                        break
                    h, w = self.features[feature]["shape"][:2]  # odd sizes are encoded padded by one
                    frames.append(frame.to_ndarray(format="rgb24")[:h, :w])
                    if len(frames) == len(wanted):
                        break
        except av.FFmpegError as e:
            raise LeRobotError(f"{path}: cannot decode ({e})") from None
        if len(frames) != len(wanted):
            raise LeRobotError(
                f"{path}: episode {episode['episode_index']} needs {len(wanted)} frames of {feature!r} from "
                f"{start:.3f} s, the video gives {len(frames)}"
            )
        return np.stack(frames)

    def episodes(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, Any]]]:
        cache: dict[Path, dict[str, Any]] = {}
        for e in self.episodes_meta:
            rows = self._data(e, cache)
            index = np.asarray(rows["episode_index"])
            sel = np.flatnonzero(index == e["episode_index"])
            sel = sel[np.argsort(np.asarray(rows["frame_index"])[sel], kind="stable")]
            if len(sel) != e["length"]:
                raise LeRobotError(
                    f"{self.root}: episode {e['episode_index']} has length {e['length']} in meta/episodes "
                    f"but {len(sel)} rows in its data file"
                )
            data = {}
            for feature, f in self.features.items():
                key = store_key(feature)
                if f["dtype"] == "video":
                    timestamps = np.asarray(rows["timestamp"], dtype=np.float64)[sel]
                    data[key] = self._frames(feature, e, timestamps)
                else:
                    column = rows[feature]
                    data[key] = np.asarray([column[i] for i in sel], dtype=np.float64).reshape(len(sel), -1)
                    data[key] = data[key].reshape(len(sel), *[int(s) for s in f["shape"]])
            task_index = int(np.asarray(rows["task_index"])[sel[0]])
            success = bool(data["next_success"][-1].item()) if "next_success" in data else False
            meta = {"seed": -1, "success": success, "task": self.tasks.get(task_index, ""),
                    "behaviour": "lerobot", "duration": len(sel) / self.fps}  # fmt: skip
            yield data, meta


def convert_lerobot(
    root: str | Path, out: str | Path, overwrite: bool = False, progress: bool = True
) -> tuple[int, int]:
    """Convert the LeRobot v3 dataset at `root` into the store at `out`; (episodes, frames)."""
    from tqdm import tqdm

    from robomosaic.data.store import EpisodeStore

    dataset = LeRobotDataset.open(root)
    episodes = list(tqdm(dataset.episodes(), total=len(dataset.episodes_meta), desc="read LeRobot episodes",
                         disable=not progress))  # fmt: skip
    spec = dataset.spec()
    if overwrite:
        store = EpisodeStore.create(out, spec, overwrite=True)
    else:
        store = EpisodeStore.open_or_create(out, spec)
    for data, meta in episodes:
        store.append_episode(data, meta)
    return len(episodes), sum(len(d["action"]) for d, _ in episodes)


# -- writing -----------------------------------------------------------------------------------
def lerobot_feature(key: str) -> str:
    """The LeRobot feature name of a store key: the inverse of `store_key`."""
    if key == "action":
        return key
    if key == ROBOT_STATE[1]:
        return ROBOT_STATE[0]
    if key.endswith("_image"):
        return IMAGE_PREFIX + key[: -len("_image")]
    return "observation." + key


def _encode_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """AV1 (libsvtav1, yuv420p) as LeRobot writes its videos, one file for all episodes of a camera."""
    from fractions import Fraction

    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[1:3]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libsvtav1", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        for rgb in frames:
            padded = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def export_lerobot(
    store_path: str | Path, out: str | Path, keys: list[str] | None = None, progress: bool = True
) -> tuple[int, int]:
    """Write a store as a LeRobot v3 dataset at `out` (one data file, one video file per camera);
    (episodes, frames). Keys default to every observation key and the action, without `state`
    (the MuJoCo state is ours to replay, no LeRobot policy reads it) and `reward`."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from robomosaic.data.store import EpisodeStore

    store = EpisodeStore.open(store_path)
    out = Path(out)
    if out.exists():
        raise LeRobotError(f"out={out}: already exists")
    chosen = keys or [k for k in store.spec.keys if k not in ("state", "reward")]
    missing = [k for k in chosen if k not in store.spec.keys]
    if missing or "action" not in chosen:
        raise LeRobotError(
            f"{store.path}: keys {missing or ['action']} are not in the store (has {list(store.spec.keys)})"
        )
    fps = store.spec.control_hz
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    columns: dict[str, list[Any]] = {
        lerobot_feature(k): [] for k in chosen if not store.spec.keys[k].is_image
    }
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        columns[name] = []
    images: dict[str, list[np.ndarray]] = {k: [] for k in chosen if store.spec.keys[k].is_image}
    tasks: dict[str, int] = {}
    episodes: list[dict[str, Any]] = []
    start = 0
    for i in tqdm(range(store.n_episodes), desc="export LeRobot", disable=not progress):
        data, meta = store.episode(i, chosen), store.episode_meta(i)
        n = len(data["action"])
        task = meta["task"] or store.spec.task or "task"
        task_index = tasks.setdefault(task, len(tasks))
        for k in chosen:
            if store.spec.keys[k].is_image:
                images[k].append(data[k])
            else:
                columns[lerobot_feature(k)].extend(data[k].astype(np.float32).reshape(n, -1).tolist())
        columns["timestamp"].extend((np.arange(n) / fps).astype(np.float32).tolist())
        columns["frame_index"].extend(range(n))
        columns["episode_index"].extend([i] * n)
        columns["index"].extend(range(start, start + n))
        columns["task_index"].extend([task_index] * n)
        row: dict[str, Any] = {"episode_index": i, "tasks": [task], "length": n,
                               "data/chunk_index": 0, "data/file_index": 0,
                               "dataset_from_index": start, "dataset_to_index": start + n}  # fmt: skip
        for k in images:  # every camera's episodes follow each other in one video file
            v = f"videos/{lerobot_feature(k)}"
            row.update({f"{v}/chunk_index": 0, f"{v}/file_index": 0})
            row.update({f"{v}/from_timestamp": start / fps, f"{v}/to_timestamp": (start + n) / fps})
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        episodes.append(row)
        start += n
    features: dict[str, Any] = {}
    for k in chosen:
        ks = store.spec.keys[k]
        if ks.is_image:
            h, w, c = ks.shape
            features[lerobot_feature(k)] = {
                "dtype": "video", "shape": list(ks.shape), "names": ["height", "width", "channels"],
                "info": {"video.height": h, "video.width": w, "video.codec": "av1",
                         "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                         "video.channels": c, "has_audio": False},
            }  # fmt: skip
        else:
            features[lerobot_feature(k)] = {
                "dtype": "float32",
                "shape": [int(np.prod(ks.shape))],
                "names": None,
            }
    for name, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                        ("index", "int64"), ("task_index", "int64")):  # fmt: skip
        features[name] = {"dtype": dtype, "shape": [1], "names": None}
    info = {
        "codebase_version": CODEBASE_VERSION, "robot_type": store.spec.robot or None,
        "total_episodes": store.n_episodes, "total_frames": start, "total_tasks": len(tasks),
        "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
        "fps": int(fps) if float(fps).is_integer() else fps, "splits": {"train": f"0:{store.n_episodes}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": VIDEO_PATH if images else None,
        "features": features,
    }  # fmt: skip
    (tmp / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    (tmp / "data" / "chunk-000").mkdir(parents=True)
    (tmp / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    data_table = pa.table({
        name: pa.array(values, type=pa.float32() if name == "timestamp" else None)
        if name in INDEX_FEATURES else pa.array(values, type=pa.list_(pa.float32()))
        for name, values in columns.items()
    })  # fmt: skip
    pq.write_table(data_table, tmp / "data" / "chunk-000" / "file-000.parquet")
    pq.write_table(
        pa.Table.from_pylist(episodes), tmp / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    )
    # LeRobot keeps the task strings as the pandas index of tasks.parquet
    tasks_table = pa.table({"task_index": list(tasks.values()), "__index_level_0__": list(tasks)})
    pandas_meta = {"index_columns": ["__index_level_0__"], "column_indexes": [], "columns": [
        {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
         "metadata": None},
        {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object",
         "metadata": None}], "pandas_version": "2.0.0"}  # fmt: skip
    tasks_table = tasks_table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
    pq.write_table(tasks_table, tmp / "meta" / "tasks.parquet")
    for k, parts in images.items():
        path = tmp / info["video_path"].format(video_key=lerobot_feature(k), chunk_index=0, file_index=0)
        _encode_video(path, np.concatenate(parts), fps)
    tmp.rename(out)
    return store.n_episodes, start
