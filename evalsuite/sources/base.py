"""What the runner knows of any source of images: a `Source`, whose generator makes a batch of work units
into a `Made` (an image per unit, or the source's refusal).

A diffusers pipeline is one source (`pipeline_source`: it exposes the guidance scale and the seed, and
never refuses); a hosted image API (`evalsuite.sources.hosted`) and a folder of images made elsewhere
(`evalsuite.sources.folder`) are others. A source that does not expose the guidance scale can be
audited at one scale only (`one_scale_problem`): the scale is then a label, and run.json says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from evalsuite.models import LoadedModel, ModelProfile

if TYPE_CHECKING:
    from evalsuite.battery import Battery, Prompt
    from evalsuite.generate import Generator

EXPOSABLE = ("guidance_scale", "seed")  # what a source may let an audit set per image


class Wanted(Protocol):
    """One work unit as a source reads it (`evalsuite.runner.Unit`)."""

    @property
    def prompt_index(self) -> int: ...
    @property
    def prompt(self) -> Prompt: ...
    @property
    def guidance_scale(self) -> float: ...
    @property
    def image_index(self) -> int: ...
    @property
    def seed(self) -> int: ...


class Made(NamedTuple):
    """What a source made of a batch of units, one entry per unit in order: the uint8 image (H, W, 3), or
    None where the source refused to make it; the refusal (what the source said) where it refused; and
    the seed the image was made with where the source knows one other than the unit's (else None)."""

    images: list[np.ndarray | None]
    refusals: list[str | None]
    seeds: list[int | None]


class UnitGenerator(Protocol):
    def make(self, units: Sequence[Wanted]) -> Made: ...


@dataclass(frozen=True)
class Source:
    """A source of images as the runner uses it.

    `model` is run.json's model entry; `info` its `source` entry (None for a diffusers pipeline, whose
    model entry says everything); `refusals`: the source can refuse to make an image (groups.csv then
    reports `refused_rate`); `scratch`: a folder, relative to the run folder, that the source keeps while
    the run is unfinished (the images a hosted service returned, kept for a resume), removed when the run
    completes."""

    generator: UnitGenerator
    model: dict[str, Any]
    profile: ModelProfile
    device: str
    sampler: str | None = None
    info: dict[str, Any] | None = None
    refusals: bool = False
    scratch: str | None = None


class _PipelineUnits:
    """A diffusers generator (`evalsuite.generate.Generator`) as a `UnitGenerator`: it never refuses and
    makes each image with its unit's seed."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator

    def make(self, units: Sequence[Wanted]) -> Made:
        images = self.generator.generate([u.prompt.text for u in units], [u.guidance_scale for u in units],
                                         [u.seed for u in units])
        return Made(list(images), [None] * len(units), [None] * len(units))


def pipeline_source(loaded: LoadedModel, generator: Generator) -> Source:
    """A loaded diffusers pipeline and its generator as a `Source` (it exposes the scale and the seed)."""
    return Source(_PipelineUnits(generator), loaded.describe(), loaded.profile, loaded.device,
                  sampler=type(loaded.pipe.scheduler).__name__)


def describe_source(kind: str, exposes: Sequence[str], **details: Any) -> dict[str, Any]:
    """run.json's `source` entry: the kind, what it exposes and does not (of `EXPOSABLE`), and details."""
    return {"kind": kind, **details, "exposes": [e for e in EXPOSABLE if e in exposes],
            "not_exposed": [e for e in EXPOSABLE if e not in exposes]}


def one_scale_problem(battery: Battery, who: str, option: str = "--scales") -> str | None:
    """The message refusing a guidance sweep against a source that does not expose the guidance scale
    (None: the battery lists one scale)."""
    scales = list(battery.guidance_scales)
    if len(scales) <= 1:
        return None
    shown = "[" + ", ".join(f"{s:g}" for s in scales) + "]"
    return (f"{battery.source or battery.name}: guidance_scales: {shown}: {who} does not expose a guidance "
            f"scale, so a battery cannot sweep it; list one scale (e.g. {option} 1), which is then a label only "
            "(run.json records the guidance scale as not exposed)")
