"""``tracker=wandb``: one wandb run per llmexp run, offline unless credentials or a mode say otherwise.

wandb is imported when the tracker is made: it is an extra (``llmexp[wandb]``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

from llmexp.configuration.schema import WandbTrackerConfig
from llmexp.errors import UserError
from llmexp.results.record import RESULTS_FILE, redact_secrets, summary_metrics, write_json_atomic
from llmexp.results.tracking.stage_loggers import stage_logger_class
from llmexp.results.tracking.tracker import Tracker, import_backend, run_name

WANDB_INIT_TIMEOUT_S = 30.0  # wandb's default is 90 s; offline init takes ~2 s


class WandbTracker(Tracker):
    """``tracker=wandb``: one wandb run whose files live in ``<run_dir>/wandb/``.

    Offline unless asked otherwise: ``tracker.mode`` wins, then ``WANDB_MODE``, then
    ``online`` only when ``WANDB_API_KEY`` is set. Offline runs upload later with ``wandb sync``.
    """

    name = "wandb"

    def __init__(self, settings: WandbTrackerConfig, run_dir: Path, config: Any):
        super().__init__(settings, run_dir, config)
        wandb = import_backend("wandb")
        mode = wandb_mode(settings)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = self._previous_run_id()
        try:
            self.run = wandb.init(
                project=settings.project,
                dir=str(self.run_dir),
                mode=mode,
                name=run_name(self.run_dir),
                tags=self.tags or None,
                config=self.config,
                id=previous,
                resume="allow" if previous else None,
                reinit="finish_previous",
                settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S),
            )
        except wandb.errors.Error as error:
            raise UserError(
                f"tracker=wandb could not start a run (tracker.mode={mode or os.environ.get('WANDB_MODE')}): "
                f"{error}. Set WANDB_API_KEY (or run `wandb login`) for online runs, or use "
                "tracker.mode=offline and `wandb sync` later."
            ) from None
        self._remember_run_id(self.run.id)

    def lightning_logger(self, stage_name: str, stage_dir: Optional[Path] = None):
        # Lightning's WandbLogger logs the step as `trainer/global_step`; plot this stage against it.
        self.run.define_metric("trainer/global_step")
        self.run.define_metric(f"{stage_name}/*", step_metric="trainer/global_step", step_sync=True)
        return stage_logger_class("WandbLogger")(
            stage_name, experiment=self.run, save_dir=str(self._stage_dir(stage_name, stage_dir))
        )

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        # wandb's own step must only grow and Lightning advances it too, so ours is a value, not the axis.
        self.run.log({**metrics, **({"step": step} if step is not None else {})})

    def log_results(self, results: Mapping[str, Any]) -> None:
        self.run.summary.update(summary_metrics(results))
        # Files in run.dir are the run's files: uploaded with it (or by `wandb sync`).
        write_json_atomic(Path(self.run.dir) / RESULTS_FILE, redact_secrets(results))

    def log_file(self, path: str) -> None:
        shutil.copyfile(path, Path(self.run.dir) / Path(path).name)

    def _close(self, status: str) -> None:
        import wandb

        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status in ("completed", "skipped") else 1)
        # finish() can return before wandb's service has written the run file (seen with 0.31 offline:
        # 7 of ~2000 bytes). teardown waits for the service, so the run is complete on disk (for
        # `wandb sync`, or a job that ends now) when we return; the next run starts a new service.
        wandb.teardown()


def wandb_mode(settings: WandbTrackerConfig) -> Optional[str]:
    """``tracker.mode``; else None when WANDB_MODE is set (wandb reads it); else offline without WANDB_API_KEY.

    So a machine without credentials never waits on the network.
    """
    if settings.mode is not None or "WANDB_MODE" in os.environ:
        return settings.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"
