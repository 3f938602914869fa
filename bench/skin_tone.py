"""How well the `skin-tone` classifier reads tones it is shown: faces rendered in known colours.

For each scale (the ten Monk shades; the six ITA categories, coloured at each category's middle angle)
a face is rendered in the reference colour under the lighting changes a photograph adds: a global
exposure factor (uniform in [1 - e, 1 + e]), a left-to-right shading ramp of ±s, and pixel noise; then
read back by `evalsuite.classifiers.skin_tone`. Agreement = share of renders read as the tone rendered,
and the share within one step of it; mean ± sd over 3 seeds (60 renders per shade and seed). Then the
readings of real photographs that installed packages ship (scikit-image's astronaut, matplotlib's
Grace Hopper), faces found by `opencv-haar`: printed, with no ground truth (none ships with them).

    python bench/skin_tone.py            # writes nothing; bench/results/skin_tone.txt holds a copy
"""

from __future__ import annotations

import numpy as np

from evalsuite.battery import AttributeSpec
from evalsuite.classifiers import ClassifierContext, get_classifier, get_detector
from evalsuite.classifiers.skin_tone import ITA_CATEGORIES, MONK, MONK_SRGB, ita_degrees, skin_pixels, srgb_to_lab

LIGHTING = {"none": (0.0, 0.0, 0.0), "mild": (0.10, 0.08, 4.0), "strong": (0.25, 0.20, 8.0)}  # exposure, ramp, noise
SEEDS = (0, 1, 2)
PER_SHADE = 60
ITA_MIDDLE = (65.0, 48.0, 34.5, 19.0, -10.0, -45.0)  # a central angle of each Del Bino category


def render(rgb: np.ndarray, rng: np.random.Generator, exposure: float, ramp: float, noise: float) -> np.ndarray:
    size = 96
    img = np.full((size, size, 3), 128.0)
    yy, xx = np.mgrid[:size, :size] / size
    face = ((xx - 0.5) / 0.3) ** 2 + ((yy - 0.5) / 0.4) ** 2 <= 1
    gain = rng.uniform(1 - exposure, 1 + exposure) * (1 + ramp * (xx - 0.5) * 2 * rng.choice([-1, 1]))
    img[face] = rgb[None, :] * gain[face][:, None]
    for cx in (0.4, 0.6):
        img[((xx - cx) / 0.05) ** 2 + ((yy - 0.4) / 0.03) ** 2 <= 1] = 20
    img[(np.abs(xx - 0.5) < 0.08) & (np.abs(yy - 0.72) < 0.02)] = 60
    return np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)


def colour_at_ita(angle: float) -> np.ndarray:
    """The sRGB colour nearest to L* = 50 + 18·tan(angle), a* = 12, b* = 18 (so its ITA is `angle`)."""
    grid = np.stack(np.meshgrid(*(np.arange(0, 256, 2),) * 3, indexing="ij"), -1).reshape(-1, 3)
    lab = srgb_to_lab(grid.astype(np.uint8))
    target = np.array([50 + 18 * np.tan(np.radians(angle)), 12.0, 18.0])
    return grid[np.argmin(((lab - target) ** 2).sum(1))].astype(float)


def agreement(classes: tuple[str, ...], colours: list[np.ndarray], lighting: tuple[float, float, float],
              seed: int) -> tuple[float, float]:
    clf = get_classifier("skin-tone", ClassifierContext())
    spec = AttributeSpec("skin_tone", classes, classes, (1 / len(classes),) * len(classes))
    rng = np.random.default_rng(seed)
    images, truth = [], []
    for k, rgb in enumerate(colours):
        for _ in range(PER_SHADE):
            images.append(render(rgb, rng, *lighting))
            truth.append(k)
    box = np.array([[0.2 * 96, 0.1 * 96, 0.8 * 96, 0.9 * 96, 1.0]])
    out = clf.classify(np.stack(images), [spec], faces=[box] * len(images))["skin_tone"]  # type: ignore[call-arg]
    read = out.probs.argmax(1)
    diff = np.abs(read - np.asarray(truth))
    return float((diff == 0).mean()), float((diff <= 1).mean())


def main() -> None:
    monk = [np.array([int(h[i:i + 2], 16) for i in (0, 2, 4)], dtype=float) for h in MONK_SRGB]
    ita = [colour_at_ita(a) for a in ITA_MIDDLE]
    print("Agreement of skin-tone readings with the rendered tone (mean ± sd over seeds 0, 1, 2; "
          f"{PER_SHADE} renders per tone and seed)")
    print(f"{'scale':<8} {'lighting (exposure, ramp, noise sd)':<38} {'exact':>15} {'within one step':>17}")
    for scale, classes, colours in (("monk", MONK, monk), ("ita", ITA_CATEGORIES, ita)):
        for name, lighting in LIGHTING.items():
            runs = np.array([agreement(classes, colours, lighting, seed) for seed in SEEDS])
            mean, sd = runs.mean(0), runs.std(0, ddof=1)
            print(f"{scale:<8} {name + ' ' + str(lighting):<38} {mean[0]:>8.3f} ± {sd[0]:.3f} "
                  f"{mean[1]:>10.3f} ± {sd[1]:.3f}")
    print("\nReal photographs shipped by installed packages (no ground truth ships with them):")
    detector = get_detector("opencv-haar", ClassifierContext())
    for name, image in photos():
        boxes = detector.detect(image[None])[0]
        if not len(boxes):
            print(f"  {name}: no face detected")
            continue
        lab = skin_pixels(image, boxes[0])
        angle = float(ita_degrees(np.median(lab, axis=0)[None])[0])
        votes = get_classifier("skin-tone", ClassifierContext()).classify(  # type: ignore[call-arg]
            image[None], [AttributeSpec("s", MONK, MONK, (0.1,) * 10)], faces=[boxes])["s"].probs[0]
        print(f"  {name}: face {boxes[0][:4].astype(int).tolist()}, ITA of the median skin colour {angle:.1f}° "
              f"({ITA_CATEGORIES[int(np.searchsorted(-np.array([55, 41, 28, 10, -30.0]), -angle, 'right'))]}), "
              f"Monk votes: {MONK[int(votes.argmax())]} ({votes.max():.2f})")


def photos() -> list[tuple[str, np.ndarray]]:
    out = []
    try:
        from skimage import data

        out.append(("scikit-image astronaut.png (Eileen Collins, NASA)", data.astronaut()))
    except ImportError:
        print("  (scikit-image not installed: pip install scikit-image)")
    from pathlib import Path

    import matplotlib
    from PIL import Image

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if hopper.is_file():
        out.append(("matplotlib grace_hopper.jpg", np.asarray(Image.open(hopper).convert("RGB"))))
    return out


if __name__ == "__main__":
    main()
