"""The exact oracle: read skin tone, age and the occupation signature back from a miniature render.

Each pixel is assigned to the nearest colour of the world's full palette (skin tones, hair colours,
backgrounds, clothing, badges, hats, eyes, mouth). The skin tone is the tone with the most face
pixels, the age the hair colour with the most hair pixels. On renders this is exact (every pixel is a
palette colour); on generated images it is a nearest-palette reading, which is checked against the
truth on VAE reconstructions of renders in the tests. An image with too few skin or hair pixels has
"no person" (label -1).

How legibly a face shows its tone is read from the same pixels (`read_colour_probs`): the median colour
of the face's skin pixels lies a fraction f = d1 / (d1 + d2) of the way from the tone read to the
nearest other tone (d1, d2: RGB distances to the two), 0 for a render, 1/2 for a face painted exactly
between two tones, above 1/2 where the median lies nearer another tone than the pixel majority's (a face
split over three tones). The `oracle` classifier reports 1 - f (at least `LEAST_TOP`) for the tone it
reads and the rest for that other tone as its probabilities, so its confidence (top >= 0.8, the line
the classifiers use: f <= 0.2, the colour within a fifth of the way to another tone) is legibility
judged by the truth, not by a classifier a policy may have been trained against. The median, not the
pixel count, because decoded faces have soft edges: on the base model at guidance 7.5 a face's pixels
split 80/20 between tones while its median colour sits close to one tone. Hair (age) is read the same way.

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


LEAST_TOP = 0.51
"""The least probability `read_colour_probs` gives the label read, so that the label stays the argmax."""


def _colour_probs(images: np.ndarray, nearest: np.ndarray, labels: np.ndarray, first: int,
                  colours: list[tuple[int, int, int]]) -> np.ndarray:
    """(n, K) probabilities over `colours` (PALETTE[first:first + K]) from the median colour of each
    image's pixels nearest to one of them (module docstring); zeros where `labels` is -1."""
    palette = np.asarray(colours, dtype=np.float64)
    k = len(colours)
    out = np.zeros((len(images), k))
    for i in np.flatnonzero(labels >= 0):
        mine = (nearest[i] >= first) & (nearest[i] < first + k)
        median = np.median(images[i][mine].astype(np.float64), axis=0)
        d = np.linalg.norm(palette - median, axis=1)
        label = int(labels[i])
        other = min((j for j in range(k) if j != label), key=lambda j: d[j])  # the nearest colour but the label
        f = d[label] / max(d[label] + d[other], 1e-12)  # above 1/2 where the median lies nearer `other`
        out[i, label] = max(1.0 - f, LEAST_TOP)
        out[i, other] = 1.0 - out[i, label]
    return out


def read_colour_probs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per uint8 image (n, H, W, 3), how legibly it shows its skin tone, (n, len(SKIN_TONES)), and its
    hair colour, (n, len(AGES)): 1 - f for the label `read_attributes` gives and f for the nearest other
    colour, f = d1 / (d1 + d2) from the distances of the median colour of the face's skin (hair) pixels
    to the two (module docstring). The label's entry is at least LEAST_TOP, so it stays the argmax (a
    median nearer another tone than the pixel majority's is a face between the two); rows of zeros where
    no person is found. One-hot on renders."""
    nearest = _nearest(images)
    tone, age = _tone_age(nearest)
    return (_colour_probs(images, nearest, tone, 0, _SKIN),
            _colour_probs(images, nearest, age, len(_SKIN), _HAIR))


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
