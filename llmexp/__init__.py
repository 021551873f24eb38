"""llmexp: config-driven experiments for customizing and compressing LLMs."""

__version__ = "0.1.0"
