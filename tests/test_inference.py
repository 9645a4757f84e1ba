"""The inference core (policies/inference.py) and GPC composition (policies/composition.py).

Bit-identity against the pre-redesign pipeline, written out here step by step as it was
(normalize, encode, samplers.sample with the RTC hooks inside the network's sampling context,
unnormalize); composition operators against Gaussian parents whose composed distribution is known
in closed form; the composed checkpoint folder and its refusals.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from analytic import F64, GaussianMixture

from robomosaic.conf import load_group_option
from robomosaic.data.normalizer import Normalizer
from robomosaic.data.spec import KeySpec
from robomosaic.policies import noise as N
from robomosaic.policies import samplers as S
from robomosaic.policies.checkpoint import CheckpointError, load_policy
from robomosaic.policies.compose import heldout_errors, two_proportion_test, weight_grid
from robomosaic.policies.composition import ComposedPolicy
from robomosaic.policies.denoising_policy import DenoisingPolicy
from robomosaic.policies.inference import (
    RTC_MAX_GUIDANCE,
    ActionSpace,
    BoundDenoiser,
    CompositionError,
    sample_chunk,
    shared_schedule,
)

OBS = {"eef": KeySpec((3,), "float64"), "object": KeySpec((4,), "float64")}
ACTION = KeySpec((2,), "float32")
HORIZON = 8


def normalizer(action_max: float = 4.0) -> Normalizer:
    stats = {
        "eef": {"min": -np.ones(3), "max": np.ones(3)},
        "object": {"min": -2 * np.ones(4), "max": 2 * np.ones(4)},
        "action": {"min": np.array([-1.5, 0.0]), "max": np.array([1.5, action_max])},
    }
    return Normalizer({k: "minmax" for k in stats}, stats)


def policy(
    kind: str, seed: int = 0, obs=OBS, n_obs_steps: int = 2, action_max: float = 4.0
) -> DenoisingPolicy:
    """Small untrained policies (bit-identity needs no training): weights from `seed`."""
    configs = {
        "ddpm_unet": {"network": "unet", "process": {"name": "ddpm"}, "sampler": "ddim"},
        "flow_transformer": {"network": "transformer", "process": {"name": "flow"}, "sampler": "euler"},
        "edm_transformer": {"network": "transformer", "process": {"name": "edm"}, "sampler": "heun"},
        "mode": {"network": "mode", **load_group_option("flow", "edm")},
    }
    config = {
        "horizon": HORIZON,
        "n_obs_steps": n_obs_steps,
        "n_action_steps": 4,
        "unet": {"down_dims": [32, 64], "noise_embed_dim": 32},
        "transformer": {"d_model": 32, "depth": 2, "n_heads": 2},
        "mode": {"d_model": 32, "depth": 2, "n_heads": 2, "expert_hidden": 32},
        "encoder": {"state_feature_dim": 32, "state_hidden_dims": [64]},
        "steps": 6,
        **configs[kind],
    }
    torch.manual_seed(seed)
    p = DenoisingPolicy(config, obs, ACTION, normalizer(action_max))
    with torch.no_grad():  # untrained zero-initialised output layers would make every chunk equal
        for param in p.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))
    return p.eval()


def observations(b: int = 3, steps: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "eef": torch.rand(b, steps, 3, generator=g) * 2 - 1,
        "object": torch.rand(b, steps, 4, generator=g) * 4 - 2,
    }


def noise(b: int = 3) -> torch.Tensor:
    return torch.randn(b, HORIZON, 2, generator=torch.Generator().manual_seed(7))


def committed(b: int = 3) -> torch.Tensor:
    c = torch.full((b, HORIZON, 2), float("nan"))
    c[:, :3] = torch.tensor([0.2, 1.5])
    return c


@torch.no_grad()
def pre_redesign_chunk(p: DenoisingPolicy, obs, x_T, known=None, seed: int = 3) -> torch.Tensor:
    """DenoisingPolicy.sample_actions as it was before the inference core (commit ea38123)."""
    generator = torch.Generator().manual_seed(seed)
    cond = p.encoder({k: p.normalizer.normalize(obs[k], k) for k in p.encoder.obs_keys})
    denoise, on_step = p.denoise, None
    if known is not None:
        mask = torch.isfinite(known)
        target = p.normalizer.normalize(torch.nan_to_num(known.float()), "action")
        denoise = S.GuidedInpainting(p.denoise, mask, target, max_weight=RTC_MAX_GUIDANCE)
        on_step = S.Inpainting(mask, target, generator=generator)
    with p.network.sampling():  # was: an isinstance(network, ModeDenoiser) check
        x = S.sample(
            denoise, (cond.shape[0], p.horizon, p.action_dim), cond, int(p.config["steps"]), p.process,
            p.config["sampler"], on_step=on_step, generator=generator, noise=x_T, device=cond.device,
        )  # fmt: skip
    return p.normalizer.unnormalize(x, "action")


@pytest.mark.parametrize("rtc", [False, True], ids=["plain", "rtc"])
@pytest.mark.parametrize("kind", ["ddpm_unet", "flow_transformer", "edm_transformer", "mode"])
def test_sample_actions_is_bit_identical_to_the_pre_redesign_pipeline(kind, rtc):
    p = policy(kind)
    if kind == "mode":
        assert p.network.cache_enabled  # the expert cache is the network's sampling hook
    obs, known = observations(), committed() if rtc else None
    expected = pre_redesign_chunk(p, obs, noise(), known)
    ours = p.sample_actions(obs, generator=torch.Generator().manual_seed(3), noise=noise(), committed=known)
    assert torch.equal(ours, expected)
    assert (ours[0] - ours[1]).abs().max() > 1e-3, "chunks depend on the observation"
    if rtc:
        torch.testing.assert_close(ours[:, :3], known[:, :3], atol=1e-5, rtol=0)


def test_guidance_through_sample_chunk_is_the_sampler_guidance():
    p = policy("flow_transformer")
    obs = observations()

    def toward(a, cond):
        return -((a - 0.5) ** 2).sum((-1, -2))

    guidance = S.GradientGuidance(toward, scale=2.0)
    with torch.no_grad():
        ours = sample_chunk(p.bind(obs), guidance=guidance, noise=noise())
        cond = p.encode(obs)
        x = S.sample(
            p.denoise, (3, HORIZON, 2), cond, 6, p.process, "euler", guidance=guidance, noise=noise()
        )
        plain = sample_chunk(p.bind(obs), noise=noise())
    assert torch.equal(ours, p.normalizer.unnormalize(x, "action"))
    assert not torch.equal(ours, plain)


@pytest.mark.parametrize("operator", ["convex", "and", "or"])
def test_weights_one_zero_give_parent_a_bit_identically(operator):
    a, b = policy("ddpm_unet", seed=0), policy("flow_transformer", seed=1)
    composed = ComposedPolicy([a, b], [1.0, 0.0], operator)
    obs = observations()
    for known in (None, committed()):
        alone = a.sample_actions(
            obs, generator=torch.Generator().manual_seed(3), noise=noise(), committed=known
        )
        both = composed.sample_actions(
            obs, generator=torch.Generator().manual_seed(3), noise=noise(), committed=known
        )
        assert torch.equal(both, alone)
    history = {k: v[0].numpy() for k, v in obs.items()}
    chunk_a = a.predict_chunk(history, generator=torch.Generator().manual_seed(5))
    assert np.array_equal(
        composed.predict_chunk(history, generator=torch.Generator().manual_seed(5)), chunk_a
    )
    # and the composition is not parent A once B has weight
    mixed = ComposedPolicy([a, b], [0.5, 0.5] if operator != "and" else [1.0, 1.0], operator)
    assert not np.array_equal(
        mixed.predict_chunk(history, generator=torch.Generator().manual_seed(5)), chunk_a
    )


def test_mismatched_action_normalization_is_refused_by_dimension():
    a, b = policy("ddpm_unet"), policy("ddpm_unet", seed=1, action_max=5.0)
    with pytest.raises(
        CompositionError, match=r"action dimension 1 is normalized differently.*normalizer_from"
    ):
        ComposedPolicy([a, b], [0.5, 0.5])
    with pytest.raises(CompositionError, match="action dimension 1"):
        sample_chunk([a.bind(observations()), b.bind(observations(), "b")], weights=[0.5, 0.5])
    # a zero-weight parent is not sampled, so it is not checked by sample_chunk either
    sample_chunk([a.bind(observations()), b.bind(observations(), "b")], weights=[1.0, 0.0])


def test_bad_weights_and_operators_are_named():
    a, b = policy("ddpm_unet"), policy("ddpm_unet", seed=1)
    with pytest.raises(CompositionError, match="must sum to 1"):
        ComposedPolicy([a, b], [0.5, 0.6])
    with pytest.raises(CompositionError, match="operator='xor'"):
        ComposedPolicy([a, b], [0.5, 0.5], "xor")
    with pytest.raises(CompositionError, match="2 weights for 3 parents"):
        ComposedPolicy([a, b, a], [0.5, 0.5])
    ComposedPolicy([a, b], [1.0, 1.0], "and")  # a product's weights need not sum to 1


# --- closed-form parents --------------------------------------------------------------------------

IDENTITY = Normalizer({"action": "identity"}, {"action": {}})


def gaussian(mean, std, process, batch, name="parent", steps=20, sampler="heun") -> BoundDenoiser:
    g = GaussianMixture([mean], [std], [1.0])
    return BoundDenoiser(
        denoise=lambda x, sigma: g(x, sigma, None), process=process, action_space=ActionSpace(1, 2, IDENTITY),
        batch=batch, device=torch.device("cpu"), steps=steps, sampler=sampler, name=name,
    )  # fmt: skip


def draw(parents, **kwargs) -> torch.Tensor:
    n = parents[0].batch
    x_T = torch.randn(n, 1, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    return sample_chunk(parents, noise=x_T, generator=torch.Generator().manual_seed(2), **kwargs)[:, 0]


A_MEAN, B_MEAN, STD = [-0.5, 0.3], [0.5, 0.1], 0.4


def test_shared_schedule_lies_in_every_process_range():
    processes = [N.DDPMProcess(), N.FlowMatchingProcess(), N.EDMProcess()]
    for lead in processes:
        sigmas = shared_schedule(processes, lead, 10)
        lo = max(p.sigma_range()[0] for p in processes)
        hi = min(p.sigma_range()[1] for p in processes)
        assert sigmas[-1] == 0 and bool((sigmas[:-1] >= lo - 1e-9).all() and (sigmas[:-1] <= hi + 1e-9).all())
        assert bool((sigmas[1:] < sigmas[:-1]).all())
    # EDM is trained up to sigma 80: a flow lead's schedule (from sigma 99999 at t_min) is clamped to it
    assert shared_schedule(processes, processes[1], 10)[0] == pytest.approx(processes[2].sigma_range()[1])


@pytest.mark.parametrize(("process_a", "process_b"), [("ddpm", "flow"), ("flow", "edm"), ("edm", "ddpm")])
def test_convex_composition_of_mixed_process_gaussians_is_the_weighted_gaussian(process_a, process_b):
    """Equal-variance Gaussian parents: the convex score sum is, at every noise level, the score of
    N(w_a m_a + w_b m_b, s^2) noised, so the ODE samples exactly that Gaussian."""
    procs = {"ddpm": N.DDPMProcess(), "flow": N.FlowMatchingProcess(), "edm": N.EDMProcess()}
    n, w = 6000, 0.3
    a = gaussian(A_MEAN, STD, procs[process_a], n, "a")
    b = gaussian(B_MEAN, STD, procs[process_b], n, "b")
    x = draw([a, b], weights=[w, 1 - w])
    target = w * torch.tensor(A_MEAN, dtype=F64) + (1 - w) * torch.tensor(B_MEAN, dtype=F64)
    assert (x.mean(0) - target).abs().max() < 0.02, x.mean(0)
    assert ((x.std(0) / STD) - 1).abs().max() < 0.05, x.std(0)


def test_and_with_corrector_steps_samples_the_product_of_the_parents():
    """N(m_a, s^2) N(m_b, s^2) is N((m_a + m_b) / 2, s^2 / 2). Summed scores alone collapse the
    spread; Langevin corrector steps at each level recover most of it (measured: std 0.25 of 0.28
    at 10 steps, 0.009 without)."""
    n = 4000
    parents = [
        gaussian(A_MEAN, STD, N.EDMProcess(), n, "a"),
        gaussian(B_MEAN, STD, N.FlowMatchingProcess(), n, "b"),
    ]
    target_mean = (torch.tensor(A_MEAN, dtype=F64) + torch.tensor(B_MEAN, dtype=F64)) / 2
    target_std = STD / 2**0.5
    ode = draw(parents, weights=[1.0, 1.0], operator="and")
    corrected = draw(parents, weights=[1.0, 1.0], operator="and", corrector_steps=10)
    for x in (ode, corrected):
        assert (x.mean(0) - target_mean).abs().max() < 0.02, x.mean(0)
    assert ode.std(0).max() < 0.2 * target_std
    assert ((corrected.std(0) / target_std) - 1).abs().max() < 0.15, corrected.std(0)


def test_or_samples_the_mixture_with_the_weights_as_shares():
    n, w = 5000, 0.3
    parents = [gaussian(A_MEAN, 0.1, N.DDPMProcess(), n, "a"), gaussian(B_MEAN, 0.1, N.EDMProcess(), n, "b")]
    x = draw(parents, weights=[w, 1 - w], operator="or")
    mixture = GaussianMixture([A_MEAN, B_MEAN], [0.1, 0.1], [w, 1 - w])
    for k, (share, mean, std) in enumerate(mixture.component_stats(x[:, None])):
        assert abs(share - mixture.w[k]) < 0.02, (k, share)
        assert (mean - mixture.mu[k]).abs().max() < 0.01 and ((std / 0.1) - 1).abs().max() < 0.05


def test_parents_with_disjoint_sigma_ranges_are_refused():
    narrow = N.EDMProcess(sigma_min=0.002, sigma_max=0.01)
    wide = N.EDMProcess(sigma_min=0.1, sigma_max=80)
    with pytest.raises(CompositionError, match="sigma ranges do not overlap"):
        shared_schedule([narrow, wide], wide, 10)


# --- the composed policy ----------------------------------------------------------------------------


def test_parents_read_their_own_keys_and_history_lengths():
    """Parent B observes only `eef`, over 3 steps; the composed policy reads the union over 3 steps
    and each parent gets exactly what it alone would."""
    a = policy("ddpm_unet")
    b = policy("flow_transformer", seed=1, obs={"eef": OBS["eef"]}, n_obs_steps=3)
    composed = ComposedPolicy([a, b], [0.0, 1.0])
    assert set(composed.obs_spec) == {"eef", "object"} and composed.n_obs_steps == 3
    obs = observations(steps=3)
    history = {k: v[0].numpy() for k, v in obs.items()}
    alone = b.predict_chunk({"eef": history["eef"]}, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(composed.predict_chunk(history, generator=torch.Generator().manual_seed(0)), alone)
    conflicting = policy("ddpm_unet", obs={"eef": KeySpec((4,), "float64"), "object": OBS["object"]})
    with pytest.raises(CompositionError, match="observation 'eef'"):
        ComposedPolicy([a, conflicting], [0.5, 0.5])


def test_composed_checkpoint_round_trips_and_refuses_a_changed_parent(tmp_path):
    a, b = policy("ddpm_unet"), policy("flow_transformer", seed=1)
    a.save(tmp_path / "runs" / "a", extra_spec={"task": "lift", "control_hz": 20.0})
    b.save(tmp_path / "runs" / "b", extra_spec={"control_hz": 10.0})
    composed = ComposedPolicy([a, b], [0.4, 0.6], names=["a", "b"])
    with pytest.raises(CompositionError, match=r"different control rates.*'a': 20.0, 'b': 10.0"):
        composed.save(tmp_path / "refused", [tmp_path / "runs" / "a", tmp_path / "runs" / "b"])
    assert not (tmp_path / "refused").exists(), "a refused composition writes nothing"
    b.save(tmp_path / "runs" / "b", extra_spec={"control_hz": 20.0})
    composed.save(
        tmp_path / "composed" / "ab", [tmp_path / "runs" / "a", tmp_path / "runs" / "b"], task="lift"
    )
    config = (tmp_path / "composed" / "ab" / "config.yaml").read_text()
    assert "../../runs/a" in config and "spec_sha256" in config
    assert not list((tmp_path / "composed" / "ab").glob("*.safetensors")), (
        "the parents' weights are not copied"
    )
    # the parents' folders may move, with the composition beside them
    (tmp_path / "composed").rename(tmp_path / "elsewhere")
    (tmp_path / "runs").rename(tmp_path / "runs_moved")
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "runs_moved").rename(moved / "runs")
    (tmp_path / "elsewhere").rename(moved / "composed")
    loaded = load_policy(moved / "composed" / "ab")
    assert isinstance(loaded, ComposedPolicy) and loaded.weights == [0.4, 0.6]
    history = {k: v[0].numpy() for k, v in observations().items()}
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    assert np.array_equal(
        loaded.use_backend("eager").predict_chunk(history, generator=g()),
        composed.predict_chunk(history, generator=g()),
    )
    # a retrained parent B: refused, by name
    policy("flow_transformer", seed=2).save(moved / "runs" / "b")
    with pytest.raises(CheckpointError, match=r"parent b .* changed since the composition was saved"):
        load_policy(moved / "composed" / "ab")
    spec = json.loads((moved / "composed" / "ab" / "spec.json").read_text())
    assert spec["policy_class"] == "ComposedPolicy" and spec["task"] == "lift" and spec["horizon"] == HORIZON
    assert spec["control_hz"] == 20.0, "the ROS 2 node reads the control rate from the composed spec"


def test_unknown_policy_class_names_the_entry_point_group(tmp_path):
    a = policy("ddpm_unet")
    a.save(tmp_path / "a")
    spec_file = tmp_path / "a" / "spec.json"
    spec_file.write_text(spec_file.read_text().replace('"DenoisingPolicy"', '"NoSuchPolicy"'))
    with pytest.raises(CheckpointError, match=r"'NoSuchPolicy' is unknown.*robomosaic.policies"):
        load_policy(tmp_path / "a")


# --- robomosaic-compose helpers ----------------------------------------------------------------------


def test_weight_grids():
    two = weight_grid(2, 0.1)
    assert len(two) == 11 and two[0] == (1.0, 0.0) and two[-1] == (0.0, 1.0)
    three = weight_grid(3, 0.1)
    assert len(three) == 66 and all(abs(sum(w) - 1) < 1e-9 and min(w) >= 0 for w in three)
    with pytest.raises(CompositionError, match="grid_step=0.3"):
        weight_grid(2, 0.3)


def test_two_proportion_test_matches_scipy():
    from scipy.stats import norm

    r = two_proportion_test(130, 200, 110, 200)
    p = (130 + 110) / 400
    z = (0.65 - 0.55) / np.sqrt(p * (1 - p) * (2 / 200))
    assert r["z"] == pytest.approx(z) and r["p_one_sided"] == pytest.approx(norm.sf(z))
    assert r["p_two_sided"] == pytest.approx(2 * norm.sf(z))


def test_heldout_error_is_the_convex_quadratic_of_the_parents_errors(tmp_path):
    """On real windows of a store on disk: at weight (1, 0) the composed error is parent A's own,
    and between the parents it is never above the line joining them (the error is convex in w)."""
    from robomosaic.data.spec import DatasetSpec
    from robomosaic.data.store import EpisodeStore

    store = EpisodeStore.create(
        tmp_path / "h.zarr", DatasetSpec({**OBS, "action": ACTION}, 20.0, task="lift")
    )
    rng = np.random.default_rng(0)
    for seed in range(3):
        data = {"eef": rng.uniform(-1, 1, (30, 3)), "object": rng.uniform(-2, 2, (30, 4))}
        data["action"] = np.stack([rng.uniform(-1.5, 1.5, 30), rng.uniform(0, 4, 30)], -1).astype(np.float32)
        store.append_episode(data, {"seed": seed, "success": True})
    a, b = policy("ddpm_unet"), policy("edm_transformer", seed=1)
    grid = weight_grid(2, 0.25)
    mse = heldout_errors([a, b], grid, "convex", tmp_path / "h.zarr", windows=64)
    line = [mse[0] + (mse[-1] - mse[0]) * w[1] for w in grid]
    assert all(m <= bound + 1e-9 for m, bound in zip(mse, line, strict=True)), (mse, line)
    assert len(set(np.round(mse, 9))) == len(grid)
