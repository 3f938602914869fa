"""Captions and vocabulary of the miniature world.

Captions follow the default battery's template ("a photo of a {occupation}") plus attribute-explicit
forms ("a photo of an old nurse with dark skin") and person-only forms used by zero-shot classifiers
("a photo of a person with dark skin"). The empty caption is the unconditional prompt of
classifier-free guidance (caption dropout).
"""

from __future__ import annotations

import numpy as np

from .render import Portrait
from .world import AGE_NAMES, OCCUPATIONS, TONE_NAMES

# share of each caption form in the training data (sums to 1)
CAPTION_MIX: dict[str, float] = {
    "plain": 0.50,      # a photo of a {occupation}
    "tone": 0.12,       # a photo of a {occupation} with {tone} skin
    "age": 0.12,        # a photo of a {age} {occupation}
    "both": 0.08,       # a photo of a {age} {occupation} with {tone} skin
    "person": 0.08,     # a photo of a person with {tone} skin / a photo of a {age} person / both
    "empty": 0.10,      # caption dropout (unconditional)
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(p: Portrait, form: str) -> str:
    """The caption of one portrait in one form of `CAPTION_MIX` (attribute words are the truth)."""
    occ, tone, age = p.occupation, p.tone, p.age
    if form == "plain":
        return f"a photo of a {occ}"
    if form == "tone":
        return f"a photo of a {occ} with {tone} skin"
    if form == "age":
        return f"a photo of {_article(age)} {age} {occ}"
    if form == "both":
        return f"a photo of {_article(age)} {age} {occ} with {tone} skin"
    if form == "empty":
        return ""
    raise ValueError(f"unknown caption form {form!r}")


def sample_captions(portraits: list[Portrait], rng: np.random.Generator) -> list[str]:
    forms = list(CAPTION_MIX)
    picks = rng.choice(len(forms), size=len(portraits), p=np.asarray(list(CAPTION_MIX.values())))
    out = []
    for p, k in zip(portraits, picks):
        form = forms[int(k)]
        if form == "person":  # choose the person variant with the same rng, not hash()
            v = int(rng.integers(3))
            age_art = _article(p.age)
            out.append((f"a photo of a person with {p.tone} skin", f"a photo of {age_art} {p.age} person",
                        f"a photo of {age_art} {p.age} person with {p.tone} skin")[v])
        else:
            out.append(caption(p, form))
    return out


def vocabulary() -> list[str]:
    """Every word the miniature world's captions use, sorted."""
    words = {"a", "an", "photo", "of", "with", "skin", "person", *TONE_NAMES, *AGE_NAMES}
    for name in OCCUPATIONS:
        words.update(name.split())
    return sorted(words)
