"""The same quadrotor as a MuJoCo model, a second and independent simulator to evaluate policies in.

MuJoCo does the rigid-body part its own way (free joint, its RK4 integrator, moment arms from the
site positions); only the motor model and the thrust curve are shared with the torch simulator.

Rotor forces are site-transmission actuators: MuJoCo's ``gear`` on a site is a 6-D wrench in the site
frame, so ``gear = (thrust direction, yaw-torque constant x torque direction)`` with ``ctrl`` = rotor
thrust in newtons applies the rotor's force at the rotor's position (MuJoCo adds the r x f moment) and
its drag torque. This is preferred over writing ``xfrc_applied`` by hand because the moment arms then
come from the model rather than from a second copy of the torch code. MuJoCo's own actuator dynamics
are first-order with a single time constant, so the asymmetric motor lag is integrated here, exactly
(the lag is linear between setpoint changes), over ``substeps`` MuJoCo steps per control step; each
substep applies the thrust of the motor state at its midpoint. The constant disturbance force goes
into ``xfrc_applied`` (world frame, at the centre of mass). There is no ground and no contact.
"""

from __future__ import annotations

import mujoco
import numpy as np
import torch

from robomosaic.sim.quadrotor.dynamics import DEFAULT_DT, STATE_DIM
from robomosaic.sim.quadrotor.params import N_ROTORS, ROTOR_NAMES, QuadrotorParams

_NO_CONTACT = 'contype="0" conaffinity="0"'  # visual only: the model has no ground and no contacts


def _fmt(values: np.ndarray | list[float] | float) -> str:
    return " ".join(f"{v:.17g}" for v in np.atleast_1d(np.asarray(values, dtype=np.float64)))


def quadrotor_mjcf(params: QuadrotorParams, dt: float = DEFAULT_DT, substeps: int = 10) -> str:
    """MJCF for one vehicle (``params`` must hold exactly one): a free body named "quadrotor" with its
    mass and diagonal inertia at the body origin, one site and one thrust actuator per rotor."""
    if len(params) != 1:
        raise ValueError(f"quadrotor_mjcf needs params for one vehicle, got {len(params)}")
    if substeps < 1:
        raise ValueError(f"quadrotor_mjcf: substeps must be >= 1, got {substeps}")
    vehicle = params.to_dicts()[0]
    arm = float(np.linalg.norm(np.asarray(vehicle["rotor_positions"])[:, :2], axis=1).mean())
    sites, geoms, actuators = [], [], []
    for i, name in enumerate(ROTOR_NAMES):
        position = vehicle["rotor_positions"][i]
        gear = [*vehicle["rotor_thrust_directions"][i]] + [
            vehicle["rotor_torque_constant"] * d for d in vehicle["rotor_torque_directions"][i]
        ]
        sites.append(f'<site name="rotor_{name}" pos="{_fmt(position)}" size="{arm * 0.05:.6g}"/>')
        geoms.append(
            f'<geom name="prop_{name}" type="cylinder" pos="{_fmt(position)}"'
            f' size="{_fmt([arm * 0.4, arm * 0.02])}" {_NO_CONTACT} rgba="0.2 0.2 0.2 0.5"/>'
        )
        actuators.append(f'<general name="thrust_{name}" site="rotor_{name}" gear="{_fmt(gear)}"/>')
    nl = "\n      "
    return f"""<mujoco model="quadrotor">
  <option timestep="{dt / substeps:.17g}" integrator="RK4" gravity="{_fmt(vehicle["gravity"])}"/>
  <worldbody>
    <light pos="0 0 5" dir="0 0 -1"/>
    <body name="quadrotor">
      <freejoint name="root"/>
      <inertial pos="0 0 0" mass="{vehicle["mass"]:.17g}" diaginertia="{_fmt(vehicle["inertia"])}"/>
      <geom name="frame" type="box" size="{_fmt([arm * 0.6, arm * 0.6, arm * 0.1])}" {_NO_CONTACT}/>
      {nl.join(geoms)}
      {nl.join(sites)}
    </body>
  </worldbody>
  <actuator>
    {(nl[:-2]).join(actuators)}
  </actuator>
</mujoco>
"""


class MujocoQuadrotor:
    """One vehicle in MuJoCo with the torch simulator's interface: ``reset(state)`` and
    ``step(action) -> state``, states laid out as in dynamics.py (17 floats), actions in [-1, 1]."""

    def __init__(self, params: QuadrotorParams, dt: float = DEFAULT_DT, substeps: int = 10):
        self.model = mujoco.MjModel.from_xml_string(quadrotor_mjcf(params, dt, substeps))
        self.data = mujoco.MjData(self.model)
        self.dt = dt
        self.substeps = substeps
        p = params.to(dtype=torch.float64)
        self.thrust_curve = p.thrust_curve[0].numpy()
        self.motor_range = p.motor_range[0].numpy()
        self.time_constants = (p.motor_time_constant_rising.item(), p.motor_time_constant_falling.item())
        self.body = self.model.body("quadrotor").id
        self.disturbance_force = p.disturbance_force[0].numpy()
        self.motors = np.zeros(N_ROTORS)
        self.reset(np.r_[np.zeros(3), 1.0, np.zeros(STATE_DIM - 4)])

    @property
    def state(self) -> np.ndarray:
        return np.concatenate([self.data.qpos, self.data.qvel, self.motors])

    def reset(self, state: np.ndarray | torch.Tensor) -> np.ndarray:
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        if state.shape != (STATE_DIM,) or not np.isfinite(state).all():
            raise ValueError(f"MujocoQuadrotor.reset: state must be {STATE_DIM} finite floats, got {state}")
        mujoco.mj_resetData(self.model, self.data)
        self.data.xfrc_applied[self.body, :3] = self.disturbance_force
        self.data.qpos[:] = state[:7]
        self.data.qpos[3:7] /= np.linalg.norm(state[3:7])
        self.data.qvel[:] = state[7:13]
        self.motors = state[13:].copy()
        mujoco.mj_forward(self.model, self.data)
        return self.state

    def step(self, action: np.ndarray | torch.Tensor) -> np.ndarray:
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (N_ROTORS,) or not np.isfinite(action).all():
            raise ValueError(f"MujocoQuadrotor.step: action must be {N_ROTORS} finite floats, got {action}")
        low, high = self.motor_range
        setpoint = low + (np.clip(action, -1, 1) + 1) / 2 * (high - low)
        tau = np.where(setpoint >= self.motors, *self.time_constants)
        h = self.model.opt.timestep
        c0, c1, c2 = self.thrust_curve
        for _ in range(self.substeps):
            midpoint = setpoint + (self.motors - setpoint) * np.exp(-h / (2 * tau))
            self.data.ctrl[:] = c0 + c1 * midpoint + c2 * midpoint**2
            mujoco.mj_step(self.model, self.data)
            self.motors = setpoint + (self.motors - setpoint) * np.exp(-h / tau)
        return self.state
