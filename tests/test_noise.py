"""Noise processes and exact conversions of the denoise contract (float64 throughout)."""

import math

import pytest
import torch

from robomosaic.policies import noise as N

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def ddpm():
    return N.DDPMProcess()


def _batch(seed=0, shape=(64, 8, 3)):
    g = _gen(seed)
    a = torch.randn(shape, generator=g, dtype=F64)
    n = torch.randn(shape, generator=g, dtype=F64)
    sigma = torch.exp(torch.empty(shape[0], dtype=F64).uniform_(-6, 5, generator=g))
    return a, n, sigma


def test_conversions_between_x0_eps_score_velocity_are_exact_round_trips():
    a, n, sigma = _batch()
    x = a + N.expand_sigma(sigma, a) * n
    eps = N.eps_from_x0(x, sigma, a)
    torch.testing.assert_close(eps, n)
    torch.testing.assert_close(N.x0_from_eps(x, sigma, eps), a)
    score = N.score_from_x0(x, sigma, a)
    torch.testing.assert_close(score, -n / N.expand_sigma(sigma, a))
    torch.testing.assert_close(N.x0_from_score(x, sigma, score), a)
    v = N.velocity_from_x0(x, sigma, a)
    torch.testing.assert_close(v, a - n)  # rectified-flow velocity a - z with z = n
    torch.testing.assert_close(N.x0_from_velocity(x, sigma, v), a)


def test_score_from_posterior_mean_is_the_analytic_score_of_a_gaussian():
    s2 = 0.7**2
    _, _, sigma = _batch(1)
    x = torch.randn(64, 8, 3, generator=_gen(2), dtype=F64) * 3
    var = s2 + N.expand_sigma(sigma, x) ** 2
    x0_hat = s2 / var * x  # Tweedie for a ~ N(0, s2)
    torch.testing.assert_close(N.score_from_x0(x, sigma, x0_hat), -x / var)


def test_coordinates_vp_and_flow_match_their_definitions_and_invert():
    a, n, sigma = _batch(3)
    x = a + N.expand_sigma(sigma, a) * n
    abar = N.expand_sigma(N.alpha_bar_from_sigma(sigma), a)
    x_vp = N.vp_from_ve(x, sigma)
    torch.testing.assert_close(x_vp, abar.sqrt() * a + (1 - abar).sqrt() * n)
    torch.testing.assert_close(N.ve_from_vp(x_vp, sigma), x)
    t = N.expand_sigma(N.t_from_sigma(sigma), a)
    x_t = N.flow_from_ve(x, sigma)
    torch.testing.assert_close(x_t, t * a + (1 - t) * n)
    torch.testing.assert_close(N.ve_from_flow(x_t, sigma), x)
    torch.testing.assert_close(N.sigma_from_alpha_bar(N.alpha_bar_from_sigma(sigma)), sigma)
    torch.testing.assert_close(N.sigma_from_t(N.t_from_sigma(sigma)), sigma)


def _oracle(example, cond_expected):
    """A network that returns the exact training target, checking it is called on the example."""

    def network(x_in, time, cond):
        assert cond is cond_expected
        torch.testing.assert_close(x_in, example.net_input)
        torch.testing.assert_close(time.reshape(-1), example.net_time.reshape(-1))
        return example.target

    return network


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: N.DDPMProcess(prediction_type="epsilon"), id="ddpm-eps"),
        pytest.param(lambda: N.DDPMProcess(prediction_type="sample"), id="ddpm-sample"),
        pytest.param(lambda: N.DDPMProcess(prediction_type="v_prediction"), id="ddpm-v"),
        pytest.param(lambda: N.DDPMProcess(num_train_timesteps=1000, beta_schedule="linear"), id="ddpm-lin"),
        pytest.param(N.FlowMatchingProcess, id="flow"),
        pytest.param(N.EDMProcess, id="edm-lognormal"),
        pytest.param(lambda: N.EDMProcess(distribution="loglogistic", sigma_min=0.001), id="edm-loglogistic"),
    ],
)
def test_network_outputting_the_exact_target_reconstructs_the_actions_through_denoise(make):
    process = make()
    a = torch.randn(32, 16, 7, generator=_gen(4), dtype=F64)
    example = process.training_example(a, generator=_gen(5))
    assert example.target.shape == a.shape and example.net_input.shape == a.shape
    assert example.sigma.shape == (32,)
    # The VE view of the example is a + sigma * noise.
    eps = N.eps_from_x0(example.x, example.sigma, a)
    assert abs(eps.std().item() - 1) < 0.05
    cond = object()
    x0_hat = process.denoiser(_oracle(example, cond))(example.x, example.sigma, cond)
    torch.testing.assert_close(x0_hat, a, rtol=1e-9, atol=1e-9)
    assert process.loss(example.target, example).item() == 0
    assert process.loss(example.target + 0.1, example).item() == pytest.approx(0.01)


def test_ddpm_training_sample_equals_diffusers_add_noise(ddpm):
    from diffusers import DDPMScheduler

    a = torch.randn(16, 8, 2, generator=_gen(6), dtype=F64)
    eps = torch.randn(16, 8, 2, generator=_gen(7), dtype=F64)
    t = torch.randint(0, 100, (16,), generator=_gen(8))
    example = ddpm.training_example(a, noise=eps, level=t)
    ref = DDPMScheduler(**ddpm.scheduler_config).add_noise(a, eps, t)
    torch.testing.assert_close(example.net_input, ref)
    torch.testing.assert_close(example.target, eps)
    torch.testing.assert_close(N.vp_from_ve(example.x, example.sigma), ref)


def test_ddpm_timestep_is_exact_on_the_table_and_log_sigma_interpolated_between(ddpm):
    table = ddpm.train_sigmas
    ks = torch.arange(100)
    torch.testing.assert_close(ddpm.timestep_from_sigma(table), ks.to(F64))
    mid = (table[:-1].log() + table[1:].log()).div(2).exp()
    torch.testing.assert_close(ddpm.timestep_from_sigma(mid), ks[:-1].to(F64) + 0.5)
    # Outside the table the timestep is clamped to [0, T - 1].
    clamped = ddpm.timestep_from_sigma(torch.tensor([1e-6, 1e6], dtype=F64))
    assert clamped.tolist() == [0.0, 99.0]


def test_ddpm_denoise_between_timesteps_uses_exact_alpha_bar_of_sigma(ddpm):
    """An oracle epsilon network (ignores the timestep) still inverts exactly at any sigma."""
    a, n, _ = _batch(9, (8, 4, 2))
    sigma = torch.tensor([0.05, 0.3, 0.77, 1.3, 2.2, 9.0, 40.0, 500.0], dtype=F64)
    x = a + N.expand_sigma(sigma, a) * n
    seen = {}

    def eps_net(x_vp, t, cond):
        seen["x_vp"], seen["t"] = x_vp, t
        return n

    torch.testing.assert_close(ddpm.denoiser(eps_net)(x, sigma, None), a)
    abar = N.expand_sigma(1 / (1 + sigma**2), a)
    torch.testing.assert_close(seen["x_vp"], abar.sqrt() * a + (1 - abar).sqrt() * n)
    assert bool((seen["t"][1:] > seen["t"][:-1]).all())
    assert not torch.equal(seen["t"], seen["t"].round())


@pytest.mark.parametrize("steps", [1, 10, 16, 100])
def test_ddpm_schedule_is_diffusers_ddim_timesteps_then_zero(ddpm, steps):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**ddpm.scheduler_config, set_alpha_to_one=True, steps_offset=0)
    scheduler.set_timesteps(steps)
    sigmas = ddpm.sigmas(steps)
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0
    torch.testing.assert_close(
        sigmas[:-1], N.sigma_from_alpha_bar(scheduler.alphas_cumprod.to(F64))[scheduler.timesteps]
    )
    with pytest.raises(ValueError, match="steps=101"):
        ddpm.sigmas(101)


def test_flow_schedule_is_uniform_in_t_and_ends_at_sigma_zero():
    process = N.FlowMatchingProcess(t_min=1e-4)
    sigmas = process.sigmas(10)
    t = N.t_from_sigma(sigmas)
    torch.testing.assert_close(t, torch.tensor([1e-4, *[i / 10 for i in range(1, 11)]], dtype=F64))
    assert sigmas[-1] == 0 and sigmas[0] == pytest.approx(1e4 - 1)
    assert process.prior_scale(sigmas[0]) * 1e-4 == pytest.approx(1.0)  # x_t = z at t_min


def test_edm_schedule_matches_diffusers_karras_sigmas():
    from diffusers import EDMEulerScheduler

    process = N.EDMProcess(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    scheduler = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    scheduler.set_timesteps(18)
    torch.testing.assert_close(process.sigmas(18), scheduler.sigmas.to(F64), rtol=1e-6, atol=1e-7)


def test_edm_preconditioning_gives_unit_variance_input_and_target_for_data_at_sigma_data():
    process = N.EDMProcess(sigma_data=0.5)
    a = 0.5 * torch.randn(4000, 4, 2, generator=_gen(10), dtype=F64)
    for s in [0.01, 0.5, 5.0, 50.0]:
        example = process.training_example(a, level=torch.full((4000,), s, dtype=F64), generator=_gen(11))
        assert example.net_input.std().item() == pytest.approx(1.0, abs=0.03)
        assert example.target.std().item() == pytest.approx(1.0, abs=0.03)
        assert example.net_time[0].item() == pytest.approx(math.log(s) / 4)


def test_edm_training_sigma_distributions():
    lognormal = N.EDMProcess().sample_training_sigmas(20000, _gen(12), F64).log()
    assert lognormal.mean().item() == pytest.approx(-1.2, abs=0.04)
    assert lognormal.std().item() == pytest.approx(1.2, abs=0.04)
    process = N.EDMProcess(distribution="loglogistic", sigma_min=0.001, sigma_max=80.0)
    s = process.sample_training_sigmas(20000, _gen(13), F64)
    assert s.min().item() >= 0.001 and s.max().item() <= 80.0
    assert s.median().item() == pytest.approx(0.5, rel=0.05)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown noise process 'vp'"):
        N.make_process("vp")
    with pytest.raises(ValueError, match="prediction_type"):
        N.DDPMProcess(prediction_type="score")
    with pytest.raises(ValueError, match="distribution"):
        N.EDMProcess(distribution="uniform")
    with pytest.raises(ValueError, match="t_min"):
        N.FlowMatchingProcess(t_min=0.0)
    with pytest.raises(ValueError, match="noise has shape"):
        N.FlowMatchingProcess().training_example(torch.zeros(2, 3, 4), noise=torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="sigma has shape"):
        N.expand_sigma(torch.ones(3), torch.zeros(2, 4, 1))
    assert isinstance(N.make_process("edm", sigma_data=1.0), N.EDMProcess)
    assert isinstance(N.EDMProcess().denoiser(lambda x, t, c: x), N.Denoiser)


class _TinyNet(torch.nn.Module):
    """An MLP on (x_in, random Fourier features of the process's time input)."""

    def __init__(self, time_scale):
        super().__init__()
        self.time_scale = time_scale
        self.register_buffer("freq", torch.randn(8, generator=_gen(20)) * 3)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(17, 64),
            torch.nn.SiLU(),
            torch.nn.Linear(64, 64),
            torch.nn.SiLU(),
            torch.nn.Linear(64, 1),
        )

    def forward(self, x, time, cond):
        angle = time.reshape(-1, 1) * self.time_scale * self.freq
        return self.mlp(torch.cat([x.reshape(-1, 1), angle.sin(), angle.cos()], -1)).reshape(x.shape)


@pytest.mark.parametrize(
    ("make", "time_scale"),
    [(N.DDPMProcess, 0.01), (N.FlowMatchingProcess, 1.0), (N.EDMProcess, 1.0)],
    ids=["ddpm", "flow", "edm"],
)
def test_a_small_network_trained_on_examples_samples_the_data_through_denoise(make, time_scale):
    """End to end: training_example -> loss -> network -> process.denoiser -> sampler."""
    from robomosaic.policies.samplers import sample

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is faster on a shared machine
    try:
        process, g = make(), _gen(21)
        torch.manual_seed(0)
        net = _TinyNet(time_scale)
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        for _ in range(500):
            right = torch.rand(256, generator=g) < 0.7  # modes -1 (std 0.25) and +1 (std 0.15)
            a = torch.where(right, 1.0, -1.0) + torch.where(right, 0.15, 0.25) * torch.randn(256, generator=g)
            example = process.training_example(a.reshape(256, 1, 1), generator=g)
            loss = process.loss(net(example.net_input, example.net_time, None), example)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = sample(process.denoiser(net), (4000, 1, 1), None, 20, process, "heun", generator=_gen(22))
    finally:
        torch.set_num_threads(threads)
    right = out.flatten() > 0
    assert right.float().mean().item() == pytest.approx(0.7, abs=0.1)
    assert out.flatten()[right].mean().item() == pytest.approx(1.0, abs=0.15)
    assert out.flatten()[~right].mean().item() == pytest.approx(-1.0, abs=0.15)
    assert out.flatten()[right].std().item() < 0.3 and out.flatten()[~right].std().item() < 0.45
