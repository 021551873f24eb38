"""Pipeline parallelism on 2 CPU cores: tokens/s of one process, dp2 and pp2 (GPipe, 1F1B), and the bubble.

Run from the repository root, with nothing else running (the lead runs it)::

    python benchmarks/bench_pipeline.py                                # 3 rounds of 100 steps per setting
    python benchmarks/bench_pipeline.py --steps 200 --micro-batches 8
    python benchmarks/bench_pipeline.py --steps 3 --rounds 1           # smoke test, ~2 minutes

What is compared
----------------
The same job, the embedded default's pretraining (``llmexp pipeline=technique_only technique.max_steps=N``, the
same global batch, data and seed), as a user runs it, a fresh ``llmexp`` process per measure, in four settings:

* *single*: ``parallelism=single``, one process on 2 threads (``OMP_NUM_THREADS=2``), the step's batch in one piece;
* *dp2*: ``parallelism=dp2``, 2 processes on 1 thread each (DDP, half the batch each);
* *pp2 gpipe* and *pp2 1f1b*: ``parallelism=pp2``, 2 processes on 1 thread each, 4 layers each, the step's batch
  cut into ``--micro-batches`` micro-batches (m), under ``parallelism.pipeline_schedule=gpipe`` and ``=1f1b``.

Rounds alternate the settings (their order rotating each round), so a busy machine slows all of them alike; the
headline is each setting's median tokens/s over the rounds (``tokens_per_s`` of results.json: the training's tokens
over ``fit()``'s wall time, every rank's tokens counted).

The bubble
----------
The schedule implies (pp-1)/(m+pp-1): each stage idles pp-1 of the m+pp-1 slots of a step while the pipeline fills
and drains, for GPipe and 1F1B alike. Measured: each pp rank times every call of its stage's
``forward_one_chunk`` and ``backward_one_chunk`` and the schedule's loss (its compute) within each
``schedule.step`` (the step's wall time, from the first receive to the last send), through a ``sitecustomize``
this benchmark puts on the ranks' ``PYTHONPATH``; it wraps those ``torch.distributed.pipelining`` methods and
changes nothing else. Measured bubble = 1 - compute / step wall time, over every step but each rank's first (the
stages exchange shapes then). It counts every wait, so it holds what the ideal leaves out: the time on the wire
(gloo over loopback), the last stage's extra work (final norm, LM head, loss) that the first waits for, and the
scheduling's own Python; the optimiser step and the gradient exchange fall outside ``schedule.step`` and count
in neither. The job's losses are printed per setting: single, dp2 and pp2 train the same batches.
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
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_load import OtherLoad, describe  # noqa: E402

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
TIMES = "BENCH_PIPELINE_TIMES"  # where each pp rank appends its steps' timings, one JSON line a step

# Put on the ranks' PYTHONPATH: wraps the pipeline stage's compute and the schedule's step with timers.
SITECUSTOMIZE = '''
import importlib.abc, importlib.machinery, json, os, sys, time

_OUT = os.environ.get("%(times)s")


def _instrument(schedules):
    import torch.distributed as dist

    stage_base = sys.modules["torch.distributed.pipelining.stage"]._PipelineStageBase
    busy = [0.0]

    def timed(function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                busy[0] += time.perf_counter() - start
        return wrapper

    stage_base.forward_one_chunk = timed(stage_base.forward_one_chunk)
    stage_base.backward_one_chunk = timed(stage_base.backward_one_chunk)
    schedules._PipelineSchedule._maybe_compute_loss = timed(schedules._PipelineSchedule._maybe_compute_loss)
    step = schedules.PipelineScheduleSingle.step

    def timed_step(self, *args, **kwargs):
        busy[0] = 0.0
        start = time.perf_counter()
        result = step(self, *args, **kwargs)
        wall = time.perf_counter() - start
        with open(os.path.join(_OUT, "%%d.jsonl" %% os.getpid()), "a") as handle:
            handle.write(json.dumps({"rank": dist.get_rank(), "stage": self._stage.stage_index, "step_s": wall,
                                     "compute_s": busy[0]}) + "\\n")
        return result

    schedules.PipelineScheduleSingle.step = timed_step


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch.distributed.pipelining.schedules":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _instrument(module)

        spec.loader.exec_module = exec_module
        return spec


if _OUT:
    sys.meta_path.insert(0, _Finder())
''' % {"times": TIMES}


def settings(micro_batches: int, global_batch: int) -> Dict[str, Dict]:
    """Each setting's overrides and threads per process."""
    pp = [f"parallelism.micro_batch={global_batch // micro_batches}", f"parallelism.global_batch={global_batch}"]
    return {
        "single": {"threads": 2, "overrides": ["parallelism=single", f"parallelism.micro_batch={global_batch}",
                                                f"parallelism.global_batch={global_batch}"]},
        "dp2": {"threads": 1, "overrides": ["parallelism=dp2", f"parallelism.micro_batch={global_batch // 2}",
                                             f"parallelism.global_batch={global_batch}"]},
        "pp2 gpipe": {"threads": 1, "overrides": ["parallelism=pp2", "parallelism.pipeline_schedule=gpipe", *pp]},
        "pp2 1f1b": {"threads": 1, "overrides": ["parallelism=pp2", "parallelism.pipeline_schedule=1f1b", *pp]},
    }


def measure(setting: Dict, steps: int, work: Path, site: Path) -> Dict:
    """One ``llmexp`` run of ``setting``: its tokens/s, final loss and, for pp, each rank's step timings."""
    run_dir = Path(tempfile.mkdtemp(dir=work))
    times = run_dir / "times"
    times.mkdir()
    env = {name: value for name, value in os.environ.items() if name not in THREAD_VARIABLES}
    env.update(OMP_NUM_THREADS=str(setting["threads"]), HF_HUB_OFFLINE="1", **{TIMES: str(times)},
               PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "llmexp", "pipeline=technique_only", f"technique.max_steps={steps}",
               "technique.checkpoint_every=0", "technique.save_model=false", *setting["overrides"],
               f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    record = json.loads((run_dir / "results.json").read_text())
    metrics = next(stage["metrics"] for stage in record["stages"].values() if "tokens_per_s" in stage["metrics"])
    rows = [json.loads(line) for path in times.glob("*.jsonl") for line in path.read_text().splitlines()]
    plan = record["plan"].get("pipeline") or {}
    return {"tokens_per_s": metrics["tokens_per_s"], "final_loss": metrics["final_loss"],
            "peak_mb": metrics.get("peak_memory_mb_per_rank") or [metrics["peak_memory_mb"]],
            "implied_bubble": plan.get("bubble_fraction"), "bubble": measured_bubble(rows)}


def measured_bubble(rows: List[Dict]) -> Optional[Dict[int, float]]:
    """Each stage's 1 - compute / step wall time over its ranks' steps, each rank's first step left out."""
    if not rows:
        return None
    by_rank: Dict[int, List[Dict]] = {}
    for row in rows:
        by_rank.setdefault(row["rank"], []).append(row)
    totals: Dict[int, List[float]] = {}
    for steps in by_rank.values():
        later = steps[1:] or steps
        stage = later[0]["stage"]
        compute, wall = sum(s["compute_s"] for s in later), sum(s["step_s"] for s in later)
        totals.setdefault(stage, [0.0, 0.0])
        totals[stage][0] += compute
        totals[stage][1] += wall
    return {stage: 1 - compute / wall for stage, (compute, wall) in sorted(totals.items())}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=16, help="sequences per optimiser step (64 tokens each)")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step of the pp2 runs (m)")
    args = parser.parse_args(argv)
    if args.global_batch % args.micro_batches or args.global_batch % 2:
        parser.error("--global-batch must be even and divisible by --micro-batches")
    chosen = settings(args.micro_batches, args.global_batch)
    print(f"cores usable: {len(os.sched_getaffinity(0))}; {args.steps} steps of {args.global_batch} x 64 tokens per "
          f"run, {args.rounds} round(s); pp2 in m={args.micro_batches} micro-batches", flush=True)
    runs: Dict[str, List[Dict]] = {name: [] for name in chosen}
    load = OtherLoad().start()
    with tempfile.TemporaryDirectory() as work:
        site = Path(work) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        names = list(chosen)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                start = time.perf_counter()
                figures = measure(chosen[name], args.steps, Path(work), site)
                runs[name].append(figures)
                bubble = figures["bubble"]
                shown = ("  bubble " + ", ".join(f"stage {s} {b:.1%}" for s, b in bubble.items())) if bubble else ""
                print(f"  round {round_ + 1} {name:<10} {figures['tokens_per_s']:>8.0f} tokens/s  loss "
                      f"{figures['final_loss']}{shown}  ({time.perf_counter() - start:.0f} s wall)", flush=True)
    print(f"\nother processes kept {describe(load.cores())} cores busy meanwhile")
    single = statistics.median(run["tokens_per_s"] for run in runs["single"])
    print(f"\n{'setting':<12}{'tokens/s':>10}{'of single':>11}{'peak MB/rank':>16}{'bubble implied':>16}"
          f"{'bubble measured (per stage)':>30}")
    for name, measures in runs.items():
        speed = statistics.median(run["tokens_per_s"] for run in measures)
        peaks = "/".join(f"{peak:.0f}" for peak in measures[-1]["peak_mb"])
        implied = measures[-1]["implied_bubble"]
        stages = sorted(measures[-1]["bubble"] or {})
        measured = ", ".join(f"{statistics.median(run['bubble'][s] for run in measures):.1%}" for s in stages)
        print(f"{name:<12}{speed:>10.0f}{speed / single:>10.2f}x{peaks:>16}"
              f"{(f'{implied:.1%}' if implied is not None else '-'):>16}{measured or '-':>30}")
    losses = {name: measures[-1]["final_loss"] for name, measures in runs.items()}
    spread = (max(losses.values()) - min(losses.values())) / min(losses.values())
    print(f"\nfinal losses: {losses}; largest relative difference {spread:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
