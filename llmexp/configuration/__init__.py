"""Configuration: the typed schemas, composing them with Hydra, the pipeline's stages, secrets, bad-input messages."""
