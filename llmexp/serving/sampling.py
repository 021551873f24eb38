"""How a request's sampling fields turn a model's logits into a distribution over tokens, and a token.

The engine draws each plain decoding step's token from ``token_distribution``; speculative
decoding (``llmexp.serving.speculative``) needs the same distribution for the target and for the
draft, because its acceptance rule compares the two: both go through this one function.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import TopPLogitsWarper


def token_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Probabilities [positions, vocabulary] in float64 on the CPU: temperature, then top-p (transformers' warper).

    In float64, with the largest logit shifted to 0 before dividing, every positive temperature
    the limits allow stays finite: a tiny one sends the other tokens to -inf, a greedy draw (in
    float32, a temperature of 1e-300 was a zero divisor and the softmax all NaN).
    """
    scores = logits.double().reshape(-1, logits.shape[-1])
    scores = (scores - scores.max(-1, keepdim=True).values) / temperature
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    # on the CPU, where a request's generator lives: the same seed gives the same text on any device
    return scores.softmax(-1).cpu()


def draw(probabilities: torch.Tensor, generator: Optional[torch.Generator]) -> int:
    """One token id drawn from ``probabilities`` [vocabulary] with the request's seeded generator."""
    return int(torch.multinomial(probabilities, 1, generator=generator))
