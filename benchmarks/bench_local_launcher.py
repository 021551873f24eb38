"""A local multirun of short jobs: llmexp's warm-worker launcher (and Hydra's joblib launcher) vs Hydra's sequential one.

Run from anywhere (the sweeps run in a temporary directory)::

    python benchmarks/bench_local_launcher.py            # 8 jobs, 2 workers, 2 rounds
    python benchmarks/bench_local_launcher.py --jobs 8 --workers 2 --rounds 3 --steps 40

What is compared
----------------
The same sweep, ``llmexp -m seed=0..7`` with a short training job per point
(``technique.max_steps``, a small evaluation), run as one ``llmexp`` process each way:

* **sequential**: Hydra's basic launcher, the default: the jobs run one after another in the
  llmexp process, torch using every core for each.
* **local**: ``hydra/launcher=local hydra.launcher.workers=<workers>`` (``llmexp.launchers.local``):
  warm workers forked as Hydra sets the launcher up, each pinned to cores // workers cores and
  importing torch, transformers and lightning while the sweep is still being composed, then
  taking jobs as they come.
* **joblib**: ``hydra/launcher=joblib hydra.launcher.n_jobs=<workers>``: Hydra's joblib launcher,
  loky workers with cores // workers threads each, for reference.

Each is timed wall-clock from spawn to exit, imports and start-up included. The sides take
turns, their order rotating each round; the headline is median(sequential) / median(local),
target >= 1.7 on 2 cores. Every job of every side must end ``completed`` with the same final
loss for the same seed (exit 1 otherwise): a launcher must not change what a job computes.

What bounds the ratio is printed with it: each job's own wall time (results.json, from its
first record to its last) and its training tokens/s, sequential (all cores, alone) and local
(its share, beside the other workers' jobs); ``workers`` x their ratio is what the jobs
themselves allow, and the rest of each side's time is start-up, dispatch and exit.
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


LAUNCHERS = {
    "sequential": lambda workers: [],
    "local": lambda workers: ["hydra/launcher=local", f"hydra.launcher.workers={workers}"],
    "joblib": lambda workers: ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={workers}"],
}


def sweep(workdir: Path, jobs: int, workers: int, steps: int, side: str) -> Dict[str, object]:
    """One ``llmexp -m`` sweep: its wall time, each job's final loss by seed, the jobs' median wall time and training tokens/s."""
    out = workdir / side
    seeds = ",".join(str(seed) for seed in range(jobs))
    command = [sys.executable, "-m", "llmexp", "-m", *job(steps), f"seed={seeds}", *LAUNCHERS[side](workers),
               f"hydra.sweep.dir={out}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    losses, speeds, walls = {}, [], []
    for results in sorted(out.glob("*/results.json")):
        record = json.loads(results.read_text())
        if record["status"] != "completed":
            sys.exit(f"{results}: {record['status']} ({record.get('reason')})")
        metrics = record["stages"]["pretrain"]["metrics"]
        losses[record["config"]["seed"]] = metrics["final_loss"]
        speeds.append(metrics["tokens_per_s"])
        walls.append(record["wall_time_s"])
    if len(losses) != jobs:
        sys.exit(f"{out}: {len(losses)} results for {jobs} jobs")
    return {"seconds": seconds, "losses": losses, "tokens_per_s": statistics.median(speeds),
            "job_s": statistics.median(walls), "jobs_s": sum(walls)}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="training steps per job")
    parser.add_argument("--sides", default="sequential,local,joblib", help="which launchers, comma-separated")
    args = parser.parse_args(argv)
    sides = args.sides.split(",")

    runs: Dict[str, List[Dict[str, object]]] = {side: [] for side in sides}
    load = OtherLoad().start()
    with tempfile.TemporaryDirectory(prefix="bench-launcher-") as tmp:
        for round_ in range(args.rounds):
            for side in sides[round_ % len(sides):] + sides[:round_ % len(sides)]:
                workdir = Path(tmp) / f"round{round_}"
                workdir.mkdir(exist_ok=True)
                runs[side].append(sweep(workdir, args.jobs, args.workers, args.steps, side))
                print(f"round {round_ + 1}: {side:10s} {runs[side][-1]['seconds']:6.1f} s", flush=True)

    def median(side: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[side])

    print(f"\n{args.jobs} jobs ({' '.join(job(args.steps))}), {args.workers} workers, {args.rounds} rounds")
    for side in sides:
        seconds = median(side, "seconds")
        outside = seconds - median(side, "jobs_s") / (1 if side == "sequential" else args.workers)
        print(f"{side:10s} {seconds:6.1f} s  ({seconds / args.jobs:.1f} s per job; a job {median(side, 'job_s'):.2f} s "
              f"median, training {median(side, 'tokens_per_s'):,.0f} tokens/s; outside the jobs {outside:.1f} s)")
    code = 0
    if "sequential" in sides:
        sequential = median("sequential", "seconds")
        for side in [other for other in sides if other != "sequential"]:
            ratio = sequential / median(side, "seconds")
            verdict = f"  (target >= {TARGET_RATIO}: {'PASS' if ratio >= TARGET_RATIO else 'MISS'})" if side == "local" else ""
            print(f"speed-up sequential / {side}: {ratio:.2f}x{verdict}")
            # A job of the parallel side runs on its share of the cores beside the others; a sequential job
            # has every core. If start-up and exit cost nothing, the sweep could be at most workers x
            # (sequential job time / parallel job time) faster; the same for the training alone.
            jobs_bound = args.workers * median("sequential", "job_s") / median(side, "job_s")
            training_bound = args.workers * median(side, "tokens_per_s") / median("sequential", "tokens_per_s")
            print(f"  bound from the jobs themselves: {jobs_bound:.2f}x (from their training alone: {training_bound:.2f}x)")
            mismatched = {seed: (loss, runs[side][-1]["losses"][seed])
                          for seed, loss in runs["sequential"][-1]["losses"].items()
                          if loss != runs[side][-1]["losses"][seed]}
            if mismatched:
                print(f"  final losses differ from the sequential ones (seed: sequential, {side}): {mismatched}")
                code = 1
    print(f"other processes kept {describe(load.cores())} of {os.cpu_count()} cores busy meanwhile")
    return code


if __name__ == "__main__":
    sys.exit(main())
