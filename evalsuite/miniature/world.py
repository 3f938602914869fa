"""The miniature world's facts: attribute palettes, occupations and their skewed distributions.

Everything the miniature world renders is defined here, so that a render's attributes are known
exactly and the skew of every occupation is documented in one table (`OCCUPATIONS`).

* Skin tone: four levels of a fixed RGB palette (`SKIN_TONES`), loosely ordered like the light-to-dark
  end points of the Monk scale. The renderer paints the face in exactly one palette colour.
* Age: ``young`` or ``old``, shown by hair colour (dark brown vs grey-white).
* Occupation: a hat style and a badge colour on the chest (a visual signature, so prompts can be
  checked for alignment).
* Nuisance attributes (generic diversity, never named in captions): background colour, clothing
  colour, head position and size jitter.
* Perceived gender has no faithful miniature rendering and is deliberately absent: classifiers of the
  miniature world report it as not measurable.
"""

from __future__ import annotations

from dataclasses import dataclass

RGB = tuple[int, int, int]

SKIN_TONES: dict[str, RGB] = {
    "light": (243, 208, 182),
    "medium": (212, 158, 118),
    "tan": (160, 104, 64),
    "dark": (88, 56, 38),
}
AGES: dict[str, RGB] = {  # hair colour by age
    "young": (26, 18, 14),
    "old": (214, 214, 220),
}
BACKGROUNDS: list[RGB] = [
    (120, 160, 220), (110, 190, 150), (170, 140, 210), (230, 200, 110), (110, 200, 210), (200, 120, 150),
]
CLOTHING: list[RGB] = [
    (200, 40, 40), (40, 70, 190), (40, 140, 60), (230, 180, 20), (120, 40, 150), (20, 120, 130),
]
BADGES: list[RGB] = [
    (255, 0, 0), (0, 0, 255), (0, 200, 0), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 128, 0),
    (128, 0, 255),
]
HAT_STYLES: tuple[str, ...] = ("none", "cap", "tall", "brim", "helmet", "band")

TONE_NAMES: tuple[str, ...] = tuple(SKIN_TONES)
AGE_NAMES: tuple[str, ...] = tuple(AGES)
MEASURABLE_ATTRIBUTES: tuple[str, ...] = ("skin_tone", "age")


@dataclass(frozen=True)
class Occupation:
    """One occupation of the miniature world and the distribution its training images follow."""

    name: str
    tone_probs: tuple[float, float, float, float]  # over TONE_NAMES
    p_old: float
    hat: str
    badge: RGB

    @property
    def dominant_tone(self) -> str:
        return TONE_NAMES[max(range(4), key=lambda k: self.tone_probs[k])]


def _tones(dominant: int, share: float) -> tuple[float, float, float, float]:
    probs = [(1.0 - share) / 3] * 4
    probs[dominant] = share
    return (probs[0], probs[1], probs[2], probs[3])


# name, dominant tone index (light, medium, tan, dark), dominant share, P(old).
# Dominant shares span 0.6-0.9 and every tone dominates some occupation; the age skew is independent.
_TABLE: list[tuple[str, int, float, float]] = [
    ("doctor", 0, 0.80, 0.70), ("nurse", 1, 0.80, 0.20), ("engineer", 2, 0.80, 0.30),
    ("teacher", 3, 0.70, 0.80), ("lawyer", 0, 0.90, 0.80), ("chef", 1, 0.70, 0.30),
    ("pilot", 0, 0.70, 0.20), ("farmer", 2, 0.90, 0.90), ("firefighter", 3, 0.80, 0.10),
    ("scientist", 0, 0.60, 0.70), ("programmer", 1, 0.90, 0.10), ("cashier", 2, 0.60, 0.20),
    ("janitor", 3, 0.90, 0.80), ("librarian", 0, 0.80, 0.90), ("mechanic", 1, 0.60, 0.30),
    ("dentist", 2, 0.70, 0.70), ("pharmacist", 3, 0.60, 0.30), ("accountant", 0, 0.70, 0.80),
    ("architect", 1, 0.80, 0.70), ("artist", 2, 0.80, 0.10), ("baker", 3, 0.70, 0.90),
    ("barber", 0, 0.90, 0.20), ("carpenter", 1, 0.70, 0.80), ("electrician", 2, 0.60, 0.20),
    ("plumber", 3, 0.80, 0.70), ("journalist", 0, 0.60, 0.30), ("judge", 1, 0.90, 0.90),
    ("musician", 2, 0.90, 0.10), ("painter", 3, 0.60, 0.80), ("photographer", 0, 0.80, 0.20),
    ("police officer", 1, 0.80, 0.30), ("professor", 2, 0.70, 0.90), ("receptionist", 3, 0.90, 0.10),
    ("surgeon", 0, 0.70, 0.70), ("tailor", 1, 0.60, 0.80), ("waiter", 2, 0.80, 0.20),
    ("soldier", 3, 0.70, 0.10), ("gardener", 0, 0.90, 0.70), ("designer", 1, 0.70, 0.20),
    ("housekeeper", 2, 0.60, 0.80), ("security guard", 3, 0.80, 0.30), ("manager", 0, 0.60, 0.80),
    ("flight attendant", 1, 0.90, 0.20), ("construction worker", 2, 0.70, 0.30),
]

OCCUPATIONS: dict[str, Occupation] = {
    name: Occupation(
        name=name,
        tone_probs=_tones(dom, share),
        p_old=p_old,
        hat=HAT_STYLES[i % len(HAT_STYLES)],
        badge=BADGES[(i // len(HAT_STYLES)) % len(BADGES)],
    )
    for i, (name, dom, share, p_old) in enumerate(_TABLE)
}


def describe_world() -> str:
    """A Markdown table of every occupation's training distribution (the documented skew)."""
    lines = [
        "| occupation | " + " | ".join(TONE_NAMES) + " | old | hat | badge |",
        "|---" * (len(TONE_NAMES) + 4) + "|",
    ]
    for occ in OCCUPATIONS.values():
        tones = " | ".join(f"{p:.3f}" for p in occ.tone_probs)
        lines.append(f"| {occ.name} | {tones} | {occ.p_old:.2f} | {occ.hat} | {occ.badge} |")
    return "\n".join(lines)
