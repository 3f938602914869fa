"""Name -> metric lookup, so that configs and the command line can refer to metrics by name.

Each metric module registers its public metrics with :func:`register_metric` at import time; importing
``evalsuite.metrics`` (which any import of a submodule does first) therefore fills :data:`METRICS`.

Calling conventions by ``kind``:

* ``"distribution"``: ``fn(p) -> float`` where ``p`` is a 1-D array of class shares;
* ``"diversity"``: ``fn(emb) -> float`` where ``emb`` is an ``(n, d)`` embedding array;
* ``"alignment"``: ``fn(image_emb, text_emb) -> np.ndarray`` with one score per image;
* ``"truth"``: ``fn(read, wanted) -> float`` over what an exact reader found in each image and what
  the prompt asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from evalsuite.errors import SuiteError, did_you_mean

MetricKind = Literal["distribution", "diversity", "alignment", "truth"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class MetricInfo:
    """A registered metric.

    ``higher_is_better`` is ``True`` / ``False`` for metrics with a direction and ``None`` for purely
    descriptive ones. ``description`` is the first line of the function's docstring.
    """

    name: str
    fn: Callable[..., Any]
    higher_is_better: bool | None
    kind: MetricKind
    description: str


METRICS: dict[str, MetricInfo] = {}


def _first_line(doc: str | None) -> str:
    for line in (doc or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _origin(fn: Callable[..., Any]) -> tuple[str, str]:
    return (getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)))


def register_metric(name: str, *, higher_is_better: bool | None, kind: MetricKind) -> Callable[[F], F]:
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
        )
        return fn

    return decorator


def get_metric(name: str) -> MetricInfo:
    """Return the registered metric called ``name``; an unknown name raises :class:`SuiteError`."""
    try:
        return METRICS[name]
    except KeyError:
        raise SuiteError(f"unknown metric '{name}'" + did_you_mean(name, METRICS)) from None
