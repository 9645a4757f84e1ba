"""Mobile bases that share one command interface, (vx, vy, yaw rate) in the body frame, and differ
as real bases do: drive type, command lag, acceleration and speed limits, yaw drift, skidding in
turns, footprint and range sensor.

    carter = load_embodiment("carter")            # conf/mobility/embodiment/carter.yaml
    dynamics = BaseDynamics([carter] * 64)         # one row per world
    pose, measured = dynamics.step(pose, commands, dt=0.1)

The dynamics are kinematic with a first-order lag, integrated in numpy for every world at once
(MuJoCo's contact solver would only matter after a collision, and a collision ends the episode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from importlib.resources import files
from typing import Any, Literal

import numpy as np
import yaml

from robomosaic.conf.console import RobomosaicError

EMBODIMENT_DIR = files("robomosaic.conf") / "mobility" / "embodiment"
SUBSTEP = 0.02  # s: integration step of the lag and acceleration limits within a control period


class EmbodimentError(RobomosaicError, ValueError):
    """An embodiment config that is missing, malformed or physically impossible."""


@dataclass(frozen=True)
class ScanConfig:
    """A planar range scanner: rays spread evenly over `fov_deg` around the forward axis."""

    fov_deg: float = 270.0
    rays: int = 64
    height: float = 0.3  # m above the floor
    range: float = 8.0  # m; beyond it a ray reports `range`
    noise: float = 0.01  # m, standard deviation of Gaussian range noise

    def angles(self) -> np.ndarray:
        """Ray angles in the body frame (rad, counter-clockwise from forward)."""
        half = np.deg2rad(self.fov_deg) / 2
        if self.fov_deg >= 360:
            return np.linspace(-np.pi, np.pi, self.rays, endpoint=False)
        return np.linspace(-half, half, self.rays)


@dataclass(frozen=True)
class Embodiment:
    """One mobile base (see conf/mobility/embodiment/*.yaml for the meaning of every field)."""

    name: str
    drive: Literal["differential", "holonomic"] = "holonomic"
    radius: float = 0.3
    max_speed: tuple[float, float, float] = (1.0, 1.0, 1.5)
    max_accel: tuple[float, float, float] = (2.0, 2.0, 3.0)
    lag: float = 0.1
    yaw_bias: float = 0.0
    lateral_slip: float = 0.0
    scan: ScanConfig = field(default_factory=ScanConfig)
    held_out: bool = False

    def __post_init__(self) -> None:
        where = f"embodiment {self.name!r}"
        if self.drive not in ("differential", "holonomic"):
            raise EmbodimentError(f"{where}: drive={self.drive!r}, expected differential or holonomic")
        for name in ("max_speed", "max_accel"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or min(value) < 0:
                raise EmbodimentError(f"{where}: {name}={value} must be three non-negative numbers")
            object.__setattr__(self, name, value)
        if self.drive == "differential":  # no sideways motion, whatever the file says
            object.__setattr__(self, "max_speed", (self.max_speed[0], 0.0, self.max_speed[2]))
        if not 0.05 <= self.radius <= 1.0:
            raise EmbodimentError(f"{where}: radius={self.radius} m is outside [0.05, 1.0]")
        if self.lag < 0:
            raise EmbodimentError(f"{where}: lag={self.lag} s must be >= 0")
        if isinstance(self.scan, dict):
            object.__setattr__(self, "scan", _from_dict(ScanConfig, self.scan, f"{where} scan"))
        if self.scan.rays < 1 or not 0 < self.scan.fov_deg <= 360 or self.scan.range <= 0:
            raise EmbodimentError(f"{where}: bad scan {self.scan}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_speed"], d["max_accel"] = list(self.max_speed), list(self.max_accel)
        return d


def _from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise EmbodimentError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**values)


def embodiment_names(include_held_out: bool = True) -> list[str]:
    """The embodiments with a config file, by name."""
    names = sorted(p.name[: -len(".yaml")] for p in EMBODIMENT_DIR.iterdir() if p.name.endswith(".yaml"))
    return [n for n in names if include_held_out or not load_embodiment(n).held_out]


def load_embodiment(name_or_values: str | dict[str, Any] | Embodiment) -> Embodiment:
    """An embodiment by config name (conf/mobility/embodiment/<name>.yaml) or from a dict."""
    if isinstance(name_or_values, Embodiment):
        return name_or_values
    if isinstance(name_or_values, dict):
        return _from_dict(Embodiment, dict(name_or_values), f"embodiment {name_or_values.get('name')!r}")
    path = EMBODIMENT_DIR / f"{name_or_values}.yaml"
    if not path.is_file():
        raise EmbodimentError(
            f"unknown embodiment {name_or_values!r}; configs in {EMBODIMENT_DIR}: {embodiment_names()}"
        )
    values = yaml.safe_load(path.read_text())
    if values.get("name") != name_or_values:
        raise EmbodimentError(f"{path}: name {values.get('name')!r} differs from the file name")
    return _from_dict(Embodiment, values, str(path))


def sample_embodiment(rng: np.random.Generator, name: str = "sampled") -> Embodiment:
    """A random base within the range the config files span, for training on more embodiments."""
    holonomic = bool(rng.random() < 0.7)
    vx = rng.uniform(0.5, 1.2)
    return Embodiment(
        name=name,
        drive="holonomic" if holonomic else "differential",
        radius=float(rng.uniform(0.2, 0.45)),
        max_speed=(vx, float(rng.uniform(0.2, 0.8)) if holonomic else 0.0, float(rng.uniform(0.8, 2.0))),
        max_accel=(float(rng.uniform(0.6, 2.0)), float(rng.uniform(0.4, 1.5)), float(rng.uniform(1.2, 4.0))),
        lag=float(rng.uniform(0.03, 0.4)),
        yaw_bias=float(rng.uniform(-0.1, 0.1)),
        lateral_slip=float(rng.uniform(0.0, 0.2)),
        scan=ScanConfig(
            fov_deg=float(rng.choice([180, 220, 270, 360])),
            rays=int(rng.integers(40, 91)),
            height=float(rng.uniform(0.15, 1.2)),
            range=float(rng.choice([6.0, 8.0])),
            noise=float(rng.uniform(0.005, 0.02)),
        ),
    )


class BaseDynamics:
    """The bases of N worlds, one embodiment each, stepped together.

    State per world: the body-frame velocity the base has reached (vx, vy, yaw rate). A command is
    clipped to the speed limits (vy to 0 for a differential drive), followed through a first-order
    lag of time constant `lag` whose rate of change is clipped to `max_accel`; the body then moves
    with that velocity plus its yaw drift and its sideways skid (`lateral_slip` * vx * yaw rate).
    """

    def __init__(self, embodiments: Sequence[Embodiment]) -> None:
        self.embodiments = list(embodiments)
        self.max_speed = np.array([e.max_speed for e in self.embodiments])
        self.max_accel = np.array([e.max_accel for e in self.embodiments])
        self.lag = np.array([e.lag for e in self.embodiments])[:, None]
        self.yaw_bias = np.array([e.yaw_bias for e in self.embodiments])
        self.lateral_slip = np.array([e.lateral_slip for e in self.embodiments])
        self.velocity = np.zeros((len(self.embodiments), 3))

    def reset(self, index: np.ndarray | slice = slice(None)) -> None:
        self.velocity[index] = 0.0

    def step(self, pose: np.ndarray, command: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
        """Advance every world by `dt` s under `command` (N, 3); return the new pose (N, 3: x, y,
        yaw) and the body-frame velocity actually moved with (N, 3), which odometry measures."""
        command = np.clip(np.asarray(command, dtype=np.float64), -self.max_speed, self.max_speed)
        pose = np.array(pose, dtype=np.float64)
        n_sub = max(1, round(dt / SUBSTEP))
        h = dt / n_sub
        follow = 1.0 - np.exp(-h / np.maximum(self.lag, 1e-9))
        moved = np.zeros_like(self.velocity)
        for _ in range(n_sub):
            change = np.clip((command - self.velocity) * follow, -self.max_accel * h, self.max_accel * h)
            self.velocity += change
            vx, vy, wz = self.velocity.T
            actual = np.stack([vx, vy + self.lateral_slip * vx * wz, wz + self.yaw_bias], axis=1)
            c, s = np.cos(pose[:, 2]), np.sin(pose[:, 2])
            pose[:, 0] += (c * actual[:, 0] - s * actual[:, 1]) * h
            pose[:, 1] += (s * actual[:, 0] + c * actual[:, 1]) * h
            pose[:, 2] = wrap_angle(pose[:, 2] + actual[:, 2] * h)
            moved = actual
        return pose, moved


def wrap_angle(a: np.ndarray) -> np.ndarray:
    """Angles wrapped into [-pi, pi)."""
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def known_embodiments() -> list[str]:
    """The embodiments a cross-embodiment policy is trained on (every config not held out), in the
    order of the one-hot `embodiment_embedding`."""
    return embodiment_names(include_held_out=False)


def _descriptor(e: Embodiment) -> np.ndarray:
    """The parameters that set how a base moves and senses, as one vector."""
    s = e.scan
    return np.array(
        [float(e.drive == "holonomic"), e.radius, *e.max_speed, *e.max_accel, e.lag, e.yaw_bias,
         e.lateral_slip, s.fov_deg, s.rays, s.height, s.range, s.noise],
        dtype=np.float64,
    )  # fmt: skip


def nearest_known(embodiment: str | Embodiment) -> str:
    """`embodiment` itself when it is known, otherwise the known base nearest to it: Euclidean
    distance between parameter vectors, each parameter divided by its spread over the known bases
    (so that a scan's ray count does not outweigh a lag)."""
    e = load_embodiment(embodiment)
    names = known_embodiments()
    if e.name in names and not e.held_out:
        return e.name
    known = np.stack([_descriptor(load_embodiment(n)) for n in names])
    spread = known.std(axis=0)
    spread[spread == 0] = 1.0
    distance = np.linalg.norm((known - _descriptor(e)) / spread, axis=1)
    return names[int(np.argmin(distance))]


def embodiment_embedding(embodiment: str | Embodiment) -> np.ndarray:
    """(len(known_embodiments()),) float32 one-hot of `nearest_known(embodiment)`: what a
    cross-embodiment policy is told about the base it drives."""
    names = known_embodiments()
    onehot = np.zeros(len(names), dtype=np.float32)
    onehot[names.index(nearest_known(embodiment))] = 1.0
    return onehot
