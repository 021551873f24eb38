"""What Slurm says about a sweep's jobs right now: one ``squeue``, and one ``sacct`` for those it no longer lists.

Asked by hand rather than through submitit's watcher, which calls ``sacct`` at most every
half of the time since the last submission (up to 10 minutes) and then waits 15 s for a
result file: a cancelled or killed job was reported 44-110 s after it died. The launcher
asks every ``POLL_SECONDS`` instead, and a job's end is Slurm's own word: its state
(``FAILED``, ``CANCELLED by 0``, ``OUT_OF_MEMORY``, ``NODE_FAIL``, ``TIMEOUT`` ...) and exit code.

A job has ended when ``squeue`` no longer lists it (so a requeued job, pending again, has
not) and accounting records a final state for it (it lags the controller by a second or
three, so a job it has no row for yet has not ended). Where no row can come, because
accounting is disabled or the controller has never heard of the job (another cluster's, or
long purged), the first half is all there is.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

POLL_SECONDS = 2.0
# Final job states (sacct); REQUEUED, PENDING, RUNNING, SUSPENDED and the like are not.
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}
_ARRAY_RANGE = re.compile(r"^(\d+)_\[([^\]]+)\]$")  # 12_[3-5,7%2]: array tasks not yet started, as sacct groups them


class SlurmUnreachable(RuntimeError):
    """``squeue`` or ``sacct`` failed: nothing can be said about the jobs (no controller, no SLURM_CONF ...)."""


@dataclass(frozen=True)
class SlurmJobState:
    """One job (or array task) as Slurm sees it."""

    listed: bool  # squeue shows it: pending, running, completing, or requeued and pending again
    state: Optional[str] = None  # Slurm's word for it ("RUNNING", "CANCELLED by 0"); None: no record of it (yet)
    exit_code: Optional[str] = None  # "code:signal" as sacct gives it ("1:0", "0:9")
    node: Optional[str] = None
    record_expected: bool = True  # False: no accounting row will come (sacct disabled, or a job Slurm does not know)

    @property
    def ended(self) -> bool:
        if self.listed:
            return False
        return not self.record_expected if self.state is None else self.state.split()[0] in FINAL_STATES

    def describe(self) -> str:
        """``Slurm: CANCELLED by 0 (exit code 0:15)``: how the job ended, in Slurm's words."""
        if self.state is None:
            return "Slurm no longer lists the job and keeps no accounting record of how it ended (sacct)"
        return f"Slurm: {self.state}" + (f" (exit code {self.exit_code})" if self.exit_code else "")


def query(job_ids: Iterable[str]) -> Dict[str, SlurmJobState]:
    """Each of ``job_ids`` (``123`` or array tasks ``123_4``) by id; ``SlurmUnreachable`` when Slurm cannot be asked."""
    job_ids = list(dict.fromkeys(job_ids))
    if not job_ids:
        return {}
    parents = ",".join(dict.fromkeys(job_id.split("_")[0] for job_id in job_ids))
    queue = _run(["squeue", "--noheader", "--array", "--jobs", parents, "--format=%i|%T|%N"], "Invalid job id")
    listed: Dict[str, SlurmJobState] = {}
    for line in queue or []:  # None: the controller knows none of these jobs
        job_id, state, node = line.split("|")
        listed[job_id] = SlurmJobState(True, state, node=node or None)
    states = {job_id: listed[job_id] for job_id in job_ids if job_id in listed}
    gone = [job_id for job_id in job_ids if job_id not in listed]
    if gone:
        accounted = _accounting(",".join(dict.fromkeys(job_id.split("_")[0] for job_id in gone)))
        unknown = SlurmJobState(False, record_expected=accounted is not None and queue is not None)
        for job_id in gone:
            states[job_id] = (accounted or {}).get(job_id, unknown)
    return states


def _accounting(parents: str) -> Optional[Dict[str, SlurmJobState]]:
    """sacct's record of each job and array task of ``parents``; None where accounting is disabled."""
    rows = _run(["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", parents,
                 "--format=JobID,State,ExitCode,NodeList"], "accounting storage is disabled")
    if rows is None:
        return None
    accounted = {}
    for row in rows:
        job_id, state, exit_code, node = row.split("|")
        record = SlurmJobState(False, state, exit_code or None, None if node in ("", "None assigned") else node)
        for one in _expand(job_id):
            accounted[one] = record
    return accounted


def _expand(job_id: str) -> List[str]:
    """``12_[3-5,7%2]`` -> 12_3, 12_4, 12_5, 12_7; any other id as it is."""
    grouped = _ARRAY_RANGE.match(job_id)
    if not grouped:
        return [job_id]
    parent, spec = grouped.group(1), grouped.group(2).split("%")[0]
    tasks: List[str] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        tasks += [f"{parent}_{task}" for task in range(int(first), int(last or first) + 1)]
    return tasks


def _run(command: List[str], nothing_to_say: str) -> Optional[List[str]]:
    """The command's output lines; None when it fails saying ``nothing_to_say``; ``SlurmUnreachable`` otherwise."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SlurmUnreachable(f"`{command[0]}` could not be run: {error}") from None
    if done.returncode != 0:
        if nothing_to_say in done.stderr:
            return None
        raise SlurmUnreachable(f"`{command[0]}` failed: {' '.join(done.stderr.split()) or f'exit code {done.returncode}'}")
    return [line for line in done.stdout.splitlines() if line.strip()]
