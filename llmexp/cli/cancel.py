"""``llmexp cancel <sweep dir>``: delete the Kubernetes objects of a sweep's jobs not yet ended.

Reads ``<sweep dir>/jobs.json`` (a sweep of ``hydra/launcher=kubernetes``, detached or
stopped), asks the API how each job stands, deletes the object of each still pending or
running (its pods go with it) and records those as failed, cancelled, in jobs.json; jobs that
already ended keep their objects and outcome. The sweep's Secret (secrets typed on the command
line) is deleted too. Exit code 0 once done, 2 when there is no such
sweep, or no cluster to ask. A Slurm sweep's jobs are cancelled with ``scancel``, as its
launcher says.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from llmexp.cli.gather import sweep_jobs
from llmexp.display import console
from llmexp.errors import UserError
from llmexp.launchers.placement import KUBERNETES_INSTALL, KUBERNETES_MODULES
from llmexp.launchers.sweep_jobs import UNFINISHED, write_jobs
from llmexp.machine.backends import importable


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmexp cancel", description=__doc__.split("\n", 1)[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory `llmexp -m hydra/launcher=kubernetes ...` printed")
    args = parser.parse_args(argv)

    jobs = sweep_jobs(args.sweep_dir)
    slurm = [job.slurm_job_id for job in jobs if job.slurm_job_id is not None and job.status in UNFINISHED]
    if slurm:
        raise UserError(f"this sweep's jobs are Slurm's: cancel them with `scancel {' '.join(slurm)}`.")
    if missing := [module for module in KUBERNETES_MODULES if not importable(module)]:
        raise UserError(f"cancelling Kubernetes objects needs {', '.join(missing)}: {KUBERNETES_INSTALL}")
    from llmexp.launchers.kubernetes import cancel
    from llmexp.launchers.kubernetes_jobs import KubernetesRefused, KubernetesUnreachable

    try:
        cancelled = cancel(jobs)
    except (KubernetesRefused, KubernetesUnreachable) as error:
        raise UserError(f"{error}; run cancel where the kubeconfig (KUBECONFIG) reaches the sweep's cluster.") from None
    path = write_jobs(args.sweep_dir, jobs)
    for job in cancelled:
        console.err.print(f"#{job.num} {' '.join(job.overrides)}: deleted {job.kubernetes['kind']} "
                          f"{job.kubernetes['name']}", highlight=False, soft_wrap=True)
    console.note(f"cancelled {len(cancelled)} job(s) of {len(jobs)}; {path} records them as failed (cancelled)")
    return 0
