"""Coverage of the runner's 95 % share intervals over repeated seeded runs, on the miniature model.

    python bench/ci_coverage.py [--repeats 20] [--images 12] [--truth-images 400]

For a few prompts at one guidance scale, the truth is the oracle's class shares over a large sample
(`--truth-images`, seeds disjoint from the repeats). Each repeat draws `--images` new images per prompt
(a different battery seed), classifies them with the supervised classifier and the oracle, and forms
the Wilson interval of every class share, as `evalsuite run` does per (prompt, scale). Prints the
fraction of intervals that contain the truth (target: at least 0.90 for nominal 95 %).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from evalsuite.generate import BatchedGenerator
from evalsuite.metrics import wilson_interval
from evalsuite.miniature import ASSETS, read_attributes
from evalsuite.miniature.classifier import load_classifier
from evalsuite.miniature.report import classify
from evalsuite.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default="doctor,nurse,engineer,teacher")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--truth-images", type=int, default=400)
    a = ap.parse_args()
    gen = BatchedGenerator(load_model("miniature"), steps=20)
    net = load_classifier(ASSETS / "classifier")
    hits = {"oracle": [], "miniature": []}
    for k, occ in enumerate(a.prompts.split(",")):
        prompt = f"a photo of a {occ}"
        seeds = list(range(10**6 * (k + 1), 10**6 * (k + 1) + a.truth_images))
        chunks = [seeds[i:i + 64] for i in range(0, len(seeds), 64)]
        truth_img = np.concatenate([gen.generate([prompt] * len(c), [a.scale] * len(c), c) for c in chunks])
        t, _ = read_attributes(truth_img)
        truth = np.bincount(t[t >= 0], minlength=4) / (t >= 0).sum()
        for r in range(a.repeats):
            s = list(range(10**8 * (r + 1) + 1000 * k, 10**8 * (r + 1) + 1000 * k + a.images))
            images = gen.generate([prompt] * a.images, [a.scale] * a.images, s)
            labels = {"oracle": read_attributes(images)[0], "miniature": classify(net, images)[0]}
            for name, lab in labels.items():
                ok = lab[lab >= 0]
                for c in range(4):
                    lo, hi = wilson_interval(int((ok == c).sum()), len(ok))
                    hits[name].append(lo - 1e-12 <= truth[c] <= hi + 1e-12)
    out = {"scale": a.scale, "repeats": a.repeats, "images_per_repeat": a.images, "truth_images": a.truth_images,
           **{f"coverage_{n}": round(float(np.mean(h)), 4) for n, h in hits.items()},
           "intervals": len(hits["oracle"])}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
