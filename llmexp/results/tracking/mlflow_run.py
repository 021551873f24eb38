"""``tracker=mlflow``: one mlflow run per llmexp run, in a local sqlite store unless told otherwise.

mlflow is imported when the tracker is made: it is an extra (``llmexp[mlflow]``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from llmexp.configuration.schema import MlflowTrackerConfig
from llmexp.configuration.secrets import redact_url_credentials
from llmexp.errors import UserError
from llmexp.results.record import RESULTS_FILE, redact_secrets, summary_metrics, write_json_atomic
from llmexp.results.tracking.stage_loggers import stage_logger_class
from llmexp.results.tracking.tracker import Tracker, import_backend, run_name


class MlflowTracker(Tracker):
    """``tracker=mlflow``: one mlflow run in experiment ``tracker.project``.

    The store is ``tracker.uri``, else ``MLFLOW_TRACKING_URI``, else ``default_mlflow_uri()``.
    The config goes in as params (flattened with ``.``, values truncated to mlflow's limit).
    """

    name = "mlflow"
    STATUS = {"completed": "FINISHED", "skipped": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

    def __init__(self, settings: MlflowTrackerConfig, run_dir: Path, config: Any):
        super().__init__(settings, run_dir, config)
        import_backend("mlflow")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        default_store = not (settings.uri or os.environ.get("MLFLOW_TRACKING_URI"))
        self.uri = settings.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri()
        self._logged: Dict[str, float] = {}
        try:
            artifacts = (Path.cwd() / "mlruns").as_uri() if default_store else None
            with _opening_lock(self.uri):
                self.client = MlflowClient(tracking_uri=self.uri)
                experiment_id = self._experiment_id(settings.project, artifacts)
            self.run_id = self._previous_run_id()
            if self.run_id is not None:
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                tags = {_mlflow_key(tag): "true" for tag in self.tags}
                tags["llmexp.run_dir"] = str(self.run_dir.resolve())
                run = self.client.create_run(experiment_id, run_name=run_name(self.run_dir), tags=_resolve_tags(tags))
                self.run_id = run.info.run_id
            self._log_params(_mlflow_params(self.config))
        except MlflowException as error:
            raise UserError(
                redact_url_credentials(
                    f"tracker=mlflow could not use the store tracker.uri={self.uri}: {error.message.strip()} "
                    "Point tracker.uri at a tracking server or a database such as sqlite:///mlflow.db."
                )
            ) from None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._remember_run_id(self.run_id)

    def lightning_logger(self, stage_name: str, stage_dir: Optional[Path] = None):
        self._stage_dir(stage_name, stage_dir)
        return stage_logger_class("MLFlowLogger")(
            stage_name, experiment_name=self.settings.project, tracking_uri=self.uri, run_id=self.run_id
        )

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        numbers = {_mlflow_key(k): float(v) for k, v in metrics.items() if _is_number(v)}
        batch = [Metric(key=k, value=v, timestamp=now, step=step or 0) for k, v in numbers.items()]
        for start in range(0, len(batch), 1000):  # mlflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])
        self._logged.update(numbers)

    def log_results(self, results: Mapping[str, Any]) -> None:
        # Metrics the runner already logged with the same value would only add a duplicate point.
        final = summary_metrics(results)
        self.log_metrics({k: v for k, v in final.items() if self._logged.get(_mlflow_key(k)) != v})
        with tempfile.TemporaryDirectory() as folder:
            path = write_json_atomic(Path(folder) / RESULTS_FILE, redact_secrets(results))
            self.client.log_artifact(self.run_id, str(path))

    def log_file(self, path: str) -> None:
        self.client.log_artifact(self.run_id, path)

    def _close(self, status: str) -> None:
        self.client.set_tag(self.run_id, "llmexp.status", status)
        self.client.set_terminated(self.run_id, status=self.STATUS.get(status, "FAILED"))

    def _experiment_id(self, name: str, artifact_location: Optional[str]) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException:  # another job of the sweep created it first
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise UserError(
                f"The mlflow experiment tracker.project={name} was deleted; restore it "
                f"(`mlflow experiments restore --experiment-id {found.experiment_id}`) or choose another project."
            )
        return found.experiment_id

    def _log_params(self, params: Dict[str, str]) -> None:
        from mlflow.entities import Param

        # mlflow refuses to change a param; a resumed run keeps the values it started with.
        existing = self.client.get_run(self.run_id).data.params
        batch = [Param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(batch), 100):  # mlflow's limit per batch
            self.client.log_batch(self.run_id, params=batch[start : start + 100])


def default_mlflow_uri(root: Optional[Path] = None) -> str:
    """``sqlite:///<root>/mlflow.db`` (root: the working directory), artifacts beside it in ``mlruns/``.

    mlflow 3.x refuses its old file store (``file:./mlruns``) unless MLFLOW_ALLOW_FILE_STORE=true
    and made ``sqlite:///mlflow.db`` its own default; this is that store, so ``mlflow ui`` started
    in the same directory shows the runs. It works offline and needs no server.
    """
    return f"sqlite:///{(Path(root) if root else Path.cwd()).resolve() / 'mlflow.db'}"


def _opening_lock(uri: str):
    """For a local sqlite store, a lock between this machine's jobs while one opens it.

    mlflow creates or upgrades the database's tables when a process first uses it; two jobs
    of a parallel sweep (joblib) doing that at once on a new store collide ("duplicate column").
    """
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(uri[len("sqlite:///") :] + ".lock")


def _resolve_tags(tags: Dict[str, str]) -> Dict[str, str]:
    """mlflow's context tags (source, user, git commit) plus ours, as mlflow's fluent API would add them."""
    try:
        from mlflow.tracking.context.registry import resolve_tags
    except ImportError:
        return tags
    return resolve_tags(tags)


def _mlflow_params(config: Any, prefix: str = "") -> Dict[str, str]:
    """The config as mlflow params: keys joined with ``.``, values as text within mlflow's length limit."""
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    except ImportError:
        MAX_PARAM_VAL_LENGTH = 500  # the limit of older mlflow releases
    params: Dict[str, str] = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            params.update(_mlflow_params(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
        params[_mlflow_key(name)] = text
    return params


def _mlflow_key(key: str) -> str:
    """mlflow keys allow letters, digits and ``_ - . / `` (space); anything else becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", str(key))[:250]


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
