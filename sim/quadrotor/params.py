"""Quadrotor parameters: a batch of vehicles as torch tensors, the RAPTOR sampler, named presets.

Conventions (those of rl-tools' "learning to fly" (L2F) simulator, which RAPTOR trains in):
- body frame FLU (x forward, y left, z up); world frame ENU-like with gravity along -z;
- four rotors in the order [FR, BR, BL, FL] (front-right, back-right, back-left, front-left);
- rotor i pushes with ``f_i = c0 + c1 m_i + c2 m_i^2`` along its thrust direction, where ``m_i`` is the
  motor state in the vehicle's own motor range [motor_min, motor_max] ([0, 1] for the presets and
  the sampled vehicles; rpm-like ranges also work);
- rotor i's drag (yaw) torque is ``rotor_torque_constant * f_i * rotor_torque_direction_i``. The
  directions are [-z, +z, -z, +z]: FR and BL propellers spin counter-clockwise seen from above (their
  reaction torque turns the body clockwise), BR and FL spin clockwise, as on a Crazyflie 2.x.

A ``QuadrotorParams`` holds N vehicles (leading batch dimension everywhere), so one simulator step
advances thousands of different quadrotors at once. Vehicles are json-able dicts of floats/lists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

N_ROTORS = 4
ROTOR_NAMES = ("FR", "BR", "BL", "FL")

# Per-vehicle shape of every parameter (the batch dimension N comes first).
FIELD_SHAPES: dict[str, tuple[int, ...]] = {
    "mass": (),  # kg
    "inertia": (3,),  # diagonal of J in the body frame, kg m^2
    "rotor_positions": (N_ROTORS, 3),  # m, body frame, relative to the centre of mass
    "rotor_thrust_directions": (N_ROTORS, 3),  # unit vectors, body frame
    "rotor_torque_directions": (N_ROTORS, 3),  # unit vectors, body frame
    "rotor_torque_constant": (),  # m: yaw torque per newton of thrust
    "thrust_curve": (3,),  # c0 [N], c1 [N/unit], c2 [N/unit^2]
    "motor_range": (2,),  # motor state at action -1 and at action +1
    "motor_time_constant_rising": (),  # s
    "motor_time_constant_falling": (),  # s
    "disturbance_force": (3,),  # N, world frame, constant over an episode
    "gravity": (3,),  # m/s^2, world frame
}
_POSITIVE_FIELDS = (
    "mass",
    "inertia",
    "rotor_torque_constant",
    "motor_time_constant_rising",
    "motor_time_constant_falling",
)


@dataclass(frozen=True)
class QuadrotorParams:
    """N quadrotors; every field is a tensor shaped ``(N, *FIELD_SHAPES[name])``, one dtype and device."""

    mass: torch.Tensor
    inertia: torch.Tensor
    rotor_positions: torch.Tensor
    rotor_thrust_directions: torch.Tensor
    rotor_torque_directions: torch.Tensor
    rotor_torque_constant: torch.Tensor
    thrust_curve: torch.Tensor
    motor_range: torch.Tensor
    motor_time_constant_rising: torch.Tensor
    motor_time_constant_falling: torch.Tensor
    disturbance_force: torch.Tensor
    gravity: torch.Tensor

    def __post_init__(self) -> None:
        n = self.mass.shape[0] if self.mass.dim() == 1 else -1
        for name, shape in FIELD_SHAPES.items():
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"QuadrotorParams.{name} must be a torch.Tensor, got {type(value).__name__}")
            if tuple(value.shape) != (n, *shape):
                raise ValueError(
                    f"QuadrotorParams.{name} has shape {tuple(value.shape)}, expected (N, *{shape}) "
                    f"with N = len(mass) = {n}"
                )
            if value.dtype != self.mass.dtype or value.device != self.mass.device:
                raise ValueError(
                    f"QuadrotorParams.{name} is {value.dtype} on {value.device}; all fields must match mass"
                )
            if not torch.isfinite(value).all():
                raise ValueError(
                    f"QuadrotorParams.{name} has non-finite values in vehicles {_bad_rows(value)}"
                )
        for name in _POSITIVE_FIELDS:
            value = getattr(self, name)
            if (value <= 0).any():
                raise ValueError(
                    f"QuadrotorParams.{name} must be > 0; vehicles {_bad_rows(value <= 0)} are not"
                )
        if (self.motor_range[:, 1] <= self.motor_range[:, 0]).any():
            bad = _bad_rows(self.motor_range[:, 1] <= self.motor_range[:, 0])
            raise ValueError(f"QuadrotorParams.motor_range needs max > min; vehicles {bad} do not")

    # ---- batch handling -------------------------------------------------------------------
    def __len__(self) -> int:
        return self.mass.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.mass.dtype

    @property
    def device(self) -> torch.device:
        return self.mass.device

    def select(self, index: int | slice | torch.Tensor) -> QuadrotorParams:
        """The vehicles at ``index`` (an int keeps the batch dimension: a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return QuadrotorParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> QuadrotorParams:
        return QuadrotorParams(
            **{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)}
        )

    def replace(self, **values: Any) -> QuadrotorParams:
        """A copy with some fields replaced; plain numbers/lists broadcast over the batch."""
        new = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in values.items():
            if name not in FIELD_SHAPES:
                raise KeyError(f"QuadrotorParams has no field {name!r}; fields: {sorted(FIELD_SHAPES)}")
            value = torch.as_tensor(value, dtype=self.dtype, device=self.device)
            new[name] = value.expand(len(self), *FIELD_SHAPES[name]).clone()
        return QuadrotorParams(**new)

    @staticmethod
    def cat(batches: list[QuadrotorParams]) -> QuadrotorParams:
        if not batches:
            raise ValueError("QuadrotorParams.cat needs at least one batch")
        return QuadrotorParams(
            **{name: torch.cat([getattr(b, name) for b in batches]) for name in FIELD_SHAPES}
        )

    # ---- derived quantities ---------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """(N,) newtons."""
        return self.mass * self.gravity.norm(dim=-1)

    def rotor_thrust(self, motor_state: torch.Tensor) -> torch.Tensor:
        """Thrust per rotor (newtons) for motor states shaped (N, 4) (or (N,) for one value per vehicle)."""
        c = self.thrust_curve if motor_state.dim() == 1 else self.thrust_curve[:, None, :]
        return c[..., 0] + c[..., 1] * motor_state + c[..., 2] * motor_state**2

    @property
    def max_rotor_thrust(self) -> torch.Tensor:
        """(N,) thrust of one rotor at the top of the motor range."""
        return self.rotor_thrust(self.motor_range[:, 1])

    @property
    def thrust_to_weight(self) -> torch.Tensor:
        """(N,) all rotors at full thrust over weight (rotors assumed parallel, as in L2F's sampler)."""
        return N_ROTORS * self.max_rotor_thrust / self.weight

    @property
    def arm_length(self) -> torch.Tensor:
        """(N,) mean distance of the rotors from the z axis through the centre of mass."""
        return self.rotor_positions[..., :2].norm(dim=-1).mean(dim=-1)

    @property
    def torque_to_inertia(self) -> torch.Tensor:
        """(N,) arm length x one rotor's full thrust / J_xx, in rad/s^2 (L2F's definition for X frames)."""
        return self.arm_length * self.max_rotor_thrust / self.inertia[:, 0]

    @property
    def hover_motor_state(self) -> torch.Tensor:
        """(N,) motor state at which four rotors carry the weight: c2 m^2 + c1 m + c0 = m g / 4."""
        c0, c1, c2 = self.thrust_curve.unbind(-1)
        target = self.weight / N_ROTORS
        quadratic = c2.abs() > 1e-12
        safe_c2 = torch.where(quadratic, c2, torch.ones_like(c2))
        root = (-c1 + torch.sqrt((c1**2 - 4 * c2 * (c0 - target)).clamp(min=0))) / (2 * safe_c2)
        return torch.where(quadratic, root, (target - c0) / c1)

    # ---- json -----------------------------------------------------------------------------
    def to_dicts(self) -> list[dict[str, Any]]:
        """One json-able dict of floats / nested lists per vehicle."""
        columns = {name: getattr(self, name).detach().cpu().double().tolist() for name in FIELD_SHAPES}
        return [{name: columns[name][i] for name in FIELD_SHAPES} for i in range(len(self))]

    @classmethod
    def from_dicts(
        cls, vehicles: list[dict[str, Any]], dtype: torch.dtype = torch.float32, source: str = "vehicles"
    ) -> QuadrotorParams:
        """Inverse of ``to_dicts``; ``source`` names the file or preset in error messages."""
        if not vehicles:
            raise ValueError(f"{source}: no vehicles")
        columns: dict[str, list[Any]] = {name: [] for name in FIELD_SHAPES}
        for i, vehicle in enumerate(vehicles):
            missing = sorted(set(FIELD_SHAPES) - set(vehicle))
            unknown = sorted(set(vehicle) - set(FIELD_SHAPES))
            if missing or unknown:
                raise KeyError(f"{source}: vehicle {i} has missing keys {missing} and unknown keys {unknown}")
            for name in FIELD_SHAPES:
                columns[name].append(vehicle[name])
        tensors = {}
        for name, values in columns.items():
            try:
                tensors[name] = torch.tensor(values, dtype=dtype)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"{source}: key {name!r} is not a {FIELD_SHAPES[name]} array per vehicle"
                ) from error
        return cls(**tensors)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"vehicles": self.to_dicts()}, indent=1))

    @classmethod
    def load_json(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> QuadrotorParams:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "vehicles" not in data:
            raise KeyError(f"{path}: expected a json object with a 'vehicles' list")
        return cls.from_dicts(data["vehicles"], dtype=dtype, source=str(path))


def _bad_rows(mask: torch.Tensor, limit: int = 10) -> list[int]:
    rows = (
        mask.reshape(mask.shape[0], -1)
        if mask.dtype == torch.bool
        else ~torch.isfinite(mask.reshape(mask.shape[0], -1))
    )
    return torch.nonzero(rows.any(dim=1)).flatten()[:limit].tolist()


# ---- presets --------------------------------------------------------------------------------
_X_DIRECTIONS = [[0.0, 0.0, 1.0]] * N_ROTORS
_YAW_DIRECTIONS = [[0.0, 0.0, -1.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]]


def _x_frame(half_side: float) -> list[list[float]]:
    """Rotor positions of an X frame in the order [FR, BR, BL, FL]."""
    a = half_side
    return [[a, -a, 0.0], [-a, -a, 0.0], [-a, a, 0.0], [a, a, 0.0]]


PRESETS: dict[str, dict[str, Any]] = {
    # Crazyflie 2.1 with SD-card and flow decks, 30.6 g: rl-tools/raptor choreo/parameters/crazyflie.json
    # (the registry file RAPTOR's foundation policy was evaluated with). T/W = 1.47, torque/inertia = 463.
    "crazyflie": {
        "mass": 0.0306,
        "inertia": [9.416556729130406e-06, 9.644051701582312e-06, 1.745951732253285e-05],
        "rotor_positions": _x_frame(0.028),
        "rotor_thrust_directions": _X_DIRECTIONS,
        "rotor_torque_directions": _YAW_DIRECTIONS,
        "rotor_torque_constant": 0.004665,
        "thrust_curve": [0.003525, 0.014373, 0.092230],
        "motor_range": [0.0, 1.0],
        "motor_time_constant_rising": 0.055455,
        "motor_time_constant_falling": 0.249394,
        "disturbance_force": [0.0, 0.0, 0.0],
        "gravity": [0.0, 0.0, -9.81],
    },
    # Holybro X500 (PX4 reference frame), 2.0 kg: rl-tools include/rl_tools/rl/environments/l2f/parameters/
    # dynamics/x500.h ("remap", i.e. permuted to the Crazyflie motor order; raptor's x500.json has the
    # same values but J_xx mistyped as 0.1705). T/W = 3.25, torque/inertia = 183.
    "x500": {
        "mass": 2.0,
        "inertia": [2.1705e-2, 2.1304e-2, 0.039396244],
        "rotor_positions": _x_frame(0.176776695296636),
        "rotor_thrust_directions": _X_DIRECTIONS,
        "rotor_torque_directions": _YAW_DIRECTIONS,
        "rotor_torque_constant": 1.0847e-1,
        "thrust_curve": [0.0, 0.0, 15.926119900619797],
        "motor_range": [0.0, 1.0],
        "motor_time_constant_rising": 0.054,
        "motor_time_constant_falling": 0.054,
        "disturbance_force": [0.0, 0.0, 0.0],
        "gravity": [0.0, 0.0, -9.81],
    },
}


def preset(name: str, n: int = 1, dtype: torch.dtype = torch.float32) -> QuadrotorParams:
    """``n`` copies of a named vehicle from ``PRESETS``."""
    if name not in PRESETS:
        raise KeyError(f"unknown quadrotor preset {name!r}; presets: {sorted(PRESETS)}")
    return QuadrotorParams.from_dicts([PRESETS[name]] * n, dtype=dtype, source=f"preset {name!r}")


# ---- domain randomization ---------------------------------------------------------------------
@dataclass(frozen=True)
class RandomizationRanges:
    """RAPTOR's ranges (rl-tools/raptor parameters/*.json "domain_randomization"), uniform unless noted."""

    thrust_to_weight: tuple[float, float] = (1.5, 5.0)
    mass: tuple[float, float] = (0.02, 5.0)  # kg, uniform in size = cube root of mass
    torque_to_inertia: tuple[float, float] = (40.0, 1200.0)  # rad/s^2
    size_deviation: float = 0.1  # std of the arm-length factor around mass^(1/3) scaling
    motor_time_constant_rising: tuple[float, float] = (0.03, 0.10)  # s
    motor_time_constant_falling: tuple[float, float] = (0.03, 0.30)  # s
    rotor_torque_constant: tuple[float, float] = (0.005, 0.05)  # m
    disturbance_force_max: float = 0.3  # fraction of the surplus thrust (T/W - 1) x weight, at 3 sigma


def sample_params(
    n: int,
    generator: torch.Generator | None = None,
    ranges: RandomizationRanges = RandomizationRanges(),  # frozen, so one shared default is safe
    dtype: torch.dtype = torch.float32,
    base: str = "crazyflie",
) -> QuadrotorParams:
    """``n`` random quadrotors, following L2F's sample_initial_parameters strategy.

    Starting from the ``base`` preset: draw T/W and a mass (uniform in size); scale the thrust curve
    so the full thrust is T/W x weight; scale the arms with size (times a reciprocal-normal deviation);
    draw torque-to-inertia and set J so that arm x full rotor thrust / J_xx matches it (J_yy, J_zz keep
    the base's proportions); draw yaw-torque constant and motor time constants; draw a constant
    disturbance force with ``sample_disturbance_force``.
    """
    if n < 1:
        raise ValueError(f"sample_params: n must be >= 1, got {n}")
    nominal = preset(base, dtype=torch.float64)

    def uniform(bounds: tuple[float, float]) -> torch.Tensor:
        low, high = bounds
        if not low <= high:
            raise ValueError(f"sample_params: range {bounds} has min > max")
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

    g = nominal.gravity.expand(n, 3)
    thrust_to_weight = uniform(ranges.thrust_to_weight)
    size = uniform((ranges.mass[0] ** (1 / 3), ranges.mass[1] ** (1 / 3)))
    mass = (size**3).clamp(*ranges.mass)
    weight = mass * g.norm(dim=-1)

    max_rotor_thrust = thrust_to_weight * weight / N_ROTORS
    thrust_curve = nominal.thrust_curve / nominal.max_rotor_thrust[:, None] * max_rotor_thrust[:, None]

    deviation = ranges.size_deviation * torch.randn(n, generator=generator, dtype=torch.float64)
    size_factor = torch.where(deviation < 0, 1 / (1 - deviation), 1 + deviation)
    arm_scale = (mass / nominal.mass) ** (1 / 3) * size_factor
    rotor_positions = nominal.rotor_positions * arm_scale[:, None, None]

    torque_to_inertia = uniform(ranges.torque_to_inertia)
    arm_length = rotor_positions[..., :2].norm(dim=-1).mean(dim=-1)
    inertia_xx = arm_length * max_rotor_thrust / torque_to_inertia
    inertia = nominal.inertia / nominal.inertia[:, :1] * inertia_xx[:, None]

    params = QuadrotorParams(
        mass=mass,
        inertia=inertia,
        rotor_positions=rotor_positions,
        rotor_thrust_directions=nominal.rotor_thrust_directions.expand(n, -1, -1).clone(),
        rotor_torque_directions=nominal.rotor_torque_directions.expand(n, -1, -1).clone(),
        rotor_torque_constant=uniform(ranges.rotor_torque_constant),
        thrust_curve=thrust_curve,
        motor_range=nominal.motor_range.expand(n, 2).clone(),
        motor_time_constant_rising=uniform(ranges.motor_time_constant_rising),
        motor_time_constant_falling=uniform(ranges.motor_time_constant_falling),
        disturbance_force=torch.zeros(n, 3, dtype=torch.float64),
        gravity=g.clone(),
    )
    disturbance = sample_disturbance_force(params, generator, ranges.disturbance_force_max)
    return params.replace(disturbance_force=disturbance).to(dtype=dtype)


def sample_disturbance_force(
    params: QuadrotorParams, generator: torch.Generator | None = None, max_fraction: float = 0.3
) -> torch.Tensor:
    """(N, 3) constant world-frame forces, one per vehicle, for example redrawn every episode: per
    axis N(0, sigma^2) with sigma uniform in [0, max_fraction x surplus thrust / 3], the surplus thrust
    being (T/W - 1) x weight, so that 3 sigma stays within ``max_fraction`` of what the vehicle can spare
    (L2F's DISTURBANCE_FORCE randomization, there a random_force std in the same spirit)."""
    n = len(params)
    surplus = (params.thrust_to_weight - 1).clamp(min=0) * params.weight
    fraction = max_fraction * torch.rand(n, generator=generator, dtype=torch.float64)
    normal = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    sigma = fraction.to(surplus) * surplus / 3
    return sigma[:, None] * normal.to(surplus)
