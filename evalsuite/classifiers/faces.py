"""Face detection on natural images, run before the attribute classifiers (`FaceDetector` in base.py).

`opencv-haar` (the built-in detector): OpenCV's boosted Haar-feature frontal-face cascade
`haarcascade_frontalface_alt.xml` on the grey image. `opencv-haar-profile`: the same, plus the profile
cascade `haarcascade_profileface.xml` on the image and on its mirror image (the cascade knows one side
only); it finds faces seen from the side too, at about four times the time.
Sources: Viola & Jones, "Rapid Object Detection using a Boosted Cascade of Simple Features", CVPR 2001
(the cascade, the integral image); Lienhart & Maydt, "An Extended Set of Haar-like Features for Rapid
Object Detection", ICIP 2002 (the extended features and the frontal cascades, trained by Lienhart); the
profile cascade's header credits David Bradley (Princeton). Raw detections are grouped by OpenCV
(`groupRectangles`); a box's score is the number of raw detections merged into it ("neighbours"), and a
box is kept when that number exceeds the cascade's `min_neighbors`.

The settings (`HaarSettings()`, `PROFILE_SETTINGS`: cascade, scale step, neighbour thresholds, histogram
equalisation) were chosen by `bench/face_detector.py` on a tuning split of real labelled photos that
installed packages ship (scikit-image's LFW subset, Huang et al. 2007, and scikit-image's photographs),
among the three frontal cascades, with and without the profile pass, scikit-image's LBP cascade and
dlib's HOG detector; the figures reported come from the held-out split (docs/classifiers.md, "Face
detection"; bench/results/face_detector.txt).

Nothing is downloaded: the cascades are XML files inside the `opencv-python-headless` wheel (OpenCV 4:
OpenCV 5 dropped the cascade classifier and its files), read by OpenCV's own parser (no pickle, no code
runs because of a data file). Licences: OpenCV 4.5 and later is Apache 2.0; the cascade files carry in
their header the "Intel License Agreement For Open Source Computer Vision Library" (Copyright 2000 Intel
Corporation), a permissive BSD-style licence (redistribution keeps the notice, no endorsement).
evalsuite does not redistribute the files: it reads them from the installed OpenCV package.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evalsuite.errors import SuiteError

from .base import ClassifierContext, check_images, register_detector

NATURAL = ("natural",)
CASCADES = {
    "default": "haarcascade_frontalface_default.xml",
    "alt": "haarcascade_frontalface_alt.xml",
    "alt2": "haarcascade_frontalface_alt2.xml",
    "profile": "haarcascade_profileface.xml",
}
SAME_FACE = 0.5  # two boxes whose intersection covers more than this share of the smaller one are one face


@dataclass(frozen=True)
class HaarSettings:
    """What `HaarFaceDetector` runs.

    `frontal`: the frontal cascade (a key of CASCADES). `min_neighbors`: a frontal box needs more raw
    detections than this. `profile_min_neighbors`: likewise for the profile cascade (run on the image and
    its mirror); None runs no profile pass. `scale_factor`: the step between the scales scanned.
    `equalize`: histogram-equalise the grey image first. A face must be at least
    max(`min_size_px`, `min_size_frac` × the image's shorter side) pixels wide: that floor is a design
    choice (a face smaller than 5 % of the image is too small for the attribute classifiers), not tuned."""

    frontal: str = "alt"
    scale_factor: float = 1.2
    min_neighbors: int = 2
    profile_min_neighbors: int | None = None
    equalize: bool = False
    min_size_frac: float = 0.05
    min_size_px: int = 24

    def label(self) -> str:
        profile = "none" if self.profile_min_neighbors is None else f">{self.profile_min_neighbors}"
        return (f"frontal={self.frontal} neighbours>{self.min_neighbors} profile={profile} "
                f"scale={self.scale_factor} equalize={'yes' if self.equalize else 'no'}")


def _cv2() -> object:
    """OpenCV 4, which has the cascade classifier and ships its cascade files (OpenCV 5 has neither)."""
    try:
        import cv2
    except ImportError:
        raise SuiteError("detector 'opencv-haar' needs OpenCV 4: pip install 'opencv-python-headless>=4.10,<5'") \
            from None
    if not hasattr(cv2, "CascadeClassifier"):
        raise SuiteError(f"detector 'opencv-haar' needs OpenCV 4, which has the Haar cascades; OpenCV "
                         f"{cv2.__version__} has none: pip install 'opencv-python-headless>=4.10,<5'")
    return cv2


def load_cascade(key: str) -> object:
    """OpenCV's cascade `key` (a key of CASCADES) from the installed OpenCV package."""
    cv2: object = _cv2()
    if key not in CASCADES:
        raise SuiteError(f"detector 'opencv-haar': unknown cascade '{key}' (one of {', '.join(CASCADES)})")
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADES[key])  # type: ignore[attr-defined]
    if cascade.empty():
        raise SuiteError(f"detector 'opencv-haar': OpenCV's cascade {CASCADES[key]} is missing from its package")
    return cascade


def cascade_boxes(cascade: object, grey: np.ndarray, scale_factor: float, min_neighbors: int, min_side: int,
                  mirror: bool = False) -> np.ndarray:
    """One cascade on a grey uint8 image: (k, 5) float64 `x0, y0, x1, y1, neighbours`, where neighbours
    is the number of raw detections OpenCV merged into the box (every box has more than `min_neighbors`).
    `mirror`: run on the left-right mirror image, boxes mapped back to the image."""
    h, w = grey.shape
    if min(h, w) < min_side:
        return np.zeros((0, 5))
    image = np.ascontiguousarray(grey[:, ::-1]) if mirror else grey
    boxes, counts = cascade.detectMultiScale2(  # type: ignore[attr-defined]
        image, scaleFactor=scale_factor, minNeighbors=min_neighbors, minSize=(min_side, min_side))
    found = np.array([[x, y, x + bw, y + bh, n] for (x, y, bw, bh), n in zip(boxes, np.ravel(counts))],
                     dtype=np.float64).reshape(-1, 5)
    if mirror and len(found):
        found[:, [0, 2]] = w - found[:, [2, 0]]
    return found


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes a (k, >=4) and b (m, >=4), `x0, y0, x1, y1`: (k, m)."""
    a, b = np.asarray(a, dtype=np.float64)[:, :4], np.asarray(b, dtype=np.float64)[:, :4]
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def box_cover(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection of boxes a (k, >=4) and b (m, >=4) over the smaller box's area: (k, m)."""
    a, b = np.asarray(a, dtype=np.float64)[:, :4], np.asarray(b, dtype=np.float64)[:, :4]
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    smaller = np.minimum(np.prod(a[:, 2:] - a[:, :2], axis=1)[:, None], np.prod(b[:, 2:] - b[:, :2], axis=1)[None])
    return np.where(smaller > 0, inter / np.where(smaller > 0, smaller, 1.0), 0.0)


def merge_passes(passes: list[np.ndarray], same_face: float = SAME_FACE) -> np.ndarray:
    """Boxes of several passes as one set: earlier passes first, each pass by score; a box that covers an
    already kept one, or is covered by it, by more than `same_face` of the smaller box is the same face
    and is dropped. Returned largest first."""
    kept: list[np.ndarray] = []
    for found in passes:
        for row in found[np.argsort(-found[:, 4], kind="stable")]:
            if not kept or box_cover(row[None], np.stack(kept)).max() <= same_face:
                kept.append(row)
    out = np.stack(kept) if kept else np.zeros((0, 5))
    area = (out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1])
    return out[np.argsort(-area, kind="stable")]


class HaarFaceDetector:
    """OpenCV Haar cascades (frontal, then profile both ways) on the grey image: per image a (k, 5) array
    `x0, y0, x1, y1, neighbours`, largest box first; (0, 5) where no face is found."""

    def __init__(self, settings: HaarSettings = HaarSettings(), name: str = "opencv-haar") -> None:
        self.name, self.settings = name, settings
        self._cv2: object = _cv2()
        self.frontal = load_cascade(settings.frontal)
        self.profile = None if settings.profile_min_neighbors is None else load_cascade("profile")

    def grey(self, image: np.ndarray) -> np.ndarray:
        """The grey image the cascades read (equalised where the settings say)."""
        cv2: object = self._cv2
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)  # type: ignore[attr-defined]
        return cv2.equalizeHist(grey) if self.settings.equalize else grey  # type: ignore[attr-defined]

    def min_side(self, shape: tuple[int, ...]) -> int:
        return max(self.settings.min_size_px, int(round(self.settings.min_size_frac * min(shape[:2]))))

    def detect(self, images: np.ndarray) -> list[np.ndarray]:
        check_images(images, f"detector '{self.name}'")
        s = self.settings
        out = []
        for image in images:
            grey, side = self.grey(image), self.min_side(image.shape)
            passes = [cascade_boxes(self.frontal, grey, s.scale_factor, s.min_neighbors, side)]
            if self.profile is not None and s.profile_min_neighbors is not None:  # one pass: both ways, by score
                passes.append(np.concatenate([cascade_boxes(self.profile, grey, s.scale_factor,
                                                            s.profile_min_neighbors, side, mirror)
                                              for mirror in (False, True)]))
            out.append(merge_passes(passes))
        return out


PROFILE_SETTINGS = HaarSettings(profile_min_neighbors=2)  # `opencv-haar-profile`: the same, plus profiles


@register_detector("opencv-haar", domains=NATURAL)
def _haar(ctx: ClassifierContext, arg: str | None) -> HaarFaceDetector:
    if arg is not None:
        raise SuiteError(f"detector 'opencv-haar' takes no argument, got 'opencv-haar:{arg}'")
    return HaarFaceDetector(HaarSettings(), "opencv-haar")


@register_detector("opencv-haar-profile", domains=NATURAL)
def _haar_profile(ctx: ClassifierContext, arg: str | None) -> HaarFaceDetector:
    if arg is not None:
        raise SuiteError(f"detector 'opencv-haar-profile' takes no argument, got 'opencv-haar-profile:{arg}'")
    return HaarFaceDetector(PROFILE_SETTINGS, "opencv-haar-profile")
