"""robomosaic-export: episodes of a store as a rosbag2 recording (MCAP storage).

    robomosaic-export store=demos/lift.zarr out=bags/lift mapping=config/sim_arm_policy.yaml [episodes=[0,3]]

The mapping names the topic, message type and field of every key, as the policy node, the recorder
and robomosaic-convert read them (see `robomosaic.data.rosbag`), so the bag converts back to the
same store and opens in Foxglove.
"""

from __future__ import annotations

from robomosaic.conf.console import console_script


@console_script("robomosaic-export")
def main(argv: list[str]) -> None:
    from robomosaic.conf import compose
    from robomosaic.data.rosbag import export_bag

    cfg = compose("export", argv)
    episodes = None if cfg.episodes is None else [int(i) for i in cfg.episodes]
    n, messages = export_bag(
        cfg.store, cfg.out, cfg.mapping, episodes=episodes, overwrite=bool(cfg.overwrite)
    )
    print(f"wrote {n} episodes ({messages} messages) of {cfg.store} to {cfg.out}")


if __name__ == "__main__":
    main()
