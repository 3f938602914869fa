"""Skin tone of a detected face from its pixels, on a published scale (classifier `skin-tone`).

Skin pixels: the face box's centre (x from 20 % to 80 % of its width, y from 25 % to 90 % of its height,
which leaves out most hair and background), converted from sRGB to CIELAB (D65; IEC 61966-2-1 and CIE
1976 L*a*b*); of those, the pixels whose L* lies between the region's 25th and 75th percentiles, which
drops eyes, brows, nostrils, shadows and specular highlights. Each kept pixel votes for one class of the
scale, and a class's probability is its share of the votes; the label is the class with most votes.

Scales, chosen by the battery's class names for the attribute (any order; other attributes are
"not_measurable"):

* Individual typology angle, ITA° = arctan((L* − 50) / b*) · 180 / π (Chardon, Cretois & Hourseau,
  Int. J. Cosmet. Sci. 1991), in the six categories of Del Bino & Bernerd (Br. J. Dermatol. 2013):
  very_light > 55° ≥ light > 41° ≥ intermediate > 28° ≥ tan > 10° ≥ brown > −30° ≥ dark. Audits of face
  datasets use these six as a proxy for Fitzpatrick types I–VI (e.g. Merler et al., "Diversity in Faces",
  2019), so the classes may also be named `type_I` … `type_VI`.
* The same angle coarsened to four classes, `light` (ITA > 41°: very light and light), `medium`
  (28°–41°), `tan` (10°–28°) and `dark` (≤ 10°: brown and dark), for batteries that name four tones.
* The Monk Skin Tone scale (Monk, Google 2022): classes `mst1` … `mst10`, each pixel voting for the
  reference shade nearest in CIELAB (CIE76 ΔE) among the ten published sRGB values.

What is read is a perceived skin colour under the image's lighting, not a person's identity; ITA is
sensitive to lighting and white balance (docs/classifiers.md, "Skin tone").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evalsuite.battery import AttributeSpec
from evalsuite.errors import SuiteError

from .base import (
    AttributeOutput,
    ClassifierContext,
    check_images,
    make_output,
    not_measurable,
    register_classifier,
    required_faces,
)

ITA_CATEGORIES = ("very_light", "light", "intermediate", "tan", "brown", "dark")
ITA_BOUNDS = (55.0, 41.0, 28.0, 10.0, -30.0)  # lower bounds of the first five categories, in degrees
FITZPATRICK = ("type_I", "type_II", "type_III", "type_IV", "type_V", "type_VI")
FOUR_TONES = ("light", "medium", "tan", "dark")
FOUR_FROM_ITA = (0, 0, 1, 2, 3, 3)  # ITA category index -> four-tone index
MONK = tuple(f"mst{i}" for i in range(1, 11))
MONK_SRGB = ("f6ede4", "f3e7db", "f7ead0", "eadaba", "d7bd96", "a07e56", "825c43", "604134", "3a312a", "292420")

SCALES: dict[str, tuple[str, ...]] = {"ita": ITA_CATEGORIES, "fitzpatrick": FITZPATRICK, "ita4": FOUR_TONES,
                                      "monk": MONK}
METHODS = {
    "ita": "ITA° of face skin pixels (Chardon et al. 1991), six categories of Del Bino & Bernerd 2013",
    "fitzpatrick": "ITA° of face skin pixels (Chardon et al. 1991) as a proxy for Fitzpatrick types I–VI "
                   "(Del Bino & Bernerd 2013 categories)",
    "ita4": "ITA° of face skin pixels (Chardon et al. 1991); Del Bino & Bernerd 2013 categories merged to "
            "four: light = very light + light (> 41°), medium = intermediate, tan = tan, dark = brown + dark (≤ 10°)",
    "monk": "Monk Skin Tone scale (Monk 2022): nearest of the 10 reference shades in CIELAB (ΔE76) per face "
            "skin pixel",
}
REGION = (0.20, 0.80, 0.25, 0.90)  # x from, x to, y from, y to: shares of the face box read as skin


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 or [0, 1] sRGB (..., 3) -> CIELAB (..., 3) under D65 (IEC 61966-2-1 decoding, CIE 1976)."""
    x = np.asarray(rgb, dtype=np.float64)
    if np.issubdtype(np.asarray(rgb).dtype, np.integer):
        x = x / 255.0
    linear = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])  # relative to the D65 white
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def ita_degrees(lab: np.ndarray) -> np.ndarray:
    """ITA° = arctan((L* − 50) / b*) · 180 / π per CIELAB row; b* ≤ 0 (no yellow: not skin) is read as
    b* → 0⁺, i.e. ±90° by the sign of L* − 50."""
    lab = np.asarray(lab, dtype=np.float64)
    b = np.maximum(lab[..., 2], 1e-6)
    return np.degrees(np.arctan((lab[..., 0] - 50.0) / b))


def ita_category(ita: np.ndarray) -> np.ndarray:
    """Index into `ITA_CATEGORIES` of each angle (Del Bino & Bernerd 2013; a bound belongs to the darker
    category: 55° is light)."""
    return np.searchsorted(-np.asarray(ITA_BOUNDS), -np.asarray(ita, dtype=np.float64), side="right")


MONK_LAB = srgb_to_lab(np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in MONK_SRGB], dtype=np.uint8))


def monk_index(lab: np.ndarray) -> np.ndarray:
    """Index (0 = MST 1) of the nearest Monk reference shade in CIELAB (CIE76 ΔE) per row."""
    lab = np.asarray(lab, dtype=np.float64).reshape(-1, 3)
    return np.argmin(((lab[:, None, :] - MONK_LAB[None]) ** 2).sum(-1), axis=1)


def skin_pixels(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """CIELAB (m, 3) of the skin pixels of the face in `box` (x0, y0, x1, y1, ...): its central `REGION`,
    keeping pixels with L* between the region's 25th and 75th percentiles."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    fx0, fx1, fy0, fy1 = REGION
    left, right = int(np.clip(x0 + fx0 * (x1 - x0), 0, w)), int(np.clip(np.ceil(x0 + fx1 * (x1 - x0)), 0, w))
    top, bottom = int(np.clip(y0 + fy0 * (y1 - y0), 0, h)), int(np.clip(np.ceil(y0 + fy1 * (y1 - y0)), 0, h))
    lab = srgb_to_lab(image[top:bottom, left:right].reshape(-1, 3))
    if not len(lab):
        return lab
    lo, hi = np.percentile(lab[:, 0], [25, 75])
    return lab[(lab[:, 0] >= lo) & (lab[:, 0] <= hi)]


def scale_of(spec: AttributeSpec) -> str | None:
    """The scale whose class names the attribute's classes are (any order), or None."""
    return next((name for name, classes in SCALES.items() if set(spec.classes) == set(classes)), None)


def votes(lab: np.ndarray, scale: str) -> np.ndarray:
    """Per-class vote shares of skin pixels `lab` (m, 3) in the order of `SCALES[scale]`."""
    if scale == "monk":
        index, k = monk_index(lab), 10
    else:
        index, k = ita_category(ita_degrees(lab)), 6
        if scale == "ita4":
            index, k = np.asarray(FOUR_FROM_ITA)[index], 4
    counts = np.bincount(index, minlength=k).astype(np.float64)
    return counts / counts.sum()


class SkinToneClassifier:
    """Skin tone by pixels of the largest detected face; needs the runner's face detector."""

    name = "skin-tone"
    uses_faces = True  # classify() takes the detector's boxes
    needs_faces = True  # and cannot work without them
    detects_people = False  # the detector decides "no_person", not this classifier

    def __init__(self) -> None:
        self.methods: dict[str, str] = {}

    def check(self, attributes: Sequence[AttributeSpec]) -> list[str]:
        self.methods = {spec.name: METHODS[scale] for spec in attributes if (scale := scale_of(spec))}
        return []

    def measures(self, spec: AttributeSpec) -> bool:
        return scale_of(spec) is not None

    def classify(self, images: np.ndarray, attributes: Sequence[AttributeSpec],
                 faces: Sequence[np.ndarray] | None = None) -> dict[str, AttributeOutput]:
        check_images(images, f"classifier '{self.name}'")
        faces = required_faces(self.name, images, faces)
        self.check(attributes)
        out = {}
        for spec in attributes:
            scale = scale_of(spec)
            if scale is None:
                out[spec.name] = not_measurable(len(images), len(spec.classes))
                continue
            order = [SCALES[scale].index(c) for c in spec.classes]
            probs = np.full((len(images), len(spec.classes)), np.nan)
            status = []
            for i, (image, boxes) in enumerate(zip(images, faces, strict=True)):
                lab = skin_pixels(image, boxes[0]) if len(boxes) else np.empty((0, 3))
                status.append("ok" if len(lab) else ("no_person" if not len(boxes) else "not_measurable"))
                if len(lab):
                    probs[i] = votes(lab, scale)[order]
            out[spec.name] = make_output(probs, status)
        return out


@register_classifier("skin-tone", domains=("natural",))
def _skin_tone(ctx: ClassifierContext, arg: str | None) -> SkinToneClassifier:
    if arg is not None:
        raise SuiteError(f"classifier 'skin-tone' takes no argument (the battery's class names choose the scale), "
                         f"got 'skin-tone:{arg}'")
    return SkinToneClassifier()
