"""Compare two runs (base vs fine-tuned, or model A vs B) on their paired seeds.

Images pair by (prompt text, guidance scale, image index) where both runs used the same seed, so each
pair differs only in the model. Shares are pooled over the common prompts with cluster-robust 95 %
intervals (clustered by prompt), and so is the paired change in share B − A; other metrics are computed
per prompt on the paired images, then averaged over prompts with a t-interval within the metric's range
(the change too). Every interval is `evalsuite.metrics`'; every entry is read by `evalsuite.results`.

`Comparison.splits` repeats the shares and the legibility per split of the battery (`Prompt.split`: the
prompts trained on, the held-out validation prompts, the test prompts), so a tuned model's figures on
prompts it never saw and that chose no setting stand apart from the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from evalsuite import legibility
from evalsuite import metrics as mx
from evalsuite.battery import SPLITS
from evalsuite.errors import SuiteError
from evalsuite.results import RunView, majority_classes
from evalsuite.results.schema import entry

SHARE_METRICS = ("shen_gap", "mad", "dominant_share", "normalized_entropy", "kl_uniform")  # registered, fn(p)
DIVERSITY = ("vendi", "mean_pairwise_cosine")  # registered, fn(embeddings)
Pair = tuple[dict[str, Any], dict[str, Any]]


@dataclass
class Comparison:
    a: RunView
    b: RunView
    classifier: str
    prompts: list[str]
    scales: list[float]
    n_pairs: int
    seed_mismatches: int
    shares: pd.DataFrame
    metrics: pd.DataFrame
    diversity: pd.DataFrame
    flips: pd.DataFrame
    legibility: pd.DataFrame  # LEGIBILITY_COLUMNS: a judge classifier's low-confidence rate by group
    splits: pd.DataFrame = field(default_factory=pd.DataFrame)  # SPLIT_COLUMNS: shares and legibility per split
    notes: list[str] = field(default_factory=list)
    by_position: bool = False  # no pair shared a seed: images are paired by position (prompt, scale, index)


def choose_classifier(a: RunView, b: RunView) -> str:
    for name in (a.primary_classifier, b.primary_classifier, *a.classifiers):
        if name in a.classifiers and name in b.classifiers:
            return name
    raise SuiteError(
        f"cannot compare {a.path} and {b.path}: no attribute classifier in common "
        f"({', '.join(a.classifiers) or 'none'} vs {', '.join(b.classifiers) or 'none'})"
    )


def pair_records(
    a: RunView, b: RunView
) -> tuple[dict[tuple[str, float], list[Pair]], list[str], list[float], int, list[str], bool]:
    """Pairs per (prompt text, scale); the common prompts (A's order) and scales; seed mismatches; notes;
    whether the pairs are by position only (no pair shared its seed)."""
    texts_b = set(b.prompts.values())
    prompts = [t for t in a.prompts.values() if t in texts_b]
    if not prompts:
        raise SuiteError(
            f"cannot compare {a.path} and {b.path}: their batteries have no prompts in common "
            f"(battery {a.battery.name!r} v{a.battery.version} with {len(a.prompts)} prompts vs "
            f"{b.battery.name!r} v{b.battery.version} with {len(b.prompts)} prompts)"
        )
    scales = sorted(set(a.scales) & set(b.scales))
    if not scales:
        raise SuiteError(
            f"cannot compare {a.path} and {b.path}: no guidance scale in common ({a.scales} vs {b.scales})"
        )
    common, wanted = set(prompts), set(scales)
    index_b = {(str(r["prompt"]), r["guidance_scale"], r["image_index"]): r for r in b.records}
    same: dict[tuple[str, float], list[Pair]] = {}
    positional: dict[tuple[str, float], list[Pair]] = {}
    mismatches = 0
    for rec in a.records:
        if rec["prompt"] not in common or rec["guidance_scale"] not in wanted:
            continue
        other = index_b.get((str(rec["prompt"]), rec["guidance_scale"], rec["image_index"]))
        if other is None:
            continue
        key = (str(rec["prompt"]), rec["guidance_scale"])
        positional.setdefault(key, []).append((rec, other))
        if rec["seed"] == other["seed"]:
            same.setdefault(key, []).append((rec, other))
        else:
            mismatches += 1
    notes: list[str] = []
    if not positional:
        raise SuiteError(f"cannot compare {a.path} and {b.path}: no image index is common to both runs")
    if not same:
        notes.append(
            "The two runs used different seeds for every image (different battery seeds?): images "
            "are paired by position instead, so the intervals ignore the pairing's benefit."
        )
        return positional, prompts, scales, mismatches, notes, True
    if mismatches:
        notes.append(f"{mismatches} image pairs had different seeds and were left out.")
    return same, prompts, scales, mismatches, notes, False


def _unmeasured(view: RunView, letter: str, attr: str, clf: str) -> str:
    """Why run `letter` has no results for an attribute the other run has: its battery or its classifier."""
    names = set(view.battery.attribute_classes())
    why = f"its {clf} classifier measured it on no image" if attr in names else "its battery has no such attribute"
    return f"Attribute {attr} is left out: run {letter} has no results for it ({why})."


def _row(a_vals: list[float], b_vals: list[float], bounds: tuple[float, float]) -> list[float]:
    """[a, a_lo, a_hi, b, b_lo, b_hi, delta, d_lo, d_hi] from per-prompt values: t-intervals within the
    metric's range `bounds` = (lo, hi), the change's within (lo − hi, hi − lo) (`metrics.mean_interval`)."""
    diff = [y - x for x, y in zip(a_vals, b_vals, strict=True)]
    width = bounds[1] - bounds[0]
    return [*mx.mean_interval(a_vals, bounds), *mx.mean_interval(b_vals, bounds),
            *mx.mean_interval(diff, (-width, width))]


def compare_runs(a: RunView, b: RunView) -> Comparison:
    clf = choose_classifier(a, b)
    pairs, prompts, scales, mismatches, notes, by_position = pair_records(a, b)
    samplers = [f"{v.battery.steps} steps, DDIM eta {v.battery.eta:g}" for v in (a, b)]
    if samplers[0] != samplers[1]:
        notes.append(f"The runs sampled differently (A: {samplers[0]}; B: {samplers[1]}): the pairs share their "
                     "initial noise, but the differences below include the sampler, not only the model.")
    classes_a, classes_b = dict(a.attributes(clf)), dict(b.attributes(clf))
    notes += [_unmeasured(a, "A", attr, clf) for attr in classes_b if attr not in classes_a]
    share_rows, metric_rows, flip_rows = [], [], []
    for attr, classes in classes_a.items():
        if attr not in classes_b:
            notes.append(_unmeasured(b, "B", attr, clf))
            continue
        if classes_b[attr] != classes:
            notes.append(f"Attribute {attr} is left out: the runs' batteries give it different classes "
                         f"(A: {', '.join(classes)}; B: {', '.join(classes_b[attr])}).")
            continue
        k = len(classes)
        for scale in scales:
            ca, cb, n = np.zeros((len(prompts), k)), np.zeros((len(prompts), k)), np.zeros(len(prompts))
            per_pair, flips = [], 0
            for g, text in enumerate(prompts):
                for ra, rb in pairs.get((text, scale), []):
                    la, lb = a.label(ra, clf, attr), b.label(rb, clf, attr)
                    if la is None or lb is None or la not in classes or lb not in classes:
                        continue
                    ia, ib = classes.index(la), classes.index(lb)
                    ca[g, ia] += 1
                    cb[g, ib] += 1
                    n[g] += 1
                    flips += ia != ib
                    per_pair.append(np.eye(k)[ib] - np.eye(k)[ia])
            if n.sum() == 0:
                continue
            diffs = np.asarray(per_pair)
            g_used = int(np.count_nonzero(n))
            for j, cls in enumerate(classes):
                share_rows.append(
                    [
                        attr, cls, scale, *mx.cluster_share_interval(ca[:, j], n),
                        *mx.cluster_share_interval(cb[:, j], n),
                        *mx.cluster_difference_interval(cb[:, j] - ca[:, j], n, diffs[:, j]), int(n.sum()), g_used,
                    ]
                )
            used = n > 0
            pa, pb = ca[used] / n[used, None], cb[used] / n[used, None]
            for name in SHARE_METRICS:
                info = mx.get_metric(name)
                a_vals, b_vals = [float(info.fn(p)) for p in pa], [float(info.fn(p)) for p in pb]
                metric_rows.append([attr, name, scale, *_row(a_vals, b_vals, info.bounds(k)), g_used])
            flip_rows.append([attr, scale, flips / n.sum(), int(n.sum())])
    share_cols = [
        "attribute", "class", "guidance_scale", "a", "a_lo", "a_hi", "b", "b_lo", "b_hi", "delta", "d_lo",
        "d_hi", "n_pairs", "n_prompts",
    ]
    metric_cols = [
        "attribute", "metric", "guidance_scale", "a", "a_lo", "a_hi", "b", "b_lo", "b_hi", "delta", "d_lo",
        "d_hi", "n_prompts",
    ]
    diversity = _diversity(a, b, pairs, prompts, scales, notes)
    return Comparison(
        a, b, clf, prompts, scales, sum(len(v) for v in pairs.values()), mismatches,
        pd.DataFrame(share_rows, columns=share_cols), pd.DataFrame(metric_rows, columns=metric_cols),
        pd.DataFrame(diversity, columns=["attribute", *metric_cols[1:]]),
        pd.DataFrame(flip_rows, columns=["attribute", "guidance_scale", "rate", "n_pairs"]),
        pd.DataFrame(_legibility(a, b, clf, pairs, scales), columns=LEGIBILITY_COLUMNS),
        pd.DataFrame(_by_split(a, b, clf, pairs, scales), columns=SPLIT_COLUMNS), notes, by_position,
    )


SPLIT_COLUMNS = ("split", "attribute", "guidance_scale", "quantity", "a", "a_lo", "a_hi", "b", "b_lo", "b_hi",
                 "n_prompts")


def _by_split(a: RunView, b: RunView, reader: str, pairs: dict[tuple[str, float], list[Pair]],
              scales: list[float]) -> list[list[Any]]:
    """Per split of run A's battery (`Battery.splits`), attribute and scale, on the paired images of the
    split's prompts: the share of each class as `reader` reads it ("share:<class>") and the low-confidence
    rate of every classifier both runs hold ("low_confidence:<judge>", the reader's own included), in A and
    in B, pooled over prompts with cluster-robust 95 % intervals. A split without paired images is left out."""
    split_of, rows = a.battery.splits(), []
    judges = [j for j in a.classifiers if j in b.classifiers]
    classes_b = dict(b.attributes(reader))
    for attr, classes in a.attributes(reader):
        if classes_b.get(attr) != classes:
            continue
        for split, scale in ((sp, sc) for sp in SPLITS for sc in scales):
            groups = [g for (text, s), g in pairs.items() if s == scale and split_of.get(text) == split]
            tally: dict[str, np.ndarray] = {}  # quantity -> (run, hits | images, prompt)
            for side, view in enumerate((a, b)):
                for g, group in enumerate(groups):
                    for record in (pair[side] for pair in group):
                        _count(tally, record, view, side, g, len(groups), reader, attr, classes, judges)
            for quantity, t in tally.items():
                rows.append([split, attr, scale, quantity, *mx.cluster_share_interval(t[0, 0], t[0, 1]),
                             *mx.cluster_share_interval(t[1, 0], t[1, 1]), int(np.count_nonzero(t[:, 1].sum(0)))])
    return rows


def _count(tally: dict[str, np.ndarray], record: dict[str, Any], view: RunView, side: int, g: int, n_groups: int,
           reader: str, attr: str, classes: tuple[str, ...], judges: list[str]) -> None:
    """Add one image of run `side`, prompt group `g`, to the tallies of `_by_split`."""
    def add(quantity: str, hit: bool) -> None:
        t = tally.setdefault(quantity, np.zeros((2, 2, n_groups)))
        t[side, 0, g] += hit
        t[side, 1, g] += 1

    label = view.label(record, reader, attr)
    if label in classes:
        for c in classes:
            add(f"share:{c}", label == c)
    for judge in judges:
        judged = entry(record, judge, attr)
        if judged.ok:
            add(f"low_confidence:{judge}", not judged.confident)


LEGIBILITY_COLUMNS = ("judge", "attribute", "guidance_scale", "group", "a", "a_lo", "a_hi", "a_n", "b", "b_lo",
                      "b_hi", "b_n", "n_prompts")


def _legibility(a: RunView, b: RunView, reader: str, pairs: dict[tuple[str, float], list[Pair]],
                scales: list[float]) -> list[list[Any]]:
    """Per judge (every classifier both runs hold, the reader included: the miniature world's oracle judging
    its own reading is legibility read from the face's pixels), attribute, scale and group (majority / other):
    the judge's low-confidence rate in A and in B, pooled over all prompts (training and held-out alike)
    with cluster-robust intervals.

    Groups are what `reader` reads, with each prompt's majority class taken from all of run A's paired
    images that `reader` labels (evalsuite.legibility), so both runs, and every judge, are split the same
    way. Only the paired images count; attributes whose classes differ between the runs and
    intersections (no judge reads a joined attribute) are left out.
    """
    rows: list[list[Any]] = []
    judges = [j for j in a.classifiers if j in b.classifiers]  # the reader judges its own confidence too
    classes_b = dict(b.attributes(reader))
    paired = [[p[side] for group in pairs.values() for p in group] for side in (0, 1)]
    for attr, classes in a.attributes(reader):
        if classes_b.get(attr) != classes:
            continue
        majority = majority_classes(paired[0], reader, attr, classes)
        for judge in judges:
            counts = [_per_prompt(recs, majority, reader, judge, attr) for recs in paired]
            prompts = sorted({p for c in counts for p in c})
            for scale in scales:
                for group in legibility.GROUPS:
                    cells = [[c.get(p, {}).get((scale, group), (0, 0)) for p in prompts] for c in counts]
                    low = [np.array([x[0] for x in cell], float) for cell in cells]
                    n = [np.array([x[1] for x in cell], float) for cell in cells]
                    if n[0].sum() == 0 and n[1].sum() == 0:
                        continue
                    used = int(np.count_nonzero(n[0] + n[1]))
                    rows.append([judge, attr, scale, group, *mx.cluster_share_interval(low[0], n[0]),
                                 int(n[0].sum()), *mx.cluster_share_interval(low[1], n[1]), int(n[1].sum()), used])
    return rows


def _per_prompt(records: list[dict[str, Any]], majority: dict[str, str], reader: str, judge: str,
                attr: str) -> dict[str, dict[tuple[float, str], tuple[int, int]]]:
    """prompt -> (scale, group) -> (low-confidence images, images)."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_prompt.setdefault(str(r["prompt"]), []).append(r)
    return {
        p: {(scale, group): c for (_, scale, group), c in
            legibility.low_confidence_by_group(recs, majority, reader, judge, attr, by_split=False).items()}
        for p, recs in by_prompt.items()
    }


def _diversity(
    a: RunView,
    b: RunView,
    pairs: dict[tuple[str, float], list[Pair]],
    prompts: list[str],
    scales: list[float],
    notes: list[str],
) -> list[list[Any]]:
    """Vendi and mean pairwise cosine per prompt on the paired images, when both runs used one embedder."""
    if a.info.get("embedder") != b.info.get("embedder"):
        notes.append(
            f"Diversity is not compared: the runs used different embedders "
            f"({a.info.get('embedder')!r} vs {b.info.get('embedder')!r})."
        )
        return []
    rows: list[list[Any]] = []
    for scale in scales:
        values: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in DIVERSITY}
        for text in prompts:
            group = [
                (ra, rb)
                for ra, rb in pairs.get((text, scale), [])
                if ra.get("embedding") and rb.get("embedding")
            ]
            if len(group) < 2:
                continue
            ea = np.asarray([ra["embedding"] for ra, _ in group], dtype=float)
            eb = np.asarray([rb["embedding"] for _, rb in group], dtype=float)
            for name in DIVERSITY:
                values[name][0].append(float(mx.get_metric(name).fn(ea)))
                values[name][1].append(float(mx.get_metric(name).fn(eb)))
        for name, (va, vb) in values.items():
            if va:
                bounds = mx.get_metric(name).bounds(a.battery.images_per_prompt)
                rows.append(["diversity", name, scale, *_row(va, vb, bounds), len(va)])
    return rows
