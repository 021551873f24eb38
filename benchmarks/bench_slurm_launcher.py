"""10 short jobs on the localhost Slurm: ``hydra/launcher=slurm`` vs plain ``sbatch --wrap`` in a loop.

Run as root (the local Slurm's daemons run as root). A cluster already running is used and
left running; otherwise the script starts one and stops it at the end (stop.sh leaves the
machine as it was)::

    python benchmarks/bench_slurm_launcher.py              # 10 jobs, 2 rounds
    python benchmarks/bench_slurm_launcher.py --jobs 10 --rounds 3

What is compared
----------------
The same job, ``llmexp technique=evaluate`` of the untrained embedded model on one item (start-up
and imports are most of it), ``--jobs`` times with seeds 0..n-1:

* **launcher**: one ``llmexp -m hydra/launcher=slurm cluster=localhost hardware=cpu seed=0,...``:
  composing and planning every point, one job array through submitit, waiting for each
  result, jobs.json and the table.
* **sbatch loop**: what one would write by hand: ``sbatch --parsable --wrap "python -m llmexp
  ... seed=i"`` per job, then polling ``squeue`` every 0.2 s until none is left. No planning,
  no outcome per job beyond what Slurm knows.

Both are timed wall-clock from the first command to the last job's end, alternating, the
order swapping each round. The headline is the launcher's extra time per job:
(median launcher - median loop) / jobs. Every job of both must have written a completed
results.json (exit 1 otherwise).

A dead job
----------
``--dead-job-rounds`` (default 2) times, a job is cancelled (``scancel``) after it has run for
``--dead-after`` seconds (default 20), and the time from the cancel to the moment it is reported
is measured:

* **launcher**: a one-job sweep of a long training run; until the sweep exits with code 1.
* **submitit**: what waiting through submitit gives (``job.done()`` every second while the job
  runs, as ``submitit.helpers.as_completed`` does, then ``job.result()``): it calls ``sacct``
  at an interval growing with the time since the submission, then waits 15 s for a result file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

from machine_load import OtherLoad, describe

from llmexp.launchers.slurm_localhost import localhost_slurm


def tiny_checkpoint(workdir: Path) -> Path:
    """The embedded default's model, untrained (``technique.max_steps=0`` saves the starting model)."""
    run = workdir / "checkpoint"
    command = [sys.executable, "-m", "llmexp", "technique=pretrain", "technique.max_steps=0", "evaluation.limit=1",
               "evaluation.tasks=[perplexity]", f"hydra.run.dir={run}"]
    subprocess.run(command, cwd=workdir, capture_output=True, check=True)
    return run / "pretrain" / "model"


def job(checkpoint: Path) -> List[str]:
    return ["technique=evaluate", f"model.path={checkpoint}", "technique.tasks=[perplexity]", "technique.limit=1"]


def through_launcher(workdir: Path, checkpoint: Path, jobs: int) -> float:
    sweep = workdir / "launcher"
    seeds = ",".join(str(seed) for seed in range(jobs))
    command = [sys.executable, "-m", "llmexp", "-m", "hydra/launcher=slurm", "cluster=localhost", "hardware=cpu",
               *job(checkpoint), f"seed={seeds}", f"hydra.sweep.dir={sweep}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the launcher sweep failed:\n{done.stderr[-3000:]}")
    check(sweep, jobs)
    return seconds


def sbatch_loop(workdir: Path, checkpoint: Path, jobs: int) -> float:
    out = workdir / "sbatch"
    start = time.perf_counter()
    ids = []
    for seed in range(jobs):
        line = " ".join([sys.executable, "-m", "llmexp", *job(checkpoint), f"seed={seed}", f"hydra.run.dir={out / str(seed)}"])
        submitted = subprocess.run(
            ["sbatch", "--parsable", "--partition=debug", "--ntasks=1", "--cpus-per-task=1",
             f"--output={workdir}/sbatch-%j.out", f"--wrap={line}"],
            cwd=workdir, capture_output=True, text=True, check=True,
        )
        ids.append(submitted.stdout.strip())
    while subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True).stdout.strip():
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    check(out, jobs)
    return seconds


def launcher_notices(workdir: Path, dead_after: float) -> float:
    """Seconds from ``scancel`` of a running sweep job to the sweep's exit (code 1: failed)."""
    sweep = workdir / "dead-launcher"
    command = [sys.executable, "-m", "llmexp", "-m", "hydra/launcher=slurm", "cluster=localhost", "hardware=cpu",
               "technique.max_steps=2000", f"hydra.sweep.dir={sweep}"]
    sweep_process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (sweep / "0" / "results.json").is_file():  # the job runs
        if sweep_process.poll() is not None:
            sys.exit(f"the sweep ended (exit code {sweep_process.returncode}) before its job started: {' '.join(command)}")
        time.sleep(0.2)
    time.sleep(dead_after)
    (entry,) = json.loads((sweep / "jobs.json").read_text())
    cancelled = time.perf_counter()
    subprocess.run(["scancel", entry["slurm_job_id"]], check=True)
    if sweep_process.wait() != 1:
        sys.exit(f"the sweep of a cancelled job exited {sweep_process.returncode}, not 1")
    return time.perf_counter() - cancelled


def submitit_notices(workdir: Path, dead_after: float) -> float:
    """Seconds from ``scancel`` of a running submitit job to ``job.result()`` raising."""
    import submitit

    executor = submitit.SlurmExecutor(folder=workdir / "dead-submitit" / "%j")
    executor.update_parameters(partition="debug", time=60)
    submitted = executor.submit(time.sleep, 3600)
    while "RUNNING" not in subprocess.run(["squeue", "-h", "-j", submitted.job_id, "-o", "%T"],
                                          capture_output=True, text=True).stdout:
        time.sleep(0.2)
    running_until = time.perf_counter() + dead_after
    while time.perf_counter() < running_until:  # a waiting sweep asks all along, as submitit.helpers.as_completed does
        submitted.done()
        time.sleep(1)
    cancelled = time.perf_counter()
    subprocess.run(["scancel", submitted.job_id], check=True)
    while not submitted.done():
        time.sleep(1)
    try:
        submitted.result()
    except submitit.core.utils.UncompletedJobError:
        return time.perf_counter() - cancelled
    sys.exit("a cancelled submitit job returned a result")


def check(directory: Path, jobs: int) -> None:
    statuses = [json.loads(p.read_text())["status"] for p in directory.glob("*/results.json")]
    if statuses != ["completed"] * jobs:
        sys.exit(f"{directory}: {jobs} completed jobs expected, found {statuses}")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dead-job-rounds", type=int, default=2)
    parser.add_argument("--dead-after", type=float, default=20.0, help="seconds a job runs before it is cancelled")
    args = parser.parse_args(argv)
    with localhost_slurm() as environment:
        os.environ.update(environment)
        return measure(args)


def measure(args) -> int:
    times = {"launcher": [], "sbatch loop": []}
    load = OtherLoad().start()
    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as tmp:
        checkpoint = tiny_checkpoint(Path(tmp))
        for round_ in range(args.rounds):
            order = ("launcher", "sbatch loop") if round_ % 2 == 0 else ("sbatch loop", "launcher")
            for side in order:
                workdir = Path(tmp) / f"round{round_}-{side.replace(' ', '-')}"
                workdir.mkdir()
                run = through_launcher if side == "launcher" else sbatch_loop
                times[side].append(run(workdir, checkpoint, args.jobs))
                print(f"round {round_ + 1}: {side:11s} {times[side][-1]:6.1f} s", flush=True)
    launcher, loop = statistics.median(times["launcher"]), statistics.median(times["sbatch loop"])
    print(f"\n{args.jobs} jobs ({' '.join(job(Path('<tiny>')))}), {args.rounds} rounds, medians:")
    print(f"hydra/launcher=slurm:  {launcher:6.1f} s  ({launcher / args.jobs:.2f} s per job)")
    print(f"sbatch --wrap loop:    {loop:6.1f} s  ({loop / args.jobs:.2f} s per job)")
    print(f"launcher overhead: {(launcher - loop) / args.jobs:+.2f} s per job; launcher / loop = {launcher / loop:.2f}x")
    noticed = {"launcher": [], "submitit": []}
    with tempfile.TemporaryDirectory(prefix="bench-slurm-dead-") as tmp:
        for round_ in range(args.dead_job_rounds):
            for side, notices in (("launcher", launcher_notices), ("submitit", submitit_notices)):
                workdir = Path(tmp) / f"round{round_}"
                workdir.mkdir(exist_ok=True)
                noticed[side].append(notices(workdir, args.dead_after))
                print(f"dead job, round {round_ + 1}: {side:8s} noticed it {noticed[side][-1]:5.1f} s after scancel", flush=True)
    if args.dead_job_rounds:
        print(f"a job cancelled after {args.dead_after:g} s of running is reported, median of {args.dead_job_rounds}: "
              f"launcher {statistics.median(noticed['launcher']):.1f} s, "
              f"submitit's own wait {statistics.median(noticed['submitit']):.1f} s")
    print(f"other processes kept {describe(load.cores())} of {os.cpu_count()} cores busy meanwhile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
