"""Batched "learning to fly" quadrotor dynamics in torch: N vehicles, each with its own parameters.

State: a tensor (N, 17) laid out as
    [0:3]   position, world frame, m
    [3:7]   orientation quaternion (w, x, y, z), body -> world
    [7:10]  linear velocity, world frame, m/s
    [10:13] angular velocity, body frame (FLU), rad/s
    [13:17] motor states [FR, BR, BL, FL] in each vehicle's motor range (see params.py)
(the same layout as a MuJoCo free joint's qpos + qvel, followed by the motors).

Actions are (N, 4) in [-1, 1] (clipped), mapped linearly onto the motor range as motor setpoints. Each
motor follows its setpoint with a first-order lag whose time constant is the rising one when the
setpoint is above the motor state and the falling one otherwise. Rotor thrusts and drag torques give
a body wrench; the rigid body follows Newton-Euler with diagonal inertia, gravity and a constant
world-frame disturbance force. One ``step`` is one classical RK4 step (100 Hz by default), followed by
renormalising the quaternion, as L2F does.

Written by hand rather than with a physics library because the point is thousands of different
vehicles advanced by a handful of batched tensor operations (MuJoCo, the second opinion, is in
mujoco_model.py).
"""

from __future__ import annotations

import math

import torch

from robomosaic.sim.quadrotor.params import QuadrotorParams

STATE_DIM = 17
POSITION = slice(0, 3)
ORIENTATION = slice(3, 7)
LINEAR_VELOCITY = slice(7, 10)
ANGULAR_VELOCITY = slice(10, 13)
MOTORS = slice(13, 17)

OBS_DIM = 22  # position error 3, rotation matrix 9, velocity error 3, body rates 3, previous action 4
PRIVILEGED_OBS_DIM = OBS_DIM + 4  # + motor states scaled to [-1, 1]

DEFAULT_DT = 0.01


# ---- rotations --------------------------------------------------------------------------------
def quaternion_to_rotation_matrix(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternions (w, x, y, z), normalised here, -> (..., 3, 3) body-to-world rotations."""
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)),
        (2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)),
        (2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)),
    )
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


def quaternion_from_axis_angle(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """(..., 3) axes (normalised here) and (...) angles in radians -> (..., 4) quaternions (w, x, y, z)."""
    axis = axis / axis.norm(dim=-1, keepdim=True)
    half = angle[..., None] / 2
    return torch.cat([torch.cos(half), torch.sin(half) * axis], dim=-1)


def rotate(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate (..., 3) vectors by unit quaternions (..., 4): v + 2w (u x v) + 2 u x (u x v)."""
    w, u = q[..., :1], q[..., 1:]
    t = 2 * torch.linalg.cross(u, v, dim=-1)
    return v + w * t + torch.linalg.cross(u, t, dim=-1)


def _quaternion_derivative(q: torch.Tensor, omega_body: torch.Tensor) -> torch.Tensor:
    """dq/dt = q * (0, omega) / 2 for a body-frame angular velocity omega."""
    w, u = q[..., :1], q[..., 1:]
    dw = -(u * omega_body).sum(dim=-1, keepdim=True)
    du = w * omega_body + torch.linalg.cross(u, omega_body, dim=-1)
    return 0.5 * torch.cat([dw, du], dim=-1)


# ---- actuation --------------------------------------------------------------------------------
def action_to_motor_setpoint(action: torch.Tensor, params: QuadrotorParams) -> torch.Tensor:
    """(N, 4) actions in [-1, 1] (clipped) -> motor setpoints in each vehicle's motor range."""
    low, high = params.motor_range[:, :1], params.motor_range[:, 1:]
    return low + (action.clamp(-1, 1) + 1) / 2 * (high - low)


def motor_state_to_action(motors: torch.Tensor, params: QuadrotorParams) -> torch.Tensor:
    """Inverse of ``action_to_motor_setpoint``: motor states expressed in action units [-1, 1]."""
    low, high = params.motor_range[:, :1], params.motor_range[:, 1:]
    return 2 * (motors - low) / (high - low) - 1


def hover_action(params: QuadrotorParams) -> torch.Tensor:
    """(N, 4) action whose motor setpoint makes the four rotors carry the weight exactly."""
    hover = params.hover_motor_state[:, None].expand(-1, 4)
    return motor_state_to_action(hover, params)


def rotor_allocation(params: QuadrotorParams) -> torch.Tensor:
    """(N, 4, 6): body force (first 3) and torque (last 3) per newton of each rotor's thrust, i.e. its
    thrust direction and (rotor position x thrust direction + torque constant x torque direction)."""
    directions = params.rotor_thrust_directions
    moments = torch.linalg.cross(params.rotor_positions, directions, dim=-1)
    drag = params.rotor_torque_constant[:, None, None] * params.rotor_torque_directions
    return torch.cat([directions, moments + drag], dim=-1)


def body_wrench(
    motors: torch.Tensor, params: QuadrotorParams, allocation: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Total rotor force and torque in the body frame, both (N, 3), for motor states (N, 4)."""
    allocation = rotor_allocation(params) if allocation is None else allocation
    wrench = torch.bmm(params.rotor_thrust(motors)[:, None, :], allocation)[:, 0]
    return wrench[:, :3], wrench[:, 3:]


# ---- integration ------------------------------------------------------------------------------
def state_derivative(
    state: torch.Tensor,
    setpoint: torch.Tensor,
    params: QuadrotorParams,
    allocation: torch.Tensor | None = None,
) -> torch.Tensor:
    """d(state)/dt for motor setpoints held constant over the step (``allocation`` may be passed in
    precomputed from ``rotor_allocation``)."""
    q = state[:, ORIENTATION]
    velocity = state[:, LINEAR_VELOCITY]
    omega = state[:, ANGULAR_VELOCITY]
    motors = state[:, MOTORS]

    force_body, torque_body = body_wrench(motors, params, allocation)
    unit_q = q / q.norm(dim=-1, keepdim=True)
    external = rotate(unit_q, force_body) + params.disturbance_force
    acceleration = external / params.mass[:, None] + params.gravity
    inertia = params.inertia
    angular_acceleration = (torque_body - torch.linalg.cross(omega, inertia * omega, dim=-1)) / inertia
    time_constant = torch.where(
        setpoint >= motors,
        params.motor_time_constant_rising[:, None],
        params.motor_time_constant_falling[:, None],
    )
    motor_rate = (setpoint - motors) / time_constant
    return torch.cat(
        [velocity, _quaternion_derivative(q, omega), acceleration, angular_acceleration, motor_rate], dim=-1
    )


def step(
    state: torch.Tensor, action: torch.Tensor, params: QuadrotorParams, dt: float = DEFAULT_DT
) -> torch.Tensor:
    """Advance every vehicle by ``dt`` seconds with one RK4 step; returns the next (N, 17) state."""
    n = len(params)
    if state.shape != (n, STATE_DIM):
        raise ValueError(f"step: state has shape {tuple(state.shape)}, expected ({n}, {STATE_DIM})")
    if action.shape != (n, 4):
        raise ValueError(f"step: action has shape {tuple(action.shape)}, expected ({n}, 4)")
    finite = torch.isfinite(action).all(dim=1)
    if not finite.all():
        rows = torch.nonzero(~finite).flatten()[:10].tolist()
        raise ValueError(f"step: action has non-finite values for vehicles {rows}")
    setpoint = action_to_motor_setpoint(action.to(state.dtype), params)
    allocation = rotor_allocation(params)
    k1 = state_derivative(state, setpoint, params, allocation)
    k2 = state_derivative(state + dt / 2 * k1, setpoint, params, allocation)
    k3 = state_derivative(state + dt / 2 * k2, setpoint, params, allocation)
    k4 = state_derivative(state + dt * k3, setpoint, params, allocation)
    next_state = state + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    q = next_state[:, ORIENTATION]
    return torch.cat(
        [next_state[:, :3], q / q.norm(dim=-1, keepdim=True), next_state[:, LINEAR_VELOCITY.start :]], dim=-1
    )


# ---- states -----------------------------------------------------------------------------------
def hover_state(params: QuadrotorParams, position: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 17) upright at rest with the motors at their hover state (at the origin by default)."""
    n = len(params)
    state = torch.zeros(n, STATE_DIM, dtype=params.dtype, device=params.device)
    if position is not None:
        state[:, POSITION] = position
    state[:, 3] = 1.0
    state[:, MOTORS] = params.hover_motor_state[:, None]
    return state


def sample_initial_state(
    params: QuadrotorParams,
    generator: torch.Generator | None = None,
    max_position: float = 0.5,
    max_angle: float = math.pi / 2,
    max_velocity: float = 1.0,
    max_angular_velocity: float = 1.0,
) -> torch.Tensor:
    """Random starts as in RAPTOR's "init_90_deg": position uniform in a cube of half-size
    ``max_position``, tilt about a uniformly random axis by up to ``max_angle``, linear and angular
    velocity in random directions with magnitudes uniform up to their maxima, motors at hover."""
    n = len(params)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, dtype=params.dtype).to(params.device)

    def direction() -> torch.Tensor:
        v = torch.randn(n, 3, generator=generator, dtype=params.dtype).to(params.device)
        return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-9)

    state = hover_state(params, position=(2 * uniform(n, 3) - 1) * max_position)
    state[:, ORIENTATION] = quaternion_from_axis_angle(direction(), uniform(n) * max_angle)
    state[:, LINEAR_VELOCITY] = direction() * uniform(n, 1) * max_velocity
    state[:, ANGULAR_VELOCITY] = direction() * uniform(n, 1) * max_angular_velocity
    return state


def terminated(
    state: torch.Tensor,
    target_position: torch.Tensor | None = None,
    position_limit: float = 2.5,
    max_speed: float = 10.0,
    max_angular_speed: float = 35.0,
) -> torch.Tensor:
    """(N,) bool: non-finite state, outside the 5 m box (|error| > ``position_limit`` on any axis),
    or a crash-like state: faster than ``max_speed`` m/s or spinning faster than ``max_angular_speed``
    rad/s (L2F's angular-velocity threshold)."""
    error = state[:, POSITION] - (0 if target_position is None else target_position)
    return (
        ~torch.isfinite(state).all(dim=1)
        | (error.abs() > position_limit).any(dim=1)
        | (state[:, LINEAR_VELOCITY].norm(dim=1) > max_speed)
        | (state[:, ANGULAR_VELOCITY].norm(dim=1) > max_angular_speed)
    )


def observe(
    state: torch.Tensor,
    previous_action: torch.Tensor,
    params: QuadrotorParams | None = None,
    target_position: torch.Tensor | None = None,
    target_velocity: torch.Tensor | None = None,
) -> torch.Tensor:
    """RAPTOR's observation, (N, 22): position - target, body-to-world rotation matrix (row-major),
    velocity - target velocity (world), body rates, previous action. With ``params`` the teacher's
    privileged observation, (N, 26): the motor states in action units [-1, 1] appended."""
    position_error = state[:, POSITION] - (0 if target_position is None else target_position)
    velocity_error = state[:, LINEAR_VELOCITY] - (0 if target_velocity is None else target_velocity)
    rotation = quaternion_to_rotation_matrix(state[:, ORIENTATION]).flatten(1)
    parts = [
        position_error,
        rotation,
        velocity_error,
        state[:, ANGULAR_VELOCITY],
        previous_action.to(state.dtype),
    ]
    if params is not None:
        parts.append(motor_state_to_action(state[:, MOTORS], params))
    return torch.cat(parts, dim=-1)


def raptor_reward(
    state: torch.Tensor,
    action: torch.Tensor,
    previous_action: torch.Tensor,
    next_terminated: torch.Tensor,
    target_position: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N,) RAPTOR's per-step reward (rl-tools foundation_policy pre-training, "squared" reward with
    position 1, orientation 0.1, d_action 1, constant 1.5, termination penalty -100):
    ``1.5 - |p - p_target| - 0.1 * 2 acos(1 - |q_z|) - |a - a_prev|`` on the state before the step,
    or -100 when the step ended in a terminal state. L2F's orientation term looks only at the
    quaternion's z component, i.e. it penalises yaw; it is kept as is."""
    position_error = state[:, POSITION] - (0 if target_position is None else target_position)
    orientation_cost = 2 * torch.acos((1 - state[:, 6].abs()).clamp(-1, 1))
    action_rate = (action.clamp(-1, 1) - previous_action).norm(dim=1)
    reward = 1.5 - position_error.norm(dim=1) - 0.1 * orientation_cost - action_rate
    return torch.where(next_terminated, torch.full_like(reward, -100.0), reward)


class QuadrotorBatch:
    """N quadrotor environments stepping together, each with its own vehicle.

    ``reset(mask)`` redraws initial states (``sample_initial_state``) for the masked environments,
    ``step(action)`` returns ``(obs, terminated, truncated)`` with the student observation; the
    privileged one is ``observe(privileged=True)``. There is no automatic reset and no reward (the
    teacher owns it; ``raptor_reward`` is the paper's). ``target_position`` / ``target_velocity``
    (N, 3) are the reference the observations are relative to: set them every step to track a path.
    ``previous_action`` starts at the hover action, matching motors that start at hover.
    """

    def __init__(
        self,
        params: QuadrotorParams,
        generator: torch.Generator | None = None,
        dt: float = DEFAULT_DT,
        max_steps: int = 500,
        initial_state: dict[str, float] | None = None,
        termination: dict[str, float] | None = None,
    ):
        self.params = params
        self.generator = generator
        self.dt = dt
        self.max_steps = max_steps
        self.initial_state = dict(initial_state or {})
        self.termination = dict(termination or {})
        n, dtype, device = len(params), params.dtype, params.device
        self.state = hover_state(params)
        self.previous_action = hover_action(params)
        self.target_position = torch.zeros(n, 3, dtype=dtype, device=device)
        self.target_velocity = torch.zeros(n, 3, dtype=dtype, device=device)
        self.steps = torch.zeros(n, dtype=torch.long, device=device)
        self.reset()

    def __len__(self) -> int:
        return len(self.params)

    def reset(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Redraw the initial state of the environments where ``mask`` (N,) is true (all if None)."""
        fresh = sample_initial_state(self.params, self.generator, **self.initial_state)
        if mask is None:
            mask = torch.ones(len(self), dtype=torch.bool, device=self.state.device)
        self.state = torch.where(mask[:, None], fresh, self.state)
        self.previous_action = torch.where(mask[:, None], hover_action(self.params), self.previous_action)
        self.steps = torch.where(mask, torch.zeros_like(self.steps), self.steps)
        return self.observe()

    def observe(self, privileged: bool = False) -> torch.Tensor:
        return observe(
            self.state,
            self.previous_action,
            params=self.params if privileged else None,
            target_position=self.target_position,
            target_velocity=self.target_velocity,
        )

    def terminated(self) -> torch.Tensor:
        return terminated(self.state, self.target_position, **self.termination)

    def step(self, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.state = step(self.state, action, self.params, self.dt)
        self.previous_action = action.to(self.state.dtype).clamp(-1, 1)
        self.steps = self.steps + 1
        return self.observe(), self.terminated(), self.steps >= self.max_steps
