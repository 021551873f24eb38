"""Training throughput of each training technique: llmexp's loop versus a hand-written PyTorch loop, side by side.

Run from the repository root::

    python benchmarks/bench_train_throughput.py                          # pretrain cpt sft lora dpo, 3 rounds of 60 steps
    python benchmarks/bench_train_throughput.py --techniques sft,lora --steps 100 --rounds 5

What is compared, per technique
-------------------------------
*framework*: ``llmexp.training.loop.train`` exactly as the technique's stage calls it: its model
(tiny_llama; LoRA wrapped by ``add_lora``; DPO with its frozen reference), its examples and
collate function, its loss, on a config composed by ``compose_config`` (fp32, clip 1.0,
deterministic Lightning, its progress bar, checkpoints every 200 steps, the train_log and
the ``tracker=none`` CSV logger). Validation is turned off (``val_every=0``): the
hand-written loop has none to compare it with.

*hand-written*: what one would write without the framework: a copy of the same starting
model, the same micro-batches in the same order (``data_order``), the same loss function
on them, AdamW over the trainable parameters with the same decay groups and kernel
(``llmexp.training.optimizer.adamw``: fused where it runs; the kernel is not the loop), the warm-up +
cosine schedule written out, ``clip_grad_norm_``, ``zero_grad``, ``loss.item()`` each step.

How it is measured
------------------
One ``train()`` per round; a Lightning callback at the end of every framework step runs one
hand-written step, so the two loops take turns every few milliseconds and a burst of load
from another process hits both. A framework step is timed from the end of the previous
hand-written step to the end of its own batch (all of Lightning's per-step work, none of
the baseline's). Steady-state steps/s leaves out the first ``--warmup`` steps; the
headline is the median of the rounds' ratios, target >= 0.95. The two loops make the same
updates on the same data, so their per-step losses must agree (checked; exit 1 if not).
Memory: ``peak_memory_mb`` of the framework run, and LoRA's trainable fraction and its
memory against full SFT are printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import lightning as L
import torch

from llmexp.configuration.compose import compose_config
from llmexp.data.embedded import build_world, embedded_token_stream
from llmexp.data.instructions import encode_example, instruction_data, pad_collate
from llmexp.data.packing import pack_documents
from llmexp.data.preference import encode_pair, pair_collate, preference_data
from llmexp.models.loading import new_embedded_model
from llmexp.plugins.customize.losses import DPOLoss, response_loss
from llmexp.plugins.customize.stages import add_lora
from llmexp.plugins.pretrain.loop import next_token_loss
from llmexp.techniques.contract import StageContext
from llmexp.results.tracking import make_tracker
from llmexp.training.loop import train
from llmexp.training.optimizer import adamw
from llmexp.training.schedule import data_order
from machine_load import OtherLoad, describe

TARGET_RATIO = 0.95
LOSS_TOLERANCE = 1e-4  # relative, per step


@dataclass
class Setup:
    """One technique's inputs to ``train``, built as its stage builds them."""

    cfg: Any
    model: Any
    loss_fn: Callable
    examples: Any
    collate: Callable
    shuffle: bool
    extra_modules: List[Any] = field(default_factory=list)


def setup(technique: str, steps: int, overrides: Sequence[str] = ()) -> Setup:
    # validation is off: the hand-written loop has none to match it
    cfg = compose_config([f"technique={technique}", f"technique.max_steps={steps}", "technique.val_every=0",
                          "pipeline=technique_only", *overrides])
    start = new_embedded_model(cfg)
    model, tokenizer = start.model, start.tokenizer
    if technique in ("pretrain", "cpt"):
        world = build_world(cfg.data.seed, cfg.data.num_people)
        blocks = pack_documents(embedded_token_stream(world, tokenizer), cfg.data.seq_len, steps * cfg.parallelism.global_batch)
        return Setup(cfg, model, next_token_loss, blocks, torch.stack, shuffle=False)
    if technique == "dpo":
        pairs, _ = preference_data(cfg.data)
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        examples = [encode_pair(pair, tokenizer, cfg.data.seq_len) for pair in pairs]
        return Setup(cfg, model, DPOLoss(reference, cfg.technique.beta), examples, pair_collate(tokenizer.pad_token_id),
                     shuffle=True, extra_modules=[reference])
    examples = [encode_example(e, tokenizer, cfg.data.seq_len) for e in instruction_data(cfg.data)[0]]
    if technique == "lora":
        model = add_lora(model, cfg.technique, "technique")
    return Setup(cfg, model, response_loss, examples, pad_collate(tokenizer.pad_token_id), shuffle=True)


class HandWritten:
    """A plain loop over the same micro-batches, one optimiser step per ``step()``."""

    def __init__(self, s: Setup):
        self.s, t = s, s.cfg.technique
        self.model = copy.deepcopy(s.model)
        self.model.train()
        self.optimizer = adamw(self.model.parameters(), t.lr, (t.beta1, t.beta2), t.weight_decay)  # the same kernel
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.multiplier)
        micro = s.cfg.parallelism.micro_batch
        order = data_order(len(s.examples), t.max_steps * s.cfg.parallelism.global_batch, s.cfg.seed, s.shuffle).tolist()
        self.batches = [s.collate([s.examples[i] for i in order[k : k + micro]]) for k in range(0, len(order), micro)]
        self.accumulation = s.cfg.parallelism.global_batch // micro
        self.step_index, self.losses, self.step_s = 0, [], []

    def multiplier(self, step: int) -> float:
        t = self.s.cfg.technique
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        done = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))

    def step(self) -> None:
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(False)  # Lightning switches it on process-wide; a plain loop would not
        total = 0.0
        for k in range(self.accumulation):
            batch = self.batches[self.step_index * self.accumulation + k]
            loss = self.s.loss_fn(self.model, batch).loss / self.accumulation
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(total)
        self.step_index += 1
        torch.use_deterministic_algorithms(deterministic)


class Interleave(L.Callback):
    """Times each framework step at its end, then runs one hand-written step (timed too)."""

    def __init__(self, hand: HandWritten):
        self.hand, self.step_s, self.last = hand, [], 0.0

    def on_train_start(self, trainer, pl_module):
        self.last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % self.hand.accumulation:
            return
        now = time.perf_counter()
        self.step_s.append(now - self.last)
        self.hand.step()
        self.last = time.perf_counter()
        self.hand.step_s.append(self.last - now)


def one_round(technique: str, steps: int, tmp: Path) -> Dict[str, Any]:
    torch.set_flush_denormal(True)
    s = setup(technique, steps)
    hand = HandWritten(s)
    clock = Interleave(hand)
    tracker = make_tracker(s.cfg.tracker, tmp, s.cfg)
    ctx = StageContext(s.cfg, s.cfg.technique, tmp / technique, None, tracker, technique)
    metrics = train(ctx, s.model, s.loss_fn, s.examples, s.collate, shuffle=s.shuffle,
                    extra_modules=s.extra_modules, callbacks=[clock])
    tracker.finish()
    log = [float(line.split('"loss": ')[1].split(",")[0]) for line in (tmp / technique / "train_log.jsonl").read_text().splitlines()
           if '"loss": ' in line]
    return {"framework_s": clock.step_s, "hand_s": hand.step_s, "hand_losses": hand.losses, "log_losses": log,
            "log_every": s.cfg.technique.log_every, "metrics": metrics,
            "tokens_per_step": metrics["train_tokens"] / metrics["steps"]}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--techniques", default="pretrain,cpt,sft,lora,dpo")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"# train throughput per technique: llmexp.training.loop.train vs a hand-written loop, steps interleaved; "
          f"{args.rounds} rounds of {args.steps} steps (first {args.warmup} untimed), torch {torch.__version__}, "
          f"lightning {L.__version__}, {torch.get_num_threads()} threads")
    print(f"{'technique':10s} {'framework tok/s':>16s} {'hand tok/s':>11s} {'ratio (median)':>15s}  rounds   "
          f"{'peak MB':>8s} {'trainable':>10s}  loss check   others' cores")
    ok, summary = True, {}
    for technique in args.techniques.split(","):
        ratios, rounds, meter = [], [], OtherLoad().start()
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="llmexp-bench-") as tmp:
                r = one_round(technique, args.steps, Path(tmp))
            fw = len(r["framework_s"][args.warmup:]) / sum(r["framework_s"][args.warmup:])
            hw = len(r["hand_s"][args.warmup:]) / sum(r["hand_s"][args.warmup:])
            ratios.append(fw / hw)
            rounds.append((fw, hw, r))
        fw, hw, r = rounds[0]
        logged = r["hand_losses"][r["log_every"] - 1 :: r["log_every"]]
        same = all(abs(a - b) <= LOSS_TOLERANCE * abs(b) for a, b in zip(r["log_losses"], logged))
        ok &= same
        m = r["metrics"]
        summary[technique] = m
        print(f"{technique:10s} {fw * r['tokens_per_step']:16.0f} {hw * r['tokens_per_step']:11.0f} "
              f"{statistics.median(ratios):15.3f}  {' '.join(f'{x:.3f}' for x in ratios)}   {m['peak_memory_mb']:8.1f} "
              f"{m['trainable_fraction']:10.4f}  {'same' if same else 'DIFFERENT'}         {describe(meter.cores())}")
    if "lora" in summary and "sft" in summary:
        print(f"\nLoRA / full SFT: peak memory {summary['lora']['peak_memory_mb'] / summary['sft']['peak_memory_mb']:.3f}, "
              f"trainable parameters {summary['lora']['trainable_parameters']:,} of {summary['lora']['total_parameters']:,} "
              f"({100 * summary['lora']['trainable_fraction']:.2f}%)")
    print(f"target framework / hand-written >= {TARGET_RATIO} (per technique, median of rounds)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
