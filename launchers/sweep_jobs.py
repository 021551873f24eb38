"""What became of each job of a Slurm sweep: ``<sweep dir>/jobs.json`` and the console table.

A job's own ``results.json`` (written by the job) says completed, skipped or failed. Slurm
and submitit say what the job cannot: that it was killed, cancelled or timed out without a
requeue, or never started. Such a job is failed with submitit's error and its log files,
never completed, and a ``results.json`` it left as ``running`` is rewritten as failed.
The blocking launcher and ``llmexp gather`` (for a detached sweep) both end here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from rich.table import Table

from llmexp import console
from llmexp.results import RunRecord, read_results, write_json_atomic

SUBMITTED_FILE = "submitted.json"  # a detached sweep's jobs, for `llmexp gather`
JOBS_FILE = "jobs.json"  # the sweep's outcome per job
UNFINISHED = ("pending", "running")


@dataclasses.dataclass
class SweepJob:
    """One point of the sweep: where it runs and, once known, how it ended."""

    num: int
    overrides: List[str]
    run_dir: str
    status: str = "pending"  # pending | running | completed | skipped | failed
    reason: Optional[str] = None
    slurm_job_id: Optional[str] = None
    node: Optional[str] = None
    restarts: int = 0
    stdout: Optional[str] = None
    stderr: Optional[str] = None
    resources: Optional[Dict[str, Any]] = None

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SweepJob":
        return cls(**{f.name: data.get(f.name, f.default) for f in dataclasses.fields(cls)})


def submitted(job: SweepJob, slurm_job) -> SweepJob:
    """``job`` with its Slurm id and log files (a submitit Job)."""
    job.slurm_job_id = slurm_job.job_id
    job.stdout, job.stderr = str(slurm_job.paths.stdout), str(slurm_job.paths.stderr)
    return job


def observe(job: SweepJob, slurm_job) -> SweepJob:
    """Update ``job`` from Slurm (through submitit) and from its results.json, once it has ended."""
    if not slurm_job.done(force_check=True):
        job.status = "running" if slurm_job.state in ("RUNNING", "COMPLETING") else "pending"
        return job
    error = slurm_job.exception()
    results = _results(job.run_dir)
    slurm = (results or {}).get("environment", {}).get("slurm") or {}
    job.node, job.restarts = slurm.get("node"), int(slurm.get("restart_count") or 0)
    if error is None and results is not None and results["status"] != "running":
        job.status, job.reason = results["status"], results.get("reason")
        return job
    job.status = "failed"
    job.reason = _failure(error, results) + f" (logs: {job.stderr})"
    if results is not None and results["status"] == "running":  # killed mid-way: never leave it "running"
        RunRecord.load(job.run_dir).finish("failed", job.reason).write()
    return job


def _results(run_dir: str) -> Optional[Dict[str, Any]]:
    try:
        return read_results(run_dir)
    except (OSError, ValueError):
        return None


def _failure(error: Optional[BaseException], results: Optional[Dict[str, Any]]) -> str:
    """One line: the job's last error line from submitit's message (which holds the remote traceback)."""
    if error is None:
        return "the job ended without finishing its run (results.json " + ("missing)" if results is None else "says running)")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    tail = [line for line in lines if not line.startswith(("File ", "^", "Traceback", "raise "))]
    return f"{type(error).__name__}: {tail[-1] if tail else lines[-1] if lines else ''}"


def write_summary(sweep_dir: Path, jobs: Sequence[SweepJob]) -> Path:
    """``<sweep_dir>/jobs.json`` (atomically) and the table on the console."""
    path = write_json_atomic(Path(sweep_dir) / JOBS_FILE, [dataclasses.asdict(job) for job in jobs])
    table = Table(title=f"Jobs ({path})", title_justify="left")
    for column in ("#", "overrides", "status", "slurm job", "node", "reason"):
        table.add_column(column)
    colours = {"completed": "green", "failed": "red", "skipped": "yellow"}
    for job in jobs:
        colour = colours.get(job.status, "cyan")
        table.add_row(
            str(job.num), " ".join(job.overrides), f"[{colour}]{job.status}[/{colour}]",
            job.slurm_job_id or "", job.node or "", job.reason or "",
        )
    console.out.print(table)
    return path


def exit_code(jobs: Sequence[SweepJob]) -> int:
    """0: every job completed or was skipped; 1: some failed; 3: none failed but some have not ended."""
    statuses = {job.status for job in jobs}
    if "failed" in statuses:
        return 1
    return 3 if statuses.intersection(UNFINISHED) else 0
