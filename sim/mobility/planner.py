"""The planner: shortest paths to the goal on the occupancy grid, and the expert that follows them.

    planner = GridPlanner(world.occupancy, radius=0.3, goal=world.goal)
    planner.route(xy, hops=(5, 10, 15, 20))     # (N, 4, 2) waypoints along the path from each xy

One Dijkstra search from the goal (scipy's `csgraph.dijkstra`) gives every cell's distance to the
goal and its next cell on the way there, so the route from wherever the robot is now costs a few
array lookups: the planner replans every step, as Nav2's does at its planner rate. Cells closer to an
obstacle than the footprint radius are lethal; near obstacles, steps cost more (like Nav2's
inflation layer), so paths keep their distance where the room allows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from robomosaic.sim.mobility.embodiments import Embodiment
from robomosaic.sim.mobility.worlds import CELL_CENTRES, GRID, RESOLUTION, cell_of, clearance_of

INFLATION = 0.3  # m, decay length of the extra cost near obstacles
INFLATION_COST = 4.0  # extra cost factor right at the lethal boundary
ROUTE_HOPS = (5, 10, 15, 20)  # cells along the path: waypoints about 0.5, 1, 1.5, 2 m ahead


def _grid_edges() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Every pair of 8-neighbour cells of the grid, once: (a, b, step length), and the CSR layout
    (indices, indptr) of the graph holding each pair in both directions, built here once so that a
    planner only fills in the edge costs."""
    index = np.arange(GRID * GRID).reshape(GRID, GRID)
    a, b, length = [], [], []
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a.append(index[: GRID - dr, max(0, -dc) : GRID - max(0, dc)].ravel())  # cell (r, c) ...
        b.append(index[dr:, max(0, dc) : GRID - max(0, -dc)].ravel())  # ... and (r + dr, c + dc)
        length.append(np.full(a[-1].size, np.hypot(dr, dc) * RESOLUTION))
    a, b, length = np.concatenate(a), np.concatenate(b), np.concatenate(length)
    order = np.lexsort((np.concatenate([b, a]), np.concatenate([a, b])))  # by row, then column
    indices = np.concatenate([b, a])[order].astype(np.int32)
    indptr = np.searchsorted(np.concatenate([a, b])[order], np.arange(GRID * GRID + 1)).astype(np.int32)
    return a, b, length, order, (indices, indptr)


_EDGE_A, _EDGE_B, _EDGE_LENGTH, _EDGE_ORDER, _CSR = _grid_edges()


class GridPlanner:
    """Distances to `goal` and next steps toward it from every cell of `occupancy`
    (`clearance`, its `worlds.clearance_of`, is computed unless given)."""

    def __init__(
        self, occupancy: np.ndarray, radius: float, goal: np.ndarray, clearance: np.ndarray | None = None
    ) -> None:
        n_cells = GRID * GRID
        clearance = clearance_of(occupancy) if clearance is None else clearance
        free = clearance >= radius
        # a robot that ends up in a lethal cell is routed from the nearest free cell
        _, (near_r, near_c) = ndimage.distance_transform_edt(~free, return_indices=True)
        self.nearest_free = (near_r * GRID + near_c).ravel()
        weight = (1.0 + INFLATION_COST * np.exp(-(clearance - radius) / INFLATION)).ravel()
        free = free.ravel()
        cost = _EDGE_LENGTH * (weight[_EDGE_A] + weight[_EDGE_B]) / 2
        cost[~(free[_EDGE_A] & free[_EDGE_B])] = np.inf  # no way into or out of a lethal cell
        graph = csr_matrix((np.concatenate([cost, cost])[_EDGE_ORDER], *_CSR), shape=(n_cells, n_cells))
        self.goal = np.asarray(goal, dtype=np.float64).reshape(2)
        r, c = cell_of(self.goal[None])[0]
        goal_cell = int(self.nearest_free[r * GRID + c])
        self.distance, predecessors = dijkstra(graph, indices=goal_cell, return_predecessors=True)
        # The search ran from the goal, so a cell's predecessor is its next cell toward the goal.
        self.next_cell = np.where(predecessors >= 0, predecessors, np.arange(n_cells))

    def cells(self, xy: np.ndarray) -> np.ndarray:
        """The flat cell index the route starts from at each of `xy` (N, 2): the nearest free cell."""
        rc = cell_of(np.asarray(xy, dtype=np.float64).reshape(-1, 2))
        return self.nearest_free[rc[:, 0] * GRID + rc[:, 1]]

    def distance_at(self, xy: np.ndarray) -> np.ndarray:
        """(N,) path cost (m, inflated near obstacles) from each position to the goal; inf if cut off."""
        return self.distance[self.cells(xy)]

    def route(self, xy: np.ndarray, hops: tuple[int, ...] = ROUTE_HOPS) -> np.ndarray:
        """(N, len(hops), 2) world positions `hops` cells along the path from each of `xy` (N, 2);
        the path's last point is the goal itself, and waypoints past it stay there."""
        table = RouteTable(1, hops)
        table.set(0, self)
        return table.route(xy, np.zeros(len(np.reshape(xy, (-1, 2))), dtype=int))


class RouteTable:
    """The next-cell tables of N worlds' planners side by side, so that the routes of all worlds are
    looked up in one vectorized pass per hop (a Python loop over 64 planners cost more than MuJoCo)."""

    def __init__(self, n: int, hops: tuple[int, ...] = ROUTE_HOPS) -> None:
        self.hops = hops
        self.n = n
        self.next_cell: np.ndarray | None = None  # (n, cells) flat indices into (n * cells)
        self.nearest_free: np.ndarray | None = None  # (n, cells) indices within a world's grid
        self.centres = CELL_CENTRES

    def set(self, i: int, planner: GridPlanner) -> None:
        size = planner.next_cell.size
        if self.next_cell is None:
            self.next_cell = np.tile(np.arange(size), (self.n, 1))
            self.next_cell += np.arange(self.n)[:, None] * size
            self.goals = np.zeros((self.n, 2))
            self.nearest_free = np.zeros((self.n, size), dtype=int)
        self.next_cell[i] = planner.next_cell + i * size
        self.nearest_free[i] = planner.nearest_free
        self.goals[i] = planner.goal

    def route(self, xy: np.ndarray, worlds: np.ndarray | Sequence[int]) -> np.ndarray:
        """(N, len(hops), 2) waypoints for the positions `xy` (N, 2) in the worlds `worlds`."""
        worlds = np.asarray(worlds, dtype=int)
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        size = self.next_cell.shape[1]
        rc = cell_of(xy)
        cells = self.nearest_free[worlds, rc[:, 0] * GRID + rc[:, 1]] + worlds * size
        flat, centres = self.next_cell.ravel(), self.centres
        out = np.empty((len(worlds), len(self.hops), 2))
        done = 0
        for k, hop in enumerate(self.hops):
            for _ in range(hop - done):
                cells = flat[cells]
            done = hop
            out[:, k] = centres[cells % size]
            at_goal = flat[cells] == cells
            out[at_goal, k] = self.goals[worlds[at_goal]]
        return out


def to_body_frame(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World points (N, ..., 2) in the frames of poses (N, 3: x, y, yaw)."""
    d = points - pose[:, None, :2] if points.ndim == 3 else points - pose[:, :2]
    c, s = np.cos(pose[:, 2]), np.sin(pose[:, 2])
    if points.ndim == 3:
        c, s = c[:, None], s[:, None]
    return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], axis=-1)


class RouteExpert:
    """Pure pursuit of a route, tuned for `carter` (embodiment A).

    It reads a goal and a route in the body frame: it steers toward the route's second waypoint
    (about 1 m ahead), or the goal once that is nearer; a differential drive slows down while it
    turns, a holonomic base also moves sideways. As a demonstrator (`rollout.RouteExpertPolicy`) it
    follows the route around every obstacle, including those the base's map lacks.
    """

    def __init__(
        self, embodiments: Sequence[Embodiment], turn_gain: float = 2.0, slow_radius: float = 1.0
    ) -> None:
        self.max_speed = np.array([e.max_speed for e in embodiments])
        self.holonomic = np.array([e.drive == "holonomic" for e in embodiments])
        self.turn_gain = turn_gain
        self.slow_radius = slow_radius

    def __call__(self, obs: dict[str, np.ndarray], worlds: Sequence[int] | None = None) -> np.ndarray:
        """Commands (N, 3) for a batch of observations, of all worlds or of `worlds` in this order."""
        rows = slice(None) if worlds is None else np.asarray(worlds, dtype=int)
        max_speed, holonomic = self.max_speed[rows], self.holonomic[rows]
        goal = obs["goal"].reshape(-1, 2)
        target = obs["route"].reshape(len(goal), -1, 2)[:, 1]
        goal_near = np.linalg.norm(goal, axis=1) < np.linalg.norm(target, axis=1)
        target = np.where(goal_near[:, None], goal, target)
        angle = np.arctan2(target[:, 1], target[:, 0])
        speed = max_speed[:, 0] * np.clip(np.linalg.norm(goal, axis=1) / self.slow_radius, 0.3, 1.0)
        heading = target / np.maximum(np.linalg.norm(target, axis=1, keepdims=True), 1e-6)
        facing = np.clip(np.cos(angle), 0.0, 1.0) ** 2
        vx = np.where(holonomic, speed * heading[:, 0], speed * facing)
        vy = np.where(holonomic, speed * heading[:, 1], 0.0)
        # a holonomic base keeps its direction of travel when a speed limit bites
        wanted = np.maximum(np.abs(np.stack([vx, vy], axis=1)), 1e-9)
        scale = np.minimum(1.0, np.min(max_speed[:, :2] / wanted, axis=1))
        vx, vy = np.where(holonomic, vx * scale, vx), np.where(holonomic, vy * scale, vy)
        wz = np.clip(self.turn_gain * angle, -max_speed[:, 2], max_speed[:, 2])
        return np.stack([vx, vy, wz], axis=1)
