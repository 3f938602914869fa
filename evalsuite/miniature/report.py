"""Measure the miniature world against its own truth.

    evalsuite miniature report [--images 200] [--out docs/miniature-report.md]

* the supervised classifier's accuracy on held-out renders and on their VAE reconstructions;
* the oracle's accuracy on VAE reconstructions (how far its nearest-palette reading can be trusted
  on decoded images), then the classifier's accuracy on images *generated* by the miniature model,
  where the truth is the oracle's reading;
* how well the text side separates occupations (`measure_text_conditioning`);
* per occupation and guidance scale, the generated skin-tone and age shares against the training
  distribution (total variation) and the dominant share: conditional mode collapse; and how often
  the occupation's signature (hat style, badge colour) is drawn;
* every occupation at guidance 1 (no guidance: the model's own conditional distribution) with both
  DDIM samplers, eta = 0 and eta = 1: how far each lies from its training skew;
* generation throughput (images/s at batch 64, 20 steps).

`measure_confusion` writes the classifier's confusion matrices against the oracle on generated images
to `classifier/confusion.json`; the runner uses them for classifier-error-corrected shares.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SuiteError
from . import ASSETS
from .classifier import load_classifier
from .oracle import read_attributes, read_signature
from .render import render_batch, sample_portraits
from .world import AGE_NAMES, BADGES, OCCUPATIONS, TONE_NAMES

DEFAULT_OCCUPATIONS = ("doctor", "nurse", "engineer", "teacher", "lawyer", "farmer")


@torch.no_grad()
def classify(net: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).contiguous()
    tone, age = zip(*(net(x[i:i + 512]) for i in range(0, len(x), 512)))
    return torch.cat(tone).argmax(1).numpy(), torch.cat(age).argmax(1).numpy()


def _generator(world: Path, steps: int) -> Any:
    from diffusers import StableDiffusionPipeline

    from ..generate import BatchedGenerator
    from ..models import LoadedModel, use_math_attention

    pipe = StableDiffusionPipeline.from_pretrained(world / "pipeline", safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False,
                                                   use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    use_math_attention(pipe.unet)
    loaded = LoadedModel(pipe=pipe, model_id="miniature", revision=None, dtype="float32", device="cpu")
    return BatchedGenerator(loaded, steps=steps)


def _generate(gen: Any, prompt: str, scale: float, n: int, seed0: int, batch: int = 64) -> np.ndarray:
    return np.concatenate([gen.generate([prompt] * len(s), [scale] * len(s), s)
                           for s in (list(range(seed0 + i, seed0 + min(i + batch, n))) for i in range(0, n, batch))])


def _shares(labels: np.ndarray, k: int) -> np.ndarray:
    ok = labels[labels >= 0]
    return np.bincount(ok, minlength=k) / max(len(ok), 1)


def measure_confusion(world: Path = ASSETS, n_per: int = 24, steps: int = 20,
                      occupations: Sequence[str] = tuple(OCCUPATIONS)) -> dict[str, list[list[float]]]:
    """Confusion of the supervised classifier against the oracle (rows: oracle class) on generated images
    of every occupation at guidance 1, 3 and 7.5; saved to classifier/confusion.json."""
    gen, net = _generator(world, steps), load_classifier(world / "classifier")
    counts = {"skin_tone": np.zeros((4, 4)), "age": np.zeros((2, 2))}
    # every (occupation, scale, image) unit, generated 64 at a time across prompts and scales
    units = [(f"a photo of a {name}", g, 10_000 + 100 * k + i)
             for k, name in enumerate(occupations) for g in (1.0, 3.0, 7.5) for i in range(n_per)]
    for start in range(0, len(units), 64):
        prompts, scales, seeds = zip(*units[start:start + 64])
        images = gen.generate(list(prompts), list(scales), list(seeds))
        truth, pred = read_attributes(images), classify(net, images)
        for attr, t, p in (("skin_tone", truth[0], pred[0]), ("age", truth[1], pred[1])):
            np.add.at(counts[attr], (t[t >= 0], p[t >= 0]), 1)
    out = {a: (c / np.maximum(c.sum(1, keepdims=True), 1)).round(6).tolist() for a, c in counts.items()}
    meta = {"rows": "oracle class (truth)", "columns": "classifier prediction",
            "counts": {a: c.tolist() for a, c in counts.items()},
            "measured_on": f"{n_per} generated images per occupation at guidance 1, 3, 7.5 ({steps} DDIM steps)"}
    (world / "classifier" / "confusion.json").write_text(json.dumps({**out, "_about": meta}, indent=1))
    return out


@torch.no_grad()
def measure_text_conditioning(world: Path, pipe: Any, images: np.ndarray,
                              portraits: Sequence[Any]) -> dict[str, float]:
    """How well the text side tells occupations apart, which the UNet's conditioning inherits.

    * the CLIP's zero-shot occupation accuracy on held-out uint8 renders `images` (prompt "a photo of a
      {occupation}" with the highest cosine), and how often it at least picks an occupation with the
      right hat;
    * the mean cosine between the flattened text-encoder states of two occupations' prompts, for pairs
      that share a hat style and for pairs that do not. Occupations whose states are close get nearly
      the same conditioning (the UNet cross-attends to these states)."""
    from ..classifiers import ClassifierContext, get_embedder

    occupations = list(OCCUPATIONS.values())
    names = [o.name for o in occupations]
    prompts = [f"a photo of a {n}" for n in names]
    clip = get_embedder(f"clip:{world / 'clip'}", ClassifierContext())
    pred = (clip.embed_images(images) @ clip.embed_texts(prompts).T).argmax(1)
    truth = np.array([names.index(p.occupation) for p in portraits])
    hidden = pipe.encode_prompt(prompts, pipe.device, 1, False)[0]  # what the UNet cross-attends to
    states = torch.nn.functional.normalize(hidden.flatten(1), dim=1)
    cos = (states @ states.T).numpy()
    same = np.array([[a.hat == b.hat for b in occupations] for a in occupations])
    off_diagonal = ~np.eye(len(names), dtype=bool)
    return {"clip_occupation_acc": float((pred == truth).mean()),
            "clip_hat_acc": float(np.mean([occupations[p].hat == occupations[t].hat for p, t in zip(pred, truth)])),
            "text_state_cosine_same_hat": float(cos[same & off_diagonal].mean()),
            "text_state_cosine_other_hat": float(cos[~same].mean())}


TV_LINE = 0.10  # the guidance-1 fidelity line: tone TV to the training distribution at most this
CHANCE_DRAWS = 4000  # simulated samples behind the "chance" TV of a perfect model (`sampling_tv`)
SEED_BLOCK = 10_000  # noise seeds per occupation (`_seed0`): at most this many images each


def _tone_tv(shares: np.ndarray, occupation: str) -> float:
    """Total variation 1/2 sum_k |share_k - p_k| between generated tone shares and the occupation's training
    distribution p, rounded to 1e-9 so that a TV of exactly 0.10 is not read as 0.10000000000000007."""
    return round(float(0.5 * np.abs(shares - np.asarray(OCCUPATIONS[occupation].tone_probs)).sum()), 9)


def _seed0(name: str) -> int:
    """First noise seed of an occupation's images: the same for every table and sampler."""
    return 1_000_000 + SEED_BLOCK * list(OCCUPATIONS).index(name)


def _check_images(n: int) -> None:
    if not 1 <= n <= SEED_BLOCK:
        raise SuiteError(f"--images: must be between 1 and {SEED_BLOCK} (each occupation has {SEED_BLOCK} "
                         f"noise seeds), got {n}")


def sampling_tv(occupation: str, n: int, draws: int = CHANCE_DRAWS, seed: int = 0) -> tuple[float, float]:
    """Mean and 95th percentile of the tone TV that a perfect model would show with `n` readable images:
    TV = 1/2 sum_k |x_k / n - p_k| with counts x ~ Multinomial(n, p), p the occupation's training
    distribution, over `draws` simulated samples. A measured TV above the 95th percentile is the model's,
    not chance's."""
    p = np.asarray(OCCUPATIONS[occupation].tone_probs)
    counts = np.random.default_rng(seed).multinomial(n, p, size=draws)
    tv = 0.5 * np.abs(counts / n - p).sum(1)
    return float(tv.mean()), float(np.quantile(tv, 0.95))


def measure_guidance1(gen: Any, n: int, occupations: Sequence[str] = tuple(OCCUPATIONS)) -> list[dict[str, Any]]:
    """Per occupation, at guidance 1 with eta 0 and with eta 1, from the same `n` initial noises
    (`_seed0`): tone shares, tone TV, |old share - training old share|, the number of images with a
    readable person (the others are left out of the shares, `_shares`) and the chance TV of that many
    images (`sampling_tv`)."""
    _check_images(n)
    rows = []
    eta_before = gen.eta
    try:
        for name in occupations:
            row: dict[str, Any] = {"occupation": name}
            for eta in (0.0, 1.0):
                gen.eta = eta
                tone, age = read_attributes(_generate(gen, f"a photo of a {name}", 1.0, n, seed0=_seed0(name)))
                ts, n_read = _shares(tone, 4), int((tone >= 0).sum())
                mean, p95 = sampling_tv(name, max(n_read, 1))
                row[f"eta{eta:g}"] = {"tone_shares": ts.round(3).tolist(), "tone_tv": _tone_tv(ts, name),
                                      "age_tv": float(abs(_shares(age, 2)[1] - OCCUPATIONS[name].p_old)),
                                      "n_read": n_read, "chance_tv_mean": mean, "chance_tv_p95": p95}
            rows.append(row)
    finally:
        gen.eta = eta_before
    return rows


def measure_world(world: Path = ASSETS, occupations: Sequence[str] = DEFAULT_OCCUPATIONS, n: int = 200,
                  scales: Sequence[float] = (1.0, 3.0, 7.5, 12.0), steps: int = 20) -> dict[str, Any]:
    _check_images(n)
    net = load_classifier(world / "classifier")
    rng = np.random.default_rng(12345)  # held out: the build draws from seed 0
    portraits = sample_portraits([o for o in OCCUPATIONS for _ in range(50)], rng)
    renders = render_batch(portraits)
    tone_true = np.array([TONE_NAMES.index(p.tone) for p in portraits])
    age_true = np.array([AGE_NAMES.index(p.age) for p in portraits])
    gen = _generator(world, steps)
    with torch.no_grad():
        x = (torch.from_numpy(renders).permute(0, 3, 1, 2).float() / 127.5 - 1).contiguous()
        vae = gen.pipe.vae
        recon = torch.cat([vae.decode(vae.encode(x[i:i + 256]).latent_dist.mean).sample for i in range(0, len(x), 256)])
    from ..generate import to_uint8

    recon_u8 = to_uint8(recon)
    out: dict[str, Any] = {"held_out_renders": len(renders), "n_images": n}
    for label, images in (("renders", renders), ("vae_reconstructions", recon_u8)):
        t, a = classify(net, images)
        ot, oa = read_attributes(images)
        out[label] = {"classifier_tone_acc": float((t == tone_true).mean()),
                      "classifier_age_acc": float((a == age_true).mean()),
                      "oracle_tone_acc": float((ot == tone_true).mean()),
                      "oracle_age_acc": float((oa == age_true).mean())}

    out["text_conditioning"] = measure_text_conditioning(world, gen.pipe, renders, portraits)

    rows: list[dict[str, Any]] = []
    agree: dict[str, list[bool]] = {"tone": [], "age": []}
    for name in occupations:
        occ = OCCUPATIONS[name]
        for g in scales:
            images = _generate(gen, f"a photo of a {name}", g, n, seed0=_seed0(name))
            tone, age = read_attributes(images)
            pt, pa = classify(net, images)
            agree["tone"] += list((pt == tone)[tone >= 0])
            agree["age"] += list((pa == age)[age >= 0])
            ts, as_ = _shares(tone, 4), _shares(age, 2)
            hats, badges = read_signature(images)
            rows.append({"occupation": name, "guidance": g, "n": n, "person_rate": float((tone >= 0).mean()),
                         "tone_shares": ts.round(3).tolist(), "train_tone": list(occ.tone_probs),
                         "tone_tv": _tone_tv(ts, name),
                         "dominant_share": float(ts[TONE_NAMES.index(occ.dominant_tone)]),
                         "old_share": float(as_[1]), "train_old": occ.p_old,
                         "age_tv": float(abs(as_[1] - occ.p_old)),
                         "hat_rate": float(np.mean([h == occ.hat for h in hats])),
                         "badge_rate": float(np.mean([b == BADGES.index(occ.badge) for b in badges]))})
    out["generated"] = {"classifier_vs_oracle_tone_acc": float(np.mean(agree["tone"])),
                        "classifier_vs_oracle_age_acc": float(np.mean(agree["age"])), "images": len(agree["tone"])}
    out["distributions"] = rows
    out["guidance1"] = measure_guidance1(gen, n)
    prompts = [f"a photo of a {o}" for o in list(OCCUPATIONS)[:64]]
    gen.generate(prompts[:8], [7.5] * 8, list(range(8)))  # warm up
    t0 = time.perf_counter()
    reps = 3
    for r in range(reps):
        gen.generate((prompts * 2)[:64], [7.5] * 64, list(range(64 * r, 64 * r + 64)))
    out["throughput_img_per_s_b64_20steps"] = round(64 * reps / (time.perf_counter() - t0), 2)
    out["threads"] = torch.get_num_threads()
    return out


def _guidance1_markdown(rows: list[dict[str, Any]], n: int) -> list[str]:
    """The guidance-1 section of the report: a summary per sampler and one row per occupation."""
    def summary(eta: str) -> str:
        tv = np.array([r[eta]["tone_tv"] for r in rows])
        above_chance = sum(r[eta]["tone_tv"] > r[eta]["chance_tv_p95"] for r in rows)
        worst = rows[int(tv.argmax())]["occupation"]
        return (f"{int((tv <= TV_LINE).sum())} of {len(rows)} occupations within {TV_LINE:.2f}, median "
                f"{np.median(tv):.3f}, max {tv.max():.3f} ({worst}); above a perfect model's 95th percentile: "
                f"{above_chance} of {len(rows)}")

    lines = ["", f"Every occupation at guidance 1 (no guidance: the model's own conditional distribution), {n} "
             "images each from the same initial noises with diffusers' deterministic DDIM (eta = 0) and the "
             "stochastic one (eta = 1, the RL policy's). Tone TV against the training distribution:", "",
             f"* eta = 0: {summary('eta0')};", f"* eta = 1: {summary('eta1')};",
             "* chance: the TV a perfect model would show with as many readable images (drawn from the training "
             f"distribution itself), mean / 95th percentile over {CHANCE_DRAWS} simulated samples (eta = 1's; "
             "eta = 0's differ only where the oracle found no person in some image).",
             "", "| occupation | training (dominant) | hat | tone shares eta = 1 (light/medium/tan/dark) | TV eta = 0 "
             "| TV eta = 1 | chance | old-share gap to training, eta = 0 / 1 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        occ, e0, e1 = OCCUPATIONS[r["occupation"]], r["eta0"], r["eta1"]
        lines.append(f"| {occ.name} | {occ.dominant_tone} {max(occ.tone_probs):.2f} | {occ.hat} | "
                     f"{'/'.join(f'{s:.2f}' for s in e1['tone_shares'])} | {e0['tone_tv']:.3f} | "
                     f"{e1['tone_tv']:.3f} | {e1['chance_tv_mean']:.3f} / {e1['chance_tv_p95']:.3f} | "
                     f"{e0['age_tv']:.2f} / {e1['age_tv']:.2f} |")
    return lines


def to_markdown(m: dict[str, Any]) -> str:
    lines = ["# Miniature world: measured against its truth", "",
             "| images | classifier tone | classifier age | oracle tone | oracle age |", "|---|---|---|---|---|"]
    for key in ("renders", "vae_reconstructions"):
        r = m[key]
        lines.append(f"| held-out {key} ({m['held_out_renders']}) | {r['classifier_tone_acc']:.4f} | "
                     f"{r['classifier_age_acc']:.4f} | {r['oracle_tone_acc']:.4f} | {r['oracle_age_acc']:.4f} |")
    g = m["generated"]
    lines += ["", f"Classifier against the oracle on {g['images']} generated images: tone "
              f"{g['classifier_vs_oracle_tone_acc']:.4f}, age {g['classifier_vs_oracle_age_acc']:.4f}.", "",
              "| occupation | g | tone shares (light/medium/tan/dark) | training | TV | dominant | old | train old "
              "| hat | badge |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in m["distributions"]:
        lines.append(f"| {r['occupation']} | {r['guidance']:g} | {'/'.join(f'{s:.2f}' for s in r['tone_shares'])} | "
                     f"{'/'.join(f'{s:.2f}' for s in r['train_tone'])} | {r['tone_tv']:.3f} | "
                     f"{r['dominant_share']:.2f} | {r['old_share']:.2f} | {r['train_old']:.2f} | "
                     f"{r.get('hat_rate', float('nan')):.2f} | {r.get('badge_rate', float('nan')):.2f} |")
    if m.get("guidance1"):
        lines += _guidance1_markdown(m["guidance1"], m.get("n_images", 200))
    c = m.get("text_conditioning")
    if c:
        lines += ["", f"Text conditioning: the miniature CLIP names the occupation of a held-out render with "
                  f"accuracy {c['clip_occupation_acc']:.3f} (the right hat style {c['clip_hat_acc']:.3f}); the "
                  f"text-encoder states of two occupations' prompts have mean cosine "
                  f"{c['text_state_cosine_same_hat']:.2f} when they share a hat style and "
                  f"{c['text_state_cosine_other_hat']:.2f} when not. At guidance 1 the excess tones of an "
                  "occupation are mostly its hat-mates' dominant tones; yet a CLIP trained 2.5x longer, which "
                  "told occupations apart, did not bring the shares closer to the training skew (`BuildConfig`)."]
    lines += ["", "hat, badge: share of images whose hat style / badge colour the oracle reads as the "
              "occupation's (`read_signature`); the on-prompt rate of `evalsuite run` uses the hat.",
              "", f"Throughput: {m['throughput_img_per_s_b64_20steps']} images/s (batch 64, 20 DDIM steps, "
              f"guidance 7.5, {m['threads']} threads)."]
    return "\n".join(lines) + "\n"
