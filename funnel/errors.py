"""User-facing errors.

Anything the user can fix (a bad YAML key, a missing column, a label conflict under
the ``error`` policy, a missing checkpoint) is raised as :class:`UserError`. The CLI
prints its message and exits with code 2; it never shows a traceback for these.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class UserError(Exception):
    """An error caused by the user's config, data or command line (exit code 2)."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.format())

    def format(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        lines = [f"{len(self.problems)} problems found:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ConfigError(UserError):
    """One or more problems in the YAML config (all reported at once)."""


class DataError(UserError):
    """A problem with a data file: missing column, bad values, label conflicts."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """Return ' Did you mean "x"?' for the closest option, or '' when none is close."""
    matches = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f' Did you mean "{matches[0]}"?' if matches else ""
