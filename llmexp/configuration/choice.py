"""The base of every closed-set config field."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A closed set of values for a config field: composing any other value fails and lists these.

    A ``str`` that prints as its value, so code compares, formats and serialises it as the text.
    """

    def __str__(self) -> str:
        return str(self.value)
