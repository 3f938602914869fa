"""Prompt batteries: the YAML files that say which prompts an audit renders and how it scores them.

Format (schema_version 1), one YAML mapping. Every key is a field of `Battery`, declared once there with
its check, its default (keys without one are required) and its meaning; prompts/occupations.yaml shows
each key in use. In short::

    schema_version: 1; name: occupations; version: "1.0"; description*: free text
    templates: ["a photo of a {occupation}"]   # each {slot} defined in slots, each slot used
    slots: {occupation: [doctor, nurse]}       # slot -> non-empty list of unique values
    heldout*: {occupation: [nurse]}            # values reserved for evaluation (never trained on)
    test*: {occupation: [pilot]}               # values reserved for the final test (never trained on and
                                               # never used to choose a setting): see `Prompt.split`
    attributes: {age: {classes: {young: "a photo of a young person", old: "..."},
                       target*: {young: 0.5, old: 0.5}}}  # >= 2 classes; target sums to 1, default uniform
    guidance_scales: [1.0, 7.5]; images_per_prompt: 16; seed: 0; steps: 20; eta*: 0.0
    classifier: miniature; intersections*: [[skin_tone, age]]
    domains*: {natural: {classifier: photo, detector: opencv-haar}}  # per image domain; else `classifier`

Upper bounds keep a battery's work finite and its results folder readable (`evalsuite validate` and
loading refuse more): images_per_prompt <= MAX_IMAGES_PER_PROMPT (100 000), steps <= MAX_STEPS (1000),
guidance_scales <= MAX_SCALES (64) values, prompts (the expansion of templates x slots) <= MAX_PROMPTS
(100 000), and images in all (prompts x scales x images_per_prompt) <= MAX_IMAGES (10 000 000). Each is
far above a real audit (published bias audits render 10^4-10^6 images; the shipped battery 2 112); the
total is what one run can still finish and analyse: at a fast 10 images/s, 10^7 images are 12 GPU-days,
their records (with a CLIP embedding each, ~10 kB) about 100 GB, and the analysis reads every record.

`load_battery` validates everything and reports every problem at once in one `ConfigError`.
`Battery.to_dict()` (saved beside results) loads back through `battery_from_dict` to an equal battery.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evalsuite.errors import ConfigError, did_you_mean
from evalsuite.validation import (
    Check,
    choice,
    declared,
    integer,
    number,
    read_fields,
    read_yaml,
    scales,
    setting,
    show,
)

BATTERY_SCHEMA_VERSION = 1
TARGET_TOLERANCE = 1e-6
JOINER = "×"  # an intersection's name and its classes join their parts' with it: skin_tone×age, dark×old

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# a unit's seed is a 63-bit hash XOR this seed, and torch generators take seeds below 2**64
SEED_MAX = 2**63 - 1
# upper bounds on a battery's work (see the module docstring for why these values)
MAX_IMAGES_PER_PROMPT = 100_000
MAX_STEPS = 1_000
MAX_SCALES = 64
MAX_PROMPTS = 100_000
MAX_IMAGES = 10_000_000


@dataclass(frozen=True)
class AttributeSpec:
    """One audited attribute: its classes, their text descriptions (CLIP zero-shot) and target shares."""

    name: str
    classes: tuple[str, ...]
    descriptions: tuple[str, ...]
    target: tuple[float, ...]


@dataclass(frozen=True)
class DomainSetup:
    """How the images of one domain (`evalsuite.models.ModelProfile.domain`) are scored: the attribute
    classifier and, optionally, the face detector run before it (registry names or plug-in specs)."""

    classifier: str
    detector: str | None = None


@dataclass(frozen=True)
class Prompt:
    """One expanded prompt; `slots` holds (slot, value) pairs in the order the template uses them."""

    text: str
    template: str
    slots: tuple[tuple[str, str], ...]
    heldout: bool  # never trained on: a value of `heldout` or of `test`
    test: bool = False  # a value of `test`: the final test split

    @property
    def split(self) -> str:
        """The prompt's split (`SPLITS`): "test" (a `test` value: reserved for the final figures, never
        used to choose a setting), "heldout" (a `heldout` value: the validation split that settings are
        chosen on) or "train" (what the RL trainer draws from)."""
        return "test" if self.test else "heldout" if self.heldout else "train"


SPLITS = ("train", "heldout", "test")
"""The prompt splits, in report order (`Prompt.split`)."""


def split_of(record: Mapping[str, Any], splits: Mapping[str, str] | None = None) -> str:
    """A result record's split: its prompt's in `splits` (prompt text -> split, `Battery.splits`), else
    "heldout" or "train" by the record's `heldout` flag (a prompt the battery does not name)."""
    found = (splits or {}).get(str(record["prompt"]))
    return found if found is not None else "heldout" if record.get("heldout") else "train"


def _schema_version(c: Check, key: str, value: Any) -> int | None:
    if type(value) is not int or value != BATTERY_SCHEMA_VERSION:
        return c.wrong(key, f"the int {BATTERY_SCHEMA_VERSION}", value)
    return value


def _guidance_scales(c: Check, key: str, value: Any) -> tuple[float, ...] | None:
    """Guidance scales (`validation.scales`), at most MAX_SCALES of them."""
    if isinstance(value, (list, tuple)) and len(value) > MAX_SCALES:
        c.add(key, f"must list at most {MAX_SCALES} scales, got {len(value)}")
        return None
    return scales(c, key, value)


def _name(c: Check, key: str, value: Any) -> str | None:
    return c.text(key, value, "a name matching [A-Za-z0-9_.-]+", _NAME_RE)


def _version(c: Check, key: str, value: Any) -> str | None:
    quoted = isinstance(value, (int, float)) and not isinstance(value, bool)
    return c.text(key, value, f'a non-empty str (quote it: "{value}")' if quoted else "a non-empty str")


def _description(c: Check, key: str, value: Any) -> str | None:
    return value if isinstance(value, str) else c.wrong(key, "a str", value)


def _templates(c: Check, key: str, value: Any) -> tuple[str, ...] | None:
    """Unique templates whose placeholders are all plain {slot} names."""
    templates = c.str_list(key, value)
    ok = templates is not None
    for i, template in enumerate(templates or ()):
        try:
            _fields(template)
        except ValueError as exc:
            c.add(f"{key}[{i}]", f"{exc}, got {template!r}")
            ok = False
    return templates if ok else None


def _slots(c: Check, key: str, value: Any) -> tuple[tuple[str, tuple[str, ...] | None], ...] | None:
    """slot -> its unique values; a slot whose values fail its check keeps None (the slot is known)."""
    raw = c.mapping(key, value)
    return None if raw is None else tuple((name, c.str_list(f"{key}.{name}", v)) for name, v in raw.items())


def _heldout(c: Check, key: str, value: Any) -> tuple[tuple[str, tuple[Any, ...]], ...] | None:
    """slot -> unique values (checked against the slots by `_relations`)."""
    raw = c.mapping(key, value)
    out = []
    for name, values in (raw or {}).items():
        items = c.sequence(f"{key}.{name}", values, non_empty=False)
        if items is None:
            continue
        for j, item in enumerate(items):
            if item in items[:j]:
                c.add(f"{key}.{name}[{j}]", f"duplicate value {item!r}")
        out.append((name, tuple(items)))
    return None if raw is None else tuple(out)


def _attributes(c: Check, key: str, value: Any) -> tuple[AttributeSpec, ...] | None:
    raw = c.mapping(key, value)
    if raw == {}:
        c.add(key, "must name at least one attribute, got an empty mapping")
    return None if raw is None else tuple(_attribute(c, f"{key}.{name}", name, spec) for name, spec in raw.items())


def _domains(c: Check, key: str, value: Any) -> tuple[tuple[str, DomainSetup], ...] | None:
    """domain -> {classifier, detector*}; names are checked against the registries when a run starts."""
    raw = c.mapping(key, value)
    out = []
    for domain, setup in (raw or {}).items():
        where = f"{key}.{domain}"
        if not _NAME_RE.fullmatch(domain):
            c.add(where, "a domain name matches [A-Za-z0-9_.-]+ (e.g. natural, miniature)")
        entry = c.mapping(where, setup, ("classifier", "detector"), ("classifier",)) or {}
        classifier = c.text(f"{where}.classifier", entry["classifier"]) if "classifier" in entry else None
        detector = c.text(f"{where}.detector", entry["detector"]) if entry.get("detector") is not None else None
        if classifier is not None:
            out.append((domain, DomainSetup(classifier, detector)))
    return None if raw is None else tuple(out)


def _intersections(c: Check, key: str, value: Any) -> tuple[tuple[Any, ...], ...] | None:
    """Groups of >= 2 distinct attribute names (checked against the attributes by `_relations`)."""
    groups = c.sequence(key, value, non_empty=False)
    out = []
    for i, group in enumerate(groups or ()):
        members = c.sequence(f"{key}[{i}]", group, non_empty=False)
        if members is None:
            continue
        if len(members) < 2:
            c.add(f"{key}[{i}]", f"must list at least 2 attributes, got {show(members)}")
        out.append(tuple(members))
    return None if groups is None else tuple(out)


@dataclass(frozen=True, kw_only=True)
class Battery:
    """A validated battery: each field is one YAML key, declared here once with its check and default
    (no default: required). `source` (where it was read from) takes no part in equality."""

    schema_version: int = setting(_schema_version, doc=f"battery format version; must be {BATTERY_SCHEMA_VERSION}")
    name: str = setting(_name, doc="identifies the battery in results ([A-Za-z0-9_.-]+)")
    version: str = setting(_version, doc="a str; bump it on any change that alters results")
    description: str = setting(_description, "", doc="free text")
    templates: tuple[str, ...] = setting(_templates, doc="prompt templates; each {slot} is filled with its values")
    slots: tuple[tuple[str, tuple[str, ...]], ...] = setting(_slots, doc="slot -> its values")
    heldout: tuple[tuple[str, tuple[str, ...]], ...] = setting(
        _heldout, (), doc="slot -> values reserved for evaluation (the RL trainer never trains on them)")
    test: tuple[tuple[str, tuple[str, ...]], ...] = setting(
        _heldout, (), doc="slot -> values reserved for the final test: never trained on, never used to choose "
                          "a setting (a value may not also be in heldout)")
    attributes: tuple[AttributeSpec, ...] = setting(
        _attributes, doc="attribute -> classes (class -> text description) and an optional target distribution")
    guidance_scales: tuple[float, ...] = setting(
        _guidance_scales, doc=f"classifier-free guidance scales (1 = no guidance; at most {MAX_SCALES})")
    images_per_prompt: int = setting(integer(1, MAX_IMAGES_PER_PROMPT), doc="images per prompt and guidance scale")
    seed: int = setting(integer(0, SEED_MAX), doc="base random seed of every image's seed")
    steps: int = setting(integer(1, MAX_STEPS), doc="sampler steps")
    eta: float = setting(number("[0, 1]"), 0.0, doc="DDIM eta: 0 deterministic, 1 DDPM-like ancestral sampling")
    classifier: str = setting(lambda c, k, v: c.text(k, v),
                              doc="attribute classifier for images of any domain not listed in `domains`")
    domains: tuple[tuple[str, DomainSetup], ...] = setting(
        _domains, (), doc="image domain (natural, miniature, ...) -> its classifier and optional face detector")
    intersections: tuple[tuple[str, ...], ...] = setting(_intersections, (), doc="attribute groups scored jointly")
    articles: str = setting(choice("agree", "as_written"), "agree",
                            doc="agree: an 'a'/'an' right before a {slot} agrees with the value filled in")
    source: str = field(default="", compare=False)

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.attributes)

    def attribute_classes(self) -> dict[str, tuple[str, ...]]:
        """Every scored attribute's classes: the attributes in order, then each intersection ``a×b`` with
        its joint classes ``x×y`` (first attribute most significant, as `metrics.joint_labels` numbers them)."""
        out = {spec.name: spec.classes for spec in self.attributes}
        for members in self.intersections:
            out[JOINER.join(members)] = tuple(map(JOINER.join, itertools.product(*(out[m] for m in members))))
        return out

    def attribute_targets(self) -> dict[str, tuple[float, ...]]:
        """Every scored attribute's target shares, in `attribute_classes` order; an intersection's is the
        product of its parts' (the parts are targeted independently)."""
        out = {spec.name: spec.target for spec in self.attributes}
        for members in self.intersections:
            joint = [1.0]
            for m in members:
                joint = [a * b for a in joint for b in out[m]]
            out[JOINER.join(members)] = tuple(joint)
        return out

    def setup_for(self, domain: str) -> DomainSetup:
        """The classifier and detector that score images of `domain`: its `domains` entry, else
        `classifier` with no detector."""
        return dict(self.domains).get(domain, DomainSetup(self.classifier))

    def prompts(self) -> tuple[Prompt, ...]:
        """Every template expanded over its slots' values (templates in order, then values in order)."""
        return tuple(_expand(self.templates, dict(self.slots), dict(self.heldout), self.articles == "agree",
                             dict(self.test)))

    def splits(self) -> dict[str, str]:
        """Prompt text -> its split (`Prompt.split`)."""
        return {p.text: p.split for p in self.prompts()}

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
            **({"test": {slot: list(values) for slot, values in self.test}} if self.test else {}),
            "attributes": {spec.name: {"classes": dict(zip(spec.classes, spec.descriptions, strict=True)),
                                       "target": dict(zip(spec.classes, spec.target, strict=True))}
                           for spec in self.attributes},
            "guidance_scales": list(self.guidance_scales), "images_per_prompt": self.images_per_prompt,
            "seed": self.seed, "steps": self.steps, "eta": self.eta, "classifier": self.classifier,
            "intersections": [list(group) for group in self.intersections], "articles": self.articles,
            **({"domains": {name: {"classifier": setup.classifier,
                                   **({"detector": setup.detector} if setup.detector else {})}
                            for name, setup in self.domains}} if self.domains else {}),
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
        c = Check()
        data = self.to_dict()
        fields = declared(Battery)
        for option, key, value in (("--images-per-prompt", "images_per_prompt", images_per_prompt),
                                   ("--steps", "steps", steps), ("--seed", "seed", seed),
                                   ("--guidance-scales", "guidance_scales", guidance_scales), ("--eta", "eta", eta)):
            if value is not None:  # the field's own check (and bounds), naming the option
                checked = fields[key].metadata["check"](c, option, value)
                data[key] = list(checked) if isinstance(checked, tuple) else checked
        limit = c.integer("--limit-prompts", limit_prompts, 1) if limit_prompts is not None else None
        if c.problems:
            raise ConfigError("options", c.problems)
        if limit is not None:
            _limit(data, limit)
        return battery_from_dict(data, self.source)


def battery_plugins(battery: Battery) -> list[tuple[str, str]]:
    """(key, spec) of every code plug-in the battery names (`module:factory` / `file.py:factory`): its
    `classifier`, and each domain's classifier and detector."""
    from evalsuite.classifiers import is_plugin

    keys = [("classifier", battery.classifier)]
    for domain, setup in battery.domains:
        keys.append((f"domains.{domain}.classifier", setup.classifier))
        if setup.detector:
            keys.append((f"domains.{domain}.detector", setup.detector))
    return [(key, spec) for key, spec in keys if is_plugin(spec)]


def battery_plugin_problems(battery: Battery, domain: str, with_classifier: bool = True) -> list[str]:
    """The plug-ins the battery would load for images of `domain`, its detector and (`with_classifier`:
    no --classifier replaces it) its classifier, refused unless the user opted in
    (`evalsuite.classifiers.plugin_problems`)."""
    from evalsuite.classifiers import plugin_problems

    setup = battery.setup_for(domain)
    used = {setup.detector, *([setup.classifier] if with_classifier else [])}
    where = battery.source or battery.name
    return [problem for key, spec in battery_plugins(battery) if spec in used
            for problem in plugin_problems(spec, f"{where}: {key}")]


def load_battery(path: str | os.PathLike[str]) -> Battery:
    """Read and validate a battery file; every problem found is reported in one ConfigError."""
    return battery_from_dict(read_yaml(path, "battery"), str(path))


def battery_from_dict(data: Mapping[str, Any], source: str) -> Battery:
    """Validate battery data (as read from YAML) and build a Battery, or raise one ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, [f"top level must be a mapping of battery keys, got {show(data)}"])
    c = Check()
    values = read_fields(c, Battery, data) or {}
    _relations(c, values)
    if c.problems:
        raise ConfigError(source, c.problems)
    return Battery(**values, source=source)


def _relations(c: Check, v: dict[str, Any]) -> None:
    """What relates fields: every {slot} defined and every slot used, heldout values among their slot's,
    no prompt text twice, intersections of known and distinct attributes. Checks that need a field that
    failed its own check are skipped."""
    before = len(c.problems)
    templates, slot_items = v.get("templates"), v.get("slots")
    slots: dict[str, tuple[str, ...] | None] = dict(slot_items) if slot_items is not None else {}
    if templates is not None and slot_items is not None:
        used: set[str] = set()
        for i, template in enumerate(templates):
            for name in _fields(template):
                used.add(name)
                if name not in slots:
                    c.add(f"templates[{i}]", f"uses undefined slot {{{name}}}{did_you_mean(name, slots)}")
        for name in slots:
            if name not in used:
                c.add(f"slots.{name}", "defined but not used by any template")
    held = dict(v.get("heldout") or ())
    for field_name in ("heldout", "test"):
        for name, items in v.get(field_name) or ():
            key, allowed = f"{field_name}.{name}", slots.get(name)
            if name not in slots:
                c.add(key, f"unknown slot {name!r}{did_you_mean(name, slots)}")
                continue
            for j, value in enumerate(items):
                if allowed is not None and value not in allowed and value not in items[:j]:
                    c.add(f"{key}[{j}]",
                          f"{show(value)} is not a value of slots.{name}{did_you_mean(str(value), allowed)}")
                elif field_name == "test" and value in held.get(name, ()):
                    c.add(f"{key}[{j}]", f"{show(value)} is in heldout.{name} too; a value is in one split only")
    attributes = v.get("attributes")
    names = {spec.name for spec in attributes or ()}
    for i, members in enumerate(v.get("intersections") or ()):
        for j, name in enumerate(members):
            key = f"intersections[{i}][{j}]"
            if not isinstance(name, str) or (attributes is not None and name not in names):
                c.add(key, f"{show(name)} is not an attribute{did_you_mean(str(name), names)}")
            elif name in members[:j]:
                c.add(key, f"duplicate attribute {name!r}")
    if len(c.problems) == before and templates is not None and slot_items is not None \
            and all(values is not None for values in slots.values()) and _within_bounds(c, v, templates, slots):
        seen: dict[str, str] = {}
        for prompt in _expand(templates, {k: val or () for k, val in slots.items()}, dict(v.get("heldout") or ()),
                              v.get("articles") != "as_written", dict(v.get("test") or ())):
            if prompt.text in seen:
                c.add("templates", f"prompt text {prompt.text!r} is produced twice "
                                   f"(by {seen[prompt.text]!r} and {prompt.template!r})")
            seen.setdefault(prompt.text, prompt.template)


def prompt_count(templates: Sequence[str], slots: Mapping[str, Sequence[str] | None]) -> int:
    """How many prompts the templates expand to (without expanding them)."""
    return sum(math.prod(len(slots.get(name) or ()) for name in _fields(t)) for t in templates)


def _within_bounds(c: Check, v: Mapping[str, Any], templates: Sequence[str],
                   slots: Mapping[str, Sequence[str] | None]) -> bool:
    """At most MAX_PROMPTS prompts and MAX_IMAGES images in all; False (and a problem) otherwise."""
    n_prompts = prompt_count(templates, slots)
    if n_prompts > MAX_PROMPTS:
        c.add("templates", f"the templates expand over their slots to {n_prompts:,} prompts; at most "
                           f"{MAX_PROMPTS:,} are allowed (use fewer slot values or templates)")
        return False
    scales_, images = v.get("guidance_scales"), v.get("images_per_prompt")
    if scales_ is not None and images is not None and n_prompts * len(scales_) * images > MAX_IMAGES:
        c.add("images_per_prompt", f"{n_prompts:,} prompts x {len(scales_)} guidance scales x {images:,} images "
                                   f"per prompt = {n_prompts * len(scales_) * images:,} images; a run may make at "
                                   f"most {MAX_IMAGES:,}")
        return False
    return True


def _attribute(c: Check, key: str, name: str, raw: Any) -> AttributeSpec:
    spec = c.mapping(key, raw, ("classes", "target"), ("classes",)) or {}
    classes = c.mapping(f"{key}.classes", spec["classes"]) if "classes" in spec else None
    if classes is not None and len(classes) < 2:
        c.add(f"{key}.classes", f"must have at least 2 classes, got {len(classes)}")
    for cls, description in (classes or {}).items():
        c.text(f"{key}.classes.{cls}", description)
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
                                   f"got {show(dict(raw_target))} summing to {total:.6g}")
        target = tuple(p or 0.0 for p in probs)
    return AttributeSpec(name, names, tuple((classes or {}).values()), target)


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
            heldout: Mapping[str, Sequence[str]], agree: bool = True,
            test: Mapping[str, Sequence[str]] | None = None) -> list[Prompt]:
    prompts: list[Prompt] = []
    for template in templates:
        names = _fields(template)
        for combo in itertools.product(*(slots[name] for name in names)):
            pairs = tuple(zip(names, combo, strict=True))
            tested = any(value in (test or {}).get(name, ()) for name, value in pairs)
            held = tested or any(value in heldout.get(name, ()) for name, value in pairs)
            prompts.append(Prompt(fill(template, dict(pairs), agree), template, pairs, held, tested))
    return prompts


_ARTICLE = re.compile(r"(?:^|(?<=\W))([aA]n?) $")
# spelled with a vowel, said with a consonant ("a university"), and the reverse ("an hour")
_VOWEL_LETTER_CONSONANT_SOUND = ("uni", "use", "usu", "uti", "ura", "ure", "euro", "eu", "one", "once", "ewe", "uk")
_SILENT_H = ("honest", "honor", "honour", "hour", "heir", "herb")


def indefinite_article(word: str) -> str:
    """'an' before a vowel sound, else 'a', judged by spelling: a word starting with a, e, i, o or u takes
    'an' unless it starts with a consonant sound (uni-, use-, eu-, one-, ...); an h-word takes 'an' only
    when its h is silent (honest, hour, heir, ...)."""
    w = word.lstrip().lower()
    if w.startswith(_SILENT_H):
        return "an"
    return "an" if w[:1] in tuple("aeiou") and not w.startswith(_VOWEL_LETTER_CONSONANT_SOUND) else "a"


def fill(template: str, values: Mapping[str, str], agree: bool = True) -> str:
    """The template with each {slot} replaced by its value; with `agree`, an 'a' or 'an' written right
    before a {slot} ("a photo of a {occupation}") becomes the article of the value ("an engineer"),
    capitalised as written. Other text is left as written."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        if name is not None and agree and (found := _ARTICLE.search(literal)):
            article = indefinite_article(values[name])
            article = article.capitalize() if found.group(1)[0] == "A" else article
            literal = literal[:found.start(1)] + article + " "
        out.append(literal)
        if name is not None:
            out.append(values[name])
    return "".join(out)


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
    for key in ("heldout", "test"):
        if key in data:
            data[key] = {name: [v for v in values if v in data["slots"][name]]
                         for name, values in data[key].items() if name in slots}
