"""Before/after table of an RL run: the base and tuned evaluation results folders, side by side.

Reads only the two results folders (`metrics/aggregate.csv` and `metrics/diversity.csv`, see
docs/results-format.md), never a model. For each split (training and held-out prompts) and guidance
scale it lists, base -> tuned:

* bias of the fine-tuned attribute under the evaluation classifier: Shen et al.'s gap, KL to uniform
  and the dominant share (lower is more balanced);
* validity: the evaluation classifier's no-person rate and the reward classifier's low-confidence
  rate (images the policy degraded into something no classifier reads confidently);
* diversity and alignment: the Vendi score of image embeddings, the CLIP score to the prompt and,
  on the miniature world, the on-prompt rate (the share of images wearing the prompt's occupation's
  hat, as the oracle reads it), as means over the split's prompts.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

BIAS = ("shen_gap", "kl_uniform", "dominant_share", "no_person_rate")


@dataclass(frozen=True)
class Row:
    split: str
    scale: float
    base: dict[str, float]
    tuned: dict[str, float]


def _aggregate(folder: Path, attribute: str, wanted: dict[tuple[str, str], str]) -> dict[tuple, float]:
    """Values of `attribute` per (split, scale, name) for the (classifier, metric) pairs in `wanted`,
    which maps each pair to the name it is reported under."""
    out: dict[tuple, float] = {}
    with open(folder / "metrics" / "aggregate.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            name = wanted.get((r["classifier"], r["metric"]))
            if name is not None and r["attribute"] == attribute:
                out[(r["split"], float(r["guidance_scale"]), name)] = float(r["value"])
    return out


def _diversity(folder: Path) -> dict[tuple, float]:
    """Mean over prompts of vendi, clip_score and on_prompt_rate per (split, scale); NaN values are skipped."""
    sums: dict[tuple, list[float]] = defaultdict(list)
    with open(folder / "metrics" / "diversity.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            if r["metric"] not in ("vendi", "clip_score", "on_prompt_rate") or r["value"] in ("", "NaN"):
                continue
            split = "heldout" if r["heldout"] == "True" else "train"
            for s in (split, "all"):
                sums[(s, float(r["guidance_scale"]), r["metric"])].append(float(r["value"]))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _metrics(folder: Path, classifier: str, attribute: str, reward_classifier: str) -> dict[tuple, float]:
    wanted = {(classifier, m): m for m in BIAS}
    wanted[(reward_classifier, "low_confidence_rate")] = "reward_low_confidence"
    values = _aggregate(folder, attribute, wanted)
    values.update(_diversity(folder))
    return values


COLUMNS = ("shen_gap", "kl_uniform", "dominant_share", "no_person_rate", "reward_low_confidence", "vendi",
           "clip_score", "on_prompt_rate")


def compare_runs(base: Path, tuned: Path, classifier: str, attribute: str, reward_classifier: str,
                 splits: tuple[str, ...] = ("train", "heldout")) -> list[Row]:
    """One row per (split, guidance scale) present in both runs, in split then scale order."""
    a = _metrics(base, classifier, attribute, reward_classifier)
    b = _metrics(tuned, classifier, attribute, reward_classifier)
    keys = sorted({(s, g) for s, g, _ in a} & {(s, g) for s, g, _ in b},
                  key=lambda k: (splits.index(k[0]) if k[0] in splits else len(splits), k[1]))
    return [Row(s, g, {m: a.get((s, g, m), math.nan) for m in COLUMNS},
                {m: b.get((s, g, m), math.nan) for m in COLUMNS}) for s, g in keys if s in splits]


def to_markdown(rows: list[Row], classifier: str, attribute: str, reward_classifier: str) -> str:
    head = (f"Base -> tuned. Bias of `{attribute}` read by `{classifier}` (lower is more balanced); "
            f"validity: `{classifier}` no-person rate and `{reward_classifier}` low-confidence rate; "
            "Vendi, CLIP score and on-prompt rate (images wearing the occupation's hat, read by the oracle; "
            "miniature world only): means over the split's prompts (higher is more diverse / on-prompt).\n\n")
    lines = ["| split | g | " + " | ".join(COLUMNS) + " |", "|---|---" + "|---" * len(COLUMNS) + "|"]
    for r in rows:
        cells = [f"{r.base[m]:.3f} → {r.tuned[m]:.3f}" for m in COLUMNS]
        lines.append(f"| {r.split} | {r.scale:g} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"
