"""robomosaic-convert: robosuite and robomimic hdf5 demonstrations, and rosbag2 recordings, into a
zarr episode store.

    robomosaic-convert input=demo.hdf5 out=demos/lift.zarr [format=auto|robosuite|robomimic]
                       [task=lift] [cameras=[agentview]] [image_size=84] [overwrite=false]
    robomosaic-convert input=<bag folder | .mcap | folder of bags> out=<store> mapping=<yaml>
    robomosaic-convert input=<LeRobot v3 dataset folder> out=<store>

rosbag2 recordings (MCAP or sqlite3 storage) are read by `robomosaic.data.rosbag` with a mapping
file (its docstring); LeRobot v3 datasets by `robomosaic.data.lerobot`. Two hdf5 formats are read:

- robosuite's raw `demo.hdf5`, as `gather_demonstrations_as_hdf5` in robosuite's
  `scripts/collect_human_demonstrations.py` writes it from `DataCollectionWrapper` recordings:
  `data` attrs `env` and `env_info` (json), `data/demo_N/states` (flattened MuJoCo states, the
  state before each action), `data/demo_N/actions`, and the episode's model xml in the
  `model_file` attr. There are no observations in it: they are recovered the way robosuite's
  `playback_demonstrations_from_hdf5.py` and robomimic's `dataset_states_to_obs.py` do it, by
  loading the demo's model xml into the task's environment and setting each state in turn;
  cameras are rendered on request. The reward of a step and the success at the end are read
  at the next state; the last action is stepped once from the last state to get them.
- robomimic's processed hdf5: `data/demo_i/obs/<key>`, `actions`, `rewards`, `dones`, optional
  `states`, attrs `num_samples` per demo and `env_args` (json) on `data`. Keys are copied as they
  are (robomimic's low-dim keys carry the same names as our tasks' observations).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from robomosaic.conf.console import RobomosaicError, console_script
from robomosaic.data.spec import DatasetSpec, KeySpec

FORMATS = ("auto", "robosuite", "robomimic", "rosbag2", "lerobot")
DEFAULT_CONTROL_HZ = 20.0  # robosuite's and robomimic's default control frequency

Episode = tuple[dict[str, np.ndarray], dict[str, Any]]


class ConvertError(RobomosaicError, ValueError):
    """An input file that is not what its format promises; the message names the file and key."""


@dataclass
class ConvertSummary:
    input: str
    out: str
    format: str
    episodes: int
    steps: int


# -- reading helpers ---------------------------------------------------------------------------
def _require(group: h5py.Group, key: str, path: str) -> Any:
    if key not in group:
        where = group.name.rstrip("/") + "/" + key
        raise ConvertError(f"{path}: missing {where!r} (found: {sorted(group.keys())})")
    return group[key]


def _require_attr(group: h5py.Group, key: str, path: str) -> Any:
    if key not in group.attrs:
        raise ConvertError(f"{path}: group {group.name!r} has no attribute {key!r}")
    value = group.attrs[key]
    return value.decode() if isinstance(value, bytes) else value


def _demo_names(data: h5py.Group, path: str) -> list[str]:
    """`demo_N` groups in numeric order (demo_2 before demo_10)."""
    names = [n for n in data if re.fullmatch(r"demo_\d+", n)]
    if not names:
        raise ConvertError(f"{path}: group 'data' holds no demo_N groups (found: {sorted(data.keys())})")
    return sorted(names, key=lambda n: int(n.split("_")[1]))


def detect_format(f: h5py.File, path: str) -> str:
    """robomimic files carry observations (`data/demo_*/obs`); robosuite raw files only states."""
    data = _require(f, "data", path)
    first = data[_demo_names(data, path)[0]]
    if "obs" in first:
        return "robomimic"
    if "model_file" in first.attrs and "states" in first:
        return "robosuite"
    raise ConvertError(
        f"{path}: {first.name} has neither 'obs' (robomimic) nor 'states' + attr 'model_file' (robosuite)"
    )


def controller_name(controller_configs: dict[str, Any]) -> str:
    """The arm controller of a robosuite controller config (composite in 1.5, flat before)."""
    parts = controller_configs.get("body_parts", {})
    arm = parts.get("right") or next(iter(parts.values()), None)
    return str((arm or controller_configs).get("type", ""))


def task_for_env(env_name: str) -> str | None:
    """The registered task built on robosuite environment `env_name`, if there is one."""
    from robomosaic.sim.tasks import TASKS

    return next((t.name for t in TASKS.values() if t.env_name == env_name), None)


def _keyspec(name: str, shape: tuple[int, ...], dtype: str, known: dict[str, KeySpec]) -> KeySpec:
    """Reuse our tasks' description of a key when name and shape agree, otherwise describe it bare."""
    spec = known.get(name)
    if spec is not None and spec.shape == tuple(shape):
        return KeySpec(shape, dtype, spec.units, spec.frame, spec.description)
    return KeySpec(shape, dtype, description=f"{name} (converted)")


# -- robomimic ---------------------------------------------------------------------------------
def _robomimic(f: h5py.File, path: str, task: str | None) -> tuple[DatasetSpec, list[str], Iterator[Episode]]:
    from robomosaic.sim.tasks import ACTION_SPEC, PROPRIO_KEYS

    data = _require(f, "data", path)
    names = _demo_names(data, path)
    env_args = json.loads(_require_attr(data, "env_args", path))
    env_kwargs = env_args.get("env_kwargs", {})
    control_hz = float(env_kwargs.get("control_freq", DEFAULT_CONTROL_HZ))
    robots = env_kwargs.get("robots", "")
    first = data[names[0]]
    obs = _require(first, "obs", path)
    actions = _require(first, "actions", path)
    known = {**PROPRIO_KEYS, "action": ACTION_SPEC}
    keys = {k: _keyspec(k, obs[k].shape[1:], obs[k].dtype.name, known) for k in obs}
    keys["action"] = _keyspec("action", actions.shape[1:], "float32", known)
    keys["reward"] = KeySpec((), "float32", description="reward")
    has_states = "states" in first
    if has_states:
        keys["state"] = KeySpec(first["states"].shape[1:], "float64", description="flattened MuJoCo state")
    spec = DatasetSpec(
        keys=keys,
        control_hz=control_hz,
        robot=robots[0] if isinstance(robots, list) else str(robots),
        controller=controller_name(env_kwargs.get("controller_configs", {})),
        task=task or task_for_env(env_args.get("env_name", "")) or env_args.get("env_name", ""),
        extra={"source": "robomimic", "env_args": env_args},
    )

    def episodes() -> Iterator[Episode]:
        for name in names:
            demo = data[name]
            demo_obs = _require(demo, "obs", path)
            episode = {k: np.asarray(_require(demo_obs, k, path)[()], dtype=keys[k].dtype) for k in obs}
            episode["action"] = np.asarray(_require(demo, "actions", path)[()], dtype=np.float32)
            rewards = np.asarray(_require(demo, "rewards", path)[()], dtype=np.float32)
            episode["reward"] = rewards
            if has_states:
                episode["state"] = np.asarray(_require(demo, "states", path)[()], dtype=np.float64)
            n = len(episode["action"])
            if "num_samples" in demo.attrs and int(demo.attrs["num_samples"]) != n:
                raise ConvertError(
                    f"{path}: {demo.name} attr num_samples={int(demo.attrs['num_samples'])} "
                    f"but 'actions' has {n} steps"
                )
            for k, v in episode.items():
                if len(v) != n:
                    raise ConvertError(f"{path}: {demo.name} key {k!r} has {len(v)} steps, 'actions' has {n}")
            # robosuite's sparse reward is 1 exactly when the task succeeds (robomimic keeps it).
            success = bool(n and rewards.max() >= 1.0 - 1e-6)
            yield episode, _meta(spec.task, success, n, control_hz)

    return spec, names, episodes()


# -- robosuite raw -----------------------------------------------------------------------------
def _robosuite(
    f: h5py.File, path: str, task: str | None, cameras: Sequence[str], image_size: int
) -> tuple[DatasetSpec, list[str], Iterator[Episode]]:
    from robomosaic.sim.tasks import ACTION_SPEC, CONTROLLER, ROBOT, TASKS, make_task

    data = _require(f, "data", path)
    names = _demo_names(data, path)
    env_name = str(_require_attr(data, "env", path))
    env_info = json.loads(_require_attr(data, "env_info", path))
    task = task or task_for_env(env_name)
    if task is None:
        raise ConvertError(
            f"{path}: environment {env_name!r} is not one of the registered tasks' environments "
            f"({ {t.name: t.env_name for t in TASKS.values()} }); pass task=<name> to replay it in one"
        )
    if TASKS[task].env_name != env_name:
        raise ConvertError(
            f"{path}: recorded in environment {env_name!r} but task {task!r} is {TASKS[task].env_name!r}"
        )
    robots = env_info.get("robots", [ROBOT])
    robots = [robots] if isinstance(robots, str) else list(robots)
    if robots != [ROBOT]:
        raise ConvertError(f"{path}: recorded with robots {robots}, task {task!r} has [{ROBOT!r}]")
    controller = controller_name(env_info.get("controller_configs", {})) or CONTROLLER
    first = data[names[0]]
    state_dim = _require(first, "states", path).shape[1:]
    action_shape = _require(first, "actions", path).shape[1:]
    if action_shape != ACTION_SPEC.shape:
        raise ConvertError(
            f"{path}: {first.name}/actions has shape {action_shape} per step, "
            f"task {task!r} takes {ACTION_SPEC.shape}"
        )
    sim_task = make_task(task, cameras=cameras, image_size=image_size)
    keys = dict(sim_task.spec.obs)
    keys["action"] = sim_task.spec.action
    keys["reward"] = KeySpec((), "float32", description="reward (shaped) after the action")
    keys["state"] = KeySpec(state_dim, "float64", description="flattened MuJoCo state before the action")
    spec = DatasetSpec(
        keys=keys,
        control_hz=sim_task.spec.control_hz,
        robot=sim_task.spec.robot,
        controller=controller,
        task=task,
        extra={"source": "robosuite", "env": env_name, "env_info": env_info},
    )

    def episodes() -> Iterator[Episode]:
        loaded_xml = None
        try:
            for name in names:
                demo = data[name]
                xml = sim_task.env.edit_model_xml(_require_attr(demo, "model_file", path))
                if xml != loaded_xml:  # reloading a model takes seconds; demos often share one
                    sim_task.env.reset()
                    sim_task.env.reset_from_xml_string(xml)
                    sim_task.env.sim.reset()
                    loaded_xml = xml
                states = np.asarray(_require(demo, "states", path)[()], dtype=np.float64)
                actions = np.asarray(_require(demo, "actions", path)[()], dtype=np.float32)
                if len(states) != len(actions):
                    raise ConvertError(
                        f"{path}: {demo.name} has {len(states)} states but {len(actions)} actions"
                    )
                if states.shape[1:] != state_dim:
                    raise ConvertError(
                        f"{path}: {demo.name}/states has shape {states.shape[1:]}, expected {state_dim}"
                    )
                yield _replay_states(sim_task, states, actions), _meta_from_task(sim_task, task, len(actions))
        finally:
            sim_task.close()

    return spec, names, episodes()


def _replay_states(sim_task: Any, states: np.ndarray, actions: np.ndarray) -> dict[str, np.ndarray]:
    """Observations at each state; rewards read at the following state (the last one stepped to)."""
    steps: dict[str, list[np.ndarray]] = {}
    rewards = np.zeros(len(actions), np.float32)
    for t, state in enumerate(states):
        obs = sim_task.set_state(state)
        if t > 0:
            rewards[t - 1] = sim_task.env.reward(actions[t - 1])
        for k, v in obs.items():
            steps.setdefault(k, []).append(v)
    if len(actions):
        _, rewards[-1], _, _, _ = sim_task.step(actions[-1])
    episode = {k: np.stack(v).astype(sim_task.spec.obs[k].dtype) for k, v in steps.items()}
    episode.update(action=actions, reward=rewards, state=states)
    return episode


def _meta(task: str, success: bool, n_steps: int, control_hz: float) -> dict[str, Any]:
    # Converted demonstrations have no seed of ours: -1 marks that (collection uses seeds >= 0).
    return {"seed": -1, "success": success, "task": task, "behaviour": "", "duration": n_steps / control_hz}


def _meta_from_task(sim_task: Any, task: str, n_steps: int) -> dict[str, Any]:
    info = sim_task.info()
    meta = _meta(task, bool(info["success"]), n_steps, sim_task.spec.control_hz)
    meta["behaviour"] = info["behaviour"]
    return meta


# -- entry points ------------------------------------------------------------------------------
def convert(
    input: str | Path,
    out: str | Path,
    format: str = "auto",
    task: str | None = None,
    cameras: Sequence[str] = (),
    image_size: int = 84,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertSummary:
    """Convert a robosuite or robomimic hdf5 file into the episode store at `out` (appending)."""
    from robomosaic.data.store import EpisodeStore

    path = str(input)
    if format not in FORMATS:
        raise ConvertError(f"format={format!r}: expected one of {FORMATS}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"input={path!r}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ConvertError(f"{path}: not a readable hdf5 file ({e})") from None
    with f:
        fmt = detect_format(f, path) if format == "auto" else format
        if fmt == "robomimic":
            spec, names, episodes = _robomimic(f, path, task)
        else:
            spec, names, episodes = _robosuite(f, path, task, cameras, image_size)
        if overwrite:
            store = EpisodeStore.create(out, spec, overwrite=True)
        else:
            store = EpisodeStore.open_or_create(out, spec)
        n_steps = 0
        for episode, meta in tqdm(episodes, total=len(names), desc=f"convert {fmt}", disable=not progress):
            store.append_episode(episode, meta)
            n_steps += len(episode["action"])
    return ConvertSummary(path, str(out), fmt, len(names), n_steps)


def _convert_bags(cfg: Any) -> None:
    from robomosaic.data.rosbag import BagError, convert_bags

    if not cfg.mapping:
        raise BagError(f"input={cfg.input} is a rosbag2 recording: give mapping=<yaml> (data/rosbag.py)")
    summary = convert_bags(cfg.input, cfg.out, cfg.mapping, overwrite=bool(cfg.overwrite))
    if summary.skipped_topics:
        print(f"topics not in the mapping, skipped: {', '.join(summary.skipped_topics)}")
    if summary.skipped_ticks:
        print(
            "ticks that were not steps: " + ", ".join(f"{n} ({r})" for r, n in summary.skipped_ticks.items())
        )
    print(
        f"converted {summary.episodes} episodes ({summary.steps} steps) of {summary.bags} bag(s) "
        f"in {cfg.input} into {cfg.out}"
    )


@console_script("robomosaic-convert")
def main(argv: list[str]) -> None:
    from robomosaic.conf import compose

    cfg = compose("convert", argv)
    from robomosaic.data.lerobot import convert_lerobot, is_lerobot_dataset

    if cfg.format == "lerobot" or (cfg.format == "auto" and is_lerobot_dataset(cfg.input)):
        episodes, frames = convert_lerobot(cfg.input, cfg.out, overwrite=bool(cfg.overwrite))
        print(
            f"converted {episodes} episodes ({frames} frames) "
            f"of the LeRobot dataset {cfg.input} into {cfg.out}"
        )
        return
    from robomosaic.data.rosbag import is_bag

    if cfg.mapping or cfg.format == "rosbag2" or is_bag(cfg.input):
        _convert_bags(cfg)
        return
    try:
        summary = convert(
            cfg.input,
            cfg.out,
            format=cfg.format,
            task=cfg.task.name if cfg.get("task") else None,
            cameras=list(cfg.cameras),
            image_size=int(cfg.image_size),
            overwrite=bool(cfg.overwrite),
        )
    except KeyError as e:  # an unknown task=
        raise SystemExit(f"robomosaic-convert: {e}") from None
    print(
        f"converted {summary.episodes} episodes ({summary.steps} steps) of {summary.input} "
        f"[{summary.format}] into {summary.out}"
    )


if __name__ == "__main__":
    main()
