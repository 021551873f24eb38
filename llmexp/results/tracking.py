"""Experiment trackers: where a run's metrics go besides its own directory.

One tracker per run, chosen by ``tracker.name`` from ``TRACKERS``; every stage of the run
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

import contextlib
import dataclasses
import functools
import importlib
import json
import os
import re
import shutil
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from llmexp.errors import UserError
from llmexp.results.record import RESULTS_FILE, redact_secrets, summary_metrics, write_json_atomic
from llmexp.configuration.schema import TRACKER_OPTIONS, MlflowTrackerConfig, TrackerConfig, WandbTrackerConfig
from llmexp.configuration.secrets import redact_url_credentials

TRACKER_STATE_FILE = "tracker.json"  # the tracker's run id, so a resumed run logs into the same run
WANDB_INIT_TIMEOUT_S = 30.0  # wandb's default is 90 s; offline init takes ~2 s


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


class WandbTracker(Tracker):
    """``tracker=wandb``: one wandb run whose files live in ``<run_dir>/wandb/``.

    Offline unless asked otherwise: ``tracker.mode`` wins, then ``WANDB_MODE``, then
    ``online`` only when ``WANDB_API_KEY`` is set. Offline runs upload later with ``wandb sync``.
    """

    name = "wandb"

    def __init__(self, settings: WandbTrackerConfig, run_dir: Path, config: Any):
        super().__init__(settings, run_dir, config)
        wandb = _import_backend("wandb")
        mode = wandb_mode(settings)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = self._previous_run_id()
        try:
            self.run = wandb.init(
                project=settings.project,
                dir=str(self.run_dir),
                mode=mode,
                name=_run_name(self.run_dir),
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
        return _stage_logger_class("WandbLogger")(
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


class MlflowTracker(Tracker):
    """``tracker=mlflow``: one mlflow run in experiment ``tracker.project``.

    The store is ``tracker.uri``, else ``MLFLOW_TRACKING_URI``, else ``default_mlflow_uri()``.
    The config goes in as params (flattened with ``.``, values truncated to mlflow's limit).
    """

    name = "mlflow"
    STATUS = {"completed": "FINISHED", "skipped": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

    def __init__(self, settings: MlflowTrackerConfig, run_dir: Path, config: Any):
        super().__init__(settings, run_dir, config)
        _import_backend("mlflow")
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
                run = self.client.create_run(experiment_id, run_name=_run_name(self.run_dir), tags=_resolve_tags(tags))
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
        return _stage_logger_class("MLFlowLogger")(
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


TRACKERS = {"none": Tracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # backend module -> pip extra of llmexp


def make_tracker(tracker_cfg: Any, run_dir: Path, config: Any) -> Tracker:
    """The tracker ``tracker_cfg.name`` names, started for the run in ``run_dir``."""
    settings = _settings(tracker_cfg)
    if settings.name not in TRACKERS:
        raise UserError(
            f"tracker={settings.name} is not a tracker; choose one of {', '.join(sorted(TRACKERS))} "
            "(e.g. `llmexp tracker=mlflow`)."
        )
    return TRACKERS[settings.name](settings, Path(run_dir), config)


def wandb_mode(settings: WandbTrackerConfig) -> Optional[str]:
    """``tracker.mode``; else None when WANDB_MODE is set (wandb reads it); else offline without WANDB_API_KEY.

    So a machine without credentials never waits on the network.
    """
    if settings.mode is not None or "WANDB_MODE" in os.environ:
        return settings.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def default_mlflow_uri(root: Optional[Path] = None) -> str:
    """``sqlite:///<root>/mlflow.db`` (root: the working directory), artifacts beside it in ``mlruns/``.

    mlflow 3.x refuses its old file store (``file:./mlruns``) unless MLFLOW_ALLOW_FILE_STORE=true
    and made ``sqlite:///mlflow.db`` its own default; this is that store, so ``mlflow ui`` started
    in the same directory shows the runs. It works offline and needs no server.
    """
    return f"sqlite:///{(Path(root) if root else Path.cwd()).resolve() / 'mlflow.db'}"


# -- Lightning loggers scoped to a stage ----------------------------------------------------


@functools.lru_cache(maxsize=None)
def _stage_logger_class(base_name: str) -> type:
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
        return _stage_logger_class(name[len("Stage") :])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- helpers -------------------------------------------------------------------------------


def _settings(tracker_cfg: Any) -> TrackerConfig:
    """The ``tracker`` node (DictConfig, mapping, a schema instance or just a name) as its option's schema
    (``TRACKER_OPTIONS``); an unknown name keeps the base schema, for ``make_tracker`` to refuse."""
    if isinstance(tracker_cfg, TrackerConfig):
        return tracker_cfg
    values = {"name": tracker_cfg} if isinstance(tracker_cfg, str) else dict(tracker_cfg)
    schema = TRACKER_OPTIONS.get(str(values.get("name")), TrackerConfig)
    known = {f.name for f in dataclasses.fields(schema)}
    return schema(**{k: v for k, v in values.items() if k in known})


def _import_backend(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UserError(
            f"tracker={module} needs the {module} package, which cannot be imported ({error}); "
            f"install it with `pip install llmexp[{EXTRAS[module]}]`, or run with tracker=none."
        ) from None


def _opening_lock(uri: str):
    """For a local sqlite store, a lock between this machine's jobs while one opens it.

    mlflow creates or upgrades the database's tables when a process first uses it; two jobs
    of a parallel sweep (joblib) doing that at once on a new store collide ("duplicate column").
    """
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(uri[len("sqlite:///") :] + ".lock")


def _run_name(run_dir: Path) -> str:
    """The run directory as the user typed it: relative to the working directory when inside it."""
    try:
        return str(run_dir.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(run_dir)


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
