"""Records -> metric tables (long format; columns and meaning in docs/results-format.md):
:func:`group_metrics` -> metrics/groups.csv, per (classifier, attribute, prompt, guidance scale);
:func:`aggregate_metrics` -> metrics/aggregate.csv, the groups over prompts per split (all/train/heldout);
:func:`diversity_metrics` -> metrics/diversity.csv, embedding diversity and CLIP score per group.

Rules: shares count only images with status "ok" (``n``); an attribute missing from a record counts as
"not_measurable". A group in which *every* image is "not_measurable" gets no rows at all for that
(classifier, attribute), so an attribute a classifier never measures (perceived gender for ``miniature``)
is simply absent; a group without any "ok" image otherwise (e.g. all "no_person") keeps its rows, as NaN.
An intersection ``a×b`` is "not_measurable" for an image if any component is, else "no_person" if any
component is; its label is :func:`joint_labels` of the components, its probabilities the outer product of
theirs (confident when the product of the components' top probabilities is >= 0.8,
``metrics.CONFIDENCE_THRESHOLD``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from evalsuite import metrics as mx
from evalsuite.battery import Battery
from evalsuite.errors import SuiteError

_VALUES = ["metric", "value", "lo", "hi"]
DIVERSITY_COLUMNS = ["prompt_index", "prompt", "heldout", "guidance_scale", *_VALUES, "n"]
GROUP_COLUMNS = ["classifier", "attribute", *DIVERSITY_COLUMNS]
AGGREGATE_COLUMNS = ["classifier", "attribute", "split", "guidance_scale", *_VALUES, "n_prompts"]
JOINER = "×"
NAN = float("nan")
# groups.csv metric name -> registered distribution metric (each fn(p) -> float)
_REGISTERED = (("mad", "mad"), ("shen_gap", "shen_gap"), ("kl_uniform", "kl_to_uniform"))

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
        entry = (rec.get("classifiers") or {}).get(clf, {}).get(name)
        if entry is None:
            continue
        if entry.get("status") not in ("ok", "no_person", "not_measurable"):
            raise SuiteError(f"record unit {rec.get('unit')}: {clf}/{name} has unknown status "
                             f"{entry.get('status')!r}; expected ok, no_person or not_measurable")
        status[i] = entry["status"]
        if entry["status"] != "ok":
            continue
        probs = entry.get("probs")
        if entry.get("label") in classes:
            labels[i] = classes.index(entry["label"])
        elif probs is not None and len(probs) == len(classes):
            labels[i] = int(np.argmax(probs))
        else:
            raise SuiteError(f"record unit {rec.get('unit')}: {clf}/{name} label {entry.get('label')!r} "
                             f"is not one of {', '.join(classes)}")
        top[i] = max(probs) if probs is not None else NAN
        conf[i] = bool(entry.get("confident", top[i] >= mx.CONFIDENCE_THRESHOLD))
    return status, labels, top, conf


def _joint(parts: Sequence[_Obs], sizes: Sequence[int]) -> _Obs:
    """Combine component observations into the intersection's (see the module docstring)."""
    statuses = np.stack([p[0] for p in parts])
    status = np.where((statuses == "not_measurable").any(axis=0), "not_measurable",
                      np.where((statuses == "no_person").any(axis=0), "no_person", "ok"))
    labels, _ = mx.joint_labels([p[1] for p in parts], sizes)
    top = np.prod(np.stack([p[2] for p in parts]), axis=0)
    every = np.all(np.stack([p[3] for p in parts]), axis=0)
    conf = np.where(np.isnan(top), every, top >= mx.CONFIDENCE_THRESHOLD)
    return status.astype("<U14"), labels, top, conf.astype(bool)


def _distribution_rows(obs: _Obs, classes: Sequence[str], target: NDArray[np.float64],
                       confusion: NDArray[np.float64] | None) -> list[Row]:
    """(metric, value, lo, hi) rows of one group."""
    status, labels, _, conf = obs
    ok = status == "ok"
    si = mx.share_intervals(labels[ok], len(classes))
    p = si[:, 0]
    rows: list[Row] = [(f"share:{c}", *si[k]) for k, c in enumerate(classes)]
    if confusion is not None:
        fixed = mx.corrected_shares(p, confusion)
        rows += [(f"share_corrected:{c}", v, NAN, NAN) for c, v in zip(classes, fixed, strict=True)]
    rows.append(("dominant_share", *si[int(np.argmax(p))]))  # interval: Wilson of the dominant class
    rows += [(out, float(mx.get_metric(reg).fn(p)), NAN, NAN) for out, reg in _REGISTERED]
    rows.append(("kl_target", mx.kl_divergence(p, target), NAN, NAN))
    rows.append(("normalized_entropy", float(mx.get_metric("normalized_entropy").fn(p)), NAN, NAN))
    rows.append(("low_confidence_rate", float(np.mean(~conf[ok])) if ok.any() else NAN, NAN, NAN))
    rows.append(("no_person_rate", float(np.mean(status == "no_person")), NAN, NAN))
    return rows


def group_metrics(records: Sequence[Mapping[str, Any]], battery: Battery,
                  confusions: Mapping[tuple[str, str], NDArray[np.float64]] | None = None) -> pd.DataFrame:
    """metrics/groups.csv: per (classifier, attribute or intersection, prompt, scale) distribution metrics.

    ``confusions[(classifier, attribute)]`` (rows = true class, battery class order; an intersection's
    key is its ``a×b`` name) adds ``share_corrected:<class>`` rows; a matrix of the wrong shape or with a
    row that is not a distribution (:func:`evalsuite.metrics.confusion_problems`) is a SuiteError naming
    the classifier and attribute. Classifiers in order of appearance.
    """
    classifiers = list(dict.fromkeys(c for rec in records for c in (rec.get("classifiers") or {})))
    groups, rows = _groups(records), []
    for clf in classifiers:
        specs = {s.name: (s.classes, np.asarray(s.target, float)) for s in battery.attributes}
        seen = {name: _observe(records, clf, name, classes) for name, (classes, _) in specs.items()}
        for members in battery.intersections:
            name = JOINER.join(members)
            classes = tuple(map(JOINER.join, itertools.product(*(specs[m][0] for m in members))))
            target = functools.reduce(np.multiply.outer, [specs[m][1] for m in members]).ravel()
            specs[name] = (classes, target)
            seen[name] = _joint([seen[m] for m in members], [len(specs[m][0]) for m in members])
        for name, (classes, target) in specs.items():
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
                         for r in _distribution_rows(obs, classes, target, confusion)]
    return pd.DataFrame(rows, columns=GROUP_COLUMNS)


@functools.lru_cache(maxsize=512)
def t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t with integer ``df`` >= 1 (q in (0.5, 1)), by bisection on the exact CDF:
    P(|T| < t) with θ = atan(t/√df) is, for odd df, (2/π)(θ + sinθ Σ_{k odd < df-1} c_k cos^k θ) and for
    even df sinθ Σ_{k even <= df-2} c_k cos^k θ (Abramowitz & Stegun 26.7.3-4). Accurate to ~1e-12.
    """
    if df < 1 or not 0.5 < q < 1.0:
        raise ValueError(f"need df >= 1 and 0.5 < q < 1, got q={q}, df={df}")

    def two_sided(theta: float) -> float:
        s, c = math.sin(theta), math.cos(theta)
        term, total, k = (1.0, 1.0, 0) if df % 2 == 0 else (c, c if df > 1 else 0.0, 1)
        while k + 2 <= df - 2:
            term *= c * c * (k + 1) / (k + 2)
            total += term
            k += 2
        return s * total if df % 2 == 0 else 2.0 / math.pi * (theta + s * total)

    lo, hi = 0.0, math.pi / 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if two_sided(mid) < 2.0 * q - 1.0 else (lo, mid)
    return math.sqrt(df) * math.tan(0.5 * (lo + hi))


def t_interval(values: Sequence[float] | NDArray[np.float64], level: float = 0.95) -> tuple[float, ...]:
    """(mean, lo, hi) with a Student-t interval; NaN values are skipped, fewer than 2 values -> NaN bounds."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return NAN, NAN, NAN
    mean = float(x.mean())
    if x.size < 2:
        return mean, NAN, NAN
    half = t_quantile(0.5 + level / 2.0, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def aggregate_metrics(groups: pd.DataFrame, records: Sequence[Mapping[str, Any]],
                      battery: Battery | None = None) -> pd.DataFrame:
    """metrics/aggregate.csv: ``groups`` over prompts for the splits all / train / heldout (from the
    records' heldout flags; ``battery`` is not needed). A split without prompts is skipped. ``share:*`` is
    pooled (Σ counts / Σ n) with a cluster-robust interval clustered by prompt; any other metric (also
    ``share_corrected:*``) is the mean over prompts with a 95 % t-interval, NaN prompt values skipped.
    ``n_prompts``: prompts contributing (n > 0 for shares, a non-NaN value otherwise)."""
    heldout = {int(r["prompt_index"]): bool(r["heldout"]) for r in records}
    splits = [("all", set(heldout)), ("train", {p for p, h in heldout.items() if not h}),
              ("heldout", {p for p, h in heldout.items() if h})]
    rows: list[Row] = []
    for (clf, attr), sub in groups.groupby(["classifier", "attribute"], sort=False):
        for split, prompts in splits:
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
                    est, lo, hi = t_interval(values)
                    used = int(np.count_nonzero(~np.isnan(values)))
                rows.append((clf, attr, split, float(scale), metric, est, lo, hi, used))
    return pd.DataFrame(rows, columns=AGGREGATE_COLUMNS)


def diversity_metrics(records: Sequence[Mapping[str, Any]],
                      threshold: float = mx.NEAR_DUPLICATE_COSINE) -> pd.DataFrame:
    """metrics/diversity.csv: per (prompt, scale) vendi (q=1, cosine), mean_pairwise_cosine,
    near_duplicate_rate (cos > ``threshold``), clip_score (mean, t-interval) and clip_score_std (ddof 1),
    over every image of the group whatever its status; ``n`` = images with an embedding (a clip score).
    Where records carry ``oracle_hat`` (miniature runs of prompts with an ``occupation`` slot), also
    on_prompt_rate: the share of images wearing the occupation's hat (``n`` = images read)."""
    rows: list[Row] = []
    for (pi, scale), idx in _groups(records).items():
        group = [records[i] for i in idx]
        head = (pi, group[0]["prompt"], bool(group[0]["heldout"]), scale)
        emb = np.asarray([r["embedding"] for r in group if r.get("embedding") is not None], dtype=np.float64)
        k = emb.shape[0]
        values = ((mx.vendi_score(emb), mx.mean_pairwise_cosine(emb), mx.near_duplicate_rate(emb, threshold))
                  if k else (NAN, NAN, NAN))
        names = ("vendi", "mean_pairwise_cosine", "near_duplicate_rate")
        rows += [(*head, name, v, NAN, NAN, k) for name, v in zip(names, values, strict=True)]
        clip = np.asarray([r["clip_score"] for r in group if r.get("clip_score") is not None], float)
        std = float(clip.std(ddof=1)) if clip.size > 1 else NAN
        rows += [(*head, "clip_score", *t_interval(clip), clip.size),
                 (*head, "clip_score_std", std, NAN, NAN, clip.size)]
        hats = [r["oracle_hat"] for r in group if r.get("oracle_hat")]
        if hats:  # miniature runs: the oracle's reading of the occupation's hat
            rows.append((*head, "on_prompt_rate", mx.on_prompt_rate([h["read"] for h in hats], hats[0]["wanted"]),
                         NAN, NAN, len(hats)))
    return pd.DataFrame(rows, columns=DIVERSITY_COLUMNS)


def write_tables(run_dir: Path, battery: Battery, records: Sequence[Mapping[str, Any]],
                 confusions: Mapping[tuple[str, str], NDArray[np.float64]] | None = None) -> dict[str, Path]:
    """Write metrics/{groups,aggregate,diversity}.{csv,parquet} (CSV: ``NaN``, 6 significant digits)."""
    out_dir = Path(run_dir) / "metrics"
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_metrics(records, battery, confusions)
    tables = {"groups": groups, "aggregate": aggregate_metrics(groups, records, battery),
              "diversity": diversity_metrics(records)}
    paths: dict[str, Path] = {}
    for name, table in tables.items():
        paths[f"{name}.csv"] = out_dir / f"{name}.csv"
        table.to_csv(paths[f"{name}.csv"], index=False, na_rep="NaN", float_format="%.6g")
        paths[f"{name}.parquet"] = out_dir / f"{name}.parquet"
        table.to_parquet(paths[f"{name}.parquet"], index=False)
    return paths

