"""Launchers beyond Hydra's own: ``hydra/launcher=slurm`` (submitit) and its cluster placement.

Hydra instantiates launcher classes from the ``hydra_plugins`` namespace only, so
``hydra_plugins/llmexp_launchers`` re-exports the class that lives here.
"""
