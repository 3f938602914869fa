"""Name -> metric lookup, so that configs and the command line can refer to metrics by name.

Each metric module registers its public metrics with :func:`register_metric` at import time; importing
``evalsuite.metrics`` (which any import of a submodule does first) therefore fills :data:`METRICS`.

Calling conventions by ``kind``:

* ``"distribution"``: ``fn(p) -> float`` where ``p`` is a 1-D array of class shares;
* ``"diversity"``: ``fn(emb) -> float`` where ``emb`` is an ``(n, d)`` embedding array;
* ``"alignment"``: ``fn(image_emb, text_emb) -> np.ndarray`` with one score per image;
* ``"truth"``: ``fn(read, wanted) -> float`` over what an exact reader found in each image and what
  the prompt asked for;
* ``"divergence"``: ``fn(p, q) -> float`` between class shares p and a target distribution q;
* ``"rate"``: ``fn(flags) -> float``, the share of true flags among a group's images.

A metric is registered under the name its values carry in the results tables (``metrics/*.csv``), and
declares its range (:attr:`MetricInfo.bounds`), which intervals over its values respect
(:func:`evalsuite.metrics.mean_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from evalsuite.errors import SuiteError, did_you_mean

MetricKind = Literal["distribution", "diversity", "alignment", "truth", "divergence", "rate"]

F = TypeVar("F", bound=Callable[..., Any])
Bounds = tuple[float, float] | Callable[[int], tuple[float, float]]
"""A metric's range: fixed (lo, hi), or a function of the group's size (the number of classes K for
distribution metrics, the number of images n for diversity metrics); ``inf`` where it is unbounded."""


@dataclass(frozen=True)
class MetricInfo:
    """A registered metric.

    ``higher_is_better`` is ``True`` / ``False`` for metrics with a direction and ``None`` for purely
    descriptive ones. ``description`` is the first line of the function's docstring. ``range`` is the
    declared range (see :data:`Bounds`); :meth:`bounds` evaluates it for a group size.
    """

    name: str
    fn: Callable[..., Any]
    higher_is_better: bool | None
    kind: MetricKind
    description: str
    range: Bounds = (-math.inf, math.inf)

    def bounds(self, size: int) -> tuple[float, float]:
        """The range of the metric for a group of `size` (classes K or images n, by kind)."""
        return self.range(size) if callable(self.range) else self.range


METRICS: dict[str, MetricInfo] = {}


def _first_line(doc: str | None) -> str:
    for line in (doc or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _origin(fn: Callable[..., Any]) -> tuple[str, str]:
    return (getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)))


def register_metric(name: str, *, higher_is_better: bool | None, kind: MetricKind,
                    bounds: Bounds = (-math.inf, math.inf)) -> Callable[[F], F]:
    """Decorator that records ``fn`` in :data:`METRICS` under ``name`` and returns ``fn`` unchanged.

    Registering a different function under a name that is already taken raises ``ValueError``
    (a programming error, not a user error); re-registering the same function (same module and
    qualified name, e.g. after ``importlib.reload``) replaces the entry.
    """
    if kind not in get_args(MetricKind):
        raise ValueError(f"unknown metric kind {kind!r}")

    def decorator(fn: F) -> F:
        existing = METRICS.get(name)
        if existing is not None and _origin(existing.fn) != _origin(fn):
            raise ValueError(f"metric '{name}' is already registered to {existing.fn!r}")
        METRICS[name] = MetricInfo(
            name=name,
            fn=fn,
            higher_is_better=higher_is_better,
            kind=kind,
            description=_first_line(fn.__doc__),
            range=bounds,
        )
        return fn

    return decorator


def get_metric(name: str) -> MetricInfo:
    """Return the registered metric called ``name``; an unknown name raises :class:`SuiteError`."""
    try:
        return METRICS[name]
    except KeyError:
        raise SuiteError(f"unknown metric '{name}'" + did_you_mean(name, METRICS)) from None


SHARE_PREFIXES = ("share:", "share_corrected:")


def metric_bounds(name: str, size: int) -> tuple[float, float]:
    """The range of a results-table metric for a group of `size` (see :data:`Bounds`): [0, 1] for a
    class share (``share:<class>``, ``share_corrected:<class>``), the registered range otherwise, and
    unbounded for a name the registry does not know (e.g. ``clip_score_std``)."""
    if name.startswith(SHARE_PREFIXES):
        return (0.0, 1.0)
    info = METRICS.get(name)
    return info.bounds(size) if info is not None else (-math.inf, math.inf)
