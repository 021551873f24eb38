"""The ``rails`` group's schemas: checks on what goes into a served or evaluated model and what comes out.

Each option has a schema of its own (``RAILS_OPTIONS``), so a key of one option is refused in another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from llmexp.configuration.choice import Choice


class RailsKind(Choice):
    """Which rails guard requests and responses."""

    none = "none"
    guardrails = "guardrails"


@dataclass
class RailsConfig:
    """What every ``rails`` option has: its name."""

    name: RailsKind = MISSING


@dataclass
class NoRailsConfig(RailsConfig):
    """``rails=none`` (the default): requests and responses pass unchecked."""

    name: RailsKind = RailsKind.none


@dataclass
class GuardrailsConfig(RailsConfig):
    """``rails=guardrails``: the input and output rails of a rails config directory in NeMo Guardrails' layout
    (``config.yml`` with ``rails.input.flows``, ``rails.output.flows`` and ``rails.config``; ``prompts.yml`` with
    the self-check prompts), run by ``llmexp.rails``. The evaluation's ``{type: rails}`` task measures them;
    ``llmexp serve --rails DIR`` serves the same directory."""

    name: RailsKind = RailsKind.guardrails
    config_path: Optional[str] = None  # a rails config directory; None: the shipped one (llmexp/rails/default)


RAILS_OPTIONS = {"none": NoRailsConfig, "guardrails": GuardrailsConfig}  # rails=<option> -> its schema
