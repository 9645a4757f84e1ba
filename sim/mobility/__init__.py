"""Mobile-robot navigation in MuJoCo: seeded worlds, embodiments, a batched environment and a
planner expert (COMPASS part 1). The arm's task registry (`robomosaic.sim.tasks`) stays the arm's."""
