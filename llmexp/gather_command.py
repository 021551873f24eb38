"""``llmexp gather <sweep dir>``: the outcome of a sweep submitted with ``hydra.launcher.detach=true``.

Asks Slurm (through submitit) about every job the sweep's ``submitted.json`` lists, reads
the results each finished job wrote into its own directory, marks a job that died as failed
with its error and logs, and writes ``<sweep dir>/jobs.json`` and the table. Run it again
while jobs are pending or running; exit code 0: all completed or skipped, 1: some failed,
3: none failed yet but some have not ended.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List

from llmexp.errors import UserError


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmexp gather", description=__doc__.split("\n", 1)[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory a detached `llmexp -m` printed")
    args = parser.parse_args(argv)

    import submitit

    from llmexp.launchers.sweep_jobs import SUBMITTED_FILE, SweepJob, exit_code, observe, write_summary

    record = args.sweep_dir / SUBMITTED_FILE
    try:
        submitted = json.loads(record.read_text())
    except (OSError, ValueError) as error:
        raise UserError(
            f"{record} cannot be read ({error}); give the directory of a sweep submitted with "
            "`hydra/launcher=slurm hydra.launcher.detach=true` (it holds submitted.json)."
        ) from None
    jobs = []
    for entry in submitted["jobs"]:
        job = SweepJob.from_dict(entry)
        if job.slurm_job_id is not None:  # skipped before submission: its record stands
            job = observe(job, submitit.SlurmJob(folder=submitted["submitit_folder"], job_id=job.slurm_job_id))
        jobs.append(job)
    write_summary(args.sweep_dir, jobs)
    return exit_code(jobs)
