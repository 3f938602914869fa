"""Test tiers and the offline rule.

* `python -m pytest -q` runs the fast tier (for development): tests marked `slow` (long) or
  `multiprocess` (several processes under `accelerate launch`) are skipped, saying how to run them.
* `python -m pytest -q --runslow` runs everything; CI and the README's test command do.

No test reaches a model hub: the hub libraries are put offline before any test imports them, so a
test that would download fails at once instead of retrying for minutes.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TIERS = ("slow", "multiprocess")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow or multiprocess (the full suite, as CI does)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow tier: run with --runslow (the full suite, as CI does)")
    for item in items:
        if any(tier in item.keywords for tier in TIERS):
            item.add_marker(skip)
