"""Samplers through the denoise contract, checked against exact analytic denoisers and diffusers."""

import itertools

import pytest
import torch
from analytic import F64, GaussianMixture

from robomosaic.policies import noise as N
from robomosaic.policies import samplers as S


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small tensor ops: one thread is several times faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


MIXTURE_1D = GaussianMixture([[-1.0], [1.0]], [0.25, 0.15], [0.3, 0.7])
MIXTURE_2D = GaussianMixture([[-1.0, 0.5], [1.0, 1.0], [0.0, -1.0]], [0.2, 0.3, 0.15], [0.2, 0.5, 0.3])
GAUSSIAN_8D = GaussianMixture([[0.0] * 8, [1.0] * 8], [0.5, 0.3], [0.5, 0.5])
PROCESSES = {"ddpm": N.DDPMProcess(), "flow": N.FlowMatchingProcess(), "edm": N.EDMProcess()}
STEPS = {"ddim": 50, "euler": 50, "heun": 25}  # about 50 denoiser evaluations each


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize(
    ("mixture", "sampler"),
    [(MIXTURE_1D, name) for name in STEPS] + [(MIXTURE_2D, "ddim"), (MIXTURE_2D, "heun")],
    ids=["1d-ddim", "1d-euler", "1d-heun", "2d-ddim", "2d-heun"],
)
def test_sampler_recovers_the_gaussian_mixture_of_an_exact_denoiser(process, mixture, sampler):
    dim = mixture.mu.shape[1]
    a = S.sample(
        mixture,
        (20000, 1, dim),
        None,
        STEPS[sampler],
        PROCESSES[process],
        sampler,
        generator=_gen(),
        dtype=F64,
    )
    for k, (weight, mean, std) in enumerate(mixture.component_stats(a)):
        assert abs(weight - mixture.w[k]) < 0.02, (k, weight)
        assert (mean - mixture.mu[k]).abs().max() < 0.05, (k, mean)
        assert ((std / mixture.std[k]) - 1).abs().max() < 0.1, (k, std)


@pytest.mark.parametrize("process", ["flow", "edm"])
def test_heun_is_second_order_and_beats_euler_at_equal_evaluations(process):
    """Same noise, same sigma_max: pathwise error against a 200-step Heun reference."""
    noise = torch.randn(2000, 1, 2, generator=_gen(1), dtype=F64)

    def error(sampler, steps):
        a = S.sample(MIXTURE_2D, noise.shape, None, steps, PROCESSES[process], sampler, noise=noise)
        return (a - reference).abs().mean().item()

    reference = S.sample(MIXTURE_2D, noise.shape, None, 200, PROCESSES[process], "heun", noise=noise)
    heun_10, heun_20 = error("heun", 10), error("heun", 20)
    euler_20, euler_40 = error("euler", 20), error("euler", 40)
    assert heun_20 < 0.6 * euler_40, (heun_20, euler_40)  # 39 vs 40 evaluations
    assert heun_10 / heun_20 > 3 and euler_20 / euler_40 < 2.5, (heun_10, heun_20, euler_20, euler_40)


@pytest.mark.parametrize("process", PROCESSES)
def test_float32_sampling_matches_float64_despite_the_large_initial_sigma(process):
    """DDPM starts near sigma = 2000 and flow at sigma = 1e5 (t_min = 1e-5)."""
    noise = torch.randn(2000, 1, 2, generator=_gen(14), dtype=F64)
    exact = S.sample(MIXTURE_2D, noise.shape, None, 20, PROCESSES[process], "heun", noise=noise)
    single = S.sample(MIXTURE_2D, noise.shape, None, 20, PROCESSES[process], "heun", noise=noise.float())
    assert single.dtype == torch.float32
    assert (single.double() - exact).abs().max() < 1e-4  # measured 3e-6 .. 3e-5


@pytest.mark.parametrize("process", PROCESSES)
def test_ddim_without_noise_is_the_euler_step(process):
    noise = torch.randn(500, 4, 2, generator=_gen(2), dtype=F64)
    ddim = S.sample(GAUSSIAN_8D, noise.shape, None, 12, PROCESSES[process], "ddim", noise=noise)
    euler = S.sample(GAUSSIAN_8D, noise.shape, None, 12, PROCESSES[process], "euler", noise=noise)
    torch.testing.assert_close(ddim, euler, rtol=1e-9, atol=1e-9)


def _velocity_net(x_t, t, cond):
    return torch.tanh(x_t.flip(-1) * 1.3 + t.reshape(-1, 1, 1)) - 0.5 * x_t


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_model_through_the_contract_is_the_usual_flow_ode_solver_in_t(sampler):
    process = N.FlowMatchingProcess(t_min=1e-3)
    z = torch.randn(64, 8, 2, generator=_gen(3), dtype=F64)
    ours = S.sample(process.denoiser(_velocity_net), z.shape, None, 10, process, sampler, noise=z)
    t = torch.linspace(0, 1, 11, dtype=F64).clamp(min=1e-3)
    x = z
    for t0, t1 in itertools.pairwise(t):
        v = _velocity_net(x, t0.expand(64), None)
        if sampler == "heun" and t1 < 1:
            v = (v + _velocity_net(x + (t1 - t0) * v, t1.expand(64), None)) / 2
        x = x + (t1 - t0) * v
    torch.testing.assert_close(ours, x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers_ddim_scheduler_at_every_step(eta):
    from diffusers import DDIMScheduler

    process = N.DDPMProcess()
    weight = torch.randn(3, 3, generator=_gen(4), dtype=F64) / 2

    def eps_net(x_vp, timestep, cond):
        assert cond == "encoded"
        return torch.tanh(x_vp @ weight + timestep.reshape(-1, 1, 1) / 50)

    steps, shape = 10, (16, 8, 3)
    z = torch.randn(shape, generator=_gen(5), dtype=F64)
    ours = []

    def record(x, sigma, step):
        ours.append(N.vp_from_ve(x, sigma))
        return x

    final = S.sample(
        process.denoiser(eps_net), shape, "encoded", steps, process, "ddim",
        eta=eta, noise=z, generator=_gen(6), on_step=record,
    )  # fmt: skip
    scheduler = DDIMScheduler(
        **process.scheduler_config, clip_sample=False, set_alpha_to_one=True, steps_offset=0
    )
    scheduler.set_timesteps(steps)
    variance_noise = _gen(6)
    sample = z
    for i, t in enumerate(scheduler.timesteps):
        eps = eps_net(sample, t.to(F64).expand(shape[0]), "encoded")
        z_i = torch.randn(shape, generator=variance_noise, dtype=F64) if eta > 0 else None
        sample = scheduler.step(eps, t, sample, eta=eta, variance_noise=z_i).prev_sample
        torch.testing.assert_close(ours[i], sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, sample, rtol=1e-5, atol=1e-5)
    assert len(ours) == steps


def test_cond_is_passed_unchanged_once_per_evaluation():
    process = N.EDMProcess()
    cond = object()
    calls = []

    def denoise(x, sigma, c):
        assert c is cond and sigma.shape == (x.shape[0],)
        calls.append(sigma[0].item())
        return torch.zeros_like(x)

    for sampler, evaluations in [("ddim", 7), ("euler", 7), ("heun", 13)]:
        calls.clear()
        S.sample(denoise, (3, 4, 2), cond, 7, process, sampler, generator=_gen())
        assert len(calls) == evaluations
        assert calls[0] == pytest.approx(80.0) and min(calls) > 0


# --- composition (GPC) -----------------------------------------------------------------------------


def test_composition_of_identical_denoisers_equals_one():
    noise = torch.randn(2000, 1, 2, generator=_gen(7), dtype=F64)
    process = PROCESSES["edm"]
    single = S.sample(MIXTURE_2D, noise.shape, None, 20, process, "heun", noise=noise)
    composed = S.sample(
        S.Composition([MIXTURE_2D, MIXTURE_2D], (0.3, 0.7)),
        noise.shape,
        None,
        20,
        process,
        "heun",
        noise=noise,
    )
    torch.testing.assert_close(composed, single, rtol=1e-10, atol=1e-10)


def test_composition_is_the_convex_combination_of_scores():
    other = GaussianMixture([[0.5, -0.5]], [0.4], [1.0])
    composed = S.Composition([MIXTURE_2D, other], [0.25, 0.75])
    x = torch.randn(300, 1, 2, generator=_gen(8), dtype=F64) * 2
    sigma = torch.rand(300, generator=_gen(9), dtype=F64) * 3 + 0.01
    expected = 0.25 * N.score_from_x0(x, sigma, MIXTURE_2D(x, sigma, None)) + 0.75 * N.score_from_x0(
        x, sigma, other(x, sigma, None)
    )
    torch.testing.assert_close(N.score_from_x0(x, sigma, composed(x, sigma, None)), expected)
    # Composing moves mass toward the second policy's mode.
    a = S.sample(composed, (4000, 1, 2), None, 20, PROCESSES["flow"], "heun")
    b = S.sample(MIXTURE_2D, (4000, 1, 2), None, 20, PROCESSES["flow"], "heun")
    target = torch.tensor([0.5, -0.5])
    assert (a - target).norm(dim=-1).mean() < (b - target).norm(dim=-1).mean()


def test_composition_weights_are_validated():
    with pytest.raises(ValueError, match="must sum to 1"):
        S.Composition([MIXTURE_1D, MIXTURE_1D], [0.5, 0.6])
    with pytest.raises(ValueError, match="must be >= 0"):
        S.Composition([MIXTURE_1D, MIXTURE_1D], [1.5, -0.5])
    with pytest.raises(ValueError, match="2 weights for 3 denoisers"):
        S.Composition([MIXTURE_1D] * 3, [0.5, 0.5])
    # Negative weights (extrapolation) only behind the flag.
    x, sigma = torch.ones(2, 1, 1, dtype=F64), torch.ones(2, dtype=F64)
    extrapolated = S.Composition([MIXTURE_1D, MIXTURE_1D], [1.5, -0.5], allow_negative=True)
    torch.testing.assert_close(extrapolated(x, sigma, None), MIXTURE_1D(x, sigma, None))


# --- guidance (DynaGuide) --------------------------------------------------------------------------


def test_gradient_guidance_pulls_samples_toward_a_goal():
    target = torch.tensor([1.0, 1.0], dtype=F64)  # the mode of the heaviest component
    seen = []

    def log_prob(a, cond):
        seen.append(cond)
        return -((a - target) ** 2).sum((-1, -2)) / (2 * 0.3**2)

    noise = torch.randn(4000, 1, 2, generator=_gen(10), dtype=F64)
    process = PROCESSES["edm"]

    def run(guidance):
        return S.sample(MIXTURE_2D, noise.shape, "goal", 25, process, "heun", guidance=guidance, noise=noise)

    plain = run(None)
    guided = run(S.GradientGuidance(log_prob, scale=1.0))
    assert seen and all(c == "goal" for c in seen)
    plain_share, guided_share = MIXTURE_2D.shares(plain)[1], MIXTURE_2D.shares(guided)[1]
    assert plain_share == pytest.approx(0.5, abs=0.03)
    assert guided_share > 0.8, guided_share
    assert (guided - target).norm(dim=-1).mean() < 0.6 * (plain - target).norm(dim=-1).mean()
    torch.testing.assert_close(run(S.GradientGuidance(log_prob, scale=0.0)), plain)


def test_guidance_hook_receives_x0_hat_and_shifts_it():
    process = PROCESSES["flow"]
    shift = torch.tensor([0.0, 0.3], dtype=F64)
    calls = []

    def guide(x0_hat, x, sigma, cond):
        calls.append((x0_hat.shape, x.shape, sigma.shape))
        return shift.expand_as(x0_hat)

    noise = torch.randn(3000, 1, 2, generator=_gen(11), dtype=F64)
    plain = S.sample(MIXTURE_2D, noise.shape, None, 10, process, "euler", noise=noise)
    guided = S.sample(MIXTURE_2D, noise.shape, None, 10, process, "euler", guidance=guide, noise=noise)
    assert calls[0] == ((3000, 1, 2), (3000, 1, 2), (3000,)) and len(calls) == 10
    # A constant shift of x0_hat at every step moves the second coordinate up and leaves the first.
    delta = (guided - plain).mean(0).squeeze()
    assert delta[1] > 0.15 and abs(delta[0]) < 0.1


# --- on_step: inpainting committed actions -----------------------------------------------------------


class CorrelatedGaussian:
    """a ~ N(mu, cov) over the flattened chunk: E[a | x] = mu + cov (cov + sigma^2 I)^-1 (x - mu)."""

    def __init__(self, mu, cov):
        self.mu, self.cov = torch.tensor(mu, dtype=F64), torch.tensor(cov, dtype=F64)

    def __call__(self, x, sigma, cond):
        xf = x.reshape(x.shape[0], -1)
        eye = torch.eye(len(self.mu), dtype=F64)
        gain = self.cov @ torch.linalg.inv(self.cov + sigma.reshape(-1, 1, 1) ** 2 * eye)
        return (self.mu + (gain @ (xf - self.mu)[..., None]).squeeze(-1)).reshape(x.shape)


def _committed_chunk_problem():
    """A 4-step 1-D chunk with correlated steps, the first two committed, and the exact
    conditional mean of the two free steps."""
    idx = torch.arange(4, dtype=F64)
    cov = 0.8 * torch.exp(-((idx[:, None] - idx[None]) ** 2) / 4)
    known = torch.tensor([1.0, 1.2, 0.0, 0.0], dtype=F64).reshape(1, 4, 1)
    mask = torch.tensor([True, True, False, False]).reshape(1, 4, 1)
    k, u = slice(0, 2), slice(2, 4)
    cond_mean = cov[u, k] @ torch.linalg.solve(cov[k, k], known[0, k, 0])
    return CorrelatedGaussian([0.0] * 4, cov.tolist()), mask, known, cond_mean


def test_inpainting_by_replacement_keeps_committed_actions_and_pulls_the_rest():
    prior, mask, known, cond_mean = _committed_chunk_problem()
    inpaint = S.Inpainting(mask, known, generator=_gen(12))
    a = S.sample(prior, (4000, 4, 1), None, 30, PROCESSES["edm"], "heun", on_step=inpaint, generator=_gen(13))
    assert torch.equal(a[:, :2], known[:, :2].expand(4000, 2, 1))
    # Replacement only partly conditions the free steps: the next one moves from the unconditional
    # mean 0 toward the conditional mean (0.89), measured here at about half way.
    free_mean = a[:, 2:, 0].mean(0)
    assert 0.3 < free_mean[0] < cond_mean[0], (free_mean, cond_mean)


@pytest.mark.parametrize("process", ["edm", "flow"])
def test_guided_inpainting_conditions_the_free_steps(process):
    prior, mask, known, cond_mean = _committed_chunk_problem()
    guided = S.GuidedInpainting(prior, mask, known, sigma_data=1.0)
    a = S.sample(guided, (4000, 4, 1), None, 30, PROCESSES[process], "heun", generator=_gen(13))
    assert (a[:, :2] - known[:, :2]).abs().mean() < 0.01
    free_mean = a[:, 2:, 0].mean(0)
    assert torch.allclose(free_mean, cond_mean, atol=0.1), (free_mean, cond_mean)
    # With the replacement hook on top, the committed part is exact as well.
    both = S.sample(
        guided, (4000, 4, 1), None, 30, PROCESSES[process], "heun",
        on_step=S.Inpainting(mask, known, generator=_gen(12)), generator=_gen(13),
    )  # fmt: skip
    assert torch.equal(both[:, :2], known[:, :2].expand(4000, 2, 1))
    assert torch.allclose(both[:, 2:, 0].mean(0), cond_mean, atol=0.1)


def test_on_step_sees_every_step_and_its_sigma():
    process = PROCESSES["ddpm"]
    seen = []

    def on_step(x, sigma, step):
        seen.append((step, sigma[0].item()))
        return x

    S.sample(MIXTURE_1D, (5, 1, 1), None, 8, process, "heun", on_step=on_step, generator=_gen())
    assert [s for s, _ in seen] == list(range(8))
    torch.testing.assert_close(
        torch.tensor([s for _, s in seen], dtype=F64), process.sigmas(8)[1:], rtol=1e-6, atol=0
    )


def test_bad_sampler_arguments_are_named():
    process = PROCESSES["edm"]
    with pytest.raises(ValueError, match="sampler='dpm'"):
        S.sample(MIXTURE_1D, (2, 1, 1), None, 3, process, "dpm")
    with pytest.raises(ValueError, match="eta=0.5"):
        S.sample(MIXTURE_1D, (2, 1, 1), None, 3, process, "heun", eta=0.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.sample(MIXTURE_1D, (2, 1, 1), None, 3, process, sigmas=torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="noise has shape"):
        S.sample(MIXTURE_1D, (2, 1, 1), None, 3, process, noise=torch.zeros(3, 1, 1))


def test_row_generators_draw_each_row_as_its_own_batch_of_one():
    def generators():
        return [torch.Generator().manual_seed(s) for s in (1, 2, 3)]

    batch = S.randn((3, 4, 5), S.RowGenerators(generators()), torch.float32, "cpu")
    for row, g in zip(batch, generators(), strict=True):
        assert torch.equal(row, torch.randn((1, 4, 5), generator=g)[0])
    mixture = S.Mixture([lambda x, s, c: x] * 2, [0.5, 0.5], 3, S.RowGenerators(generators()))
    for choice, g in zip(mixture.choice, generators(), strict=True):
        assert choice == torch.multinomial(torch.tensor([0.5, 0.5], dtype=torch.float64), 1, generator=g)
    with pytest.raises(ValueError, match="3 row generators for a batch of 2"):
        S.randn((2, 4, 5), S.RowGenerators(generators()), torch.float32, "cpu")
