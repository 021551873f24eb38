"""How good a draft model is for a target: greedy generation with and without it, side by side, on the same prompts.

Each prompt is generated greedily twice, one sequence at a time (batch 1, where speculative
decoding pays): by the target alone, one forward pass per token, and by speculative rounds
with the draft (``llmexp.serving.speculative``). Both runs share the same loop and caches,
so the time ratio is the draft's effect alone. The outputs must be identical (the target's
own greedy text); the counts give the acceptance rate and tokens per target forward, which
carry over to larger models of the same pair, while the speed-up depends on how much cheaper
the draft's forward is than the target's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

from llmexp.serving.speculative import Sampling, SpeculationCounts, greedy_start, speculative_round


@dataclass(frozen=True)
class DraftSpeed:
    """What ``measure_draft`` found: the draft's counts, both wall times and whether the outputs agree."""

    counts: SpeculationCounts
    target_alone_s: float
    speculative_s: float
    identical: bool  # greedy outputs with the draft equal the target's alone, prompt by prompt
    tokens: int  # tokens generated per run

    @property
    def speedup(self) -> float:
        return self.target_alone_s / self.speculative_s

    def as_metrics(self, prefix: str = "draft_") -> Dict[str, float]:
        """The figures a comparison reports: acceptance rate, tokens per target forward, speed-up."""
        return {f"{prefix}acceptance_rate": self.counts.acceptance_rate,
                f"{prefix}tokens_per_target_forward": self.counts.tokens_per_target_forward,
                f"{prefix}speedup": self.speedup}


def measure_draft(target, draft, prompts: Sequence[Sequence[int]], max_new_tokens: int, num_speculative_tokens: int,
                  eos_token_ids: Sequence[int] = ()) -> DraftSpeed:
    """Generate each of ``prompts`` (token ids) greedily by ``target`` alone, then with ``draft``; time both."""
    warm = list(prompts[:1])
    generate(target, draft, warm, 2, num_speculative_tokens, eos_token_ids, SpeculationCounts())  # first-call costs
    clock = time.perf_counter()
    alone = generate(target, draft, prompts, max_new_tokens, 0, eos_token_ids, SpeculationCounts())
    target_alone_s = time.perf_counter() - clock
    counts = SpeculationCounts()
    clock = time.perf_counter()
    drafted = generate(target, draft, prompts, max_new_tokens, num_speculative_tokens, eos_token_ids, counts)
    speculative_s = time.perf_counter() - clock
    return DraftSpeed(counts, target_alone_s, speculative_s, alone == drafted, sum(len(ids) for ids in drafted))


def generate(target, draft, prompts: Sequence[Sequence[int]], max_new_tokens: int, num_speculative_tokens: int,
             eos_token_ids: Sequence[int], counts: SpeculationCounts) -> List[List[int]]:
    """Greedy continuations of ``prompts`` by speculative rounds (0 speculative tokens: the target alone), each up to
    ``max_new_tokens`` or an EOS token."""
    outputs = []
    for prompt in prompts:
        sequence = greedy_start(target, draft, list(prompt))
        produced = [sequence.last_token]
        while len(produced) < max_new_tokens and not any(token in eos_token_ids for token in produced):
            k = min(num_speculative_tokens, max_new_tokens - len(produced) - 1)
            produced += speculative_round(target, draft, sequence, k, Sampling(), counts, stop_tokens=eos_token_ids)
        ends = [i for i, token in enumerate(produced) if token in eos_token_ids]
        outputs.append(produced[: ends[0] + 1] if ends else produced)
    return outputs

