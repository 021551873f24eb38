"""Rails: checks on what reaches a model and what it answers, for the server and as an evaluation condition.

``config`` reads a rails config directory (NeMo Guardrails' layout), ``guard`` runs its flows into a
``Verdict``, ``sensitive_data`` finds and masks personal data, ``labelled`` holds the prompts rails are measured on.
"""

from llmexp.rails.config import DEFAULT_CONFIG, RailsSpec, load_rails_config, resolve_config_dir
from llmexp.rails.guard import REFUSAL, Ask, Rails, Verdict
from llmexp.rails.labelled import LabelledPrompt, rails_metrics, read_labelled_prompts

__all__ = ["DEFAULT_CONFIG", "REFUSAL", "Ask", "LabelledPrompt", "Rails", "RailsSpec", "Verdict",
           "load_rails_config", "rails_metrics", "read_labelled_prompts", "resolve_config_dir"]
