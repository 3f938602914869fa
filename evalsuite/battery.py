"""Prompt batteries: the YAML files that say which prompts an audit renders and how it scores them.

Format (schema_version 1), one YAML mapping; keys marked * are optional::

    schema_version: 1; name: occupations ([A-Za-z0-9_.-]+); version: "1.0" (a str; bump it on any
      change that alters results); description*: free text
    templates: ["a photo of a {occupation}"]   # each {slot} defined in slots, each slot used
    slots: {occupation: [doctor, nurse]}       # slot -> non-empty list of unique values
    heldout*: {occupation: [nurse]}            # values reserved for evaluation (never trained on)
    attributes: {age: {classes: {young: "a photo of a young person", old: "..."},
                       target*: {young: 0.5, old: 0.5}}}  # >= 2 classes; target sums to 1, default uniform
    guidance_scales: [1.0, 7.5]   # unique numbers >= 1.0 (1.0: no CFG), stored ascending
    images_per_prompt: 16; seed: 0; steps: 20; classifier: miniature (resolved later by a registry)
    eta*: 0.0   # DDIM eta in [0, 1]: 0 deterministic (the default), 1 DDPM-like ancestral sampling
    intersections*: [[skin_tone, age]]         # groups of >= 2 attributes scored jointly

`load_battery` validates everything and reports every problem at once in one `ConfigError`.
`Battery.to_dict()` (saved beside results) loads back through `battery_from_dict` to an equal battery.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from evalsuite.errors import ConfigError, did_you_mean

BATTERY_SCHEMA_VERSION = 1
TARGET_TOLERANCE = 1e-6

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# a unit's seed is a 63-bit hash XOR this seed, and torch generators take seeds below 2**64
SEED_MAX = 2**63 - 1
_REQUIRED = ("schema_version", "name", "version", "templates", "slots", "attributes", "guidance_scales",
             "images_per_prompt", "seed", "steps", "classifier")
_OPTIONAL = ("description", "heldout", "intersections", "eta")


@dataclass(frozen=True)
class AttributeSpec:
    """One audited attribute: its classes, their text descriptions (CLIP zero-shot) and target shares."""

    name: str
    classes: tuple[str, ...]
    descriptions: tuple[str, ...]
    target: tuple[float, ...]


@dataclass(frozen=True)
class Prompt:
    """One expanded prompt; `slots` holds (slot, value) pairs in the order the template uses them."""

    text: str
    template: str
    slots: tuple[tuple[str, str], ...]
    heldout: bool


@dataclass(frozen=True)
class Battery:
    """A validated battery. `source` (where it was read from) takes no part in equality."""

    schema_version: int
    name: str
    version: str
    description: str
    templates: tuple[str, ...]
    slots: tuple[tuple[str, tuple[str, ...]], ...]
    heldout: tuple[tuple[str, tuple[str, ...]], ...]
    attributes: tuple[AttributeSpec, ...]
    guidance_scales: tuple[float, ...]
    images_per_prompt: int
    seed: int
    steps: int
    eta: float
    classifier: str
    intersections: tuple[tuple[str, ...], ...]
    source: str = field(compare=False)

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.attributes)

    def prompts(self) -> tuple[Prompt, ...]:
        """Every template expanded over its slots' values (templates in order, then values in order)."""
        return tuple(_expand(self.templates, dict(self.slots), dict(self.heldout)))

    def attribute(self, name: str) -> AttributeSpec:
        for spec in self.attributes:
            if spec.name == name:
                return spec
        hint = did_you_mean(name, self.attribute_names)
        raise ConfigError(self.source, [f"unknown attribute {name!r}{hint}"])

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data that `battery_from_dict` turns back into an equal battery.

        Order is meaningful (prompt order, class order): dump YAML with `sort_keys=False`.
        """
        return {
            "schema_version": self.schema_version, "name": self.name, "version": self.version,
            "description": self.description, "templates": list(self.templates),
            "slots": {slot: list(values) for slot, values in self.slots},
            "heldout": {slot: list(values) for slot, values in self.heldout},
            "attributes": {spec.name: {"classes": dict(zip(spec.classes, spec.descriptions, strict=True)),
                                       "target": dict(zip(spec.classes, spec.target, strict=True))}
                           for spec in self.attributes},
            "guidance_scales": list(self.guidance_scales), "images_per_prompt": self.images_per_prompt,
            "seed": self.seed, "steps": self.steps, "eta": self.eta, "classifier": self.classifier,
            "intersections": [list(group) for group in self.intersections],
        }

    def with_overrides(self, *, limit_prompts: int | None = None, images_per_prompt: int | None = None,
                       guidance_scales: Sequence[float] | None = None, steps: int | None = None,
                       seed: int | None = None, eta: float | None = None) -> Battery:
        """A new, revalidated battery with command-line overrides; bad values name the option.

        `limit_prompts=N` truncates, never reorders: the first N templates are kept, then every slot
        keeps its first k values, k the largest for which the expansion has at most N prompts (for one
        template over one slot: exactly the first N prompts). Unused slots and heldout values that no
        longer occur are dropped.
        """
        c = _Check()
        data = self.to_dict()
        for option, key, value, low in (("--images-per-prompt", "images_per_prompt", images_per_prompt, 1),
                                        ("--steps", "steps", steps, 1), ("--seed", "seed", seed, 0)):
            if value is not None:
                data[key] = c.integer(option, value, low, SEED_MAX if key == "seed" else None)
        if guidance_scales is not None:
            data["guidance_scales"] = c.scales("--guidance-scales", guidance_scales)
        if eta is not None:
            data["eta"] = c.number("--eta", eta, 0.0, 1.0)
        limit = c.integer("--limit-prompts", limit_prompts, 1) if limit_prompts is not None else None
        if c.problems:
            raise ConfigError("options", c.problems)
        if limit is not None:
            _limit(data, limit)
        return battery_from_dict(data, self.source)


def load_battery(path: str | os.PathLike[str]) -> Battery:
    """Read and validate a battery file; every problem found is reported in one ConfigError."""
    source = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError(source, ["battery file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"cannot read battery file: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and start is not None and start.line != getattr(mark, "line", None):
            problem += f" ({context} at line {start.line + 1}, column {start.column + 1})"
        raise ConfigError(source, [f"YAML syntax error{where}: {problem}"]) from None
    if data is None:
        raise ConfigError(source, ["file is empty; expected a mapping of battery keys"])
    return battery_from_dict(data, source)


def battery_from_dict(data: Mapping[str, Any], source: str) -> Battery:
    """Validate battery data (as read from YAML) and build a Battery, or raise one ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, [f"top level must be a mapping of battery keys, got {_show(data)}"])
    c = _Check()
    d = c.mapping("", data, _REQUIRED + _OPTIONAL, _REQUIRED) or {}
    out: dict[str, Any] = {"schema_version": BATTERY_SCHEMA_VERSION, "source": source}
    schema = d.get("schema_version", BATTERY_SCHEMA_VERSION)
    if type(schema) is not int or schema != BATTERY_SCHEMA_VERSION:
        c.wrong("schema_version", f"the int {BATTERY_SCHEMA_VERSION}", schema)

    def version(key: str, value: Any) -> str | None:
        quoted = isinstance(value, (int, float)) and not isinstance(value, bool)
        return c.text(key, value, f'a non-empty str (quote it: "{value}")' if quoted else "a non-empty str")

    checks: dict[str, Callable[[str, Any], Any]] = {
        "name": lambda k, v: c.text(k, v, "a name matching [A-Za-z0-9_.-]+", _NAME_RE),
        "version": version,
        "images_per_prompt": lambda k, v: c.integer(k, v, 1), "seed": lambda k, v: c.integer(k, v, 0, SEED_MAX),
        "steps": lambda k, v: c.integer(k, v, 1), "classifier": c.text, "guidance_scales": c.scales,
        "eta": lambda k, v: c.number(k, v, 0.0, 1.0),
    }
    out["eta"] = 0.0
    out.update((key, check(key, d[key])) for key, check in checks.items() if key in d)
    out["description"] = d.get("description", "")
    if not isinstance(out["description"], str):
        c.wrong("description", "a str", out["description"])
    _check_prompts(c, d, out)
    attributes = c.mapping("attributes", d["attributes"]) if "attributes" in d else None
    if attributes == {}:
        c.add("attributes", "must name at least one attribute, got an empty mapping")
    out["attributes"] = tuple(_attribute(c, name, spec) for name, spec in (attributes or {}).items())
    out["intersections"] = _intersections(c, d.get("intersections", []), attributes)
    if c.problems:
        raise ConfigError(source, c.problems)
    return Battery(**out)


def _check_prompts(c: _Check, d: dict[str, Any], out: dict[str, Any]) -> None:
    """templates, slots and heldout: every {slot} defined, every slot used, no prompt text twice."""
    before = len(c.problems)
    templates = c.str_list("templates", d["templates"]) if "templates" in d else None
    fields: dict[int, list[str]] = {}
    for i, template in enumerate(templates or ()):
        try:
            fields[i] = _fields(template)
        except ValueError as exc:
            c.add(f"templates[{i}]", f"{exc}, got {template!r}")
    raw = c.mapping("slots", d["slots"]) if "slots" in d else None
    slots = {name: c.str_list(f"slots.{name}", values) for name, values in (raw or {}).items()}
    if templates is not None and raw is not None:
        for i, names in fields.items():
            for name in names:
                if name not in slots:
                    c.add(f"templates[{i}]", f"uses undefined slot {{{name}}}{did_you_mean(name, slots)}")
        used = {name for names in fields.values() for name in names}
        for name in slots if len(fields) == len(templates) else ():
            if name not in used:
                c.add(f"slots.{name}", "defined but not used by any template")
    heldout: dict[str, tuple[str, ...]] = {}
    for name, values in ((c.mapping("heldout", d["heldout"]) if "heldout" in d else None) or {}).items():
        key, allowed = f"heldout.{name}", slots.get(name)
        if name not in slots:
            c.add(key, f"unknown slot {name!r}{did_you_mean(name, slots)}")
        elif (items := c.sequence(key, values, non_empty=False)) is not None:
            for j, value in enumerate(items):
                if value in items[:j]:
                    c.add(f"{key}[{j}]", f"duplicate value {value!r}")
                elif allowed is not None and value not in allowed:
                    hint = did_you_mean(str(value), allowed)
                    c.add(f"{key}[{j}]", f"{_show(value)} is not a value of slots.{name}{hint}")
            heldout[name] = tuple(items)
    if len(c.problems) == before and templates is not None and raw is not None:
        seen: dict[str, str] = {}
        for prompt in _expand(templates, {k: v or () for k, v in slots.items()}, heldout):
            if prompt.text in seen:
                c.add("templates", f"prompt text {prompt.text!r} is produced twice "
                                   f"(by {seen[prompt.text]!r} and {prompt.template!r})")
            seen.setdefault(prompt.text, prompt.template)
    out.update(templates=templates, slots=tuple(slots.items()), heldout=tuple(heldout.items()))


def _attribute(c: _Check, name: str, raw: Any) -> AttributeSpec:
    key = f"attributes.{name}"
    spec = c.mapping(key, raw, ("classes", "target"), ("classes",)) or {}
    classes = c.mapping(f"{key}.classes", spec["classes"]) if "classes" in spec else None
    if classes is not None and len(classes) < 2:
        c.add(f"{key}.classes", f"must have at least 2 classes, got {len(classes)}")
    for cls, text in (classes or {}).items():
        c.text(f"{key}.classes.{cls}", text)
    names = tuple(classes or ())
    target = tuple(1.0 / len(names) for _ in names)
    raw_target = c.mapping(f"{key}.target", spec["target"]) if "target" in spec else None
    if raw_target is not None and classes is not None:
        for cls in raw_target:
            if cls not in classes:
                c.add(f"{key}.target.{cls}", f"unknown class {cls!r}{did_you_mean(cls, names)}")
        missing = [cls for cls in names if cls not in raw_target]
        if missing:
            c.add(f"{key}.target", f"missing a probability for {', '.join(map(repr, missing))}")
        probs = [c.number(f"{key}.target.{cls}", raw_target[cls], 0.0, 1.0) for cls in names
                 if cls in raw_target]
        total = math.fsum(p for p in probs if p is not None)
        if not missing and None not in probs and abs(total - 1.0) > TARGET_TOLERANCE:
            c.add(f"{key}.target", f"probabilities must sum to 1 (tolerance {TARGET_TOLERANCE:g}), "
                                   f"got {_show(dict(raw_target))} summing to {total:.6g}")
        target = tuple(p or 0.0 for p in probs)
    return AttributeSpec(name, names, tuple((classes or {}).values()), target)


def _intersections(c: _Check, raw: Any, attributes: dict[str, Any] | None) -> tuple[tuple[str, ...], ...]:
    groups = c.sequence("intersections", raw, non_empty=False) or []
    for i, group in enumerate(groups):
        members = c.sequence(f"intersections[{i}]", group, non_empty=False) or []
        if isinstance(group, (list, tuple)) and len(members) < 2:
            c.add(f"intersections[{i}]", f"must list at least 2 attributes, got {_show(members)}")
        for j, name in enumerate(members):
            key = f"intersections[{i}][{j}]"
            if not isinstance(name, str) or (attributes is not None and name not in attributes):
                c.add(key, f"{_show(name)} is not an attribute{did_you_mean(str(name), attributes or ())}")
            elif name in members[:j]:
                c.add(key, f"duplicate attribute {name!r}")
    return tuple(tuple(group) for group in groups if isinstance(group, (list, tuple)))


def _fields(template: str) -> list[str]:
    """The distinct {slot} names a template uses, in order; ValueError for anything but plain {name}."""
    names: list[str] = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is not None and (not _IDENT_RE.fullmatch(name) or spec or conversion):
            raise ValueError("placeholders must be plain {slot_name} (write {{ and }} for literal braces)")
        if name is not None and name not in names:
            names.append(name)
    return names


def _expand(templates: Sequence[str], slots: Mapping[str, Sequence[str]],
            heldout: Mapping[str, Sequence[str]]) -> list[Prompt]:
    prompts: list[Prompt] = []
    for template in templates:
        names = _fields(template)
        for combo in itertools.product(*(slots[name] for name in names)):
            pairs = tuple(zip(names, combo, strict=True))
            held = any(value in heldout.get(name, ()) for name, value in pairs)
            prompts.append(Prompt(template.format_map(dict(pairs)), template, pairs, held))
    return prompts


def _limit(data: dict[str, Any], limit: int) -> None:
    """Shrink `data` (from to_dict) so that it expands to at most `limit` prompts; see with_overrides."""
    templates = data["templates"][:limit]
    fields = [_fields(template) for template in templates]
    slots = {name: values for name, values in data["slots"].items() if any(name in f for f in fields)}

    def count(k: int) -> int:
        return sum(math.prod(min(k, len(slots[name])) for name in names) for names in fields)

    k = max((len(values) for values in slots.values()), default=1)
    while k > 1 and count(k) > limit:
        k -= 1
    data.update(templates=templates, slots={name: values[:k] for name, values in slots.items()})
    data["heldout"] = {name: [v for v in values if v in data["slots"][name]]
                       for name, values in data["heldout"].items() if name in slots}


def _show(value: Any) -> str:
    """A value's kind and repr for problem messages, e.g. "str 'abc'"."""
    return "null" if value is None else f"{type(value).__name__} {value!r}"


class _Check:
    """Collects problems ("key: message") instead of stopping at the first; a failed check returns None."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def wrong(self, key: str, expected: str, value: Any) -> Any:
        """Add "must be <expected>, got <value>"; returns None, so a failing check can return it."""
        self.add(key, f"must be {expected}, got {_show(value)}")
        return None

    def mapping(self, key: str, value: Any, allowed: Sequence[str] = (),
                required: Sequence[str] = ()) -> dict[str, Any] | None:
        """`value` as a dict with str keys; given `allowed`, unknown and missing keys are problems too."""
        if not isinstance(value, Mapping):
            return self.wrong(key, "a mapping", value)
        prefix = f"{key}." if key else ""
        for k in value:
            if not isinstance(k, str):
                self.add(f"{prefix}{k}", f"keys must be str, got {_show(k)}")
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
        """Unique numbers >= 1, ascending; two that print alike (6 significant digits: the image folders
        g{scale:g}) are refused, as their images would overwrite each other."""
        scales = self.unique_list(key, value, lambda k, v: self.number(k, v, 1.0))
        if scales is None:
            return None
        printed: dict[str, float] = {}
        for g in scales:
            if f"{g:g}" in printed:
                return self.wrong(key, f"distinct when printed with 6 significant digits (image folders are "
                                  f"named g<scale>; {printed[f'{g:g}']!r} and {g!r} both print as {g:g})", value)
            printed[f"{g:g}"] = g
        return tuple(sorted(scales))
