"""The default training alone and beside a competing process: llmexp's thread settings vs torch's defaults.

Run from the repository root, with nothing else running::

    python benchmarks/bench_shared_cores.py                    # 150 steps of the default pretraining per measure
    python benchmarks/bench_shared_cores.py --steps 300

What is compared
----------------
The job is the default run's training: ``llmexp pipeline=technique_only technique.max_steps=N``
(the embedded baseline's recipe, cut to N steps), a fresh process each time. It runs with

* *llmexp*: what ``llmexp.machine.cpu_threads`` chooses: a thread per usable core, lowered while other
  processes keep some of them busy (checked every 2 s between steps), libgomp's own waiting;
* *torch default*: what a plain torch process does, a thread per core all along
  (``OMP_NUM_THREADS=<cores>``, which llmexp takes as the user's choice and leaves alone).

each in three situations: *alone*; beside *one busy core* (a Python loop, as a data-loading or
tokenizing job would keep a core); beside *a second run* (the same job with the same settings,
started with it, as when two experiments share a machine). The figures are the training's
tokens/s from results.json and the job's CPU seconds (``wait4``), so spinning shows as CPU time
that bought no tokens, and the fewest threads it ran with. Target: beside a competitor, llmexp's
tokens/s >= 1.5x torch default's; alone, >= 0.95x. Every run trains the same steps on the same
data, so the runs that kept every thread must reach the same final loss to the digit (exit 1 if
not); those that ran on fewer threads add in another order and differ in the last digits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_load import OtherLoad, describe  # noqa: E402

SETTINGS = {"llmexp": {}, "torch default": {"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}}
THREAD_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
SITUATIONS = ("alone", "one busy core", "a second run")
BUSY_LOOP = "import time\nwhile True: pass"


def environment(setting: str) -> Dict[str, str]:
    base = {name: value for name, value in os.environ.items() if name not in THREAD_VARIABLES}
    return {**base, **SETTINGS[setting], "HF_HUB_OFFLINE": "1"}


def start_training(steps: int, run_dir: Path, setting: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "llmexp", "pipeline=technique_only", f"technique.max_steps={steps}",
               "technique.save_model=false", f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(command, env=environment(setting), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def finish(process: subprocess.Popen, run_dir: Path) -> Dict[str, float]:
    """Wait for a training process; its tokens/s, training seconds and CPU seconds."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    errors = process.stderr.read()
    if process.returncode != 0:
        raise SystemExit(f"the training failed (exit {process.returncode}):\n{errors[-2000:]}")
    record = json.loads((run_dir / "results.json").read_text())
    metrics = next(stage["metrics"] for stage in record["stages"].values() if "tokens_per_s" in stage["metrics"])
    return {"tokens_per_s": metrics["tokens_per_s"], "train_s": metrics["train_time_s"],
            "cpu_s": usage.ru_utime + usage.ru_stime, "threads": metrics["fewest_threads"],
            "final_loss": metrics["final_loss"]}


def measure(steps: int, setting: str, situation: str, work: Path) -> Dict[str, float]:
    run_dir = Path(tempfile.mkdtemp(dir=work))
    competitor: Optional[subprocess.Popen] = None
    other_dir = None
    if situation == "one busy core":
        competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    job = start_training(steps, run_dir, setting)
    if situation == "a second run":
        other_dir = Path(tempfile.mkdtemp(dir=work))
        competitor = start_training(steps, other_dir, setting)
    try:
        figures = finish(job, run_dir)
        if other_dir is not None:
            other = finish(competitor, other_dir)
            figures["other_tokens_per_s"] = other["tokens_per_s"]
    finally:
        if competitor is not None and competitor.poll() is None:
            competitor.kill()
            competitor.wait()
    return figures


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per measure (16 x 64 tokens each)")
    args = parser.parse_args(argv)
    print(f"cores usable: {len(os.sched_getaffinity(0))}; training {args.steps} steps per measure", flush=True)
    results: Dict[str, Dict[str, Dict[str, float]]] = {situation: {} for situation in SITUATIONS}
    load = OtherLoad().start()
    with tempfile.TemporaryDirectory() as work:
        for situation in SITUATIONS:
            for setting in SETTINGS:  # side by side: both settings meet the same machine within minutes
                start = time.perf_counter()
                figures = measure(args.steps, setting, situation, Path(work))
                results[situation][setting] = figures
                print(f"  {situation:<14} {setting:<14} {figures['tokens_per_s']:>8.0f} tokens/s  "
                      f"train {figures['train_s']:6.1f} s  CPU {figures['cpu_s']:6.1f} s  "
                      f"threads >= {figures['threads']}  loss {figures['final_loss']}  "
                      f"({time.perf_counter() - start:.0f} s wall)", flush=True)
    print(f"\nother processes kept {describe(load.cores())} cores busy meanwhile (besides the competitors started here)")
    alone = results["alone"]["torch default"]["tokens_per_s"]
    print(f"\n{'situation':<15}{'llmexp tok/s':>14}{'torch tok/s':>13}{'llmexp/torch':>14}{'of alone (llmexp)':>19}")
    verdicts = []
    for situation in SITUATIONS:
        ours, theirs = results[situation]["llmexp"]["tokens_per_s"], results[situation]["torch default"]["tokens_per_s"]
        ratio = ours / theirs
        target = 0.95 if situation == "alone" else 1.5
        verdicts.append(ratio >= target)
        print(f"{situation:<15}{ours:>14.0f}{theirs:>13.0f}{ratio:>13.2f}x{ours / alone:>18.2f}x"
              f"   target >= {target}x: {'met' if ratio >= target else 'NOT met'}")
    print("\ntargets:", "all met" if all(verdicts) else "not all met")
    cores = len(os.sched_getaffinity(0))
    runs = [figures for by_setting in results.values() for figures in by_setting.values()]
    kept = {figures["final_loss"] for figures in runs if figures["threads"] == cores}
    fewer = sorted({figures["final_loss"] for figures in runs if figures["threads"] < cores})
    print(f"final loss of the runs on all {cores} threads: {'equal' if len(kept) == 1 else 'DIFFER'} {sorted(kept)}; "
          f"on fewer threads: {fewer or '-'}")
    return 0 if len(kept) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
