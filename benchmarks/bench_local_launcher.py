"""A local multirun of short jobs: Hydra's joblib launcher (parallel) vs its basic launcher (sequential).

Run from anywhere (the sweeps run in a temporary directory)::

    python benchmarks/bench_local_launcher.py            # 8 jobs, 2 workers, 2 rounds
    python benchmarks/bench_local_launcher.py --jobs 8 --workers 2 --rounds 3 --steps 40

What is compared
----------------
The same sweep, ``llmexp -m seed=0..7`` with a short training job per point
(``technique.max_steps``, a small evaluation), run as one ``llmexp`` process each way:

* **sequential**: Hydra's basic launcher, the default: the jobs run one after another in the
  llmexp process, torch using every core for each.
* **parallel**: ``hydra/launcher=joblib hydra.launcher.n_jobs=<workers>``: Hydra's joblib
  launcher runs the jobs in ``workers`` loky processes, and loky gives each worker
  cores // workers threads, so the jobs do not fight over cores.

Both are timed wall-clock from spawn to exit, imports and start-up included (the parallel
side pays them once per worker). The two ways alternate, their order swapping each round;
the headline is median(sequential) / median(parallel), target >= 1.7 on 2 cores. The jobs'
training tokens/s show the ceiling: a sequential job's torch already uses every core, so
running ``workers`` jobs at once gains only what one thread per job does better than all
threads on one job. Every job
of both must end ``completed`` with the same final loss for the same seed (exit 1 otherwise):
a launcher must not change what a job computes.
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
from typing import Dict, List

from machine_load import OtherLoad, describe

TARGET_RATIO = 1.7


def job(steps: int) -> List[str]:
    """A short train-then-evaluate job of ``steps`` optimiser steps."""
    return [
        "pipeline=technique_then_evaluation",
        f"technique.max_steps={steps}",
        "technique.checkpoint_every=0",
        "technique.save_model=false",
        "evaluation.limit=16",
    ]


def sweep(workdir: Path, jobs: int, workers: int, steps: int, parallel: bool) -> Dict[str, object]:
    """One ``llmexp -m`` sweep: its wall time, each job's final loss by seed, the jobs' median training tokens/s."""
    out = workdir / ("parallel" if parallel else "sequential")
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={workers}"] if parallel else []
    seeds = ",".join(str(seed) for seed in range(jobs))
    command = [sys.executable, "-m", "llmexp", "-m", *job(steps), f"seed={seeds}", *launcher, f"hydra.sweep.dir={out}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    losses, speeds = {}, []
    for results in sorted(out.glob("*/results.json")):
        record = json.loads(results.read_text())
        if record["status"] != "completed":
            sys.exit(f"{results}: {record['status']} ({record.get('reason')})")
        metrics = record["stages"]["pretrain"]["metrics"]
        losses[record["config"]["seed"]] = metrics["final_loss"]
        speeds.append(metrics["tokens_per_s"])
    if len(losses) != jobs:
        sys.exit(f"{out}: {len(losses)} results for {jobs} jobs")
    return {"seconds": seconds, "losses": losses, "tokens_per_s": statistics.median(speeds)}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="training steps per job")
    args = parser.parse_args(argv)

    times: Dict[bool, List[float]] = {False: [], True: []}
    speeds: Dict[bool, List[float]] = {False: [], True: []}
    losses: Dict[bool, Dict[int, float]] = {}
    load = OtherLoad().start()
    with tempfile.TemporaryDirectory(prefix="bench-launcher-") as tmp:
        for round_ in range(args.rounds):
            for parallel in ((False, True) if round_ % 2 == 0 else (True, False)):
                workdir = Path(tmp) / f"round{round_}"
                workdir.mkdir(exist_ok=True)
                result = sweep(workdir, args.jobs, args.workers, args.steps, parallel)
                times[parallel].append(result["seconds"])
                speeds[parallel].append(result["tokens_per_s"])
                losses[parallel] = result["losses"]
                name = "parallel  " if parallel else "sequential"
                print(f"round {round_ + 1}: {name} {result['seconds']:6.1f} s", flush=True)
    mismatched = {s: (losses[False][s], losses[True][s]) for s in losses[False] if losses[False][s] != losses[True][s]}
    sequential, parallel = statistics.median(times[False]), statistics.median(times[True])
    ratio = sequential / parallel
    print(f"\n{args.jobs} jobs ({' '.join(job(args.steps))}), {args.workers} workers, {args.rounds} rounds")
    print(f"sequential (basic launcher):   {sequential:6.1f} s  ({sequential / args.jobs:.1f} s per job)")
    print(f"parallel (joblib, {args.workers} workers):  {parallel:6.1f} s  ({parallel / args.jobs:.1f} s per job)")
    verdict = "PASS" if ratio >= TARGET_RATIO else "MISS"
    print(f"speed-up sequential / parallel: {ratio:.2f}x  (target >= {TARGET_RATIO}: {verdict})")
    # Each parallel job trains on cores // workers threads while the others run; a sequential
    # job has every core. The parallel side's training can be at most workers x its per-job
    # speed over the sequential per-job speed faster: the ceiling the training time allows.
    ceiling = args.workers * statistics.median(speeds[True]) / statistics.median(speeds[False])
    print(f"training tokens/s per job: sequential {statistics.median(speeds[False]):,.0f}, "
          f"parallel {statistics.median(speeds[True]):,.0f} -> ceiling of the speed-up from training: {ceiling:.2f}x")
    print(f"other processes kept {describe(load.cores())} of {os.cpu_count()} cores busy meanwhile")
    if mismatched:
        print(f"final losses differ between the launchers (seed: sequential, parallel): {mismatched}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
