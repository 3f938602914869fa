"""Tests for `evalsuite dashboard` (static site from results) and `evalsuite publish` (datasets export)."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fixtures_results import XSS_MODEL, XSS_PROMPTS, make_run, make_xss_run
from PIL import Image

from evalsuite.dashboard import MARKER, build_dashboard, collapse, figures, images
from evalsuite.dashboard.guidance import axis_name
from evalsuite.errors import SuiteError
from evalsuite.results import open_run, schema

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path("/tmp/dashboard_screenshot.png")
ALERT, CONSOLE = "Page.javascriptDialogOpening", "Runtime.consoleAPICalled"


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dash")
    base = make_run(root / "results", "base", faces=True)
    tuned = make_run(root / "results", "tuned", model_key=1, bias_boost=0.4, model_id="miniature-tuned")
    xss = make_xss_run(root / "results")
    return {"base": base, "tuned": tuned, "xss": xss, "root": root,
            "one": build_dashboard([base], root / "one").parent,
            "two": build_dashboard([base, tuned], root / "two").parent,
            "xss_site": build_dashboard([xss, base], root / "xss_site", max_images_per_cell=4).parent}


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.imgs: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "srcset", "action")]
        if tag == "img":
            self.imgs.append(dict(attrs))


def check_site(site: Path) -> dict[str, int]:
    """Every reference is a relative path to an existing file, nothing remote, every image valid with alt."""
    assert (site / "index.html").is_file() and (site / MARKER).is_file() and (site / "style.css").is_file()
    assert not site.with_name(site.name + ".partial").exists()
    counts = {"pages": 0, "imgs": 0}
    for page in site.glob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert '<meta name="viewport"' in text and "Content-Security-Policy" in text
        parser = _Refs()
        parser.feed(text)
        for tag, attr, value in parser.refs:
            remote = re.match(r"^\s*([a-z][a-z0-9+.-]*:|//)", value, re.I)
            assert not remote, f"{page.name}: {tag} {attr}={value}"
            target = value.split("#")[0]
            assert not target or (site / target).is_file(), f"{page.name}: {value} is missing"
        for img in parser.imgs:
            assert (img.get("alt") or "").strip(), f"{page.name}: <img src={img.get('src')}> has no alt text"
        counts["pages"] += 1
        counts["imgs"] += len(parser.imgs)
    css = (site / "style.css").read_text()
    assert "url(" not in css and "@import" not in css and "http" not in css
    for png in [*site.glob("figures/*"), *site.glob("images/**/*.png")]:
        with Image.open(png) as img:
            assert img.format == "PNG"
            img.verify()
    return counts


def test_one_run_site(sites: dict[str, Path]) -> None:
    site = sites["one"]
    counts = check_site(site)
    assert {p.name for p in site.glob("*.html")} == {"index.html", "r0-bias.html", "r0-diversity.html",
                                                     "r0-images.html", "methods.html"}
    assert counts["imgs"] > 40 and len(list(site.glob("figures/*.png"))) >= 20
    bias = (site / "r0-bias.html").read_text()
    assert "Attribute: skin_tone" in bias and "does not measure gender" in bias and "<table>" in bias
    assert "Near-duplicate alerts" in (site / "r0-diversity.html").read_text()
    assert "cosine 1.000" in (site / "r0-diversity.html").read_text()  # the fixture's planted duplicate
    methods = (site / "methods.html").read_text()
    assert "perceived" in methods and "agreement with the exact oracle" in methods and "Caveats" in methods
    index = (site / "index.html").read_text()
    for fact in ("base", "miniature", "fixture version 1.0", "evalsuite 0.1.0", "2026-11-27T01:02:00+00:00"):
        assert fact in index


def test_two_run_site_compares_paired_seeds(sites: dict[str, Path]) -> None:
    site = sites["two"]
    check_site(site)
    assert (site / "compare.html").is_file() and (site / "r1-bias.html").is_file()
    page = (site / "compare.html").read_text()
    assert "54 (same prompt, scale, image index and seed)" in page  # 3 prompts × 3 scales × 6 images
    assert "B − A" in page and "Attribute: skin_tone×age" in page and "Mode collapse" in page
    assert 'href="compare.html"' in (site / "index.html").read_text()


def test_compare_reports_shares_and_legibility_per_split(tmp_path: Path) -> None:
    """The comparison per battery split (train, heldout, test), each judge's low confidence the reader's own
    included, checked against counts taken straight from the records."""
    from evalsuite.dashboard.compare import compare_runs
    from evalsuite.dashboard.compare_page import compare_page
    from evalsuite.results import open_run

    kw = {"values": ("doctor", "nurse", "farmer"), "test": ("nurse",)}
    a = open_run(make_run(tmp_path, "a", **kw))
    b = open_run(make_run(tmp_path, "b", model_key=1, bias_boost=0.4, **kw))
    c = compare_runs(a, b)
    assert c.classifier == "miniature"
    cells = c.splits[(c.splits.attribute == "skin_tone") & (c.splits.guidance_scale == 7.5)]
    assert list(dict.fromkeys(cells.split)) == ["train", "heldout", "test"]
    assert {"low_confidence:miniature", "low_confidence:oracle", "share:light"} <= set(cells.quantity)
    nurse = [r for r in b.records if r["prompt"] == "a photo of a nurse" and r["guidance_scale"] == 7.5]
    labels = [r["classifiers"]["miniature"]["skin_tone"]["label"] for r in nurse]
    unsure = [not r["classifiers"]["miniature"]["skin_tone"]["confident"] for r in nurse]
    test = cells[cells.split == "test"].set_index("quantity")
    assert test.loc["share:medium", "b"] == pytest.approx(labels.count("medium") / len(labels))
    assert test.loc["low_confidence:miniature", "b"] == pytest.approx(sum(unsure) / len(unsure))
    assert test.loc["low_confidence:oracle", "a"] == 0.0  # the fixture's oracle is always sure
    page = compare_page(c, tmp_path)
    assert "By split" in page and "test prompts: skin_tone" in page and "low confidence of oracle" in page


def test_compare_notes_a_different_sampler(sites: dict[str, Path], tmp_path: Path) -> None:
    from evalsuite.dashboard.compare import compare_runs
    from evalsuite.results import open_run as load_run

    stochastic = tmp_path / "stochastic"
    shutil.copytree(sites["tuned"], stochastic)
    info = json.loads((stochastic / "run.json").read_text())
    info["battery"]["eta"] = 1.0
    (stochastic / "run.json").write_text(json.dumps(info))
    base = load_run(sites["base"])
    assert not any("sampled differently" in n for n in compare_runs(base, load_run(sites["tuned"])).notes)
    notes = compare_runs(base, load_run(stochastic)).notes
    assert any("A: 4 steps, DDIM eta 0; B: 4 steps, DDIM eta 1" in n for n in notes), notes


def test_paired_change_interval_never_collapses_to_a_point() -> None:
    from evalsuite.metrics import cluster_difference_interval as _cluster_delta

    one_each = np.array([1, 0, 0, 0, 0] * 2)  # per pair: 1 = moved into the class in B; one per prompt
    # prompts changing by different shares: cluster-robust. d = [2, 0] of n = [5, 5]: est 0.2,
    # residuals (1, -1), var = 2/1 * 2 / 10^2 = 0.04, half = 1.96 * 0.2 = 0.392
    changes = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    assert _cluster_delta(np.array([2.0, 0.0]), np.array([5.0, 5.0]), changes) == pytest.approx((0.2, -0.192, 0.592))
    # every prompt changes by the same share (1 of 5): the sandwich variance is 0, so Agresti–Min over the
    # 10 pairs: m = 12, p10 = 2.5/12, p01 = 0.5/12, d = 2/12, half = 1.96 * sqrt((3/12 - (2/12)^2)/12) = 0.266722
    est, lo, hi = _cluster_delta(np.array([1.0, 1.0]), np.array([5.0, 5.0]), one_each)
    assert (est, lo, hi) == pytest.approx((0.2, 2 / 12 - 0.266722, 2 / 12 + 0.266722), abs=1e-6)
    # no pair changed at all: ±1.96 * sqrt((1/12)/12) = ±0.163333 around 0, not [0, 0]
    assert _cluster_delta(np.zeros(2), np.array([5.0, 5.0]), np.zeros(10)) == \
        pytest.approx((0.0, -0.163333, 0.163333), abs=1e-6)


def test_compare_notes_tell_why_an_attribute_is_left_out(sites: dict[str, Path], tmp_path: Path) -> None:
    from evalsuite.dashboard.compare import compare_runs
    from evalsuite.results import open_run as load_run

    unmeasured, reordered = tmp_path / "unmeasured", tmp_path / "reordered"
    for run in (unmeasured, reordered):
        shutil.copytree(sites["tuned"], run)
    groups = pd.read_csv(unmeasured / "metrics" / "groups.csv")  # B's miniature read no age at all
    groups = groups[~((groups["classifier"] == "miniature") & groups["attribute"].str.contains("age"))]
    groups.to_csv(unmeasured / "metrics" / "groups.csv", index=False, na_rep="NaN")
    info = json.loads((reordered / "run.json").read_text())  # B's battery lists age's classes the other way
    age = info["battery"]["attributes"]["age"]
    age["classes"] = dict(reversed(list(age["classes"].items())))
    (reordered / "run.json").write_text(json.dumps(info))
    base = load_run(sites["base"])
    notes = compare_runs(base, load_run(unmeasured)).notes
    assert "Attribute age is left out: run B has no results for it (its miniature classifier measured it on no " \
           "image)." in notes
    assert "Attribute skin_tone×age is left out: run B has no results for it (its miniature classifier " \
           "measured it on no image)." in notes
    assert not any("different classes" in n for n in notes)
    notes = compare_runs(base, load_run(reordered)).notes
    assert "Attribute age is left out: the runs' batteries give it different classes (A: young, old; B: old, " \
           "young)." in notes
    assert not any("has no results" in n for n in notes)


def test_compare_page_says_how_images_are_paired(sites: dict[str, Path], tmp_path: Path) -> None:
    from evalsuite.dashboard.compare import compare_runs
    from evalsuite.dashboard.compare_page import compare_page
    from evalsuite.results import open_run as load_run

    reseeded = tmp_path / "reseeded"
    shutil.copytree(sites["tuned"], reseeded)
    lines = [json.loads(line) for line in (reseeded / "records.jsonl").read_text().splitlines()]
    (reseeded / "records.jsonl").write_text("".join(json.dumps({**r, "seed": r["seed"] + 1}) + "\n" for r in lines))
    c = compare_runs(load_run(sites["base"]), load_run(reseeded))
    assert c.by_position and c.n_pairs == c.seed_mismatches == 54
    (tmp_path / "site" / "figures").mkdir(parents=True)
    page = compare_page(c, tmp_path / "site")
    assert "54 (same prompt, scale and image index, different seeds: paired by position)" in page
    assert "differ in the model and in their initial noise (seeds)" in page and "and seed)" not in page
    paired = (sites["two"] / "compare.html").read_text()
    assert "differ only in the model" in paired and "paired by position" not in paired


@pytest.mark.slow
def test_bias_page_says_which_images_the_shares_count(sites: dict[str, Path], tmp_path: Path) -> None:
    one = (sites["one"] / "r0-bias.html").read_text()  # every status ok, and run.json does not say
    assert "The miniature classifier marked no image no_person, and the run does not record whether it looks " \
           "for a person" in one
    recorded, found = tmp_path / "recorded", tmp_path / "found"
    for run in (recorded, found):
        shutil.copytree(sites["base"], run)
    _edit_json(recorded, detects_people={"miniature": False, "oracle": True})
    site = build_dashboard([recorded], tmp_path / "site-recorded").parent
    bias = (site / "r0-bias.html").read_text()
    assert "The miniature classifier has no person detector: it reads every image as someone, so shares count " \
           "every image it measured, including any without a person" in bias
    assert "found a person" not in bias and "does not record" not in bias
    methods = (site / "methods.html").read_text()
    assert "<td>miniature</td><td>no person detector: every image it measures counts in the shares</td>" in methods
    assert "<td>oracle</td><td>yes: images where it finds no one are no_person and left out of the shares</td>" \
        in methods
    lines = [json.loads(line) for line in (found / "records.jsonl").read_text().splitlines()]
    lines[0]["classifiers"]["miniature"]["age"] = {"probs": None, "label": None, "status": "no_person",
                                                   "confident": False}
    (found / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    site = build_dashboard([found], tmp_path / "site-found").parent
    assert "Shares count only images where the miniature classifier found a person (status ok)." in \
        (site / "r0-bias.html").read_text()


def test_infinite_kl_target_shows_as_infinity(sites: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "zero-target"
    shutil.copytree(sites["base"], run)
    info = json.loads((run / "run.json").read_text())
    info["battery"]["attributes"]["skin_tone"]["target"] = {"light": 0.5, "medium": 0.5, "tan": 0.0, "dark": 0.0}
    (run / "run.json").write_text(json.dumps(info))
    agg = pd.read_csv(run / "metrics" / "aggregate.csv")
    hit = ((agg["classifier"] == "miniature") & (agg["attribute"] == "skin_tone") & (agg["metric"] == "kl_target")
           & (agg["guidance_scale"] == 7.5))
    agg.loc[hit, ["value", "lo", "hi"]] = [np.inf, np.nan, np.nan]  # a prompt drew a tan or dark face
    agg.to_csv(run / "metrics" / "aggregate.csv", index=False, na_rep="NaN")
    site = build_dashboard([run], tmp_path / "site").parent
    bias = (site / "r0-bias.html").read_text()
    section = bias[bias.index("Attribute: skin_tone</h2>"):bias.index("Attribute: age</h2>")]
    assert "KL to target is ∞ at scale 7.5: the battery&#x27;s target gives tan, dark a share of 0" in section
    rows = re.findall(r"<tr><td>(all|train|heldout)</td><td>7.5</td>(.*?)</tr>", section)
    assert [split for split, _ in rows] == ["all", "train", "heldout"]
    kl_col = ["shen_gap", "mad", "dominant_share", "normalized_entropy", "kl_uniform", "kl_target"].index("kl_target")
    assert all(re.findall(r"<td>(.*?)</td>", cells)[kl_col] == "∞" for _, cells in rows)
    assert "KL to target (nats)" in section and "∞ at scale 7.5." in section  # the chart's alt text


def test_compare_refuses_disjoint_batteries(sites: dict[str, Path], tmp_path: Path) -> None:
    other = make_run(tmp_path / "results", "other", values=("pilot", "chef"), scales=(1.0,), images=2)
    with pytest.raises(SuiteError, match="no prompts in common"):
        build_dashboard([sites["base"], other], tmp_path / "site")
    assert not (tmp_path / "site").exists() and not (tmp_path / "site.partial").exists()


def test_user_strings_are_escaped(sites: dict[str, Path]) -> None:
    site = sites["xss_site"]
    check_site(site)
    text = "".join(p.read_text() for p in site.glob("*.html"))
    for raw in ("<script>alert", "<img src=x", "<b>bold", "onerror=alert(2)>", '1.0"><script>'):
        assert raw not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;b&gt;bold&lt;/b&gt;-model" in text
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in text
    assert "<script" not in text.lower()  # the dashboard itself has no script at all
    assert XSS_MODEL not in text and all(p not in text for p in XSS_PROMPTS)


class _Grids(HTMLParser):
    """The images page's seed × scale tables: per table its caption, header cells and body rows; a cell is
    {tag, class, text, src, alt, rects (each <rect>'s attributes), caption (the text over the image)}."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict[str, Any]] = []
        self.cell: dict[str, Any] | None = None
        self.row: list[dict[str, Any]] = []
        self.inside, self.part = False, ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table" and a.get("class") == "sxs":
            self.inside = True
            self.tables.append({"caption": "", "head": [], "rows": []})
        elif not self.inside:
            return
        elif tag in ("caption", "thead", "tbody", "figcaption"):
            self.part = tag
        elif tag == "tr":
            self.row = []
        elif tag in ("th", "td"):
            self.cell = {"tag": tag, "class": a.get("class", ""), "text": "", "src": None, "alt": "", "rects": [],
                         "caption": ""}
        elif tag == "img" and self.cell is not None:
            self.cell.update(src=a["src"], alt=a["alt"])
        elif tag == "rect" and self.cell is not None:
            self.cell["rects"].append(a)

    def handle_endtag(self, tag: str) -> None:
        if not self.inside:
            return
        if tag == "table":
            self.inside = False
        elif tag in ("th", "td") and self.cell is not None:
            self.row.append(self.cell)
            self.cell = None
        elif tag == "tr":
            self.tables[-1]["head" if self.part == "thead" else "rows"].append(self.row)
        elif tag in ("caption", "figcaption"):
            self.part = "tbody" if tag == "figcaption" else ""

    def handle_data(self, data: str) -> None:
        if self.inside and self.part == "caption":
            self.tables[-1]["caption"] += data
        elif self.cell is not None:
            self.cell["caption" if self.part == "figcaption" else "text"] += data


def grids(page: Path | str) -> list[dict[str, Any]]:
    """The seed × scale tables of an images page (a file, or its HTML)."""
    parser = _Grids()
    parser.feed(page.read_text(encoding="utf-8") if isinstance(page, Path) else page)
    return parser.tables


def images_page(run: Path, site: Path, max_rows: int) -> str:
    """The images page's body for one run, built alone (thumbnails under `site`)."""
    view = open_run(run)
    return collapse.images_page(view, images.ThumbWriter(site, "r0", view), max_rows)


def records_by_key(run: Path) -> dict[tuple[int, int, float], dict[str, Any]]:
    """(prompt_index, image_index, guidance_scale) -> record."""
    lines = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    return {(r["prompt_index"], r["image_index"], float(r["guidance_scale"])): r for r in lines}


def edit_records(run: Path, edit: Any) -> None:
    """Rewrite records.jsonl with `edit(record)` applied to each record (in place)."""
    lines = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    for rec in lines:
        edit(rec)
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_images_page_is_a_seed_by_scale_grid(tmp_path: Path) -> None:
    run = make_run(tmp_path / "results", "grid", values=("doctor", "nurse"), scales=(7.5, 1.0), images=3)
    site = build_dashboard([run], tmp_path / "site").parent
    tables, recs = grids(site / "r0-images.html"), records_by_key(run)
    assert len(tables) == 2  # one grid per prompt
    for pi, grid in enumerate(tables):
        assert [c["text"] for c in grid["head"][0]] == ["image", "seed", "guidance scale 1", "guidance scale 7.5"]
        assert grid["caption"] == "All 3 image indices, each at 2 values of guidance scale"
        assert len(grid["rows"]) == 3 and all(len(row) == 4 for row in grid["rows"])  # index, seed, 2 scales
        for ii, (index, seed, *shots) in enumerate(grid["rows"]):
            assert (index["tag"], index["text"]) == ("th", f"#{ii}")
            assert (seed["class"], seed["text"]) == ("seed", str(recs[(pi, ii, 1.0)]["seed"]))
            for scale, cell in zip((1.0, 7.5), shots, strict=True):
                rec = recs[(pi, ii, scale)]  # this cell's image is this record's, pixel for pixel
                assert np.array_equal(pixels(site / cell["src"]), pixels(run / rec["image"]))
                assert f"Image {ii} of prompt “{rec['prompt']}” at guidance scale {scale:g}" in cell["alt"]
    small = tmp_path / "small"
    tables = grids(images_page(run, small, 2))  # the page stays bounded: the first 2 image indices of 3
    assert [[row[0]["text"] for row in grid["rows"]] for grid in tables] == [["#0", "#1"], ["#0", "#1"]]
    assert tables[0]["caption"] == "Image indices 0–1: the first 2 of 3, each at 2 values of guidance scale"
    assert len(list((small / "images" / "r0").glob("*.png"))) == 2 * 2 * 2  # only the shown images are written


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run with face boxes, a 64 × 64 image, statuses other than ok and a 19-digit seed; and its site."""
    root = tmp_path_factory.mktemp("overlay")
    run = make_run(root / "results", "overlay", values=("doctor",), scales=(1.0, 7.5), images=3, faces=True)
    recs = records_by_key(run)
    with Image.open(run / recs[(0, 0, 1.0)]["image"]) as img:  # the renders are 32 px: make one 64 px
        img.resize((64, 64), Image.Resampling.NEAREST).save(run / recs[(0, 0, 1.0)]["image"])
    long_seed = 9_223_372_036_854_775_807  # 19 digits

    def edit(rec: dict[str, Any]) -> None:
        key = (rec["image_index"], rec["guidance_scale"])
        mine = rec["classifiers"]["miniature"]
        if key == (0, 1.0):
            rec["faces"] = [[8, 16, 40, 48, 0.93]]
        elif key == (1, 1.0):
            rec["faces"] = []  # a detector ran and found no face
        elif key == (2, 1.0):
            rec["faces"] = None  # no detector ran
        elif key == (1, 7.5):
            for attr in ("skin_tone", "age"):
                mine[attr] = {"probs": None, "label": None, "status": "no_person", "confident": False}
        elif key == (2, 7.5):
            mine["age"] = {"probs": None, "label": None, "status": "not_measurable", "confident": False}
        if rec["image_index"] == 0:
            rec["seed"] = long_seed

    edit_records(run, edit)
    site = build_dashboard([run], root / "site").parent
    return {"run": run, "site": site, "seed": long_seed, "recs": records_by_key(run),
            "grids": grids(site / "r0-images.html")}


def _grid(overlay: dict[str, Any]) -> dict[str, Any]:
    assert len(overlay["grids"]) == 1, "the images page should hold one seed × scale grid (one prompt)"
    return overlay["grids"][0]


def _shot(overlay: dict[str, Any], ii: int, scale: float) -> dict[str, Any]:
    return _grid(overlay)["rows"][ii][2 + (1.0, 7.5).index(scale)]


def test_face_boxes_are_drawn_in_percent_of_the_image(overlay: dict[str, Any]) -> None:
    box = _shot(overlay, 0, 1.0)["rects"]  # [8, 16, 40, 48] on a 64 × 64 image
    assert [(r["x"], r["y"], r["width"], r["height"]) for r in box] == [("12.5%", "25%", "50%", "50%")]
    for (_, ii, scale), rec in overlay["recs"].items():
        cell = _shot(overlay, ii, scale)
        assert len(cell["rects"]) == len(rec.get("faces") or [])  # every box of every image, no more
        assert ("no face found" in cell["caption"]) == (rec.get("faces") == [])
    two = _shot(overlay, 2, 7.5)["rects"]  # the fixture's second box: [0, 22.4, 6.4, 30.4] on 32 × 32 pixels
    assert [r["class"] for r in two] == ["face", "face more"]
    assert (two[1]["x"], two[1]["y"], two[1]["width"], two[1]["height"]) == ("0%", "70%", "20%", "25%")
    css = (overlay["site"] / "style.css").read_text()  # the overlay covers exactly the image
    rule = re.search(r"svg\.faces \{([^}]*)\}", css)
    assert rule and all(p in rule.group(1) for p in ("position: absolute", "width: 100%", "height: 100%"))
    page = (overlay["site"] / "r0-images.html").read_text()
    assert "Outlines mark the faces the face detector found" in page


def test_faces_absent_means_no_detector(sites: dict[str, Path]) -> None:
    with_faces = (sites["two"] / "r0-images.html").read_text()
    without = (sites["two"] / "r1-images.html").read_text()  # the tuned fixture records no faces
    assert '<svg class="faces"' in with_faces and "<svg" not in without and "<rect" not in without
    assert "The run records no face boxes (no face detector ran)." in without


def test_malformed_faces_are_one_clear_error(tmp_path: Path) -> None:
    run = make_run(tmp_path / "results", "bad", values=("doctor",), scales=(1.0,), images=2, faces=True)
    edit_records(run, lambda rec: rec.update(faces=[[1, 2, 3]]) if rec["unit"] == 1 else None)
    with pytest.raises(SuiteError, match=re.escape("record unit 1 (image images/p000/g1/i0001.png): faces must be")):
        images_page(run, tmp_path / "site", 8)


def test_labels_and_statuses_over_each_image(overlay: dict[str, Any]) -> None:
    for (_, ii, scale), rec in overlay["recs"].items():
        cell, labels = _shot(overlay, ii, scale), [schema.label(rec, "miniature", a) for a in ("skin_tone", "age")]
        if (ii, scale) == (1, 7.5):
            assert cell["caption"] == "no person"
        elif (ii, scale) == (2, 7.5):
            assert cell["caption"] == f"{labels[0]} · age: not measurable" and labels[0] is not None
        else:
            assert cell["caption"].removesuffix("no face found") == f"{labels[0]} · {labels[1]}"
        assert f"miniature classifier: {cell['caption'].removesuffix('no face found')}" in cell["alt"]


def test_a_long_seed_sits_in_its_own_wrapping_cell(overlay: dict[str, Any]) -> None:
    index, seed, first, second = _grid(overlay)["rows"][0]
    assert (seed["tag"], seed["class"], seed["text"]) == ("td", "seed", str(overlay["seed"]))
    assert all(str(overlay["seed"]) not in c["text"] + c["caption"] for c in (index, first, second))
    css = (overlay["site"] / "style.css").read_text()
    rule = re.search(r"table\.sxs td\.seed \{([^}]*)\}", css)
    assert rule and "overflow-wrap: anywhere" in rule.group(1) and "max-width: 6.5rem" in rule.group(1)


def test_distilled_guidance_labels_every_axis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = [make_run(tmp_path / "results", name, values=("doctor", "nurse"), scales=(1.0, 3.5), images=3,
                     model_key=k) for k, name in enumerate(("flux-a", "flux-b"))]
    for run in runs:
        info = json.loads((run / "run.json").read_text())
        info["model"]["guidance"] = "distilled"
        (run / "run.json").write_text(json.dumps(info))
    xlabels: list[str] = []
    save = figures.save

    def spy(fig: Any, *args: Any, **kwargs: Any) -> figures.Plot:
        xlabels.append(fig.axes[0].get_xlabel())
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(figures, "save", spy)
    site = build_dashboard(runs, tmp_path / "site").parent
    assert len(xlabels) > 10 and set(xlabels) == {"distilled guidance"}  # every plot, the comparison's too
    for grid in grids(site / "r0-images.html"):
        assert [c["text"] for c in grid["head"][0]][2:] == ["distilled guidance 1", "distilled guidance 3.5"]
    for page in site.glob("*.html"):
        if page.name != "methods.html":
            assert "guidance scale" not in page.read_text(), page.name
    bias, compare = (site / "r0-bias.html").read_text(), (site / "compare.html").read_text()
    assert '<th scope="col">distilled guidance 3.5</th>' in (site / "index.html").read_text()  # headline table
    assert '<th scope="col">distilled guidance</th>' in bias and '<th scope="col">distilled guidance</th>' in compare
    assert "Distilled guidance values in common" in compare
    plain = open_run(make_run(tmp_path / "results", "cfg", values=("doctor",), scales=(1.0,), images=2))
    assert axis_name(plain) == "guidance scale" and axis_name(open_run(runs[0])) == "distilled guidance"
    assert axis_name(plain, open_run(runs[0])) == "guidance scale / distilled guidance"
    intro = (site / "index.html").read_text()  # the overview says what the guidance values are
    assert "collapse across distilled guidance values (a guidance-distilled model" in intro


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.slow
def test_long_seeds_do_not_overflow_in_chromium(overlay: dict[str, Any], tmp_path: Path) -> None:
    browser = Browser(tmp_path / "profile")
    expr = """[...document.querySelectorAll('td.seed')].map(td => {
        const r = document.createRange(); r.selectNodeContents(td);
        const text = r.getBoundingClientRect(), cell = td.getBoundingClientRect();
        const next = td.nextElementSibling.getBoundingClientRect();
        return {fits: td.scrollWidth <= td.clientWidth, inside: text.right <= cell.right + 0.5,
                clear: text.right <= next.left, width: cell.width}; })"""
    try:
        for width in (1200, 390):  # a desktop window and a phone's
            browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900,
                                                                "deviceScaleFactor": 1, "mobile": width < 500},
                         session=browser.session)
            got = browser.visit((overlay["site"] / "r0-images.html").as_uri())
            assert got["problems"] == [] and got["broken"] == [], got
            cells = browser.send("Runtime.evaluate", {"expression": expr, "returnByValue": True},
                                 session=browser.session)["result"]["value"]
            assert len(cells) == 3 and all(c["fits"] and c["inside"] and c["clear"] for c in cells), (width, cells)
    finally:
        browser.close()


@pytest.mark.slow
def test_out_dir_is_replaced_only_when_it_is_a_dashboard(sites: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SuiteError, match="does not hold an evalsuite dashboard"):
        build_dashboard([sites["base"]], foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "site"
    build_dashboard([sites["base"]], out, max_images_per_cell=2)
    before = (out / "index.html").read_text()

    def boom(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("disk full")

    monkeypatch.setattr(collapse, "images_page", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_dashboard([sites["base"]], out)
    assert (out / "index.html").read_text() == before and not (tmp_path / "site.partial").exists()
    monkeypatch.undo()
    build_dashboard([sites["base"]], out, max_images_per_cell=1)  # a previous dashboard is replaced
    assert (out / MARKER).is_file()


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "metrics" / "diversity.csv").unlink(), "diversity.csv: required metric table"),
    (lambda run: (run / "records.jsonl").write_text("{not json\n"), "records.jsonl, line 1"),
    (lambda run: _edit_json(run, schema_version=3), "run.json: results format version 3 is not one this"),
    (lambda run: _edit_json(run, status="running"), "not complete"),
    (lambda run: (run / "metrics" / "groups.csv").write_text("classifier,attribute\nx,y\n"), "missing col"),
])
def test_bad_results_folder_is_one_clear_error(sites: dict[str, Path], tmp_path: Path, damage: Any,
                                               message: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(sites["base"], run)
    damage(run)
    with pytest.raises(SuiteError, match=re.escape(message)):
        build_dashboard([run], tmp_path / "site")
    assert not (tmp_path / "site").exists()


def _edit_json(run: Path, **changes: Any) -> None:
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, **changes}))


def test_publish_reloads_and_matches_records(sites: dict[str, Path], tmp_path: Path) -> None:
    import datasets

    from evalsuite.publish import MARKER as PUBLISHED
    from evalsuite.publish import publish_run

    run = sites["base"]
    out = publish_run(run, tmp_path / "ds")
    ds = datasets.load_from_disk(str(out))
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert len(ds) == len(records) == 54 and (out / PUBLISHED).is_file()
    for row, rec in zip(ds, records, strict=True):
        assert (row["prompt"], row["seed"], row["guidance_scale"], row["image_index"]) == \
            (rec["prompt"], rec["seed"], rec["guidance_scale"], rec["image_index"])
        mine = rec["classifiers"]["miniature"]
        assert row["classifier"] == "miniature" and row["skin_tone_label"] == mine["skin_tone"]["label"]
        assert row["age_label"] == mine["age"]["label"] and row["gender_status"] == "not_measurable"
        assert json.loads(row["classifiers"]) == rec["classifiers"]
        assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(run / rec["image"])))
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "perceived" in card and "load_from_disk" in card
    publish_run(run, out)  # a previous export is replaced
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("x")
    with pytest.raises(SuiteError, match="refusing to replace"):
        publish_run(run, tmp_path / "foreign")


class Browser:
    """Headless Chromium over the DevTools protocol on a pipe (fds 3/4): no port, no network."""

    def __init__(self, user_data: Path) -> None:
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()

        def wire() -> None:  # in the child: the pipe ends become fds 3 (commands) and 4 (replies)
            a, b = os.dup(to_child), os.dup(from_child)
            os.dup2(a, 3)
            os.dup2(b, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.proc = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={user_data}",
                                      "--remote-debugging-pipe"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False,
                                     preexec_fn=wire)
        os.close(to_child)
        os.close(from_child)
        self.buf, self.n, self.events = b"", 0, []  # type: tuple[bytes, int, list[dict[str, Any]]]
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=self.session)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        n = self.n
        return self.wait(lambda m: m.get("id") == n).get("result", {})

    def wait(self, done: Any, timeout: float = 30.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                msg = json.loads(raw)
                if msg.get("method") == ALERT:  # an alert(): record it, then dismiss it
                    self.events.append(msg)
                    self.send("Page.handleJavaScriptDialog", {"accept": True}, session=self.session)
                elif "method" in msg:
                    self.events.append(msg)
                if done(msg):
                    return msg
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium exited")
            self.buf += chunk

    def visit(self, url: str) -> dict[str, Any]:
        """Load a page, force lazy images to load, and report what rendered plus the problems seen."""
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session=self.session)
        self.wait(lambda m: m.get("method") == "Page.loadEventFired")
        expr = """(async () => { for (const i of document.images) i.loading = 'eager';
          await Promise.all([...document.images].map(i => i.complete ? 0 :
            new Promise(r => { i.onload = i.onerror = r; })));
          return {images: document.images.length, tables: document.querySelectorAll('table').length,
            broken: [...document.images].filter(i => !i.naturalWidth).map(i => i.src),
            scripts: document.scripts.length}; })()"""
        got = self.send("Runtime.evaluate", {"expression": expr, "awaitPromise": True, "returnByValue": True},
                        session=self.session)["result"]["value"]
        problems = [e for e in self.events if e["method"] in ("Runtime.exceptionThrown", ALERT)
                    or (e["method"] == CONSOLE and e["params"]["type"] in ("error", "assert"))
                    or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        return {**got, "problems": problems}

    def close(self) -> None:
        try:
            self.send("Browser.close")
        finally:
            self.proc.wait(timeout=20)


FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--hide-scrollbars"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.slow
def test_headless_chromium_renders_without_errors(sites: dict[str, Path], tmp_path: Path) -> None:
    probe = tmp_path / "probe.html"  # the harness must notice an alert and a console error
    probe.write_text("<!DOCTYPE html><title>p</title><script>console.error('bad'); alert(7)</script>")
    browser = Browser(tmp_path / "profile")
    try:
        seen = browser.visit(probe.as_uri())["problems"]
        assert {e["method"] for e in seen} >= {ALERT, CONSOLE}
        for name in ("two", "xss_site"):
            for page in sorted(sites[name].glob("*.html")):
                got = browser.visit(page.as_uri())
                assert got["problems"] == [] and got["broken"] == [] and got["scripts"] == 0, (page.name, got)
                if page.name.endswith(("bias.html", "compare.html", "diversity.html")):
                    assert got["images"] >= 4 and got["tables"] >= 1, (page.name, got)
    finally:
        browser.close()
    index = sites["two"] / "r0-bias.html"
    shot = tmp_path / "dashboard.png"
    base = [str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=390,2400"]
    subprocess.run([*base, f"--screenshot={shot}", index.as_uri()], check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with Image.open(shot) as img:
        assert img.size == (390, 2400) and np.unique(np.asarray(img.convert("L"))).size > 16  # not blank
    shutil.copyfile(shot, SCREENSHOT)
    dom = subprocess.run([*base, "--dump-dom", index.as_uri()], check=True, timeout=120, capture_output=True,
                         text=True).stdout
    assert dom.count("<img") >= 10 and "<table>" in dom and "<figcaption>" in dom
