"""What a cluster launcher does around its scheduler, the same for ``hydra/launcher=slurm`` and ``=kubernetes``.

- every point is composed and planned, and placed on the cluster profile, before anything is
  submitted; one the planner refuses or the profile cannot place is recorded as skipped with
  its reason (``compose_points``, ``record_skipped``);
- while the sweep waits, each job is reported as it ends and jobs.json is rewritten whenever
  a job changes (``follow``); a scheduler that cannot be asked for a while is said once and
  asked again;
- a sweep that stops early (an error, Ctrl-C) leaves its submitted jobs on record and tells
  the exact command that follows or cancels them (``nothing_orphaned``).

What differs, submitting and asking how jobs stand, stays in each launcher.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Sequence, Tuple, Type

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import DictConfig, OmegaConf, open_dict

from llmexp.display import console
from llmexp.errors import EXIT_USER_ERROR
from llmexp.failure import reason_of
from llmexp.launchers.placement import missing_cluster
from llmexp.launchers.sweep_jobs import UNFINISHED, SweepJob, observe, write_jobs
from llmexp.planning.planner import make_plan
from llmexp.results.record import RunRecord

Placed = Tuple[SweepJob, DictConfig, Any, List[str]]  # a job, its config, its resources, all of its overrides
Skipped = Tuple[SweepJob, DictConfig, str]  # a job, its config, why it cannot run


def compose_points(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, kind: str,
                   place: Callable[[DictConfig], Any]) -> Tuple[List[SweepJob], List[Placed], List[Skipped]]:
    """Each point's job record; those that can run with what ``place(cfg)`` gives them, the others with the reason.

    ``launcher`` is a Hydra launcher (its ``config`` and ``hydra_context`` set up); ``place``
    returns the job's resources on the cluster profile, or a string saying why it cannot go there.
    """
    jobs: List[SweepJob] = []
    placed: List[Placed] = []
    skipped: List[Skipped] = []
    for offset, overrides in enumerate(job_overrides):
        num = initial_job_idx + offset
        sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(sweep_config.hydra.job):
            sweep_config.hydra.job.num = num
        run_dir = str((Path(sweep_config.hydra.sweep.dir) / str(sweep_config.hydra.sweep.subdir)).absolute())
        cfg = OmegaConf.masked_copy(sweep_config, [key for key in sweep_config if key != "hydra"])
        if problem := missing_cluster(cfg, kind):  # caught by preflight when the command line names the launcher
            console.error(problem)
            sys.exit(EXIT_USER_ERROR)
        job = SweepJob(num, list(filter_overrides(overrides)), run_dir)
        jobs.append(job)
        problems = make_plan(cfg).problems
        resources = place(cfg)
        if isinstance(resources, str):
            problems.append(resources)
        if problems:
            skipped.append((job, cfg, " ".join(problems)))
        else:
            placed.append((job, cfg, resources, list(overrides)))
    return jobs, placed, skipped


def record_skipped(skipped: Sequence[Skipped]) -> None:
    """Each skipped point's results.json says skipped, with its reason, as a multirun on this machine would."""
    for job, cfg, reason in skipped:
        RunRecord.start(job.run_dir, cfg).finish("skipped", reason).write()
        job.status, job.reason = "skipped", reason


def follow(sweep_dir: Path, jobs: Sequence[SweepJob], poll_seconds: float, update: Callable[[List[SweepJob]], None],
           unreachable: Type[Exception], ended: Callable[[SweepJob], None] = lambda job: None) -> None:
    """Until every job has ended: ``update(waiting)`` brings the jobs not yet ended up to date (raising
    ``unreachable`` when the scheduler cannot be asked); each is reported as it ends (then ``ended(job)``),
    and jobs.json is rewritten on every change."""
    waiting = [job for job in jobs if job.status in UNFINISHED]
    total, said = len(waiting), None
    while waiting:
        time.sleep(poll_seconds)
        before = [dataclasses.asdict(job) for job in waiting]
        try:
            update(waiting)
        except unreachable as error:  # a controller or API server restarting: ask again, say so once
            if str(error) != said:
                console.warn(f"{error}; asking again every {poll_seconds:g} s")
            said = str(error)
            continue
        changed = before != [dataclasses.asdict(job) for job in waiting]
        for job in list(waiting):
            if job.status not in UNFINISHED:
                waiting.remove(job)
                console.err.print(
                    f"[{total - len(waiting)}/{total}] #{job.num} {' '.join(job.overrides)}: {job.status}"
                    + (f" ({job.reason})" if job.status == "failed" else ""), highlight=False, soft_wrap=True,
                )
                ended(job)
        if changed:
            write_jobs(sweep_dir, jobs)


@contextmanager
def nothing_orphaned(sweep_dir: Path, jobs: List[SweepJob], cancel: Callable[[List[SweepJob]], str]) -> Iterator[None]:
    """If the sweep stops early (an error, Ctrl-C), its submitted jobs are on record and the user learns how to
    reach them: ``llmexp gather``, or ``cancel(running)``, the exact command that cancels those still running."""
    try:
        yield
    except BaseException as error:
        running = [job for job in jobs if job.is_submitted and job.status in UNFINISHED]
        if not running:
            raise
        for job in jobs:
            if not job.is_submitted and job.status == "pending":
                observe(job, None)  # never submitted: failed, saying so
        path = write_jobs(sweep_dir, jobs)
        why = "" if isinstance(error, (KeyboardInterrupt, SystemExit)) else f" ({reason_of(error)})"
        console.error(
            f"the sweep stopped{why} with {len(running)} submitted job(s) not yet ended; the cluster still runs them "
            f"and {path} records them. Follow them with `llmexp gather {sweep_dir}`, or cancel them with "
            f"`{cancel(running)}`."
        )
        if isinstance(error, KeyboardInterrupt):
            raise SystemExit(130) from None
        raise


def remove_sweep_dir(sweep_dir: Path) -> None:
    """Hydra's sweeper made the sweep directory (and its dated parents) for its record; a dry run leaves none."""
    if not sweep_dir.is_dir() or {path.name for path in sweep_dir.iterdir()} - {"multirun.yaml"}:
        return
    shutil.rmtree(sweep_dir)
    parent, here = sweep_dir.parent.resolve(), Path.cwd().resolve()
    while parent != here and here in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def job_return(job: SweepJob) -> JobReturn:
    """Hydra's record of a job; its outcome is in jobs.json and the job's results.json, so Hydra never re-raises."""
    return JobReturn(overrides=job.overrides, working_dir=job.run_dir, status=JobStatus.COMPLETED)
