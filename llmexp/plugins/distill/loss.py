"""The distillation loss, as ``llmexp.training.loop.train`` takes it.

    loss = kl_weight * tau^2 * KL(softmax(t / tau) || softmax(s / tau))
         + lm_weight * next-token cross-entropy
         + hidden_weight * (1 - cos(h_student, h_teacher))

averaged over token positions: ``s`` and ``t`` are the student's and teacher's logits at a
position, ``h`` their last (final-norm) hidden states there. Forward KL with the teacher as
the target distribution is Hinton et al.'s (2015) and Minitron's logit loss; tau^2 keeps
the gradients' scale independent of the temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmexp.sdk import LossOutput


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of tau^2 * KL(teacher_tau || student_tau), in fp32.

    ModelOpt's ``LogitsDistillationLoss(temperature, reduction="none")`` followed by a mean
    computes the same; written here because importing ``modelopt.torch`` costs 10-15 s per
    process, longer than a 200-step distillation of the tiny default takes to start.
    """
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def hidden_cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean over positions of 1 - cosine similarity of the two hidden states."""
    return (1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)).mean()


class DistillationLoss:
    """The weighted loss of a student against ``teacher``, which runs under no_grad (``train`` puts it in eval mode)."""

    def __init__(self, teacher, temperature: float, kl_weight: float, lm_weight: float, hidden_weight: float):
        self.teacher = teacher
        self.temperature = temperature
        self.kl_weight, self.lm_weight, self.hidden_weight = kl_weight, lm_weight, hidden_weight

    def __call__(self, model, input_ids: torch.Tensor) -> LossOutput:
        hidden = self.hidden_weight > 0
        labels = input_ids if self.lm_weight > 0 else None
        student = model(input_ids=input_ids, labels=labels, output_hidden_states=hidden)
        with torch.no_grad():
            teacher = self.teacher(input_ids=input_ids, output_hidden_states=hidden)
        kl = distillation_kl(student.logits, teacher.logits, self.temperature)
        loss, logs = self.kl_weight * kl, {"kl": kl.detach()}
        if labels is not None:
            loss = loss + self.lm_weight * student.loss
            logs["lm"] = student.loss.detach()
        if hidden:
            cosine = hidden_cosine_loss(student.hidden_states[-1], teacher.hidden_states[-1])
            loss = loss + self.hidden_weight * cosine
            logs["cosine"] = cosine.detach()
        return LossOutput(loss=loss, tokens=input_ids.numel(), logs=logs)
