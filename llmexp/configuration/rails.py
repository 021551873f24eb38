"""The ``rails`` group's schemas: checks on what goes into a served or evaluated model and what comes out.

Each option has a schema of its own (``RAILS_OPTIONS``), so a key of one option is refused in another.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from llmexp.configuration.choice import Choice


class RailsKind(Choice):
    """Which rails guard requests and responses."""

    none = "none"


@dataclass
class RailsConfig:
    """What every ``rails`` option has: its name."""

    name: RailsKind = MISSING


@dataclass
class NoRailsConfig(RailsConfig):
    """``rails=none`` (the default): requests and responses pass unchecked."""

    name: RailsKind = RailsKind.none


RAILS_OPTIONS = {"none": NoRailsConfig}  # rails=<option> -> its schema
