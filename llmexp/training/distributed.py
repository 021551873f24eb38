"""The process group of a job: which rank this process is, and starting the ranks when no launcher did.

A job whose ``parallelism`` asks for tp*pp*dp > 1 ranks runs as that many processes, each running
the same job. They learn who they are from the torchrun-style environment: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. Under
torchrun, or a cluster launcher that exports these (the Slurm launcher does, from Slurm's own
variables), every process is a rank already. Run locally without them, ``run_job`` starts the
ranks itself through torch's elastic launcher (what torchrun runs, here on 127.0.0.1 and a free
port), waits for them, and hands back rank 0's result; a rank's ``UserError`` keeps exit code 2 and
its message, any other failure carries the failed rank's traceback.

Rank 0 does every write of a run; the others train alongside it and wait while it runs the
stages that do not train (``llmexp.running.runner``). Those it runs alone, with no process group in the
process: a library that finds one (ModelOpt's calibration syncs statistics over it) would wait
for ranks that are not taking part. Rank 0 tells the others what they need through the job's
rendezvous store, which outlives the process groups. Nothing here imports torch until a job
runs on more than one rank.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

from llmexp.machine import cpu_threads, ranks
from llmexp.machine.ranks import Ranks, is_rank_zero, local_world_size, rank, world_size  # noqa: F401 (this module's face)
from llmexp.errors import EXIT_USER_ERROR, UserError

T = TypeVar("T")

# Rank 0 alone runs the stages that do not train (evaluating or quantizing a large model takes hours)
# while the other ranks wait for what it made: their waits get this long, not the collectives' 30 minutes.
RANK_ZERO_STAGE_TIMEOUT = timedelta(hours=24)


def world_size_of(parallelism) -> int:
    """How many processes ``parallelism`` runs as: tp * pp * dp."""
    return int(parallelism.tp) * int(parallelism.pp) * int(parallelism.dp)






def decided_by_rank_zero(decide: Callable[[], T]) -> T:
    """``decide()`` on rank 0, its value on every rank; only rank 0 calls ``decide``.

    The other ranks wait for it (up to ``RANK_ZERO_STAGE_TIMEOUT``); when ``decide`` raises,
    they raise ``RankFailed`` and rank 0 the error itself.
    """
    if ranks.current.world_size == 1:
        return decide()
    key = f"llmexp/rank0/{next(ranks.current.messages)}"
    if ranks.current.rank != 0:
        ok, value = pickle.loads(ranks.current.store.get(key))
        if not ok:
            raise RankFailed(f"rank 0 failed, so rank {ranks.current.rank} stops too: {value}")
        return value
    try:
        value = decide()
    except BaseException as error:
        ranks.current.store.set(key, pickle.dumps((False, f"{type(error).__name__}: {error}")))
        raise
    ranks.current.store.set(key, pickle.dumps((True, value)))
    return value


@contextmanager
def rank_zero_alone() -> Iterator[None]:
    """For a stage rank 0 runs alone: no process group on any rank while it runs; the others wait for it.

    Every rank enters; rank 0 runs the block, the others skip it (their block does nothing)
    and wait. Afterwards all join a new process group, for the training stages after it.
    """
    if ranks.current.world_size == 1:
        yield
        return
    import torch.distributed as dist

    dist.destroy_process_group()
    outcome: list = []
    try:
        yield
    except BaseException as error:
        outcome.append(error)
    decided_by_rank_zero(lambda: _reraise(outcome))
    _join_process_group()


def _reraise(outcome: list) -> None:
    if outcome:
        raise outcome[0]


def run_job(config, job: Callable[..., T], *args: Any) -> T:
    """``job(*args)`` on every rank of ``config.parallelism``; rank 0's return value.

    In an environment that already names the ranks (torchrun, a cluster launcher), this
    process is one of them: it joins the process group and runs ``job``. Otherwise a
    single-rank job runs here, and a larger one starts its ranks on this machine.
    """
    wanted = world_size_of(config.parallelism)
    if "WORLD_SIZE" in os.environ:
        given = int(os.environ["WORLD_SIZE"])
        if given != wanted:
            raise UserError(
                f"parallelism={config.parallelism.name} runs as tp*pp*dp = {wanted} processes, but this job was "
                f"started as WORLD_SIZE={given} processes; start it with {wanted} tasks (or without a launcher, "
                f"and llmexp starts them), or choose a parallelism whose tp*pp*dp is {given}."
            )
        if wanted == 1:
            cpu_threads.use_share_of_cores()
            return job(*args)
        return _as_rank(config.hardware.accelerator, job, args)
    if wanted == 1:
        cpu_threads.use_share_of_cores()
        return job(*args)
    return _start_ranks(config, wanted, job, args)


def local_start_problem(config) -> Optional[str]:
    """Why this machine cannot start the job's ranks itself (they span several nodes), else None.

    Checked before anything runs when no cluster launcher will start the job, and again here.
    """
    p = config.parallelism
    if p.nodes <= 1 or "WORLD_SIZE" in os.environ:
        return None
    world = world_size_of(p)
    return (
        f"parallelism={p.name} spans parallelism.nodes={p.nodes} nodes, which a run on this machine cannot "
        f"give it; submit it through a cluster launcher (`llmexp -m hydra/launcher=slurm cluster=<profile> ...`), "
        f"or run all {world} ranks here with parallelism.nodes=1 parallelism.devices_per_node={world}."
    )


class RankFailed(RuntimeError):
    """A rank of a job started here failed with an error other than a ``UserError``; the message holds its traceback."""


def _start_ranks(config, world: int, job: Callable[..., T], args: Sequence) -> T:
    """Start ``world`` ranks on this machine as torchrun does, wait for them, and return rank 0's value.

    torch's elastic launcher starts them (a rendezvous on 127.0.0.1, a free port, the
    torchrun environment), stops the others as soon as one fails, and reports which rank
    failed first and why. Ranks other than 0 write their console output to its log
    directory, a temporary one removed afterwards: rank 0 speaks for the job.
    """
    problem = local_start_problem(config)
    if problem:
        raise UserError(problem)
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="llmexp-ranks-") as logs:
        launch = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=world,
            run_id=uuid.uuid4().hex,
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",  # port 0: the rendezvous store takes a free port, as `torchrun --standalone`
            local_addr="127.0.0.1",
            max_restarts=0,
            monitor_interval=0.1,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=logs, redirects={r: Std.ALL for r in range(1, world)}),
        )
        logging.disable(logging.ERROR)  # the launcher's log lines would repeat what the failure below says
        try:
            values = elastic_launch(launch, _rank_main)(config.hardware.accelerator, job, tuple(args))
        except ChildFailedError as error:
            user_errors = [f.message for f in error.failures.values() if f.exitcode == EXIT_USER_ERROR]
            if user_errors:  # the others stopped because of it
                raise UserError(user_errors[0]) from None
            failed_rank, failure = error.get_first_failure()
            raise RankFailed(f"rank {failed_rank} of parallelism={config.parallelism.name} failed:\n{_failure_text(failure)}") from None
        finally:
            logging.disable(logging.NOTSET)
    return values[0]


def _failure_text(failure) -> str:
    """The failed rank's traceback when it recorded one, else how it ended (exit code or signal)."""
    message = failure.error_file_data.get("message")
    if isinstance(message, dict):
        return message.get("extraInfo", {}).get("py_callstack") or message.get("message", "")
    return f"{failure.message} (exit code {failure.exitcode})"


def _rank_main(accelerator: str, job: Callable[..., T], args: Sequence) -> T:
    """A rank started by ``_start_ranks``: a ``UserError`` is recorded for the launching process, which prints it.

    Recorded in the launcher's error file (``TORCHELASTIC_ERROR_FILE``), in the form its
    ``ProcessFailure`` reads back as the message, and the rank exits with code 2.
    """
    try:
        return _as_rank(accelerator, job, args)
    except UserError as error:
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w", encoding="utf-8") as handle:
            json.dump({"message": str(error), "timestamp": int(time.time())}, handle)
        sys.exit(EXIT_USER_ERROR)


def _as_rank(accelerator: str, job: Callable[..., T], args: Sequence) -> T:
    """Join the job as the rank the environment names, run ``job``, leave.

    The rendezvous store (``env://``: torchrun's, or one rank 0 serves) carries rank 0's
    messages and each new process group's rendezvous.
    """
    import torch
    import torch.distributed as dist

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # Lightning's cluster environment reads the node from GROUP_RANK; submitit's export leaves it out.
    os.environ.setdefault("GROUP_RANK", str(int(os.environ["RANK"]) // local_world))
    cpu_threads.use_share_of_cores(local_world)
    if accelerator == "cpu":
        backend, device = "gloo", None
    else:
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", torch.device("cuda", local_rank)
    store, rank_, world = next(dist.rendezvous("env://"))
    store.set_timeout(RANK_ZERO_STAGE_TIMEOUT)
    ranks.current = Ranks(rank_, world, local_rank, local_world, store, backend, device)
    try:
        _join_process_group()
        return job(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        ranks.current = Ranks(0, 1, 0, 1)


def _join_process_group() -> None:
    import torch.distributed as dist

    prefix = f"llmexp/group/{next(ranks.current.groups)}/"
    dist.init_process_group(
        ranks.current.backend,
        store=dist.PrefixStore(prefix, ranks.current.store),
        rank=ranks.current.rank,
        world_size=ranks.current.world_size,
        device_id=ranks.current.device,
    )
