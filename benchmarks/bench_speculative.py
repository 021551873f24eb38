"""Speculative decoding with a compressed student as the draft: acceptance, tokens per target forward, speed-up.

Run from the repository root::

    python benchmarks/bench_speculative.py                    # runs `llmexp pipeline=prune_distill` first (the
                                                              # cached embedded baseline reused), then measures
    python benchmarks/bench_speculative.py outputs/<run>      # a finished compress or prune_distill run
    python benchmarks/bench_speculative.py --target DIR --draft DIR [--draft DIR ...]
    python benchmarks/bench_speculative.py outputs/<run> --prompts 16 --new-tokens 48 -k 4 --rounds 3

What is compared
----------------
The target is the run's baseline; every model of the run with fewer parameters than it (the
pruned, distilled, fine-tuned students) drafts for it in turn, and so does the control: an
untrained model of the first draft's architecture with the same tokenizer. The prompts are the
embedded world's word problems (worked solutions, tens of tokens) and the first words of held-out
biographies (facts about a person), alternately, one at a time (batch 1, where
speculative decoding pays), greedy, up to ``--new-tokens`` tokens or EOS. Side by side, in
alternating order each round, after an untimed warm-up:

*generate*: ``target.generate(do_sample=False)``, the target alone in plain transformers;
*assisted*: ``target.generate(assistant_model=draft, do_sample=False)`` with ``-k`` assistant
tokens per step, constant (transformers' assisted generation; its default confidence threshold
lets the draft stop proposing early where it is unsure); its target forward passes are counted
with a forward hook, since transformers reports no acceptance figure;
*llmexp*: ``llmexp.serving.speculative`` rounds with ``-k`` proposals (what ``llmexp serve
--draft-model`` runs per request), and the same loop with no draft (the target alone, one
forward per token);
*engine*: every prompt submitted at once to ``llmexp.serving.engine.Engine`` (continuous
batching, one row per prompt), without and with the draft, whose rounds run batched across the
rows.

Printed per draft: its parameters and the cost of one of its forward passes relative to the
target's (c), the acceptance rate (a), tokens per target forward, the speed-ups (median over the
rounds) of llmexp's rounds vs its own loop without a draft, vs ``generate`` and vs assisted
generation, assisted vs ``generate``, the expected speed-up from a and c
((1 - a^(k+1)) / ((1 - a)(k c + 1)), Leviathan et al.), and the engine's with the draft vs without. Every side's tokens must equal
``generate``'s: exit 1 if not. At this scale a draft of 6 layers costs ~3/4 of an 8-layer
target's forward (c near 0.75, and per-call overhead makes it closer to 1), so a speed-up may
be impossible even at high acceptance; the acceptance rates are what carries over to real
sizes, where a draft costs a few percent of its target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from llmexp.data.embedded import build_world
from llmexp.models.loading import load_model
from llmexp.serving.engine import Engine
from llmexp.serving.generation import GenerationRequest
from llmexp.serving.served_models import DraftModel, ServedModels
from llmexp.serving.speculative import SpeculationCounts, check_same_vocabulary
from llmexp.serving.speculative_speed import generate as speculative_generate

PIPELINE = ["pipeline=prune_distill", "pipeline.nodes.baseline_eval.tasks=[perplexity]",
            "pipeline.nodes.baseline_eval.limit=8"]


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_models(run_dir: Path) -> Tuple[Path, List[Tuple[str, Path]]]:
    """(the baseline's model directory, [(stage, model directory)] of the run's other models), from results.json."""
    results = json.loads((run_dir / "results.json").read_text())
    models = {stage: Path(entry["artifacts"]["model"]) for stage, entry in results["stages"].items()
              if entry.get("artifacts", {}).get("model")}
    if "baseline" not in models:
        sys.exit(f"{run_dir}: no baseline stage with a model in results.json; give --target and --draft instead.")
    return models.pop("baseline"), sorted(models.items())


def new_run() -> Path:
    """A prune_distill run made now (the embedded baseline comes from its cache when a run has trained it)."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench_speculative_")) / "run"
    print(f"running `llmexp {' '.join(PIPELINE)}` into {run_dir} ...", flush=True)
    subprocess.run([sys.executable, "-m", "llmexp", *PIPELINE, f"hydra.run.dir={run_dir}"], check=True)
    return run_dir


def prompts(tokenizer, count: int) -> List[List[int]]:
    """Half word problems (a worked solution follows), half the first words of held-out biographies (facts follow)."""
    world = build_world(0)
    problems = [tokenizer(problem.prompt)["input_ids"] for problem in world.word_problem_test(count)]
    biographies = [tokenizer(" ".join(document.split()[:6]))["input_ids"]
                   for document in world.heldout_documents(2 * count)[::2]]
    return [ids for pair in zip(problems, biographies) for ids in pair][:count]


class ForwardCounter:
    """Counts a model's forward calls (transformers' assisted generation reports no acceptance figure)."""

    def __init__(self, model) -> None:
        self.calls = 0
        self._handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def run_generate(target, prompts_ids, new_tokens: int, eos: int, draft=None) -> List[List[int]]:
    outputs = []
    extra = {"assistant_model": draft} if draft is not None else {}
    with torch.inference_mode():
        for ids in prompts_ids:
            input_ids = torch.tensor([ids])
            out = target.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                  max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                                  **extra)
            outputs.append(out[0, len(ids):].tolist())
    return outputs


def timed(fn):
    clock = time.perf_counter()
    result = fn()
    return time.perf_counter() - clock, result


def relative_cost(target, draft, length: int = 32, repeats: int = 60) -> float:
    """c: one decoding forward of ``draft`` (one new token after ``length`` cached ones) over one of ``target``'s,
    medians of ``repeats`` timed alternately, so load from other processes falls on both alike."""
    from llmexp.serving.speculative import new_cache

    ids = torch.randint(4, target.config.vocab_size, (1, length))
    times: Dict[str, List[float]] = {"target": [], "draft": []}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, model in (("target", target), ("draft", draft)):
                cache = new_cache(model)
                model(input_ids=ids, cache=cache, use_cache=True)
                clock = time.perf_counter()
                model(input_ids=ids[:, -1:], cache=cache, use_cache=True)
                times[name].append(time.perf_counter() - clock)
    return statistics.median(times["draft"]) / statistics.median(times["target"])


def run_engine(target, tokenizer, draft, prompts_ids, new_tokens: int, k: int) -> List[List[int]]:
    """Every prompt submitted at once to the serving engine (continuous batching), with or without ``draft``."""
    served = ServedModels(target, tokenizer, "target", draft=None if draft is None else DraftModel(draft, Path("."), k))
    with Engine(served, max_batch_size=len(prompts_ids), max_queue=len(prompts_ids)) as engine:
        streams = [engine.submit(GenerationRequest("target", prompt_ids=ids, max_tokens=new_tokens, temperature=0.0))
                   for ids in prompts_ids]
        return [list(stream.read_all().token_ids) for stream in streams]


def measure(target, tokenizer, draft, prompts_ids, new_tokens: int, k: int, eos: int, rounds: int) -> Dict[str, float]:
    """Every side on ``prompts_ids``, ``rounds`` times in alternating order; median times, counts, identity."""
    draft.generation_config.num_assistant_tokens = k
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    sides = {
        "engine": lambda: run_engine(target, tokenizer, None, prompts_ids, new_tokens, k),
        "engine_draft": lambda: run_engine(target, tokenizer, draft, prompts_ids, new_tokens, k),
        "generate": lambda: run_generate(target, prompts_ids, new_tokens, eos),
        "assisted": lambda: run_generate(target, prompts_ids, new_tokens, eos, draft),
        "alone": lambda: speculative_generate(target, draft, prompts_ids, new_tokens, 0, (eos,), SpeculationCounts()),
        "llmexp": lambda: speculative_generate(target, draft, prompts_ids, new_tokens, k, (eos,), SpeculationCounts()),
    }
    for side in sides.values():  # warm-up
        side()
    times: Dict[str, List[float]] = {name: [] for name in sides}
    outputs = {}
    order = list(sides)
    for round_index in range(rounds):
        for name in (order if round_index % 2 == 0 else order[::-1]):
            seconds, outputs[name] = timed(sides[name])
            times[name].append(seconds)
    counts = SpeculationCounts()
    speculative_generate(target, draft, prompts_ids, new_tokens, k, (eos,), counts)
    counter = ForwardCounter(target)
    try:
        run_generate(target, prompts_ids, new_tokens, eos, draft)
    finally:
        counter.close()
    tokens = sum(len(ids) for ids in outputs["generate"])
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "acceptance": counts.acceptance_rate,
        "tokens_per_target_forward": counts.tokens_per_target_forward,
        # assisted: its first target forward reads the prompt and the first proposals at once (no prefill alone)
        "assisted_tokens_per_target_forward": tokens / counter.calls,
        "vs_alone": median["alone"] / median["llmexp"],
        "vs_generate": median["generate"] / median["llmexp"],
        "vs_assisted": median["assisted"] / median["llmexp"],
        "assisted_vs_generate": median["generate"] / median["assisted"],
        "engine_with_draft": median["engine"] / median["engine_draft"],
        "identical": all(outputs[name] == outputs["generate"] for name in sides),
        "tokens": tokens,
    }


def expected_speedup(acceptance: float, cost: float, k: int) -> float:
    """Leviathan et al.'s expected improvement for acceptance rate a and relative draft cost c."""
    if acceptance >= 1:
        return (k + 1) / (k * cost + 1)
    return (1 - acceptance ** (k + 1)) / ((1 - acceptance) * (k * cost + 1))


def random_control(architecture_dir: Path, seed: int = 0):
    """An untrained model of ``architecture_dir``'s architecture (same tokenizer): the draft that should not help."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(architecture_dir, trust_remote_code=False)).eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?", type=Path, help="a finished compress or prune_distill run directory")
    parser.add_argument("--target", type=Path, help="the target's checkpoint (instead of a run's baseline)")
    parser.add_argument("--draft", type=Path, action="append", default=[], help="a draft checkpoint (repeatable)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.target and args.draft:
        target_dir, drafts = args.target, [(path.name, path) for path in args.draft]
    else:
        target_dir, drafts = run_models(args.run or new_run())
    target, tokenizer = load_model(target_dir)
    target.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # the engine left-pads prompts batched together
    eos = tokenizer.eos_token_id
    prompt_ids = prompts(tokenizer, args.prompts)
    loaded = []
    for name, path in drafts:
        draft, draft_tokenizer = load_model(path)
        if parameters(draft) >= parameters(target):
            print(f"{name}: {parameters(draft):,} parameters, not fewer than the target's: not a draft, skipped")
            continue
        check_same_vocabulary(target, tokenizer, draft, draft_tokenizer, f"--draft {path}")
        loaded.append((name, path, draft.eval()))
    if not loaded:
        sys.exit("no model with fewer parameters than the target to draft with")
    first_name, first_path, _ = loaded[0]
    loaded.append((f"untrained {first_name} (control)", first_path, random_control(first_path)))
    k = args.num_speculative_tokens
    print(f"target {target_dir}: {parameters(target):,} parameters; {len(prompt_ids)} prompts, batch 1, "
          f"greedy, up to {args.new_tokens} tokens; k = {k}; {torch.get_num_threads()} threads; median of "
          f"{args.rounds} rounds")
    header = ("| draft | params | c | acceptance | tokens/target fwd (llmexp) | tokens/target fwd (assisted) | "
              "llmexp vs own loop | llmexp vs generate | llmexp vs assisted | assisted vs generate | expected | "
              "engine with draft vs without | identical |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    failed = False
    for name, _, draft in loaded:
        cost = relative_cost(target, draft)
        row = measure(target, tokenizer, draft, prompt_ids, args.new_tokens, k, eos, args.rounds)
        failed |= not row["identical"]
        print(f"| {name} | {parameters(draft):,} | {cost:.2f} | {row['acceptance']:.3f} | "
              f"{row['tokens_per_target_forward']:.2f} | {row['assisted_tokens_per_target_forward']:.2f} | "
              f"{row['vs_alone']:.2f}x | {row['vs_generate']:.2f}x | {row['vs_assisted']:.2f}x | "
              f"{row['assisted_vs_generate']:.2f}x | {expected_speedup(row['acceptance'], cost, k):.2f}x | "
              f"{row['engine_with_draft']:.2f}x | "
              f"{'yes' if row['identical'] else 'NO'} |", flush=True)
    if failed:
        print("FAIL: some greedy output with a draft differs from the target's alone")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
