"""Our own robosuite environments; importing this module registers them with robosuite."""

from robomosaic.sim.envs.pick_one import PickOne

__all__ = ["PickOne"]
