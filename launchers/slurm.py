"""``hydra/launcher=slurm``: a multirun's jobs on a Slurm cluster, each on its GPU generation, through submitit.

Built on hydra-submitit-launcher, whose job-side half (restoring Hydra's state in the job,
running it, and resubmitting itself when preempted) is used as it is. What this launcher
adds is the submitting half:

- every point is composed and planned first; one the planner refuses, or whose hardware the
  cluster profile (``cluster=<name>``, conf/cluster/) does not map, is skipped with its
  reason (its results.json says so) before anything is submitted;
- the rest are grouped by their Slurm resources (partition, constraint, GPU type and count,
  nodes and tasks from ``parallelism``), and each group is submitted as one job array with a
  fresh executor (submitit's parameters accumulate otherwise);
- ``dry_run`` prints each group's sbatch header as submitit would write it, and submits nothing;
- ``detach`` submits, writes ``submitted.json`` and returns; ``llmexp gather <sweep dir>`` collects;
- otherwise it waits, and a job that fails is reported failed with its error and logs while
  the rest go on (``launchers.sweep_jobs``).

In the job, a multi-task job gets torch.distributed's variables from Slurm's, and the
preemption signal goes through ``llmexp.preemption`` so training checkpoints at a step
boundary before submitit requeues the job.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

from llmexp.launchers.placement import SlurmResources, missing_cluster, slurm_resources
from llmexp.launchers.sweep_jobs import SUBMITTED_FILE, SweepJob, exit_code, observe, submitted, write_summary
from llmexp import console, preemption
from llmexp.errors import EXIT_USER_ERROR
from llmexp.planner import make_plan
from llmexp.results import RunRecord, write_json_atomic

POLL_SECONDS = 1.0  # how often a waiting sweep asks whether a job ended


class SlurmLauncher(BaseSubmititLauncher):
    _EXECUTOR = "slurm"

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """The job side: torch.distributed from Slurm, the preemption signal routed, then the job."""
        import submitit

        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            os.environ["GROUP_RANK"] = str(environment.node)
        if environment.global_rank != 0:  # rank 0 keeps the job's .hydra record (secrets redacted); no second writer
            args = ([*args[0], "hydra.output_subdir=null"], *args[1:])
        stop_signal = environment._usr_sig()  # submitit's preemption/timeout signal (USR2 unless configured)
        preemption.install(stop_signal, signal.getsignal(stop_signal))
        return super().__call__(*args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from submitit.core.utils import FailedJobError

        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        jobs, groups, skipped = self._place(job_overrides, initial_job_idx)
        if self.params["dry_run"]:
            self._print_dry_run(groups, skipped)
            if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
                _remove_sweep_dir(sweep_dir)
            return [_job_return(job) for job in jobs]
        for job, cfg, reason in skipped:
            RunRecord.start(job.run_dir, cfg).finish("skipped", reason).write()
            job.status, job.reason = "skipped", reason
        try:
            slurm_jobs = self._submit(groups)
        except FailedJobError as error:  # sbatch refused: no controller, an unknown partition, a bad gres ...
            console.error(f"Slurm refused the submission: {str(error).strip()} Check the cluster profile "
                          f"(cluster={self.config.cluster.name}) against `sinfo`, and that `sbatch` works here.")
            sys.exit(1)
        if self.params["detach"]:
            write_json_atomic(
                sweep_dir / SUBMITTED_FILE,
                {"submitit_folder": self._folder(), "jobs": [dataclasses.asdict(job) for job in jobs]},
            )
            console.err.print(
                f"submitted {len(slurm_jobs)} job(s) to Slurm, skipped {len(skipped)}; collect them with "
                f"`llmexp gather {sweep_dir}`", highlight=False, soft_wrap=True,
            )
            return [_job_return(job) for job in jobs]
        self._wait(slurm_jobs)
        write_summary(sweep_dir, jobs)
        if exit_code(jobs):
            console.warn("some jobs failed; see the table above and jobs.json")
        return [_job_return(job) for job in jobs]

    def _place(self, job_overrides, initial_job_idx):
        """Each point's job record and, for those that can run, its group; the others with their reason."""
        jobs: List[SweepJob] = []
        groups: Dict[SlurmResources, List[Tuple[SweepJob, Tuple]]] = defaultdict(list)
        skipped: List[Tuple[SweepJob, DictConfig, str]] = []
        for offset, overrides in enumerate(job_overrides):
            num = initial_job_idx + offset
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config.hydra.job):
                sweep_config.hydra.job.num = num
            run_dir = str(Path(sweep_config.hydra.sweep.dir) / str(sweep_config.hydra.sweep.subdir))
            cfg = OmegaConf.masked_copy(sweep_config, [key for key in sweep_config if key != "hydra"])
            problem = missing_cluster(cfg)  # caught by preflight when the command line names the launcher
            if problem:
                console.error(problem)
                sys.exit(EXIT_USER_ERROR)
            job = SweepJob(num, list(filter_overrides(overrides)), run_dir)
            jobs.append(job)
            problems = make_plan(cfg).problems
            resources = slurm_resources(cfg)
            if isinstance(resources, str):
                problems.append(resources)
            if problems:
                skipped.append((job, cfg, " ".join(problems)))
                continue
            job.resources = resources.to_dict()
            groups[resources].append((job, (list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state())))
        return jobs, groups, skipped

    def _sbatch_parameters(self, resources: SlurmResources, size: int) -> Dict[str, Any]:
        """A group's sbatch options: its resources and the launcher's settings (submitit's names)."""
        return {
            "job_name": str(self.config.hydra.job.name),
            "array_parallelism": min(size, self.params["array_parallelism"]),
            "signal_delay_s": self.params["signal_delay_s"],
            **resources.sbatch_parameters(),
        }

    def _folder(self) -> str:
        return str(self.params["submitit_folder"])

    def _submit(self, groups) -> List[Tuple[SweepJob, Any]]:
        """Each group as one job array, from a fresh executor: submitit's parameters accumulate otherwise."""
        import submitit

        slurm_jobs = []
        for resources, members in groups.items():
            executor = submitit.SlurmExecutor(folder=self._folder(), max_num_timeout=self.params["max_num_timeout"])
            executor.update_parameters(**self._sbatch_parameters(resources, len(members)))
            arguments = zip(*[call for _, call in members])
            for (job, _), slurm_job in zip(members, executor.map_array(self, *arguments)):
                slurm_jobs.append((submitted(job, slurm_job), slurm_job))
                console.err.print(f"#{job.num} {' '.join(job.overrides)} -> Slurm job {slurm_job.job_id}", highlight=False)
        return slurm_jobs

    def _wait(self, slurm_jobs) -> None:
        """Until every job has ended; each is reported as it ends (progress on stderr)."""
        import submitit

        by_id = {id(slurm_job): job for job, slurm_job in slurm_jobs}
        ended = 0
        for slurm_job in submitit.helpers.as_completed([s for _, s in slurm_jobs], poll_frequency=POLL_SECONDS):
            job = observe(by_id[id(slurm_job)], slurm_job)
            ended += 1
            console.err.print(
                f"[{ended}/{len(slurm_jobs)}] #{job.num} {' '.join(job.overrides)}: {job.status}"
                + (f" ({job.reason})" if job.status == "failed" else ""), highlight=False, soft_wrap=True,
            )

    def _print_dry_run(self, groups, skipped) -> None:
        """Each group's sbatch script as submitit writes it, from the same parameters; needs no Slurm here."""
        from submitit.slurm.slurm import _make_sbatch_string

        # The command submitit's SlurmExecutor puts in every script (its _submitit_command_str).
        command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(self._folder())}"
        for resources, members in groups.items():
            parameters = self._sbatch_parameters(resources, len(members))
            script = _make_sbatch_string(command=command, folder=self._folder(), map_count=len(members), **parameters)
            console.out.print(f"job array of {len(members)}:", highlight=False)
            for line in script.splitlines():
                if line.startswith("#SBATCH") or line.startswith("srun"):
                    console.out.print(f"  {line}", highlight=False, soft_wrap=True)
            for index, (job, _) in enumerate(members):
                console.out.print(f"  [{index}] #{job.num} {' '.join(job.overrides)}", highlight=False, soft_wrap=True)
        for job, _, reason in skipped:
            console.out.print(f"skipped #{job.num} {' '.join(job.overrides)}: {reason}", highlight=False, soft_wrap=True)
        console.out.print("dry run: nothing submitted", highlight=False)


def _remove_sweep_dir(sweep_dir: Path) -> None:
    """Hydra's sweeper made the sweep directory (and its dated parents) for its record; a dry run leaves none."""
    shutil.rmtree(sweep_dir)
    parent, here = sweep_dir.parent.resolve(), Path.cwd().resolve()
    while parent != here and here in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _job_return(job: SweepJob) -> JobReturn:
    """Hydra's record of a job; its outcome is in jobs.json and the job's results.json, so Hydra never re-raises."""
    return JobReturn(overrides=job.overrides, working_dir=job.run_dir, status=JobStatus.COMPLETED)
