"""``tracker=none`` and the interface every tracker implements (see ``llmexp.results.tracking``).

A tracker keeps its run's id in the run directory (``TRACKER_STATE_FILE``), so a resumed run
logs into the same tracked run. Lightning and the trackers' packages are imported when a tracker
needs them (lightning is heavy; wandb and mlflow are extras).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional

from llmexp.configuration.schema import TrackerConfig
from llmexp.configuration.secrets import redact_url_credentials
from llmexp.errors import UserError
from llmexp.results.record import redact_secrets, write_json_atomic

TRACKER_STATE_FILE = "tracker.json"  # the tracker's run id, so a resumed run logs into the same run
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # backend module -> pip extra of llmexp


class Tracker:
    """``tracker=none``: nothing leaves the run directory; each stage's metrics.csv is Lightning's CSVLogger."""

    name = "none"

    def __init__(self, settings: TrackerConfig, run_dir: Path, config: Any):
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.config = redact_secrets(config)
        self.tags = [redact_url_credentials(str(tag)) for tag in settings.tags]  # labels, shown wherever the run is
        self.finished = False

    def lightning_logger(self, stage_name: str, stage_dir: Optional[Path] = None):
        """A Lightning logger for one stage; its files go to ``stage_dir`` (default ``<run_dir>/<stage>``)."""
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=self._stage_dir(stage_name, stage_dir), name="", version="")

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Record numbers now (non-numeric values are ignored by trackers that only take numbers)."""

    def log_results(self, results: Mapping[str, Any]) -> None:
        """Mirror a finished results document."""

    def log_file(self, path: str) -> None:
        """Keep a file of the run (the comparison table, the Pareto plot) with the tracked run."""

    def finish(self, status: str = "completed") -> None:
        """Close the run as ``completed``, ``skipped`` or ``failed``; later calls do nothing."""
        if not self.finished:
            self.finished = True
            self._close(status)

    def _close(self, status: str) -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("failed" if exc_type else "completed")

    def _stage_dir(self, stage_name: str, stage_dir: Optional[Path]) -> Path:
        path = Path(stage_dir) if stage_dir is not None else self.run_dir / stage_name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _previous_run_id(self) -> Optional[str]:
        """The tracker run of an earlier attempt at this run directory, if it used this tracker."""
        try:
            state = json.loads((self.run_dir / TRACKER_STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return state.get("run_id") if state.get("tracker") == self.name else None

    def _remember_run_id(self, run_id: str) -> None:
        write_json_atomic(self.run_dir / TRACKER_STATE_FILE, {"tracker": self.name, "run_id": run_id})


def import_backend(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UserError(
            f"tracker={module} needs the {module} package, which cannot be imported ({error}); "
            f"install it with `pip install llmexp[{EXTRAS[module]}]`, or run with tracker=none."
        ) from None


def run_name(run_dir: Path) -> str:
    """The run directory as the user typed it: relative to the working directory when inside it."""
    try:
        return str(run_dir.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(run_dir)
