"""The teachers' model-based prior: a discrete LQR controller per vehicle, linearised at hover.

Each RAPTOR teacher acts as ``hover + offset - K e + MLP(obs)`` (teachers.py says why): ``K`` is the
LQR gain of its own vehicle and ``e`` the error state read from the privileged observation
(position, attitude, velocity, body rates, motor states), ``offset`` the feedforward that holds
position against the vehicle's constant disturbance force.
"""

from __future__ import annotations

import torch

from robomosaic.policies.raptor.student import ACTION_DIM
from robomosaic.sim.quadrotor.dynamics import POSITION, hover_action, hover_state, observe, step
from robomosaic.sim.quadrotor.params import QuadrotorParams

ERROR_DIM = 16  # LQR error state: position 3, attitude 3, velocity 3, body rates 3, motors 4


def attitude_error(rotation: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) body-to-world rotations -> (..., 3) vee(R - R^T) / 2 = sin(angle) x axis: the
    rotation vector near upright, bounded and smooth for large tilts (no log-map singularity)."""
    r = rotation
    return 0.5 * torch.stack(
        [r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1
    )


def error_state(obs: torch.Tensor, hover: torch.Tensor) -> torch.Tensor:
    """Privileged observations (..., 26) and hover actions (..., 4) -> LQR error states (..., 16)."""
    attitude = attitude_error(obs[..., 3:12].unflatten(-1, (3, 3)))
    return torch.cat([obs[..., 0:3], attitude, obs[..., 12:18], obs[..., 22:26] - hover], dim=-1)


def _error_to_state(error: torch.Tensor, params: QuadrotorParams) -> torch.Tensor:
    state = hover_state(params)
    state[:, POSITION] = error[:, 0:3]
    q = torch.cat([torch.ones_like(error[:, :1]), error[:, 3:6] / 2], dim=-1)
    state[:, 3:7] = q / q.norm(dim=-1, keepdim=True)
    state[:, 7:13] = error[:, 6:12]
    low, high = params.motor_range[:, :1], params.motor_range[:, 1:]
    state[:, 13:17] = low + (hover_action(params) + error[:, 12:16] + 1) / 2 * (high - low)
    return state


def _state_to_error(state: torch.Tensor, params: QuadrotorParams) -> torch.Tensor:
    obs = observe(state, hover_action(params), params=params)
    return error_state(obs, hover_action(params))


def linearize(params: QuadrotorParams, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Discrete-time affine model ``e' = A e + B u + c`` of ``dynamics.step`` about hover, per vehicle,
    in float64 by central differences in the error coordinates: A (N, 16, 16), B (N, 16, 4) and the
    drift c (N, 16) that the constant disturbance force causes at hover. (Finite differences rather
    than autograd because the motor lag switches time constant exactly at hover; the central
    difference averages the rising and falling sides.)"""
    params = params.to(dtype=torch.float64)
    n, hover = len(params), hover_action(params)

    def next_error(error: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return _state_to_error(step(_error_to_state(error, params), hover + action, params), params)

    zero_e = torch.zeros(n, ERROR_DIM, dtype=torch.float64)
    zero_u = torch.zeros(n, ACTION_DIM, dtype=torch.float64)
    a = torch.zeros(n, ERROR_DIM, ERROR_DIM, dtype=torch.float64)
    b = torch.zeros(n, ERROR_DIM, ACTION_DIM, dtype=torch.float64)
    for i in range(ERROR_DIM):
        d = zero_e.clone()
        d[:, i] = eps
        a[:, :, i] = (next_error(d, zero_u) - next_error(-d, zero_u)) / (2 * eps)
    for i in range(ACTION_DIM):
        d = zero_u.clone()
        d[:, i] = eps
        b[:, :, i] = (next_error(zero_e, d) - next_error(zero_e, -d)) / (2 * eps)
    return a, b, next_error(zero_e, zero_u)


def lqr_prior(
    params: QuadrotorParams,
    weights: tuple[float, ...] = (1.0, 1.0, 0.1, 0.01, 1.0),
    max_iterations: int = 20000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per vehicle, discrete LQR gains K (N, 4, 16) from the Riccati recursion (batched over
    vehicles; scipy's solve_discrete_are would loop over them) and a feedforward offset (N, 4) so that
    ``u = hover + offset - K e`` holds the target position against the constant disturbance force:
    the offset is ``u_s + K e_s`` for the steady state (e_s with zero position error, u_s) of the affine
    model with least norm."""
    a, b, drift = linearize(params)
    qp, qa, qv, qw, r = weights
    q = torch.diag(torch.tensor([qp] * 3 + [qa] * 3 + [qv] * 3 + [qw] * 3 + [0.0] * 4, dtype=torch.float64))
    r = r * torch.eye(ACTION_DIM, dtype=torch.float64)
    at, bt = a.transpose(1, 2), b.transpose(1, 2)
    p = q.expand_as(a).clone()
    gain = torch.zeros_like(bt)
    for iteration in range(max_iterations):
        new_gain = torch.linalg.solve(r + bt @ p @ b, bt @ p @ a)
        p = q + at @ p @ (a - b @ new_gain)
        p = (p + p.transpose(1, 2)) / 2
        converged = (new_gain - gain).abs().max() < 1e-9
        gain = new_gain
        if converged and iteration > 0:
            break
    radius = torch.linalg.eigvals(a - b @ gain).abs().max(dim=1).values
    if not (radius < 1).all():
        bad = torch.nonzero(radius >= 1).flatten()[:10].tolist()
        raise ValueError(f"lqr_prior: closed loop unstable for vehicles {bad} (weights {weights})")
    # steady state: (A - I) e_s + B u_s = -c with e_s[position] = 0, least-norm solution
    eye = torch.eye(ERROR_DIM, dtype=torch.float64)
    system = torch.cat([(a - eye)[:, :, 3:], b], dim=2)
    solution = (torch.linalg.pinv(system) @ -drift[:, :, None])[:, :, 0]
    steady_error = torch.cat([torch.zeros_like(solution[:, :3]), solution[:, : ERROR_DIM - 3]], dim=1)
    offset = solution[:, ERROR_DIM - 3 :] + (gain @ steady_error[:, :, None])[:, :, 0]
    return gain.to(params.dtype), offset.to(params.dtype)
