"""Navigation worlds generated from a seed: a walled room with obstacles, a start pose and a goal.

    world = make_world(seed=7)                   # family drawn from the seed, or family="corridors"
    world.boxes                                  # (K, 5): centre x, y, half sizes x, y, yaw
    world.occupancy                              # (H, W) bool grid at RESOLUTION m, row = y, column = x

Three layout families: `corridors` (long walls with gaps at alternating ends: a serpentine),
`doorways` (one or two walls across the room, each with one door, plus a few boxes) and `clutter`
(boxes of many sizes and angles). Walls are on the map the base's planner plans on; some boxes are
not (`World.mapped`: furniture moved since the map was made), as in a real building, so that a
policy must see them with its range sensor and leave the planned route to pass them.
The same seed gives the same world, start and goal for every embodiment, so embodiments are
compared on identical episodes: start and goal keep `CLEARANCE` from every obstacle and are
connected for the widest footprint (`MAX_RADIUS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from robomosaic.conf.console import RobomosaicError

ROOM = 10.0  # m, side of the square room (inside the outer walls)
WALL = 0.15  # m, wall thickness
HEIGHT = 1.5  # m, height of every wall and obstacle (above every scanner)
RESOLUTION = 0.1  # m per occupancy cell
GRID = round(ROOM / RESOLUTION)  # cells per side
MAX_RADIUS = 0.45  # m, the widest footprint every generated episode must let through
CLEARANCE = 0.6  # m, free space around the start and the goal
GOAL_DISTANCE = (2.0, 8.0)  # m, straight-line start-goal distance
FAMILIES = ("corridors", "doorways", "clutter")
MAX_BOXES = 24  # obstacles a world may hold, outer walls included (the MuJoCo model's box pool)


class WorldError(RobomosaicError, ValueError):
    """A goal or start that cannot be used (inside an obstacle, outside the room)."""


@dataclass
class World:
    seed: int
    family: str
    boxes: np.ndarray  # (K, 5) cx, cy, hx, hy, yaw
    mapped: np.ndarray  # (K,) bool: on the map the planner is given
    start: np.ndarray  # (3,) x, y, yaw
    goal: np.ndarray  # (2,) x, y
    occupancy: np.ndarray  # (H, W) bool, every obstacle
    map_occupancy: np.ndarray  # (H, W) bool, the mapped obstacles only: what the base's planner knows
    clearance: np.ndarray  # (H, W) m from every cell centre to the nearest cell of `occupancy`

    def check_free(self, xy: np.ndarray, radius: float, what: str = "goal") -> None:
        """Raise `WorldError` unless a disc of `radius` at `xy` lies in free space inside the room."""
        x, y = (float(v) for v in np.asarray(xy, dtype=np.float64).reshape(2))
        if not (0 < x < ROOM and 0 < y < ROOM):
            raise WorldError(f"world {self.seed}: {what} ({x:.2f}, {y:.2f}) is outside the room [0, {ROOM}]")
        row, col = cell_of(np.array([[x, y]]))[0]
        room = self.clearance[row, col]
        if room < radius:
            raise WorldError(
                f"world {self.seed}: {what} ({x:.2f}, {y:.2f}) is inside or within {radius:.2f} m of an "
                f"obstacle (nearest obstacle {room:.2f} m away)"
            )


def cell_of(xy: np.ndarray) -> np.ndarray:
    """(N, 2) positions in m -> (N, 2) integer (row, column) cells, clipped into the grid."""
    cols = np.clip((xy[:, 0] / RESOLUTION).astype(int), 0, GRID - 1)
    rows = np.clip((xy[:, 1] / RESOLUTION).astype(int), 0, GRID - 1)
    return np.stack([rows, cols], axis=1)


def clearance_of(occupancy: np.ndarray) -> np.ndarray:
    """(H, W) distance (m) from every cell centre to the nearest occupied cell."""
    return ndimage.distance_transform_edt(~occupancy) * RESOLUTION


_CENTRE = (np.arange(GRID) + 0.5) * RESOLUTION  # a cell centre's x (by column) or y (by row)
CELL_CENTRES = np.stack([np.tile(_CENTRE, GRID), np.repeat(_CENTRE, GRID)], axis=1)  # (H * W, 2) x, y
CELL_CENTRES.setflags(write=False)


def rasterize(boxes: np.ndarray) -> np.ndarray:
    """The occupancy grid of oriented boxes: a cell is occupied when its centre lies in a box."""
    occupied = np.zeros((GRID, GRID), dtype=bool)
    for cx, cy, hx, hy, yaw in boxes:
        # half a cell of slack: a thin wall must not fall between cell centres
        ex, ey = hx + RESOLUTION / 2, hy + RESOLUTION / 2
        reach = np.hypot(ex, ey)  # only the cells within the box's bounding circle can be in it
        cols = slice(*np.clip(np.searchsorted(_CENTRE, [cx - reach, cx + reach + RESOLUTION]), 0, GRID))
        rows = slice(*np.clip(np.searchsorted(_CENTRE, [cy - reach, cy + reach + RESOLUTION]), 0, GRID))
        dx, dy = _CENTRE[None, cols] - cx, _CENTRE[rows, None] - cy
        c, s = np.cos(yaw), np.sin(yaw)
        u, v = c * dx + s * dy, -s * dx + c * dy
        occupied[rows, cols] |= (np.abs(u) <= ex) & (np.abs(v) <= ey)
    return occupied


def _outer_walls() -> list[tuple[float, ...]]:
    h, m = WALL / 2, ROOM / 2
    return [
        (m, -h, m + WALL, h, 0.0),
        (m, ROOM + h, m + WALL, h, 0.0),
        (-h, m, h, m, 0.0),
        (ROOM + h, m, h, m, 0.0),
    ]


def _wall_with_gaps(along_x: bool, at: float, gaps: list[tuple[float, float]]) -> list[tuple[float, ...]]:
    """Segments of a wall across the room at coordinate `at`, leaving the (start, end) gaps open."""
    edges = [0.0] + [v for gap in sorted(gaps) for v in gap] + [ROOM]
    boxes = []
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        if b - a > 0.05:
            centre, half = (a + b) / 2, (b - a) / 2
            boxes.append((centre, at, half, WALL / 2, 0.0) if along_x else (at, centre, WALL / 2, half, 0.0))
    return boxes


UNMAPPED = 0.0  # the 6th value of a layout box: 1.0 mapped, 0.0 not on the map


def _unmapped_boxes(rng: np.random.Generator, count: int) -> list[tuple[float, ...]]:
    """Boxes the map does not show, anywhere in the room (start and goal keep clear of them)."""
    boxes = []
    for _ in range(count):
        half = rng.uniform(0.15, 0.45, 2)
        boxes.append((*rng.uniform(1.0, ROOM - 1.0, 2), *half, rng.uniform(0, np.pi), UNMAPPED))
    return boxes


def _corridors(rng: np.random.Generator) -> list[tuple[float, ...]]:
    n_walls = int(rng.integers(2, 4))
    along_x = bool(rng.random() < 0.5)
    positions = np.linspace(0, ROOM, n_walls + 2)[1:-1] + rng.uniform(-0.4, 0.4, n_walls)
    boxes = []
    for i, at in enumerate(positions):
        width = rng.uniform(1.4, 2.0)
        gap = (0.0, width) if (i % 2 == 0) == bool(rng.random() < 0.5) else (ROOM - width, ROOM)
        boxes += _wall_with_gaps(along_x, float(at), [gap])
    return boxes + _unmapped_boxes(rng, int(rng.integers(1, 4)))


def _doorways(rng: np.random.Generator) -> list[tuple[float, ...]]:
    boxes = []
    along_x = bool(rng.random() < 0.5)
    n_walls = int(rng.integers(1, 3))
    for at in np.linspace(0, ROOM, n_walls + 2)[1:-1] + rng.uniform(-0.8, 0.8, n_walls):
        width = rng.uniform(1.2, 1.6)
        door = rng.uniform(0.5, ROOM - 0.5 - width)
        boxes += _wall_with_gaps(along_x, float(at), [(door, door + width)])
    for _ in range(int(rng.integers(0, 4))):
        boxes.append((*rng.uniform(1.0, ROOM - 1.0, 2), *rng.uniform(0.15, 0.45, 2), rng.uniform(0, np.pi)))
    return boxes + _unmapped_boxes(rng, int(rng.integers(1, 4)))


def _clutter(rng: np.random.Generator) -> list[tuple[float, ...]]:
    boxes = []
    for _ in range(int(rng.integers(8, 17))):
        if rng.random() < 0.3:  # a pillar
            half = rng.uniform(0.1, 0.25)
            boxes.append((*rng.uniform(0.8, ROOM - 0.8, 2), half, half, 0.0))
        else:
            half = rng.uniform(0.15, 0.7, 2)
            boxes.append((*rng.uniform(0.8, ROOM - 0.8, 2), *half, rng.uniform(0, np.pi)))
    return boxes + _unmapped_boxes(rng, int(rng.integers(2, 5)))


LAYOUTS = {"corridors": _corridors, "doorways": _doorways, "clutter": _clutter}


def make_world(seed: int, family: str | None = None, families: tuple[str, ...] = FAMILIES) -> World:
    """The world of `seed` (see module docstring). The family is drawn from `families` unless given."""
    for name in (family,) if family else families:
        if name not in LAYOUTS:
            raise WorldError(f"unknown layout family {name!r}; known: {sorted(LAYOUTS)}")
    rng = np.random.default_rng([int(seed), 7001])
    family = family or str(rng.choice(list(families)))
    xy = CELL_CENTRES
    for _ in range(100):  # almost every layout has a usable start and goal at the first try
        layout = [b if len(b) == 6 else (*b, 1.0) for b in _outer_walls() + LAYOUTS[family](rng)]
        layout = np.array(layout, dtype=np.float64)[:MAX_BOXES]
        boxes, mapped = layout[:, :5], layout[:, 5] > 0
        map_occupancy = rasterize(boxes[mapped])
        occupancy = map_occupancy | rasterize(boxes[~mapped])
        clearance = clearance_of(occupancy)
        candidates = np.flatnonzero(clearance.ravel() >= CLEARANCE)
        if len(candidates) < 2:
            continue
        start = xy[rng.choice(candidates)]
        far = np.linalg.norm(xy[candidates] - start, axis=1)
        goals = candidates[(far >= GOAL_DISTANCE[0]) & (far <= GOAL_DISTANCE[1])]
        if len(goals) == 0:
            continue
        goal = xy[rng.choice(goals)]
        # connected for the widest base: the planner's graph (8 neighbours, both cells free)
        (start_row, start_col), (goal_row, goal_col) = cell_of(np.stack([start, goal]))
        regions, _ = ndimage.label(clearance >= MAX_RADIUS, structure=np.ones((3, 3)))
        if regions[start_row, start_col] != regions[goal_row, goal_col]:
            continue  # the widest base could not get there
        start = np.array([*start, rng.uniform(-np.pi, np.pi)])
        return World(int(seed), family, boxes, mapped, start, goal, occupancy, map_occupancy, clearance)
    raise WorldError(f"world {seed}: no connected start and goal in 100 {family} layouts")
