"""Pure-numpy metrics: demographic bias over class shares, intervals, classifier-error correction,
mode collapse over embeddings, and text-image alignment. Importing this package registers every
named metric in :data:`METRICS` (see :func:`get_metric`)."""

from evalsuite.metrics.alignment import clip_score, on_prompt_rate
from evalsuite.metrics.correction import confusion_matrix, corrected_shares, project_to_simplex
from evalsuite.metrics.distribution import (
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
    soft_class_shares,
)
from evalsuite.metrics.diversity import (
    cosine_gram,
    l2_normalize,
    mean_pairwise_cosine,
    near_duplicate_pairs,
    near_duplicate_rate,
    vendi_score,
)
from evalsuite.metrics.intervals import (
    bootstrap_interval,
    cluster_share_interval,
    share_intervals,
    wilson_interval,
)
from evalsuite.metrics.registry import METRICS, MetricInfo, get_metric, register_metric

__all__ = [
    "METRICS",
    "MetricInfo",
    "bootstrap_interval",
    "class_counts",
    "class_shares",
    "clip_score",
    "cluster_share_interval",
    "confusion_matrix",
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
    "project_to_simplex",
    "register_metric",
    "share_intervals",
    "shen_gap",
    "soft_class_shares",
    "vendi_score",
    "wilson_interval",
]
