"""What the dashboard calls the guidance axis: every plot's axis label, table header and image-grid column
reads :func:`axis_name`.

A run's ``model.guidance`` in run.json says which kind of guidance its scales are: ``"distilled"`` for a
guidance-distilled model (Flux), which takes the guidance strength as an input and runs no classifier-free
guidance; ``"none"`` for a model that takes no guidance at all (FLUX.1 [schnell]: the scale changes
nothing); absent or ``"classifier-free"`` for classifier-free guidance, whose strength is the guidance scale.
A source other than a diffusers pipeline (run.json's ``source``: `evalsuite.sources`) says ``"not exposed"``
(a hosted service or exported images without scales: one value, a label only) or ``"as recorded"``
(exported images whose manifest gives the scale each was made at).
"""

from __future__ import annotations

from evalsuite.results import RunView

CLASSIFIER_FREE = "guidance scale"
DISTILLED = "distilled guidance"


def is_distilled(view: RunView) -> bool:
    """Whether the run's guidance is a distilled model's guidance input rather than classifier-free guidance."""
    return view.model.get("guidance") == "distilled"


def axis_name(*views: RunView) -> str:
    """The guidance axis of one run, or of runs shown together: "guidance scale" or "distilled guidance"
    ("guidance scale / distilled guidance" where runs of both kinds share an axis)."""
    kinds = list(dict.fromkeys(DISTILLED if is_distilled(v) else CLASSIFIER_FREE for v in views))
    return " / ".join(kinds) if kinds else CLASSIFIER_FREE


def at_value(axis: str, value: float) -> str:
    """A column header or caption for one guidance value, e.g. "guidance scale 7.5"."""
    return f"{axis} {value:g}"


def values_phrase(*views: RunView) -> str:
    """The runs' guidance values in words, for prose (e.g. "classifier-free guidance scales")."""
    axis = axis_name(*views)
    if axis == CLASSIFIER_FREE:
        if all(v.model.get("guidance") == "not exposed" for v in views):
            return ("one guidance value, a label only (the image source does not expose a guidance scale, so the "
                    "guidance axis was not measured)")
        if all(v.model.get("guidance") == "as recorded" for v in views):
            return "guidance scales as the images' manifest records them (the images were made elsewhere)"
        if all(v.model.get("guidance") == "none" for v in views):
            return ("guidance scales, which this model ignores (it takes no guidance input and runs no "
                    "classifier-free guidance)")
        return "classifier-free guidance scales"
    if axis == DISTILLED:
        return ("distilled guidance values (a guidance-distilled model, such as Flux, takes the guidance strength "
                "as an input instead of running classifier-free guidance)")
    return "guidance values (classifier-free guidance scales in one run, distilled guidance in the other)"
