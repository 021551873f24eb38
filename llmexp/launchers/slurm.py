"""``hydra/launcher=slurm``: a multirun's jobs on a Slurm cluster, each on its GPU generation, through submitit.

Built on hydra-submitit-launcher, whose job-side half (restoring Hydra's state in the job,
running it, and resubmitting itself when preempted) is used as it is. What this launcher
adds is the submitting half:

- every point is composed and planned first; one the planner refuses, or whose hardware the
  cluster profile (``cluster=<name>``, llmexp/conf/cluster/) does not map, is skipped with its
  reason (its results.json says so) before anything is submitted;
- the rest are grouped by their Slurm resources (partition, constraint, GPU type and count,
  nodes and tasks from ``parallelism``), and each group is submitted with a fresh executor
  (submitit's parameters accumulate otherwise): as a job array, or as a plain job when the
  group has one job, as submitit does;
- ``dry_run`` prints each group's sbatch script exactly as submitit will write it, and submits nothing;
- jobs.json (``launchers.sweep_jobs``) is written as each group is submitted and rewritten as
  jobs start and end, so no submitted job goes unrecorded; if anything goes wrong after the
  first submission the sweep prints the exact commands that follow or cancel its jobs;
- ``detach`` submits and returns; ``llmexp gather <sweep dir>`` collects;
- otherwise it asks Slurm every few seconds (``launchers.slurm_queue``), reports each job as
  it ends (a cancelled or killed one with Slurm's state and exit code), returns once Slurm no
  longer lists any of them, and exits 1 if any failed.

In the job, a multi-task job gets torch.distributed's variables from Slurm's, the preemption
signal goes through ``llmexp.training.preemption`` so training checkpoints at a step boundary before
submitit requeues the job, and a run that failed raises after recording its results, so the
job exits non-zero: ``sacct`` shows it FAILED and ``--dependency=afterok`` chains stop.
"""

from __future__ import annotations

import os
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import submitit
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from submitit.core.utils import FailedJobError

from llmexp.launchers import slurm_queue
from llmexp.launchers.cluster_sweep import (
    compose_points, follow, job_return, nothing_orphaned, record_skipped, remove_sweep_dir,
)
from llmexp.launchers.placement import SlurmResources, slurm_resources
from llmexp.launchers.sweep_jobs import JOBS_FILE, SweepJob, finish, observe, submitted, write_jobs
from llmexp.display import console
from llmexp.training import preemption
from llmexp.results.record import read_results


class RunFailed(RuntimeError):
    """The job's run failed (its results.json says why); raised so that the job exits non-zero."""


class SlurmLauncher(BaseSubmititLauncher):
    _EXECUTOR = "slurm"

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """The job side: torch.distributed from Slurm, the preemption signal routed, then the job."""
        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            os.environ["GROUP_RANK"] = str(environment.node)
        if environment.global_rank != 0:  # rank 0 keeps the job's .hydra record (secrets redacted); no second writer
            args = ([*args[0], "hydra.output_subdir=null"], *args[1:])
        stop_signal = environment._usr_sig()  # submitit's preemption/timeout signal (USR2 unless configured)
        preemption.install(stop_signal, signal.getsignal(stop_signal))
        done = super().__call__(*args, **kwargs)
        if done.return_value == "failed":  # an error the task raised is raised by return_value itself
            run_dir = done.hydra_cfg.hydra.runtime.output_dir
            try:
                reason = read_results(run_dir)["reason"]
            except (OSError, ValueError, KeyError):  # a rank other than 0 of a job whose rank 0 wrote nothing
                reason = f"the run in {run_dir} failed"
            raise RunFailed(reason)
        return done

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        jobs, groups, skipped = self._place(job_overrides, initial_job_idx)
        if self.params["dry_run"]:
            self._print_dry_run(groups, skipped)
            remove_sweep_dir(sweep_dir)
            return [job_return(job) for job in jobs]
        record_skipped(skipped)
        with nothing_orphaned(sweep_dir, jobs, _scancel):
            try:
                self._submit(sweep_dir, jobs, groups)
            except FailedJobError as error:  # sbatch refused: no controller, an unknown partition, a bad gres ...
                console.error(f"Slurm refused the submission: {' '.join(str(error).split())} Check the cluster profile "
                              f"(cluster={self.config.cluster.name}) against `sinfo`, and that `sbatch` works here.")
                raise SystemExit(1) from None
            if self.params["detach"]:
                console.err.print(
                    f"submitted {sum(job.slurm_job_id is not None for job in jobs)} job(s) to Slurm, skipped "
                    f"{len(skipped)}; they are recorded in {sweep_dir / JOBS_FILE}; collect them with "
                    f"`llmexp gather {sweep_dir}`", highlight=False, soft_wrap=True,
                )
                return [job_return(job) for job in jobs]
            self._wait(sweep_dir, jobs)
        code = finish(sweep_dir, jobs)
        if code:
            raise SystemExit(code)
        return [job_return(job) for job in jobs]

    def _place(self, job_overrides, initial_job_idx):
        """Each point's job record and, for those that can run, its group; the others with their reason."""
        jobs, placed, skipped = compose_points(self, job_overrides, initial_job_idx, "slurm", slurm_resources)
        groups: Dict[SlurmResources, List[Tuple[SweepJob, Tuple]]] = defaultdict(list)
        for job, _, resources, overrides in placed:
            job.resources = resources.to_dict()
            groups[resources].append((job, (overrides, "hydra.sweep.dir", job.num, f"job_id_for_{job.num}",
                                            Singleton.get_state())))
        return jobs, groups, skipped

    def _sbatch_parameters(self, resources: SlurmResources, size: int) -> Dict[str, Any]:
        """A group's sbatch options: its resources and the launcher's settings (submitit's names)."""
        return {
            "job_name": str(self.config.hydra.job.name),
            "array_parallelism": min(size, self.params["array_parallelism"]),
            "signal_delay_s": self.params["signal_delay_s"],
            **resources.sbatch_parameters(),
        }

    def _executor(self, resources: SlurmResources, size: int):
        """A fresh executor for one group: submitit's parameters accumulate otherwise."""
        executor = submitit.SlurmExecutor(
            folder=str(self.params["submitit_folder"]), max_num_timeout=self.params["max_num_timeout"])
        executor.update_parameters(**self._sbatch_parameters(resources, size))
        return executor

    def _submit(self, sweep_dir: Path, jobs: List[SweepJob], groups) -> None:
        """Each group in one sbatch call; jobs.json records its jobs as soon as Slurm has taken them."""
        for resources, members in groups.items():
            arguments = zip(*[call for _, call in members])
            for (job, _), slurm_job in zip(members, self._executor(resources, len(members)).map_array(self, *arguments)):
                submitted(job, slurm_job)
                console.err.print(f"#{job.num} {' '.join(job.overrides)} -> Slurm job {job.slurm_job_id}",
                                  highlight=False, soft_wrap=True)
            write_jobs(sweep_dir, jobs)

    def _wait(self, sweep_dir: Path, jobs: List[SweepJob]) -> None:
        """Until Slurm lists none of the jobs; each is reported as it ends, jobs.json rewritten on every change."""
        def update(waiting: List[SweepJob]) -> None:
            states = slurm_queue.query(job.slurm_job_id for job in waiting)
            for job in waiting:
                observe(job, states.get(job.slurm_job_id))

        follow(sweep_dir, jobs, slurm_queue.POLL_SECONDS, update, slurm_queue.SlurmUnreachable)

    def _print_dry_run(self, groups, skipped) -> None:
        """Each group's sbatch script as submitit will write it (the same executor and call); needs no Slurm here."""
        count = len(groups)
        for number, (resources, members) in enumerate(groups.items(), start=1):
            executor = self._executor(resources, len(members))
            if len(members) > 1:  # submitit submits a group of one as a plain job, more as an array
                executor.parameters["map_count"] = len(members)
            kind = f"a job array of {len(members)}" if len(members) > 1 else "a single job"
            console.out.print(f"sbatch script {number} of {count}, {kind}:", highlight=False)
            console.out.print(executor._make_submission_file_text(executor._submitit_command_str, "dry-run"),
                              highlight=False, soft_wrap=True)
            for index, (job, _) in enumerate(members):
                task = f"array task {index}: " if len(members) > 1 else ""
                console.out.print(f"  {task}#{job.num} {' '.join(job.overrides)}", highlight=False, soft_wrap=True)
        for job, _, reason in skipped:
            console.out.print(f"skipped #{job.num} {' '.join(job.overrides)}: {reason}", highlight=False, soft_wrap=True)
        console.out.print(f"dry run: {count} sbatch script(s) for {sum(len(m) for m in groups.values())} job(s); "
                          "nothing submitted", highlight=False)


def _scancel(running: List[SweepJob]) -> str:
    """The command that cancels ``running`` (an array's tasks through their parent)."""
    return "scancel " + " ".join(dict.fromkeys(job.slurm_job_id.split("_")[0] for job in running))
