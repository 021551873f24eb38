"""Experiment trackers: where a run's metrics go besides its own directory.

One tracker per run, chosen by ``tracker.name`` from ``TRACKERS``: ``tracker`` (none, and the
interface), ``wandb_run``, ``mlflow_run``, with ``stage_loggers`` for Lightning; every stage of the run
logs into the same tracker run. The interface is four methods:

- ``lightning_logger(stage_name)``: a Lightning logger for the training loop. These are
  Lightning's own loggers (CSVLogger, WandbLogger, MLFlowLogger); the wandb and mlflow
  ones are attached to the tracker's run and put the stage name in front of every key
  (``pretrain/train/loss``), so two training stages never write the same curve.
- ``log_metrics(metrics, step)``: numbers a stage reports itself.
- ``log_results(results)``: the finished results.json: its metrics as ``<stage>/<metric>``
  and the document itself (an artifact in mlflow, a run file in wandb).
- ``finish(status)``: close the run as completed, skipped or failed (idempotent).

Nothing here imports wandb, mlflow or lightning until a tracker that needs it is made,
and only redacted configs are ever handed to a tracker.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llmexp.configuration.schema import TRACKER_OPTIONS, TrackerConfig
from llmexp.errors import UserError
from llmexp.results.tracking.mlflow_run import MlflowTracker
from llmexp.results.tracking.tracker import Tracker
from llmexp.results.tracking.wandb_run import WandbTracker

TRACKERS = {"none": Tracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def make_tracker(tracker_cfg: Any, run_dir: Path, config: Any) -> Tracker:
    """The tracker ``tracker_cfg.name`` names, started for the run in ``run_dir``."""
    settings = _settings(tracker_cfg)
    if settings.name not in TRACKERS:
        raise UserError(
            f"tracker={settings.name} is not a tracker; choose one of {', '.join(sorted(TRACKERS))} "
            "(e.g. `llmexp tracker=mlflow`)."
        )
    return TRACKERS[settings.name](settings, Path(run_dir), config)


def _settings(tracker_cfg: Any) -> TrackerConfig:
    """The ``tracker`` node (DictConfig, mapping, a schema instance or just a name) as its option's schema
    (``TRACKER_OPTIONS``); an unknown name keeps the base schema, for ``make_tracker`` to refuse."""
    if isinstance(tracker_cfg, TrackerConfig):
        return tracker_cfg
    values = {"name": tracker_cfg} if isinstance(tracker_cfg, str) else dict(tracker_cfg)
    schema = TRACKER_OPTIONS.get(str(values.get("name")), TrackerConfig)
    known = {f.name for f in dataclasses.fields(schema)}
    return schema(**{k: v for k, v in values.items() if k in known})
