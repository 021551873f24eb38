"""A GRPO step, split into generation, scoring and optimisation, beside TRL's GRPOTrainer doing the same step.

Run from the repository root (alone: two torch processes on 2 cores slow each other)::

    python benchmarks/bench_grpo_step.py                  # 10 steps each, 2 rounds
    python benchmarks/bench_grpo_step.py --steps 20 --rounds 1 --skip-trl

What is compared
----------------
Both start from the embedded baseline (``llmexp technique=grpo data=word_problems`` trains and
caches it first when it is missing) and run the same step: 16 training word problems x 8
completions of at most 40 tokens, sampled at temperature 1, rewarded by exact match of the
``#### N`` answer, the DAPO-aggregated clipped loss with a KL penalty of 0.04 to the frozen
starting model, lr 2e-4, fp32, the same threads. Generation runs to EOS or 40 tokens on both
sides (llmexp's ``stop`` strings are turned off: TRL's generate has none), so both do the same
work.

*llmexp*: ``llmexp technique=grpo`` as a user runs it (a subprocess), its step time from
``train_time_s`` and the split from its ``generation_time_s`` (the serving engine, batched),
``scoring_time_s`` (rewards, reference and old log-probabilities) and ``optimisation_time_s``
(forward, backward and optimiser step).

*TRL*: ``trl.GRPOTrainer`` 1.16 on the CPU (``use_cpu``, no vLLM: transformers' ``generate``),
in a subprocess, on the same model and prompts; its step time from the trainer's ``train_runtime``.

Printed: each side's seconds per step (median over the rounds), the ratio, and llmexp's split as
fractions of its step. In every GRPO system generation dominates; the split says how much here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

PROMPTS_PER_STEP, GROUP, COMPLETION_TOKENS = 16, 8, 40
SETTINGS = dict(lr=2e-4, beta=0.04, epsilon=0.2, temperature=1.0)


def llmexp_run(steps: int, workdir: Path) -> Dict[str, float]:
    """``llmexp technique=grpo`` for ``steps`` steps; its metrics."""
    run_dir = workdir / "llmexp"
    command = [
        sys.executable, "-m", "llmexp", "technique=grpo", "data=word_problems", "pipeline=technique_only",
        f"technique.max_steps={steps}", "technique.warmup_steps=0", "technique.checkpoint_every=0",
        "technique.save_model=false", "technique.stop=[]", f"technique.group_size={GROUP}",
        f"technique.max_completion_tokens={COMPLETION_TOKENS}", f"technique.lr={SETTINGS['lr']}",
        f"technique.beta={SETTINGS['beta']}", "technique.loss_type=dapo",
        f"parallelism.micro_batch={PROMPTS_PER_STEP}", f"parallelism.global_batch={PROMPTS_PER_STEP}",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"llmexp technique=grpo failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / "results.json").read_text())["stages"]["grpo"]["metrics"]
    return {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))}


def trl_run(steps: int, workdir: Path) -> Dict[str, float]:
    """TRL's GRPOTrainer for ``steps`` steps in a subprocess (this script with ``--trl-worker``)."""
    out = workdir / "trl.json"
    done = subprocess.run([sys.executable, __file__, "--trl-worker", str(steps), str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"TRL's GRPOTrainer failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def trl_worker(steps: int, out: Path) -> None:
    """One TRL run: the embedded baseline, the training word problems, the settings above."""
    import time

    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from llmexp.configuration.compose import compose_config
    from llmexp.data.gsm8k import extract_answer
    from llmexp.data.word_problems import word_problem_data
    from llmexp.models import embedded_baseline
    from llmexp.models.loading import load_model

    config = compose_config(["data=word_problems"])
    model, tokenizer = load_model(embedded_baseline.directory(config) / "model")
    model.train()
    problems, _ = word_problem_data(config.data)
    dataset = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])

    def exact_match(completions: List[str], answer: List[int], **_) -> List[float]:
        return [float(extract_answer(text) == expected) for text, expected in zip(completions, answer)]

    args = GRPOConfig(
        output_dir=str(out.parent / "trl"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        max_steps=steps, per_device_train_batch_size=PROMPTS_PER_STEP * GROUP, gradient_accumulation_steps=1,
        num_generations=GROUP, max_completion_length=COMPLETION_TOKENS, learning_rate=SETTINGS["lr"],
        beta=SETTINGS["beta"], epsilon=SETTINGS["epsilon"], temperature=SETTINGS["temperature"], loss_type="dapo",
        lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1, seed=0, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    start = time.perf_counter()
    result = trainer.train()
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    out.write_text(json.dumps({"train_time_s": time.perf_counter() - start, "train_runtime": result.metrics["train_runtime"],
                               "reward_first": rewards[0], "reward_last": rewards[-1],
                               "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-trl", action="store_true", help="llmexp's split alone")
    parser.add_argument("--trl-worker", nargs=2, metavar=("STEPS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(int(args.trl_worker[0]), Path(args.trl_worker[1]))
        return
    ours: List[Dict[str, float]] = []
    theirs: List[Dict[str, float]] = []
    for round_index in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench_grpo_") as workdir:
            sides = [("llmexp", llmexp_run, ours), ("trl", trl_run, theirs)][: 1 if args.skip_trl else 2]
            for name, run, results in sides if round_index % 2 == 0 else reversed(sides):  # alternate the order
                results.append(run(args.steps, Path(workdir)))
                print(f"round {round_index + 1}: {name} done", file=sys.stderr)
    per_step = statistics.median(r["train_time_s"] for r in ours) / args.steps
    print(f"GRPO step: {PROMPTS_PER_STEP} prompts x {GROUP} completions of <= {COMPLETION_TOKENS} tokens, "
          f"{args.steps} steps, {args.rounds} round(s), {os.cpu_count()} cores")
    print(f"  llmexp: {per_step:.2f} s/step")
    split = {part: statistics.median(r[f"{part}_time_s"] for r in ours) for part in ("generation", "scoring",
                                                                                    "optimisation")}
    total = sum(split.values())
    for part, seconds in split.items():
        print(f"    {part:<12} {seconds / args.steps:6.2f} s/step  {seconds / total:5.1%}")
    print(f"    reward_mean at the last step: {statistics.median(r['reward_mean'] for r in ours):.3f}")
    if theirs:
        trl_step = statistics.median(r["train_runtime"] for r in theirs) / args.steps
        print(f"  TRL GRPOTrainer: {trl_step:.2f} s/step (threads {theirs[0]['threads']:.0f}); "
              f"llmexp is {trl_step / per_step:.2f}x as fast")
        print(f"    TRL reward at its first / last step: {theirs[0]['reward_first']:.3f} / {theirs[0]['reward_last']:.3f}")


if __name__ == "__main__":
    main()
