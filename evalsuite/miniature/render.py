"""Render 32×32 miniature portraits whose attributes are known exactly.

Every pixel is painted with one colour of a fixed palette (no noise, no anti-aliasing), so the
attributes of a render can be read back exactly (`evalsuite.miniature.oracle`). Layout, top to
bottom: hat (occupation), hair (age), face (skin tone) with two eyes and a mouth, neck, clothing
(nuisance colour) with a badge (occupation colour); the head's position and size jitter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import AGE_NAMES, AGES, BACKGROUNDS, CLOTHING, OCCUPATIONS, RGB, SKIN_TONES, TONE_NAMES

SIZE = 32
EYES: RGB = (60, 60, 160)
MOUTH: RGB = (170, 50, 70)
HATS: dict[str, RGB] = {
    "cap": (30, 40, 110), "tall": (236, 236, 120), "brim": (20, 90, 40), "helmet": (235, 95, 20),
    "band": (150, 30, 120),
}


@dataclass(frozen=True)
class Portrait:
    """The full description of one render: named attributes plus nuisance draws."""

    occupation: str
    tone: str
    age: str
    background: int
    clothing: int
    dx: int  # head offset in pixels, -2..2
    dy: int  # -1..1
    radius: int  # 5 or 6


def sample_portraits(
    occupations: list[str], rng: np.random.Generator, tone: str | None = None, age: str | None = None
) -> list[Portrait]:
    """Draw one portrait per occupation name from that occupation's documented distribution.

    `tone` / `age` force an attribute (for attribute-explicit captions and balanced references).
    """
    out = []
    for name in occupations:
        occ = OCCUPATIONS[name]
        t = tone or TONE_NAMES[int(rng.choice(4, p=np.asarray(occ.tone_probs)))]
        a = age or AGE_NAMES[int(rng.random() < occ.p_old)]
        out.append(Portrait(
            occupation=name, tone=t, age=a,
            background=int(rng.integers(len(BACKGROUNDS))), clothing=int(rng.integers(len(CLOTHING))),
            dx=int(rng.integers(-2, 3)), dy=int(rng.integers(-1, 2)), radius=int(rng.integers(5, 7)),
        ))
    return out


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE]


def render(p: Portrait) -> np.ndarray:
    """One portrait as a uint8 array of shape (32, 32, 3)."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[p.background]
    cx, cy, rx = 16 + p.dx, 13 + p.dy, p.radius
    ry = rx + 1
    skin, hair = SKIN_TONES[p.tone], AGES[p.age]

    # clothing: a trapezoid from the shoulders down, and the neck
    body = (_YY >= 23) & (np.abs(_XX - cx) <= 7 + (_YY - 23) * 0.6)
    img[body] = CLOTHING[p.clothing]
    img[(_YY >= cy + ry - 1) & (_YY < 24) & (np.abs(_XX - cx) <= 2)] = skin
    badge = (_YY >= 26) & (_YY <= 28) & (_XX >= cx + 2) & (_XX <= cx + 4)
    img[badge] = OCCUPATIONS[p.occupation].badge

    # hair: a slightly larger ellipse behind the head, then the face over it
    e_head = ((_XX - cx) / rx) ** 2 + ((_YY - cy) / ry) ** 2
    e_hair = ((_XX - cx) / (rx + 1.3)) ** 2 + ((_YY - cy + 0.8) / (ry + 1.0)) ** 2
    img[(e_hair <= 1.0) & (_YY <= cy + 2)] = hair
    img[e_head <= 1.0] = skin
    img[(e_head <= 1.0) & (_YY < cy - ry * 0.45)] = hair  # fringe
    img[cy, cx - 2] = EYES
    img[cy, cx + 2] = EYES
    img[cy + 3, cx - 1:cx + 2] = MOUTH

    hat = OCCUPATIONS[p.occupation].hat
    top = cy - ry - 1
    if hat == "cap":
        img[max(top - 1, 0):top + 1, cx - rx:cx + rx + 1] = HATS[hat]
        img[top:top + 1, cx:cx + rx + 3] = HATS[hat]
    elif hat == "tall":
        img[max(top - 4, 0):top + 1, cx - rx + 1:cx + rx] = HATS[hat]
    elif hat == "brim":
        img[max(top - 2, 0):top, cx - rx + 1:cx + rx] = HATS[hat]
        img[top:top + 1, cx - rx - 2:cx + rx + 3] = HATS[hat]
    elif hat == "helmet":
        dome = (((_XX - cx) / (rx + 1.5)) ** 2 + ((_YY - top) / 3.0) ** 2 <= 1.0) & (_YY <= top)
        img[dome] = HATS[hat]
    elif hat == "band":
        img[max(top - 1, 0):top, cx - rx:cx + rx + 1] = HATS[hat]
    return img


def render_batch(portraits: list[Portrait]) -> np.ndarray:
    """Portraits as a uint8 array of shape (n, 32, 32, 3)."""
    return np.stack([render(p) for p in portraits]) if portraits else np.zeros((0, SIZE, SIZE, 3), np.uint8)
