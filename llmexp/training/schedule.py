"""What every training backend's loop shares: the order the examples are seen in and the learning-rate schedule.

Both depend on their arguments alone, so a resumed run sees what the interrupted one would have, and the
torch and megatron loops train alike. torch is imported inside ``data_order``: the planner imports this package.
"""

from __future__ import annotations

import math


def data_order(num_examples: int, num_samples: int, seed: int, shuffle: bool = True):
    """The example index of each of ``num_samples`` training samples, in the order they are seen (a LongTensor).

    Shuffled: seeded permutations of ``range(num_examples)``, one per pass, concatenated;
    unshuffled: ``0 .. num_examples - 1`` repeated. It depends on the arguments alone, so a
    resumed run sees the order the interrupted one would have.
    """
    import torch

    if not shuffle:
        return torch.arange(num_samples) % num_examples
    generator = torch.Generator().manual_seed(seed)
    passes = -(-num_samples // num_examples)
    return torch.cat([torch.randperm(num_examples, generator=generator) for _ in range(passes)])[:num_samples]


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
