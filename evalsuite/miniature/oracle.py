"""The exact oracle: read skin tone, age and the occupation signature back from a miniature render.

Each pixel is assigned to the nearest colour of the world's full palette (skin tones, hair colours,
backgrounds, clothing, badges, hats, eyes, mouth). The skin tone is the tone with the most face
pixels, the age the hair colour with the most hair pixels. On renders this is exact (every pixel is a
palette colour); on generated images it is a nearest-palette reading, which is checked against the
truth on VAE reconstructions of renders in the tests. An image with too few skin or hair pixels has
"no person" (label -1).

The occupation is read from its signature (`world.OCCUPATIONS`: a hat style, each style with its own
colour, and a badge colour): the hat is the hat colour with the most pixels in the rows above the
face (none below `MIN_HAT_PIXELS`), the badge the badge colour with the most pixels in the badge rows
(none below `MIN_BADGE_PIXELS`); the occupation is the one with that pair, if any. Every occupation
has its own pair, so on renders this is exact too.
"""

from __future__ import annotations

import numpy as np

from .render import EYES, HATS, MOUTH
from .world import AGES, BACKGROUNDS, BADGES, CLOTHING, OCCUPATIONS, SKIN_TONES

_SKIN = list(SKIN_TONES.values())
_HAIR = list(AGES.values())
_OTHER = list(BACKGROUNDS) + list(CLOTHING) + list(BADGES) + list(HATS.values()) + [EYES, MOUTH]
PALETTE = np.asarray(_SKIN + _HAIR + _OTHER, dtype=np.float32)  # (P, 3): every colour a render uses
MIN_SKIN_PIXELS = 12
MIN_HAIR_PIXELS = 6
MIN_HAT_PIXELS = 5  # the smallest hat (a band) has 11 pixels
MIN_BADGE_PIXELS = 3  # a badge has 9
HAT_ROWS = slice(0, 9)  # a hat sits at rows 0-7 whatever the head's jitter
BADGE_ROWS = slice(25, 30)  # the badge covers rows 26-28
_HAT_NAMES = list(HATS)
_HAT_AT = len(_SKIN) + len(_HAIR) + len(BACKGROUNDS) + len(CLOTHING) + len(BADGES)  # first hat in PALETTE
_BADGE_AT = len(_SKIN) + len(_HAIR) + len(BACKGROUNDS) + len(CLOTHING)
_SIGNATURES = {(o.hat, BADGES.index(o.badge)): name for name, o in OCCUPATIONS.items()}


def _nearest(images: np.ndarray) -> np.ndarray:
    """(n, H, W) index into PALETTE of every pixel's nearest palette colour."""
    pixels = images.reshape(len(images), -1, 1, 3)
    nearest = np.zeros(pixels.shape[:2], dtype=np.int64)
    for i in range(0, len(images), 256):  # chunks: the difference array takes 400 kB per 32x32 image
        nearest[i:i + 256] = np.argmin(((pixels[i:i + 256].astype(np.float32) - PALETTE) ** 2).sum(-1), axis=-1)
    return nearest.reshape(images.shape[:3])


def _signature(nearest: np.ndarray) -> tuple[list[str], list[int]]:
    hats = np.stack([(nearest[:, HAT_ROWS] == _HAT_AT + k).sum((1, 2)) for k in range(len(_HAT_NAMES))], 1)
    badges = np.stack([(nearest[:, BADGE_ROWS] == _BADGE_AT + k).sum((1, 2)) for k in range(len(BADGES))], 1)
    hat = [_HAT_NAMES[int(h.argmax())] if h.max() >= MIN_HAT_PIXELS else "none" for h in hats]
    badge = [int(b.argmax()) if b.max() >= MIN_BADGE_PIXELS else -1 for b in badges]
    return hat, badge


def _tone_age(nearest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = nearest.reshape(len(nearest), -1)
    counts = np.stack([(flat == k).sum(1) for k in range(len(_SKIN) + len(_HAIR))], axis=1)
    skin, hair = counts[:, : len(_SKIN)], counts[:, len(_SKIN):]
    person = (skin.sum(1) >= MIN_SKIN_PIXELS) & (hair.sum(1) >= MIN_HAIR_PIXELS)
    tone = np.where(person, skin.argmax(1), -1)
    age = np.where(person, hair.argmax(1), -1)
    return tone.astype(np.int64), age.astype(np.int64)


def read_signature(images: np.ndarray) -> tuple[list[str], list[int]]:
    """The hat style ("none" where no hat is found) and the badge (an index into `world.BADGES`, -1
    where none is found) of each uint8 image (n, H, W, 3)."""
    return _signature(_nearest(images))


def read_occupation(images: np.ndarray) -> list[str | None]:
    """The occupation whose signature (hat, badge colour) each uint8 image (n, H, W, 3) shows, or None
    where the pair read is no occupation's."""
    return [_SIGNATURES.get(pair) for pair in zip(*read_signature(images))]


def read_worn_hat(images: np.ndarray) -> list[str | None]:
    """The hat style each uint8 image (n, H, W, 3) shows ("none" for a bare head), or None where no
    person is found (`read_attributes`'s rule): the truth behind the on-prompt rate. One palette pass."""
    nearest = _nearest(images)
    tone, _ = _tone_age(nearest)
    return [hat if t >= 0 else None for hat, t in zip(_signature(nearest)[0], tone)]


def read_attributes(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Skin-tone and age labels of uint8 images (n, H, W, 3); -1 where no person is found.

    Labels index `world.TONE_NAMES` and `world.AGE_NAMES`.
    """
    return _tone_age(_nearest(images))
