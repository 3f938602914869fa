"""Tests for evalsuite.analysis and evalsuite.summary on hand-built records (arithmetic in the comments)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from evalsuite.analysis import aggregate_metrics, diversity_metrics, group_metrics, metric_tables
from evalsuite.battery import Battery, battery_from_dict
from evalsuite.errors import SuiteError
from evalsuite.metrics import cluster_share_interval, mean_interval, t_quantile
from evalsuite.results.schema import AGGREGATE_COLUMNS, DIVERSITY_COLUMNS, GROUP_COLUMNS
from evalsuite.results.store import write_tables
from evalsuite.summary import summary_table

Z = 1.96
CLASSES = {"skin_tone": ("dark", "light"), "age": ("young", "old"), "gender": ("female", "male")}
DIM = 8


def make_battery() -> Battery:
    return battery_from_dict({
        "schema_version": 1, "name": "tiny", "version": "0.1",
        "templates": ["a photo of a {job}"], "slots": {"job": ["doctor", "nurse", "pilot"]},
        "heldout": {"job": ["pilot"]},
        "attributes": {
            "skin_tone": {"classes": {"dark": "a dark-skinned person", "light": "a light-skinned person"},
                          "target": {"dark": 0.2, "light": 0.8}},
            "age": {"classes": {"young": "a young person", "old": "an old person"}},
            "gender": {"classes": {"female": "a woman", "male": "a man"}},
        },
        "guidance_scales": [1.0, 7.5], "images_per_prompt": 4, "seed": 0, "steps": 2,
        "classifier": "oracle", "intersections": [["skin_tone", "age"]],
    }, "test")


BATTERY = make_battery()
PROMPTS = BATTERY.prompts()  # 0 doctor, 1 nurse, 2 pilot (heldout)


def entry(attribute: str, value: Any) -> dict[str, Any]:
    """A classifier entry: a class name (one-hot, confident), (class, probs), or a non-ok status."""
    if value in ("no_person", "not_measurable"):
        return {"probs": None, "label": None, "status": value, "confident": False}
    label, probs = value if isinstance(value, tuple) else (value, None)
    if probs is None:
        probs = [1.0 if c == label else 0.0 for c in CLASSES[attribute]]
    return {"probs": probs, "label": label, "status": "ok", "confident": max(probs) >= 0.8}


def record(pi: int, scale: float, i: int, emb: list[float] | None = None, clip: float = 25.0,
           **classifiers: dict[str, Any]) -> dict[str, Any]:
    """One record per results-format.md; attributes a classifier does not list are not_measurable."""
    if emb is None:
        emb = [1.0 if d == i % DIM else 0.0 for d in range(DIM)]
    prompt = PROMPTS[pi]
    return {"unit": pi * 100 + i, "prompt_index": pi, "prompt": prompt.text, "heldout": prompt.heldout,
            "slots": dict(prompt.slots), "guidance_scale": scale, "image_index": i, "seed": 1000 + i,
            "image": f"images/p{pi:03d}/g{scale}/i{i:04d}.png", "embedding": emb, "clip_score": clip,
            "classifiers": {clf: {a: entry(a, labels.get(a, "not_measurable")) for a in CLASSES}
                            for clf, labels in classifiers.items()}}


def group(pi: int, scale: float, values: list[Any], attribute: str = "skin_tone", **kw: Any) -> list[dict]:
    return [record(pi, scale, i, oracle={attribute: v, **kw}) for i, v in enumerate(values)]


def row(df: pd.DataFrame, **where: Any) -> pd.Series:
    sel = df
    for key, value in where.items():
        sel = sel[sel[key] == value]
    assert len(sel) == 1, f"{len(sel)} rows match {where}"
    return sel.iloc[0]


def wilson(c: int, n: int) -> tuple[float, float]:
    """Wilson (1927) in closed form: (p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)."""
    p = c / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return centre - half, centre + half


def test_shares_wilson_mad_gap_and_kl_target() -> None:
    recs = group(0, 7.5, ["dark", "dark", ("dark", [0.6, 0.4]), "light"])
    g = group_metrics(recs, BATTERY)
    assert tuple(g.columns) == GROUP_COLUMNS
    dark = row(g, attribute="skin_tone", metric="share:dark")
    lo, hi = wilson(3, 4)
    assert (lo, hi) == pytest.approx((0.300636, 0.954414), abs=1e-6)
    assert (dark.value, dark.lo, dark.hi) == pytest.approx((0.75, lo, hi)) and dark.n == 4
    assert (dark.prompt, dark.heldout, dark.guidance_scale) == ("a photo of a doctor", False, 7.5)
    assert row(g, attribute="skin_tone", metric="share:light").lo == pytest.approx(wilson(1, 4)[0])
    dom = row(g, attribute="skin_tone", metric="dominant_share")
    assert (dom.value, dom.lo, dom.hi) == (pytest.approx(0.75), pytest.approx(lo), pytest.approx(hi))
    value = {m: row(g, attribute="skin_tone", metric=m).value for m in
             ("mad", "shen_gap", "kl_uniform", "kl_target", "normalized_entropy", "low_confidence_rate",
              "no_person_rate")}
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert value["mad"] == pytest.approx(0.25)  # (|0.75 − 0.5| + |0.25 − 0.5|) / 2
    assert value["shen_gap"] == pytest.approx(0.5)  # |0.75 − 0.25|
    assert value["kl_uniform"] == pytest.approx(math.log(2) - h)
    assert value["kl_target"] == pytest.approx(0.75 * math.log(0.75 / 0.2) + 0.25 * math.log(0.25 / 0.8))
    assert value["normalized_entropy"] == pytest.approx(h / math.log(2))
    assert value["low_confidence_rate"] == pytest.approx(0.25)  # one image with top prob 0.6
    assert value["no_person_rate"] == 0.0
    assert math.isnan(row(g, attribute="skin_tone", metric="normalized_entropy").lo)


def test_not_measurable_group_and_attribute_emit_no_rows() -> None:
    recs = group(0, 7.5, ["dark", "light"]) + group(1, 7.5, ["not_measurable"] * 3)
    g = group_metrics(recs, BATTERY)
    assert set(g[g.attribute == "skin_tone"].prompt_index) == {0}
    assert "gender" not in set(g.attribute)  # never measured by this classifier
    assert set(g.attribute) == {"skin_tone"}  # age is not measured either, so neither is skin_tone×age


def test_no_person_rate_and_empty_ok_group() -> None:
    recs = group(0, 1.0, ["dark", "dark", "light", "no_person"]) + group(2, 1.0, ["no_person"] * 2)
    g = group_metrics(recs, BATTERY)
    npr = row(g, prompt_index=0, attribute="skin_tone", metric="no_person_rate")
    assert (npr.value, npr.n) == (pytest.approx(0.25), 3)
    assert row(g, prompt_index=0, attribute="skin_tone", metric="share:dark").value == pytest.approx(2 / 3)
    empty = g[(g.prompt_index == 2) & (g.attribute == "skin_tone")].set_index("metric")
    assert empty.loc["no_person_rate", "value"] == 1.0 and (empty.n == 0).all()
    assert empty.drop(index="no_person_rate").value.isna().all()
    assert empty.loc["share:dark", ["lo", "hi"]].isna().all()


def test_intersection_shares_and_product_target() -> None:
    ages = ["young", "young", "old", "not_measurable"]
    recs = [record(0, 7.5, i, oracle={"skin_tone": s, "age": a})
            for i, (s, a) in enumerate(zip(["dark", "dark", "light", "dark"], ages, strict=True))]
    g = group_metrics(recs, BATTERY)
    joint = g[g.attribute == "skin_tone×age"].set_index("metric")
    shares = {m: joint.loc[f"share:{m}", "value"] for m in
              ("dark×young", "dark×old", "light×young", "light×old")}
    assert shares == pytest.approx({"dark×young": 2 / 3, "dark×old": 0, "light×young": 0, "light×old": 1 / 3})
    assert (joint.n == 3).all()  # the image without an age is not measured jointly
    lo, hi = wilson(2, 3)
    assert joint.loc["share:dark×young", ["lo", "hi"]].tolist() == pytest.approx([lo, hi])
    # target = (0.2, 0.8) ⊗ (0.5, 0.5) = (0.1, 0.1, 0.4, 0.4)
    kl = 2 / 3 * math.log((2 / 3) / 0.1) + 1 / 3 * math.log((1 / 3) / 0.4)
    assert joint.loc["kl_target", "value"] == pytest.approx(kl)


def test_corrected_shares_with_confusion_matrix() -> None:
    recs = group(0, 7.5, ["dark", "dark", "dark", "light"])
    confusion = np.array([[0.8, 0.2], [0.1, 0.9]])
    g = group_metrics(recs, BATTERY, {("oracle", "skin_tone"): confusion})
    fixed = g[g.metric.str.startswith("share_corrected:")].set_index("metric")
    # Cᵀp = (0.75, 0.25): 0.8 p + 0.1 (1 − p) = 0.75 -> p = 0.65 / 0.7
    assert fixed.loc["share_corrected:dark", "value"] == pytest.approx(0.65 / 0.7)
    assert fixed.loc["share_corrected:light", "value"] == pytest.approx(0.05 / 0.7)
    assert fixed[["lo", "hi"]].isna().all().all() and set(fixed.attribute) == {"skin_tone"}
    with pytest.raises(SuiteError, match="must be 2x2"):
        group_metrics(recs, BATTERY, {("oracle", "skin_tone"): np.eye(3)})
    # normalised by column instead of by row: rows sum to 0.9 and 1.1, which the correction cannot use
    with pytest.raises(SuiteError, match=r"confusion matrix for oracle/skin_tone: row 'dark' \(0\.8, 0\.1\) "
                                         r"sums to 0\.9; .*; row 'light' \(0\.2, 0\.9\) sums to 1\.1"):
        group_metrics(recs, BATTERY, {("oracle", "skin_tone"): np.array([[0.8, 0.1], [0.2, 0.9]])})


def test_aggregate_pooled_shares_and_splits() -> None:
    recs = (group(0, 7.5, ["dark", "dark", "dark", "light"]) + group(1, 7.5, ["dark", "light"])
            + group(2, 7.5, ["light"] * 4))
    g = group_metrics(recs, BATTERY)
    agg = aggregate_metrics(g, recs)
    assert tuple(agg.columns) == AGGREGATE_COLUMNS
    assert set(agg.split) == {"all", "train", "heldout"}
    pooled = row(agg, attribute="skin_tone", split="all", metric="share:dark")
    assert pooled.value == pytest.approx((3 + 1 + 0) / (4 + 2 + 4)) and pooled.n_prompts == 3
    assert (pooled.lo, pooled.hi) == pytest.approx(cluster_share_interval([3, 1, 0], [4, 2, 4])[1:])
    held = agg[(agg.split == "heldout") & (agg.attribute == "skin_tone")].set_index("metric")
    assert (held.n_prompts == 1).all() and held.loc["share:dark", "value"] == 0.0
    # one held-out prompt, all light: MAD 0.5, the largest a 2-class MAD can be (2(K-1)/K^2). One value
    # shows little: the score interval of 1 "success" in 1 over the range [0, 0.5], not NaN or zero width
    assert held.loc["mad", "value"] == pytest.approx(0.5)
    assert (held.loc["mad", "lo"], held.loc["mad", "hi"]) == pytest.approx((0.5 * wilson(1, 1)[0], 0.5))
    mad = row(agg, attribute="skin_tone", split="train", metric="mad")  # prompt MADs 0.25 and 0
    half = t_quantile(0.975, 1) * np.std([0.25, 0.0], ddof=1) / math.sqrt(2)  # 1.59: the t band passes 0 and 0.5
    assert 0.125 - half < 0 and 0.125 + half > 0.5
    assert (mad.value, mad.lo, mad.hi) == pytest.approx((0.125, 0.0, 0.5))  # kept within MAD's range
    train_only = [r for r in recs if not r["heldout"]]
    assert "heldout" not in set(aggregate_metrics(group_metrics(train_only, BATTERY), train_only).split)


def test_a_bounded_mean_stays_in_its_range_and_never_claims_certainty() -> None:
    # three prompts' Shen gaps (K = 2: range [0, 1]) of 0.8, 1, 1: the t band reaches past 1
    half = t_quantile(0.975, 2) * np.std([0.8, 1.0, 1.0], ddof=1) / math.sqrt(3)
    mean = 2.8 / 3
    assert mean + half > 1.0
    assert mean_interval([0.8, 1.0, 1.0], (0.0, 1.0)) == pytest.approx((mean, mean - half, 1.0))
    # every prompt collapsed (gap 1 everywhere): not [1, 1] but the score interval of 4 in 4
    assert mean_interval([1.0] * 4, (0.0, 1.0)) == pytest.approx((1.0, wilson(4, 4)[0], 1.0))
    # agreement inside the range: the mean rescaled to [0, 1] (0.75 on [0.5, 1] is 0.5, i.e. 2 in 4)
    lo, hi = wilson(2, 4)
    assert mean_interval([0.75] * 4, (0.5, 1.0)) == pytest.approx((0.75, 0.5 + 0.5 * lo, 0.5 + 0.5 * hi))
    # an unbounded metric keeps the plain t-interval, and a zero-width one where values agree
    assert mean_interval([2.0, 2.0], None) == (2.0, 2.0, 2.0)
    assert mean_interval([5.0, float("inf")], (0.0, math.inf))[0] == math.inf


def test_aggregate_gaps_of_collapsed_prompts_have_an_interval() -> None:
    recs = group(0, 7.5, ["dark"] * 4) + group(1, 7.5, ["light"] * 4)  # both training prompts one-class
    agg = aggregate_metrics(group_metrics(recs, BATTERY), recs)
    gap = row(agg, attribute="skin_tone", split="train", metric="shen_gap")
    assert (gap.value, gap.lo, gap.hi) == pytest.approx((1.0, wilson(2, 2)[0], 1.0))
    dominant = row(agg, attribute="skin_tone", split="train", metric="dominant_share")  # range [1/2, 1]
    assert (dominant.lo, dominant.hi) == pytest.approx((0.5 + 0.5 * wilson(2, 2)[0], 1.0))


def test_t_quantiles_and_interval() -> None:
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert t_quantile(0.975, 10) == pytest.approx(2.228139, abs=1e-6)
    assert t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-6)
    assert t_quantile(0.975, 200) == pytest.approx(1.971896, abs=1e-6)
    x = [1.0, 2.0, 4.0, 7.0, float("nan"), 11.0]  # NaN skipped: 5 values, df 4
    half = 2.776445 * np.std([1, 2, 4, 7, 11], ddof=1) / math.sqrt(5)
    assert mean_interval(x) == pytest.approx((5.0, 5.0 - half, 5.0 + half), abs=1e-5)
    assert mean_interval([3.0])[0] == 3.0 and math.isnan(mean_interval([3.0])[1])  # no range: no interval


def test_diversity_identical_and_orthogonal_embeddings() -> None:
    same = [record(0, 7.5, i, emb=[0.6, 0.8] + [0.0] * (DIM - 2), clip=20.0 + 2 * i, oracle={})
            for i in range(4)]
    ortho = [record(1, 7.5, i, oracle={}) for i in range(3)]
    d = diversity_metrics(same + ortho)
    assert tuple(d.columns) == DIVERSITY_COLUMNS
    assert row(d, prompt_index=0, metric="vendi").value == pytest.approx(1.0)
    assert row(d, prompt_index=0, metric="mean_pairwise_cosine").value == pytest.approx(1.0)
    assert row(d, prompt_index=0, metric="near_duplicate_rate").value == pytest.approx(1.0)
    assert row(d, prompt_index=1, metric="vendi").value == pytest.approx(3.0)
    assert row(d, prompt_index=1, metric="near_duplicate_rate").value == 0.0
    clip = row(d, prompt_index=0, metric="clip_score")  # 20, 22, 24, 26: mean 23, sd sqrt(20/3)
    half = t_quantile(0.975, 3) * math.sqrt(20 / 3) / 2
    assert (clip.value, clip.lo, clip.hi, clip.n) == pytest.approx((23.0, 23.0 - half, 23.0 + half, 4))
    assert row(d, prompt_index=0, metric="clip_score_std").value == pytest.approx(math.sqrt(20 / 3))
    assert "on_prompt_rate" not in set(d["metric"])  # no oracle reading: no row


def test_diversity_on_prompt_rate_from_the_on_prompt_reading() -> None:
    recs = [record(0, 7.5, i, oracle={}) for i in range(4)]
    for rec, hat in zip(recs, ["brim", "brim", "none", "brim"]):
        rec["on_prompt"] = {"read": hat, "wanted": "brim"}
    on = row(diversity_metrics(recs), prompt_index=0, metric="on_prompt_rate")
    assert (on.value, on.n) == (0.75, 4) and math.isnan(on.lo)


def test_write_tables(tmp_path: Path) -> None:
    recs = group(0, 7.5, ["dark", "light"]) + group(2, 7.5, ["no_person"] * 2)
    paths = write_tables(tmp_path, metric_tables(recs, BATTERY))
    names = [f"{t}.{e}" for t in ("groups", "aggregate", "diversity") for e in ("csv", "parquet")]
    assert sorted(paths) == sorted(names) and all(paths[name].is_file() for name in names)
    text = paths["groups.csv"].read_text(encoding="utf-8")
    assert text.splitlines()[0] == ",".join(GROUP_COLUMNS) and ",NaN," in text
    back = pd.read_csv(paths["groups.csv"])
    assert math.isnan(row(back, prompt_index=2, attribute="skin_tone", metric="mad").value)
    assert row(back, prompt_index=0, attribute="skin_tone", metric="share:dark").value == pytest.approx(0.5)
    assert pd.read_parquet(paths["aggregate.parquet"]).shape == pd.read_csv(paths["aggregate.csv"]).shape


def test_group_metrics_keeps_every_classifier() -> None:
    recs = [record(0, 7.5, i, oracle={"skin_tone": "dark"}, mini={"skin_tone": "light"}) for i in range(2)]
    g = group_metrics(recs, BATTERY)
    assert list(dict.fromkeys(g.classifier)) == ["oracle", "mini"]
    assert row(g, classifier="mini", attribute="skin_tone", metric="share:light").value == 1.0


def test_summary_table_numbers() -> None:
    recs = (group(0, 7.5, ["dark", "dark", "dark", "light"], age="young")
            + group(1, 7.5, ["light", "light"], age="old"))
    for r in recs[:4]:
        r["embedding"] = [1.0] + [0.0] * (DIM - 1)  # identical: vendi 1
    text = summary_table(group_metrics(recs, BATTERY), diversity_metrics(recs), "oracle",
                         ["skin_tone", "age", "gender"])
    print(text)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 120
    assert "prompts: a photo of a …" in lines
    doctor = next(line for line in lines if line.startswith("doctor"))
    assert "dark  0.75 [0.30,0.95] 0.50" in doctor and "young 1.00 [0.51,1.00] 1.00" in doctor
    assert doctor.endswith("1.00")
    nurse = next(line for line in lines if line.startswith("nurse"))
    assert "light 1.00 [0.34,1.00] 1.00" in nurse and nurse.endswith("2.00")
    assert "not measured by oracle: gender" in lines
    by_scale = lines[lines.index("mean over prompts by guidance scale (dominant share, Shen gap, vendi)") + 2]
    assert by_scale.split() == ["7.5", "2", "0.88", "0.75", "1.00", "1.00", "1.50"]
