"""robomosaic.sim: MuJoCo tasks (robosuite), scripted experts, vectorized rollouts, video."""

from robomosaic.sim.tasks import TASKS, Task, TaskSpec, make_task

__all__ = ["TASKS", "Task", "TaskSpec", "make_task"]
