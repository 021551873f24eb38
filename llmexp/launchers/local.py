"""``hydra/launcher=local``: a multirun's jobs in parallel on this machine, in warm workers (``launchers.warm_workers``).

Each worker imports torch, transformers and lightning once (``preload``), runs on its share
of the cores, and takes the next job as soon as it is free. The workers are started when Hydra
sets the launcher up, so their imports overlap the sweep's own composing and checking.

A job runs in its worker exactly as Hydra's basic launcher runs it in-process (the same
``run_job``, composition, run directory, ``.hydra`` record and callbacks), and its
``JobReturn`` comes back as it is, so Hydra and the sweep's table (``launchers.sweep_jobs``)
see every job's outcome as they do with the basic launcher: a run that failed is ``failed``
in its results.json and the sweep exits 1; an error the job raised is raised by Hydra.

What differs is where a job's output goes: to ``<run dir>/output.log`` (stdout and stderr,
whatever writes them), while the console gets one line per job as it ends. A job whose worker
died (killed, out of memory, a crash in native code) is recorded as failed with how it died,
its results.json too, and the sweep goes on with a fresh worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
import traceback
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from llmexp.display import console
from llmexp.launchers.warm_workers import Outcome, WarmWorkers
from llmexp.machine.cpu_threads import usable_cores
from llmexp.results.record import RunRecord, read_results

OUTPUT_LOG = "output.log"  # a job's stdout and stderr, in its run directory

log = logging.getLogger(__name__)


LOCAL_LAUNCHER = "hydra_plugins.llmexp_launchers.LocalLauncher"  # conf/hydra/launcher/local.yaml's _target_


def workers_problem(workers: Optional[int]) -> Optional[str]:
    """Why ``hydra.launcher.workers`` cannot run a sweep (the pool would wait forever), else None."""
    if workers is not None and workers < 1:
        return (f"hydra.launcher.workers={workers}: the number of jobs run at once must be at least 1; "
                "give a count, or null for one worker per usable core.")
    return None


class LocalLauncher(Launcher):
    def __init__(self, workers: Optional[int] = None, preload: Sequence[str] = ()) -> None:
        if problem := workers_problem(workers):
            raise ValueError(problem)
        self.workers = workers or usable_cores()
        self.preload = list(preload)
        self.pool: Optional[WarmWorkers] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        self.pool = WarmWorkers(self.workers, self._run, self.preload)
        self.pool.start()  # the workers import while Hydra composes and checks the sweep

    def _run(self, job: Tuple[int, List[str]]) -> JobReturn:
        """One job, in a worker: composed and run as the basic launcher does, its output in its own log."""
        num, overrides = job
        setup_globals()
        sweep_config = _job_config(self.hydra_context, self.config, num, overrides)
        run_dir = _run_dir(sweep_config)
        run_dir.mkdir(parents=True, exist_ok=True)
        with _output_to(run_dir / OUTPUT_LOG):
            done = run_job(
                hydra_context=self.hydra_context, task_function=self.task_function, config=sweep_config,
                job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir",
            )
            if done.status == JobStatus.FAILED:  # the error goes back for Hydra to raise; its traceback stays here
                error = done._return_value
                traceback.print_exception(error)
                try:
                    pickle.dumps(error)
                except Exception:  # an error holding what cannot cross processes: its type and message do
                    done.return_value = RuntimeError(f"{type(error).__name__}: {error}")
        return done

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.pool is not None and self.config is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs on {self.workers} warm workers "
                 f"({', '.join(f'worker {i}: cores {_cpus(self.pool.cpus(i))}' for i in range(self.workers))})")
        jobs = [(initial_job_idx + i, list(overrides)) for i, overrides in enumerate(job_overrides)]
        for num, overrides in jobs:
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
        ended = iter(range(1, len(jobs) + 1))
        try:
            outcomes = self.pool.map(jobs, done=lambda outcome: self._report(outcome, next(ended), len(jobs)))
        finally:
            self.pool.close()
        return [outcome.value if outcome.died is None else self._record_death(outcome) for outcome in outcomes]

    def _report(self, outcome: Outcome, count: int, total: int) -> None:
        """One console line per job as it ends: its outcome, how long it took, and where its output is."""
        num, overrides = outcome.job
        where = f"worker {outcome.worker}, {outcome.seconds:.1f} s"
        if outcome.died is not None:
            status = f"failed ({outcome.died})"
        elif outcome.value.status == JobStatus.FAILED:
            status = f"failed ({outcome.value._return_value})"
        else:
            status, run_dir = outcome.value.return_value, outcome.value.hydra_cfg.hydra.runtime.output_dir
            if status in ("failed", "skipped"):
                status = f"{status} ({_reason(run_dir)})"
            where += f"; output: {Path(run_dir) / OUTPUT_LOG}"
        console.err.print(f"[{count}/{total}] #{num} {' '.join(filter_overrides(overrides))}: {status} ({where})",
                          highlight=False, soft_wrap=True)

    def _record_death(self, outcome: Outcome) -> JobReturn:
        """A job whose worker died: failed in its results.json (made, with its .hydra record, if it had none yet)."""
        num, overrides = outcome.job
        sweep_config = _job_config(self.hydra_context, self.config, num, overrides)
        run_dir = _run_dir(sweep_config)
        task_config = OmegaConf.masked_copy(sweep_config, [key for key in sweep_config if key != "hydra"])
        try:
            record = RunRecord.load(run_dir)
        except (OSError, ValueError, KeyError):
            record = RunRecord.start(run_dir, task_config)
        if not (run_dir / ".hydra" / "hydra.yaml").is_file():  # how the sweep's table finds its jobs
            hydra_dir = run_dir / str(sweep_config.hydra.output_subdir or ".hydra")
            hydra_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.create({"hydra": sweep_config.hydra}), hydra_dir / "hydra.yaml")
            OmegaConf.save(sweep_config.hydra.overrides.task, hydra_dir / "overrides.yaml")
        record.finish("failed", outcome.died).write()
        return JobReturn(overrides=list(filter_overrides(overrides)), cfg=task_config, hydra_cfg=sweep_config,
                         working_dir=str(run_dir), status=JobStatus.COMPLETED, _return_value="failed")


def _job_config(hydra_context: HydraContext, config: DictConfig, num: int, overrides: List[str]) -> DictConfig:
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = num
        sweep_config.hydra.job.num = num
    return sweep_config


def _run_dir(sweep_config: DictConfig) -> Path:
    return (Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)).absolute()


def _reason(run_dir: str) -> str:
    try:
        return read_results(run_dir).get("reason") or "no reason recorded"
    except (OSError, ValueError):
        return "no results.json"


def _cpus(cpus: List[int]) -> str:
    return ",".join(str(cpu) for cpu in cpus)


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr to ``path`` (the file descriptors: native libraries' output too)."""
    saved = []
    with open(path, "a") as log_file:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            saved.append(os.dup(stream.fileno()))
            os.dup2(log_file.fileno(), stream.fileno())
        try:
            yield
        finally:
            for stream, fd in zip((sys.stdout, sys.stderr), saved):
                stream.flush()
                os.dup2(fd, stream.fileno())
                os.close(fd)
