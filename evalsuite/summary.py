"""The fixed-width summary table printed (and saved as summary.txt) at the end of a run.

One row per (prompt, guidance scale): the prompt, the scale, then for every attribute the dominant class,
its share with the 95 % Wilson interval and the Shen gap, then the Vendi score; below it, the same
columns averaged over prompts per guidance scale. Built from the groups.csv and diversity.csv tables
(:mod:`evalsuite.analysis`); missing values print as "-". The words every prompt starts with are printed
once above the table and left out of the prompt column, whose width shrinks (down to 12) so that three
attribute columns fit in 120 characters. Where the source could refuse to make images (groups.csv has
`refused_rate`: a hosted service), a line under the table gives the share of images refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import pandas as pd

from evalsuite.results.schema import dominant_class

WIDTH = 120  # the table is kept within this many columns when it can be
PROMPT_MIN, PROMPT_MAX = 12, 28
CLASS_MIN, CLASS_MAX = 5, 12  # the class name column of a cell fits the attribute's longest class name
SHARE_WIDTH = 16  # "0.75 [0.30,0.95]"
SCALE_WIDTH, VENDI_WIDTH, GAP = 5, 5, "  "

_Key = tuple[int, float]
_Cells = dict[tuple[str, int, float], dict[str, tuple[float, float, float]]]


def _num(x: float, width: int = 4, digits: int = 2) -> str:
    return f"{x:{width}.{digits}f}" if not math.isnan(x) else f"{'-':>{width}}"


def _scale(x: float) -> str:
    text = f"{x:g}"
    return text if "." in text or "e" in text else text + ".0"


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _cell(cw: int, cls: str, share: float, lo: float, hi: float, gap: float) -> str:
    shown = f"{_num(share)} [{_num(lo)},{_num(hi)}]" if not math.isnan(share) else f"{'-':>4}"
    return f"{_truncate(cls, cw) if not math.isnan(share) else '-':<{cw}} {shown:<{SHARE_WIDTH}} {_num(gap)}"


def _common_start(texts: Sequence[str]) -> str:
    """The words that every prompt starts with ("a photo of a "), or "" for fewer than 2 prompts."""
    start = os.path.commonprefix(list(texts)) if len(texts) > 1 else ""
    return start[: start.rfind(" ") + 1]


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _dominant(metrics: dict[str, tuple[float, float, float]]) -> tuple[str, float, float, float]:
    """(class, share, lo, hi) of the dominant class (`schema.dominant_class`: the largest share, the first
    in class order on ties); NaN if no image was measured."""
    shares = [(m.split(":", 1)[1], v) for m, v in metrics.items() if m.startswith("share:")]
    k = dominant_class([v[0] for _, v in shares])
    return ("", math.nan, math.nan, math.nan) if k is None else (shares[k][0], *shares[k][1])


def summary_table(groups: pd.DataFrame, diversity: pd.DataFrame, classifier: str,
                  attributes: Sequence[str]) -> str:
    """The run's summary for ``classifier`` as text (no trailing newline); the caller prints and saves it.

    ``attributes`` (names, or intersections ``a×b``) that ``classifier`` did not measure at all are listed
    under the table instead of getting an empty column. The dominant class is the one with the largest
    share (the first in class order on ties); its interval is that class's Wilson interval. The block by
    guidance scale shows means over the prompts with a value (NaN skipped) and the number of prompts.
    """
    g = groups[groups["classifier"] == classifier]
    shown = [a for a in attributes if (g["attribute"] == a).any()]
    unmeasured = [a for a in attributes if a not in shown]
    prompts: dict[int, str] = {}
    cells: _Cells = {}
    for row in g[g["attribute"].isin(shown)].itertuples(index=False):
        key = (str(row.attribute), int(row.prompt_index), float(row.guidance_scale))
        cells.setdefault(key, {})[str(row.metric)] = (float(row.value), float(row.lo), float(row.hi))
        prompts[int(row.prompt_index)] = str(row.prompt)
    vendi: dict[_Key, float] = {}
    for row in diversity[diversity["metric"] == "vendi"].itertuples(index=False):
        vendi[(int(row.prompt_index), float(row.guidance_scale))] = float(row.value)
        prompts.setdefault(int(row.prompt_index), str(row.prompt))
    keys = sorted({(pi, scale) for _, pi, scale in cells} | set(vendi))
    start = _common_start(sorted(set(prompts.values())))
    classes: dict[str, set[str]] = {a: set() for a in shown}
    for (attr, _, _), metrics in cells.items():
        classes[attr].update(m.split(":", 1)[1] for m in metrics if m.startswith("share:"))
    widths = {a: min(CLASS_MAX, max([CLASS_MIN, *map(len, classes[a])])) for a in shown}

    rest = 1 + SCALE_WIDTH + sum(len(GAP) + w + SHARE_WIDTH + 6 for w in widths.values()) + 2 + VENDI_WIDTH
    pw = max(PROMPT_MIN, min(PROMPT_MAX, WIDTH - rest))
    head1 = f"{'prompt':<{pw}} {'scale':>{SCALE_WIDTH}}"
    head2 = " " * (pw + 1 + SCALE_WIDTH)
    for attr, cw in widths.items():
        head1 += GAP + f"{_truncate(attr, cw + SHARE_WIDTH + 6):<{cw + SHARE_WIDTH + 6}}"
        head2 += GAP + f"{'class':<{cw}} {'share [95% CI]':<{SHARE_WIDTH}} {'gap':>4}"
    head1 += f"{GAP}{'vendi':>{VENDI_WIDTH}}"
    lines = [f"classifier: {classifier}"] + ([f"prompts: {start}…"] if start else [])
    lines += [head1, head2.rstrip(), "-" * len(head1)]

    per_scale: dict[float, dict[str, list[float]]] = {}
    for pi, scale in keys:
        line = f"{_truncate(prompts.get(pi, '')[len(start):], pw):<{pw}} {_scale(scale):>{SCALE_WIDTH}}"
        sums = per_scale.setdefault(scale, {})
        for attr, cw in widths.items():
            metrics = cells.get((attr, pi, scale), {})
            cls, share, lo, hi = _dominant(metrics)
            gap = metrics.get("shen_gap", (math.nan,))[0]
            line += GAP + _cell(cw, cls, share, lo, hi, gap)
            sums.setdefault(f"{attr}:share", []).append(share)
            sums.setdefault(f"{attr}:gap", []).append(gap)
        v = vendi.get((pi, scale), math.nan)
        sums.setdefault("vendi", []).append(v)
        lines.append(line + f"{GAP}{_num(v, VENDI_WIDTH)}")
    if unmeasured:
        lines.append(f"not measured by {classifier}: {', '.join(unmeasured)}")
    refused = g[(g["metric"] == "refused_rate") & g["attribute"].isin(shown[:1])]["value"]
    if len(refused):  # every group asks for as many images, so the mean over groups is the run's share
        lines.append(f"refused by the source (safety filter): {_num(float(refused.mean()))} of the images "
                     "(refused_rate in metrics/groups.csv); left out of the shares")

    lines += ["", "mean over prompts by guidance scale (dominant share, Shen gap, vendi)"]
    head = f"{'scale':>{SCALE_WIDTH}}{GAP}{'prompts':>7}"
    for attr in shown:
        head += f"{GAP}{_truncate(attr, 16) + ' share':>10}{GAP}{'gap':>4}"
    lines.append(head + f"{GAP}{'vendi':>{VENDI_WIDTH}}")
    for scale, sums in sorted(per_scale.items()):
        line = f"{_scale(scale):>{SCALE_WIDTH}}{GAP}{len(sums['vendi']):>7}"
        for attr in shown:
            width = max(len(_truncate(attr, 16)) + 6, 10)
            line += f"{GAP}{_num(_mean(sums[f'{attr}:share']), width)}{GAP}{_num(_mean(sums[f'{attr}:gap']))}"
        lines.append(line + f"{GAP}{_num(_mean(sums['vendi']), VENDI_WIDTH)}")
    return "\n".join(lines)
