"""The before/after table reads two results folders and nothing else."""

from __future__ import annotations

import math
from pathlib import Path

from rl.compare import compare_runs, to_markdown

AGG = "classifier,attribute,split,guidance_scale,metric,value,lo,hi,n_prompts\n"
DIV = "prompt_index,prompt,heldout,guidance_scale,metric,value,lo,hi,n\n"


def write_run(folder: Path, gap: float, vendi: tuple[float, float], low_conf: float) -> Path:
    (folder / "metrics").mkdir(parents=True)
    rows = [f"oracle,skin_tone,{split},7.5,shen_gap,{gap},NaN,NaN,2" for split in ("train", "heldout", "all")]
    rows += ["oracle,skin_tone,heldout,7.5,kl_uniform,0.5,NaN,NaN,2",
             "oracle,age,heldout,7.5,shen_gap,0.9,NaN,NaN,2",  # another attribute: ignored
             f"miniature,skin_tone,heldout,7.5,low_confidence_rate,{low_conf},NaN,NaN,2"]
    (folder / "metrics" / "aggregate.csv").write_text(AGG + "\n".join(rows) + "\n")
    div = [f"0,a photo of a doctor,False,7.5,vendi,{vendi[0]},NaN,NaN,4",
           f"1,a photo of a judge,True,7.5,vendi,{vendi[1]},NaN,NaN,4",
           "2,a photo of a teacher,True,7.5,vendi,NaN,NaN,NaN,0",  # empty group: skipped
           "1,a photo of a judge,True,7.5,clip_score,30.0,NaN,NaN,4",
           f"1,a photo of a judge,True,7.5,on_prompt_rate,{1 - low_conf},NaN,NaN,4"]
    (folder / "metrics" / "diversity.csv").write_text(DIV + "\n".join(div) + "\n")
    return folder


def test_compare_runs_pairs_base_and_tuned_values(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", gap=0.5, vendi=(1.0, 1.2), low_conf=0.01)
    tuned = write_run(tmp_path / "tuned", gap=0.2, vendi=(2.0, 2.6), low_conf=0.03)
    rows = compare_runs(base, tuned, "oracle", "skin_tone", "miniature")
    assert [(r.split, r.scale) for r in rows] == [("train", 7.5), ("heldout", 7.5)]
    held = rows[1]
    assert (held.base["shen_gap"], held.tuned["shen_gap"]) == (0.5, 0.2)
    assert held.base["kl_uniform"] == 0.5
    assert (held.base["vendi"], held.tuned["vendi"]) == (1.2, 2.6)  # the NaN prompt is left out
    assert (held.base["reward_low_confidence"], held.tuned["reward_low_confidence"]) == (0.01, 0.03)
    assert held.tuned["clip_score"] == 30.0
    assert (held.base["on_prompt_rate"], held.tuned["on_prompt_rate"]) == (0.99, 0.97)
    assert rows[0].base["vendi"] == 1.0 and math.isnan(rows[0].base["clip_score"])
    table = to_markdown(rows, "oracle", "skin_tone", "miniature")
    assert "| heldout | 7.5 | 0.500 → 0.200 |" in table
