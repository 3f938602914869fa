"""Skin tone by face pixels: the colour maths against hand values, ITA categories at their bounds, the
Monk scale on renders of its own shades, and the classifier on renders of known colour under shading."""

from __future__ import annotations

import numpy as np
import pytest

from evalsuite.battery import AttributeSpec
from evalsuite.classifiers import get_classifier
from evalsuite.classifiers.base import ClassifierContext
from evalsuite.classifiers.skin_tone import (
    ITA_CATEGORIES,
    MONK,
    MONK_SRGB,
    ita_category,
    ita_degrees,
    monk_index,
    srgb_to_lab,
)
from evalsuite.errors import SuiteError


def spec(name: str, classes: tuple[str, ...]) -> AttributeSpec:
    return AttributeSpec(name, classes, tuple(f"a photo of {c}" for c in classes), (1 / len(classes),) * len(classes))


def test_cielab_of_reference_colours() -> None:
    """sRGB white, red and a mid grey against their published D65 CIELAB values."""
    lab = srgb_to_lab(np.array([[255, 255, 255], [255, 0, 0], [119, 119, 119], [0, 0, 0]], dtype=np.uint8))
    np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.01)
    np.testing.assert_allclose(lab[1], [53.24, 80.09, 67.20], atol=0.02)
    assert abs(lab[2, 0] - 50.0) < 0.1 and np.abs(lab[2, 1:]).max() < 0.01
    np.testing.assert_allclose(lab[3], [0.0, 0.0, 0.0], atol=1e-9)


def test_ita_formula_and_del_bino_categories() -> None:
    # ITA = atan((L - 50) / b) in degrees: L 50 + 10·tan(θ) over b = 10 gives θ
    angles = np.array([60.0, 55.0, 48.0, 41.0, 30.0, 28.0, 20.0, 10.0, 0.0, -30.0, -45.0])
    lab = np.stack([50 + 10 * np.tan(np.radians(angles)), np.zeros_like(angles), np.full_like(angles, 10.0)], 1)
    np.testing.assert_allclose(ita_degrees(lab), angles, atol=1e-9)
    names = [ITA_CATEGORIES[i] for i in ita_category(angles)]
    assert names == ["very_light", "light", "light", "intermediate", "intermediate", "tan", "tan", "brown", "brown",
                     "dark", "dark"]


def test_each_monk_shade_is_nearest_to_itself() -> None:
    rgb = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in MONK_SRGB], dtype=np.uint8)
    assert monk_index(srgb_to_lab(rgb)).tolist() == list(range(10))


def render_face(rgb: tuple[int, int, int], size: int = 128, shade: float = 0.0, seed: int = 0) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """A grey image with a skin-coloured ellipse face (dark eyes and mouth, a left-to-right brightness
    ramp of ±`shade` and pixel noise) and its face box."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 128.0)
    yy, xx = np.mgrid[:size, :size] / size
    face = ((xx - 0.5) / 0.3) ** 2 + ((yy - 0.5) / 0.4) ** 2 <= 1
    ramp = 1 + shade * (xx - 0.5) * 2
    img[face] = np.asarray(rgb, dtype=float) * ramp[face][:, None]
    for cx in (0.4, 0.6):  # eyes
        img[((xx - cx) / 0.05) ** 2 + ((yy - 0.4) / 0.03) ** 2 <= 1] = 20
    img[(np.abs(xx - 0.5) < 0.08) & (np.abs(yy - 0.72) < 0.02)] = 60  # mouth
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    box = np.array([[0.2 * size, 0.1 * size, 0.8 * size, 0.9 * size, 1.0]])
    return img, box


def classify(images: np.ndarray, faces: list[np.ndarray], attribute: AttributeSpec) -> tuple[np.ndarray, tuple]:
    clf = get_classifier("skin-tone", ClassifierContext())
    assert clf.check([attribute]) == []
    out = clf.classify(images, [attribute], faces=faces)[attribute.name]  # type: ignore[call-arg]
    return out.probs, out.status


def test_monk_shades_rendered_with_shading_are_read_back() -> None:
    """Each of the ten Monk shades rendered as a face with ±8 % shading and noise: the label is the shade
    rendered, and the battery's class order is followed (classes listed darkest first)."""
    renders = [render_face(tuple(int(h[i:i + 2], 16) for i in (0, 2, 4)), shade=0.08, seed=k)
               for k, h in enumerate(MONK_SRGB)]
    images = np.stack([r[0] for r in renders])
    attribute = spec("skin_tone", tuple(reversed(MONK)))
    probs, status = classify(images, [r[1] for r in renders], attribute)
    assert status == ("ok",) * 10
    labels = [attribute.classes[i] for i in probs.argmax(1)]
    assert labels == list(MONK)
    assert probs.max(1).min() > 0.5


@pytest.mark.parametrize(("ita", "four"), [(50.0, "light"), (35.0, "medium"), (20.0, "tan"), (-10.0, "dark")])
def test_a_face_of_known_ita_gets_its_category(ita: float, four: str) -> None:
    """A face coloured to a known ITA (L* and b* set, a* 12, back to sRGB by search) is read in its
    category on the six-class scale and on the four-class coarsening."""
    target_l = 50 + 18 * np.tan(np.radians(ita))
    grid = np.stack(np.meshgrid(*(np.arange(0, 256, 1),) * 3, indexing="ij"), -1).reshape(-1, 3)[::7]
    lab = srgb_to_lab(grid.astype(np.uint8))
    best = grid[np.argmin((lab[:, 0] - target_l) ** 2 + (lab[:, 1] - 12) ** 2 + (lab[:, 2] - 18) ** 2)]
    assert abs(ita_degrees(srgb_to_lab(best[None].astype(np.uint8)))[0] - ita) < 3
    image, box = render_face(tuple(int(v) for v in best), shade=0.03)
    six = spec("skin_tone", ITA_CATEGORIES)
    probs, _ = classify(image[None], [box], six)
    assert six.classes[int(probs[0].argmax())] == ITA_CATEGORIES[int(ita_category(np.array([ita]))[0])]
    four_spec = spec("skin_tone", ("dark", "tan", "medium", "light"))
    probs, _ = classify(image[None], [box], four_spec)
    assert four_spec.classes[int(probs[0].argmax())] == four


def test_other_attributes_and_faceless_images() -> None:
    image, box = render_face((200, 160, 130))
    gender = spec("gender", ("man", "woman"))
    tone = spec("skin_tone", ("light", "medium", "tan", "dark"))
    clf = get_classifier("skin-tone", ClassifierContext())
    out = clf.classify(np.stack([image, image]), [gender, tone], faces=[box, np.zeros((0, 5))])  # type: ignore[call-arg]
    assert out["gender"].status == ("not_measurable",) * 2
    assert out["skin_tone"].status == ("ok", "no_person")
    assert np.isnan(out["skin_tone"].probs[1]).all()
    with pytest.raises(SuiteError, match="face detector"):
        clf.classify(image[None], [tone])


def test_skin_tone_of_a_real_photo() -> None:
    """scikit-image's astronaut photo (Eileen Collins, NASA, public domain): the detector finds her face
    and the ITA of its skin reads light on the four-class scale."""
    data = pytest.importorskip("skimage.data")
    image = data.astronaut()
    detector_faces = get_detector_faces(image)
    assert len(detector_faces) >= 1
    tone = spec("skin_tone", ("light", "medium", "tan", "dark"))
    probs, status = classify(image[None], [detector_faces], tone)
    assert status == ("ok",)
    assert tone.classes[int(probs[0].argmax())] == "light"


def get_detector_faces(image: np.ndarray) -> np.ndarray:
    from evalsuite.classifiers import get_detector

    return get_detector("opencv-haar", ClassifierContext()).detect(image[None])[0]
