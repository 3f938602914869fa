"""Errors that the command line turns into one clear message and a non-zero exit (no traceback)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SuiteError(Exception):
    """A user-facing error: its message is printed as is and the command exits with status 2."""


class ConfigError(SuiteError):
    """One or more problems in a YAML file or option set, all collected before anything runs.

    Each problem names the file, the key (dotted path), the value found and what is allowed.
    """

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        head = f"{source}: {len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in self.problems))


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?) allowed: a, b, c' for an unknown name; used by every registry and loader."""
    options = sorted(choices)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; allowed: {', '.join(options)}"
