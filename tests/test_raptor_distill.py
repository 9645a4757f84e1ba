"""RAPTOR meta-imitation: BPTT behaviour cloning, DAgger labelling and aggregation, resumable stages.

The RL teachers are slow to train, so these tests distil from `CascadedPDTeacher`, a real
controller (geometric position/attitude PD with the true vehicle parameters) that satisfies the
`Teacher` protocol; it exists only to test the distillation machinery.
"""

import json

import torch

from robomosaic.policies.raptor import distill as rd
from robomosaic.policies.raptor.student import RaptorStudent
from robomosaic.sim.quadrotor import dynamics
from robomosaic.sim.quadrotor.params import QuadrotorParams, preset, sample_params


class CascadedPDTeacher:
    """Lee et al.'s geometric controller on SE(3), as PD loops with natural frequencies
    ``position_frequency`` and ``attitude_frequency`` (damping 0.9), using each vehicle's true mass,
    inertia, rotor geometry and thrust curve to turn the wrench into motor commands (test-only)."""

    def __init__(
        self, params: QuadrotorParams, position_frequency: float = 2.0, attitude_frequency: float = 6.0
    ):
        self.params = params
        self.wp, self.wa = position_frequency, attitude_frequency
        self._selected: tuple[torch.Tensor, QuadrotorParams] | None = None

    def _vehicles(self, index: torch.Tensor) -> QuadrotorParams:
        """``params.select(index)``, kept while the index does not change (every step of a rollout)."""
        if self._selected is None or not torch.equal(self._selected[0], index):
            self._selected = (index.clone(), self.params.select(index))
        return self._selected[1]

    def act(self, obs: torch.Tensor, teacher_index: torch.Tensor) -> torch.Tensor:
        p = self._vehicles(teacher_index)
        obs = obs.to(p.dtype)
        e_p, rot, e_v, omega = obs[:, 0:3], obs[:, 3:12].reshape(-1, 3, 3), obs[:, 12:15], obs[:, 15:18]
        a_des = -(self.wp**2) * e_p - 1.8 * self.wp * e_v - p.gravity - p.disturbance_force / p.mass[:, None]
        thrust = p.mass * (a_des * rot[:, :, 2]).sum(-1)
        z_d = a_des / a_des.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        y_d = torch.linalg.cross(z_d, torch.tensor([1.0, 0.0, 0.0], dtype=p.dtype).expand_as(z_d), dim=-1)
        y_d = y_d / y_d.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        rot_d = torch.stack([torch.linalg.cross(y_d, z_d, dim=-1), y_d, z_d], dim=-1)
        m = rot_d.transpose(1, 2) @ rot - rot.transpose(1, 2) @ rot_d
        e_r = 0.5 * torch.stack([m[:, 2, 1], m[:, 0, 2], m[:, 1, 0]], dim=-1)
        j = p.inertia
        torque = j * (-(self.wa**2) * e_r - 1.8 * self.wa * omega) + torch.linalg.cross(
            omega, j * omega, dim=-1
        )
        allocation = dynamics.rotor_allocation(p)[:, :, 2:]  # per rotor: body fz, tx, ty, tz per newton
        rotor = torch.linalg.solve(allocation.transpose(1, 2), torch.cat([thrust[:, None], torque], dim=-1))
        low = p.rotor_thrust(p.motor_range[:, :1].expand(-1, 4))
        high = p.rotor_thrust(p.motor_range[:, 1:].expand(-1, 4))
        rotor = torch.minimum(torch.maximum(rotor, low), high)
        c0, c1, c2 = (p.thrust_curve[:, i : i + 1] for i in range(3))
        motor = (-c1 + torch.sqrt((c1**2 - 4 * c2 * (c0 - rotor)).clamp(min=0))) / (2 * c2)
        return dynamics.motor_state_to_action(motor, p).clamp(-1, 1).float()


def teacher_vehicles(sampled: int = 2) -> QuadrotorParams:
    """Both presets and a few sampled vehicles (seed 0) that the PD teacher flies well, no disturbance."""
    vehicles = [preset("crazyflie"), preset("x500")]
    if sampled:
        vehicles.append(sample_params(sampled, torch.Generator().manual_seed(0)))
    return QuadrotorParams.cat(vehicles).replace(disturbance_force=[0.0, 0.0, 0.0])


def test_pd_teacher_is_a_real_controller():
    params = teacher_vehicles()
    teacher = CascadedPDTeacher(params)
    flown, _ = rd.fly_episodes(teacher, 2, 400, 3, 0.0, initial_state={"max_angle": 1.0})
    assert flown.survived.all()
    assert flown.position_error()[:, -100:].max() < 0.2  # settled near the target after 3-4 s
    assert flown.position_error()[:, -100:].median() < 0.05


def test_mlp_student_size_and_interface():
    mlp = rd.MlpStudent()
    assert sum(p.numel() for p in mlp.parameters()) == 1924
    actions, hidden = mlp(torch.randn(3, 7, 22) * 10, None, clip=True)
    assert actions.shape == (3, 7, 4) and hidden is None and actions.abs().max() <= 1


def test_bptt_behaviour_cloning_lowers_the_imitation_loss():
    torch.manual_seed(0)
    teacher = CascadedPDTeacher(teacher_vehicles())
    flown, index = rd.fly_episodes(teacher, 2, 120, seed=1, trajectory_fraction=0.5)
    data = rd.ImitationData.from_rollout(flown, index)
    assert data.obs.shape == (8, 120, 22) and data.actions.shape == (8, 120, 4)
    student = RaptorStudent()
    with torch.no_grad():
        before = float(rd.imitation_loss(student, data.obs, data.actions, data.mask))
    # the loss reaches the learned initial hidden state: gradients flow back through all 120 steps
    rd.imitation_loss(student, data.obs, data.actions, data.mask).backward()
    assert student.initial_hidden.grad.abs().sum() > 0
    student.zero_grad()
    losses = [m["loss"] for m in rd.fit(student, data, 15, 3e-3, 4, torch.Generator().manual_seed(0))]
    with torch.no_grad():
        after = float(rd.imitation_loss(student, data.obs, data.actions, data.mask))
    assert after < 0.5 * before
    assert losses[-1] < losses[0]


def test_dagger_flies_the_student_and_labels_with_the_teacher():
    torch.manual_seed(0)
    teacher = CascadedPDTeacher(teacher_vehicles())
    student = RaptorStudent()  # untrained: it visits states the teacher never would
    gentle = {"max_angle": 0.5}
    by_teacher, index = rd.fly_episodes(teacher, 2, 150, 5, 0.0, initial_state=gentle)
    by_student, index_s = rd.fly_episodes(teacher, 2, 150, 5, 0.0, policy=student, initial_state=gentle)
    assert torch.equal(index, index_s)
    assert torch.equal(by_teacher.states[:, 0], by_student.states[:, 0])  # same starts
    assert by_student.obs.shape == (8, 150, 22) and by_student.labels.shape == (8, 150, 4)
    # labels are the teacher's actions on the states the student visited
    for t in (0, 37, 149):
        alive = by_student.mask[:, t]
        expected = teacher.act(by_student.privileged[:, t].float(), index)
        assert torch.allclose(by_student.labels[alive, t], expected[alive].to(by_student.labels.dtype))
    # ... while the executed actions were the student's (its previous action is in the observation)
    assert torch.allclose(by_student.obs[:, 1:, 18:22], by_student.actions[:, :-1].clamp(-1, 1))
    assert not torch.allclose(by_student.actions, by_student.labels, atol=1e-2)
    # the student's states are ones the teacher alone does not reach from the same starts
    assert by_student.position_error().max() > 2 * by_teacher.position_error().max()


def test_distill_stages_aggregate_and_resume(tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher = CascadedPDTeacher(teacher_vehicles(sampled=0))
    config = rd.DistillConfig(
        episodes_per_teacher=2,
        episode_steps=60,
        bc_epochs=2,
        dagger_iterations=2,
        dagger_episodes_per_teacher=1,
        dagger_epochs=1,
        batch_size=4,
        trim={"iterations": 2, "vehicles": 4, "episode_steps": 20, "settle_steps": 10},
    )
    policies = rd.distill(teacher, config, tmp_path, progress=False, log=lambda _: None)
    assert isinstance(policies["student"], RaptorStudent) and isinstance(policies["mlp"], rd.MlpStudent)
    bc = rd.ImitationData.load(tmp_path / "bc_data.safetensors")
    assert len(bc) == 4 and bc.obs.shape == (4, 60, 22)
    for kind in ("student", "mlp"):
        for stage in ("bc", "dagger_1", "dagger_2", "imitation", "trim", "final"):
            assert (tmp_path / kind / stage / "spec.json").is_file()
        dagger = rd.ImitationData.load(tmp_path / kind / "dagger_2_data.safetensors")
        assert len(dagger) == 2 and torch.equal(dagger.teacher_index, torch.arange(2))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "dagger_2" and "flown_survival" in r for r in records)
    trimmed = [r["iteration"] for r in records if r.get("stage") == "trim" and r.get("policy") == "mlp"]
    assert trimmed == [1, 2]
    # the trim changed the policy it started from, and final is the trimmed one
    imitation = rd.MlpStudent.load(tmp_path / "mlp" / "imitation").state_dict()
    final = rd.load_distilled(tmp_path, "mlp").state_dict()
    assert any(not torch.equal(imitation[k], final[k]) for k in final)
    # aggregated training set of the last stage: 4 BC + 2 x 2 DAgger episodes
    dagger_epochs = [
        r
        for r in records
        if r.get("stage") == "dagger_2" and r.get("policy") == "student" and "episodes" in r
    ]
    assert dagger_epochs[0]["episodes"] == 8

    # a second run resumes: nothing is flown or trained again, the final policy is the same
    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(rd, "fit", fail)
    monkeypatch.setattr(rd, "fly_episodes", fail)
    monkeypatch.setattr(rd, "trim", fail)
    again = rd.distill(teacher, config, tmp_path, progress=False, log=lambda _: None)
    first = rd.load_distilled(tmp_path, "student").state_dict()
    for name, value in again["student"].state_dict().items():
        assert torch.equal(value, first[name])
