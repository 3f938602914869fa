"""Checking YAML configs: read the file, collect every problem, and declare each field once.

A config (a prompt battery, an RL training config) is read by :func:`read_yaml` into plain data and
checked into frozen dataclasses. Each field is declared once, on its dataclass, with :func:`setting`:
the check that turns the raw value into the field's value (or records a problem), and the default
(a field without one is required). :func:`read_fields` checks a mapping against such a dataclass:
unknown keys (with "did you mean"), missing required keys and every field's value. Problems are
collected in one :class:`Check` ("key: message", naming the value found and what is allowed), so that
one :class:`~evalsuite.errors.ConfigError` reports them all before anything loads.

    @dataclass(frozen=True)
    class Sampling:
        steps: int = setting(integer(1), doc="denoising steps")
        eta: float = setting(number("[0, 1]"), 0.0, doc="DDIM eta")

    c = Check()
    values = read_fields(c, Sampling, raw, "sampling")  # {"steps": 20, "eta": 0.0}, or problems in c
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING
from typing import Any

import yaml

from evalsuite.errors import ConfigError, did_you_mean

__all__ = [
    "Check", "Checker", "Section", "YamlLoader", "boolean", "choice", "declared", "integer", "names", "number",
    "read_fields", "read_yaml", "scales", "setting", "show", "text", "yaml_problem",
]

Checker = Callable[["Check", str, Any], Any]
"""A field check: ``check(c, key, raw) -> value``, or None after recording a problem in ``c``."""


def show(value: Any) -> str:
    """A value's kind and repr for problem messages, e.g. "str 'abc'" (``null`` for None)."""
    return "null" if value is None else f"{type(value).__name__} {value!r}"


class Check:
    """Collects problems ("key: message") instead of stopping at the first; a failed check returns None."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def wrong(self, key: str, expected: str, value: Any) -> Any:
        """Add "must be <expected>, got <value>"; returns None, so a failing check can return it."""
        self.add(key, f"must be {expected}, got {show(value)}")
        return None

    def mapping(self, key: str, value: Any, allowed: Sequence[str] = (),
                required: Sequence[str] = ()) -> dict[str, Any] | None:
        """`value` as a dict with str keys; given `allowed`, unknown and missing keys are problems too."""
        if not isinstance(value, Mapping):
            return self.wrong(key, "a mapping", value)
        prefix = f"{key}." if key else ""
        for k in value:
            if not isinstance(k, str):
                self.add(f"{prefix}{k}", f"keys must be str, got {show(k)}")
            elif allowed and k not in allowed:
                self.add(prefix + k, f"unknown key {k!r}{did_you_mean(k, allowed)}")
        for k in required:
            if k not in value:
                self.add(prefix + k, "required key is missing")
        return {k: v for k, v in value.items() if isinstance(k, str)}

    def sequence(self, key: str, value: Any, non_empty: bool = True) -> list[Any] | None:
        """A list (a tuple is accepted too, for callers building data in Python)."""
        if not isinstance(value, (list, tuple)):
            return self.wrong(key, "a list", value)
        if non_empty and not value:
            self.add(key, "must be a non-empty list, got an empty list")
        return list(value)

    def text(self, key: str, value: Any, expected: str = "a non-empty str",
             pattern: re.Pattern[str] | None = None) -> str | None:
        ok = isinstance(value, str) and value.strip() and (pattern is None or pattern.fullmatch(value))
        return value if ok else self.wrong(key, expected, value)

    def integer(self, key: str, value: Any, low: int, high: int | None = None) -> int | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        if high is None:
            return value if ok else self.wrong(key, f"an int >= {low}", value)
        return value if ok and value <= high else self.wrong(key, f"an int in [{low}, {high}]", value)

    def number(self, key: str, value: Any, low: float, high: float = math.inf) -> float | None:
        if (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and low <= value <= high):
            return float(value)
        span = f"in [{low:g}, {high:g}]" if high < math.inf else f">= {low:g}"
        return self.wrong(key, f"a number {span}", value)

    def choice(self, key: str, value: Any, allowed: Sequence[str]) -> str | None:
        if isinstance(value, str) and value in allowed:
            return value
        self.add(key, f"{show(value)} is not allowed{did_you_mean(str(value), allowed)}")
        return None

    def boolean(self, key: str, value: Any) -> bool | None:
        return value if isinstance(value, bool) else self.wrong(key, "true or false", value)

    def unique_list(self, key: str, value: Any, item: Callable[[str, Any], Any]) -> tuple[Any, ...] | None:
        """A non-empty list whose items all pass the check `item` and are unique."""
        items = self.sequence(key, value)
        out: list[Any] = []
        for i, raw in enumerate(items or []):
            checked = item(f"{key}[{i}]", raw)
            if checked is not None and checked in out:
                self.add(f"{key}[{i}]", f"duplicate value {raw!r}")
            elif checked is not None:
                out.append(checked)
        return tuple(out) if items and len(out) == len(items) else None

    def str_list(self, key: str, value: Any) -> tuple[str, ...] | None:
        return self.unique_list(key, value, self.text)

    def scales(self, key: str, value: Any) -> tuple[float, ...] | None:
        """Unique guidance scales >= 1, ascending; two that print alike (6 significant digits: results
        name image folders g{scale:g}) are refused, as their images would overwrite each other."""
        found = self.unique_list(key, value, lambda k, v: self.number(k, v, 1.0))
        if found is None:
            return None
        printed: dict[str, float] = {}
        for g in found:
            if f"{g:g}" in printed:
                return self.wrong(key, f"distinct when printed with 6 significant digits (image folders are "
                                  f"named g<scale>; {printed[f'{g:g}']!r} and {g!r} both print as {g:g})", value)
            printed[f"{g:g}"] = g
        return tuple(sorted(found))


# ---------------------------------------------------------------- field checks (Checker factories)


def integer(low: int, high: int | None = None) -> Checker:
    """An int >= low (and <= high); a bool is not an int here."""
    return lambda c, key, value: c.integer(key, value, low, high)


def number(interval: str) -> Checker:
    """A finite number in an interval written like "(0, 1]", "[0, inf)" or "[1, 100]"; kept as float."""
    bounds = re.fullmatch(r"([(\[])\s*([^,]+),\s*([^)\]]+)([)\]])", interval)
    if bounds is None:
        raise ValueError(f"number(): cannot read the interval {interval!r}")
    opening, low, high, closing = bounds.group(1), float(bounds.group(2)), float(bounds.group(3)), bounds.group(4)

    def check(c: Check, key: str, value: Any) -> float | None:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (low < value if opening == "(" else low <= value)
              and (value < high if closing == ")" else value <= high))
        return float(value) if ok else c.wrong(key, f"a number in {interval}", value)
    return check


def choice(*allowed: str) -> Checker:
    """One of `allowed` (a miss says "did you mean")."""
    return lambda c, key, value: c.choice(key, value, allowed)


def boolean(c: Check, key: str, value: Any) -> bool | None:
    """true or false (not 0/1, not "yes")."""
    return c.boolean(key, value)


def text(c: Check, key: str, value: Any) -> str | None:
    """A non-empty str."""
    return c.text(key, value)


def names(c: Check, key: str, value: Any) -> tuple[str, ...] | None:
    """A non-empty list of unique non-empty str, kept as a tuple."""
    return c.str_list(key, value)


def scales(c: Check, key: str, value: Any) -> tuple[float, ...] | None:
    """Guidance scales: unique numbers >= 1 that print distinctly, kept ascending (`Check.scales`)."""
    return c.scales(key, value)


# ---------------------------------------------------------------- settings declared once


def setting(check: Checker, default: Any = MISSING, *, doc: str = "") -> Any:
    """A dataclass field read from YAML: its check, its default (none: the key is required) and a
    one-line meaning (with units) that documentation can list."""
    metadata = {"check": check, "doc": doc}
    if default is MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def declared(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The fields of dataclass `cls` declared with :func:`setting`, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls) if "check" in f.metadata}


def read_fields(c: Check, cls: type, raw: Any, key: str = "") -> dict[str, Any] | None:
    """Check the mapping `raw` (at dotted path `key`) against the settings of dataclass `cls`.

    Unknown keys, missing required keys and each present field's check add problems to `c`. Returns
    every setting's value (the default where the key is absent, None where its check failed), or None
    when `raw` is not a mapping.
    """
    fields = declared(cls)
    required = [name for name, f in fields.items() if f.default is MISSING and f.default_factory is MISSING]
    data = c.mapping(key, raw, tuple(fields), required)
    if data is None:
        return None
    prefix = f"{key}." if key else ""
    out: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            out[name] = f.metadata["check"](c, prefix + name, data[name])
        elif f.default is not MISSING:
            out[name] = f.default
        elif f.default_factory is not MISSING:
            out[name] = f.default_factory()
        else:
            out[name] = None
    return out


@dataclasses.dataclass(frozen=True)
class Section:
    """The check of a nested section (a mapping whose keys are the settings of dataclass `cls`): its values
    as :func:`read_fields` gives them, a dict (None where a check failed), so that every problem is known
    before the caller builds ``cls(**values)``."""

    cls: type[Any]

    def __call__(self, c: Check, key: str, raw: Any) -> dict[str, Any] | None:
        return read_fields(c, self.cls, raw, key)


# ---------------------------------------------------------------- reading YAML


class YamlLoader(yaml.SafeLoader):
    """Safe YAML (no tags that build objects) that also reads exponent floats without a dot, such as
    1e-4 (plain YAML 1.1 reads them as str)."""


YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: where it is (line and column, 1-based) and what is wrong."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None and start.line != getattr(mark, "line", None):
        problem += f" ({context} at line {start.line + 1}, column {start.column + 1})"
    return f"YAML syntax error{where}: {problem}"


def read_yaml(path: str | Any, what: str) -> Any:
    """The data of a YAML file (`YamlLoader`); a missing, unreadable, malformed or empty file is one
    ConfigError naming the file (`what` names the kind of file: "battery", "config")."""
    source = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise ConfigError(source, [f"{what} file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"cannot read {what} file: {exc}"]) from None
    try:
        data = yaml.load(raw, Loader=YamlLoader)  # noqa: S506 - YamlLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(source, [yaml_problem(exc)]) from None
    if data is None:
        raise ConfigError(source, [f"file is empty; expected a mapping of {what} keys"])
    return data
