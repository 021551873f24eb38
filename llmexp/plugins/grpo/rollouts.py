"""A group of sampled completions per prompt, through the project's serving engine, as tensors to train on.

The engine (``llmexp.serving.engine``, in this process) runs the policy itself: its continuous
batching decodes every completion of a generation batch together, and each request carries its
own seed, derived from (run seed, generation batch, prompt, group member) alone, so a resumed
run draws the same completions from the same weights. A completion's token ids are those
sampled, its EOS or stop string's tokens included: they are what the policy chose, and what it
learns to end with; its text (without the stop string) is what rewards read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from llmexp.sdk import GenerationRequest, ServedModels

POLICY = "policy"  # the served name of the model being trained


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stop: Sequence[str]


@dataclass
class Rollouts:
    """Completions of a generation batch, group after group: left-padded prompts, right-padded completions."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    completions: List[str]

    def to(self, device) -> "Rollouts":
        return Rollouts(self.prompt_ids.to(device), self.prompt_mask.to(device), self.completion_ids.to(device),
                        self.completion_mask.to(device), self.completions)


def request_seed(run_seed: int, generation: int, prompt: int, member: int) -> int:
    """A sampling seed for one completion that depends on where it is in the run alone (numpy's SeedSequence mixes
    the four numbers so that neighbouring ones give unrelated streams)."""
    return int(np.random.SeedSequence([run_seed, generation, prompt, member]).generate_state(2, np.uint64)[0] >> 1)


class Sampler:
    """Samples groups of completions from ``model`` through one engine kept for the stage; ``close`` stops it."""

    def __init__(self, model, tokenizer, batch: int):
        from llmexp.sdk import Engine

        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # left padding needs some id; masked out, its value is unseen
        self.tokenizer = tokenizer
        self.engine = Engine(ServedModels(model=model, tokenizer=tokenizer, base_name=POLICY),
                             max_batch_size=batch, max_queue=batch)

    def sample(self, prompts: Sequence[List[int]], group_size: int, sampling: Sampling, run_seed: int,
               generation: int) -> Rollouts:
        """``group_size`` completions of each prompt (token ids), sampled together."""
        streams = [
            self.engine.submit(GenerationRequest(
                model=POLICY, prompt_ids=list(ids), max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                top_p=sampling.top_p, stop=tuple(sampling.stop), seed=request_seed(run_seed, generation, p, member)))
            for p, ids in enumerate(prompts) for member in range(group_size)
        ]
        finished = [stream.read_all() for stream in streams]
        pad = self.tokenizer.pad_token_id
        prompt_rows = [torch.tensor(ids) for ids in prompts for _ in range(group_size)]
        completion_rows = [torch.tensor(chunk.token_ids, dtype=torch.long) for chunk in finished]
        return Rollouts(
            pad_sequence(prompt_rows, batch_first=True, padding_value=pad, padding_side="left"),
            pad_sequence([torch.ones_like(r) for r in prompt_rows], batch_first=True, padding_side="left"),
            pad_sequence(completion_rows, batch_first=True, padding_value=pad),
            pad_sequence([torch.ones_like(r) for r in completion_rows], batch_first=True),
            [chunk.text for chunk in finished],
        )

    def close(self) -> None:
        self.engine.close()
