"""Tests for rl.ddim, rl.rewards and rl.advantages (CPU, tiny tensors)."""

from __future__ import annotations

import itertools
import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler

from evalsuite.battery import AttributeSpec
from evalsuite.errors import SuiteError
from rl import (
    KERNELS,
    REWARDS,
    GroupInputs,
    Kernel,
    PerPromptStatTracker,
    alignment_reward,
    balance_reward,
    balanced_reference,
    clipped_surrogate,
    confidence_reward,
    ddim_step_kl,
    ddim_step_with_logprob,
    diversity_reward,
    drift_penalty,
    drift_reward,
    group_zscore,
    hard_labels,
    joint_reference,
    median_bandwidth,
    min_cost_assignment,
    mmd2_unbiased,
    mmd_loo_credit,
    pooled_group_scores,
    quota_counts,
    quota_reward,
    rbf_kernel,
    reference_from_target,
    register_reward,
    reward_spec,
    target_shares,
    unregister_reward,
)

torch.set_num_threads(1)

SHAPE = (3, 4, 5, 5)


def make_scheduler(**overrides: object) -> DDIMScheduler:
    kwargs: dict[str, object] = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    kwargs.update(overrides)
    sched = DDIMScheduler(**kwargs)
    sched.set_timesteps(20)
    return sched


def tensors(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


# ----------------------------------------------------------------------------------------------- ddim


@pytest.mark.parametrize("index", [0, 1, 7, 13, 19])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_matches_diffusers_step(index: int, eta: float) -> None:
    sched = make_scheduler()
    t = int(sched.timesteps[index])
    sample, eps, noise = tensors(index)
    ours, _ = ddim_step_with_logprob(sched, eps, t, sample, eta, variance_noise=noise)
    ref = sched.step(eps, t, sample, eta=eta, variance_noise=noise, return_dict=False)[0]
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("index", [0, 9, 18])
@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_step_kl_is_the_kl_of_the_two_gaussian_steps(index: int, eta: float) -> None:
    sched = make_scheduler()
    t = int(sched.timesteps[index])
    sample, eps, ref = tensors(index)
    zero = torch.zeros(SHAPE)
    mean, _ = ddim_step_with_logprob(sched, eps, t, sample, eta, variance_noise=zero)  # no noise: the mean
    ref_mean, _ = ddim_step_with_logprob(sched, ref, t, sample, eta, variance_noise=zero)
    std = eta * float(sched._get_variance(t, t - 1000 // 20)) ** 0.5  # diffusers' own sigma_t^2
    direct = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                               torch.distributions.Normal(ref_mean, std))
    eps.requires_grad_(True)
    kl = ddim_step_kl(sched, eps, ref, t, sample, eta)
    assert kl.shape == (SHAPE[0],)
    assert torch.allclose(kl, direct.mean(dim=(1, 2, 3)), rtol=1e-4, atol=0)
    kl.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0
    assert torch.equal(ddim_step_kl(sched, ref, ref, t, sample, eta), torch.zeros(SHAPE[0]))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_prediction_types_match_diffusers(prediction_type: str, clip: bool) -> None:
    sched = make_scheduler(prediction_type=prediction_type, clip_sample=clip, clip_sample_range=0.5)
    for index in (0, 9, 19):
        t = int(sched.timesteps[index])
        sample, out, noise = tensors(30 + index)
        ours, _ = ddim_step_with_logprob(sched, out, t, sample, 1.0, variance_noise=noise)
        ref = sched.step(out, t, sample, eta=1.0, variance_noise=noise, return_dict=False)[0]
        assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def test_ddim_clip_sample_matches_diffusers() -> None:
    sched = make_scheduler(clip_sample=True, clip_sample_range=0.5)
    t = int(sched.timesteps[3])
    sample, eps, noise = tensors(3)
    ours, _ = ddim_step_with_logprob(sched, eps, t, sample, 1.0, variance_noise=noise)
    ref = sched.step(eps, t, sample, eta=1.0, variance_noise=noise, return_dict=False)[0]
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("index", [0, 10, 19])
def test_ddim_logprob_matches_normal(index: int) -> None:
    sched = make_scheduler()
    t = int(sched.timesteps[index])
    sample, eps, noise = (x.double() for x in tensors(10 + index))
    eta = 0.8
    prev, log_prob = ddim_step_with_logprob(sched, eps, t, sample, eta, variance_noise=noise)
    # DDIM (Song et al. 2021) eqs. 12 and 16, written out independently of rl.ddim
    a_t = float(sched.alphas_cumprod[t])
    t_prev = t - 1000 // 20
    a_prev = float(sched.alphas_cumprod[t_prev]) if t_prev >= 0 else float(sched.final_alpha_cumprod)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    x0 = (sample - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    assert torch.allclose(prev, mean + sigma * noise, atol=1e-10)
    expected = torch.distributions.Normal(mean, sigma).log_prob(prev).mean(dim=(1, 2, 3))
    assert log_prob.shape == (SHAPE[0],)
    assert torch.allclose(log_prob, expected, atol=1e-9)


def test_ddim_prev_sample_reproduces_logprob_and_has_grad() -> None:
    sched = make_scheduler()
    t = int(sched.timesteps[5])
    sample, eps, _ = tensors(21)
    gen = torch.Generator().manual_seed(0)
    prev, log_prob = ddim_step_with_logprob(sched, eps, t, sample, 1.0, generator=gen)
    eps_train = eps.clone().requires_grad_(True)
    again, log_prob2 = ddim_step_with_logprob(sched, eps_train, t, sample, 1.0, prev_sample=prev)
    assert torch.equal(again, prev)
    assert torch.equal(log_prob2.detach(), log_prob)
    log_prob2.sum().backward()
    assert eps_train.grad is not None and bool(eps_train.grad.abs().sum() > 0)


def test_ddim_per_sample_timesteps() -> None:
    sched = make_scheduler()
    ts = sched.timesteps[[0, 9, 19]]
    sample, eps, noise = tensors(5)
    prev, log_prob = ddim_step_with_logprob(sched, eps, ts, sample, 1.0, variance_noise=noise)
    for i, t in enumerate(ts.tolist()):
        p_i, lp_i = ddim_step_with_logprob(
            sched, eps[i : i + 1], t, sample[i : i + 1], 1.0, variance_noise=noise[i : i + 1]
        )
        assert torch.allclose(prev[i : i + 1], p_i, atol=1e-7)
        assert torch.allclose(log_prob[i : i + 1], lp_i, atol=1e-6)


def test_ddim_errors() -> None:
    sched = make_scheduler()
    sample, eps, _ = tensors(0)
    t = int(sched.timesteps[0])
    with pytest.raises(SuiteError, match="eta"):
        ddim_step_with_logprob(sched, eps, t, sample, 0.0)
    unknown = make_scheduler()
    unknown.register_to_config(prediction_type="flow")
    with pytest.raises(SuiteError, match="prediction_type 'flow' is not supported; allowed: epsilon, v_prediction"):
        ddim_step_with_logprob(unknown, eps, t, sample, 1.0)
    with pytest.raises(SuiteError, match="set_timesteps"):
        ddim_step_with_logprob(DDIMScheduler(), eps, t, sample, 1.0)
    with pytest.raises(SuiteError, match="timestep"):
        ddim_step_with_logprob(sched, eps, torch.tensor([1, 2]), sample, 1.0)


def test_ddim_eta_above_one_raises_where_the_step_variance_exceeds_one_minus_alpha_prev() -> None:
    sched = make_scheduler()
    sample, eps, _ = tensors(0)
    first, last = int(sched.timesteps[0]), int(sched.timesteps[-1])  # 951 and 1 (20 steps of 50)
    # at 951: a_t' = alphas_cumprod[901] gives 1 - a_t' = 0.985995 and, at eta 1, sigma^2 = 0.415240;
    # eta 2 makes it 4 x 0.415240 = 1.66096 (the square root in mu used to return NaN here)
    with pytest.raises(ValueError, match=r"eta 2 gives a step variance sigma\^2 = 1.66096 above "
                                         r"1 - a_t' = 0.985995 at timestep 951"):
        ddim_step_with_logprob(sched, eps, first, sample, 2.0)
    with pytest.raises(ValueError, match="at timestep 1; DDIM needs eta in"):
        ddim_step_kl(sched, eps, eps, last, sample, 1.5)  # 1.5^2 x 4.26e-4 = 9.59e-4 > 1 - a_t' = 8.50e-4
    prev, log_prob = ddim_step_with_logprob(sched, eps, first, sample, 1.5)  # 1.5^2 x 0.415 < 0.986: a step
    assert torch.isfinite(prev).all() and torch.isfinite(log_prob).all()


def test_ddim_eta_one_stays_finite_where_rounding_leaves_no_room() -> None:
    # zero terminal SNR (a_999 ~ 0) puts sigma^2 at eta 1 on 1 - a_t' exactly; in float32 the difference
    # rounds to -6e-8 at the first of 25 trailing steps, whose square root was NaN before the clamp
    sched = make_scheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    sched.set_timesteps(25)
    sample, eps, _ = tensors(0)
    prev, log_prob = ddim_step_with_logprob(sched, eps, int(sched.timesteps[0]), sample, 1.0,
                                            generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(prev).all() and torch.isfinite(log_prob).all()


# -------------------------------------------------------------------------------------------- rewards


def brute_force_loo(gen: torch.Tensor, ref: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    full = mmd2_unbiased(gen, ref, kernel)
    keep = [torch.cat([gen[:m], gen[m + 1 :]]) for m in range(gen.shape[0])]
    return torch.stack([mmd2_unbiased(g, ref, kernel) - full for g in keep])


@pytest.mark.parametrize("name", ["poly3", "linear", "rbf_fixed", "rbf_median"])
def test_mmd_loo_closed_form_matches_brute_force(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    gen = torch.randn(7, 3, generator=g, dtype=torch.float64)
    ref = torch.randn(5, 3, generator=g, dtype=torch.float64) + 0.5
    # with the median heuristic the brute force must reuse the bandwidth of the full pooled set
    h = 1.3 if name == "rbf_fixed" else median_bandwidth(torch.cat([gen, ref]))
    kernel: Kernel = KERNELS[name] if name in KERNELS else partial(rbf_kernel, bandwidth=h)
    brute = brute_force_loo(gen, ref, kernel)
    closed = mmd_loo_credit(gen, ref, "rbf" if name == "rbf_median" else kernel)
    assert torch.allclose(closed, brute, atol=1e-6)


def test_mmd_unbiased_formula_and_errors() -> None:
    gen = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    ref = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    # linear kernel: k_gg offdiag = 2*(0*1) = 0 -> 0/2; k_rr offdiag = 2*(0*2) = 0; k_gr sum = 0+0+0+2 = 2
    # MMD^2 = 0 + 0 - 2*2/(2*2) = -1
    assert float(mmd2_unbiased(gen, ref, "linear")) == pytest.approx(-1.0)
    with pytest.raises(SuiteError):
        mmd2_unbiased(gen[:1], ref, "linear")
    with pytest.raises(SuiteError):
        mmd_loo_credit(gen, ref, "linear")  # M = 2 < 3
    with pytest.raises(SuiteError, match="did you mean 'poly3'"):
        mmd2_unbiased(gen, ref, "poly")


def test_median_bandwidth_and_fixed_bandwidth_option() -> None:
    # squared distances of 0, 1, 3: 1, 9, 4 -> median 4 -> h = sqrt(4 / 2)
    assert median_bandwidth(torch.tensor([[0.0], [1.0], [3.0]])) == pytest.approx(math.sqrt(2.0))
    assert median_bandwidth(torch.zeros(4, 2)) == 1.0  # collapsed pool falls back to 1
    g = torch.Generator().manual_seed(2)
    gen, ref = torch.randn(5, 2, generator=g), torch.randn(4, 2, generator=g)
    fixed = diversity_reward(gen, ref, kernel="rbf", bandwidth=0.7)
    assert torch.allclose(fixed, mmd_loo_credit(gen, ref, partial(rbf_kernel, bandwidth=0.7)))
    with pytest.raises(SuiteError, match="bandwidth"):
        diversity_reward(gen, ref, kernel="poly3", bandwidth=0.7)


def test_diversity_reward_sign_minority_gets_credit() -> None:
    ref = balanced_reference(2, 8)  # half class 0, half class 1
    gen = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]], dtype=torch.float64)  # 5 majority, 1 minority
    credit = diversity_reward(gen, ref, kernel="poly3")
    assert credit[5] > 0 > credit[0]  # removing the minority image moves the set away from the reference
    full = -mmd2_unbiased(gen, ref, "poly3")
    without = -mmd2_unbiased(gen[:5], ref, "poly3")
    assert float(credit[5]) == pytest.approx(float(full - without))


@pytest.mark.parametrize("kernel", ["rbf", "poly3", "linear"])
def test_collapsed_group_gives_equal_credits(kernel: str) -> None:
    gen = torch.tensor([[0.9, 0.1]] * 8, dtype=torch.float64)
    credit = diversity_reward(gen, balanced_reference(2, 4, smoothing=0.1), kernel=kernel)
    assert float(credit.std()) < 1e-12
    balance = balance_reward(gen, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert float(balance.std()) < 1e-12
    assert torch.equal(
        group_zscore(credit, torch.zeros(8, dtype=torch.long)), torch.zeros(8, dtype=torch.float64)
    )


def test_references() -> None:
    ref = balanced_reference(3, 2, smoothing=0.3)
    assert ref.shape == (6, 3)
    assert torch.allclose(ref.sum(1), torch.ones(6, dtype=torch.float64))
    assert torch.allclose(ref[0], torch.tensor([0.8, 0.1, 0.1], dtype=torch.float64))
    # target 0.5/0.3/0.2 of n=7: quotas 3.5/2.1/1.4 -> floors 3/2/1 (6), one left to the largest remainder (0.5)
    counts = reference_from_target([0.5, 0.3, 0.2], 7).sum(0)
    assert counts.tolist() == [4.0, 2.0, 1.0]
    # unnormalised weights 1:1:1 of n=4: quotas 4/3 each, floors 1/1/1, tie broken to the lowest index
    assert reference_from_target([1, 1, 1], 4).sum(0).tolist() == [2.0, 1.0, 1.0]
    with pytest.raises(SuiteError):
        reference_from_target([0.0, 0.0], 4)


def test_balance_reward_hand_computed() -> None:
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # h = (2/3, 1/3). Removing image 0 (or 1): h = (1/2, 1/2); removing image 2: h = (1, 0).
    # entropy: H(G) = ln3 - (2/3) ln2 = 0.636514; H(1/2,1/2) = ln2 = 0.693147; H(1,0) = 0
    #   credits = 0.636514 - 0.693147 = -0.056633 (x2), 0.636514 - 0 = 0.636514
    ent = balance_reward(probs, torch.tensor([0.5, 0.5]), mode="entropy")
    assert ent.tolist() == pytest.approx([-0.056633, -0.056633, 0.636514], abs=1e-6)
    # kl to target (3/4, 1/4): KL(G) = 2/3 ln(8/9) + 1/3 ln(4/3) = -0.078522 + 0.095894 = 0.017372
    #   KL(1/2,1/2) = 1/2 ln(2/3) + 1/2 ln 2 = 0.143841; KL(1,0) = ln(4/3) = 0.287682
    #   credit = -KL(G) + KL(G\m): 0.126469 (x2), 0.270310
    kl = balance_reward(probs, torch.tensor([3.0, 1.0]), mode="kl")  # target normalised inside
    assert kl.tolist() == pytest.approx([0.126469, 0.126469, 0.270310], abs=1e-6)
    with pytest.raises(SuiteError, match="did you mean 'entropy'"):
        balance_reward(probs, torch.tensor([0.5, 0.5]), mode="entrpy")


def test_alignment_drift_and_the_registry() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    text = torch.tensor([2.0, 0.0])
    assert alignment_reward(img, text).tolist() == pytest.approx([1.0, 0.0, math.sqrt(0.5)], abs=1e-6)
    base = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    assert drift_penalty(img, base).tolist() == pytest.approx([0.0, 1.0, 2.0], abs=1e-6)
    assert drift_reward(img, base).tolist() == pytest.approx([0.0, -1.0, -2.0], abs=1e-6)


def test_confidence_reward_is_top_probability_min_over_attributes() -> None:
    tone = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.45, 0.45, 0.05, 0.05], [0.0, 0.0, 0.0, 1.0]])
    age = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    # per image: min(max tone, max age) = min(0.7, 0.9), min(0.45, 0.8), min(1.0, 0.6)
    assert confidence_reward([tone, age]).tolist() == pytest.approx([0.7, 0.45, 0.6], abs=1e-7)
    assert confidence_reward([tone]).tolist() == pytest.approx([0.7, 0.45, 1.0], abs=1e-7)
    with pytest.raises(SuiteError, match="confidence_reward"):
        confidence_reward([tone, age[:2]])


def test_hard_labels_and_their_diversity_credit() -> None:
    probs = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.55, 0.45, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.8, 0.1, 0.0],
                          [0.5, 0.5, 0.0, 0.0]])
    # argmax one-hot; the all-zero row (no measurement) stays zero; the tie goes to the lower index
    assert hard_labels(probs).tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]
    # group L, L, L(painted between light and medium: read as light), M against one reference point per class,
    # linear kernel. S_m (sum of k to the other members) = 2, 2, 2, 0; T_m (sum of k to the reference) = 1;
    # MMD^2_u(G) = 6/12 - 2*4/16 = 0; without m: (6 - 2 S_m)/6 - 2*3/12 = -1/6 (light), 1/2 (medium).
    group = hard_labels(torch.tensor([[1.0, 0, 0, 0], [0.97, 0.03, 0, 0], [0.55, 0.45, 0, 0], [0.1, 0.9, 0, 0]]))
    credit = diversity_reward(group.double(), balanced_reference(4, 1), kernel="linear")
    assert credit.tolist() == pytest.approx([-1 / 6, -1 / 6, -1 / 6, 0.5], abs=1e-12)
    with pytest.raises(SuiteError, match="hard_labels"):
        hard_labels(torch.ones(4))


# ------------------------------------------------------------------------------------- reward registry


def test_the_registry_declares_each_reward_once() -> None:
    # the names a config may give, their options (first = default) and whether they need base images
    assert {name: (dict(spec.options), spec.needs_base_images) for name, spec in REWARDS.items()} == {
        "diversity": ({"kernel": ("rbf", "poly3", "linear"), "features": ("probs", "labels"),
                       "reference": ("uniform", "target")}, False),
        "balance": ({"mode": ("kl", "entropy"), "reference": ("uniform", "target")}, False),
        "alignment": ({}, False),
        "drift": ({"features": ("embedding",)}, True),
        "confidence": ({}, False),
        "quota": ({"baseline": ("slot", "group"), "reference": ("uniform", "target")}, False),
    }
    assert reward_spec("diversity").defaults == {"kernel": "rbf", "features": "probs", "reference": "uniform"}
    with pytest.raises(SuiteError, match=r"unknown reward 'diversty' \(did you mean 'diversity'\?\); allowed: "):
        reward_spec("diversty")


def test_min_cost_assignment_is_the_cheapest_permutation() -> None:
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 7):
        for _ in range(10):
            cost = torch.rand(n, n, generator=gen, dtype=torch.float64)
            column = min_cost_assignment(cost)
            assert sorted(column.tolist()) == list(range(n))
            best = min(sum(float(cost[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(n)))
            assert float(cost[torch.arange(n), column].sum()) == pytest.approx(best, abs=1e-12)
    with pytest.raises(SuiteError, match="square"):
        min_cost_assignment(torch.zeros(2, 3))


def test_quota_counts_split_n_by_largest_remainder() -> None:
    assert quota_counts([1, 1, 1, 1], 6) == [2, 2, 1, 1]
    assert quota_counts([0.5, 0.3, 0.2], 7) == [4, 2, 1]  # 3.5, 2.1, 1.4 -> 3, 2, 1 + the largest remainder
    assert quota_counts([1, 1], 0) == [0, 0]


def test_quota_reward_at_balance_pays_a_clean_face_over_an_ambiguous_one() -> None:
    uniform = torch.full((4,), 0.25, dtype=torch.float64)
    clean = [0.97, 0.01, 0.01, 0.01]
    probs = torch.tensor([clean, clean, clean[1:2] + clean[:1] + clean[2:], [0.01, 0.97, 0.01, 0.01],
                          [0.01, 0.01, 0.97, 0.01], [0.01, 0.01, 0.97, 0.01], [0.01, 0.01, 0.01, 0.97],
                          [0.01, 0.01, 0.49, 0.49]], dtype=torch.float64)  # the last: between tan and dark
    for baseline in ("slot", "group"):
        r = quota_reward(probs, uniform, baseline)
        assert r[7] < r[6] and r[7] == r.min(), baseline  # the ambiguous face, matched to dark, earns least
    # hand-computed: quotas (2, 2, 2, 2); the ambiguous face goes to dark with the clean dark one, so the
    # dark slot holds log 0.97 = -0.030459 and log 0.49 = -0.713350, centred: +-0.341445
    slot = quota_reward(probs, uniform, "slot")
    assert slot.tolist() == pytest.approx([0, 0, 0, 0, 0, 0, 0.341445, -0.341445], abs=1e-6)
    group = quota_reward(probs, uniform, "group")
    assert group.tolist() == pytest.approx([math.log(0.97)] * 7 + [math.log(0.49)], abs=1e-12)


def test_quota_reward_in_a_collapsed_group_still_ranks_the_images() -> None:
    # eight faces all read as light; each gives a little more probability to the other tones than the last
    eps = [1e-5, 1e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]  # from the third, each twice the last
    probs = torch.tensor([[1 - 3 * e, e, e, e] for e in eps], dtype=torch.float64)
    r = quota_reward(probs, torch.full((4,), 0.25, dtype=torch.float64), "slot")
    # the quota (2, 2, 2, 2) keeps the two clearest light faces light, the clearer earning more (hard labels
    # would give every image the same credit); the other six go two by two to medium, tan and dark, where
    # each earns log(its eps) minus its slot's mean: the one with more probability there earns more
    assert r[0] > 0 > r[1] and r[0].item() == pytest.approx((math.log(1 - 3e-5) - math.log(1 - 3e-4)) / 2)
    assert sorted(r[2:].tolist()) == pytest.approx([-math.log(2) / 2] * 3 + [math.log(2) / 2] * 3)  # eps ratios 2
    assert r[2] < 0 < r[7] and r.sum().item() == pytest.approx(0.0, abs=1e-12)
    # unread images (rows of zeros) get the group's lowest value
    with_unread = torch.cat([probs, torch.zeros(1, 4, dtype=torch.float64)])
    r2 = quota_reward(with_unread, torch.full((4,), 0.25, dtype=torch.float64), "slot")
    assert r2[-1] == r2[:-1].min()
    with pytest.raises(SuiteError, match="unknown baseline 'slots'"):
        quota_reward(probs, torch.full((4,), 0.25, dtype=torch.float64), "slots")


def _spec(name: str, classes: int, target: tuple[float, ...]) -> AttributeSpec:
    names = tuple(f"{name}{k}" for k in range(classes))
    return AttributeSpec(name=name, classes=names, descriptions=names, target=target)


def _group(probs: list[torch.Tensor], attributes: list[AttributeSpec], *, image_emb: torch.Tensor | None = None,
           base_emb: torch.Tensor | None = None) -> GroupInputs:
    m = probs[0].shape[0]
    return GroupInputs(probs=tuple(p.double() for p in probs), attributes=tuple(attributes),
                       image_emb=torch.ones(m, 2) if image_emb is None else image_emb,
                       text_emb=torch.tensor([1.0, 0.0]), base_emb=base_emb,
                       confidence=confidence_reward([p.double() for p in probs]))


def test_the_registered_rewards_on_a_hand_built_group() -> None:
    tone, age = _spec("tone", 2, (0.75, 0.25)), _spec("age", 2, (0.5, 0.5))
    probs = [torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])]
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    group = _group(probs, [tone, age], image_emb=img, base_emb=torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]]))
    # balance, entropy: tone as in test_balance_reward_hand_computed (-0.056633 x2, 0.636514); age: h = (8/15,
    # 7/15), H = 0.690923; without image 0: h = (0.35, 0.65), H = 0.647447 -> credit 0.043477; without
    # image 1: h = (0.7, 0.3), H = 0.610864 -> 0.080059; without image 2: h = (0.55, 0.45), H = 0.688139 -> 0.002784
    entropy = REWARDS["balance"].credits(group, {"mode": "entropy"})
    assert entropy.dtype == torch.float64
    assert entropy.tolist() == pytest.approx([-0.013156, 0.023426, 0.639298], abs=1e-6)
    # the confidence: min over the two attributes of the top probability, per image
    assert REWARDS["confidence"].credits(group).tolist() == pytest.approx([0.9, 0.8, 0.5])
    # alignment: cosine to the prompt's embedding (1, 0); drift: minus (1 - cos) to the base image
    assert REWARDS["alignment"].credits(group).tolist() == pytest.approx([1.0, 0.0, math.sqrt(0.5)], abs=1e-6)
    assert REWARDS["drift"].credits(group).tolist() == pytest.approx([0.0, -1.0, -2.0], abs=1e-6)
    # diversity: the probabilities of both attributes against the joint reference, as diversity_reward
    ref = joint_reference([tone, age], "uniform", 16 * 2)
    expected = diversity_reward(torch.cat(probs, 1).double(), ref, kernel="linear")
    assert torch.equal(REWARDS["diversity"].credits(group, {"kernel": "linear"}), expected)
    with pytest.raises(SuiteError, match="reward 'diversity': unknown option 'kernal' \\(did you mean 'kernel'"):
        REWARDS["diversity"].credits(group, {"kernal": "rbf"})
    with pytest.raises(SuiteError, match="option kernel='poly' is not allowed \\(did you mean 'poly3'"):
        REWARDS["diversity"].credits(group, {"kernel": "poly"})
    with pytest.raises(SuiteError, match="reward 'drift' needs the base model's images"):
        REWARDS["drift"].credits(_group(probs, [tone, age]))


def test_joint_reference_draws_the_product_of_the_targets() -> None:
    tone, age = _spec("tone", 2, (0.75, 0.25)), _spec("age", 2, (0.5, 0.5))
    assert target_shares(tone, "target").tolist() == [0.75, 0.25]
    assert target_shares(tone, "uniform").tolist() == [0.5, 0.5]
    # joint target (tone0 age0, tone0 age1, tone1 age0, tone1 age1) = (0.375, 0.375, 0.125, 0.125) of 8 points:
    # 3, 3, 1, 1; each point is the one-hot tone followed by the one-hot age
    ref = joint_reference([tone, age], "target", 8)
    assert ref.shape == (8, 4) and ref.dtype == torch.float64
    assert sorted(map(tuple, ref.tolist())) == sorted([(1.0, 0.0, 1.0, 0.0)] * 3 + [(1.0, 0.0, 0.0, 1.0)] * 3
                                                      + [(0.0, 1.0, 1.0, 0.0), (0.0, 1.0, 0.0, 1.0)])
    with pytest.raises(SuiteError, match="did you mean 'target'"):
        target_shares(tone, "targt")


def test_registering_a_reward_declares_its_name_options_and_function() -> None:
    @register_reward("probe_rank", order=("first", "last"))
    def probe_rank(group: GroupInputs, *, order: str) -> torch.Tensor:
        ranks = torch.arange(group.size, dtype=torch.float64)
        return ranks if order == "first" else -ranks

    try:
        spec = REWARDS["probe_rank"]
        assert (spec.name, dict(spec.options), spec.defaults, spec.fn) == (
            "probe_rank", {"order": ("first", "last")}, {"order": "first"}, probe_rank)
        group = _group([torch.eye(3)], [_spec("tone", 3, (1 / 3,) * 3)])
        assert spec.credits(group).tolist() == [0.0, 1.0, 2.0]
        assert spec.credits(group, {"order": "last"}).tolist() == [0.0, -1.0, -2.0]
        register_reward("probe_rank", order=("first", "last"))(probe_rank)  # the same function again: replaced
        with pytest.raises(ValueError, match="already registered"):
            register_reward("probe_rank")(lambda group: group.confidence)
    finally:
        unregister_reward("probe_rank")
    assert "probe_rank" not in REWARDS
    for bad in ({"weight": ("a",)}, {"order": ()}, {"order": ("a", "a")}, {"order": (1,)}):
        with pytest.raises(ValueError, match="register_reward"):
            register_reward("probe_bad", **bad)  # type: ignore[arg-type]
    assert "probe_bad" not in REWARDS
    register_reward("probe_shape")(lambda group: torch.zeros(group.size + 1))
    try:
        with pytest.raises(SuiteError, match=r"reward 'probe_shape' returned \(4,\) for a group of 3 images"):
            REWARDS["probe_shape"].credits(_group([torch.eye(3)], [_spec("tone", 3, (1 / 3,) * 3)]))
    finally:
        unregister_reward("probe_shape")


def test_the_trainer_credits_each_group_with_the_registered_function(monkeypatch: pytest.MonkeyPatch) -> None:
    import evalsuite.models
    import rl.config
    import rl.config_checks
    from evalsuite.battery import load_battery
    from evalsuite.classifiers import AttributeOutput
    from rl.train import Batch, compute_rewards

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the config names its battery relatively; the miniature world need not be built
    check = evalsuite.models.check_model_source
    monkeypatch.setattr(rl.config_checks, "check_model_source",
                        lambda model: None if model == "miniature" else check(model))
    seen: list[tuple[GroupInputs, str]] = []

    @register_reward("probe_first_class", power=("one", "two"))
    def probe(group: GroupInputs, *, power: str) -> torch.Tensor:
        seen.append((group, power))
        first = group.probs[0][:, 0]
        return first if power == "one" else first**2

    class Reader:  # the reward classifier: fixed probabilities for 6 images, 2 groups of 3
        name = "reader"

        def check(self, attributes: object) -> list[str]:
            return []

        def classify(self, images: np.ndarray, attributes: list[AttributeSpec]) -> dict[str, AttributeOutput]:
            probs = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0, 0],
                              [0.9, 0.1, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
            return {a.name: AttributeOutput(probs, ("ok",) * 6) for a in attributes}

    class Embedder:
        name = "embedder"

        def embed_images(self, images: np.ndarray) -> np.ndarray:
            return np.ones((len(images), 2), dtype=np.float32)

        def embed_texts(self, texts: list[str]) -> np.ndarray:
            return np.ones((len(texts), 2), dtype=np.float32)

    try:
        cfg = rl.config.load_config(root / "rl" / "configs" / "miniature.yaml",
                                    ["rewards=[{name: probe_first_class, weight: 2}]", "validity_threshold=0.8"])
        attrs = [load_battery(cfg.battery).attribute("skin_tone")]
        batch = Batch(prompts=["a doctor"] * 3 + ["a nurse"] * 3, group=torch.tensor([0, 0, 0, 1, 1, 1]),
                      scales=torch.full((6,), 3.0), latents=torch.zeros(6, 3, 1), log_probs=torch.zeros(6, 2),
                      timesteps=torch.tensor([500, 0]), images=np.zeros((6, 4, 4, 3), dtype=np.uint8),
                      base_images=None)
        text_emb = {"a doctor": torch.tensor([1.0, 0.0]), "a nurse": torch.tensor([0.0, 1.0])}
        rewards = compute_rewards(cfg, batch, Reader(), Embedder(), attrs, text_emb)
        calls = len(seen)

        class Detector:  # the battery's face detector: no face in image 4
            name = "detector"

            def detect(self, images: np.ndarray) -> list[np.ndarray]:
                return [np.zeros((0, 5)) if i == 4 else np.array([[0.0, 0.0, 4.0, 4.0, 1.0]])
                        for i in range(len(images))]

        detected = compute_rewards(cfg, batch, Reader(), Embedder(), attrs, text_emb, Detector())
    finally:
        unregister_reward("probe_first_class")
    # with a detector, the faceless image reads no_person (probabilities 0): invalid, its group's lowest - 1
    assert detected.outputs["skin_tone"].status[4] == "no_person"
    assert detected.valid.tolist() == [True, True, False, True, False, True]
    assert detected.total[4].item() == pytest.approx(min(detected.total[3].item(), detected.total[5].item()) - 1)
    # one call per group, with that group's rows, prompt embedding and confidence, and the default option
    assert [power for _, power in seen[:calls]] == ["one", "one"]
    assert seen[0][0].probs[0].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0, 0]]
    assert [g.text_emb.tolist() for g, _ in seen[:calls]] == [[1.0, 0.0], [0.0, 1.0]]
    assert seen[1][0].confidence.tolist() == [0.9, 0.9, 1.0] and seen[0][0].base_emb is None
    # the raw credits are the function's values: P(class 0) of each image
    assert rewards.parts["probe_first_class"].tolist() == [1.0, 0.0, 0.5, 0.9, 0.9, 0.0]
    # centred within the groups: 0.5, -0.5, 0 and 0.3, 0.3, -0.6; pooled spread s = sqrt(1.04 / 6) = 0.416333;
    # times the weight 2: 2.401922, -2.401922, 0, 1.441153, 1.441153, -2.882307. Image 2 (confidence 0.5 <
    # 0.8) is invalid: its group's lowest total minus 1 = -3.401922
    assert rewards.valid.tolist() == [True, True, False, True, True, True]
    assert rewards.total.tolist() == pytest.approx([2.401922, -2.401922, -3.401922, 1.441153, 1.441153, -2.882307],
                                                   abs=1e-5)


# ----------------------------------------------------------------------------------------- advantages


def test_stat_tracker_ddpo_rule_and_resume() -> None:
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    adv = tracker.update(["a", "a", "b"], np.array([1.0, 3.0, 5.0]))
    # buffers a:[1,3] (2 < 3), b:[5] -> batch stats mean 3, std sqrt(8/3) = 1.632993
    assert adv.tolist() == pytest.approx([-2 / (1.632993 + 1e-6), 0.0, 2 / (1.632993 + 1e-6)], rel=1e-6)
    adv = tracker.update(["a", "b"], np.array([5.0, 7.0]))
    # a: buffer [1,3,5] -> mean 3, std sqrt(8/3); b: [5,7] < 3 -> batch mean 6, std 1
    assert adv.tolist() == pytest.approx([2 / (1.632993 + 1e-6), 1 / (1.0 + 1e-6)], rel=1e-6)
    state = json.loads(json.dumps(tracker.state_dict()))
    resumed = PerPromptStatTracker(buffer_size=1, min_count=1)
    resumed.load_state_dict(state)
    batch = (["a", "a", "b"], np.array([9.0, 11.0, 0.0]))
    # a: deque maxlen 4 drops the oldest: [3,5,9,11]
    assert np.array_equal(resumed.update(*batch), tracker.update(*batch))
    assert tracker.state_dict()["buffers"]["a"] == [3.0, 5.0, 9.0, 11.0]
    with pytest.raises(SuiteError):
        PerPromptStatTracker(buffer_size=2, min_count=3)


def test_group_zscore() -> None:
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 10.0])
    z = group_zscore(rewards, torch.tensor([0, 0, 1, 1, 2]))
    # group 0: mean 2, population std 1 -> -1, 1; group 1 and the singleton group 2: std 0 -> 0
    assert z.tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0, 0.0])


def test_pooled_group_scores_hand_computed() -> None:
    # group 0 deviates by -1, +1; group 1 is nearly collapsed (deviations -1e-6, +1e-6);
    # pooled std = sqrt((1 + 1 + 1e-12 + 1e-12) / 4) = sqrt(0.5) to 12 digits
    rewards = torch.tensor([1.0, 3.0, 5.0 - 1e-6, 5.0 + 1e-6], dtype=torch.float64)
    scores = pooled_group_scores(rewards, torch.tensor([0, 0, 1, 1]))
    s = math.sqrt(0.5)
    assert scores.tolist() == pytest.approx([-1 / s, 1 / s, -1e-6 / s, 1e-6 / s], abs=1e-11)
    # per-group z-scores blow the tiny deviations up to -1, +1
    assert group_zscore(rewards, torch.tensor([0, 0, 1, 1]))[2:].tolist() == pytest.approx([-1.0, 1.0])
    assert torch.equal(pooled_group_scores(torch.full((4,), 2.0), torch.tensor([0, 0, 1, 1])), torch.zeros(4))


def test_clipped_surrogate_hand_computed() -> None:
    log_prob = torch.tensor([0.0, 0.2, -0.2, 0.05], requires_grad=True)
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, 10.0])  # the last is clipped to 5
    loss, diag = clipped_surrogate(log_prob, old, adv, clip_range=0.1, adv_clip=5.0)
    # rho = 1, e^0.2 = 1.221403, e^-0.2 = 0.818731, e^0.05 = 1.051271
    # per sample max(-A rho, -A clip(rho, 0.9, 1.1)): -1, max(-1.221403, -1.1) = -1.1,
    #   max(0.818731, 0.9) = 0.9, -5 * 1.051271 = -5.256355 -> mean = -6.456355 / 4 = -1.614089
    assert float(loss.detach()) == pytest.approx(-1.614089, abs=1e-6)
    assert float(diag["approx_kl"]) == pytest.approx(0.5 * (0.04 + 0.04 + 0.0025) / 4)  # 0.0103125
    assert float(diag["clipfrac"]) == pytest.approx(0.5)
    loss.backward()
    assert log_prob.grad is not None
    # clipped samples (1, 2) get no gradient; d/dlogp of -A rho / 4 = -A rho / 4 otherwise
    expected = [-0.25, 0.0, 0.0, -5 * math.exp(0.05) / 4]
    assert log_prob.grad.tolist() == pytest.approx(expected, abs=1e-6)


def test_guided_eps_fixed_shape_gives_the_same_prediction(tmp_path: Path) -> None:
    """A compiled UNet runs the unconditional pass for every sample (one batch shape); samples at
    scale 1 drop it, so the guided prediction is the one of the variable-shape call."""
    from tiny_pipeline import tiny_sd_pipeline

    from rl.sampling import guided_eps

    unet = tiny_sd_pipeline(tmp_path).unet
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(3, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    t, scales = torch.tensor([900, 500, 20]), torch.tensor([1.0, 7.5, 3.0])
    with torch.no_grad():
        variable = guided_eps(unet, x, t, cond, uncond, scales)
        fixed = guided_eps(unet, x, t, cond, uncond, scales, fixed_shape=True)
        plain_c = unet(x[:1], t[:1], encoder_hidden_states=cond[:1]).sample
        u = unet(x[1:2], t[1:2], encoder_hidden_states=uncond).sample
        c = unet(x[1:2], t[1:2], encoder_hidden_states=cond[1:2]).sample
    assert torch.allclose(fixed, variable, atol=1e-5)
    assert torch.allclose(variable[0], plain_c[0], atol=1e-5)  # scale 1: the conditional prediction
    assert torch.allclose(variable[1], (u + 7.5 * (c - u))[0], atol=1e-4)


def test_attention_order_only_reorders_kernels() -> None:
    """A kernel that cannot run the call (cuDNN on CPU tensors) falls through: results are unchanged."""
    import torch.nn.functional as F

    from evalsuite.errors import SuiteError
    from evalsuite.models import attention_order

    q, k, v = torch.randn(3, 2, 2, 16, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    ref = F.scaled_dot_product_attention(q, k, v)
    for device in ("cpu", "cuda"):
        with attention_order(device, ("CUDNN_ATTENTION", "FLASH_ATTENTION")):
            assert torch.allclose(F.scaled_dot_product_attention(q, k, v), ref, atol=1e-6)
    with pytest.raises(SuiteError, match="did you mean 'CUDNN_ATTENTION'"):
        with attention_order("cuda", ("CUDNN_ATENTION",)):
            pass
