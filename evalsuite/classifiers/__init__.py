"""Attribute classifiers and image embedders for audits (see docs/classifiers.md).

Built in: classifiers `oracle` and `miniature` (the miniature world's exact oracle and supervised
net), `clip[:<hub-id-or-folder>]` (CLIP zero-shot over the battery's class descriptions); embedder
`clip[:<hub-id-or-folder>]`. Plug-ins: `package.module:factory` or `path/to/file.py:factory`.
"""

from evalsuite.metrics import CONFIDENCE_THRESHOLD
from evalsuite.results.schema import STATUSES

from .base import (
    AttributeClassifier,
    AttributeOutput,
    ClassifierContext,
    ImageEmbedder,
    available_classifiers,
    available_embedders,
    check_classifier_spec,
    check_embedder_spec,
    check_images,
    detects_people,
    get_classifier,
    get_embedder,
    make_output,
    not_measurable,
    register_classifier,
    register_embedder,
    to_record,
    validate_outputs,
)

__all__ = [
    "CONFIDENCE_THRESHOLD", "STATUSES", "AttributeClassifier", "AttributeOutput", "ClassifierContext",
    "ImageEmbedder", "available_classifiers", "available_embedders", "check_classifier_spec",
    "check_embedder_spec", "check_images", "detects_people", "get_classifier",
    "get_embedder", "make_output", "not_measurable", "register_classifier", "register_embedder", "to_record",
    "validate_outputs",
]
