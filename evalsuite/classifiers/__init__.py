"""Attribute classifiers and image embedders for audits (see docs/classifiers.md).

Built in, each valid on the image domains it declares (`domain_problems`): classifiers `oracle` and
`miniature` (the miniature world's exact oracle and supervised net: miniature images only),
`clip[:<hub-id-or-folder>]` (CLIP zero-shot over the battery's class descriptions: any domain),
`photo[:<clip>]` (natural images: skin tone by face pixels, the rest by CLIP on the face),
`skin-tone` (natural images: ITA / Fitzpatrick proxy / Monk scale of face pixels), `head:<folder>`
(natural images: a linear head, e.g. FairFace-style, over CLIP embeddings of the face, from a local
safetensors folder); face detector `opencv-haar`; embedder `clip[:<hub-id-or-folder>]`. Plug-ins:
`package.module:factory` or `path/to/file.py:factory`.
"""

from evalsuite.metrics import CONFIDENCE_THRESHOLD
from evalsuite.results.schema import STATUSES

from .base import (
    PLUGINS_ENV,
    AttributeClassifier,
    AttributeOutput,
    ClassifierContext,
    FaceDetector,
    ImageEmbedder,
    available_classifiers,
    available_detectors,
    available_embedders,
    check_classifier_spec,
    check_detector_spec,
    check_embedder_spec,
    check_images,
    classify_faces,
    detects_people,
    domain_problems,
    face_crops,
    get_classifier,
    get_detector,
    get_embedder,
    is_plugin,
    make_output,
    not_measurable,
    plugin_problems,
    plugins_allowed,
    register_classifier,
    register_detector,
    register_embedder,
    registered,
    to_record,
    uses_faces,
    validate_outputs,
)

__all__ = [
    "CONFIDENCE_THRESHOLD", "STATUSES", "PLUGINS_ENV", "AttributeClassifier", "AttributeOutput", "ClassifierContext",
    "FaceDetector", "ImageEmbedder", "available_classifiers", "available_detectors", "available_embedders",
    "check_classifier_spec", "check_detector_spec", "check_embedder_spec", "check_images", "classify_faces",
    "detects_people", "domain_problems", "face_crops", "get_classifier", "get_detector", "get_embedder", "is_plugin",
    "make_output", "not_measurable", "plugin_problems", "plugins_allowed", "register_classifier", "register_detector",
    "register_embedder", "registered", "to_record", "uses_faces", "validate_outputs",
]
