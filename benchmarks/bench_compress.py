"""The compress pipeline's quality bars, measured on one run of ``pipeline=compress_study``.

    python benchmarks/bench_compress.py                 # runs `llmexp pipeline=compress_study`, then checks
    python benchmarks/bench_compress.py outputs/<run>   # checks a finished run of it
    python benchmarks/bench_compress.py -- seed=1       # overrides for the run it starts

At the embedded default's scale one accuracy cannot resolve a 1.5% change, so every bar is
paired (the same items, the same held-out tokens, against the same baseline):

* FP8 (simulated): relative cloze-accuracy loss <= 1.5% (within its paired standard
  error), multiple-choice flip rate <= 1.5%, perplexity within 0.5% of the baseline. The
  word problems' flip rate is reported beside it: a greedy worked solution of ~30 tokens
  changes its final number when any one token near a tie flips, so it is far more sensitive.
* INT4 AWQ vs INT4 round-to-nearest at the same group size: AWQ has the lower KL to the
  baseline and the lower perplexity.
* Depth pruning by block importance costs perplexity, and less than dropping the last
  layers (the control that shows the ranking matters).
* Distillation recovers >= 70% of the pruned model's log-perplexity gap and >= 70% of its
  KL to the teacher, and beats next-token fine-tuning for the same steps on KL.

Prints the comparison table, then one line per bar with the measured value and PASS/MISS;
exits 1 when a bar is missed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple


def metrics(results: dict, stage: str) -> Dict[str, float]:
    return results["stages"][stage]["metrics"]


def recovery(before: float, after: float, target: float) -> float:
    """Share of the gap ``before - target`` that ``after`` closed."""
    return (before - after) / (before - target)


def quality_bars(results: dict) -> List[Tuple[str, float, bool]]:
    """``(bar, measured value, met)`` for each bar of the module docstring."""
    fp8 = metrics(results, "fp8_eval")
    base, pruned, last = (metrics(results, s) for s in ("baseline_eval", "prune_eval", "prune_last_eval"))
    awq, rtn = metrics(results, "int4_awq_eval"), metrics(results, "int4_rtn_eval")
    distilled, control = metrics(results, "distill_eval"), metrics(results, "lm_finetune_eval")
    loss = -fp8.get("mc_cloze_acc_rel_delta", 0.0)
    log_ppl = {name: math.log(m["perplexity"]) for name, m in
               (("base", base), ("pruned", pruned), ("distilled", distilled), ("control", control))}
    return [
        ("fp8: relative cloze-accuracy loss <= 1.5% + its paired SE", loss,
         loss <= 0.015 + fp8["mc_cloze_acc_delta_se"] / base["mc_cloze_acc"]),
        ("fp8: flip rate (multiple choice) <= 1.5%", fp8["flip_rate_multiple_choice"],
         fp8["flip_rate_multiple_choice"] <= 0.015),
        ("fp8: flip rate (word problems; reported)", fp8["flip_rate_word_problems"], True),
        ("fp8: |perplexity change| <= 0.5%", fp8["perplexity_rel_delta"], abs(fp8["perplexity_rel_delta"]) <= 0.005),
        ("int4: KL to baseline, AWQ / RTN < 1", awq["kl_to_baseline"] / rtn["kl_to_baseline"],
         awq["kl_to_baseline"] < rtn["kl_to_baseline"]),
        ("int4: perplexity, AWQ - RTN < 0", awq["perplexity"] - rtn["perplexity"], awq["perplexity"] < rtn["perplexity"]),
        ("depth prune: perplexity rises", pruned["perplexity_rel_delta"], pruned["perplexity_rel_delta"] > 0),
        ("depth prune: by importance < dropping the last layers (perplexity ratio)",
         pruned["perplexity"] / last["perplexity"], pruned["perplexity"] < last["perplexity"]),
        ("distill: recovers >= 70% of the log-perplexity gap",
         recovery(log_ppl["pruned"], log_ppl["distilled"], log_ppl["base"]),
         recovery(log_ppl["pruned"], log_ppl["distilled"], log_ppl["base"]) >= 0.7),
        ("distill: recovers >= 70% of the KL to the teacher",
         recovery(pruned["kl_to_baseline"], distilled["kl_to_baseline"], 0.0),
         recovery(pruned["kl_to_baseline"], distilled["kl_to_baseline"], 0.0) >= 0.7),
        ("control: LM fine-tune recovers of the KL (distill must beat it)",
         recovery(pruned["kl_to_baseline"], control["kl_to_baseline"], 0.0),
         distilled["kl_to_baseline"] < control["kl_to_baseline"]),
        ("control: LM fine-tune recovers of the log-perplexity gap (reported)",
         recovery(log_ppl["pruned"], log_ppl["control"], log_ppl["base"]), True),
    ]


def main(argv: List[str]) -> int:
    if argv and argv[0] != "--":
        run_dir = Path(argv[0])
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="bench_compress_")) / "run"
        overrides = argv[1:] if argv else []
        subprocess.run([sys.executable, "-m", "llmexp", "pipeline=compress_study", f"hydra.run.dir={run_dir}", *overrides],
                       check=True)
    results = json.loads((run_dir / "results.json").read_text())
    print((run_dir / "comparison.md").read_text())
    bars = quality_bars(results)
    for bar, value, met in bars:
        print(f"{'PASS' if met else 'MISS'}  {bar}: {value:.4g}")
    steps = results["stages"]["distill"]["metrics"]["steps"]
    print(f"distillation steps: {steps}; run directory: {run_dir}; wall time {results['wall_time_s']:.0f} s")
    return 0 if all(met for _, _, met in bars) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
