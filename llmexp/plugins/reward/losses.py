"""The Bradley–Terry loss of a reward model, as ``llmexp.sdk.train`` takes it.

The probability that the chosen response beats the rejected one is σ(r_c - r_r); the loss is
its negative log, with an optional margin the chosen reward must clear and an optional term
that keeps rewards centred on 0:

    loss = -mean log σ(r_c - r_r - margin) + center_rewards_coefficient * mean((r_c + r_r)²)

exactly TRL's ``RewardTrainer.compute_loss`` (tests/test_reward_model.py checks it against TRL).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from llmexp.sdk import LossOutput


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor,
                       center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """Mean loss over pairs of the rewards ``chosen`` and ``rejected`` (one per pair), ``margin`` per pair."""
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


class RewardLoss:
    """The loss of a classifier on a batch of ``PairCollate``: the chosen sequences, then the rejected, one pass."""

    def __init__(self, center_rewards_coefficient: float = 0.0):
        self.center_rewards_coefficient = center_rewards_coefficient

    def __call__(self, model, batch: Dict[str, torch.Tensor]) -> LossOutput:
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        chosen, rejected = torch.chunk(rewards.float(), 2)
        loss = bradley_terry_loss(chosen, rejected, batch["margin"], self.center_rewards_coefficient)
        logs = {"accuracy": (chosen > rejected).float().mean().detach(),
                "margin": (chosen - rejected).mean().detach()}
        return LossOutput(loss=loss, tokens=int(batch["attention_mask"].sum()), logs=logs)
