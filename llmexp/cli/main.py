"""The ``llmexp`` command: subcommands (``plan``, ``plugins``, ``gather``, ``cancel``, ``report``, ``serve``, ``cp``) or a Hydra run/multirun.

Before Hydra creates any output directory, every point of the invocation is composed and
a plain run is planned, so bad input (unknown option, misspelled key, wrong type,
infeasible plan) ends with one paragraph and exit code 2, having written nothing.

``plan`` is this module's own pre-flight, so it is imported here; every other subcommand's module, and the
runner, are imported when chosen: ``llmexp plan`` answers in well under a second without loading the runner or
the server.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from llmexp.cli import plan as plan_command
from llmexp.configuration.compose import (
    CONFIG_NAME, compose_config, implied_pipeline, register_configs, sweep_points, with_implied_pipeline,
)
from llmexp.configuration.secrets import secrets_to_environment
from llmexp.display import console, progress
from llmexp.errors import EXIT_USER_ERROR, UserError
from llmexp.launchers.local import LOCAL_LAUNCHER, workers_problem
from llmexp.launchers.placement import launcher_problem
from llmexp.planning.planner import make_plan
from llmexp.results.record import RunRecord
from llmexp.training.distributed import RankFailed, local_start_problem, run_job


def _plugins(argv: List[str]) -> int:
    from llmexp.cli.plugins import main

    return main(argv)


def _gather(argv: List[str]) -> int:
    from llmexp.cli.gather import main

    return main(argv)


def _cancel(argv: List[str]) -> int:
    from llmexp.cli.cancel import main

    return main(argv)


def _report(argv: List[str]) -> int:
    from llmexp.cli.report import main

    return main(argv)


def _serve(argv: List[str]) -> int:
    from llmexp.cli.serve import main

    return main(argv)


def _cp(argv: List[str]) -> int:
    from llmexp.cli.cp import main

    return main(argv)


SUBCOMMANDS: Dict[str, Callable[[List[str]], int]] = {
    "plan": plan_command.main, "plugins": _plugins, "gather": _gather, "cancel": _cancel, "report": _report,
    "serve": _serve, "cp": _cp,
}

# Every multirun ends with jobs.json, the jobs table and the sweep's exit code (launchers.sweep_jobs);
# Hydra's callbacks are its hook for the end of a multirun, and a run without -m never calls it.
SWEEP_SUMMARY = ["+hydra.callbacks.sweep_summary._target_=llmexp.launchers.sweep_jobs.SweepSummary"]


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            sys.exit(SUBCOMMANDS[argv[0]](argv[1:]))
        argv = secrets_to_environment(argv)  # before Hydra, the trackers or the console record the command line
        register_configs()
        preflight(argv)
    except UserError as error:
        console.error(str(error))
        sys.exit(EXIT_USER_ERROR)
    sys.argv = [sys.argv[0], *with_implied_pipeline(argv), *rank_overrides(), *SWEEP_SUMMARY]
    register_launchers()
    hydra_entry()


def rank_overrides() -> List[str]:
    """Under torchrun (a Kubernetes pod, a user's own launch) every rank runs this command: only rank 0 keeps the
    run's ``.hydra`` record (secrets redacted), as the Slurm launcher's job side does, so ranks never write it twice."""
    return ["hydra.output_subdir=null"] if os.environ.get("RANK", "0") != "0" else []


def register_launchers() -> None:
    """Make llmexp's launchers (slurm, kubernetes, local) known to Hydra even when its plugin scan cannot see them.

    Hydra finds launchers by walking the ``hydra_plugins`` namespace package, which an
    editable install (``pip install -e .``) serves through an import hook the walk skips.
    """
    from hydra.core.plugins import Plugins
    from hydra_plugins.llmexp_launchers import KubernetesLauncher, LocalLauncher, SlurmLauncher

    for launcher in (SlurmLauncher, KubernetesLauncher, LocalLauncher):
        Plugins.instance().register(launcher)


def preflight(argv: List[str]) -> None:
    """Compose every job of this invocation and plan a plain run; raise ``UserError`` on bad input."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_path:
        return  # Hydra answers these itself
    progress.interval_s()  # a bad LLMEXP_PROGRESS_INTERVAL stops the run before anything is written
    config_name, config_dir = args.config_name or CONFIG_NAME, args.config_dir
    points = sweep_points(args.overrides, config_name, config_dir) if args.multirun else [args.overrides]
    for overrides in points:
        cfg = compose_config(overrides, config_name, config_dir)
        launcher = HydraConfig.get().launcher
        if problem := launcher_problem(launcher._target_, cfg):  # a cluster launcher without its profile or extra
            raise UserError(problem)
        if launcher._target_ == LOCAL_LAUNCHER and (problem := workers_problem(launcher.get("workers"))):
            raise UserError(problem)
    if not args.multirun and args.cfg is None:  # a multirun records such a point as skipped and goes on
        plan = make_plan(cfg)
        problems = list(plan.problems)
        if problem := local_start_problem(cfg):
            problems.append(problem)
        if problems:
            raise UserError(" ".join(problems))
        console.note("running:" + plan_command.planned(cfg, implied_pipeline(argv, config_name)).removeprefix("planned:"))
        for warning in plan.warnings:
            console.warn(warning)


@hydra.main(version_base="1.3", config_path="pkg://llmexp.conf", config_name=CONFIG_NAME)
def hydra_entry(cfg: DictConfig) -> Optional[str]:
    """One job: on every rank its parallelism asks for (``llmexp.training.distributed`` starts them when no launcher did).

    Returns the run's status (``completed``, ``skipped``, ``failed``; ``running`` on ranks
    other than 0, which record nothing). In a multirun, a job whose ranks failed is reported
    and the sweep goes on; its rank 0 recorded the failure in the job's results.json when it could.
    """
    from llmexp.running.runner import run_experiment

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if multirun and (problem := local_start_problem(cfg)):
        RunRecord.start(run_dir, cfg).finish("skipped", problem).write()
        console.warn(f"skipped: {run_dir}: {problem}")
        return "skipped"
    try:
        return run_job(cfg, run_experiment, cfg, run_dir, multirun).status
    except (UserError, RankFailed) as error:
        if multirun:
            console.warn(f"failed: {run_dir}: {error}")
            return "failed"
        if isinstance(error, UserError):
            console.error(str(error))
            sys.exit(EXIT_USER_ERROR)
        raise


if __name__ == "__main__":
    main()
