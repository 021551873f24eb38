"""``llmexp gather <sweep dir>``: where a Slurm sweep's jobs stand, from its ``jobs.json``.

For a sweep submitted with ``hydra.launcher.detach=true``, or one whose launcher stopped
early: asks Slurm once about every job not yet ended, reads the results each finished job
wrote into its own directory, marks a job that died as failed with Slurm's state and exit
code, and rewrites ``<sweep dir>/jobs.json`` and the table. Run it again while jobs are
pending or running. Exit code 0: every job completed or was skipped, 1: some failed,
3: some have not ended yet (whatever the others did), 2: no jobs.json there or no Slurm to ask.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from llmexp.errors import UserError
from llmexp.launchers import slurm_queue
from llmexp.launchers.sweep_jobs import JOBS_FILE, UNFINISHED, finish, observe, read_jobs


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmexp gather", description=__doc__.split("\n", 1)[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory `llmexp -m hydra/launcher=slurm ...` printed")
    args = parser.parse_args(argv)

    try:
        jobs = read_jobs(args.sweep_dir)
    except (OSError, ValueError, TypeError) as error:
        raise UserError(
            f"{args.sweep_dir / JOBS_FILE} cannot be read ({error}); give the directory of a sweep submitted with "
            "`hydra/launcher=slurm` (it holds jobs.json from the first submission on)."
        ) from None
    waiting = [job for job in jobs if job.status in UNFINISHED]
    try:
        states = slurm_queue.query(job.slurm_job_id for job in waiting if job.slurm_job_id is not None)
    except slurm_queue.SlurmUnreachable as error:
        raise UserError(f"{error}; run gather where `squeue` and `sacct` reach the sweep's cluster (SLURM_CONF).") from None
    for job in waiting:
        observe(job, states.get(job.slurm_job_id))
    return finish(args.sweep_dir, jobs)
