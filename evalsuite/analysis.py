"""Records -> metric tables (long format; columns in `evalsuite.results.schema`, meaning in
docs/results-format.md):
:func:`group_metrics` -> metrics/groups.csv, per (classifier, attribute, prompt, guidance scale);
:func:`aggregate_metrics` -> metrics/aggregate.csv, the groups over prompts per split (all/train/heldout,
and test where the battery has a test split);
:func:`diversity_metrics` -> metrics/diversity.csv, embedding diversity and CLIP score per group.
:func:`metric_tables` computes all three; `evalsuite.results.store.write_tables` writes them.

Rules: shares count only images with status "ok" (``n``); an attribute missing from a record counts as
"not_measurable" (`schema.entry`). A group in which *every* image is "not_measurable" gets no rows at all
for that (classifier, attribute), so an attribute a classifier never measures (perceived gender for
``miniature``) is simply absent; a group without any "ok" image otherwise (e.g. all "no_person") keeps
its rows, as NaN. An intersection ``a×b`` is "not_measurable" for an image if any component is, else
"no_person" if any component is; its label is :func:`evalsuite.metrics.joint_labels` of the components,
its probabilities the outer product of theirs (confident when the product of the components' top
probabilities is >= 0.8, ``metrics.CONFIDENCE_THRESHOLD``). An image the source refused to make (status
"refused", `schema.refused_record`) is left out of the shares and of ``no_person_rate``'s denominator;
where the source can refuse (`metric_tables(refusals=True)`: a hosted service) every group also has a
``refused_rate`` row, the share of the group's images refused. Every interval is `evalsuite.metrics`'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from evalsuite import metrics as mx
from evalsuite.battery import JOINER, SPLITS, Battery, split_of
from evalsuite.errors import SuiteError
from evalsuite.results import schema
from evalsuite.results.schema import AGGREGATE_COLUMNS, DIVERSITY_COLUMNS, GROUP_COLUMNS

NAN = float("nan")
# groups.csv: the registered distribution metrics (fn(p) -> float) after the shares, in this order
_DISTRIBUTION = ("mad", "shen_gap", "kl_uniform")
_DIVERSITY = ("vendi", "mean_pairwise_cosine", "near_duplicate_rate")

Row = tuple[Any, ...]
GroupKey = tuple[int, float]
_Obs = tuple[NDArray[np.str_], NDArray[np.int64], NDArray[np.float64], NDArray[np.bool_]]


def _groups(records: Sequence[Mapping[str, Any]]) -> dict[GroupKey, list[int]]:
    """Record positions per (prompt_index, guidance_scale), keys in ascending order."""
    out: dict[GroupKey, list[int]] = {}
    for i, rec in enumerate(records):
        out.setdefault((int(rec["prompt_index"]), float(rec["guidance_scale"])), []).append(i)
    return dict(sorted(out.items()))


def _observe(records: Sequence[Mapping[str, Any]], clf: str, name: str, classes: Sequence[str]) -> _Obs:
    """Per record: status, label index (-1 unless ok), top class probability (NaN if unknown), confident."""
    n = len(records)
    status = np.full(n, "not_measurable", dtype="<U14")
    labels, top, conf = np.full(n, -1, np.int64), np.full(n, NAN), np.zeros(n, bool)
    for i, rec in enumerate(records):
        found = schema.entry(rec, clf, name)
        status[i] = found.status
        if not found.ok:
            continue
        if found.label not in classes:
            raise SuiteError(f"record unit {rec.get('unit')}: {clf}/{name} label {found.label!r} "
                             f"is not one of {', '.join(classes)}")
        labels[i], top[i], conf[i] = classes.index(str(found.label)), found.top, found.confident
    return status, labels, top, conf


def _joint(parts: Sequence[_Obs], sizes: Sequence[int]) -> _Obs:
    """Combine component observations into the intersection's (see the module docstring)."""
    statuses = np.stack([p[0] for p in parts])
    status = np.where((statuses == "refused").any(axis=0), "refused",
                      np.where((statuses == "not_measurable").any(axis=0), "not_measurable",
                               np.where((statuses == "no_person").any(axis=0), "no_person", "ok")))
    labels, _ = mx.joint_labels([p[1] for p in parts], sizes)
    top = np.prod(np.stack([p[2] for p in parts]), axis=0)
    every = np.all(np.stack([p[3] for p in parts]), axis=0)
    conf = np.where(np.isnan(top), every, top >= mx.CONFIDENCE_THRESHOLD)
    return status.astype("<U14"), labels, top, conf.astype(bool)


def _distribution_rows(obs: _Obs, classes: Sequence[str], target: NDArray[np.float64],
                       confusion: NDArray[np.float64] | None, refusals: bool = False) -> list[Row]:
    """(metric, value, lo, hi) rows of one group (with `refusals`, also its refused_rate)."""
    status, labels, _, conf = obs
    ok = status == "ok"
    si = mx.share_intervals(labels[ok], len(classes))
    p = si[:, 0]
    rows: list[Row] = [(f"share:{c}", *si[k]) for k, c in enumerate(classes)]
    if confusion is not None:
        fixed = mx.corrected_shares(p, confusion)
        rows += [(f"share_corrected:{c}", v, NAN, NAN) for c, v in zip(classes, fixed, strict=True)]
    dominant = schema.dominant_class(p)  # interval: Wilson of the dominant class
    rows.append(("dominant_share", *(si[dominant] if dominant is not None else (NAN, NAN, NAN))))
    rows += [(name, float(mx.get_metric(name).fn(p)), NAN, NAN) for name in _DISTRIBUTION]
    rows.append(("kl_target", mx.kl_divergence(p, target), NAN, NAN))
    rows.append(("normalized_entropy", float(mx.normalized_entropy(p)), NAN, NAN))
    rows.append(("low_confidence_rate", mx.low_confidence_rate(conf[ok]), NAN, NAN))
    rows.append(("no_person_rate", mx.no_person_rate(status[status != "refused"] == "no_person"), NAN, NAN))
    if refusals:
        rows.append(("refused_rate", mx.refused_rate(status == "refused"), NAN, NAN))
    return rows


def group_metrics(records: Sequence[Mapping[str, Any]], battery: Battery,
                  confusions: Mapping[tuple[str, str], NDArray[np.float64]] | None = None,
                  refusals: bool = False) -> pd.DataFrame:
    """metrics/groups.csv: per (classifier, attribute or intersection, prompt, scale) distribution metrics
    (with `refusals`, for a source that can refuse to make an image, also ``refused_rate``).

    ``confusions[(classifier, attribute)]`` (rows = true class, battery class order; an intersection's
    key is its ``a×b`` name) adds ``share_corrected:<class>`` rows; a matrix of the wrong shape or with a
    row that is not a distribution (:func:`evalsuite.metrics.confusion_problems`) is a SuiteError naming
    the classifier and attribute. Classifiers in order of appearance.
    """
    classifiers = list(dict.fromkeys(c for rec in records for c in (rec.get("classifiers") or {})))
    groups, rows = _groups(records), []
    all_classes, targets = battery.attribute_classes(), battery.attribute_targets()
    for clf in classifiers:
        seen = {spec.name: _observe(records, clf, spec.name, spec.classes) for spec in battery.attributes}
        for members in battery.intersections:
            seen[JOINER.join(members)] = _joint([seen[m] for m in members], [len(all_classes[m]) for m in members])
        for name, classes in all_classes.items():
            if np.all(np.isin(seen[name][0], ("not_measurable", "refused"))):
                continue  # an attribute the classifier measures on no image of the run
            target = np.asarray(targets[name], dtype=np.float64)
            confusion = None if confusions is None else confusions.get((clf, name))
            problems = [] if confusion is None else mx.confusion_problems(confusion, classes)
            if problems:
                raise SuiteError(f"confusion matrix for {clf}/{name}: {'; '.join(problems)}")
            for (pi, scale), idx in groups.items():
                obs: _Obs = tuple(a[idx] for a in seen[name])  # type: ignore[assignment]
                if np.all(obs[0] == "not_measurable"):
                    continue
                first = records[idx[0]]
                n = int(np.sum(obs[0] == "ok"))
                rows += [(clf, name, pi, first["prompt"], bool(first["heldout"]), scale, *r, n)
                         for r in _distribution_rows(obs, classes, target, confusion, refusals)]
    return pd.DataFrame(rows, columns=list(GROUP_COLUMNS))


def aggregate_metrics(groups: pd.DataFrame, records: Sequence[Mapping[str, Any]],
                      splits: Mapping[str, str] | None = None) -> pd.DataFrame:
    """metrics/aggregate.csv: ``groups`` over prompts for the splits all / train / heldout / test: each
    prompt's split from ``splits`` (prompt text -> split, `Battery.splits`), else from the record's heldout
    flag (train or heldout). A split without prompts is skipped. ``share:*`` is pooled (Σ counts / Σ n)
    with a cluster-robust interval clustered by prompt (`metrics.cluster_share_interval`); any other
    metric (also ``share_corrected:*``) is the mean over prompts with a 95 % t-interval kept within the
    metric's range for the attribute's K classes (`metrics.mean_interval`), NaN prompt values skipped.
    ``n_prompts``: prompts contributing (n > 0 for shares, a non-NaN value otherwise)."""
    prompt_split = {int(r["prompt_index"]): split_of(r, splits) for r in records}
    parts = [("all", set(prompt_split))] + [(name, {p for p, s in prompt_split.items() if s == name})
                                            for name in SPLITS]
    rows: list[Row] = []
    for (clf, attr), sub in groups.groupby(["classifier", "attribute"], sort=False):
        k = sub["metric"][sub["metric"].astype(str).str.startswith("share:")].nunique()  # the classes
        for split, prompts in parts:
            if not prompts:
                continue
            part = sub[sub["prompt_index"].isin(prompts)]
            pairs = ((s, metric, m) for s, at in part.groupby("guidance_scale")
                     for metric, m in at.groupby("metric", sort=False))
            for scale, metric, m in pairs:
                if str(metric).startswith("share:"):
                    n = m["n"].to_numpy(dtype=np.float64)
                    counts = np.rint(np.nan_to_num(m["value"].to_numpy(dtype=np.float64)) * n)
                    est, lo, hi = mx.cluster_share_interval(counts, n)
                    used = int(np.count_nonzero(n > 0))
                else:
                    values = m["value"].to_numpy(dtype=np.float64)
                    est, lo, hi = mx.mean_interval(values, mx.metric_bounds(str(metric), k))
                    used = int(np.count_nonzero(~np.isnan(values)))
                rows.append((clf, attr, split, float(scale), metric, est, lo, hi, used))
    return pd.DataFrame(rows, columns=list(AGGREGATE_COLUMNS))


def diversity_metrics(records: Sequence[Mapping[str, Any]],
                      threshold: float = mx.NEAR_DUPLICATE_COSINE) -> pd.DataFrame:
    """metrics/diversity.csv: per (prompt, scale) vendi (q=1, cosine), mean_pairwise_cosine,
    near_duplicate_rate (cos > ``threshold``), clip_score (mean, t-interval within [0, 100]) and
    clip_score_std (ddof 1), over every image of the group whatever its status; ``n`` = images with an
    embedding (a clip score). Where records carry ``on_prompt`` (a model with an exact reader of what its
    images show, such as the built-in miniature model), also on_prompt_rate: the share of images that
    show what the prompt asked for (``n`` = images read)."""
    rows: list[Row] = []
    for (pi, scale), idx in _groups(records).items():
        group = [records[i] for i in idx]
        head = (pi, group[0]["prompt"], bool(group[0]["heldout"]), scale)
        emb = np.asarray([r["embedding"] for r in group if r.get("embedding") is not None], dtype=np.float64)
        k = emb.shape[0]
        values = ((mx.vendi_score(emb), mx.mean_pairwise_cosine(emb), mx.near_duplicate_rate(emb, threshold))
                  if k else (NAN, NAN, NAN))
        rows += [(*head, name, v, NAN, NAN, k) for name, v in zip(_DIVERSITY, values, strict=True)]
        clip = np.asarray([r["clip_score"] for r in group if r.get("clip_score") is not None], float)
        std = float(clip.std(ddof=1)) if clip.size > 1 else NAN
        rows += [(*head, "clip_score", *mx.mean_interval(clip, mx.metric_bounds("clip_score", clip.size)), clip.size),
                 (*head, "clip_score_std", std, NAN, NAN, clip.size)]
        read = [r["on_prompt"] for r in group if r.get("on_prompt")]
        if read:
            rows.append((*head, "on_prompt_rate", mx.on_prompt_rate([h["read"] for h in read], read[0]["wanted"]),
                         NAN, NAN, len(read)))
    return pd.DataFrame(rows, columns=list(DIVERSITY_COLUMNS))


def metric_tables(records: Sequence[Mapping[str, Any]], battery: Battery,
                  confusions: Mapping[tuple[str, str], NDArray[np.float64]] | None = None,
                  refusals: bool = False) -> dict[str, pd.DataFrame]:
    """The three metric tables of a run (`schema.TABLES`), for `evalsuite.results.store.write_tables`;
    `refusals`: the source can refuse to make an image (groups.csv gets ``refused_rate``)."""
    groups = group_metrics(records, battery, confusions, refusals)
    return {"groups": groups, "aggregate": aggregate_metrics(groups, records, battery.splits()),
            "diversity": diversity_metrics(records)}
