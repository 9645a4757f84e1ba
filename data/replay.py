"""robomosaic-replay: re-execute a stored episode and measure how far it drifts from the recording.

    robomosaic-replay dataset=demos/lift.zarr episode=0 mode=actions video=out/replay.mp4 camera=agentview

Both modes start from the recorded initial state: the task is reset with the episode's seed (so
everything robosuite draws at reset matches) and then set to the first stored state if the reset
did not reproduce it exactly.

- `actions`: step the stored actions open loop and compare each step's observation and simulator
  state with the stored ones. MuJoCo is deterministic on one machine, so a divergence means the
  recording and the replay do not run the same model, controller or code.
- `states`: set every stored state in turn. Observations are then recomputed from each state; they
  differ from the recorded ones by what robosuite observes during a step (positions lag the state
  by one physics substep), a fraction of a millimetre. The final success is read after stepping
  the last stored action from the last stored state (the store holds the state before each action).

Errors are maxima of absolute differences per step: `eef` on robot0_eef_pos (metres), `object` on
the task's object observation (positions in metres and quaternions), `state` on the simulator
state (qpos and qvel). The video has one frame per stored step (the scene the action was chosen
on) and one after the last action.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robomosaic.conf.console import console_script
from robomosaic.data.store import EpisodeStore, StoreError

MODES = ("actions", "states")


@dataclass
class ReplayResult:
    episode: int
    mode: str
    steps: int
    eef_error: np.ndarray  # (steps,) max abs error of robot0_eef_pos per step, metres
    object_error: np.ndarray  # (steps,) max abs error of the `object` observation per step
    state_error: np.ndarray  # (steps,) max abs error of the simulator state per step
    success: bool  # success at the end of the replay
    stored_success: bool
    frames: np.ndarray | None  # (steps + 1, H, W, 3) uint8 when a camera was asked for

    def summary(self) -> str:
        agree = "agrees with" if self.success == self.stored_success else "DIFFERS from"
        return (
            f"episode {self.episode} replayed from {self.mode} over {self.steps} steps: "
            f"max |eef error| {self.eef_error.max():.2e} m, "
            f"max |object error| {self.object_error.max():.2e}, "
            f"max |state error| {self.state_error.max():.2e}; "
            f"success {self.success} {agree} the stored {self.stored_success}"
        )


def replay_episode(
    store: EpisodeStore,
    episode: int,
    mode: str = "actions",
    camera: str | None = None,
    size: int = 256,
) -> ReplayResult:
    """Re-execute `episode` of `store` in a fresh task; render `camera` at `size` if given."""
    from robomosaic.sim.tasks import make_task

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    for key in ("action", "state", "robot0_eef_pos", "object"):
        if key not in store.spec.keys:
            raise StoreError(
                f"{store.path}: replay needs key {key!r}, the store has {sorted(store.spec.keys)}"
            )
    stored = store.episode(episode, keys=["action", "state", "robot0_eef_pos", "object"])
    meta = store.episode_meta(episode)
    # The camera is one of the task's cameras, so every observation carries the frame to record.
    cameras = (camera,) if camera else ()
    task = make_task(store.spec.task, cameras=cameras, image_size=size, max_steps=len(stored["action"]) + 1)
    try:
        obs = task.reset(seed=meta["seed"] if meta["seed"] >= 0 else None)
        if task.get_state().shape != stored["state"].shape[1:]:
            raise StoreError(
                f"{store.path}: key 'state' has {stored['state'].shape[1:]} per step, but task "
                f"{task.name!r} has a simulator state of {task.get_state().shape}; not its recording"
            )
        # Setting a state re-reads the observations, which shifts when robosuite samples them
        # during later steps (by up to a millimetre); so set it only when the seeded reset did
        # not already land on the recorded initial state (converted data, a changed model).
        if not np.array_equal(task.get_state(), stored["state"][0]):
            obs = task.set_state(stored["state"][0])
        steps = len(stored["action"])
        errors = np.zeros((3, steps))
        frames = []
        for t in range(steps):
            if mode == "states":
                obs = task.set_state(stored["state"][t])
            errors[:, t] = [
                np.abs(obs["robot0_eef_pos"] - stored["robot0_eef_pos"][t]).max(),
                np.abs(obs["object"] - stored["object"][t]).max(),
                np.abs(task.get_state() - stored["state"][t]).max(),
            ]
            if camera:
                frames.append(obs[f"{camera}_image"])
            if mode == "actions" or t == steps - 1:
                obs, _, _, _, info = task.step(stored["action"][t])
        if camera:
            frames.append(obs[f"{camera}_image"])  # and the scene after the last action
        return ReplayResult(
            episode=episode if episode >= 0 else store.n_episodes + episode,
            mode=mode,
            steps=steps,
            eef_error=errors[0],
            object_error=errors[1],
            state_error=errors[2],
            success=bool(info["success"]),
            stored_success=bool(meta["success"]),
            frames=np.stack(frames) if frames else None,
        )
    finally:
        task.close()


@console_script("robomosaic-replay")
def main(argv: list[str]) -> None:
    from robomosaic.conf import compose
    from robomosaic.sim.video import write_mp4

    cfg = compose("replay", argv)
    if cfg.mode not in MODES:
        raise SystemExit(f"robomosaic-replay: mode={cfg.mode!r}: expected one of {MODES}")
    try:
        store = EpisodeStore.open(cfg.dataset)
        result = replay_episode(
            store, int(cfg.episode), cfg.mode, camera=cfg.camera if cfg.video else None, size=int(cfg.size)
        )
    except (IndexError, KeyError) as e:  # KeyError: the store's task is not registered
        raise SystemExit(f"robomosaic-replay: {e}") from None
    print(result.summary())
    if cfg.video:
        Path(cfg.video).parent.mkdir(parents=True, exist_ok=True)
        write_mp4(cfg.video, result.frames, fps=store.spec.control_hz)
        print(f"wrote {len(result.frames)} frames to {cfg.video}")


if __name__ == "__main__":
    main()
