"""``llmexp gather <sweep dir>``: where a cluster sweep's jobs stand, from its ``jobs.json``.

For a sweep submitted with ``hydra.launcher.detach=true``, or one whose launcher stopped
early: asks the cluster once about every job not yet ended (Slurm: ``squeue``/``sacct``;
Kubernetes: each job's object and its status conditions), reads the results each finished job
wrote into its own directory, marks a job that died as failed with the scheduler's word for it
(Slurm's state and exit code, the operator's reason and message; a Kubernetes sweep's Secret is
deleted once every job using it has ended), and rewrites
``<sweep dir>/jobs.json`` and the table. Run it again while jobs are pending or running. Exit
code 0: every job completed or was skipped, 1: some failed, 3: some have not ended yet
(whatever the others did), 2: no jobs.json there or no cluster to ask.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from llmexp.errors import UserError
from llmexp.launchers import slurm_queue
from llmexp.launchers.placement import KUBERNETES_INSTALL, KUBERNETES_MODULES
from llmexp.launchers.sweep_jobs import JOBS_FILE, UNFINISHED, SweepJob, finish, observe, read_jobs
from llmexp.machine.backends import importable


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmexp gather", description=__doc__.split("\n", 1)[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory `llmexp -m hydra/launcher=... ` printed")
    args = parser.parse_args(argv)

    jobs = sweep_jobs(args.sweep_dir)
    waiting = [job for job in jobs if job.status in UNFINISHED]
    if any(job.kubernetes is not None for job in waiting):
        gather_kubernetes(args.sweep_dir, jobs)
    on_slurm = [job for job in waiting if job.kubernetes is None]
    try:
        states = slurm_queue.query(job.slurm_job_id for job in on_slurm if job.slurm_job_id is not None)
    except slurm_queue.SlurmUnreachable as error:
        raise UserError(f"{error}; run gather where `squeue` and `sacct` reach the sweep's cluster (SLURM_CONF).") from None
    for job in on_slurm:
        observe(job, states.get(job.slurm_job_id))
    return finish(args.sweep_dir, jobs)


def sweep_jobs(sweep_dir: Path) -> List[SweepJob]:
    """The jobs of ``sweep_dir``'s jobs.json; ``UserError`` saying what to give when there is none."""
    try:
        return read_jobs(sweep_dir)
    except (OSError, ValueError, TypeError) as error:
        raise UserError(
            f"{sweep_dir / JOBS_FILE} cannot be read ({error}); give the directory of a sweep submitted with "
            "`hydra/launcher=slurm` or `hydra/launcher=kubernetes` (it holds jobs.json from the first submission on)."
        ) from None


def gather_kubernetes(sweep_dir: Path, jobs: List[SweepJob]) -> None:
    """Each of ``jobs`` on Kubernetes not yet ended brought up to date (a failed one keeps its pod's log tail); the
    sweep's Secret deleted once every job using it has ended."""
    if missing := [module for module in KUBERNETES_MODULES if not importable(module)]:
        raise UserError(f"this sweep's jobs are Kubernetes objects, and reaching them needs {', '.join(missing)}: "
                        f"{KUBERNETES_INSTALL}")
    from llmexp.launchers.kubernetes import keep_failed_log, release_secrets, update
    from llmexp.launchers.kubernetes_jobs import KubernetesRefused, KubernetesUnreachable

    connections: dict = {}
    waiting = [job for job in jobs if job.kubernetes is not None and job.status in UNFINISHED]
    try:
        update(waiting, connections)
        release_secrets(jobs, connections)
    except (KubernetesRefused, KubernetesUnreachable) as error:
        raise UserError(f"{error}; run gather where the kubeconfig (KUBECONFIG) reaches the sweep's cluster.") from None
    for job in waiting:
        keep_failed_log(job, sweep_dir, connections)
