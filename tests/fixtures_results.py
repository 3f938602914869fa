"""Small, realistic results folders (docs/results-format.md) made with the miniature renderer, for the
dashboard and publish tests. The metric tables are computed simply here (not by evalsuite.analysis): they
only need the documented columns and plausible values.

Images depend on (seed, guidance scale, model), and seeds on (battery, prompt, image index) only, so two
runs of one battery pair up seed by seed. Higher guidance pushes images toward each occupation's dominant
skin tone and the embeddings toward one direction per prompt (bias and mode collapse both grow with scale).
With `faces=True` each record also has the face detector's `faces` boxes (`face_boxes`).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from evalsuite import metrics as mx
from evalsuite.battery import battery_from_dict
from evalsuite.miniature import AGE_NAMES, TONE_NAMES, read_attributes, render_batch, sample_portraits
from evalsuite.miniature.world import OCCUPATIONS

XSS_PROMPTS = ("<script>alert(1)</script>", '"><img src=x onerror=alert(2)>')
XSS_MODEL = "<b>bold</b>-model"
DIM = 16
NAN = float("nan")
GENDER = {"probs": None, "label": None, "status": "not_measurable", "confident": False}
FACE = (0.28, 0.22, 0.72, 0.66)  # where the miniature renderer draws the head, as fractions of the image


def battery_data(values: Sequence[str], scales: Sequence[float], images: int, name: str = "fixture",
                 version: str = "1.0", description: str = "A small fixture battery.",
                 test: Sequence[str] = ()) -> dict[str, Any]:
    tones = {t: f"a photo of a person with {t} skin" for t in TONE_NAMES}
    return {
        "schema_version": 1, "name": name, "version": version, "description": description,
        "templates": ["a photo of a {occupation}"], "slots": {"occupation": list(values)},
        "heldout": {"occupation": [values[-1]]},
        "attributes": {"gender": {"classes": {"man": "a photo of a man", "woman": "a photo of a woman"}},
                       "skin_tone": {"classes": tones},
                       "age": {"classes": {a: f"a photo of a {a} person" for a in AGE_NAMES}}},
        "guidance_scales": list(scales), "images_per_prompt": images, "seed": 0, "steps": 4,
        "classifier": "miniature", "intersections": [["skin_tone", "age"]],
        **({"test": {"occupation": list(test)}} if test else {}),
    }


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _direction(prompt: str) -> np.ndarray:
    return _unit(np.random.default_rng(zlib.crc32(prompt.encode())).normal(size=DIM))


def _entry(label: int, names: Sequence[str], probs: np.ndarray | None = None) -> dict[str, Any]:
    if label < 0:
        return {"probs": None, "label": None, "status": "no_person", "confident": False}
    p = np.eye(len(names))[label] if probs is None else probs
    return {"probs": [round(float(x), 4) for x in p], "label": names[int(np.argmax(p))], "status": "ok",
            "confident": bool(p.max() >= 0.8)}


def _noisy(label: int, names: Sequence[str], rng: np.random.Generator) -> dict[str, Any]:
    """The 'miniature' classifier: usually right, sometimes unsure or wrong."""
    if label < 0:
        return _entry(label, names)
    p = np.full(len(names), 0.05)
    p[label if rng.random() > 0.12 else int(rng.integers(len(names)))] += rng.uniform(0.4, 0.9)
    return _entry(label, names, p / p.sum())


def face_boxes(size: tuple[int, int], person: bool, image_index: int) -> list[list[float]]:
    """A face detector's `faces` for one image of `size` (width, height): [x0, y0, x1, y1, score] boxes in
    pixels, largest first; none where there is no person, and a second, smaller one on every third image."""
    if not person:
        return []
    w, h = size
    boxes = [[round(FACE[0] * w, 1), round(FACE[1] * h, 1), round(FACE[2] * w, 1), round(FACE[3] * h, 1), 0.97]]
    if image_index % 3 == 2:
        boxes.append([0.0, round(0.7 * h, 1), round(0.2 * w, 1), round(0.95 * h, 1), 0.41])
    return boxes


def make_run(root: Path, name: str = "fixture", *, values: Sequence[str] = ("doctor", "nurse", "farmer"),
             scales: Sequence[float] = (1.0, 3.0, 7.5), images: int = 6, model_id: str = "miniature",
             model_key: int = 0, bias_boost: float = 0.0, faces: bool = False, **battery_kw: Any) -> Path:
    """Write results/<name>/ under `root` and return its path (records with `faces` where `faces`)."""
    data = battery_data(values, scales, images, **battery_kw)
    battery = battery_from_dict(data, "fixture")
    run = root / name
    records: list[dict[str, Any]] = []
    names = list(OCCUPATIONS)
    for pi, prompt in enumerate(battery.prompts()):
        value = prompt.slots[0][1]
        occ = value if value in OCCUPATIONS else names[pi % len(names)]
        for scale in battery.guidance_scales:
            for ii in range(images):
                seed = zlib.crc32(f"{battery.name}|{prompt.text}|{ii}".encode()) ^ battery.seed
                rng = np.random.default_rng([seed, int(scale * 10), model_key])
                force = rng.random() < min(0.95, (scale - 1.0) / 8.0 + bias_boost)
                tone = OCCUPATIONS[occ].dominant_tone if force else None
                portrait = sample_portraits([occ], rng, tone=tone)[0]
                weight = min(0.8, 0.08 * scale)
                emb = _unit(weight * _direction(prompt.text) + (1 - weight) * _unit(rng.normal(size=DIM)))
                if pi == 0 and scale == battery.guidance_scales[-1] and ii == 1:  # near duplicate of image 0
                    portrait = records[-1]["_portrait"]
                    emb = _unit(records[-1]["_emb"] + 1e-3 * rng.normal(size=DIM))
                records.append({"_portrait": portrait, "_emb": emb, "_rng": rng, "unit": len(records),
                                "prompt_index": pi, "prompt": prompt.text, "heldout": prompt.heldout,
                                "slots": dict(prompt.slots), "guidance_scale": scale, "image_index": ii,
                                "seed": seed, "image": f"images/p{pi:03d}/g{scale:g}/i{ii:04d}.png"})
    pixels = render_batch([r.pop("_portrait") for r in records])
    tones, ages = read_attributes(pixels)
    for rec, img, tone_i, age_i in zip(records, pixels, tones, ages, strict=True):
        (run / rec["image"]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(run / rec["image"])
        emb, rng = rec.pop("_emb"), rec.pop("_rng")
        rec["embedding"] = [round(float(x), 6) for x in emb]
        rec["clip_score"] = round(100 * max(float(emb @ _direction(rec["prompt"])), 0.0) * 0.35, 4)
        rec["classifiers"] = {
            "miniature": {"gender": GENDER, "skin_tone": _noisy(int(tone_i), TONE_NAMES, rng),
                          "age": _noisy(int(age_i), AGE_NAMES, rng)},
            "oracle": {"gender": GENDER, "skin_tone": _entry(int(tone_i), TONE_NAMES),
                       "age": _entry(int(age_i), AGE_NAMES)}}
        if faces:
            rec["faces"] = face_boxes((img.shape[1], img.shape[0]), int(tone_i) >= 0, rec["image_index"])
    (run / "records.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    _write_tables(run, records)
    info = {
        "schema_version": 1, "run_name": name, "status": "complete", "created": "2026-11-27T01:00:00+00:00",
        "finished": "2026-11-27T01:02:00+00:00", "battery": battery.to_dict(),
        "options": {"steps": 4, "dtype": "float32", "device": "cpu", "batch_size": 8, "sampler": "DDIM"},
        "model": {"id": model_id, "revision": None, "is_miniature": True, "dtype": "float32", "device": "cpu",
                  "lora": None, "pipeline_class": "StableDiffusionPipeline"},
        "classifiers": ["miniature", "oracle"], "primary_classifier": "miniature", "embedder": "clip",
        "seeds": {"battery_seed": 0, "rule": "crc32(battery|prompt|image_index) ^ seed"},
        "versions": {"python": "3.11", "torch": "2.5", "diffusers": "0.32", "transformers": "4.46",
                     "evalsuite": "0.1.0"},
        "git_commit": None, "n_images": len(records),
        "timings": {"generate_s": 1.5, "images_per_s": round(len(records) / 1.5, 2), "analyse_s": 0.2}}
    (run / "run.json").write_text(json.dumps(info, indent=2, ensure_ascii=False))
    (run / "battery.yaml").write_text(yaml.safe_dump(battery.to_dict(), sort_keys=False, allow_unicode=True))
    (run / "summary.txt").write_text("fixture run\n")
    return run


def _observed(records: list[dict[str, Any]], clf: str, attr: str, classes: Sequence[str]) -> list[int]:
    """Per record: class index (an intersection joins its parts), -1 for no person."""
    out: list[int] = []
    for rec in records:
        parts = [rec["classifiers"][clf][a] for a in attr.split("×")]
        if any(p["status"] == "no_person" for p in parts):
            out.append(-1)
        else:
            out.append(list(classes).index("×".join(p["label"] for p in parts)))
    return out


def _mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    x = np.asarray([v for v in values if np.isfinite(v)], float)
    if x.size == 0:
        return NAN, NAN, NAN
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size) if x.size > 1 else NAN
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def _group_rows(labels: np.ndarray, classes: Sequence[str], clf: str) -> list[tuple[Any, ...]]:
    ok = labels[labels >= 0]
    si = mx.share_intervals(ok, len(classes))
    p = si[:, 0]
    dom = tuple(si[int(np.nanargmax(p))]) if ok.size else (NAN, NAN, NAN)
    rows: list[tuple[Any, ...]] = [(f"share:{c}", *si[k]) for k, c in enumerate(classes)]
    rows += [("dominant_share", *dom), ("mad", mx.mad(p), NAN, NAN), ("shen_gap", mx.shen_gap(p), NAN, NAN),
             ("kl_uniform", mx.kl_to_uniform(p), NAN, NAN), ("kl_target", mx.kl_to_uniform(p), NAN, NAN),
             ("normalized_entropy", mx.normalized_entropy(p), NAN, NAN),
             ("low_confidence_rate", 0.0 if clf == "oracle" else 0.1, NAN, NAN),
             ("no_person_rate", float(np.mean(labels < 0)), NAN, NAN)]
    return [(*r, int(ok.size)) for r in rows]


def _write_tables(run: Path, records: list[dict[str, Any]]) -> None:
    attrs = {"skin_tone": list(TONE_NAMES), "age": list(AGE_NAMES),
             "skin_tone×age": [f"{t}×{a}" for t in TONE_NAMES for a in AGE_NAMES]}
    cells: dict[tuple[int, float], list[int]] = {}
    for i, rec in enumerate(records):
        cells.setdefault((rec["prompt_index"], rec["guidance_scale"]), []).append(i)
    groups: list[tuple[Any, ...]] = []
    for clf in ("miniature", "oracle"):
        for attr, classes in attrs.items():
            obs = np.asarray(_observed(records, clf, attr, classes))
            for (pi, scale), idx in cells.items():
                head = (clf, attr, pi, records[idx[0]]["prompt"], records[idx[0]]["heldout"], scale)
                groups += [(*head, *r) for r in _group_rows(obs[idx], classes, clf)]
    g = pd.DataFrame(groups, columns=["classifier", "attribute", "prompt_index", "prompt", "heldout",
                                      "guidance_scale", "metric", "value", "lo", "hi", "n"])
    agg = []
    keys = ["classifier", "attribute", "guidance_scale", "metric"]
    for (clf, attr, scale, metric), part in g.groupby(keys):
        splits = (("all", part), ("train", part[~part["heldout"]]), ("heldout", part[part["heldout"]]))
        for split, sel in splits:
            if str(metric).startswith("share:"):
                n = sel["n"].to_numpy(float)
                est = mx.cluster_share_interval(np.rint(np.nan_to_num(sel["value"].to_numpy(float)) * n), n)
            else:
                est = _mean_ci(sel["value"].to_numpy(float))
            agg.append((clf, attr, split, scale, metric, *est, len(sel)))
    div = []
    for (pi, scale), idx in cells.items():
        emb = np.asarray([records[i]["embedding"] for i in idx])
        clip = [records[i]["clip_score"] for i in idx]
        head = (pi, records[idx[0]]["prompt"], records[idx[0]]["heldout"], scale)
        div += [(*head, "vendi", mx.vendi_score(emb), NAN, NAN, len(idx)),
                (*head, "mean_pairwise_cosine", mx.mean_pairwise_cosine(emb), NAN, NAN, len(idx)),
                (*head, "near_duplicate_rate", mx.near_duplicate_rate(emb), NAN, NAN, len(idx)),
                (*head, "clip_score", *_mean_ci(clip), len(idx)),
                (*head, "clip_score_std", float(np.std(clip, ddof=1)), NAN, NAN, len(idx))]
    acols = ["classifier", "attribute", "split", "guidance_scale", "metric", "value", "lo", "hi", "n_prompts"]
    dcols = ["prompt_index", "prompt", "heldout", "guidance_scale", "metric", "value", "lo", "hi", "n"]
    (run / "metrics").mkdir(parents=True, exist_ok=True)
    for fname, frame in (("groups", g), ("aggregate", pd.DataFrame(agg, columns=acols)),
                         ("diversity", pd.DataFrame(div, columns=dcols))):
        frame.to_csv(run / "metrics" / f"{fname}.csv", index=False, na_rep="NaN", float_format="%.6g")


def make_xss_run(root: Path, name: str = "xss") -> Path:
    """A run whose prompts, model id, battery version and description carry HTML/script payloads."""
    return make_run(root, name, values=("doctor", *XSS_PROMPTS), scales=(1.0, 7.5), images=4,
                    model_id=XSS_MODEL, version='1.0"><script>alert(3)</script>',
                    description="<script>alert(4)</script> & co")
