"""What became of each point of a sweep: ``<sweep dir>/jobs.json``, the console table and the exit code.

One record for every sweep, whoever ran its jobs. The Slurm and Kubernetes launchers write
jobs.json as they submit (each job's Slurm id and log files as soon as sbatch returns it; each
job's Kubernetes object as soon as the API server has created it) and rewrite it as jobs start
and end; ``llmexp gather`` picks it up from there; a multirun on this machine (Hydra's basic or
joblib launcher) writes it from its jobs' directories when it ends (``SweepSummary``).

A job's own ``results.json`` (written by the job from its first second) says completed,
skipped or failed. Slurm says what the job cannot: that it was cancelled, killed (SIGKILL,
the OOM killer), lost with its node or timed out without a requeue. Such a job is failed with
Slurm's state and exit code as its reason, never completed, and a ``results.json`` it left
as ``running`` is rewritten as failed. On Kubernetes the operator's status conditions play
Slurm's part: a job it marks Failed is failed with the operator's reason and message (and the
run's own reason when its results.json says more).

The exit code, the same for a multirun and for gather (``exit_code``): 0 when every point
completed or was skipped by the planner, 1 when any failed, 3 while any has not ended.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf
from rich.table import Table
from rich.text import Text

from llmexp.display import console
from llmexp.failure import last_error_line, one_line
from llmexp.launchers.placement import CLUSTER_LAUNCHERS
from llmexp.launchers.slurm_queue import SlurmJobState
from llmexp.results.record import RESULTS_FILE, RunRecord, read_results, write_json_atomic

if TYPE_CHECKING:  # the kubernetes client is an extra; only its launcher and gather import it
    from llmexp.launchers.kubernetes_jobs import KubernetesJobState

JOBS_FILE = "jobs.json"
UNFINISHED = ("pending", "running")
WAITING_STATES = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED")  # Slurm's states of a job not yet started again
EXIT_FAILED, EXIT_UNFINISHED = 1, 3
NEVER_SUBMITTED = "never submitted: the sweep stopped before it reached this job"


@dataclasses.dataclass
class SweepJob:
    """One point of the sweep: where it runs and, once known, how it ended."""

    num: int
    overrides: List[str]
    run_dir: str
    status: str = "pending"  # pending | running | completed | skipped | failed
    reason: Optional[str] = None  # why it was skipped or failed, on one line
    slurm_job_id: Optional[str] = None
    node: Optional[str] = None
    slurm_state: Optional[str] = None  # Slurm's last word on it: RUNNING, COMPLETED, FAILED, CANCELLED by 0 ...
    exit_code: Optional[str] = None  # code:signal, once Slurm says it ended
    restarts: int = 0
    stdout: Optional[str] = None  # the job's log files (its full traceback, when it failed)
    stderr: Optional[str] = None
    resources: Optional[Dict[str, Any]] = None
    kubernetes: Optional[Dict[str, str]] = None  # its object: {kind, name, namespace, context}, once created
    kubernetes_state: Optional[str] = None  # the operator's last word on it: Running, Complete, Failed (reason) ...

    @property
    def is_submitted(self) -> bool:
        """The scheduler has taken it: Slurm gave it an id, or the API server created its object."""
        return self.slurm_job_id is not None or self.kubernetes is not None

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SweepJob":
        return cls(**{f.name: data.get(f.name, f.default) for f in dataclasses.fields(cls)})


def submitted(job: SweepJob, slurm_job) -> SweepJob:
    """``job`` with its Slurm id and log files (a submitit Job)."""
    job.slurm_job_id = slurm_job.job_id
    job.stdout, job.stderr = str(slurm_job.paths.stdout), str(slurm_job.paths.stderr)
    return job


def observe(job: SweepJob, slurm: Optional[SlurmJobState]) -> SweepJob:
    """Update ``job`` from what Slurm says of it now and, once it has ended, from its results.json."""
    if job.slurm_job_id is None:  # the sweep stopped before submitting it
        job.status, job.reason = "failed", NEVER_SUBMITTED
        return job
    if slurm is None:
        return job
    job.node, job.slurm_state = slurm.node or job.node, slurm.state
    if not slurm.ended:
        job.status = "pending" if (slurm.state or "").split(" ")[0] in WAITING_STATES else "running"
        return job
    job.exit_code = slurm.exit_code
    results = _results(job.run_dir)
    placed = (results or {}).get("environment", {}).get("slurm") or {}
    job.node, job.restarts = job.node or placed.get("node"), int(placed.get("restart_count") or 0)
    return _settle(job, results, lambda: _failure(job, slurm))


def observe_kubernetes(job: SweepJob, state: Optional["KubernetesJobState"]) -> SweepJob:
    """Update ``job`` from its object's status conditions now and, once it has ended, from its results.json.

    Complete (Succeeded) leaves the outcome to the run's results.json; Failed, or an object
    deleted before it ended, is failed with the operator's words, and the run's reason when it
    recorded one.
    """
    if job.kubernetes is None:  # the sweep stopped before creating it
        job.status, job.reason = "failed", NEVER_SUBMITTED
        return job
    if state is None:
        return job
    job.kubernetes_state = state.describe()
    if not state.ended:
        job.status = "running" if state.running else "pending"
        return job
    results = _results(job.run_dir)
    if not state.failed:
        return _settle(job, results, lambda: f"{state.describe()}, but the run left no final {RESULTS_FILE} in {job.run_dir}")
    said = (results or {}).get("reason") if (results or {}).get("status") == "failed" else None
    job.status, job.reason = "failed", one_line("; ".join(filter(None, (state.describe(), said))))
    if results is not None and results["status"] == "running":
        RunRecord.load(job.run_dir).finish("failed", job.reason).write()
    return job


def _settle(job: SweepJob, results: Optional[Dict[str, Any]], failure: Callable[[], str]) -> SweepJob:
    """``job``'s outcome once it has ended: what its results.json says, else failed with ``failure()``; a
    results.json it left ``running`` (killed mid-way) is rewritten as failed, never left running."""
    if results is not None and results["status"] != "running":
        job.status, job.reason = results["status"], results.get("reason")
        return job
    job.status, job.reason = "failed", failure()
    if results is not None:
        RunRecord.load(job.run_dir).finish("failed", job.reason).write()
    return job


def _results(run_dir: str) -> Optional[Dict[str, Any]]:
    try:
        return read_results(run_dir)
    except (OSError, ValueError):
        return None


def _failure(job: SweepJob, slurm: SlurmJobState) -> str:
    """Why a job ended without finishing its run: the error it raised, else Slurm's state and exit code."""
    try:  # the traceback submitit saved when the job raised outside the run (its result file, task 0)
        with open(Path(job.stdout).parent / f"{job.slurm_job_id}_0_result.pkl", "rb") as handle:
            outcome, detail = pickle.load(handle)
    except (OSError, TypeError, ValueError, EOFError, pickle.UnpicklingError):
        outcome = None
    if outcome == "error":
        return one_line(f"{last_error_line(detail)} ({slurm.describe()})")
    return slurm.describe()


def write_jobs(sweep_dir: Path | str, jobs: Sequence[SweepJob]) -> Path:
    """``<sweep_dir>/jobs.json``, atomically: readers see the previous version or this one."""
    return write_json_atomic(Path(sweep_dir) / JOBS_FILE, [dataclasses.asdict(job) for job in jobs])


def read_jobs(sweep_dir: Path | str) -> List[SweepJob]:
    """The jobs of ``<sweep_dir>/jobs.json``; ``OSError``/``ValueError`` when it is missing or unreadable."""
    return [SweepJob.from_dict(entry) for entry in json.loads((Path(sweep_dir) / JOBS_FILE).read_text())]


def finish(sweep_dir: Path | str, jobs: Sequence[SweepJob]) -> int:
    """Write jobs.json, print the table and what it means; the exit code (``exit_code``)."""
    path = write_jobs(sweep_dir, jobs)
    _print_table(path, jobs)
    code = exit_code(jobs)
    counts = {status: sum(job.status == status for job in jobs) for status in ("failed", *UNFINISHED)}
    if code == EXIT_UNFINISHED:
        console.warn(f"{counts['pending'] + counts['running']} of {len(jobs)} jobs have not ended yet ("
                     f"{counts['pending']} pending, {counts['running']} running, {counts['failed']} failed so far); "
                     f"run `llmexp gather {sweep_dir}` again later (exit code 3 until every job has ended).")
    elif code == EXIT_FAILED:
        console.error(f"{counts['failed']} of {len(jobs)} jobs failed; the table says which and why, {path} too, "
                      "and each failed run's error_log (or its Slurm log) has the traceback.")
    return code


def _print_table(path: Path, jobs: Sequence[SweepJob]) -> None:
    """One row per job; the columns no job has a value for (the Slurm ones on this machine) are left out."""
    columns = {
        "#": lambda job: str(job.num), "overrides": lambda job: " ".join(job.overrides),
        "status": lambda job: Text(job.status, style=_COLOURS.get(job.status, "cyan")),
        "slurm job": lambda job: job.slurm_job_id, "node": lambda job: job.node,
        "slurm state": lambda job: " ".join(filter(None, (job.slurm_state, job.exit_code))) or None,
        "kubernetes object": lambda job: job.kubernetes and f"{job.kubernetes['kind']}/{job.kubernetes['name']}",
        "operator": lambda job: job.kubernetes_state,
        "reason": lambda job: job.reason,
    }
    shown = [name for name, cell in columns.items() if any(cell(job) for job in jobs)]
    table = Table(title=f"Jobs ({path})", title_justify="left")
    for name in shown:
        table.add_column(name, overflow="fold")
    for job in jobs:
        table.add_row(*(columns[name](job) or "" for name in shown))
    console.out.print(table)


_COLOURS = {"completed": "green", "failed": "red", "skipped": "yellow"}


def exit_code(jobs: Sequence[SweepJob]) -> int:
    """0: every job completed or was skipped; 3: some have not ended (whatever the others did); 1: some failed."""
    statuses = {job.status for job in jobs}
    if statuses.intersection(UNFINISHED):
        return EXIT_UNFINISHED
    return EXIT_FAILED if "failed" in statuses else 0


class SweepSummary(Callback):
    """A multirun on this machine (Hydra's basic or joblib launcher): jobs.json, the table and the exit code at its end.

    Its jobs wrote their results.json in their own directories; those this multirun made
    (since it started) are its points. A job whose results.json is missing or still says
    ``running`` ended without finishing its run: it is failed. The cluster launchers (Slurm,
    Kubernetes) keep their own jobs.json and are left alone here.
    """

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # file times are whole seconds on some filesystems

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if config.hydra.launcher.get("_target_") in CLUSTER_LAUNCHERS:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = [_local_job(hydra_dir.parent) for hydra_dir in sweep_dir.rglob(".hydra")
                if (hydra_dir / "overrides.yaml").is_file() and (hydra_dir / "overrides.yaml").stat().st_mtime >= self.started]
        code = finish(sweep_dir, sorted(jobs, key=lambda job: job.num))
        if code:
            raise SystemExit(code)


def _local_job(run_dir: Path) -> SweepJob:
    """A job of a multirun on this machine, from Hydra's record of it and its results.json."""
    hydra = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra
    job = SweepJob(int(hydra.job.num), list(hydra.overrides.task), str(run_dir.absolute()))
    results = _results(job.run_dir)
    return _settle(job, results, lambda: "the job ended without finishing its run "
                   f"({RESULTS_FILE} {'missing' if results is None else 'says running'})")
