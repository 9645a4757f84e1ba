"""The quadrotor simulators: parameter sampling, physics sanity, and torch vs MuJoCo agreement."""

import math
import time

import numpy as np
import pytest
import torch

from robomosaic.sim.quadrotor import dynamics as qd
from robomosaic.sim.quadrotor.mujoco_model import MujocoQuadrotor, quadrotor_mjcf
from robomosaic.sim.quadrotor.params import (
    PRESETS,
    QuadrotorParams,
    RandomizationRanges,
    preset,
    sample_params,
)

G = 9.81


def _vehicles(dtype=torch.float32, sampled=3, seed=0, disturbance=True) -> list[QuadrotorParams]:
    """Both presets and a few sampled vehicles, one QuadrotorParams each."""
    sampled_params = sample_params(sampled, torch.Generator().manual_seed(seed), dtype=dtype)
    if not disturbance:
        sampled_params = sampled_params.replace(disturbance_force=[0.0, 0.0, 0.0])
    return [preset("crazyflie", dtype=dtype), preset("x500", dtype=dtype)] + [
        sampled_params.select(i) for i in range(sampled)
    ]


def _rollout_both(params: QuadrotorParams, state: torch.Tensor, actions: torch.Tensor, dt=qd.DEFAULT_DT):
    """Run the same open-loop actions (T, 4) in both simulators; returns the two (T, 17) trajectories."""
    sim = MujocoQuadrotor(params, dt=dt)
    sim.reset(state[0])
    torch_states, mujoco_states = [], []
    for action in actions:
        state = qd.step(state, action[None], params, dt=dt)
        torch_states.append(state[0].double().numpy())
        mujoco_states.append(sim.step(action.numpy()))
    return np.array(torch_states), np.array(mujoco_states)


def _rotation_angle_deg(q1: np.ndarray, q2: np.ndarray) -> float:
    r1 = qd.quaternion_to_rotation_matrix(torch.as_tensor(q1, dtype=torch.float64)).numpy()
    r2 = qd.quaternion_to_rotation_matrix(torch.as_tensor(q2, dtype=torch.float64)).numpy()
    cos = np.clip((np.trace(r1.T @ r2) - 1) / 2, -1, 1)
    # arccos is ill-conditioned near 0; the chordal distance is exact to second order there.
    return float(np.degrees(max(np.arccos(cos), np.linalg.norm(r1 - r2) / np.sqrt(2))))


# ---- parameters -----------------------------------------------------------------------------
def test_sampler_respects_the_paper_ranges():
    ranges = RandomizationRanges()
    p = sample_params(2000, torch.Generator().manual_seed(0))
    checks = {
        "thrust_to_weight": (p.thrust_to_weight, ranges.thrust_to_weight),
        "mass": (p.mass, ranges.mass),
        "torque_to_inertia": (p.torque_to_inertia, ranges.torque_to_inertia),
        "motor_time_constant_rising": (p.motor_time_constant_rising, ranges.motor_time_constant_rising),
        "motor_time_constant_falling": (p.motor_time_constant_falling, ranges.motor_time_constant_falling),
        "rotor_torque_constant": (p.rotor_torque_constant, ranges.rotor_torque_constant),
    }
    for name, (values, (low, high)) in checks.items():
        span = high - low
        assert values.min() >= low * (1 - 1e-5) and values.max() <= high * (1 + 1e-5), name
        # the whole range is used, not a corner of it
        assert values.min() < low + 0.02 * span and values.max() > high - 0.02 * span, name
    # uniform in size: the cube root of the mass is uniform, so its mean is the middle of its range
    size_low, size_high = ranges.mass[0] ** (1 / 3), ranges.mass[1] ** (1 / 3)
    assert abs(p.mass.pow(1 / 3).mean().item() - (size_low + size_high) / 2) < 0.02 * (size_high - size_low)
    assert p.mass.median() < 2.0  # uniform in mass would put the median near 2.5 kg
    # arms grow with size, hover is reachable, inertia is physical (MuJoCo's triangle inequality)
    assert torch.corrcoef(torch.stack([p.arm_length, p.mass.pow(1 / 3)]))[0, 1] > 0.9
    hover = p.hover_motor_state
    assert ((hover > p.motor_range[:, 0]) & (hover < p.motor_range[:, 1])).all()
    j = p.inertia
    assert (j[:, 0] + j[:, 1] >= j[:, 2]).all()
    # disturbance: 3 sigma is max 30% of the surplus thrust per axis, so it is rarely beyond that
    surplus = (p.thrust_to_weight - 1) * p.weight
    beyond = (p.disturbance_force.abs() > ranges.disturbance_force_max * surplus[:, None]).float().mean()
    assert beyond < 0.01 and p.disturbance_force.abs().max() > 0
    # reproducible from the generator
    again = sample_params(2000, torch.Generator().manual_seed(0))
    assert torch.equal(again.inertia, p.inertia) and torch.equal(again.disturbance_force, p.disturbance_force)


def test_presets_have_the_documented_mass_and_thrust_to_weight():
    cf, x500 = preset("crazyflie"), preset("x500")
    assert cf.mass.item() == pytest.approx(0.0306) and x500.mass.item() == pytest.approx(2.0)
    assert cf.thrust_to_weight.item() == pytest.approx(1.4675, abs=1e-3)
    assert x500.thrust_to_weight.item() == pytest.approx(3.2469, abs=1e-3)
    assert 40 < cf.torque_to_inertia.item() < 1200 and 40 < x500.torque_to_inertia.item() < 1200
    for p in (cf, x500):  # hover thrust really is the weight
        assert (4 * p.rotor_thrust(p.hover_motor_state)).item() == pytest.approx(p.weight.item(), rel=1e-5)
    with pytest.raises(KeyError, match="unknown quadrotor preset 'f450'"):
        preset("f450")


def test_params_json_round_trip_and_bad_input(tmp_path):
    p = QuadrotorParams.cat([preset("crazyflie", dtype=torch.float64), sample_params(3, dtype=torch.float64)])
    path = tmp_path / "vehicles.json"
    p.save_json(path)
    loaded = QuadrotorParams.load_json(path, dtype=torch.float64)
    for name in PRESETS["crazyflie"]:
        assert torch.equal(getattr(loaded, name), getattr(p, name)), name

    broken = dict(PRESETS["x500"])
    del broken["inertia"]
    with pytest.raises(KeyError, match=r"vehicle 1 has missing keys \['inertia'\]"):
        QuadrotorParams.from_dicts([PRESETS["x500"], broken])
    with pytest.raises(ValueError, match="mass must be > 0"):
        QuadrotorParams.from_dicts([{**PRESETS["x500"], "mass": -1.0}])
    with pytest.raises(ValueError, match="motor_time_constant_falling has non-finite"):
        QuadrotorParams.from_dicts([{**PRESETS["x500"], "motor_time_constant_falling": float("nan")}])
    with pytest.raises(ValueError, match=r"rotor_positions has shape \(1, 3, 3\)"):
        QuadrotorParams.from_dicts([{**PRESETS["x500"], "rotor_positions": [[0.1, 0, 0]] * 3}])


# ---- physics in both simulators ---------------------------------------------------------------
def test_hover_command_holds_position_for_two_seconds_in_both_simulators():
    vehicles = _vehicles(disturbance=False)
    for p in vehicles:
        state = qd.hover_state(p, position=torch.tensor([[0.3, -0.2, 1.0]], dtype=p.dtype))
        actions = qd.hover_action(p).expand(200, 4)
        torch_traj, mujoco_traj = _rollout_both(p, state, actions)
        for traj in (torch_traj, mujoco_traj):
            assert np.abs(traj[:, :3] - [0.3, -0.2, 1.0]).max() < 1e-4
            assert np.abs(traj[:, 7:13]).max() < 1e-4
    # the batched simulator too, all at once
    batch = QuadrotorParams.cat(vehicles)
    state = qd.hover_state(batch)
    for _ in range(200):
        state = qd.step(state, qd.hover_action(batch), batch)
    assert state[:, :3].abs().max() < 1e-4


def test_free_fall_matches_half_g_t_squared_in_both_simulators():
    for p in _vehicles(dtype=torch.float64, disturbance=False):
        p = p.replace(thrust_curve=torch.tensor([0.0, 0.0, 1.0]) * p.thrust_curve.sum())  # zero at action -1
        state = qd.hover_state(p)
        state[:, qd.MOTORS] = 0.0
        actions = -torch.ones(100, 4, dtype=torch.float64)
        for traj in _rollout_both(p, state, actions):
            t = np.arange(1, 101) * 0.01
            np.testing.assert_allclose(traj[:, 2], -G * t**2 / 2, atol=1e-9)
            np.testing.assert_allclose(traj[:, 9], -G * t, atol=1e-9)
            assert np.abs(traj[:, [0, 1, 7, 8]]).max() < 1e-12


@pytest.mark.parametrize("direction", ["rising", "falling"])
def test_motor_lag_reaches_63_percent_after_its_time_constant(direction):
    for p in _vehicles(dtype=torch.float64, disturbance=False):
        tau = getattr(p, f"motor_time_constant_{direction}").item()
        start, target = (0.0, 1.0) if direction == "rising" else (1.0, 0.0)
        state = qd.hover_state(p)
        state[:, qd.MOTORS] = start
        actions = torch.full((10, 4), 2 * target - 1, dtype=torch.float64)
        for traj in _rollout_both(p, state, actions, dt=tau / 10):
            progress = (traj[-1, qd.MOTORS] - start) / (target - start)
            np.testing.assert_allclose(progress, 1 - math.exp(-1), atol=1e-5)


def _differential(p: QuadrotorParams, pattern: list[float], delta=0.05) -> torch.Tensor:
    return qd.hover_action(p) + delta * torch.tensor([pattern], dtype=p.dtype)


def test_yaw_roll_and_pitch_commands_turn_the_right_way_in_both_simulators():
    """FLU body frame, rotors [FR, BR, BL, FL]. BR and FL spin clockwise seen from above, so their drag
    turns the body counter-clockwise: speeding them up yaws left (+z). Speeding up the left rotors
    (BL, FL) rolls right-side down (+x rate) and pushes the vehicle right (-y); speeding up the back
    rotors (BR, BL) pitches nose-down (+y rate) and pushes it forward (+x)."""
    cases = {
        "yaw": ([-1, 1, -1, 1], 2),  # body-rate axis that must grow positive
        "roll": ([-1, -1, 1, 1], 0),
        "pitch": ([-1, 1, 1, -1], 1),
    }
    for p in _vehicles(disturbance=False):
        for name, (pattern, axis) in cases.items():
            actions = _differential(p, pattern).expand(30, 4)
            for traj in _rollout_both(p, qd.hover_state(p), actions):
                rates = traj[-1, qd.ANGULAR_VELOCITY]
                others = np.delete(rates, axis)
                assert rates[axis] > 0.1 and np.abs(others).max() < 1e-3 * rates[axis], (name, rates)
                if name == "roll":
                    assert traj[-1, 8] < 0  # drifting right
                if name == "pitch":
                    assert traj[-1, 7] > 0  # drifting forward


def test_torch_and_mujoco_agree_on_one_second_of_random_smooth_actions():
    generator = torch.Generator().manual_seed(1)
    t = torch.arange(100, dtype=torch.float64)[:, None] * 0.01
    for dtype in (torch.float64, torch.float32):
        for p in _vehicles(dtype=dtype, sampled=4, seed=7):
            frequency = 0.5 + 2.5 * torch.rand(1, 4, generator=generator, dtype=torch.float64)
            phase = 2 * math.pi * torch.rand(1, 4, generator=generator, dtype=torch.float64)
            actions = qd.hover_action(p).double() + 0.1 * torch.sin(2 * math.pi * frequency * t + phase)
            torch_traj, mujoco_traj = _rollout_both(p, qd.hover_state(p), actions.to(dtype))
            travelled = np.abs(torch_traj[:, :3]).max()
            position_error = np.abs(torch_traj[:, :3] - mujoco_traj[:, :3]).max()
            angle_error = max(
                _rotation_angle_deg(a[3:7], b[3:7]) for a, b in zip(torch_traj, mujoco_traj, strict=True)
            )
            assert travelled > 0.05  # the actions really move the vehicle
            assert position_error < 1e-3, (dtype, position_error)
            assert angle_error < 0.1, (dtype, angle_error)
            assert np.abs(torch_traj[:, qd.MOTORS] - mujoco_traj[:, qd.MOTORS]).max() < 1e-5


def test_mjcf_describes_the_vehicle():
    import mujoco

    p = preset("x500", dtype=torch.float64)
    model = mujoco.MjModel.from_xml_string(quadrotor_mjcf(p))
    body = model.body("quadrotor")
    assert body.mass[0] == pytest.approx(2.0)
    np.testing.assert_allclose(body.inertia, p.inertia[0].numpy())
    np.testing.assert_allclose(model.opt.gravity, [0, 0, -G])
    for i, name in enumerate(("FR", "BR", "BL", "FL")):
        np.testing.assert_allclose(model.site(f"rotor_{name}").pos, p.rotor_positions[0, i].numpy())
    assert model.ngeom > 0 and not (model.geom_contype | model.geom_conaffinity).any()
    with pytest.raises(ValueError, match="one vehicle, got 2"):
        quadrotor_mjcf(preset("x500", n=2))


# ---- batch helpers ------------------------------------------------------------------------------
def test_observations_initial_states_and_termination():
    p = sample_params(256, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(4)
    state = qd.sample_initial_state(p, generator)
    tilt = torch.rad2deg(2 * torch.acos(state[:, 3].clamp(max=1)))
    assert tilt.max() <= 90.01 and tilt.max() > 80
    assert state[:, qd.POSITION].abs().max() <= 0.5
    assert state[:, qd.LINEAR_VELOCITY].norm(dim=1).max() <= 1.0 + 1e-6
    assert not qd.terminated(state).any()

    target = torch.tensor([1.0, 0.0, 0.5])
    obs = qd.observe(state, torch.zeros(256, 4), target_position=target)
    assert obs.shape == (256, qd.OBS_DIM)
    torch.testing.assert_close(obs[:, :3], state[:, :3] - target)
    rotation = obs[:, 3:12].reshape(-1, 3, 3)
    torch.testing.assert_close(
        rotation @ rotation.transpose(1, 2), torch.eye(3).expand(256, 3, 3), atol=1e-5, rtol=0
    )
    privileged = qd.observe(qd.hover_state(p), qd.hover_action(p), params=p)
    assert privileged.shape == (256, qd.PRIVILEGED_OBS_DIM)
    torch.testing.assert_close(privileged[:, -4:], qd.hover_action(p))  # motors at hover, in action units
    torch.testing.assert_close(privileged[:, 3:12], torch.eye(3).flatten().expand(256, 9))

    bad = state.clone()
    bad[0, 5] = float("nan")  # diverged
    bad[1, 0] = 2.6  # left the 5 m box
    bad[2, 10] = 40.0  # tumbling
    assert qd.terminated(bad)[:4].tolist() == [True, True, True, False]

    action = qd.hover_action(p)
    action[7, 2] = float("inf")
    with pytest.raises(ValueError, match=r"action has non-finite values for vehicles \[7\]"):
        qd.step(state, action, p)
    with pytest.raises(ValueError, match=r"state has shape \(255, 17\)"):
        qd.step(state[1:], qd.hover_action(p), p)
    with pytest.raises(ValueError, match="action must be 4 finite floats"):
        MujocoQuadrotor(p.select(0)).step(np.array([0, 0, np.nan, 0]))


def test_4096_vehicles_step_together():
    p = sample_params(4096, torch.Generator().manual_seed(5))
    state = qd.sample_initial_state(p, torch.Generator().manual_seed(6))
    action = qd.hover_action(p)
    start = time.perf_counter()
    steps = 20
    for _ in range(steps):
        state = qd.step(state, action, p)
    elapsed = time.perf_counter() - start
    assert torch.isfinite(state).all()
    rate = steps * 4096 / elapsed
    print(f"\n4096 vehicles: {rate:.0f} vehicle-steps/s ({elapsed / steps * 1e3:.1f} ms per step)")


def test_quadrotor_batch_resets_masked_environments_and_truncates():
    p = sample_params(64, torch.Generator().manual_seed(8))
    env = qd.QuadrotorBatch(p, torch.Generator().manual_seed(9), max_steps=5)
    assert env.observe().shape == (64, qd.OBS_DIM) and env.observe(privileged=True).shape == (64, 26)
    for _ in range(5):
        obs, terminated, truncated = env.step(qd.hover_action(p))
    assert truncated.all() and not terminated.any() and obs.shape == (64, qd.OBS_DIM)
    torch.testing.assert_close(obs[:, -4:], qd.hover_action(p))  # the previous action is observed
    before = env.state.clone()
    mask = torch.arange(64) < 10
    env.reset(mask)
    assert (env.steps[:10] == 0).all() and (env.steps[10:] == 5).all()
    assert torch.equal(env.state[10:], before[10:]) and not torch.equal(env.state[:10], before[:10])

    # a target moves the observation: position error is relative to it
    env.target_position = env.state[:, :3].clone()
    assert env.observe()[:, :3].abs().max() == 0
    env.target_position[3] += 3.0
    assert env.terminated().nonzero().flatten().tolist() == [3]


def test_raptor_reward_follows_the_paper():
    p = preset("crazyflie", n=3)
    state = qd.hover_state(p)
    state[1, 0] = 0.5  # 0.5 m off target
    action = qd.hover_action(p)
    previous = action.clone()
    previous[2, 0] += 0.3  # action changed by 0.3
    reward = qd.raptor_reward(state, action, previous, torch.tensor([False, False, False]))
    torch.testing.assert_close(reward, torch.tensor([1.5, 1.0, 1.2]))
    yawed = state.clone()
    yawed[:, qd.ORIENTATION] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # 180 degrees about z
    yawed_reward = qd.raptor_reward(yawed, action, action, torch.tensor([False, False, False]))
    torch.testing.assert_close(yawed_reward[0], torch.tensor(1.5 - 0.1 * math.pi))
    crashed = qd.raptor_reward(state, action, action, torch.tensor([True, False, False]))
    assert crashed[0] == -100
