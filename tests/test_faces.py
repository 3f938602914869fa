"""The built-in face detector `opencv-haar` (evalsuite/classifiers/faces.py) on real photos that installed
packages ship, on noise and small images, and its input checks. The figures asserted are those
`bench/face_detector.py` measured (bench/results/face_detector.txt), with a margin."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from evalsuite.classifiers import ClassifierContext
from evalsuite.classifiers.base import FaceDetector, available_detectors, domain_problems, get_detector
from evalsuite.classifiers.faces import HaarFaceDetector, HaarSettings, box_iou, merge_passes
from evalsuite.errors import SuiteError

cv2 = pytest.importorskip("cv2")

# hand-labelled face boxes (x0, y0, x1, y1), hairline to chin, cheek to cheek (bench/face_detector.py)
ASTRONAUT_FACE = (180, 75, 266, 183)
GRACE_HOPPER_FACE = (170, 140, 362, 318)
CAMERAMAN_FACE = (190, 125, 258, 198)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return get_detector("opencv-haar", ClassifierContext())


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))  # grey photos copied to RGB


def _skimage_photo(name: str) -> np.ndarray:
    pytest.importorskip("skimage")
    import skimage

    return _read(Path(skimage.__file__).parent / "data" / name)


def _grace_hopper() -> np.ndarray:
    import matplotlib

    return _read(Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg")


@pytest.mark.parametrize("name", ["opencv-haar", "opencv-haar-profile"])
def test_registered_for_natural_images_only(name: str) -> None:
    assert name in available_detectors()
    found = get_detector(name, ClassifierContext())
    assert isinstance(found, FaceDetector) and found.name == name
    assert domain_problems("detector", name, "natural", "sd") == []
    assert domain_problems("detector", name, "miniature", "miniature") != []
    with pytest.raises(SuiteError, match="takes no argument"):
        get_detector(f"{name}:alt", ClassifierContext())


def test_opencv_5_without_cascades_is_a_suite_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class OpenCV5:  # OpenCV 5 has no CascadeClassifier and ships no cascade files
        __version__ = "5.1.0"

    monkeypatch.setitem(sys.modules, "cv2", OpenCV5())
    with pytest.raises(SuiteError, match="needs OpenCV 4"):
        HaarFaceDetector()


def test_profile_variant_finds_the_cameraman_whom_the_frontal_one_misses(detector: FaceDetector) -> None:
    camera = _skimage_photo("camera.png")  # grey, a man in profile with his eye at a camera
    assert detector.detect(camera[None])[0].shape == (0, 5)  # a known miss of opencv-haar: profiles
    found = get_detector("opencv-haar-profile", ClassifierContext()).detect(camera[None])[0]
    assert len(found) == 1
    assert box_iou(found, np.array([CAMERAMAN_FACE]))[0, 0] >= 0.4  # his head: hair to chin, ear to nose


def test_astronaut_one_face_on_her_face(detector: FaceDetector) -> None:
    found = detector.detect(_skimage_photo("astronaut.png")[None])[0]
    assert found.shape == (1, 5) and found.dtype == np.float64
    assert box_iou(found, np.array([ASTRONAUT_FACE]))[0, 0] >= 0.5
    assert found[0, 4] > HaarSettings().min_neighbors  # its score: the raw detections merged into it


def test_grace_hopper_face_located(detector: FaceDetector) -> None:
    found = detector.detect(_grace_hopper()[None])[0]
    assert len(found) >= 1
    assert box_iou(found[:1], np.array([GRACE_HOPPER_FACE]))[0, 0] >= 0.5  # the largest box is her face


@pytest.mark.parametrize("name", ["coffee.png", "chelsea.png", "brick.png", "moon.png"])
def test_no_face_on_photos_without_a_person(detector: FaceDetector, name: str) -> None:
    found = detector.detect(_skimage_photo(name)[None])[0]
    assert found.shape == (0, 5)


@pytest.mark.parametrize("side", [64, 512])
def test_no_face_on_noise(detector: FaceDetector, side: int) -> None:
    rng = np.random.default_rng(side)
    uniform = rng.integers(0, 256, (3, side, side, 3), dtype=np.uint8)
    smooth = np.stack([cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (side, side),
                                  interpolation=cv2.INTER_CUBIC) for _ in range(3)])
    assert all(f.shape == (0, 5) for f in detector.detect(np.concatenate([uniform, smooth])))


def test_tiny_images_give_empty_float_arrays(detector: FaceDetector) -> None:
    tiny = np.full((2, 64, 64, 3), 128, dtype=np.uint8)
    out = detector.detect(tiny)
    assert len(out) == 2 and all(f.shape == (0, 5) and f.dtype == np.float64 for f in out)
    smaller = detector.detect(np.zeros((1, 16, 20, 3), dtype=np.uint8))  # below the smallest face size
    assert smaller[0].shape == (0, 5)
    assert detector.detect(np.zeros((0, 64, 64, 3), dtype=np.uint8)) == []


@pytest.mark.parametrize("images", [
    np.zeros((64, 64, 3), dtype=np.uint8),  # no batch axis
    np.zeros((1, 64, 64), dtype=np.uint8),  # grey
    np.zeros((1, 64, 64, 4), dtype=np.uint8),  # RGBA
    np.zeros((1, 64, 64, 3), dtype=np.float32),  # not uint8
    [[0]],
])
def test_wrong_input_is_a_suite_error(detector: FaceDetector, images: object) -> None:
    with pytest.raises(SuiteError, match="opencv-haar"):
        detector.detect(images)  # type: ignore[arg-type]


def test_boxes_are_in_the_image_largest_first() -> None:
    image = np.concatenate([_grace_hopper()[:512, :512], _grace_hopper()[:512, :512]], axis=1)  # two faces
    found = HaarFaceDetector().detect(image[None])[0]
    assert len(found) == 2
    area = (found[:, 2] - found[:, 0]) * (found[:, 3] - found[:, 1])
    assert np.all(np.diff(area) <= 0)
    assert np.all(found[:, :2] >= 0) and np.all(found[:, 2] <= 1024) and np.all(found[:, 3] <= 512)


def test_merge_passes_keeps_one_box_per_face() -> None:
    frontal = np.array([[10, 10, 50, 50, 8.0]])
    profile = np.array([[12, 11, 52, 49, 20.0], [100, 100, 130, 130, 15.0]])
    merged = merge_passes([frontal, profile])
    assert merged.tolist() == [[10, 10, 50, 50, 8.0], [100, 100, 130, 130, 15.0]]
    assert merge_passes([np.zeros((0, 5))]).shape == (0, 5)


def _lfw_held_out() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's LFW subset (Huang et al. 2007; faces 0–99, non-faces 100–199), held-out halves
    (faces 50–99, non-faces 150–199), embedded as bench/face_detector.py does: ×255, ×4 bilinear, centre of
    a mid-grey 256×256 canvas, grey to RGB."""
    data = pytest.importorskip("skimage.data")
    crops = np.round(data.lfw_subset() * 255).astype(np.uint8)
    idx = np.r_[50:100, 150:200]
    canvas = np.full((len(idx), 256, 256), 128, dtype=np.uint8)
    for k, i in enumerate(idx):
        canvas[k, 78:178, 78:178] = cv2.resize(crops[i], (100, 100), interpolation=cv2.INTER_LINEAR)
    return np.repeat(canvas[..., None], 3, axis=3), idx < 100


def test_lfw_held_out_precision_and_recall(detector: FaceDetector) -> None:
    images, face = _lfw_held_out()
    hit = np.array([len(f) > 0 for f in detector.detect(images)])
    tp, fp = int((hit & face).sum()), int((hit & ~face).sum())
    # measured (bench/results/face_detector.txt): recall 50/50, precision 50/50
    assert tp / face.sum() >= 0.94
    assert tp / max(tp + fp, 1) >= 0.96
