"""results.json: the record every run leaves in its directory, written so it is never half there.

The document (one per run directory)::

    status        completed | skipped | failed  ("running" while stages are still going)
    reason        why it was skipped or failed, else None (a failure: its error on one line)
    error_log     a failed run's full traceback (a file in the run directory), else None
    config        the resolved config, secrets redacted
    plan          the planner's numbers
    stages        {stage: {technique, status, metrics, model_stats, artifacts, wall_time_s}}
    model_stats   of the final model (params, bytes as deployed, bits/weight)
    wall_time_s, started_at, finished_at (ISO 8601, UTC), run_dir
    environment   package versions, platform, git commit

Everything here is plain Python and the standard library: the planner and ``llmexp report``
use it without importing torch.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from llmexp.machine import cpu_threads
from llmexp.atomic import replace_atomically
from llmexp.configuration.secrets import REDACTED, is_secret_key, redact_url_credentials

RESULTS_FILE = "results.json"
STATUSES = ("running", "completed", "skipped", "failed")

REQUIRED_PACKAGES = ("llmexp", "torch", "transformers", "lightning", "hydra-core", "omegaconf", "pluggy")
OPTIONAL_PACKAGES = ("wandb", "mlflow", "peft", "nvidia-modelopt", "megatron-core", "tensorrt-llm", "submitit")


def write_json_atomic(path: Path | str, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` so that readers see the old file or the new one, never a part.

    See ``llmexp.atomic``. Paths, enums, dataclasses and 0-d tensors/arrays are
    converted; anything else JSON cannot hold raises ``TypeError``.
    """
    def write(handle) -> None:
        json.dump(data, handle, indent=2, default=_to_json)
        handle.write("\n")

    return replace_atomically(path, write)


def read_results(run_dir: Path | str) -> Dict[str, Any]:
    """The results document of a run directory (``FileNotFoundError`` if it has none)."""
    with open(Path(run_dir) / RESULTS_FILE, encoding="utf-8") as handle:
        return json.load(handle)


def redact_secrets(container: Any) -> Any:
    """A plain copy of a config (DictConfig, dataclass or mapping) with secret values replaced.

    Interpolations are resolved first, so ``api_key: ${oc.env:WANDB_API_KEY}`` is caught.
    A value is replaced by ``"<redacted>"`` when its key looks secret (``llmexp.configuration.secrets.is_secret_key``),
    wherever it sits in the tree; unset values (None, "") are kept, so the record still
    shows that no secret was given. Credentials inside URLs are redacted too.
    """
    return _redact(_plain(container), secret=False)


def redact_hydra_record(hydra_dir: Path | str, config: Any) -> None:
    """Rewrite the composed config Hydra saved for a job (``.hydra/config.yaml``) without secrets.

    A secret typed on the command line is already only an ``${oc.env:...}`` interpolation
    there (``llmexp.configuration.secrets``); this catches one written in a config file, which would
    otherwise be copied into every run directory.
    """
    from omegaconf import OmegaConf

    saved = Path(hydra_dir) / "config.yaml"
    if saved.is_file():
        OmegaConf.save(OmegaConf.create(redact_secrets(config)), saved)


def environment_info(cwd: Path | str | None = None) -> Dict[str, Any]:
    """Versions, platform and git commit: what is needed to reproduce a run.

    Versions come from installed distributions' metadata, so nothing heavy is imported.
    ``git`` describes the repository of ``cwd`` (default: the working directory); its
    ``commit`` is None outside a repository, before the first commit, or without git.
    """
    packages = {name: _version(name) for name in REQUIRED_PACKAGES}
    packages.update({name: v for name in OPTIONAL_PACKAGES if (v := _version(name)) is not None})
    return {
        "python": platform.python_version(),
        "packages": packages,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
        "slurm": slurm_placement(),
        "git": git_info(cwd),
        "cpu_threads": cpu_threads.settings(),
    }


# Where Slurm put the job: its environment variables, by the name results.json gives them.
SLURM_VARIABLES = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
    "node": "SLURMD_NODENAME",
    "nodelist": "SLURM_JOB_NODELIST",
    "partition": "SLURM_JOB_PARTITION",
    "gpus": "SLURM_JOB_GPUS",
    "cuda_visible_devices": "CUDA_VISIBLE_DEVICES",
    "restart_count": "SLURM_RESTART_COUNT",
}


def slurm_placement() -> Optional[Dict[str, Optional[str]]]:
    """The Slurm job, node, partition, GPUs and restarts of this process; None outside Slurm."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return {name: os.environ.get(variable) for name, variable in SLURM_VARIABLES.items()}


def git_info(cwd: Path | str | None = None) -> Dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}``; dirty means tracked files differ from HEAD."""
    commit = _git(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def summary_metrics(results: Mapping[str, Any]) -> Dict[str, float]:
    """The numbers a tracker shows for a finished run.

    ``<stage>/<metric>`` for every numeric stage metric (nested dicts flattened with ``/``)
    and ``model/<stat>`` for the final model's numeric stats.
    """
    flat: Dict[str, float] = {}
    for stage, entry in (results.get("stages") or {}).items():
        flat.update(flatten_numbers(entry.get("metrics") or {}, prefix=f"{stage}/"))
    flat.update(flatten_numbers(results.get("model_stats") or {}, prefix="model/"))
    return flat


# What a comparison row takes from the stage that made the evaluated model: its cost, and
# what the model is (precision or quantization format, layers, size).
COST_METRICS = ("trainable_parameters", "train_time_s", "peak_memory_mb")
MODEL_STATS = ("precision", "simulated", "layers", "parameters", "bytes_on_disk", "bits_per_weight")


def comparison(stages: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """One row per evaluation of a model: its metrics beside what making that model cost.

    An evaluation is a stage that made no model (no ``model_stats``) and started from one.
    Its row names the model's stage and technique and carries that stage's model stats
    (precision, layers, parameters, size) and cost (trainable parameters, training time, peak
    memory): the customization comparison (zero-shot, few-shot, LoRA, full SFT) and the
    compression one (baseline, quantized, pruned, distilled) each in one table.
    """
    rows = []
    for name, entry in stages.items():
        source = entry.get("input_model")
        if entry.get("model_stats") or not source or entry.get("status") != "completed":
            continue
        maker = stages.get(source) or {}
        made = maker.get("metrics") or {}
        row = {"stage": name, "model": source, "made_by": maker.get("technique", source)}
        stats = maker.get("model_stats") or {}
        row.update({key: stats.get(key) for key in MODEL_STATS})
        row.update({key: made.get(key) for key in COST_METRICS})
        row.update(flatten_numbers(entry.get("metrics") or {}))
        rows.append(row)
    return rows


@dataclasses.dataclass
class RunRecord:
    """Builds the results document of one run; ``write()`` it whenever it should be on disk.

    Typical use by the runner::

        record = RunRecord.start(run_dir, cfg, plan)
        record.add_stage("pretrain", "pretrain", result, wall_time_s=12.3)
        record.write()                       # after each stage: a crash leaves status "running"
        record.finish("completed").write()

    ``RunRecord.load(run_dir)`` picks a run up again (its finished stages are in ``stages``).
    """

    run_dir: Path
    config: Dict[str, Any]
    plan: Dict[str, Any] = dataclasses.field(default_factory=dict)
    status: str = "running"
    reason: Optional[str] = None
    error_log: Optional[str] = None
    stages: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    model_stats: Dict[str, Any] = dataclasses.field(default_factory=dict)
    started_at: str = ""
    finished_at: Optional[str] = None
    wall_time_s: Optional[float] = None
    environment: Dict[str, Any] = dataclasses.field(default_factory=dict)
    _clock: float = dataclasses.field(default_factory=time.perf_counter, init=False, repr=False)

    @classmethod
    def start(cls, run_dir: Path | str, config: Any, plan: Any = None) -> "RunRecord":
        """A new record: the config is redacted, the environment captured, the clock started."""
        return cls(
            run_dir=Path(run_dir),
            config=redact_secrets(config),
            plan=_plain(plan) if plan is not None else {},
            started_at=_now(),
            environment=environment_info(),
        )

    @classmethod
    def load(cls, run_dir: Path | str) -> "RunRecord":
        """The record of an earlier attempt at ``run_dir``; wall time keeps counting from what it had."""
        data = read_results(run_dir)
        fields = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        record = cls(**{k: v for k, v in data.items() if k in fields and k != "run_dir"}, run_dir=Path(run_dir))
        record._clock = time.perf_counter() - (record.wall_time_s or 0.0)
        return record

    def add_stage(
        self,
        name: str,
        technique: str,
        result: Any = None,
        *,
        status: str = "completed",
        wall_time_s: Optional[float] = None,
        reason: Optional[str] = None,
        input_model: Optional[str] = None,
        input_data: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Record a stage from its ``StageResult`` (metrics, model_stats, artifacts); returns the entry.

        ``input_model`` says which model the stage started from: an earlier stage's name,
        ``model.path``, or None; ``input_data`` the earlier stage whose corpus it read instead of the
        run's data (``pipeline.data_inputs``), when one did. A stage that yields model stats makes them
        the run's ``model_stats`` (the last model wins).
        """
        entry = {
            "technique": technique,
            "status": status,
            "reason": reason,
            "input_model": input_model,
            **({"input_data": input_data} if input_data else {}),
            "metrics": _plain(getattr(result, "metrics", None) or {}),
            "model_stats": _plain(getattr(result, "model_stats", None) or {}),
            "artifacts": _plain(getattr(result, "artifacts", None) or {}),
            "wall_time_s": None if wall_time_s is None else round(wall_time_s, 3),
        }
        self.stages[name] = entry
        if entry["model_stats"]:
            self.model_stats = entry["model_stats"]
        return entry

    def finish(self, status: str, reason: Optional[str] = None) -> "RunRecord":
        """Close the record: ``completed``, ``skipped`` or ``failed`` (with its reason)."""
        if status not in STATUSES[1:]:
            raise ValueError(f"status={status!r}; a finished run is one of {', '.join(STATUSES[1:])}")
        self.status, self.reason = status, reason
        self.finished_at = _now()
        self.wall_time_s = round(time.perf_counter() - self._clock, 3)
        return self

    def to_dict(self) -> Dict[str, Any]:
        """The results document (keys in the order a reader scans them)."""
        wall = self.wall_time_s if self.finished_at else round(time.perf_counter() - self._clock, 3)
        return {
            "status": self.status,
            "reason": self.reason,
            "error_log": self.error_log,
            "run_dir": str(self.run_dir),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "wall_time_s": wall,
            "model_stats": self.model_stats,
            "stages": self.stages,
            "comparison": comparison(self.stages),
            "plan": self.plan,
            "config": self.config,
            "environment": self.environment,
        }

    def write(self) -> Path:
        """Write ``<run_dir>/results.json`` atomically; returns its path."""
        return write_json_atomic(self.run_dir / RESULTS_FILE, self.to_dict())


# -- helpers -------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """DictConfig / dataclass / mapping / sequence -> dicts and lists of JSON-friendly leaves."""
    if _is_omegaconf(value):
        from omegaconf import OmegaConf
        from omegaconf.errors import InterpolationResolutionError

        try:
            value = OmegaConf.to_container(value, resolve=True, throw_on_missing=False, enum_to_str=True)
        except InterpolationResolutionError:  # e.g. ${oc.env:UNSET}: keep the text, it holds no secret
            value = OmegaConf.to_container(value, resolve=False, throw_on_missing=False, enum_to_str=True)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif hasattr(value, "to_dict") and callable(value.to_dict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


def _redact(value: Any, secret: bool) -> Any:
    if secret and value not in (None, ""):
        return REDACTED
    if isinstance(value, dict):
        return {k: _redact(v, is_secret_key(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, False) for v in value]
    if isinstance(value, str):
        return redact_url_credentials(value)
    return value


def _is_omegaconf(value: Any) -> bool:
    return type(value).__module__.startswith("omegaconf")


def _to_json(value: Any) -> Any:
    """``json.dump``'s fallback: the few non-JSON types a run produces, else TypeError."""
    if isinstance(value, (Path, enum.Enum)) or dataclasses.is_dataclass(value) or _is_omegaconf(value):
        return _plain(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable: {value!r}")


def flatten_numbers(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, float]:
    """``{prefix}{key}`` (nested keys joined by ``/``) for every numeric leaf; other values are left out."""
    flat: Dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(args: list, cwd: Path | str | None) -> Optional[str]:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):  # git missing, cwd gone, or hung
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
