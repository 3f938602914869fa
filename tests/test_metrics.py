"""Metrics against hand-computed values (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evalsuite.errors import SuiteError
from evalsuite.metrics import (
    METRICS,
    class_shares,
    clip_score,
    cluster_share_interval,
    confusion_matrix,
    confusion_problems,
    corrected_shares,
    cosine_gram,
    dominant_share,
    get_metric,
    joint_labels,
    kl_divergence,
    kl_to_uniform,
    mad,
    mean_pairwise_cosine,
    metric_bounds,
    near_duplicate_pairs,
    near_duplicate_rate,
    normalized_entropy,
    on_prompt_rate,
    paired_difference_interval,
    register_metric,
    share_intervals,
    shen_gap,
    vendi_score,
    wilson_interval,
)

P4 = np.array([0.7, 0.1, 0.1, 0.1])


# ---------------------------------------------------------------- distribution


def test_mad_hand_value() -> None:
    # |0.7-0.25| = 0.45, |0.1-0.25| = 0.15 three times -> (0.45 + 0.45) / 4 = 0.225
    assert mad(P4) == pytest.approx(0.225)
    assert mad([0.25] * 4) == pytest.approx(0.0)


def test_shen_gap_hand_value() -> None:
    # ordered pairs with index 0: 6 of them, each |0.7-0.1| = 0.6 -> 3.6; the others are 0.
    # K(K-1) = 12 ordered pairs -> 3.6 / 12 = 0.3
    assert shen_gap(P4) == pytest.approx(0.3)
    # K = 2: |0.8 - 0.2| = 0.6 = 2 * MAD (MAD = (0.3 + 0.3) / 2 = 0.3)
    assert shen_gap([0.8, 0.2]) == pytest.approx(0.6)
    assert shen_gap([0.8, 0.2]) == pytest.approx(2 * mad([0.8, 0.2]))
    # one-hot over K = 4: 6 ordered pairs with gap 1 / 12 = 0.5 = 2/K
    assert shen_gap([1.0, 0, 0, 0]) == pytest.approx(0.5)
    assert shen_gap([1.0]) == 0.0


def test_entropy_kl_hand_values() -> None:
    # H = -(0.7 ln 0.7 + 3 * 0.1 ln 0.1) = 0.7*0.356675 + 0.3*2.302585 = 0.249672 + 0.690776 = 0.940448
    h = 0.940448
    # KL to uniform = ln 4 - H = 1.386294 - 0.940448 = 0.445846
    assert kl_to_uniform(P4) == pytest.approx(0.445846, abs=1e-6)
    assert kl_divergence(P4, [0.25] * 4) == pytest.approx(0.445846, abs=1e-6)
    # normalised entropy = 0.940448 / 1.386294 = 0.678390
    assert normalized_entropy(P4) == pytest.approx(h / 1.386294, abs=1e-6)
    assert normalized_entropy(P4) == pytest.approx(0.678390, abs=1e-6)
    assert normalized_entropy([0.5, 0.5]) == pytest.approx(1.0)
    assert normalized_entropy([1.0, 0.0]) == pytest.approx(0.0)
    assert kl_to_uniform([1.0, 0.0]) == pytest.approx(math.log(2))
    assert dominant_share(P4) == pytest.approx(0.7)


def test_kl_divergence_conventions() -> None:
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 (0.693147 - 0.405465) = 0.143841
    assert kl_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.143841, abs=1e-6)
    # 0 log 0 = 0: KL([1,0] || [0.5,0.5]) = 1 * ln 2
    assert kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))
    # q = 0 where p > 0 -> inf; q = 0 where p = 0 is fine
    assert kl_divergence([0.5, 0.5], [1.0, 0.0]) == math.inf
    assert kl_divergence([1.0, 0.0], [1.0, 0.0]) == 0.0


def test_nan_shares_give_nan_everywhere() -> None:
    p = np.array([np.nan, np.nan])
    for fn in (mad, shen_gap, kl_to_uniform, normalized_entropy, dominant_share):
        assert math.isnan(fn(p)), fn.__name__
    assert math.isnan(kl_divergence(p, [0.5, 0.5]))


def test_class_shares_excludes_unmeasured() -> None:
    # valid labels 0,1,1,2,1 (the -1 is excluded): counts [1,3,1] / 5
    np.testing.assert_allclose(class_shares(np.array([0, 1, 1, -1, 2, 1]), 3), [0.2, 0.6, 0.2])
    assert np.isnan(class_shares(np.array([-1, -1]), 2)).all()
    assert np.isnan(class_shares(np.array([], dtype=int), 3)).all()
    assert class_shares(np.array([], dtype=int), 3).shape == (3,)
    with pytest.raises(ValueError):
        class_shares(np.array([0, 3]), 3)


def test_joint_labels_mixed_radix() -> None:
    # gender in {0,1} (radix 2), race in {0..3} (radix 4): joint = g*4 + r
    # (0,2)->2, (1,0)->4, (1,3)->7, (-1,1)->-1
    joint, k = joint_labels([np.array([0, 1, 1, -1]), np.array([2, 0, 3, 1])], [2, 4])
    assert k == 8
    assert joint.tolist() == [2, 4, 7, -1]


# ---------------------------------------------------------------- intervals


def test_wilson_8_of_10() -> None:
    # p=0.8, z^2=3.8416, z^2/n=0.38416, denom=1.38416
    # centre = (0.8 + 0.19208)/1.38416 = 0.716738
    # half = 1.96/1.38416 * sqrt(0.016 + 3.8416/400) = 1.416021 * sqrt(0.025604) = 0.226581
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.716738 - 0.226581, abs=1e-5)  # 0.490157
    assert hi == pytest.approx(0.716738 + 0.226581, abs=1e-5)  # 0.943319
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    lo0, hi0 = wilson_interval(0, 10)
    assert lo0 == 0.0 and 0.0 < hi0 < 0.35
    # the ends are exact at any n (the centre-minus-half formula leaves rounding dust like 4e-19 at n = 527)
    assert all(wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0 for n in (1, 7, 527, 10**6))


def test_share_intervals() -> None:
    labels = np.array([0] * 8 + [1] * 2 + [-1] * 5)  # 8/10 and 2/10; the -1 are excluded
    out = share_intervals(labels, 2)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out[0], [0.8, 0.490157, 0.943319], atol=1e-5)
    # 2/10 is the mirror image: (1 - 0.943319, 1 - 0.490157)
    np.testing.assert_allclose(out[1], [0.2, 0.056681, 0.509843], atol=1e-5)
    assert np.isnan(share_intervals(np.array([-1]), 2)).all()


def test_cluster_share_interval_hand_example() -> None:
    # counts [2,5,3] of totals [4,5,6]: p = 10/15 = 2/3
    # residuals c - p n: 2-8/3 = -2/3, 5-10/3 = 5/3, 3-4 = -1 -> squares 4/9 + 25/9 + 9/9 = 38/9
    # var = 3/2 * 38/9 / 15^2 = 19/675 = 0.0281481, se = 0.167774, 1.96*se = 0.328837
    est, lo, hi = cluster_share_interval(np.array([2, 5, 3]), np.array([4, 5, 6]))
    assert est == pytest.approx(2 / 3)
    assert lo == pytest.approx(0.337830, abs=1e-5)
    assert hi == pytest.approx(0.995504, abs=1e-5)
    # an empty cluster changes nothing (dropped before counting G)
    assert cluster_share_interval([2, 5, 3, 0], [4, 5, 6, 0]) == pytest.approx((est, lo, hi))


def test_cluster_share_interval_fallbacks() -> None:
    # G = 1 -> Wilson on the pooled counts
    est, lo, hi = cluster_share_interval([8], [10])
    assert (est, lo, hi) == pytest.approx((0.8, *wilson_interval(8, 10)))
    # identical shares in every cluster -> zero sandwich variance -> pooled Wilson (0/20)
    est, lo, hi = cluster_share_interval([0, 0], [10, 10])
    assert (est, lo, hi) == pytest.approx((0.0, *wilson_interval(0, 20)))
    assert hi > 0
    assert all(math.isnan(v) for v in cluster_share_interval([0, 0], [0, 0]))
    # clipped to [0, 1]: counts [0, 10] of [10, 10] -> p=0.5, var = 2 * (25+25)/400 = 0.25, se = 0.5
    est, lo, hi = cluster_share_interval([0, 10], [10, 10])
    assert (est, lo, hi) == pytest.approx((0.5, 0.0, 1.0))


def test_cluster_share_interval_equal_shares_up_to_rounding() -> None:
    # counts [1, 1] of [49, 49]: p = 2/98 and p*49 = 0.9999999999999999 in floating point, so the residuals
    # are ~1e-16, not 0; they are within 1e-9 * n_g, so this is the "every cluster has the same share"
    # fallback: Wilson on 2/98. z²/n = 3.8416/98 = 0.0392, centre = (0.020408 + 0.0196)/1.0392 = 0.038499,
    # half = 1.96/1.0392 * sqrt(0.020408*0.979592/98 + 3.8416/38416) = 1.886066 * 0.0174355 = 0.032885
    est, lo, hi = cluster_share_interval([1, 1], [49, 49])
    assert est == pytest.approx(2 / 98)
    assert (lo, hi) == pytest.approx((0.005614, 0.071384), abs=1e-6)
    assert (lo, hi) == wilson_interval(2, 98)


def test_paired_difference_interval_agresti_min() -> None:
    # n10 = 2, n01 = 0 of n = 10: estimate 0.2. Adjusted: m = 12, p10 = 2.5/12, p01 = 0.5/12, d = 2/12,
    # var = (3/12 - (2/12)^2)/12 = 0.0185185, half = 1.96 * 0.136083 = 0.266722
    est, lo, hi = paired_difference_interval(2, 0, 10)
    assert est == pytest.approx(0.2)
    assert (lo, hi) == pytest.approx((2 / 12 - 0.266722, 2 / 12 + 0.266722), abs=1e-6)  # (-0.100056, 0.433389)
    # no pair changed: not a point at 0 but ±1.96 * sqrt((1/12)/12) = ±0.163333
    assert paired_difference_interval(0, 0, 10) == pytest.approx((0.0, -0.163333, 0.163333), abs=1e-6)
    assert all(math.isnan(v) for v in paired_difference_interval(0, 0, 0))
    with pytest.raises(ValueError):
        paired_difference_interval(6, 5, 10)


# ---------------------------------------------------------------- correction


def test_confusion_matrix_rows() -> None:
    # true 0: preds 0,0,0,1 -> [3/4, 1/4]; true 1: preds 1,0 -> [1/2, 1/2]; the (-1, 0) pair is skipped
    c = confusion_matrix(np.array([0, 0, 0, 0, 1, 1, -1]), np.array([0, 0, 0, 1, 1, 0, 0]), 3)
    np.testing.assert_allclose(c[:2, :2], [[0.75, 0.25], [0.5, 0.5]])
    np.testing.assert_allclose(c[:2, 2], [0.0, 0.0])
    assert np.isnan(c[2]).all()  # no true-class-2 samples


def test_confusion_problems() -> None:
    classes = ("dark", "light")
    assert confusion_problems([[0.8, 0.2], [0.1, 0.9]], classes) == []
    assert confusion_problems([[np.nan, np.nan], [0.1, 0.9]], classes) == []  # a class without validation images
    # 6-decimal rounding (the miniature world's confusion.json) is within the 1e-5 tolerance: 4 * 5e-7 = 2e-6
    assert confusion_problems(np.array([[0.2500005] * 4] * 4), ("a", "b", "c", "d")) == []
    # column-normalised by mistake: rows sum to 0.9 and 1.1
    problems = confusion_problems([[0.8, 0.1], [0.2, 0.9]], classes)
    assert len(problems) == 2 and problems[0].startswith("row 'dark' (0.8, 0.1) sums to 0.9;")
    assert "row 'light' (0.2, 0.9) sums to 1.1;" in problems[1]
    assert confusion_problems([[1.2, -0.2], [0.0, 1.0]], classes)[0].startswith("row 'dark' (1.2, -0.2) sums to 1;")
    assert confusion_problems(np.eye(3), classes) == ["must be 2x2 (classes dark, light), got shape (3, 3)"]


def test_corrected_shares_exact_recovery() -> None:
    # p_hat = C^T p: [0.9*0.3 + 0.2*0.7, 0.1*0.3 + 0.8*0.7] = [0.41, 0.59]
    c2 = np.array([[0.9, 0.1], [0.2, 0.8]])
    np.testing.assert_allclose(corrected_shares([0.41, 0.59], c2), [0.3, 0.7], atol=1e-12)
    # 3 classes, p = [0.5, 0.3, 0.2]:
    # col 0: 0.8*0.5 + 0.1*0.3 + 0.0*0.2 = 0.43; col 1: 0.05 + 0.21 + 0.02 = 0.28;
    # col 2: 0.05 + 0.06 + 0.18 = 0.29
    c3 = np.array([[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.0, 0.1, 0.9]])
    np.testing.assert_allclose(corrected_shares([0.43, 0.28, 0.29], c3), [0.5, 0.3, 0.2], atol=1e-12)


def test_corrected_shares_outside_reachable_set() -> None:
    # C = [[0.8,0.2],[0.2,0.8]], p_hat = [0.9, 0.1]. With p = (t, 1-t): C^T p = (0.2+0.6t, 0.8-0.6t),
    # residual (0.6t-0.7, 0.7-0.6t) is minimised at t = 7/6 > 1, so the simplex optimum is t = 1.
    c = np.array([[0.8, 0.2], [0.2, 0.8]])
    np.testing.assert_allclose(corrected_shares([0.9, 0.1], c), [1.0, 0.0], atol=1e-9)
    # 3 classes, infeasible p_hat: compare the objective with a brute-force grid over the simplex
    c3 = np.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6]])
    b = np.array([0.75, 0.05, 0.20])
    x = corrected_shares(b, c3)
    assert x.min() >= 0 and x.sum() == pytest.approx(1.0)
    g = np.linspace(0, 1, 401)
    p0, p1 = np.meshgrid(g, g)
    ok = p0 + p1 <= 1
    grid = np.stack([p0[ok], p1[ok], 1 - p0[ok] - p1[ok]], axis=1)
    best = np.min(np.sum((grid @ c3 - b) ** 2, axis=1))
    assert np.sum((c3.T @ x - b) ** 2) <= best + 1e-12
    assert np.isnan(corrected_shares([0.5, 0.5], np.array([[1.0, 0.0], [np.nan, np.nan]]))).all()
    assert np.isnan(corrected_shares([np.nan, np.nan], c)).all()


# ---------------------------------------------------------------- diversity


def test_vendi_identical_and_orthogonal() -> None:
    assert vendi_score(np.tile([[1.0, 2.0, 3.0]], (5, 1))) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(np.eye(4) * 3.0) == pytest.approx(4.0)
    assert vendi_score(np.eye(4), q=math.inf) == pytest.approx(4.0)
    assert vendi_score(np.eye(4), q=2.0) == pytest.approx(4.0)
    assert math.isnan(vendi_score(np.zeros((0, 3))))
    assert vendi_score(np.array([[0.3, 0.4]])) == 1.0


def test_vendi_orders_hand_example() -> None:
    # two identical vectors + one orthogonal: K/3 has eigenvalues 2/3, 1/3, 0
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    # q=1: exp(-(2/3 ln 2/3 + 1/3 ln 1/3)) = exp(0.2703 + 0.3662) = exp(0.636514) = 1.889882
    assert vendi_score(emb) == pytest.approx(1.889882, abs=1e-6)
    # q=2: 1 / (4/9 + 1/9) = 9/5
    assert vendi_score(emb, q=2.0) == pytest.approx(1.8)
    # q=inf: 1 / (2/3)
    assert vendi_score(emb, q=math.inf) == pytest.approx(1.5)


def test_vendi_matches_direct_eigendecomposition() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 8))
    unit = x / np.sqrt((x**2).sum(axis=1))[:, None]
    w, _ = np.linalg.eigh(unit @ unit.T / 30)
    w = w[w > 1e-12]
    expected = math.exp(-sum(v * math.log(v) for v in w))
    assert vendi_score(x) == pytest.approx(expected, rel=1e-9)
    assert 1.0 <= vendi_score(x) <= 30.0


def test_mean_pairwise_cosine() -> None:
    # e0, e1, (e0+e1)/sqrt2: cosines 0, 1/sqrt2, 1/sqrt2 -> mean = 1.414214 / 3 = 0.471405
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert mean_pairwise_cosine(emb) == pytest.approx(0.471405, abs=1e-6)
    assert math.isnan(mean_pairwise_cosine(np.array([[1.0, 0.0]])))
    g = cosine_gram(emb)
    np.testing.assert_allclose(np.diag(g), 1.0)
    with pytest.raises(ValueError):
        cosine_gram(np.array([[0.0, 0.0], [1.0, 0.0]]))


def test_near_duplicates() -> None:
    # rows 0 and 1: cos = 1/sqrt(1.01) = 0.995037 > 0.95; every other pair <= 0.0995
    emb = np.array([[1.0, 0, 0], [1.0, 0.1, 0], [0, 1.0, 0], [0, 0, 1.0]])
    # 4 rows -> 6 unordered pairs, 1 near duplicate
    assert near_duplicate_rate(emb) == pytest.approx(1 / 6)
    pairs = near_duplicate_pairs(emb, 0.95)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]
    assert pairs[0][2] == pytest.approx(0.995037, abs=1e-6)
    assert near_duplicate_rate(emb, threshold=-0.5) == pytest.approx(1.0)
    assert math.isnan(near_duplicate_rate(emb[:1]))


# ---------------------------------------------------------------- alignment


def test_clip_score() -> None:
    img = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    # cos with (1,1): 1/sqrt2, 1/sqrt2, -1/sqrt2 -> 100 * [0.707107, 0.707107, 0]
    np.testing.assert_allclose(clip_score(img, np.array([1.0, 1.0])), [70.7107, 70.7107, 0.0], atol=1e-4)
    # paired text rows: cos 1, 1, -1 -> [2.5, 2.5, 0] with the Hessel et al. w = 2.5
    np.testing.assert_allclose(clip_score(img, img, scale=2.5), [2.5, 2.5, 2.5])
    np.testing.assert_allclose(clip_score(img, -img), [0.0, 0.0, 0.0])
    assert clip_score(np.zeros((0, 2)), np.array([1.0, 0.0])).shape == (0,)


def test_on_prompt_rate() -> None:
    assert on_prompt_rate(["cap", "cap", "none", "tall"], "cap") == 0.5
    assert on_prompt_rate(["none"] * 3, "none") == 1.0
    assert on_prompt_rate([None, "cap"], "cap") == 0.5  # nothing read counts as off-prompt
    assert math.isnan(on_prompt_rate([], "cap"))
    assert get_metric("on_prompt_rate").higher_is_better is True


# ---------------------------------------------------------------- registry


def test_registry_directions() -> None:
    lower = {"dominant_share", "mad", "shen_gap", "kl_uniform", "kl_target", "low_confidence_rate"}
    lower |= {"mean_pairwise_cosine", "near_duplicate_rate"}
    higher = {"normalized_entropy", "vendi", "clip_score", "on_prompt_rate"}
    assert lower | higher <= set(METRICS)
    for name in lower:
        assert get_metric(name).higher_is_better is False, name
    for name in higher:
        assert get_metric(name).higher_is_better is True, name
    assert get_metric("mad").fn is mad
    assert get_metric("mad").kind == "distribution"
    assert get_metric("vendi").kind == "diversity" and get_metric("vendi").fn is vendi_score
    assert get_metric("clip_score").kind == "alignment"
    assert get_metric("mad").description.startswith("DALL-Eval")


def test_registry_miss_message() -> None:
    with pytest.raises(SuiteError) as err:
        get_metric("vendii")
    msg = str(err.value)
    assert "unknown metric 'vendii'" in msg and "did you mean 'vendi'" in msg


def test_registered_ranges_are_the_metrics_extremes() -> None:
    """Each declared range is reached: uniform and one-hot shares for K = 2 and 4, hand values."""
    for k in (2, 4):
        uniform, onehot = np.full(k, 1.0 / k), np.eye(k)[0]
        for name in ("mad", "shen_gap", "kl_uniform", "dominant_share", "normalized_entropy"):
            lo, hi = get_metric(name).bounds(k)
            ends = sorted([get_metric(name).fn(uniform), get_metric(name).fn(onehot)])
            assert ends == pytest.approx([lo, hi]), name
    assert get_metric("mad").bounds(4) == (0.0, 0.375) and get_metric("shen_gap").bounds(4) == (0.0, 0.5)
    assert get_metric("vendi").bounds(12) == (1.0, 12.0) and get_metric("clip_score").bounds(3) == (0.0, 100.0)
    assert metric_bounds("share:dark", 4) == (0.0, 1.0) and metric_bounds("share_corrected:x", 2) == (0.0, 1.0)
    assert metric_bounds("clip_score_std", 4) == (-math.inf, math.inf)


def test_registry_rejects_conflicting_name() -> None:
    with pytest.raises(ValueError):

        @register_metric("mad", higher_is_better=False, kind="distribution")
        def other(p: np.ndarray) -> float:
            return 0.0

    assert get_metric("mad").fn is mad
