"""GRPO's arithmetic: group-relative advantages and the clipped policy objective with a KL penalty.

Pure tensor functions, no model state, so that ``tests/test_grpo_loss.py`` can hold them against
TRL's GRPOTrainer (``_generate_and_score_completions`` for the advantages, ``_compute_loss`` for the
loss) on the same batch. Per completion token t of completion i, with r = pi(t) / pi_old(t):

    loss_t = -min(r * A_i, clip(r, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_t  [* r with kl_correction]
    KL_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (Schulman's k3 estimator, DeepSeekMath eq. 4)

``kl_correction`` multiplies KL_t by r, which makes its gradient the unbiased reverse-KL gradient for
tokens sampled from pi_old (DeepSeek-V3.2); r's gradient counts even where r is 1. TRL 1.16 does it by
default (``use_bias_correction_kl``).

and the per-token losses are aggregated as ``loss_type`` says:

- ``grpo``: each completion's mean over its tokens, then the mean over completions (DeepSeekMath);
  a long completion's tokens weigh less, the length bias Dr. GRPO and DAPO point out.
- ``dr_grpo``: the sum over every token divided by completions x ``max_completion_tokens`` (Dr. GRPO).
- ``dapo``: the sum over every token divided by the active tokens of the whole optimiser step (DAPO), so
  every token weighs the same however the step is split into micro-batches. TRL 1.16's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from llmexp.plugins.grpo import LOSS_TYPES

STD_FLOOR = 1e-4  # added to a group's reward std before dividing, as TRL does (a group of equal rewards has std 0)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(advantage of each completion, whether its group's rewards are all equal).

    ``rewards`` holds consecutive groups of ``group_size`` completions of one prompt each. The
    advantage is the reward minus its group's mean, divided by the group's (Bessel-corrected) std
    when ``scale_rewards`` (GRPO; Dr. GRPO leaves it out: dividing favours prompts that are too
    easy or too hard). A group whose rewards are all equal teaches nothing: its advantages are 0.
    """
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    advantages = grouped - mean
    if scale_rewards:
        advantages = advantages / (std + STD_FLOOR)
    zero_std = torch.isclose(std, torch.zeros_like(std)).expand_as(grouped)
    return advantages.reshape(-1), zero_std.reshape(-1)


def completion_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token | everything before it) of each completion token [completions, completion length], fp32.

    The logits are divided by the sampling ``temperature`` first, as the tokens were drawn from that
    distribution. Prompts are left-padded: positions count from each row's first real token, as the
    serving engine counted them when it sampled the completion.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    length = completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=length + 1).logits
    logits = logits[:, :-1].float() / temperature  # the logits at position p predict token p + 1
    picked = torch.gather(logits, 2, completion_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@dataclass(frozen=True)
class ClippedObjective:
    """GRPO's settings for one loss (see the module docstring)."""

    beta: float  # weight of the KL penalty to the reference; 0: no reference needed
    epsilon_low: float
    epsilon_high: float
    loss_type: str  # one of LOSS_TYPES
    max_completion_tokens: int  # dr_grpo's constant denominator per completion
    kl_correction: bool = True  # KL_t * r (see the module docstring)

    def __call__(self, logprobs: torch.Tensor, old_logprobs: Optional[torch.Tensor],
                 ref_logprobs: Optional[torch.Tensor], advantages: torch.Tensor, mask: torch.Tensor,
                 step_tokens: float, accumulation: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(loss of one micro-batch, its logs: ``kl`` and ``clip_fraction``, masked token means).

        ``old_logprobs`` None: the completions were sampled by the current weights (the first of
        ``num_iterations``), so the ratio is 1 in value and carries the gradient of log pi.
        ``step_tokens`` (the active completion tokens of every micro-batch of the optimiser step) and
        ``accumulation`` (micro-batches per step) serve ``dapo``: the training loop divides each
        micro-batch's loss by ``accumulation``, so the micro-batch's sum is divided by
        ``step_tokens / accumulation`` for the step's gradient to be its sum over ``step_tokens``.
        """
        mask = mask.to(logprobs.dtype)
        old = logprobs.detach() if old_logprobs is None else old_logprobs
        ratio = torch.exp(logprobs - old)
        clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
        advantages = advantages.unsqueeze(1)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        logs: Dict[str, torch.Tensor] = {}
        if self.beta != 0.0:
            delta = ref_logprobs - logprobs
            kl = torch.exp(delta) - delta - 1
            logs["kl"] = _masked_mean(kl.detach(), mask)
            per_token = per_token + self.beta * (kl * ratio if self.kl_correction else kl)
        low = (ratio < 1 - self.epsilon_low) & (advantages < 0)
        high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
        region = low | high
        logs["clip_fraction"] = _masked_mean(region.to(mask.dtype), mask)
        return self._aggregate(per_token * mask, mask, step_tokens, accumulation), logs

    def _aggregate(self, masked: torch.Tensor, mask: torch.Tensor, step_tokens: float, accumulation: int):
        if self.loss_type == "grpo":
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        if self.loss_type == "dr_grpo":
            return masked.sum() / (masked.shape[0] * self.max_completion_tokens)
        if self.loss_type == "dapo":
            return masked.sum() / (max(step_tokens, 1.0) / accumulation)
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, not {self.loss_type!r}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
