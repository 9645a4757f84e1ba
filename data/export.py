"""robomosaic-export: episodes of a store as a rosbag2 recording (MCAP storage) or a LeRobot v3 dataset.

    robomosaic-export store=demos/lift.zarr out=bags/lift mapping=config/sim_arm_policy.yaml [episodes=[0,3]]
    robomosaic-export store=demos/lift.zarr out=datasets/lift format=lerobot [keys=[robot0_eef_pos,action]]

The mapping names the topic, message type and field of every key, as the policy node, the recorder
and robomosaic-convert read them (see `robomosaic.data.rosbag`), so the bag converts back to the
same store and opens in Foxglove. A LeRobot dataset (`robomosaic.data.lerobot.export_lerobot`) loads in
LeRobot's `LeRobotDataset` (bench/lerobot_roundtrip.py checks it with LeRobot installed).
"""

from __future__ import annotations

from robomosaic.conf.console import console_script


@console_script("robomosaic-export")
def main(argv: list[str]) -> None:
    from robomosaic.conf import compose
    from robomosaic.data.rosbag import BagError, export_bag

    cfg = compose("export", argv)
    if cfg.format == "lerobot":
        from robomosaic.data.lerobot import export_lerobot

        keys = None if cfg["keys"] is None else [str(k) for k in cfg["keys"]]
        n, frames = export_lerobot(cfg.store, cfg.out, keys=keys)
        print(f"wrote {n} episodes ({frames} frames) of {cfg.store} as the LeRobot v3 dataset {cfg.out}")
        return
    if cfg.format != "rosbag2":
        raise BagError(f"format={cfg.format!r}: expected rosbag2 or lerobot")
    if not cfg.mapping:
        raise BagError("format=rosbag2 needs mapping=<yaml> (which key goes to which topic; data/rosbag.py)")
    episodes = None if cfg.episodes is None else [int(i) for i in cfg.episodes]
    n, messages = export_bag(
        cfg.store, cfg.out, cfg.mapping, episodes=episodes, overwrite=bool(cfg.overwrite)
    )
    print(f"wrote {n} episodes ({messages} messages) of {cfg.store} to {cfg.out}")


if __name__ == "__main__":
    main()
