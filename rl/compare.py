"""Before/after table of an RL run: the base and tuned evaluation results folders, side by side.

The two runs must be comparable (`open_pair`): the same battery (name, version, prompts), steps, images
per prompt, guidance scales, sampler and eta; runs that differ are refused, or, with ``overlap``, compared
on the images both hold (the same prompt, guidance scale and image index), their metrics computed again
from those records.

Reads only the two results folders, through `evalsuite.results.open_run` (their metric tables and
records; docs/results-format.md), never a model. For each split (the battery's `Prompt.split`: training,
held-out (validation) and test prompts) and guidance scale it lists, base -> tuned:

* bias of the fine-tuned attribute under the evaluation classifier: Shen et al.'s gap, KL to uniform
  and the dominant share (lower is more balanced), and the share of each class (a policy that drops a
  class shows there);
* validity: the evaluation classifier's no-person rate, the reward classifier's low-confidence rate
  (images the policy degraded into something no classifier reads confidently) and the evaluation
  classifier's own low-confidence rate: on the miniature world the oracle's, legibility read from the
  face's pixels (`evalsuite.miniature.read_colour_probs`), a measure the policy was not trained against;
* diversity and alignment: the Vendi score of image embeddings, the CLIP score to the prompt and,
  where the model has an exact on-prompt reader (run.json `model.on_prompt`; on the miniature world, the
  oracle's reading of the occupation's hat), the on-prompt rate, as means over the split's prompts.

`validity_by_class` splits the low-confidence rate by whom the image shows (from the records): images
the evaluation classifier reads as the prompt's majority class (`evalsuite.results.majority_classes`
over all the base run's images of that prompt) and images of any other class. A tuned model whose rarer classes
come out less legible than its majority has a quality disparity that an overall rate hides; and the
base model's own minority images at low guidance are the fair yardstick for the tuned model's.

`expected_table` adds the yardstick a collapsed base model cannot give by itself: a base-model run of an
attribute-explicit battery (prompts that ask for each class) says how legibly the base model draws each
class; each run's low-confidence rate is set against that rate for the classes it draws.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalsuite.battery import SPLITS, split_of
from evalsuite.errors import SuiteError, did_you_mean
from evalsuite.legibility import GROUPS, Expected, expected_low_confidence, low_confidence_by_group
from evalsuite.results import RunView, majority_classes, open_run

BIAS = ("shen_gap", "kl_uniform", "dominant_share", "no_person_rate")


@dataclass(frozen=True)
class Row:
    split: str
    scale: float
    base: dict[str, float]
    tuned: dict[str, float]


Values = dict[tuple[str, float, str], float]  # (split, guidance scale, name) -> value


def _aggregate(view: RunView, attribute: str, wanted: dict[tuple[str, str], list[str]]) -> Values:
    """Values of `attribute` per (split, scale, name) for the (classifier, metric) pairs in `wanted`,
    which maps each pair to the names it is reported under (the judge's and the reward classifier's
    low-confidence rate are one value when they are one classifier)."""
    out: Values = {}
    for r in view.aggregate.itertuples(index=False):
        if r.attribute != attribute:
            continue
        for name in wanted.get((str(r.classifier), str(r.metric)), ()):
            out[(str(r.split), float(r.guidance_scale), name)] = float(r.value)
    return out


def _diversity(view: RunView) -> Values:
    """Mean over prompts of vendi, clip_score and on_prompt_rate per (split, scale); NaN values are skipped."""
    sums: dict[tuple[str, float, str], list[float]] = defaultdict(list)
    splits = view.battery.splits()
    for r in view.diversity.itertuples(index=False):
        if r.metric not in ("vendi", "clip_score", "on_prompt_rate") or math.isnan(r.value):
            continue
        for split in (split_of(r._asdict(), splits), "all"):
            sums[(split, float(r.guidance_scale), str(r.metric))].append(float(r.value))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _metrics(view: RunView, classifier: str, attribute: str, reward_classifier: str) -> Values:
    wanted = {(classifier, m): [m] for m in BIAS}
    wanted[(classifier, "low_confidence_rate")] = ["eval_low_confidence"]
    wanted.setdefault((reward_classifier, "low_confidence_rate"), []).append("reward_low_confidence")
    wanted.update({(classifier, f"share:{c}"): [f"share:{c}"] for c in _classes(view, attribute)})
    values = _aggregate(view, attribute, wanted)
    values.update(_diversity(view))
    return values


COLUMNS = ("shen_gap", "kl_uniform", "dominant_share", "no_person_rate", "reward_low_confidence",
           "eval_low_confidence", "vendi", "clip_score", "on_prompt_rate")


def _classes(view: RunView, attribute: str) -> tuple[str, ...]:
    names = view.battery.attribute_names
    return view.battery.attribute(attribute).classes if attribute in names else ()


def open_runs(classifier: str, attribute: str, reward_classifier: str, *folders: Path) -> list[RunView]:
    """The finished results folders, read; one SuiteError naming every folder that is not one or lacks the
    classifiers or the attribute asked for (a problem several folders share is said once, naming them all)."""
    problems: dict[str, list[str]] = {}  # problem -> the folders that have it
    views = []
    for folder in folders:
        try:
            view = open_run(folder)
            found = view.classifiers
        except SuiteError as exc:
            problems.setdefault(f"not a finished results folder ({exc})", []).append(str(folder))
            continue
        views.append(view)
        for clf in dict.fromkeys((classifier, reward_classifier)):
            if clf not in found:
                problems.setdefault(f"no classifier '{clf}' in its records; it has: {', '.join(found) or 'none'}",
                                    []).append(str(folder))
        if attribute not in view.battery.attribute_names:
            names = view.battery.attribute_names
            problems.setdefault(f"no attribute '{attribute}' in the battery{did_you_mean(attribute, names)}",
                                []).append(str(folder))
    if problems:
        raise SuiteError("; ".join(f"{', '.join(where)}: {problem}" for problem, where in problems.items()))
    return views


def _settings(view: RunView) -> dict[str, Any]:
    """What two runs must share to be compared: the battery and how its images were made."""
    b, recorded = view.battery, view.info.get("options")
    options: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    return {"battery.name": b.name, "battery.version": b.version, "steps": b.steps,
            "images_per_prompt": b.images_per_prompt, "guidance_scales": [float(g) for g in b.guidance_scales],
            "sampler": options.get("sampler"), "eta": b.eta}


def differences(base: RunView, tuned: RunView) -> list[str]:
    """How the two runs differ in what a comparison needs them to share, one entry per key with both
    values (the prompts by count and example); [] for comparable runs. A sampler only one run recorded
    is not held against the other."""
    a, b = _settings(base), _settings(tuned)
    out = [f"{key}: {a[key]!r} vs {b[key]!r}" for key in a
           if a[key] != b[key] and not (key == "sampler" and None in (a[key], b[key]))]
    pa, pb = ({p.text for p in v.battery.prompts()} for v in (base, tuned))
    if pa != pb:
        def some(texts: set[str]) -> str:
            shown = sorted(texts)[:2]
            return f"{len(texts)} ({', '.join(map(repr, shown))}{', ...' if len(texts) > 2 else ''})" if texts else "0"
        out.append(f"prompts: {some(pa - pb)} only in base vs {some(pb - pa)} only in tuned")
    return out


@dataclass(frozen=True)
class Pair:
    """The two runs a comparison reads, and `note`: what `--overlap` left out ("" when nothing)."""

    base: RunView
    tuned: RunView
    note: str = ""


def open_pair(base: Path, tuned: Path, classifier: str, attribute: str, reward_classifier: str,
              overlap: bool = False) -> Pair:
    """The base and tuned runs, read (`open_runs`) and checked to be comparable (`differences`): the same
    battery (name, version, prompts), steps, images per prompt, guidance scales, sampler and eta.

    Runs that differ are one SuiteError listing each difference, unless `overlap`: then both are cut to
    the images they share (the same prompt, guidance scale and image index), their metric tables are
    computed again from those records (`evalsuite.analysis.metric_tables`), and the note says so."""
    views = open_runs(classifier, attribute, reward_classifier, base, tuned)
    found = differences(*views)
    if not found:
        return Pair(views[0], views[1])
    if not overlap:
        raise SuiteError(f"{base} and {tuned} are not comparable runs (rl compare needs runs of the same battery "
                         f"made the same way); they differ in " + "; ".join(found)
                         + ". To compare only the prompts, guidance scales and images they share, add --overlap")
    return _overlap(views[0], views[1], found)


def _key(record: dict[str, Any]) -> tuple[str, float, int]:
    return str(record["prompt"]), float(record["guidance_scale"]), int(record["image_index"])


def _overlap(base: RunView, tuned: RunView, found: list[str]) -> Pair:
    """Both runs cut to their shared images (`open_pair`)."""
    from evalsuite.analysis import metric_tables

    shared = {_key(r) for r in base.records} & {_key(r) for r in tuned.records}
    if not shared:
        raise SuiteError(f"{base.path} and {tuned.path} share no image (the same prompt, guidance scale and image "
                         "index): there is nothing to compare; they differ in " + "; ".join(found))
    cut = []
    for view in (base, tuned):
        records = [r for r in view.records if _key(r) in shared]
        tables = metric_tables(records, view.battery)
        kept = RunView(view.path, view.info, view.battery, tables["groups"], tables["aggregate"], tables["diversity"])
        kept.__dict__["records"] = records  # the cached records: the shared ones only
        cut.append(kept)
    prompts = {p for p, _, _ in shared}
    scales = sorted({g for _, g, _ in shared})
    note = (f"Compared on their overlap (--overlap): {len(shared)} images of each run, the same prompt, guidance "
            f"scale and image index in both ({len(prompts)} prompts, guidance scales "
            f"{', '.join(f'{g:g}' for g in scales)}); metrics computed again from those images. The runs differ "
            "in " + "; ".join(found) + ".\n\n")
    return Pair(cut[0], cut[1], note)


def compare_runs(base: Path, tuned: Path, classifier: str, attribute: str, reward_classifier: str,
                 splits: tuple[str, ...] = SPLITS, overlap: bool = False) -> list[Row]:
    """One row per (split, guidance scale) present in both runs, in split then scale order (runs that are
    not comparable: `open_pair`): the `COLUMNS` and ``share:<class>`` of each class of `attribute`."""
    pair = open_pair(base, tuned, classifier, attribute, reward_classifier, overlap)
    a, b = (_metrics(v, classifier, attribute, reward_classifier) for v in (pair.base, pair.tuned))
    names = COLUMNS + tuple(f"share:{c}" for c in _classes(pair.base, attribute))
    keys = sorted({(s, g) for s, g, _ in a} & {(s, g) for s, g, _ in b},
                  key=lambda k: (splits.index(k[0]) if k[0] in splits else len(splits), k[1]))
    return [Row(s, g, {m: a.get((s, g, m), math.nan) for m in names},
                {m: b.get((s, g, m), math.nan) for m in names}) for s, g in keys if s in splits]


def to_markdown(rows: list[Row], classifier: str, attribute: str, reward_classifier: str) -> str:
    """The rows as two markdown tables: the `COLUMNS`, then the share of each class."""
    head = (f"Base -> tuned. Bias of `{attribute}` read by `{classifier}` (lower is more balanced); "
            f"validity: `{classifier}` no-person rate, `{reward_classifier}` low-confidence rate (reward_) and "
            f"`{classifier}`'s own low-confidence rate (eval_; with the miniature world's oracle, legibility "
            "read from the face's pixels); Vendi, CLIP score and on-prompt rate (images that show what the prompt "
            "asked for, read exactly where the model has such a reader, e.g. the miniature world's hats): means "
            "over the split's prompts (higher is more diverse / on-prompt). Splits: train (trained on), heldout "
            "(validation: settings were chosen on it), test (never used to choose a setting).\n\n")
    lines = ["| split | g | " + " | ".join(COLUMNS) + " |", "|---|---" + "|---" * len(COLUMNS) + "|"]
    for r in rows:
        cells = [f"{r.base[m]:.3f} → {r.tuned[m]:.3f}" for m in COLUMNS]
        lines.append(f"| {r.split} | {r.scale:g} | " + " | ".join(cells) + " |")
    shares = [m for m in (rows[0].base if rows else {}) if m.startswith("share:")]
    if shares:
        lines += ["", f"Share of each `{attribute}` class read by `{classifier}` (pooled over the split's prompts), "
                      "base -> tuned:", "",
                  "| split | g | " + " | ".join(m[len("share:"):] for m in shares) + " |",
                  "|---|---" + "|---" * len(shares) + "|"]
        for r in rows:
            lines.append(f"| {r.split} | {r.scale:g} | "
                         + " | ".join(f"{r.base[m]:.3f} → {r.tuned[m]:.3f}" for m in shares) + " |")
    return head + "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ClassRow:
    """Low-confidence rate and image count among majority-class and other-class images, per run."""

    split: str
    scale: float
    base: dict[str, tuple[float, int]]
    tuned: dict[str, tuple[float, int]]


def validity_by_class(base: Path, tuned: Path, classifier: str, attribute: str, reward_classifier: str,
                      splits: tuple[str, ...] = SPLITS, overlap: bool = False,
                      judge: str | None = None) -> list[ClassRow]:
    """Low-confidence rate of majority-class and other-class images, base and tuned (module docstring),
    as `judge` reads them (default: the reward classifier).

    The majority class of a prompt is the `classifier` label most common among all the base run's images
    of that prompt (`evalsuite.results.majority_classes`). Reads the records of both folders, nothing else
    (with `overlap`, the images both share: `open_pair`).
    """
    pair = open_pair(base, tuned, classifier, attribute, reward_classifier, overlap)
    views = [pair.base, pair.tuned]
    base_records, tuned_records = views[0].records, views[1].records
    majority = majority_classes(base_records, classifier, attribute, views[0].battery.attribute(attribute).classes)
    judged, split_map = judge or reward_classifier, views[0].battery.splits()
    a = low_confidence_by_group(base_records, majority, classifier, judged, attribute, splits=split_map)
    b = low_confidence_by_group(tuned_records, majority, classifier, judged, attribute, splits=split_map)
    keys = sorted({(s, g) for s, g, _ in a} & {(s, g) for s, g, _ in b},
                  key=lambda k: (splits.index(k[0]) if k[0] in splits else len(splits), k[1]))

    def cells(counts: dict[tuple[str, float, str], tuple[int, int]], s: str, g: float) -> dict[str, tuple[float, int]]:
        found = {k: counts.get((s, g, k), (0, 0)) for k in GROUPS}
        return {k: (low / n if n else math.nan, n) for k, (low, n) in found.items()}

    return [ClassRow(s, g, cells(a, s, g), cells(b, s, g)) for s, g in keys if s in splits]


def class_table(rows: list[ClassRow], classifier: str, attribute: str, reward_classifier: str,
                judge: str | None = None) -> str:
    head = (f"Validity by class, base -> tuned: `{judge or reward_classifier}` low-confidence rate (images) among "
            "images "
            f"`{classifier}` reads as the prompt's majority `{attribute}` (most common in the base run) and "
            "among images of the other classes.\n\n")
    lines = ["| split | g | majority | other classes |", "|---|---|---|---|"]
    for r in rows:
        cells = [f"{r.base[k][0]:.3f} ({r.base[k][1]}) → {r.tuned[k][0]:.3f} ({r.tuned[k][1]})"
                 for k in ("majority", "other")]
        lines.append(f"| {r.split} | {r.scale:g} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def expected_table(base: Path, tuned: Path, reference: Path, classifier: str, attribute: str,
                   reward_classifier: str, class_slot: str = "tone",
                   splits: tuple[str, ...] = SPLITS, overlap: bool = False, judge: str | None = None) -> str:
    """Markdown: each run's low-confidence rate, as `judge` (default the reward classifier) reads it,
    against the rate `reference` predicts for its images.

    `reference` is a base-model run of a battery naming the class in `class_slot` ("a photo of a
    {occupation} with {tone} skin"); `evalsuite.legibility.expected_low_confidence` says how each image
    is matched. A collapsed base model draws only the class it draws best, so its own rate is no yardstick
    for a tuned model that draws every class; the expected rate is how legibly the base model draws the
    tuned model's mix of classes when asked for them.
    """
    pair = open_pair(base, tuned, classifier, attribute, reward_classifier, overlap)
    views = [pair.base, pair.tuned, *open_runs(classifier, attribute, reward_classifier, reference)]
    ref, judged, split_map = views[2].records, judge or reward_classifier, views[0].battery.splits()
    runs = {name: expected_low_confidence(view.records, ref, classifier, judged, attribute, class_slot,
                                          splits=split_map)
            for name, view in (("base", views[0]), ("tuned", views[1]))}
    keys = sorted({k for r in runs.values() for k, v in r.items() if v.matched},
                  key=lambda k: (splits.index(k[0]) if k[0] in splits else len(splits), k[1]))
    if not keys:
        asked = sorted({str(r["slots"][class_slot]) for r in ref})
        raise SuiteError(f"{reference}: no image of {base} or {tuned} matches a cell of the reference (its "
                         f"'{class_slot}' values: {', '.join(asked)}); the values must be the classes "
                         f"{classifier} reads for {attribute}, and its other slots and guidance scales the runs'")

    def cell(e: Expected | None) -> str:
        if e is None or not e.matched:
            return "no match"
        extra = f"; {e.unmatched} unmatched" if e.unmatched else ""
        return f"{e.low / e.matched:.3f} vs {e.expected / e.matched:.3f} ({e.matched}{extra})"

    head = (f"Low confidence of `{judged}` (actual vs expected at the reference's legibility): the "
            f"expected rate is `{reference}`'s own, asked for each `{attribute}` class by its `{class_slot}` slot, "
            f"for the classes `{classifier}` reads in each run (images matched).\n\n")
    lines = ["| split | g | base | tuned |", "|---|---|---|---|"]
    lines += [f"| {s} | {g:g} | {cell(runs['base'].get((s, g)))} | {cell(runs['tuned'].get((s, g)))} |"
              for s, g in keys if s in splits]
    return head + "\n".join(lines) + "\n"


def comparison_markdown(base: Path, tuned: Path, classifier: str, attribute: str, reward_classifier: str,
                        reference: Path | None = None, class_slot: str = "tone", overlap: bool = False) -> str:
    """Everything `rl compare` prints and an RL run writes to eval/comparison.md: what `--overlap` left
    out, the before/after tables (`compare_runs`, `to_markdown`), validity by class as the reward
    classifier and as the evaluation classifier judge it (`validity_by_class`), and with a `reference`
    run the low-confidence rates against the reference's legibility, both judges (`expected_table`)."""
    names = (classifier, attribute, reward_classifier)
    note = open_pair(base, tuned, *names, overlap=overlap).note  # refuses runs that differ
    parts = [note + to_markdown(compare_runs(base, tuned, *names, overlap=overlap), *names)]
    judges = list(dict.fromkeys((reward_classifier, classifier)))
    parts += [class_table(validity_by_class(base, tuned, *names, overlap=overlap, judge=j), *names, judge=j)
              for j in judges]
    if reference is not None:
        parts += [expected_table(base, tuned, reference, *names, class_slot=class_slot, overlap=overlap, judge=j)
                  for j in judges]
    return "\n".join(parts)
