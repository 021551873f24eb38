"""The ``rails`` group's schemas: checks on what goes into a served or evaluated model and what comes out.

Each option has a schema of its own (``RAILS_OPTIONS``), so a key of one option is refused in another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

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


def rails_problems(config) -> List[str]:
    """A ``rails.config_path`` with no ``config.yml``, found before anything runs (its contents are checked where
    the rails are read, ``llmexp.rails.config``, a layer above this one)."""
    settings = config.get("rails") or {}
    path = settings.get("config_path")
    if str(settings.get("name")) != RailsKind.guardrails or not path or (Path(str(path)) / "config.yml").is_file():
        return []
    return [f"rails.config_path={path} holds no config.yml (relative paths are resolved against {Path.cwd()}). "
            "Give a rails config directory in NeMo Guardrails' layout (a copy of llmexp/rails/default), or "
            "rails.config_path=null for the shipped rails."]
