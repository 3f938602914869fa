"""The exact oracle: read skin tone and age back from a miniature render's pixels.

Each pixel is assigned to the nearest colour of the world's full palette (skin tones, hair colours,
backgrounds, clothing, badges, hats, eyes, mouth). The skin tone is the tone with the most face
pixels, the age the hair colour with the most hair pixels. On renders this is exact (every pixel is a
palette colour); on generated images it is a nearest-palette reading, which is checked against the
truth on VAE reconstructions of renders in the tests. An image with too few skin or hair pixels has
"no person" (label -1).
"""

from __future__ import annotations

import numpy as np

from .render import EYES, HATS, MOUTH
from .world import AGES, BACKGROUNDS, BADGES, CLOTHING, SKIN_TONES

_SKIN = list(SKIN_TONES.values())
_HAIR = list(AGES.values())
_OTHER = list(BACKGROUNDS) + list(CLOTHING) + list(BADGES) + list(HATS.values()) + [EYES, MOUTH]
PALETTE = np.asarray(_SKIN + _HAIR + _OTHER, dtype=np.float32)  # (P, 3): every colour a render uses
MIN_SKIN_PIXELS = 12
MIN_HAIR_PIXELS = 6


def read_attributes(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Skin-tone and age labels of uint8 images (n, H, W, 3); -1 where no person is found.

    Labels index `world.TONE_NAMES` and `world.AGE_NAMES`.
    """
    pixels = images.reshape(len(images), -1, 1, 3)
    nearest = np.zeros(pixels.shape[:2], dtype=np.int64)  # (n, pixels): index into PALETTE
    for i in range(0, len(images), 256):  # chunks: the difference array takes 400 kB per 32x32 image
        nearest[i:i + 256] = np.argmin(((pixels[i:i + 256].astype(np.float32) - PALETTE) ** 2).sum(-1), axis=-1)
    counts = np.stack([(nearest == k).sum(1) for k in range(len(_SKIN) + len(_HAIR))], axis=1)
    skin, hair = counts[:, : len(_SKIN)], counts[:, len(_SKIN):]
    person = (skin.sum(1) >= MIN_SKIN_PIXELS) & (hair.sum(1) >= MIN_HAIR_PIXELS)
    tone = np.where(person, skin.argmax(1), -1)
    age = np.where(person, hair.argmax(1), -1)
    return tone.astype(np.int64), age.astype(np.int64)
