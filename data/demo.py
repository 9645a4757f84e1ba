"""robomosaic-demo (`make demo`): scripted lift demonstrations, recorded, replayed and filmed.

    robomosaic-demo [quick=true] [episodes=20] [out_dir=demos] [workers=2]

1. collects `episodes` (quick: 5) scripted lift demonstrations into `<out_dir>/lift.zarr`,
2. replays the first one from its stored actions and writes `<out_dir>/lift_replay.mp4`,
3. prints what it did: episodes, success rate, replay divergence and the paths.

The store is made afresh on every run (an existing episode store at that path is replaced; anything
else there is left alone and the demo stops), so the printed numbers always describe this run.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from robomosaic.data.store import EpisodeStore, StoreError

QUICK_EPISODES = 5


def _remove_old_store(path: Path) -> None:
    if not path.exists():
        return
    try:
        EpisodeStore.open(path)
    except StoreError as e:
        raise SystemExit(
            f"robomosaic-demo: {path} exists and is not an episode store; not replacing it ({e})"
        ) from None
    shutil.rmtree(path)


def main(argv: Sequence[str] | None = None) -> None:
    from robomosaic.conf import compose
    from robomosaic.data.collect import collect
    from robomosaic.data.replay import replay_episode
    from robomosaic.sim.video import write_mp4

    cfg = compose("demo", sys.argv[1:] if argv is None else argv)
    started = time.time()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store_path, video_path = out_dir / "lift.zarr", out_dir / "lift_replay.mp4"
    episodes = QUICK_EPISODES if cfg.quick else int(cfg.episodes)
    _remove_old_store(store_path)

    print(f"[1/2] collecting {episodes} scripted lift demonstrations into {store_path}")
    collect_cfg = compose(
        "collect", ["task=lift", f"episodes={episodes}", f"out={store_path}", f"workers={cfg.workers}"]
    )
    collected = collect(collect_cfg)
    print(collected.text())
    if collected.stored == 0:
        raise SystemExit("robomosaic-demo: no episode was stored")

    print(f"[2/2] replaying episode 0 from its actions into {video_path}")
    store = EpisodeStore.open(store_path)
    replay = replay_episode(store, 0, "actions", camera="agentview", size=int(cfg.video_size))
    write_mp4(video_path, replay.frames, fps=store.spec.control_hz)
    print(replay.summary())

    print(
        f"\nrobomosaic demo done in {time.time() - started:.0f} s\n"
        f"  demonstrations  {store_path}: {store.n_episodes} episodes, {store.n_steps} steps, "
        f"{collected.successes}/{collected.attempted} scripted episodes succeeded\n"
        f"  replay          episode 0: max eef divergence {replay.eef_error.max() * 1000:.3f} mm, "
        f"success {replay.success} (stored {replay.stored_success})\n"
        f"  video           {video_path} ({len(replay.frames)} frames at {store.spec.control_hz:g} fps)"
    )


if __name__ == "__main__":
    main()
