"""What a reward model's scores on held-out pairs say: how often it prefers the chosen side, by how much, and
whether it rewards length instead of quality.

Reward models learn to prefer longer answers wherever the data's chosen answers are longer
(Singhal et al. 2023, "A Long Way to Go"): ``reward_length_correlation`` (Pearson r between the
reward and the response's length in tokens, both sides of every pair) and ``longer_preferred``
(the share of pairs of unequal length where the longer side scores higher) show it, read beside
``chosen_longer``, the share of those pairs where the data's chosen side is the longer. A figure
with nothing to measure (every response the same length) is left out rather than made up.
Pure Python: the numbers are plain floats.
"""

from __future__ import annotations

import statistics
from typing import Dict, Sequence


def pair_diagnostics(chosen: Sequence[float], rejected: Sequence[float], chosen_lengths: Sequence[int],
                     rejected_lengths: Sequence[int]) -> Dict[str, float]:
    """The held-out figures of rewards ``chosen``/``rejected`` (one per pair) and the sides' lengths in tokens."""
    pairs = len(chosen)
    if not pairs or not len(rejected) == len(chosen_lengths) == len(rejected_lengths) == pairs:
        raise ValueError("pair_diagnostics needs one reward and one length per side of at least one pair")
    figures = {
        "pairwise_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / pairs,
        "reward_margin": statistics.fmean(c - r for c, r in zip(chosen, rejected)),
    }
    lengths = [*chosen_lengths, *rejected_lengths]
    rewards = [*chosen, *rejected]
    if len(set(lengths)) > 1 and len(set(rewards)) > 1:
        figures["reward_length_correlation"] = statistics.correlation(lengths, rewards)
    unequal = [(c, r, lc > lr) for c, r, lc, lr in zip(chosen, rejected, chosen_lengths, rejected_lengths) if lc != lr]
    if unequal:
        figures["longer_preferred"] = sum((c > r) if chosen_is_longer else (r > c)
                                          for c, r, chosen_is_longer in unequal) / len(unequal)
        figures["chosen_longer"] = sum(chosen_is_longer for _, _, chosen_is_longer in unequal) / len(unequal)
    return {name: round(value, 5) for name, value in figures.items()}
