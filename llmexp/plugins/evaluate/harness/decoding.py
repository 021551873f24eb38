"""Generation: greedy and sampled continuations of prompts, cut at EOS and at stop strings.

Prompts are left-padded in a batch. Sampled generation (``Sampling``: temperature, top-p,
seed) draws from a random state seeded per batch from the seed and the batch's position,
so the same seed, prompts and batch size give the same texts, and the caller's global
random state is left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from llmexp.sdk import evaluating
from llmexp.plugins.evaluate.harness.tokens import device_of, eos_ids, max_length, pad_id, padded_batches

# Called after each batch with (rows done, rows in this call).
Report = Callable[[int, int], None]


@dataclass(frozen=True)
class Sampling:
    """Settings of sampled decoding: softmax temperature, nucleus ``top_p`` (1: off), and the seed."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 40,
    batch_size: int = 32,
    stop: Sequence[str] = ("\n",),
    report: Optional[Report] = None,
) -> List[str]:
    """Greedy continuation of each prompt, cut at the first EOS and then at the first ``stop`` string."""
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop, report, None)


def sampled_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    sampling: Sampling,
    max_new_tokens: int = 40,
    batch_size: int = 32,
    stop: Sequence[str] = ("\n",),
    report: Optional[Report] = None,
) -> List[str]:
    """A sampled continuation of each prompt (temperature, then top-p; no top-k), cut as ``greedy_generate``'s.

    Each batch draws from a fresh random state seeded with ``sampling.seed`` and the batch's
    first row, inside ``torch.random.fork_rng`` so nothing else's randomness moves: the same
    seed, prompts and batch size give the same texts.
    """
    if sampling.temperature <= 0 or not 0 < sampling.top_p <= 1:
        raise ValueError(f"temperature must be > 0 and top_p in (0, 1], not {sampling}")
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop, report, sampling)


def _generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    stop: Sequence[str],
    report: Optional[Report],
    sampling: Optional[Sampling],
) -> List[str]:
    from transformers import GenerationConfig

    keep = max(1, max_length(model, tokenizer) - max_new_tokens)
    encoded = [list(tokenizer(prompt).input_ids)[-keep:] for prompt in prompts]
    pad = pad_id(tokenizer)
    eos = eos_ids(model, tokenizer)
    # top_k=0 turns off transformers' default top-k of 50: only temperature and top-p shape a draw
    decoding = (
        dict(do_sample=False)
        if sampling is None
        else dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    )
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=1,
        eos_token_id=sorted(eos) or None,
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
        **decoding,
    )
    device = device_of(model)
    texts: List[str] = []
    with evaluating(model):
        for start, input_ids, attention_mask in padded_batches(
            [(ids, []) for ids in encoded], batch_size, pad, right=False
        ):
            width = input_ids.shape[1]
            # the CPU's random state is always forked; an accelerator's when the model is on one
            accelerator = [device] if device.type != "cpu" else []
            with torch.random.fork_rng(
                devices=accelerator, enabled=sampling is not None, device_type=device.type if accelerator else None
            ):
                if sampling is not None:
                    torch.manual_seed(_batch_seed(sampling.seed, start))
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=settings
                )
            for new in output[:, width:].tolist():
                end = next((i for i, token in enumerate(new) if token in eos), len(new))
                texts.append(cut_at_stop(tokenizer.decode(new[:end], skip_special_tokens=True), stop))
            if report is not None:
                report(min(start + batch_size, len(encoded)), len(encoded))
    return texts


def _batch_seed(seed: int, start: int) -> int:
    """A seed per (seed, batch start): batches draw independently, seeds 0 and 1 share no batch's stream."""
    return (seed * 1_000_003 + start) % (2**63)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest of the ``stop`` strings."""
    end = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:end]
