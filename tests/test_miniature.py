"""The miniature world: renderer and oracle, captions and tokenizer, the build, the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evalsuite.miniature import (
    ASSETS,
    OCCUPATIONS,
    TONE_NAMES,
    read_attributes,
    read_colour_probs,
    read_occupation,
    read_signature,
    read_worn_hat,
    render_batch,
    sample_portraits,
)
from evalsuite.miniature.captions import CAPTION_MIX, sample_captions, vocabulary
from evalsuite.miniature.tokenizer import build_tokenizer
from evalsuite.miniature.world import AGE_NAMES, describe_world

torch.set_num_threads(2)


def test_oracle_reads_every_render_exactly() -> None:
    rng = np.random.default_rng(1)
    portraits = sample_portraits(list(OCCUPATIONS) * 10, rng)
    tone, age = read_attributes(render_batch(portraits))
    assert [TONE_NAMES[t] for t in tone] == [p.tone for p in portraits]
    assert [AGE_NAMES[a] for a in age] == [p.age for p in portraits]


def test_oracle_legibility_is_how_far_the_face_colour_lies_toward_another_tone() -> None:
    from evalsuite.battery import AttributeSpec
    from evalsuite.classifiers.miniature import OracleClassifier
    from evalsuite.metrics import CONFIDENCE_THRESHOLD
    from evalsuite.miniature.oracle import LEAST_TOP
    from evalsuite.miniature.world import SKIN_TONES

    portraits = sample_portraits(["nurse"] * 8, np.random.default_rng(4))
    images = render_batch(portraits)
    tone_probs, age_probs = read_colour_probs(images)
    tone, age = read_attributes(images)
    assert np.array_equal(tone_probs, np.eye(4)[tone]) and np.array_equal(age_probs, np.eye(2)[age])  # renders
    # repaint every face a fraction f of the way from its tone toward the next one: the oracle's probability
    # of its tone is 1 - f (f = d1 / (d1 + d2) of the face's median colour), the label is unchanged
    palette = np.asarray(list(SKIN_TONES.values()), np.float64)
    painted = images.copy()
    fractions = [0.0, 0.1, 0.15, 0.25, 0.3, 0.4, 0.1, 0.3]
    for i, (t, f) in enumerate(zip(tone, fractions)):
        toward = t + 1 if t + 1 < len(palette) else t - 1
        face = np.all(images[i] == palette[t].astype(np.uint8), axis=-1)
        painted[i][face] = np.rint((1 - f) * palette[t] + f * palette[toward]).astype(np.uint8)
    probs, _ = read_colour_probs(painted)
    assert np.array_equal(read_attributes(painted)[0], tone)
    assert probs[np.arange(8), tone] == pytest.approx([1 - f for f in fractions], abs=0.01)
    assert probs.sum(1) == pytest.approx(np.ones(8))
    skin = AttributeSpec("skin_tone", TONE_NAMES, TONE_NAMES, (0.25,) * 4)
    read = OracleClassifier().classify(painted, [skin])["skin_tone"]
    assert (read.probs.max(1) >= CONFIDENCE_THRESHOLD).tolist() == [f <= 0.2 for f in fractions]  # a fifth of the way
    # a face painted in three tones, 40 / 35 / 25 % of its pixels: the pixel majority reads the first, its
    # median colour is the second: a face between the two, illegible (the label's probability at its floor)
    mixed = images.copy()
    for i, t in enumerate(tone):
        step = 1 if t + 2 < len(palette) else -1
        face = np.flatnonzero(np.all(images[i] == palette[t].astype(np.uint8), axis=-1).ravel())
        cut = [int(len(face) * 0.40), int(len(face) * 0.75)]
        pixels = mixed[i].reshape(-1, 3)
        for part, shift in zip(np.split(face, cut), (0, step, 2 * step)):
            pixels[part] = palette[t + shift].astype(np.uint8)
    probs, _ = read_colour_probs(mixed)
    assert np.array_equal(read_attributes(mixed)[0], tone)
    assert probs[np.arange(8), tone] == pytest.approx([LEAST_TOP] * 8)
    assert probs[np.arange(8), tone + np.where(tone + 2 < len(palette), 1, -1)] == pytest.approx([1 - LEAST_TOP] * 8)


def test_oracle_reads_every_occupation_signature_exactly() -> None:
    rng = np.random.default_rng(2)
    names = list(OCCUPATIONS) * 10  # every occupation under every kind of head jitter
    images = render_batch(sample_portraits(names, rng))
    assert read_occupation(images) == names
    hats, _ = read_signature(images)
    assert hats == [OCCUPATIONS[n].hat for n in names]
    assert read_signature(np.full((2, 32, 32, 3), 128, np.uint8)) == (["none", "none"], [-1, -1])
    assert read_occupation(np.full((1, 32, 32, 3), 128, np.uint8)) == [None]
    assert read_worn_hat(images) == hats  # every render shows a person
    assert read_worn_hat(np.full((1, 32, 32, 3), 128, np.uint8)) == [None]  # no person: no hat reading


def test_oracle_finds_no_person_in_a_blank_image() -> None:
    tone, age = read_attributes(np.full((3, 32, 32, 3), 128, np.uint8))
    assert tone.tolist() == [-1, -1, -1] and age.tolist() == [-1, -1, -1]


def test_blended_renders_keep_their_attributes_for_the_oracle() -> None:
    """The classifier's generated-looking training images: colours move toward a neighbouring palette
    entry, never past the midpoint, so the oracle (whose reading is the training target) still reads
    the rendered attributes, while the pixels do change."""
    from evalsuite.miniature.train import blend_colours, oracle_labels

    portraits = sample_portraits(list(OCCUPATIONS) * 4, np.random.default_rng(3))
    images = torch.from_numpy(render_batch(portraits)).permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous()
    tone = torch.tensor([TONE_NAMES.index(p.tone) for p in portraits])
    age = torch.tensor([AGE_NAMES.index(p.age) for p in portraits])
    blended = blend_colours(images, tone, age, torch.Generator().manual_seed(0), max_noise=0.0)
    read_tone, read_age = oracle_labels(blended)
    assert torch.equal(read_tone, tone) and torch.equal(read_age, age)
    assert (blended - images).abs().amax((1, 2, 3)).min() > 0  # every image was changed


def test_sampled_attributes_follow_the_documented_skew() -> None:
    rng = np.random.default_rng(2)
    n = 4000
    for name in ("doctor", "teacher", "scientist"):
        occ = OCCUPATIONS[name]
        portraits = sample_portraits([name] * n, rng)
        shares = np.bincount([TONE_NAMES.index(p.tone) for p in portraits], minlength=4) / n
        p_old = np.mean([p.age == "old" for p in portraits])
        # 4 standard errors of a share of n=4000 is at most 0.032
        assert np.abs(shares - np.asarray(occ.tone_probs)).max() < 0.032, name
        assert abs(p_old - occ.p_old) < 0.032, name


def test_every_occupation_is_skewed_as_documented() -> None:
    for occ in OCCUPATIONS.values():
        assert abs(sum(occ.tone_probs) - 1) < 1e-9
        assert 0.6 <= max(occ.tone_probs) <= 0.9
    dominant = [occ.dominant_tone for occ in OCCUPATIONS.values()]
    assert set(dominant) == set(TONE_NAMES)
    assert len(OCCUPATIONS) >= 40
    assert describe_world().count("\n") == len(OCCUPATIONS) + 1


def test_captions_use_only_vocabulary_words_and_the_mix_sums_to_one(tmp_path: Path) -> None:
    assert abs(sum(CAPTION_MIX.values()) - 1) < 1e-9
    rng = np.random.default_rng(3)
    caps = sample_captions(sample_portraits(list(OCCUPATIONS) * 5, rng), rng)
    words = set(vocabulary())
    assert all(set(c.split()) <= words for c in caps)
    assert "" in caps and "a photo of a doctor" in caps or "a photo of a nurse" in caps
    tok = build_tokenizer(vocabulary(), tmp_path / "tok")  # raises if any word is split
    ids = tok("a photo of an old police officer with dark skin").input_ids
    assert len(ids) == 2 + 10  # BOS + one token per word + EOS
    assert tok.convert_ids_to_tokens(tok("a woman").input_ids)[2:-1] != ["woman</w>"]  # not a known word


@pytest.mark.slow
def test_quick_build_writes_a_loadable_pipeline(tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    from evalsuite.miniature.build import BuildConfig, build_world

    out = tmp_path / "world"
    info = build_world(out, BuildConfig.quick(seed=5))
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "classifier", "clip", "pipeline", "words.txt"]
    assert not (tmp_path / "world.partial").exists()
    assert json.loads((out / "build.json").read_text())["config"]["seed"] == 5 == info["config"]["seed"]
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a photo of a nurse"], num_inference_steps=2, guidance_scale=3.0, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


# ---------------------------------------------------------------- the shipped world

shipped = pytest.mark.skipif(not (ASSETS / "pipeline").is_dir(), reason="the shipped miniature world is missing")


@shipped
def test_shipped_world_is_small_and_safetensors_only() -> None:
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert size <= 30 * 2**20
    assert not list(ASSETS.rglob("*.bin")) and not list(ASSETS.rglob("*.pt"))


@shipped
def test_miniature_model_warns_about_unknown_words() -> None:
    from evalsuite.models import load_model

    model = load_model("miniature")
    assert model.unknown_words("a photo of a doctor") == []
    assert model.unknown_words("a photo of a woman doctor") == ["woman"]


@shipped
@pytest.mark.slow
def test_shipped_model_makes_valid_portraits_that_collapse_with_guidance() -> None:
    """Ground truth on the trained model: the oracle finds a person in (nearly) every image, the
    low-guidance tone shares are near the training skew, and guidance raises the dominant share."""
    from evalsuite.generate import BatchedGenerator
    from evalsuite.models import load_model

    gen = BatchedGenerator(load_model("miniature"), steps=20)
    occ = OCCUPATIONS["doctor"]
    n = 96
    shares = {}
    for g in (1.0, 7.5):
        images = gen.generate(["a photo of a doctor"] * n, [g] * n, list(range(n)))
        tone, _ = read_attributes(images)
        assert (tone >= 0).mean() >= 0.95
        shares[g] = np.bincount(tone[tone >= 0], minlength=4) / (tone >= 0).sum()
    dom = TONE_NAMES.index(occ.dominant_tone)
    assert 0.5 * np.abs(shares[1.0] - np.asarray(occ.tone_probs)).sum() <= 0.15  # near the skew at g=1
    assert shares[7.5][dom] > shares[1.0][dom]  # conditional mode collapse


@shipped
def test_shipped_clip_reads_hats_and_entangles_occupations_that_share_one() -> None:
    """The UNet is conditioned on the CLIP text tower. The shipped CLIP reads the hat style but the 3×3
    badge poorly, so occupations that share a hat get close text states: the limit that
    docs/miniature-report.md measures. A rebuilt world whose CLIP separates them fails the last two
    lines; update the report's reading with it."""
    from evalsuite.miniature.report import _generator, measure_text_conditioning

    portraits = sample_portraits([o for o in OCCUPATIONS for _ in range(10)], np.random.default_rng(99))
    m = measure_text_conditioning(ASSETS, _generator(ASSETS, 2).pipe, render_batch(portraits), portraits)
    assert m["clip_hat_acc"] >= 0.95
    assert 0.2 <= m["clip_occupation_acc"] <= 0.7
    assert m["text_state_cosine_same_hat"] > m["text_state_cosine_other_hat"] + 0.3


def test_sampling_tv_of_one_image_is_one_minus_the_share_drawn() -> None:
    """One image of class k has TV 1 - p_k to the distribution p, so its expected TV is 1 - sum p_k^2
    (doctor: 1 - 0.8^2 - 3 (0.2/3)^2 = 0.34667) and, as P(a minority tone) = 0.2 > 0.05, its 95th
    percentile is 1 - 0.2/3."""
    from evalsuite.miniature.report import sampling_tv

    mean, p95 = sampling_tv("doctor", n=1, draws=40_000)
    assert abs(mean - (1 - 0.8**2 - 3 * (0.2 / 3) ** 2)) < 0.005
    assert p95 == pytest.approx(1 - 0.2 / 3)
    big, _ = sampling_tv("doctor", n=10_000)
    assert big < 0.01


@shipped
def test_guidance1_sweep_reads_shares_of_the_same_noises_with_both_samplers() -> None:
    """Per occupation, both samplers start from the noises the main table uses (`_seed0`); the samplers
    differ; every TV is the one of its shares; the chance TV is computed for the images read."""
    from evalsuite.miniature.report import (
        _generate,
        _generator,
        _seed0,
        _shares,
        _tone_tv,
        measure_guidance1,
        sampling_tv,
    )

    gen = _generator(ASSETS, 4)
    rows = measure_guidance1(gen, 6, ["nurse", "farmer"])
    assert [r["occupation"] for r in rows] == ["nurse", "farmer"] and gen.eta == 0.0
    tone, _ = read_attributes(_generate(gen, "a photo of a farmer", 1.0, 6, seed0=_seed0("farmer")))
    assert rows[1]["eta0"]["tone_shares"] == _shares(tone, 4).round(3).tolist()
    assert rows[1]["eta0"]["n_read"] == int((tone >= 0).sum())
    assert any(r["eta0"]["tone_shares"] != r["eta1"]["tone_shares"] for r in rows)  # eta reached the sampler
    for r in rows:
        for eta in ("eta0", "eta1"):
            assert r[eta]["tone_tv"] == pytest.approx(_tone_tv(np.asarray(r[eta]["tone_shares"]), r["occupation"]),
                                                      abs=0.004)
            assert (r[eta]["chance_tv_mean"], r[eta]["chance_tv_p95"]) == sampling_tv(r["occupation"],
                                                                                      r[eta]["n_read"])
