"""Lightning's loggers with the stage's name in front of every key, so the stages of a run share one tracked run.

Built on first use: lightning is heavy, and nothing here imports it before a tracker needs it.
"""

from __future__ import annotations

import functools
import importlib
from argparse import Namespace
from typing import Any


@functools.lru_cache(maxsize=None)
def stage_logger_class(base_name: str) -> type:
    """Lightning's ``base_name`` logger with ``<stage>/`` in front of metric keys and hyperparameters.

    Stages share one tracker run: unprefixed, two training stages would both write
    ``train/loss`` from step 0, and mlflow refuses a hyperparameter whose value changes.
    """
    base = getattr(importlib.import_module("lightning.pytorch.loggers"), base_name)

    class StageLogger(base):
        LOGGER_JOIN_CHAR = "/"

        def __init__(self, stage: str, **kwargs: Any):
            super().__init__(prefix=stage, **kwargs)
            self.stage = stage

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            params = vars(params) if isinstance(params, Namespace) else dict(params)
            super().log_hyperparams({self.stage: params}, *args, **kwargs)

    StageLogger.__name__ = StageLogger.__qualname__ = f"Stage{base_name}"
    StageLogger.__module__ = __name__  # picklable (ddp_spawn) through the module __getattr__ below
    return StageLogger


def __getattr__(name: str) -> Any:
    """``StageWandbLogger`` and ``StageMLFlowLogger`` are built on first use (lightning is heavy)."""
    if name in ("StageWandbLogger", "StageMLFlowLogger"):
        return stage_logger_class(name[len("Stage") :])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
