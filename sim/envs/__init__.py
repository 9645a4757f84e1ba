"""Our own robosuite environments; importing this module registers them with robosuite."""
