"""The losses of the customization techniques, as ``llmexp.training.loop.train`` takes them.

``response_loss`` is next-token cross-entropy on the response tokens (labels of prompt and
padding are -100, which Hugging Face's loss ignores). ``DPOLoss`` is the DPO objective:

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

with log-probabilities summed over response tokens (Rafailov et al. 2023, eq. 7).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from llmexp.sdk import LossOutput


def response_loss(model, batch: Dict[str, torch.Tensor]) -> LossOutput:
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return LossOutput(loss=output.loss, tokens=batch["input_ids"].numel())


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(label_t | tokens before t), counting only labels != -100."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    picked = torch.gather(logits, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logprobs = picked - torch.logsumexp(logits, dim=-1)
    return (token_logprobs * mask).sum(dim=-1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float):
    """Mean DPO loss, and the implicit rewards beta * (log pi - log ref) of chosen and rejected."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    return loss, chosen_reward, rejected_reward


class DPOLoss:
    """The DPO loss of a policy against ``reference`` (frozen; one forward pass for chosen and rejected)."""

    def __init__(self, reference, beta: float):
        self.reference = reference
        self.beta = beta

    def __call__(self, model, batch: Dict[str, torch.Tensor]) -> LossOutput:
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        policy = sequence_logprobs(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
        with torch.no_grad():
            reference = sequence_logprobs(
                self.reference(input_ids=input_ids, attention_mask=attention_mask).logits, labels
            )
        pairs = batch["chosen_input_ids"].shape[0]
        loss, chosen, rejected = dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], self.beta)
        logs = {
            "reward_accuracy": (chosen > rejected).float().mean().detach(),
            "reward_margin": (chosen - rejected).mean().detach(),
        }
        return LossOutput(loss=loss, tokens=input_ids.numel(), logs=logs)
