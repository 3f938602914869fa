"""Pure-numpy metrics: demographic bias over class shares, intervals, classifier-error correction,
mode collapse over embeddings, and text-image alignment. Importing this package registers every
named metric in :data:`METRICS` (see :func:`get_metric`)."""

from evalsuite.metrics.alignment import clip_score, on_prompt_rate
from evalsuite.metrics.correction import (
    confusion_matrix,
    confusion_problems,
    corrected_shares,
    project_to_simplex,
)
from evalsuite.metrics.distribution import (
    CONFIDENCE_THRESHOLD,
    class_counts,
    class_shares,
    dominant_share,
    entropy,
    joint_labels,
    kl_divergence,
    kl_to_uniform,
    mad,
    normalized_entropy,
    shen_gap,
)
from evalsuite.metrics.diversity import (
    NEAR_DUPLICATE_COSINE,
    cosine_gram,
    l2_normalize,
    mean_pairwise_cosine,
    near_duplicate_pairs,
    near_duplicate_rate,
    vendi_score,
)
from evalsuite.metrics.intervals import (
    ZERO_RESIDUAL,
    cluster_share_interval,
    paired_difference_interval,
    share_intervals,
    wilson_interval,
)
from evalsuite.metrics.registry import METRICS, MetricInfo, get_metric, register_metric

__all__ = [
    "CONFIDENCE_THRESHOLD",
    "METRICS",
    "NEAR_DUPLICATE_COSINE",
    "ZERO_RESIDUAL",
    "MetricInfo",
    "class_counts",
    "class_shares",
    "clip_score",
    "cluster_share_interval",
    "confusion_matrix",
    "confusion_problems",
    "corrected_shares",
    "cosine_gram",
    "dominant_share",
    "entropy",
    "get_metric",
    "joint_labels",
    "kl_divergence",
    "kl_to_uniform",
    "l2_normalize",
    "mad",
    "mean_pairwise_cosine",
    "near_duplicate_pairs",
    "near_duplicate_rate",
    "normalized_entropy",
    "on_prompt_rate",
    "paired_difference_interval",
    "project_to_simplex",
    "register_metric",
    "share_intervals",
    "shen_gap",
    "vendi_score",
    "wilson_interval",
]
