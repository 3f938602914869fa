"""The README's RL headline, regenerated: each config trained with 3 seeds, evaluated, summarised as mean ± sd.

    python bench/rl_headline.py                               # the three settings of docs/measured.md
    python bench/rl_headline.py --variants quota-kl --seeds 0 --out results/headline
    python bench/rl_headline.py --summarise-only --out DIR   # the table from finished folders

The settings (`VARIANTS`): quota-kl, the shipped rl/configs/miniature.yaml (the per-image quota reward with a
KL to the base model on the untrained steps); quota, the same reward without the KL term and with the
alignment reward at 0.1; mmd, rl/configs/miniature-mmd.yaml (the set-level MMD diversity reward, the default
before). For each setting and seed: `rl finetune --config C --no-eval seed=S training.epochs=E
output_dir=OUT/NAME-sS [overrides]` (resumes if killed); then every adapter, and the base model once, is
evaluated with `evalsuite run` on the default battery cut to its held-out and test occupations (16 prompts;
the same battery name, so the same seeds) at guidance 7.5, 32 images per prompt, read by the oracle (the
truth) and the reward classifier (`miniature`); and the base model once more on the explicit-tone battery cut
the same way (the legibility yardstick: how legibly the base model draws each tone when asked). Every step
skips what a finished folder already holds, so a rerun after a kill resumes. 20 epochs (about 7 minutes of
training on 2 free CPU cores) is the compute budget the shipped figures were taken at.

The table: per split (validation = the battery's heldout prompts, test = its test prompts, never used to
choose a setting), mean ± sd over seeds of the tuned model's
* gap: Shen et al.'s skin-tone gap read by the oracle (base model's beside it);
* illegible: the oracle's low-confidence rate (the face's median colour more than a fifth of the way toward
  another tone: `evalsuite.miniature.read_colour_probs`), against `expected`, the rate the base model has
  drawing the same mix of tones when asked for them (`evalsuite.legibility.expected_low_confidence` with the
  oracle as judge and the explicit-tone run as reference);
* reward low-conf: the reward classifier's low-confidence rate (what the validity gate trains against);
* on-prompt: the share of images whose hat is the occupation's (the oracle's reading);
* tones drawn: per prompt, the tones the oracle reads in at least 10 % of its images, mean over prompts;
* the share of each tone.
Targets (the issue that set them): gap at most half the base model's, illegible within 5 points of
expected, on-prompt within 10 points of the base model's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evalsuite.legibility import expected_low_confidence  # noqa: E402
from evalsuite.results import RunView, open_run  # noqa: E402
from rl.compare import compare_runs  # noqa: E402

BATTERY = ROOT / "prompts" / "occupations.yaml"
CONFIGS = ROOT / "rl" / "configs"
VARIANTS = {  # name -> (config, overrides)
    "quota-kl": (CONFIGS / "miniature.yaml", []),
    "quota": (CONFIGS / "miniature.yaml", ["training.kl_coef=0", "training.kl_steps=trained", "rewards.1.weight=0.1"]),
    "mmd": (CONFIGS / "miniature-mmd.yaml", []),
    "quota-kl-40": (CONFIGS / "miniature.yaml", ["training.epochs=40"]),  # the shipped setting, twice the epochs
}
EXPLICIT = ROOT / "prompts" / "occupations-explicit-tone.yaml"
SCALE, IMAGES = 7.5, 32
EVAL = ["--images-per-prompt", str(IMAGES), "--scales", str(SCALE), "--classifier", "oracle", "--classifier",
        "miniature"]


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as fh:
        done = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        sys.exit(f"rl_headline: {' '.join(cmd)} failed ({done.returncode}); see {log}")


def _evaluate(out: Path, name: str, battery: Path, adapter: Path | None) -> Path:
    folder = out / "eval" / name
    if not (folder / "metrics" / "aggregate.csv").exists():
        lora = ["--lora", str(adapter)] if adapter else []
        _run([sys.executable, "-m", "evalsuite.cli", "run", str(battery), *lora, *EVAL, "--results",
              str(out / "eval"), "--name", name], out / f"eval-{name}.log")
    return folder


def _cut(battery: Path, out: Path) -> Path:
    """`battery` with its occupations cut to the held-out and test ones (name and seeds kept)."""
    data = yaml.safe_load(battery.read_text())
    keep = set(data["heldout"]["occupation"]) | set(data.get("test", {}).get("occupation", []))
    data["slots"]["occupation"] = [o for o in data["slots"]["occupation"] if o in keep]
    path = out / f"{battery.stem}-heldout-test.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _figures(base: Path, tuned: Path, reference: Path, split: str) -> dict[str, float]:
    row = next(r for r in compare_runs(base, tuned, "oracle", "skin_tone", "miniature")
               if r.split == split and r.scale == SCALE)
    ref, view = open_run(reference).records, open_run(tuned)
    exp = expected_low_confidence(view.records, ref, "oracle", "oracle", "skin_tone", "tone",
                                  splits=view.battery.splits())[(split, SCALE)]
    shares = {k[len("share:"):]: v for k, v in row.tuned.items() if k.startswith("share:")}
    return {"gap": row.tuned["shen_gap"], "base_gap": row.base["shen_gap"],
            "illegible": row.tuned["eval_low_confidence"], "base_illegible": row.base["eval_low_confidence"],
            "expected": exp.expected / exp.matched if exp.matched else float("nan"),
            "reward_low_conf": row.tuned["reward_low_confidence"], "on_prompt": row.tuned["on_prompt_rate"],
            "base_on_prompt": row.base["on_prompt_rate"], "tones_drawn": _tones_drawn(view, split),
            **{f"share {k}": v for k, v in shares.items()}}


def _tones_drawn(view: RunView, split: str) -> float:
    """Mean over the split's prompts of the tones the oracle reads in at least 10 % of a prompt's images at
    guidance SCALE (the base model: 1; a gap of half the base model's needs about 3, e.g. shares 50/25/25)."""
    g, splits = view.groups, view.battery.splits()
    g = g[(g["classifier"] == "oracle") & (g["attribute"] == "skin_tone") & (g["guidance_scale"] == SCALE)
          & g["metric"].astype(str).str.startswith("share:") & (g["prompt"].map(splits) == split)]
    return float((g["value"] >= 0.1).groupby(g["prompt"]).sum().mean())


def _cell(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "rl-headline")
    ap.add_argument("--summarise-only", action="store_true", help="only read finished folders")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.summarise_only:
        for name in args.variants:
            config, overrides = VARIANTS[name]
            for seed in args.seeds:
                run = out / f"{name}-s{seed}"
                if not (run / "adapter").exists():
                    _run([sys.executable, "-m", "rl.cli", "-q", "finetune", "--config", str(config), "--no-eval",
                          f"seed={seed}", f"training.epochs={args.epochs}", f"output_dir={run}", *overrides],
                         out / f"{run.name}.log")
        battery = _cut(BATTERY, out)
        _evaluate(out, "base", battery, None)
        _evaluate(out, "reference", _cut(EXPLICIT, out), None)
        for name in args.variants:
            for seed in args.seeds:
                run = out / f"{name}-s{seed}"
                _evaluate(out, run.name, battery, run / "adapter")
    base, reference = out / "eval" / "base", out / "eval" / "reference"
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name in args.variants:
        for split in ("heldout", "test"):
            cells = table.setdefault(f"{name} | {split}", {})
            for seed in args.seeds:
                tuned = out / "eval" / f"{name}-s{seed}"
                if not (tuned / "metrics" / "aggregate.csv").exists():
                    continue
                for key, value in _figures(base, tuned, reference, split).items():
                    cells.setdefault(key, []).append(value)
    keys = list(next((c for c in table.values() if c), {}))
    print(f"Guidance {SCALE:g}, {IMAGES} images per prompt; mean ± sd over seeds {args.seeds} "
          f"(`python bench/rl_headline.py --out {args.out}`)\n")
    print("| setting | split | seeds | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for label, cells in table.items():
        n = len(next(iter(cells.values()), []))
        print(f"| {label} | {n} | " + " | ".join(_cell(cells.get(k, [])) for k in keys) + " |")
    (out / "headline.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
