"""`evalsuite publish RUN --out DIR`: a run's per-image records and images as a Hugging Face `datasets`
dataset (reload with `datasets.load_from_disk(DIR)`), with a dataset card, README.md, beside the data.

One row per image: the PNG (an Image column holding the bytes), the record's fields, the primary
classifier's outputs flattened per attribute (`<attr>_label`, `_status`, `_confident`, `_probs`), and every
classifier's raw outputs as a JSON string (`classifiers`). `push_to_hub` also uploads it to the Hub
(needs a token and network); only the local path is tested.
"""

from __future__ import annotations

import html
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from evalsuite.errors import SuiteError
from evalsuite.folders import building, check_output_target
from evalsuite.metrics import CONFIDENCE_THRESHOLD
from evalsuite.results import RunView, entry, open_run

MARKER = ".evalsuite-publish"


def _features(attributes: list[str]) -> Any:
    import datasets

    seq = getattr(datasets, "List", None) or datasets.Sequence
    cols: dict[str, Any] = {
        "image": datasets.Image(), "image_path": datasets.Value("string"), "unit": datasets.Value("int64"),
        "prompt_index": datasets.Value("int32"), "prompt": datasets.Value("string"),
        "heldout": datasets.Value("bool"), "slots": datasets.Value("string"),
        "guidance_scale": datasets.Value("float64"), "image_index": datasets.Value("int32"),
        "seed": datasets.Value("int64"), "clip_score": datasets.Value("float64"),
        "embedding": seq(datasets.Value("float32")), "classifier": datasets.Value("string"),
    }
    for attr in attributes:
        cols[f"{attr}_label"] = datasets.Value("string")
        cols[f"{attr}_status"] = datasets.Value("string")
        cols[f"{attr}_confident"] = datasets.Value("bool")
        cols[f"{attr}_probs"] = seq(datasets.Value("float32"))
    cols["classifiers"] = datasets.Value("string")
    return datasets.Features(cols)


def _rows(run: str) -> Iterator[dict[str, Any]]:
    """The dataset's rows, one per record, in records.jsonl order (a generator: images are read lazily)."""
    view = open_run(Path(run))
    clf = view.primary_classifier
    for rec in view.iter_records():
        outputs = rec.get("classifiers") or {}
        row: dict[str, Any] = {
            "image": {"bytes": view.image_path(rec).read_bytes(), "path": str(rec["image"])},
            "image_path": str(rec["image"]), "unit": rec.get("unit"), "prompt_index": rec["prompt_index"],
            "prompt": str(rec["prompt"]), "heldout": bool(rec.get("heldout", False)),
            "slots": json.dumps(rec.get("slots") or {}, ensure_ascii=False),
            "guidance_scale": rec["guidance_scale"], "image_index": rec["image_index"], "seed": rec["seed"],
            "clip_score": rec.get("clip_score"), "embedding": rec.get("embedding"), "classifier": clf,
            "classifiers": json.dumps(outputs, ensure_ascii=False, sort_keys=True),
        }
        for attr in view.battery.attribute_names:
            found = entry(rec, clf, attr)
            row[f"{attr}_label"] = found.label
            row[f"{attr}_status"] = found.status
            row[f"{attr}_confident"] = found.confident
            row[f"{attr}_probs"] = list(found.probs) if found.probs is not None else None
        yield row


def publish_run(run: Path, out: Path, *, push_to_hub: str | None = None, token: str | None = None) -> Path:
    """Write the run as a `datasets` dataset with a card into `out` (atomically); optionally push it."""
    import datasets

    run, out = Path(run), Path(out).resolve()
    if push_to_hub is not None:
        check_repo_id(push_to_hub)  # before anything is read or written
    check_output_target(out, MARKER, "published dataset")
    view = open_run(run)
    _ = view.records  # every record checked before anything is written
    with building(out, MARKER, "published dataset", "evalsuite publish") as (partial, marker), \
            tempfile.TemporaryDirectory(prefix="evalsuite-publish-") as cache:
        features = _features(list(view.battery.attribute_names))
        kwargs = {"run": str(run.resolve())}
        ds = datasets.Dataset.from_generator(_rows, gen_kwargs=kwargs, cache_dir=cache, features=features)
        ds.info.description = f"evalsuite audit images of run {view.name}"
        ds.save_to_disk(str(partial))
        (partial / "README.md").write_text(dataset_card(view, len(ds)), encoding="utf-8")
        marker.update(run=str(run))
    if push_to_hub:
        _push(out, push_to_hub, token)
    return out


def check_repo_id(repo_id: str) -> None:
    """SuiteError unless `repo_id` is a Hub dataset id ("name" or "namespace/name")."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise SuiteError(f"--push-to-hub: {repo_id!r} is not a Hub repo id ('name' or 'namespace/name'): {exc}; "
                         "nothing was written") from None


def _push(out: Path, repo_id: str, token: str | None) -> None:
    """Upload the saved dataset and its card to the Hub (needs network and a write token)."""
    import datasets

    try:
        datasets.load_from_disk(str(out)).push_to_hub(repo_id, token=token)
        from huggingface_hub import HfApi

        HfApi(token=token).upload_file(path_or_fileobj=str(out / "README.md"), path_in_repo="README.md",
                                       repo_id=repo_id, repo_type="dataset")
    except Exception as exc:  # network, authentication or permission problems
        raise SuiteError(f"pushing {out} to the Hub as {repo_id!r} failed: {exc}") from None


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    return "100K<n<1M"


def dataset_card(view: RunView, n_rows: int) -> str:
    """README.md: YAML front matter, what the data are, the fields, how attributes were inferred, caveats.
    User-controlled text is HTML-escaped in the Markdown and YAML-quoted in the front matter."""
    e = html.escape
    front = {"pretty_name": f"evalsuite audit: {view.name}", "size_categories": [_size_category(n_rows)],
             "task_categories": ["text-to-image"], "tags": ["evalsuite", "bias-audit", "synthetic-images"],
             "license": "other"}
    battery, clf = view.battery, view.primary_classifier
    raw_versions = view.info.get("versions")
    versions: dict[str, Any] = raw_versions if isinstance(raw_versions, dict) else {}
    attrs = "; ".join(f"{a.name} ({', '.join(a.classes)})" for a in battery.attributes)
    fields = [
        ("image", "the generated image (PNG)"), ("image_path", "its path inside the results folder"),
        ("unit", "work-unit number of the run"),
        ("prompt_index, prompt", "the prompt and its index in the battery"),
        ("heldout", "whether the prompt is held out from training"), ("slots", "template slot values (JSON)"),
        ("guidance_scale", "classifier-free guidance scale"),
        ("image_index", "image number within (prompt, scale)"),
        ("seed", "generation seed; the same prompt and image index share it across scales, and across runs "
         "of the same battery name and battery seed"),
        ("clip_score", "100 × max(cos(image, prompt), 0) with the run's embedder"),
        ("embedding", "the embedder's L2-normalised image embedding"),
        ("classifier", "the primary attribute classifier whose outputs are flattened below"),
        ("<attr>_label / _status / _confident / _probs", "that classifier's label, status (ok, no_person, "
         f"not_measurable), whether max(probs) >= {CONFIDENCE_THRESHOLD:g}, and class probabilities in the "
         "battery's class order"),
        ("classifiers", "every classifier's raw outputs (JSON)"),
    ]
    table = "\n".join(f"| `{name}` | {text} |" for name, text in fields)
    return f"""---
{yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip()}
---

# evalsuite audit: {e(view.name)}

Images generated by **{e(view.model_label)}** for the prompt battery **{e(battery.name)}** version
{e(battery.version)} ({len(view.prompts)} prompts, guidance scales {", ".join(f"{s:g}" for s in view.scales)},
{battery.images_per_prompt} images per prompt and scale; {n_rows} images in all), with the perceived
attributes that the classifier **{e(clf)}** inferred. Made by evalsuite
{e(str(versions.get("evalsuite", "?")))}; run finished {e(str(view.info.get("finished", "?")))}.

Reload with `datasets.load_from_disk("<this folder>")`.

## Fields

| field | meaning |
| --- | --- |
{table}

## How attributes were inferred

Attributes ({e(attrs)}) are **perceived**, not self-identified: an automatic classifier labels how the
person in a generated image appears to it. No real person is depicted or asked. Status `no_person` means no
person was found; `not_measurable` means the classifier cannot measure that attribute on these images.

## Caveats

- Classifier errors can differ between groups and shift the measured shares.
- The classes are coarse bins of continuous, culturally defined traits.
- Each prompt and scale has few images; treat per-prompt shares as noisy.
- The images' licence follows the generating model's; check it before reuse.
"""
