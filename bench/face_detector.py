"""Face detectors measured on real labelled photos that installed packages ship: tune on one split, report
precision and recall (Wilson 95 % intervals) on the held-out split, and the time per 512×512 image.

    python bench/face_detector.py            # the table in bench/results/face_detector.txt (a few minutes)

Data (nothing is downloaded; every image is a file inside an installed package):

* LFW: scikit-image's `skimage.data.lfw_subset()`, 200 greyscale 25×25 crops from Labeled Faces in the
  Wild (Huang et al., "Labeled Faces in the Wild: A Database for Studying Face Recognition in
  Unconstrained Environments", UMass TR 07-49, 2007): by its docstring the first 100 are faces, the last
  100 non-faces cut from the same photos' backgrounds. Each crop is scaled to uint8 (×255, rounded),
  upscaled ×4 (bilinear, 100×100) and pasted at the centre of a mid-grey (128) 256×256 canvas, grey
  copied to RGB; a face's box is the pasted square (78, 78, 178, 178). A second copy upscales ×2
  (50×50 at (103, 103)): a smaller face, as in a half-length portrait.
* Photos: scikit-image's colour and grey photographs and matplotlib's sample data (and scikit-learn's
  two sample images where scikit-learn is installed), labelled by hand below (PHOTOS): three show a
  person (astronaut, Grace Hopper: frontal; cameraman: profile behind his camera), with a hand-drawn
  face box (hairline to chin, cheek to cheek or ear to nose).
* Sizes: the astronaut and Grace Hopper (a 512×512 crop) resized to 64, 256 and 1024 (1024 only for
  the crop, whose 512 is the photo itself), as a generator's outputs would be.
* Noise: uniform RGB noise and smooth noise (8×8 noise upscaled bicubically), 64×64 and 512×512,
  seeds fixed: what a tiny untrained pipeline makes. No face.

Split: LFW faces 0–49 and non-faces 100–149 (both copies), and every other no-person photo (sorted by file name,
even positions), tune; the rest, all three person photos, the sizes and the noise are held out and give
every figure below the tuning table. Within a candidate the tuning picks the setting and the threshold
with the highest Youden J = recall − false-positive rate on the tune split; ties go to the faster
setting (larger scale step, no equalisation) and then to the lowest threshold (the most sensitive:
a missed face drops an image from the shares). Across candidates the same rule picks the built-in
detector, ties going to the one that needs no new dependency and then to the faster one; the script
checks that `opencv-haar`'s defaults (`evalsuite.classifiers.faces.HaarSettings`) are that choice.

Optional candidates run where their package is installed: `skimage-lbp` (scikit-image's LBP frontal
cascade), `dlib-hog` (dlib's HOG + linear SVM frontal detector, built into the library; `pip install
dlib-bin`). Precision and recall are per image: an image counts as "detected" when the detector
returns any box (the runner's "no_person" rule); "located" is the share of detected person images
whose boxes include one with IoU >= 0.5 against the hand-labelled face box.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
from PIL import Image  # noqa: E402

from evalsuite.classifiers import ClassifierContext  # noqa: E402
from evalsuite.classifiers.base import get_detector  # noqa: E402
from evalsuite.classifiers.faces import HaarFaceDetector, HaarSettings, box_iou, cascade_boxes  # noqa: E402
from evalsuite.metrics.intervals import wilson_interval  # noqa: E402

LOCATED_IOU = 0.5


@dataclass(frozen=True)
class Photo:
    """A hand-labelled photo: package ("skimage", "matplotlib", "sklearn"), file, whether a person is in
    it, the face box (x0, y0, x1, y1) where one is, and what it shows."""

    package: str
    file: str
    person: bool
    box: tuple[float, float, float, float] | None
    note: str


PHOTOS = (
    Photo("skimage", "astronaut.png", True, (180, 75, 266, 183), "Eileen Collins, frontal, 512×512 colour"),
    Photo("skimage", "camera.png", True, (190, 125, 258, 198), "cameraman, profile facing right, eye at camera"),
    Photo("matplotlib", "grace_hopper.jpg", True, (170, 140, 362, 318), "Grace Hopper, frontal, 512×600"),
    Photo("skimage", "brick.png", False, None, "brick wall"),
    Photo("skimage", "cell.png", False, None, "microscopy, one cell"),
    Photo("skimage", "chelsea.png", False, None, "cat's face, frontal"),
    Photo("skimage", "chessboard_RGB.png", False, None, "chessboard (synthetic)"),
    Photo("skimage", "clock_motion.png", False, None, "motion-blurred clock"),
    Photo("skimage", "coffee.png", False, None, "cup of coffee"),
    Photo("skimage", "coins.png", False, None, "coins, some with relief portraits"),
    Photo("skimage", "color.png", False, None, "colour wheel (synthetic)"),
    Photo("skimage", "grass.png", False, None, "grass texture"),
    Photo("skimage", "gravel.png", False, None, "gravel texture"),
    Photo("skimage", "horse.png", False, None, "horse silhouette (graphic)"),
    Photo("skimage", "hubble_deep_field.jpg", False, None, "galaxies"),
    Photo("skimage", "ihc.png", False, None, "stained tissue"),
    Photo("skimage", "logo.png", False, None, "scikit-image logo"),
    Photo("skimage", "microaneurysms.png", False, None, "retina detail, 102×102"),
    Photo("skimage", "moon.png", False, None, "lunar surface"),
    Photo("skimage", "motorcycle_left.png", False, None, "motorcycle in a garage"),
    Photo("skimage", "page.png", False, None, "printed page"),
    Photo("skimage", "phantom.png", False, None, "Shepp-Logan phantom (synthetic)"),
    Photo("skimage", "retina.jpg", False, None, "fundus photograph"),
    Photo("skimage", "rocket.jpg", False, None, "rocket on its launch pad at dusk"),
    Photo("skimage", "text.png", False, None, "handwritten text on a board"),
    Photo("matplotlib", "logo2.png", False, None, "matplotlib logo"),
    Photo("matplotlib", "Minduka_Present_Blue_Pack.png", False, None, "gift box (graphic)"),
    Photo("sklearn", "china.jpg", False, None, "pagoda and lake"),
    Photo("sklearn", "flower.jpg", False, None, "dahlia"),
)
# left out: skimage's motorcycle_right.png (the stereo twin of motorcycle_left), no_time_for_that_tiny.gif
# (14×25 pixels, 24 frames), chessboard_GRAY.png (the RGB one in grey); the grey textures and microscopy
# images without a camera-like scene are kept as the hard negatives a generator's failures look like.


@dataclass
class Item:
    """One labelled image: its source row, split ("tune" or "test"), name, pixels, label and face box."""

    source: str
    split: str
    name: str
    image: np.ndarray
    person: bool
    box: tuple[float, float, float, float] | None


def _package_dir(package: str) -> Path | None:
    try:
        if package == "skimage":
            import skimage
            return Path(skimage.__file__).parent / "data"
        if package == "matplotlib":
            import matplotlib
            return Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"
        if package == "sklearn":
            import sklearn
            return Path(sklearn.__file__).parent / "datasets" / "images"
    except ImportError:
        return None
    raise ValueError(package)


def read_rgb(path: Path) -> np.ndarray:
    """A photo as uint8 RGB; transparency composited onto white."""
    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return np.asarray(canvas.convert("RGB"))


def lfw_items(upscale: int) -> list[Item]:
    """scikit-image's LFW subset (faces 0–99, non-faces 100–199), each crop ×255 to uint8, upscaled
    `upscale` times (bilinear) and pasted at the centre of a mid-grey 256×256 canvas, grey to RGB."""
    from skimage.data import lfw_subset

    crops = np.round(lfw_subset() * 255).astype(np.uint8)
    side = 25 * upscale
    x0 = (256 - side) // 2
    box = (float(x0), float(x0), float(x0 + side), float(x0 + side))
    items = []
    for i, crop in enumerate(crops):
        canvas = np.full((256, 256), 128, dtype=np.uint8)
        canvas[x0:x0 + side, x0:x0 + side] = cv2.resize(crop, (side, side), interpolation=cv2.INTER_LINEAR)
        face = i < 100
        items.append(Item(f"LFW ×{upscale} ({side} px faces)", "tune" if i % 100 < 50 else "test",
                          f"lfw{upscale}-{i:03d}", np.repeat(canvas[..., None], 3, axis=2), face,
                          box if face else None))
    return items


def photo_items() -> tuple[list[Item], list[str]]:
    """The hand-labelled photos found (and the packages missing)."""
    items, missing = [], []
    negatives = sorted(p.file for p in PHOTOS if not p.person)
    for p in PHOTOS:
        folder = _package_dir(p.package)
        if folder is None or not (folder / p.file).is_file():
            missing.append(f"{p.package}:{p.file}")
            continue
        split = "test" if p.person or negatives.index(p.file) % 2 else "tune"
        items.append(Item(f"photos ({p.package})", split, p.file, read_rgb(folder / p.file), p.person, p.box))
    return items, missing


def _scaled(box: tuple[float, float, float, float] | None, f: float) -> tuple[float, float, float, float] | None:
    return None if box is None else (box[0] * f, box[1] * f, box[2] * f, box[3] * f)


def size_items(photos: list[Item]) -> list[Item]:
    """Generated-size cases: the astronaut at 64, 256, 1024; Grace Hopper's top 512×512 at 64, 512, 1024."""
    by_name = {p.name: p for p in photos}
    out = []
    for name, sides in (("astronaut.png", (64, 256, 1024)), ("grace_hopper.jpg", (64, 512, 1024))):
        if name not in by_name:
            continue
        src = by_name[name]
        square = src.image[:512, :512]
        for side in sides:
            f = side / 512
            resized = cv2.resize(square, (side, side), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)
            out.append(Item("sizes", "test", f"{name.split('.')[0]}@{side}", resized, True, _scaled(src.box, f)))
    return out


def noise_items() -> list[Item]:
    """Uniform and smooth RGB noise at 64 and 512 px, fixed seeds: 20 + 10 + 10 + 10 images."""
    rng = np.random.default_rng(20)
    out = []
    for kind, side, n in (("uniform", 64, 20), ("uniform", 512, 10), ("smooth", 64, 10), ("smooth", 512, 10)):
        for i in range(n):
            if kind == "uniform":
                img: np.ndarray = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            else:
                small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                img = np.asarray(cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC))
            out.append(Item("noise", "test", f"{kind}{side}-{i}", img, False, None))
    return out


# --- candidates ------------------------------------------------------------------------------------------

Scores = np.ndarray  # (n_images, n_channels): per channel the image's best score (-inf: nothing found)


@dataclass
class Candidate:
    """A detector family: discrete settings, each giving per-image channel scores at its loosest threshold;
    a threshold per channel (an image is detected when some channel's score exceeds its threshold), and
    the boxes at a setting and thresholds (for "located" and the timing)."""

    name: str
    dependency: str  # "" where it needs nothing beyond evalsuite's own dependencies
    settings: list[dict[str, object]]
    thresholds: Sequence[tuple[float, ...]]
    scores: Callable[[dict[str, object], list[Item]], Scores]
    boxes: Callable[[dict[str, object], tuple[float, ...], np.ndarray], np.ndarray]
    speed_key: Callable[[dict[str, object]], tuple[float, ...]] = lambda s: (0.0,)
    cache: dict[tuple[str, str], float] = field(default_factory=dict)


def _grey(image: np.ndarray, equalize: bool) -> np.ndarray:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.equalizeHist(grey) if equalize else grey


_HAAR_CACHE: dict[tuple[str, bool, float, str], float] = {}


def _haar_channel(cascade_key: str, equalize: bool, scale: float, items: list[Item]) -> np.ndarray:
    """Per image the largest neighbour count of the cascade (both mirror images for the profile), at
    minNeighbors=1: a box survives minNeighbors=k exactly when its count exceeds k, so one run serves
    every threshold."""
    detector = HaarFaceDetector(HaarSettings(frontal=cascade_key if cascade_key != "profile" else "alt2",
                                             profile_min_neighbors=1 if cascade_key == "profile" else None))
    cascade = detector.profile if cascade_key == "profile" else detector.frontal
    out = np.full(len(items), -np.inf)
    for i, item in enumerate(items):
        key = (cascade_key, equalize, scale, item.name)
        if key not in _HAAR_CACHE:
            grey, side = _grey(item.image, equalize), detector.min_side(item.image.shape)
            mirrors = (False, True) if cascade_key == "profile" else (False,)
            found = np.concatenate([cascade_boxes(cascade, grey, scale, 1, side, m) for m in mirrors])
            _HAAR_CACHE[key] = float(found[:, 4].max()) if len(found) else -np.inf
        out[i] = _HAAR_CACHE[key]
    return out


def haar_candidate(frontal: str, profile: bool) -> Candidate:
    settings: list[dict[str, object]] = [{"equalize": e, "scale": s} for e in (False, True) for s in (1.05, 1.1, 1.2)]
    ks = [float(k) for k in range(1, 31)]
    thresholds: list[tuple[float, ...]] = [(k, kp) for k in ks for kp in ks] if profile else [(k,) for k in ks]

    def scores(setting: dict[str, object], items: list[Item]) -> Scores:
        eq, sc = bool(setting["equalize"]), float(setting["scale"])  # type: ignore[arg-type]
        channels = [_haar_channel(frontal, eq, sc, items)]
        if profile:
            channels.append(_haar_channel("profile", eq, sc, items))
        return np.stack(channels, axis=1)

    def settings_of(setting: dict[str, object], thr: tuple[float, ...]) -> HaarSettings:
        return HaarSettings(frontal=frontal, scale_factor=float(setting["scale"]),  # type: ignore[arg-type]
                            min_neighbors=int(thr[0]), profile_min_neighbors=int(thr[1]) if profile else None,
                            equalize=bool(setting["equalize"]))

    detectors: dict[HaarSettings, HaarFaceDetector] = {}

    def boxes(setting: dict[str, object], thr: tuple[float, ...], image: np.ndarray) -> np.ndarray:
        s = settings_of(setting, thr)
        detectors.setdefault(s, HaarFaceDetector(s))
        return detectors[s].detect(image[None])[0]

    cand = Candidate(f"haar-{frontal}" + ("+profile" if profile else ""), "", settings, thresholds, scores, boxes,
                     speed_key=lambda s: (-float(s["scale"]), float(bool(s["equalize"]))))  # type: ignore[arg-type]
    cand.settings_of = settings_of  # type: ignore[attr-defined]
    return cand


def lbp_candidate() -> Candidate | None:
    """scikit-image's LBP frontal cascade (`skimage.feature.Cascade`, lbpcascade_frontalface_opencv.xml)."""
    try:
        from skimage.feature import Cascade
    except ImportError:
        return None
    folder = _package_dir("skimage")
    assert folder is not None
    cascade = Cascade(str(folder / "lbpcascade_frontalface_opencv.xml"))

    def run(setting: dict[str, object], image: np.ndarray) -> np.ndarray:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64) / 255.0
        side = max(24, int(round(0.05 * min(grey.shape))))
        if min(grey.shape) < side:
            return np.zeros((0, 5))
        found = cascade.detect_multi_scale(img=grey, scale_factor=1.2, step_ratio=1, min_size=(side, side),
                                           max_size=grey.shape, min_neighbor_number=int(setting["neighbours"]))  # type: ignore[call-overload]
        return np.array([[d["c"], d["r"], d["c"] + d["width"], d["r"] + d["height"], 1.0] for d in found],
                        dtype=np.float64).reshape(-1, 5)

    cache: dict[tuple[int, str], float] = {}

    def scores(setting: dict[str, object], items: list[Item]) -> Scores:
        out = np.full((len(items), 1), -np.inf)
        for i, item in enumerate(items):
            key = (int(setting["neighbours"]), item.name)  # type: ignore[call-overload]
            if key not in cache:
                cache[key] = float(len(run(setting, item.image))) or -np.inf
            out[i, 0] = cache[key]
        return out

    return Candidate("skimage-lbp", "scikit-image", [{"neighbours": n} for n in (1, 2, 4, 6, 8, 12)], [(0.0,)],
                     scores, lambda s, t, img: run(s, img), speed_key=lambda s: (0.0,))


def dlib_candidate() -> Candidate | None:
    """dlib's HOG frontal face detector (`dlib.get_frontal_face_detector`); score: the SVM's margin."""
    try:
        import dlib
    except ImportError:
        return None
    detector = dlib.get_frontal_face_detector()
    cache: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}

    def run(setting: dict[str, object], image: np.ndarray) -> np.ndarray:
        rects, scores, _ = detector.run(image, int(setting["upsample"]), -1.0)  # type: ignore[call-overload]
        return np.array([[r.left(), r.top(), r.right() + 1, r.bottom() + 1, s] for r, s in zip(rects, scores)],
                        dtype=np.float64).reshape(-1, 5)

    def scores(setting: dict[str, object], items: list[Item]) -> Scores:
        out = np.full((len(items), 1), -np.inf)
        for i, item in enumerate(items):
            key = (int(setting["upsample"]), item.name)  # type: ignore[call-overload]
            if key not in cache:
                found = run(setting, item.image)
                cache[key] = (found, found[:, 4])
            s = cache[key][1]
            out[i, 0] = s.max() if len(s) else -np.inf
        return out

    def boxes(setting: dict[str, object], thr: tuple[float, ...], image: np.ndarray) -> np.ndarray:
        found = run(setting, image)
        return found[found[:, 4] > thr[0]]

    thresholds: list[tuple[float, ...]] = [(round(float(t), 2),) for t in np.arange(-0.8, 1.01, 0.05)]
    return Candidate("dlib-hog", "dlib-bin", [{"upsample": u} for u in (0, 1)], thresholds, scores, boxes,
                     speed_key=lambda s: (float(s["upsample"]),))  # type: ignore[arg-type]


# --- measurement ------------------------------------------------------------------------------------------

def detected(scores: Scores, thr: Sequence[float]) -> np.ndarray:
    return np.any(scores > np.asarray(thr, dtype=np.float64)[None, :], axis=1)


def youden(hit: np.ndarray, person: np.ndarray) -> float:
    recall = hit[person].mean() if person.any() else 0.0
    fpr = hit[~person].mean() if (~person).any() else 0.0
    return float(recall - fpr)


@dataclass
class Tuned:
    setting: dict[str, object]
    thr: tuple[float, ...]
    j: float


def tune(cand: Candidate, items: list[Item]) -> Tuned:
    """Highest Youden J on `items`; ties: faster setting, then lowest thresholds (module docstring)."""
    person = np.array([it.person for it in items])
    best: tuple[tuple[float, ...], Tuned] | None = None
    for setting in cand.settings:
        scores = cand.scores(setting, items)
        for thr in cand.thresholds:
            j = youden(detected(scores, thr), person)
            key = (round(j, 9), *(-k for k in cand.speed_key(setting)), *(-t for t in thr))
            if best is None or key > best[0]:
                best = (key, Tuned(setting, thr, j))
    assert best is not None
    return best[1]


def fmt_share(count: int, n: int) -> str:
    if n == 0:
        return "—"
    lo, hi = wilson_interval(count, n)
    return f"{count / n:.2f} [{lo:.2f}, {hi:.2f}]"


def rows_for(name: str, hit: np.ndarray, items: list[Item], located: dict[str, bool]) -> list[list[str]]:
    """Per source and in total: positives, negatives, TP, FP, precision and recall with intervals, located."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.source, []).append(i)
    real = [i for i, it in enumerate(items) if it.source.startswith(("LFW ×4", "photos"))]
    out = []
    for source, idx in [*groups.items(), ("total: LFW ×4 + photos", real)]:
        person = np.array([items[i].person for i in idx])
        h = hit[idx]
        tp, fp = int((h & person).sum()), int((h & ~person).sum())
        loc = [located[items[i].name] for i in idx if items[i].person and hit[i] and items[i].box is not None]
        out.append([name, source, str(int(person.sum())), str(int((~person).sum())), str(tp), str(fp),
                    fmt_share(tp, tp + fp), fmt_share(tp, int(person.sum())),
                    f"{sum(loc)}/{len(loc)}" if loc else "—"])
    return out


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def time_per_image(fn: Callable[[np.ndarray], object], image: np.ndarray, repeats: int = 5) -> float:
    fn(image)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(image)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    t_start = time.perf_counter()
    photos, missing = photo_items()
    items = lfw_items(4) + lfw_items(2) + photos + size_items(photos) + noise_items()
    tune_items = [it for it in items if it.split == "tune"]
    test_items = [it for it in items if it.split == "test"]
    astronaut = next(it.image for it in photos if it.name == "astronaut.png")

    candidates = [haar_candidate(f, p) for p in (False, True) for f in ("default", "alt", "alt2")]
    optional = {"skimage-lbp": lbp_candidate(), "dlib-hog": dlib_candidate()}
    candidates += [c for c in optional.values() if c is not None]

    print("# Face detectors on real labelled photos shipped by installed packages\n")
    print("Command: `python bench/face_detector.py` (the module docstring says what the data and split are).")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}, "
          f"OpenCV {cv2.__version__}, numpy {np.__version__}; load average at the start "
          f"{os.getloadavg()[0]:.1f} (other processes share the CPUs: times are upper bounds).")
    tune_photos = ", ".join(it.name for it in tune_items if not it.source.startswith("LFW"))
    print(f"Tune split: {sum(it.person for it in tune_items)} faces, {sum(not it.person for it in tune_items)} "
          f"non-faces (LFW 0–49 and 100–149 of both copies; photos {tune_photos}).")
    print(f"Held out: {len(test_items)} images. Not found (package not installed): {', '.join(missing) or 'none'}; "
          f"candidates not run: {', '.join(k for k, v in optional.items() if v is None) or 'none'}.\n")

    tuned: dict[str, Tuned] = {}
    tune_rows, test_rows, hits = [], [], {}
    for cand in candidates:
        best = tune(cand, tune_items)
        tuned[cand.name] = best
        hit = detected(cand.scores(best.setting, test_items), best.thr)
        hits[cand.name] = hit
        located = {}
        for it, h in zip(test_items, hit):
            if it.person and h and it.box is not None:
                found = cand.boxes(best.setting, best.thr, it.image)
                located[it.name] = bool(len(found) and box_iou(found, np.array([it.box])).max() >= LOCATED_IOU)
        seconds = time_per_image(lambda img: cand.boxes(best.setting, best.thr, img), astronaut)  # noqa: B023
        setting = ", ".join(f"{k}={v}" for k, v in best.setting.items())
        thr = "/".join(f"{t:g}" for t in best.thr)
        tune_rows.append([cand.name, cand.dependency or "(none new)", setting, thr, f"{best.j:.3f}",
                          f"{seconds * 1000:.0f} ms"])
        test_rows += rows_for(cand.name, hit, test_items, located)

    print("## Tuning (tune split): best setting and threshold per candidate\n")
    print("Threshold: Haar, a box needs more neighbours than it (frontal/profile); LBP, scikit-image's "
          "min_neighbor_number is the setting; dlib, the SVM margin must exceed it.\n")
    print(table(["candidate", "extra dependency", "setting", "threshold", "tune J", "time / 512² image"], tune_rows))

    def rank(c: Candidate) -> tuple[float, ...]:
        speed = float(tune_rows[[r[0] for r in tune_rows].index(c.name)][5].split()[0])
        return (-round(tuned[c.name].j, 9), float(bool(c.dependency)), speed)

    choice = min(candidates, key=rank)
    print(f"\nChosen by the rule (highest tune J; then no new dependency; then faster): **{choice.name}**.")
    settings_of = getattr(choice, "settings_of", None)
    if settings_of is not None:
        for name, cand_name in (("opencv-haar", choice.name),
                                ("opencv-haar-profile", choice.name.split("+")[0] + "+profile")):
            registered = get_detector(name, ClassifierContext()).settings  # type: ignore[attr-defined]
            cand = next(c for c in candidates if c.name == cand_name)
            expected = cand.settings_of(tuned[cand_name].setting, tuned[cand_name].thr)  # type: ignore[attr-defined]
            print(f"`{name}` runs {registered.label()}: " + ("the tuned setting of " + cand_name + "." if
                  registered == expected else f"NOT the tuned setting of {cand_name} ({expected.label()})."))

    print("\n## Held-out figures (precision and recall per image, Wilson 95 % intervals)\n")
    print(table(["candidate", "source", "persons", "no person", "TP", "FP", "precision", "recall", "located"],
                test_rows))

    detector = get_detector("opencv-haar", ClassifierContext())
    profile = get_detector("opencv-haar-profile", ClassifierContext())
    print(f"\n## The built-in detectors per held-out photo: `opencv-haar` ({HaarSettings().label()}) and "
          f"`opencv-haar-profile` ({profile.settings.label()})\n")  # type: ignore[attr-defined]
    rows = []
    for it in test_items:
        if it.source.startswith("LFW") or (it.source == "noise" and not it.name.endswith("-0")):
            continue
        cells = [it.name, f"{it.image.shape[1]}×{it.image.shape[0]}", "person" if it.person else "none"]
        for det in (detector, profile):
            found = det.detect(it.image[None])[0]
            iou = box_iou(found, np.array([it.box])).max() if it.box is not None and len(found) else float("nan")
            cells += [str(len(found)), " ".join(f"{s:g}" for s in found[:3, 4]) or "—",
                      "—" if np.isnan(iou) else f"{iou:.2f}"]
        rows.append(cells)
    print(table(["image", "size", "label", "boxes", "neighbours (top 3)", "best IoU with face",
                 "boxes (profile)", "neighbours (profile)", "best IoU (profile)"], rows))
    times = {det.name: time_per_image(lambda img: det.detect(img[None]), astronaut, repeats=9)  # noqa: B023
             for det in (detector, profile)}
    print("\nTime per 512×512 image (astronaut.png, median of 9): "
          + ", ".join(f"`{k}` {v * 1000:.0f} ms" for k, v in times.items()) + ".")
    lfw = [it for it in test_items if it.source.startswith("LFW")]
    lfw_missed = [it.name for it, found in zip(lfw, detector.detect(np.stack([it.image for it in lfw])))
                  if it.person != bool(len(found))]
    print(f"\nLFW held-out images it gets wrong: {', '.join(lfw_missed) or 'none'}.")
    print("Noise rows: the first image of each noise kind shown; every noise image is counted above.")
    print(f"\nTotal run time {time.perf_counter() - t_start:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
