"""Generation throughput: the serving engine (continuous batching) versus plain ``model.generate``, side by side.

Run from the repository root::

    python benchmarks/bench_generation.py                    # 32 prompts x 64 tokens, batch 16; 64, batch 32; 5 rounds
    python benchmarks/bench_generation.py --prompts 64 --new-tokens 128 --many 128 --rounds 5

What is compared
----------------
The same model (tiny_llama from llmexp/conf/model/tiny_llama.yaml, 8 layers, random weights: speed
does not depend on what the weights know), the same prompts (embedded-world words, 8 to 48
tokens), greedy decoding with EOS disabled, so both sides produce exactly ``--new-tokens``
per prompt:

*engine*: ``llmexp.serving.engine.Engine`` with ``max_batch_size=--batch``: every prompt is
submitted at once (``ignore_eos``), the engine admits ``--batch`` rows, prefills them and
decodes; rows that finish leave and waiting ones join at the next step. Timed from the first
``submit`` to the last chunk, chunks (and their text) read as they come, as a server does.

*generate*: ``model.generate(max_new_tokens=min_new_tokens=--new-tokens, do_sample=False)``
on left-padded batches of ``--batch`` prompts, one after another: what one writes without a
server.

Three workloads, each in alternating rounds (order swapped each round) after one untimed
warm-up of each side: *fixed*, every prompt ``--new-tokens`` tokens (the same forward passes
on both sides, step for step: what is measured is the engine's own cost per step against
``generate``'s), *mixed*, each prompt its own budget between a quarter of ``--new-tokens``
and all of it (seeded), as requests reach a server: ``generate`` runs each static batch to
its longest budget, the engine lets a finished row leave and a waiting prompt take its
place; and *many*, the same with ``--many`` prompts (64) and a batch of half as many (32),
many requests in flight at once. Throughput counts each prompt's budget only. The headline
per workload is the median of the rounds' ratios, target engine / generate >= 1.0. Every
prompt's tokens must be equal on both sides (greedy, same model): exit 1 if not.
``OMP_WAIT_POLICY=PASSIVE`` (unless set) for both sides, as ``llmexp serve`` runs: see
``llmexp.machine.cpu_threads.prefer_passive_waiting``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `llmexp serve` sets it, before torch loads (both sides)

import argparse
import random
import statistics
import time
from typing import List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from llmexp.data.embedded import build_world
from llmexp.data.tokenizer import word_level_tokenizer
from llmexp.models.loading import build_model
from llmexp.serving.engine import Engine
from llmexp.serving.generation import GenerationRequest
from llmexp.serving.served_models import ServedModels

from machine_load import OtherLoad, describe

TARGET_RATIO = 1.0
REPO_CONF = "llmexp/conf/model/tiny_llama.yaml"


def tiny_served_model() -> ServedModels:
    torch.manual_seed(0)
    tokenizer = word_level_tokenizer(build_world(0).vocabulary())
    model = build_model(OmegaConf.load(REPO_CONF), tokenizer).eval().requires_grad_(False)
    return ServedModels(model=model, tokenizer=tokenizer, base_name="tiny_llama")


def make_prompts(tokenizer, count: int, seed: int = 0) -> List[List[int]]:
    words = build_world(0).vocabulary()
    rng = random.Random(seed)
    return [tokenizer(" ".join(rng.choice(words) for _ in range(rng.randint(7, 47))))["input_ids"] for _ in range(count)]


def run_engine(engine: Engine, prompts: List[List[int]], budgets: List[int]) -> Tuple[float, List[List[int]]]:
    start = time.perf_counter()
    streams = [engine.submit(GenerationRequest("tiny_llama", prompt_ids=p, max_tokens=n, temperature=0.0,
                                               ignore_eos=True)) for p, n in zip(prompts, budgets)]
    outputs = [[t for chunk in stream for t in chunk.token_ids] for stream in streams]
    return time.perf_counter() - start, outputs


def run_generate(served: ServedModels, prompts: List[List[int]], budgets: List[int], batch: int):
    """Static batches of ``batch`` prompts, each run to its longest budget; every prompt's output cut to its own."""
    model, pad = served.model, served.tokenizer.pad_token_id
    outputs = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        group, wanted = prompts[i:i + batch], budgets[i:i + batch]
        width, longest = max(map(len, group)), max(wanted)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                                 min_new_tokens=longest, do_sample=False, pad_token_id=pad)
        outputs += [row[:n] for row, n in zip(out[:, width:].tolist(), wanted)]
    return time.perf_counter() - start, outputs


def compare(engine: Engine, served: ServedModels, prompts, budgets, batch: int, rounds: int) -> Tuple[float, bool]:
    """Alternating rounds (order swapped each round); the median engine / generate throughput ratio, tokens equal."""
    total = sum(budgets)
    print(f"{'round':>5s} {'engine tok/s':>13s} {'generate tok/s':>15s} {'ratio':>7s}  {'engine steps':>12s}")
    ratios, same = [], True
    for round_index in range(rounds):
        steps_before = engine.prefill_steps + engine.decode_steps
        if round_index % 2 == 0:
            engine_s, engine_out = run_engine(engine, prompts, budgets)
            generate_s, generate_out = run_generate(served, prompts, budgets, batch)
        else:
            generate_s, generate_out = run_generate(served, prompts, budgets, batch)
            engine_s, engine_out = run_engine(engine, prompts, budgets)
        steps = engine.prefill_steps + engine.decode_steps - steps_before
        same &= engine_out == generate_out and [len(o) for o in engine_out] == budgets
        ratios.append(generate_s / engine_s)
        print(f"{round_index:5d} {total / engine_s:13.0f} {total / generate_s:15.0f} {ratios[-1]:7.3f}  {steps:12d}")
    return statistics.median(ratios), same


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--many", type=int, default=64, help="prompts of the many-requests workload (batch: half)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.many < 2:
        parser.error(f"--many={args.many}: give at least 2 prompts (the workload's batch is half of them)")

    served = tiny_served_model()
    rng = random.Random(1)

    def mixed(count: int) -> List[int]:
        return [rng.randint(max(1, args.new_tokens // 4), args.new_tokens) for _ in range(count)]

    workloads = {  # name: (prompts, batch, each prompt's budget)
        "fixed": (args.prompts, args.batch, [args.new_tokens] * args.prompts),
        "mixed": (args.prompts, args.batch, mixed(args.prompts)),
        "many": (args.many, args.many // 2, mixed(args.many)),
    }
    meter = OtherLoad().start()
    results = {}
    for name, (count, batch, budgets) in workloads.items():
        prompts = make_prompts(served.tokenizer, count)
        with Engine(served, max_batch_size=batch, max_queue=count) as engine:
            run_engine(engine, prompts, [8] * count)  # warm-up: every prompt shape once on each side
            run_generate(served, prompts, [8] * count, batch)
            print(f"\n{name}: {count} prompts x {min(budgets)}-{max(budgets)} new tokens ({sum(budgets)} in all), "
                  f"batch {batch}, greedy, EOS disabled, torch threads {torch.get_num_threads()}")
            results[name] = compare(engine, served, prompts, budgets, batch, args.rounds)
    same = all(equal for _, equal in results.values())
    print()
    for name, (ratio, equal) in results.items():
        print(f"{name}: engine / generate throughput {ratio:.3f} (median of {args.rounds}; target >= {TARGET_RATIO}); "
              f"tokens {'equal' if equal else 'DIFFERENT'} on both sides")
    print(f"other processes used {describe(meter.cores())} cores")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
